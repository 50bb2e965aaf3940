//! `forward`: a local port forwarded through the agent, as a GoDoxy route would use it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::client::{ClientTls, RecvError, UdpTunnel};
use crate::protocol::TunnelHeader;

/// Where to forward to, and how.
#[derive(Clone)]
pub struct Forward {
    /// Client TLS settings.
    pub client: ClientTls,
    /// The agent's address (TCP or UDP port).
    pub server: SocketAddr,
    /// The header naming the target.
    pub header: TunnelHeader,
    /// Handshake deadline.
    pub handshake_timeout: Duration,
    /// UDP: a local client silent this long (both ways) loses its session.
    pub idle_timeout: Duration,
}

/// Datagrams queued per local UDP client while its session handshakes or sends.
const CLIENT_QUEUE: usize = 256;

/// TCP: one tunnel per accepted connection, until `shutdown`.
pub async fn tcp(listener: TcpListener, forward: Forward, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.cancelled() => return,
        };
        let (mut local, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let forward = forward.clone();
        tokio::spawn(async move {
            let _ = local.set_nodelay(true);
            let started = Instant::now();
            let mut tunnel = match forward
                .client
                .open_tunnel(forward.server, &forward.header)
                .await
            {
                Ok(t) => t,
                Err(err) => {
                    warn!(%peer, "opening a tunnel through {} failed: {err}", forward.server);
                    return;
                }
            };
            match tokio::io::copy_bidirectional(&mut local, &mut tunnel).await {
                Ok((up, down)) => info!(
                    %peer,
                    up,
                    down,
                    duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "forwarded connection closed"
                ),
                Err(err) => info!(%peer, "forwarded connection ended: {err}"),
            }
        });
    }
}

/// UDP: one DTLS session per local client address, closed after `idle_timeout` of silence.
pub async fn udp(socket: UdpSocket, forward: Forward, shutdown: CancellationToken) {
    let socket = Arc::new(socket);
    let mut sessions: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<SocketAddr>();
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            Some(peer) = done_rx.recv() => {
                if sessions.get(&peer).is_some_and(|tx| tx.is_closed()) {
                    sessions.remove(&peer);
                }
            }
            r = socket.recv_from(&mut buf) => {
                let (n, peer) = match r {
                    Ok(r) => r,
                    Err(err) => {
                        debug!(%err, "udp receive failed");
                        continue;
                    }
                };
                let datagram = Bytes::copy_from_slice(&buf[..n]);
                if let Some(tx) = sessions.get(&peer) {
                    match tx.try_send(datagram) {
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => continue,
                        Err(mpsc::error::TrySendError::Closed(d)) => {
                            sessions.remove(&peer);
                            start_session(&mut sessions, peer, d, &socket, &forward, &done_tx);
                        }
                    }
                } else {
                    start_session(&mut sessions, peer, datagram, &socket, &forward, &done_tx);
                }
            }
        }
    }
}

fn start_session(
    sessions: &mut HashMap<SocketAddr, mpsc::Sender<Bytes>>,
    peer: SocketAddr,
    first: Bytes,
    socket: &Arc<UdpSocket>,
    forward: &Forward,
    done: &mpsc::UnboundedSender<SocketAddr>,
) {
    let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
    if tx.try_send(first).is_err() {
        return;
    }
    sessions.insert(peer, tx);
    let (socket, forward, done) = (socket.clone(), forward.clone(), done.clone());
    tokio::spawn(async move {
        match forward
            .client
            .open_udp(forward.server, &forward.header, forward.handshake_timeout)
            .await
        {
            Ok(tunnel) => {
                let reason = relay(&tunnel, rx, &socket, peer, forward.idle_timeout).await;
                tunnel.close().await;
                info!(%peer, reason, "forwarded UDP session closed");
            }
            Err(err) => {
                warn!(%peer, "opening a UDP tunnel through {} failed: {err:#}", forward.server)
            }
        }
        let _ = done.send(peer);
    });
}

async fn relay(
    tunnel: &UdpTunnel,
    mut rx: mpsc::Receiver<Bytes>,
    socket: &UdpSocket,
    peer: SocketAddr,
    idle: Duration,
) -> &'static str {
    let mut buf = UdpTunnel::buffer();
    let mut last = Instant::now();
    loop {
        tokio::select! {
            datagram = rx.recv() => {
                let Some(datagram) = datagram else { return "forwarder stopped" };
                last = Instant::now();
                if tunnel.send(&datagram).await.is_err() {
                    return "agent connection failed";
                }
            }
            r = tunnel.recv(&mut buf, idle) => match r {
                Ok(Some(n)) => {
                    last = Instant::now();
                    let _ = socket.send_to(&buf[..n], peer).await;
                }
                Ok(None) => return "closed by the agent",
                Err(RecvError::TimedOut(_)) if last.elapsed() >= idle => return "idle",
                Err(RecvError::TimedOut(_)) => {}
                Err(RecvError::Failed(_)) => return "agent connection failed",
            },
        }
    }
}
