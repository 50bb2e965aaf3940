//! `forward`: a local port forwarded through the agent, as a GoDoxy route would use it.
//! On shutdown it drains: it stops accepting, closes its TCP tunnels with close_notify and
//! its UDP sessions with a DTLS close_notify, so the agent frees them at once instead of
//! waiting for an idle timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
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
/// Pause after a failed accept before trying again.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// On shutdown, how long the closing of every tunnel and session may take in all.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// TCP: one tunnel per accepted connection until `shutdown`; then every tunnel is closed
/// cleanly and this returns.
pub async fn tcp(listener: TcpListener, forward: Forward, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.cancelled() => break,
        };
        let (local, peer) = match accepted {
            Ok(a) => a,
            Err(err) => {
                warn!(%err, "accept failed");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };
        tasks.spawn(tcp_tunnel(local, peer, forward.clone(), shutdown.clone()));
    }
    drop(listener);
    drain(tasks, "TCP tunnels").await;
}

async fn tcp_tunnel(
    mut local: tokio::net::TcpStream,
    peer: SocketAddr,
    forward: Forward,
    shutdown: CancellationToken,
) {
    let _ = local.set_nodelay(true);
    let started = Instant::now();
    let opened = tokio::select! {
        r = forward.client.open_tunnel(forward.server, &forward.header) => r,
        () = shutdown.cancelled() => return,
    };
    let mut tunnel = match opened {
        Ok(t) => t,
        Err(err) => {
            warn!(%peer, "opening a tunnel through {} failed: {err}", forward.server);
            return;
        }
    };
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut local, &mut tunnel) => Some(r),
        () = shutdown.cancelled() => None,
    };
    match copied {
        Some(Ok((up, down))) => info!(
            %peer,
            up,
            down,
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "forwarded connection closed"
        ),
        Some(Err(err)) => info!(%peer, "forwarded connection ended: {err}"),
        None => {
            // close_notify to the agent, FIN to the local client.
            let _ = tunnel.shutdown().await;
            let _ = local.shutdown().await;
            info!(%peer, "forwarded connection closed: forwarder stopping");
        }
    }
}

/// UDP: one DTLS session per local client address, closed after `idle_timeout` of silence;
/// on `shutdown` every session is closed with close_notify and this returns.
pub async fn udp(socket: UdpSocket, forward: Forward, shutdown: CancellationToken) {
    let socket = Arc::new(socket);
    let tasks = TaskTracker::new();
    let mut sessions: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<SocketAddr>();
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
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
                let first = match sessions.get(&peer) {
                    Some(tx) => match tx.try_send(datagram) {
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => continue,
                        Err(mpsc::error::TrySendError::Closed(d)) => d,
                    },
                    None => datagram,
                };
                let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
                if tx.try_send(first).is_err() {
                    continue;
                }
                sessions.insert(peer, tx);
                let session = udp_session(
                    peer,
                    rx,
                    socket.clone(),
                    forward.clone(),
                    shutdown.clone(),
                    done_tx.clone(),
                );
                tasks.spawn(session);
            }
        }
    }
    drop(sessions);
    drain(tasks, "UDP sessions").await;
}

async fn udp_session(
    peer: SocketAddr,
    rx: mpsc::Receiver<Bytes>,
    socket: Arc<UdpSocket>,
    forward: Forward,
    shutdown: CancellationToken,
    done: mpsc::UnboundedSender<SocketAddr>,
) {
    let opened = tokio::select! {
        r = forward.client.open_udp(forward.server, &forward.header, forward.handshake_timeout) => r,
        () = shutdown.cancelled() => {
            let _ = done.send(peer);
            return;
        }
    };
    match opened {
        Ok(tunnel) => {
            let reason = relay(&tunnel, rx, &socket, peer, forward.idle_timeout, &shutdown).await;
            tunnel.close().await;
            info!(%peer, reason, "forwarded UDP session closed");
        }
        Err(err) => {
            warn!(%peer, "opening a UDP tunnel through {} failed: {err:#}", forward.server)
        }
    }
    let _ = done.send(peer);
}

async fn relay(
    tunnel: &UdpTunnel,
    mut rx: mpsc::Receiver<Bytes>,
    socket: &UdpSocket,
    peer: SocketAddr,
    idle: Duration,
    shutdown: &CancellationToken,
) -> &'static str {
    let mut buf = UdpTunnel::buffer();
    let mut last = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return "forwarder stopping",
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

/// Waits for the closing tunnels or sessions, at most [`DRAIN_TIMEOUT`].
async fn drain(tasks: TaskTracker, what: &str) {
    tasks.close();
    let open = tasks.len();
    if open > 0 {
        info!(open, "closing {what}");
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            left = tasks.len(),
            "{what} still closing after {DRAIN_TIMEOUT:?}; leaving"
        );
    }
}
