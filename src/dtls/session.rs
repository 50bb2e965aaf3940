//! One DTLS session: handshake, header record, datagram relay both ways, idle timeout.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use tokio::net::UdpSocket;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use webrtc_dtls::conn::DTLSConn;
use webrtc_util::Conn;

use super::UdpShared;
use super::peer::PeerConn;
use crate::stats::Stats;
use crate::tunnel::Destination;
use crate::tunnel::header::{DestinationError, HeaderError, Host, TunnelHeader};

/// webrtc-dtls and pion read records into buffers of this size; a record that does not fit
/// is discarded, so every read uses it.
pub const READ_BUF: usize = 8192;
/// The largest payload that crosses: 8192 minus a record's 37 bytes of overhead with
/// AES-128-GCM (13 header, 8 explicit nonce, 16 tag).
pub const MAX_PAYLOAD: usize = 8155;
/// Datagrams taken from the destination per readiness event before the client's side gets a
/// turn.
const DOWN_BATCH: usize = 32;
/// How long sending close_notify may take before the session is dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a session ended.
#[derive(Debug)]
pub enum End {
    /// The DTLS handshake failed (bad or missing certificate, wrong suite, no EMS...).
    HandshakeFailed(String),
    /// The handshake did not finish within handshake_timeout.
    HandshakeTimeout,
    /// The first record was not a valid header.
    InvalidHeader(HeaderError),
    /// No header record within header_timeout.
    HeaderTimeout,
    /// A health probe.
    Probe,
    /// The header named a destination our rule refuses.
    Rejected(DestinationError),
    /// Resolving or connecting the destination socket failed.
    DialFailed(io::Error),
    /// Resolving the destination took longer than dial_timeout.
    DialTimeout,
    /// The client closed the session (close_notify or a fatal alert).
    ClientClosed,
    /// No datagram either way for udp_idle_timeout.
    Idle,
    /// A DTLS or socket error.
    Error(String),
    /// The agent shut down.
    Shutdown,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HandshakeFailed(e) => write!(f, "handshake failed: {e}"),
            Self::HandshakeTimeout => f.write_str("handshake timed out"),
            Self::InvalidHeader(e) => write!(f, "invalid header ({}): {e}", e.check()),
            Self::HeaderTimeout => f.write_str("timeout waiting for header"),
            Self::Probe => f.write_str("probe"),
            Self::Rejected(e) => write!(f, "destination refused: {e}"),
            Self::DialFailed(e) => write!(f, "dial failed: {e}"),
            Self::DialTimeout => f.write_str("dial timed out"),
            Self::ClientClosed => f.write_str("closed by client"),
            Self::Idle => f.write_str("idle timeout"),
            Self::Error(e) => write!(f, "error: {e}"),
            Self::Shutdown => f.write_str("agent shutting down"),
        }
    }
}

impl End {
    fn is_normal(&self) -> bool {
        matches!(
            self,
            Self::Probe | Self::ClientClosed | Self::Idle | Self::Shutdown
        )
    }
}

/// Counts of one session, for its closing log line.
#[derive(Debug, Default)]
struct Counts {
    up_datagrams: u64,
    up_bytes: u64,
    down_datagrams: u64,
    down_bytes: u64,
    dropped: u64,
}

/// Keeps the open-session gauge right however the session ends.
struct SessionGauge<'a>(&'a Stats);

