//! The TCP stream tunnel: header (under a timeout) -> rule check -> dial -> copy both ways.

pub mod header;
pub mod relay;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

pub use self::header::Destination;
use self::header::{DestinationError, HEADER_LEN, HeaderError, Host, TunnelHeader};
use self::relay::Relay;

/// The timeouts a tunnel runs under.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// After the handshake, the time allowed to receive the header.
    pub header: Duration,
    /// Resolving and connecting to the destination.
    pub dial: Duration,
}

/// Why a tunnel ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached EOF.
    Eof,
    /// A health probe: the header was valid; nothing was dialed.
    Probe,
    /// The header failed a wire check.
    InvalidHeader(HeaderError),
    /// The header named a destination our rule refuses.
    Rejected(DestinationError),
    /// No complete header within the header timeout.
    HeaderTimeout,
    /// Connecting to the destination failed.
    DialFailed(io::Error),
    /// Connecting to the destination took longer than the dial timeout.
    DialTimeout,
    /// A read or write failed while relaying (reset, TLS error).
    Io(io::Error),
    /// The agent shut down while the tunnel was open.
    Shutdown,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Eof => f.write_str("eof"),
            Self::Probe => f.write_str("probe"),
            Self::InvalidHeader(e) => write!(f, "invalid header ({}): {e}", e.check()),
            Self::Rejected(e) => write!(f, "destination refused: {e}"),
            Self::HeaderTimeout => f.write_str("timeout waiting for header"),
            Self::DialFailed(e) => write!(f, "dial failed: {e}"),
            Self::DialTimeout => f.write_str("dial timed out"),
            Self::Io(e) if e.kind() == io::ErrorKind::ConnectionReset => write!(f, "reset: {e}"),
            Self::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                f.write_str("eof (the client closed without close_notify)")
            }
            Self::Io(e) => write!(f, "error: {e}"),
            Self::Shutdown => f.write_str("agent shutting down"),
        }
    }
}

impl End {
    /// Whether this end is the normal outcome of a well-behaved client.
    pub fn is_clean(&self) -> bool {
        match self {
            Self::Eof | Self::Probe => true,
            // Many TLS clients close the socket without close_notify after a complete exchange.
            Self::Io(e) => e.kind() == io::ErrorKind::UnexpectedEof,
            _ => false,
        }
    }
}

/// What happened in one tunnel: the material of its closing log line.
#[derive(Debug)]
pub struct Report {
    /// The checked destination, once the header named one.
    pub destination: Option<Destination>,
    /// Where the agent's side of the destination connection was, once dialed.
    pub local: Option<SocketAddr>,
    /// Payload bytes from the client to the destination.
    pub up: u64,
    /// Payload bytes from the destination to the client.
    pub down: u64,
    /// Time from the header read start to the end.
    pub duration: Duration,
    /// Why it ended.
    pub end: End,
}

/// Serves one stream tunnel on an established (TLS) connection. `shutdown` ends it while it
/// is still waiting for its header or dialing; `stop` ends the relay at once (the daemon
/// cancels it when the shutdown grace period is over).
pub async fn serve<S>(
    client: &mut S,
    timeouts: Timeouts,
    stats: &Stats,
    shutdown: &CancellationToken,
    stop: &CancellationToken,
) -> Report
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let mut report = Report {
        destination: None,
        local: None,
        up: 0,
        down: 0,
        duration: Duration::ZERO,
        end: End::Eof,
    };
    report.end = run(client, timeouts, stats, shutdown, stop, &mut report).await;
    report.duration = started.elapsed();
    report
}

async fn run<S>(
    client: &mut S,
    timeouts: Timeouts,
    stats: &Stats,
    shutdown: &CancellationToken,
    stop: &CancellationToken,
    report: &mut Report,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Read exactly the header: no buffering, so payload sent behind it stays in the stream.
    let mut bytes = [0u8; HEADER_LEN];
    let read = tokio::select! {
        r = timeout(timeouts.header, client.read_exact(&mut bytes)) => r,
        () = shutdown.cancelled() => return End::Shutdown,
    };
    match read {
        Err(_) => return End::HeaderTimeout,
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return End::InvalidHeader(HeaderError::Short);
        }
        Ok(Err(e)) => return End::Io(e),
        Ok(Ok(_)) => {}
    }
    let header = match TunnelHeader::decode(&bytes) {
        Ok(header) => header,
        Err(e) => return End::InvalidHeader(e),
    };
    if header.is_probe() {
        return End::Probe;
    }
    let destination = match header.destination() {
        Ok(d) => d,
        Err(e) => return End::Rejected(e),
    };
    report.destination = Some(destination.clone());

    Stats::bump(&stats.dials);
    let dial = tokio::select! {
        r = timeout(timeouts.dial, dial(&destination)) => r,
        () = shutdown.cancelled() => return End::Shutdown,
    };
    let mut upstream = match dial {
        Err(_) => return End::DialTimeout,
        Ok(Err(e)) => return End::DialFailed(e),
        Ok(Ok(s)) => s,
    };
    report.local = upstream.local_addr().ok();
    Stats::bump(&stats.tcp_tunnels);
    tune(&upstream);

    let mut relay = Relay::new();
    let result = tokio::select! {
        r = relay.run(client, &mut upstream) => Some(r),
        () = stop.cancelled() => None,
    };
    report.up = relay.a_to_b();
    report.down = relay.b_to_a();
    match result {
        None => End::Shutdown,
        Some(Ok(())) => End::Eof,
        Some(Err(e)) => End::Io(e),
    }
}

/// Connects to a checked destination: IP literals directly, names through the resolver
/// (every address it returns is tried in turn, IPv4 and IPv6 alike).
pub async fn dial(destination: &Destination) -> io::Result<TcpStream> {
    let port = destination.port.get();
    match &destination.host {
        Host::Ip(ip) => TcpStream::connect(SocketAddr::new(*ip, port)).await,
        Host::Name(name) => TcpStream::connect((name.as_str(), port)).await,
    }
}

/// Latency and liveness options for both legs of a tunnel.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}
