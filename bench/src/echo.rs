//! The echo peers (TCP and UDP) on their own runtime and thread, so that the client's work
//! never delays them and their CPU time can be read apart (threads named `bench-echo`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, Result};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Runtime;

/// Thread-name prefix of the echo runtime.
pub const THREAD: &str = "bench-echo";
const TCP_BUF: usize = 64 * 1024;
const UDP_SOCKET_BUF: usize = 4 << 20;

/// Running echo servers on 127.0.0.1.
pub struct Echo {
    /// TCP echo address.
    pub tcp: SocketAddr,
    /// UDP echo address.
    pub udp: SocketAddr,
    /// Open TCP connections right now.
    pub active: Arc<AtomicUsize>,
    runtime: Option<Runtime>,
}

impl Echo {
    /// Starts both servers on a one-thread runtime.
    pub fn start() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(THREAD)
            .enable_all()
            .build()
            .context("building the echo runtime")?;
        let active = Arc::new(AtomicUsize::new(0));
        let (tcp, udp) = runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let udp = udp_socket()?;
            anyhow::Ok((listener, udp))
        })?;
        let (tcp_addr, udp_addr) = (tcp.local_addr()?, udp.local_addr()?);
        runtime.spawn(accept_loop(tcp, active.clone()));
        runtime.spawn(udp_loop(udp));
        Ok(Self {
            tcp: tcp_addr,
            udp: udp_addr,
            active,
            runtime: Some(runtime),
        })
    }

    /// Open TCP connections.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn udp_socket() -> Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Large buffers: the echo must not be where datagrams are lost.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUF);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUF);
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(socket.into())?)
}

async fn accept_loop(listener: TcpListener, active: Arc<AtomicUsize>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let active = active.clone();
                active.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    echo_tcp(stream).await;
                    active.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn echo_tcp(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; TCP_BUF];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = stream.shutdown().await;
}

async fn udp_loop(socket: UdpSocket) {
    let mut buf = vec![0u8; 65536];
    loop {
        if let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], peer).await;
        }
    }
}