impl<'a> SessionGauge<'a> {
    fn new(stats: &'a Stats) -> Self {
        stats
            .udp_sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for SessionGauge<'_> {
    fn drop(&mut self) {
        self.0
            .udp_sessions
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs one peer's session to its end and logs it. `permit` is a handshake slot, released as
/// soon as the handshake ends.
pub(super) async fn run(
    conn: Arc<PeerConn>,
    shared: Arc<UdpShared>,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let limits = shared.limits;
    let stats = &shared.stats;
    let transport: Arc<dyn Conn + Send + Sync> = conn;
    let handshake = tokio::select! {
        r = timeout(limits.handshake_timeout, DTLSConn::new(transport, shared.dtls.clone(), false, None)) => r,
        // Not a tunnel yet: no grace period.
        () = shutdown.cancelled() => return,
    };
    drop(permit);
    let dtls = match handshake {
        Ok(Ok(dtls)) => dtls,
        Ok(Err(err)) => {
            Stats::bump(&stats.udp_handshake_failures);
            warn!("DTLS handshake failed: {err}");
            return;
        }
        Err(_) => {
            Stats::bump(&stats.udp_handshake_failures);
            warn!(timeout = ?limits.handshake_timeout, "DTLS handshake timed out");
            return;
        }
    };
    Stats::bump(&stats.udp_handshakes);
    let _gauge = SessionGauge::new(stats);
    let started = Instant::now();
    let subject = dtls
        .connection_state()
        .await
        .peer_certificates
        .first()
        .map_or_else(
            || "<none>".to_owned(),
            |der| crate::tls::subject(&CertificateDer::from(der.as_slice())),
        );
    tracing::Span::current().record("subject", subject.as_str());

    let mut counts = Counts::default();
    let mut destination = None;
    let end = serve(
        &dtls,
        &shared,
        &shutdown,
        &stop,
        &mut destination,
        &mut counts,
    )
    .await;
    // close_notify, bounded: a vanished peer must not hold the session.
    let _ = timeout(CLOSE_TIMEOUT, dtls.close()).await;

    let destination = destination.map_or_else(|| "-".to_owned(), |d: Destination| d.to_string());
    let duration_ms = started.elapsed().as_millis() as u64;
    macro_rules! log_end {
        ($level:ident) => {
            $level!(
                destination,
                up_datagrams = counts.up_datagrams,
                up_bytes = counts.up_bytes,
                down_datagrams = counts.down_datagrams,
                down_bytes = counts.down_bytes,
                dropped = counts.dropped,
                duration_ms,
                reason = %end,
                "udp session closed"
            )
        };
    }
    if end.is_normal() {
        log_end!(info);
    } else {
        log_end!(warn);
    }
}

async fn serve(
    dtls: &DTLSConn,
    shared: &UdpShared,
    shutdown: &CancellationToken,
    stop: &CancellationToken,
    destination: &mut Option<Destination>,
    counts: &mut Counts,
) -> End {
    let limits = shared.limits;
    let mut buf = vec![0u8; READ_BUF];
    // The header: the first application record, alone.
    let first = tokio::select! {
        r = dtls.read(&mut buf, Some(limits.header_timeout)) => r,
        () = shutdown.cancelled() => return End::Shutdown,
    };
    let n = match first {
        Ok(n) => n,
        Err(webrtc_dtls::Error::ErrDeadlineExceeded) => return End::HeaderTimeout,
        Err(err) => return read_error(err),
    };
    let header = match TunnelHeader::decode_slice(&buf[..n]) {
        Ok(h) => h,
        Err(e) => return End::InvalidHeader(e),
    };
    if header.is_probe() {
        return End::Probe;
    }
    let dest = match header.destination() {
        Ok(d) => d,
        Err(e) => return End::Rejected(e),
    };
    *destination = Some(dest.clone());
    Stats::bump(&shared.stats.dials);
    let udp = tokio::select! {
        r = timeout(limits.dial_timeout, connect(&dest)) => r,
        () = shutdown.cancelled() => return End::Shutdown,
    };
    let udp = match udp {
        Err(_) => return End::DialTimeout,
        Ok(Err(e)) => return End::DialFailed(e),
        Ok(Ok(s)) => s,
    };
    relay(dtls, &udp, shared, stop, &mut buf, counts).await
}

/// Datagrams both ways until the client closes, the session idles out, or the agent stops.
/// One buffer serves both directions: the DTLS read is cancel-safe, and the destination side
/// waits for readiness before it borrows the buffer.
async fn relay(
    dtls: &DTLSConn,
    udp: &UdpSocket,
    shared: &UdpShared,
    stop: &CancellationToken,
    buf: &mut [u8],
    counts: &mut Counts,
) -> End {
    let idle = shared.limits.idle_timeout;
    let mut last = Instant::now();
    let deadline = sleep_until((last + idle).into());
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = dtls.read(buf, None) => {
                let n = match r {
                    Ok(n) => n,
                    Err(err) => return read_error(err),
                };
                last = Instant::now();
                counts.up_datagrams += 1;
                counts.up_bytes += n as u64;
                if let Err(err) = udp.send(&buf[..n]).await {
                    // ICMP unreachable from an earlier datagram: the destination may come
                    // back, as with a plain UDP socket; anything else ends the session.
                    if err.kind() != io::ErrorKind::ConnectionRefused {
                        return End::Error(format!("sending to destination: {err}"));
                    }
                }
            }
            r = udp.readable() => {
                if let Err(err) = r {
                    return End::Error(format!("destination socket: {err}"));
                }
                // A bounded batch, so a destination that never pauses cannot starve the
                // client's direction; readiness stays set when the batch ends early.
                for _ in 0..DOWN_BATCH {
                    let n = match udp.try_recv(buf) {
                        Ok(n) => n,
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                        Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => break,
                        Err(err) => return End::Error(format!("receiving from destination: {err}")),
                    };
                    last = Instant::now();
                    if n > MAX_PAYLOAD {
                        // Would not fit one record the client can read: drop, count.
                        counts.dropped += 1;
                        Stats::bump(&shared.stats.udp_oversize_drops);
                        continue;
                    }
                    counts.down_datagrams += 1;
                    counts.down_bytes += n as u64;
                    if let Err(err) = dtls.write(&buf[..n], None).await {
                        return End::Error(format!("writing to client: {err}"));
                    }
                }
            }
            () = &mut deadline => {
                if last.elapsed() >= idle {
                    return End::Idle;
                }
                deadline.as_mut().reset((last + idle).into());
            }
            () = stop.cancelled() => return End::Shutdown,
        }
    }
}

fn read_error(err: webrtc_dtls::Error) -> End {
    match err {
        webrtc_dtls::Error::ErrAlertFatalOrClose | webrtc_dtls::Error::ErrConnClosed => {
            End::ClientClosed
        }
        other => End::Error(format!("reading from client: {other}")),
    }
}

/// A UDP socket connected to the destination (names resolved, first address used).
async fn connect(destination: &Destination) -> io::Result<UdpSocket> {
    let port = destination.port.get();
    let addr = match &destination.host {
        Host::Ip(ip) => SocketAddr::new(*ip, port),
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), port))
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "name resolved to nothing"))?,
    };
    let local: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(addr).await?;
    Ok(socket)
}
