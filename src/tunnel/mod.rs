//! One pipeline for both transports: header -> probe -> destination check -> dial -> relay ->
//! one closing log line. A transport plugs in through [`Link`]: how it reads the header, dials
//! and relays; everything between (and every rule about destinations) is written once here.

mod relay;
pub(crate) mod tcp;
pub(crate) mod udp;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::field::display;
use tracing::{info, warn};

use crate::policy::{Denial, Policy, Refused};
use crate::protocol::{Destination, DestinationError, HEADER_LEN, HeaderError, TunnelHeader};
use crate::stats::{Stats, Transport};

/// The deadlines of a tunnel's set-up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// After the handshake, the time allowed to receive the header.
    pub header: Duration,
    /// Resolving and connecting to the destination.
    pub dial: Duration,
}

/// What a tunnel runs with. `shutdown` ends it while it is still waiting for its header or
/// dialing; `stop` ends the relay at once (the daemon fires it when the grace period is over).
pub(crate) struct Context<'a> {
    pub timeouts: Timeouts,
    /// Which destinations may be dialed.
    pub policy: &'a Policy,
    pub stats: &'a Stats,
    pub shutdown: &'a CancellationToken,
    pub stop: &'a CancellationToken,
}

/// A transport's side of a tunnel: the authenticated client connection.
pub(crate) trait Link {
    /// For the closing log line and the metrics.
    const TRANSPORT: Transport;
    /// The agent's connection to the destination.
    type Upstream;

    /// Receives exactly the header (the pipeline bounds it with the header timeout).
    async fn read_header(&mut self) -> Result<[u8; HEADER_LEN], End>;
    /// Connects to the addresses the policy allowed, in order, resolving nothing again: the
    /// address checked is the address dialed.
    async fn dial(&mut self, addrs: &[SocketAddr]) -> io::Result<Self::Upstream>;
    /// Relays until the tunnel ends, counting into `counts`.
    async fn relay(
        &mut self,
        upstream: Self::Upstream,
        stop: &CancellationToken,
        counts: &mut Counts,
    ) -> End;
}

/// Why a tunnel ended.
#[derive(Debug)]
pub(crate) enum End {
    /// TCP: both directions reached EOF (or the client closed without close_notify after a
    /// complete exchange, as many TLS clients do).
    Eof,
    /// UDP: the client closed the session (close_notify or a fatal alert).
    ClientClosed,
    /// No datagram (UDP) or byte (TCP, `stream.idle_timeout`) either way for the idle timeout.
    Idle,
    /// A health probe: the header was valid; nothing was dialed.
    Probe,
    /// The header failed a wire check.
    InvalidHeader(HeaderError),
    /// The header named a destination our rule refuses.
    Rejected(DestinationError),
    /// The policy refused the destination (every address it resolved to): nothing was dialed.
    Denied(Denial),
    /// No complete header within the header timeout.
    HeaderTimeout,
    /// Resolving or connecting to the destination failed.
    DialFailed(io::Error),
    /// Connecting to the destination took longer than the dial timeout.
    DialTimeout,
    /// A read or write failed while relaying (reset, TLS or DTLS error).
    Io(io::Error),
    /// The agent shut down while the tunnel was open.
    Shutdown,
}

impl End {
    /// The `reason` field: a stable short name.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Eof => "eof",
            Self::ClientClosed => "closed",
            Self::Idle => "idle",
            Self::Probe => "probe",
            Self::InvalidHeader(_) => "invalid_header",
            Self::Rejected(_) => "rejected",
            Self::Denied(_) => "denied",
            Self::HeaderTimeout => "header_timeout",
            Self::DialFailed(_) => "dial_failed",
            Self::DialTimeout => "dial_timeout",
            Self::Io(e) if e.kind() == io::ErrorKind::ConnectionReset => "reset",
            Self::Io(_) => "error",
            Self::Shutdown => "shutdown",
        }
    }

    /// The `err` field, for ends that carry an error.
    fn error(&self) -> Option<Detail<'_>> {
        match self {
            Self::InvalidHeader(e) => Some(Detail::Header(e)),
            Self::Rejected(e) => Some(Detail::Destination(e)),
            Self::Denied(d) => Some(Detail::Denied(d)),
            Self::DialFailed(e) | Self::Io(e) => Some(Detail::Io(e)),
            _ => None,
        }
    }

    /// The normal outcome of a well-behaved client (or of our own shutdown): logged at info;
    /// refusals and failures are worth an operator's look and go out at warn.
    fn is_normal(&self) -> bool {
        matches!(
            self,
            Self::Eof | Self::ClientClosed | Self::Idle | Self::Probe | Self::Shutdown
        )
    }
}

