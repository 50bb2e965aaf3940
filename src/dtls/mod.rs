//! The UDP side: owns the DTLS socket, demultiplexes datagrams per peer, one session task each.
//!
//! webrtc-dtls's own listeners are not used: its `listener` runs every handshake inside
//! `accept()` with no timeout (one silent ClientHello stalls everyone), and webrtc-util's
//! `conn_udp_listener` never forgets a closed peer. Here a table keyed by peer address gives each
//! peer a bounded queue; only a ClientHello may open an entry; the entry leaves the table when
//! its session ends; handshakes run in their own tasks under a timeout and a cap.

mod peer;
mod session;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use rustls::RootCertStore;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, field, info_span, warn};
use webrtc_dtls::config::{ClientAuthType, Config as DtlsConfig, ExtendedMasterSecretType};

use self::peer::PeerConn;
use crate::policy::Policy;
use crate::protocol::DTLS_CIPHER_SUITE;
use crate::stats::Stats;
use crate::tls::TlsMaterial;
use crate::tunnel::Timeouts;

/// Receive buffer asked of the kernel for the DTLS socket (capped by net.core.rmem_max).
pub(crate) const SOCKET_RCVBUF: usize = 4 << 20;
/// Datagrams queued per peer before the demultiplexer drops (and counts) more.
const PEER_QUEUE: usize = 128;
/// Largest datagram the socket reads.
const MAX_DATAGRAM: usize = 65_535;
/// DTLS record content type of handshake messages, and the ClientHello message type.
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Offset of the handshake message type in a DTLS record (after the 13-byte record header).
const RECORD_HEADER_LEN: usize = 13;

/// Limits and timeouts of the UDP side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UdpLimits {
    /// DTLS handshake deadline.
    pub(crate) handshake_timeout: Duration,
    /// Header and dial deadlines.
    pub(crate) timeouts: Timeouts,
    /// No datagram either way for this long ends a session.
    pub(crate) idle_timeout: Duration,
    /// Table entries (handshaking or established) at most.
    pub(crate) max_sessions: usize,
    /// Handshakes in flight at most.
    pub(crate) max_handshakes: usize,
}

/// What every session task needs.
pub(crate) struct UdpShared {
    /// The server's DTLS configuration.
    pub(crate) dtls: DtlsConfig,
    /// Limits.
    pub(crate) limits: UdpLimits,
    /// Counters.
    pub(crate) stats: Arc<Stats>,
    /// Which tunnel destinations may be dialed.
    pub(crate) policy: Arc<Policy>,
}

/// The DTLS server configuration: the TLS port's certificate and CA, one cipher suite,
/// Extended Master Secret required, client certificates required unless turned off.
pub(crate) fn server_config(
    material: &TlsMaterial,
    require_client_cert: bool,
) -> anyhow::Result<DtlsConfig> {
    let mut client_cas = RootCertStore::empty();
    for cert in &material.ca {
        client_cas
            .add(cert.clone())
            .context("tls.ca: not a usable CA certificate")?;
    }
    Ok(DtlsConfig {
        certificates: vec![crate::tls::dtls_certificate(
            material.chain.clone(),
            &material.key,
        )?],
        cipher_suites: vec![DTLS_CIPHER_SUITE],
        extended_master_secret: ExtendedMasterSecretType::Require,
        client_auth: if require_client_cert {
            ClientAuthType::RequireAndVerifyClientCert
        } else {
            ClientAuthType::VerifyClientCertIfGiven
        },
        client_cas,
        ..Default::default()
    })
}

/// Binds the DTLS socket with a large receive buffer. Returns the socket and the buffer size
/// the kernel granted.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    let _ = socket.set_recv_buffer_size(SOCKET_RCVBUF);
    let granted = socket.recv_buffer_size().unwrap_or(0);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    Ok((socket, granted))
}

/// Whether a datagram starts with a DTLS handshake record carrying a ClientHello: the only
/// thing that may create state for an unknown peer.
fn is_client_hello(datagram: &[u8]) -> bool {
    datagram.first() == Some(&CONTENT_HANDSHAKE)
        && datagram.get(RECORD_HEADER_LEN) == Some(&HANDSHAKE_CLIENT_HELLO)
}