/// The error of an [`End`], displayed without allocating.
enum Detail<'a> {
    Header(&'a HeaderError),
    Destination(&'a DestinationError),
    Denied(&'a Denial),
    Io(&'a io::Error),
}

impl fmt::Display for Detail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header(e) => write!(f, "{} check: {e}", e.check()),
            Self::Destination(e) => write!(f, "destination refused: {e}"),
            Self::Denied(d) => write!(f, "denied by policy: {d}"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Payload counted by a relay.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// Bytes from the client to the destination.
    pub up_bytes: u64,
    /// Bytes from the destination to the client.
    pub down_bytes: u64,
    /// UDP: datagrams from the client.
    pub up_datagrams: u64,
    /// UDP: datagrams to the client.
    pub down_datagrams: u64,
    /// UDP: datagrams from the destination too large for one record, dropped.
    pub dropped: u64,
}

/// What happened in one tunnel: the material of its closing log line.
#[derive(Debug)]
pub(crate) struct Report {
    /// `tcp` or `udp`.
    pub transport: Transport,
    /// The checked destination, once the header named one.
    pub destination: Option<Destination>,
    /// A destination the rule refused, as the header wrote it (lossy UTF-8, at most
    /// `HOST_MAX` + `PORT_MAX` bytes): the log formatters escape its control characters.
    pub refused: Option<String>,
    /// What crossed.
    pub counts: Counts,
    /// From the start of the header read to the end.
    pub duration: Duration,
    /// Why it ended.
    pub end: End,
}

/// Runs one tunnel on an authenticated client connection, from its header to its end.
pub(crate) async fn serve<L: Link>(link: &mut L, cx: &Context<'_>) -> Report {
    let started = Instant::now();
    let transport = L::TRANSPORT;
    Stats::bump(&cx.stats.tunnels_opened[transport.index()]);
    let mut report = Report {
        transport,
        destination: None,
        refused: None,
        counts: Counts::default(),
        duration: Duration::ZERO,
        end: End::Eof,
    };
    report.end = match open(link, cx, &mut report).await {
        Ok(upstream) => link.relay(upstream, cx.stop, &mut report.counts).await,
        Err(end) => end,
    };
    report.duration = started.elapsed();
    // The relays added the bytes to the transport's counters as they went.
    cx.stats.prom.tunnel_closed(transport, report.end.reason());
    Stats::bump(&cx.stats.tunnels_closed[transport.index()]);
    report
}

/// Header, probe, destination rule, policy, dial: the only way to a connected destination.
async fn open<L: Link>(
    link: &mut L,
    cx: &Context<'_>,
    report: &mut Report,
) -> Result<L::Upstream, End> {
    let bytes = tokio::select! {
        r = timeout(cx.timeouts.header, link.read_header()) => r.map_err(|_| End::HeaderTimeout)??,
        () = cx.shutdown.cancelled() => return Err(End::Shutdown),
    };
    let header = TunnelHeader::decode(&bytes).map_err(End::InvalidHeader)?;
    if header.is_probe() {
        return Err(End::Probe);
    }
    let checked = match header.destination() {
        Ok(checked) => report.destination.insert(checked),
        Err(err) => {
            report.refused = Some(format!(
                "{}:{}",
                String::from_utf8_lossy(header.host_bytes()),
                String::from_utf8_lossy(header.port_bytes())
            ));
            return Err(End::Rejected(err));
        }
    };
    // Resolve once, judge every address, dial only the allowed ones: a denied destination is
    // refused before any packet leaves for it. The dial timeout covers resolving too.
    let dial = async {
        let started = Instant::now();
        let addrs = cx
            .policy
            .resolve(&checked.host, checked.port.get())
            .await
            .map_err(|refused| match refused {
                Refused::Denied(denial) => End::Denied(denial),
                Refused::Resolve(err) => End::DialFailed(err),
            })?;
        Stats::bump(&cx.stats.dials);
        let upstream = link.dial(&addrs).await.map_err(End::DialFailed)?;
        cx.stats.prom.dialed(L::TRANSPORT, started.elapsed());
        Ok(upstream)
    };
    tokio::select! {
        r = timeout(cx.timeouts.dial, dial) => r.unwrap_or(Err(End::DialTimeout)),
        () = cx.shutdown.cancelled() => Err(End::Shutdown),
    }
}

/// The one closing line of every tunnel, with the same fields for both transports (the
/// datagram counts only for UDP). Peer and subject come from the connection's span.
pub(crate) fn log_closed(report: &Report) {
    let transport = report.transport.as_str();
    let c = &report.counts;
    let udp = report.transport == Transport::Udp;
    let destination: &dyn fmt::Display = match (&report.destination, &report.refused) {
        (Some(destination), _) => destination,
        (None, Some(refused)) => refused,
        (None, None) => &"-",
    };
    let duration_ms = u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX);
    let reason = report.end.reason();
    let err = report.end.error().map(display);
    macro_rules! closed {
        ($level:ident) => {
            $level!(
                transport = %transport,
                destination = %destination,
                up_bytes = c.up_bytes,
                down_bytes = c.down_bytes,
                up_datagrams = udp.then_some(c.up_datagrams),
                down_datagrams = udp.then_some(c.down_datagrams),
                dropped = udp.then_some(c.dropped),
                duration_ms,
                reason = %reason,
                err,
                "tunnel closed"
            )
        };
    }
    if report.end.is_normal() {
        closed!(info);
    } else {
        closed!(warn);
    }
}