struct Entry {
    id: u64,
    tx: mpsc::Sender<Bytes>,
}

/// The demultiplexer. Runs until `hard_stop`, or until `shutdown` once the last session ended
/// (sessions keep receiving through it during the grace period).
pub(crate) async fn run(
    socket: Arc<UdpSocket>,
    shared: Arc<UdpShared>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    let stats = shared.stats.clone();
    let handshakes = Arc::new(Semaphore::new(shared.limits.max_handshakes));
    let mut peers: HashMap<SocketAddr, Entry> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut accepting = true;
    loop {
        if !accepting && peers.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            () = hard_stop.cancelled() => break,
            () = shutdown.cancelled(), if accepting => {
                accepting = false;
                continue;
            }
            Some((peer, id)) = done_rx.recv() => {
                // The peer may already have a newer entry: remove only the one that ended.
                if peers.get(&peer).is_some_and(|e| e.id == id) {
                    peers.remove(&peer);
                    Stats::set(&stats.udp_table, peers.len() as u64);
                }
            }
            received = socket.recv_from(&mut buf) => {
                let (n, peer) = match received {
                    Ok(r) => r,
                    Err(err) => {
                        // ICMP errors surface here on some systems; never fatal.
                        debug!(%err, "udp receive failed");
                        sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                };
                // Queued datagrams are copied out of the receive buffer: one small allocation
                // each, next to ~20 µs of DTLS work. Slicing a shared pool instead would let
                // one datagram held in a slow peer's queue pin a whole pool block.
                let datagram = &buf[..n];
                if let Some(entry) = peers.get(&peer) {
                    match entry.tx.try_send(Bytes::copy_from_slice(datagram)) {
                        Ok(()) => continue,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            Stats::bump(&stats.udp_queue_drops);
                            continue;
                        }
                        // The session ended and its removal is still in flight: a ClientHello
                        // from the same address starts afresh below.
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            peers.remove(&peer);
                        }
                    }
                }
                if !accepting || !is_client_hello(datagram) {
                    Stats::bump(&stats.udp_unsolicited);
                    continue;
                }
                if peers.len() >= shared.limits.max_sessions {
                    Stats::bump(&stats.udp_refused_sessions);
                    // Clients retry every second and a flood is many peers: warn on the first
                    // refusal and then once per 1000, with the running count.
                    let refused = Stats::get(&stats.udp_refused_sessions);
                    if refused % 1000 == 1 {
                        warn!(%peer, max = shared.limits.max_sessions, refused, "UDP session refused: max_udp_sessions reached");
                    }
                    continue;
                }
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    Stats::bump(&stats.udp_shed_handshakes);
                    debug!(%peer, "DTLS handshake shed: max_udp_handshakes in flight");
                    continue;
                };
                next_id += 1;
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                if tx.try_send(Bytes::copy_from_slice(datagram)).is_err() {
                    continue; // a fresh queue has room: unreachable
                }
                peers.insert(peer, Entry { id: next_id, tx });
                Stats::set(&stats.udp_table, peers.len() as u64);
                let conn = Arc::new(PeerConn::new(socket.clone(), peer, rx));
                let id = next_id;
                let done = done_tx.clone();
                let shared = shared.clone();
                let soft = shutdown.clone();
                let stop = hard_stop.clone();
                let span = info_span!("udp", %peer, subject = field::Empty);
                tasks.spawn(
                    async move {
                        session::run(conn, shared, permit, soft, stop).await;
                        let _ = done.send((peer, id));
                    }
                    .instrument(span),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_client_hello_opens_an_entry() {
        let mut hello = [0u8; 25];
        hello[0] = 22;
        hello[13] = 1;
        assert!(is_client_hello(&hello));
        hello[13] = 2;
        assert!(!is_client_hello(&hello));
        assert!(!is_client_hello(&[23; 40]));
        assert!(!is_client_hello(&[22; 5]));
        assert!(!is_client_hello(&[]));
    }
}
