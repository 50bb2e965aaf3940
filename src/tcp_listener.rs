//! The TLS port: accept loop, per-connection handshake under a timeout, routing by ALPN.
//!
//! A connection is a stranger until its handshake completes: it holds a place in the
//! `admission` pool (per-source cap, short deadline when busy, the oldest shed when full), not
//! one of the `max_connections` places, which only authenticated connections take.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, timeout};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, field, info_span, warn};

use crate::admission::{Admission, Ticket};
use crate::alpn::Alpn;
use crate::credentials::{CredentialStore, Credentials};
use crate::dtls::report::{self, Failure, Tally};
use crate::http::{self, HttpShared};
use crate::policy::Policy;
use crate::stats::{Stats, Transport};
use crate::tunnel::tcp::{TcpLink, tune};
use crate::tunnel::{self, Timeouts};

/// How long sending close_notify may take at the end of a connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pauses after failed accepts (e.g. out of file descriptors): doubling from the first to the
/// last while accepts keep failing, back to the first after a success.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What every connection task needs.
pub(crate) struct Shared {
    /// The TLS configurations and client rules; each handshake reads the current set once.
    pub(crate) credentials: Arc<CredentialStore>,
    /// For the HTTP API.
    pub(crate) http: Arc<HttpShared>,
    /// Connections whose handshake is in progress.
    pub(crate) admission: Arc<Admission>,
    /// Authenticated connections open at most (`stream.max_connections`).
    pub(crate) connections: Arc<Semaphore>,
    /// Strangers' failures, shedding and refusals, one line per interval.
    pub(crate) tally: Tally,
    /// A TCP tunnel idle this long is closed; `None` = never.
    pub(crate) idle_timeout: Option<Duration>,
    /// Tunnel timeouts.
    pub(crate) timeouts: Timeouts,
    /// Which tunnel destinations may be dialed.
    pub(crate) policy: Arc<Policy>,
    /// Counters.
    pub(crate) stats: Arc<Stats>,
}

/// Accepts until `shutdown` fires. Each connection runs in its own task on `tasks`; a tunnel
/// keeps relaying after `shutdown` until `hard_stop`.
pub(crate) async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    let mut last_accept_warning = None;
    let mut report_tick = interval_at(
        Instant::now() + report::REPORT_INTERVAL,
        report::REPORT_INTERVAL,
    );
    report_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            _ = report_tick.tick() => {
                shared.tally.report();
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => {
                backoff = ACCEPT_BACKOFF_FIRST;
                conn
            }
            Err(err) => {
                // At most one line a second however accepts and failures alternate.
                if last_accept_warning
                    .is_none_or(|at: Instant| at.elapsed() >= Duration::from_secs(1))
                {
                    warn!(%err, retry_in = ?backoff, "accept failed");
                    last_accept_warning = Some(Instant::now());
                }
                if shutdown.run_until_cancelled(sleep(backoff)).await.is_none() {
                    break;
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        // Closed at once (dropped) when its source has its share of handshakes open.
        let Ok(ticket) = shared.admission.admit(peer.ip()) else {
            shared.tally.source_full(peer.ip());
            continue;
        };
        if let Some(displaced) = ticket.displaced {
            shared.tally.shed(displaced.ip());
        }
        let span = info_span!("tcp", %peer, alpn = field::Empty, subject = field::Empty);
        tasks.spawn(
            serve_connection(
                tcp,
                shared.clone(),
                ticket,
                shutdown.clone(),
                hard_stop.clone(),
            )
            .instrument(span),
        );
    }
    shared.tally.report();
}

async fn serve_connection(
    tcp: TcpStream,
    shared: Arc<Shared>,
    ticket: Ticket,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    tune(&tcp);
    let peer = tcp.peer_addr().map(|a| a.ip()).ok();
    let credentials = shared.credentials.current();
    let handshake = tokio::select! {
        // A handshake that completed wins over a shed or a shutdown in the same poll.
        biased;
        r = timeout(ticket.deadline, handshake(tcp, &credentials)) => r,
        // Made room for a newer stranger: counted when it was shed.
        () = ticket.shed.cancelled() => return,
        // Not a tunnel yet: no grace period.
        () = shutdown.cancelled() => return,
    };
    let deadline = ticket.deadline;
    drop(ticket);
    // A failed handshake is a stranger's: counted into the aggregate line (by reason and
    // source), and only at debug level one by one.
    let failure = match handshake {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(err)) => {
            debug!("TLS handshake failed: {err}");
            Err(Failure::of_tls(&err))
        }
        Err(_) => {
            debug!(timeout = ?deadline, "TLS handshake timed out");
            Err(Failure::Timeout)
        }
    };
    let tls = match failure {
        Ok(tls) => tls,
        Err(reason) => {
            Stats::bump(&shared.stats.tls_handshake_failures);
            shared
                .stats
                .prom
                .handshake_failed(Transport::Tcp, reason.name());
            if let Some(ip) = peer {
                shared.tally.failed(ip, reason);
            }
            return;
        }
    };
    Stats::bump(&shared.stats.tls_handshakes);
    let Ok(_permit) = shared.connections.clone().try_acquire_owned() else {
        // Authenticated clients, but a loop of them must not flood the log: the first refusal
        // and then one per 1000, with the running count.
        let refused = shared
            .stats
            .tcp_refused_connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if refused % 1000 == 1 {
            warn!(
                refused,
                "authenticated connection closed: stream.max_connections are open"
            );
        }
        return;
    };
    let (_, conn) = tls.get_ref();
    let alpn = Alpn::parse(conn.alpn_protocol());
    let subject = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map_or_else(|| "<none>".to_owned(), crate::tls::subject);
    let span = tracing::Span::current();
    span.record("alpn", alpn.as_str());
    span.record("subject", subject.as_str());
    // Expiry, allow-list and CRL, after every handshake: a resumed session was verified only
    // when its ticket was issued.
    if let Err(reason) = credentials
        .clients
        .check(conn.peer_certificates(), std::time::SystemTime::now())
    {
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        warn!(resumed, "client refused: {reason}");
        let mut tls = tls;
        let _ = timeout(CLOSE_TIMEOUT, tls.shutdown()).await;
        return;
    }
    drop(credentials);

    match alpn {
        Alpn::Stream => {
            let mut tls = tls;
            let cx = tunnel::Context {
                timeouts: shared.timeouts,
                policy: &shared.policy,
                stats: &shared.stats,
                shutdown: &shutdown,
                stop: &hard_stop,
            };
            let report = tunnel::serve(
                &mut TcpLink::new(&mut tls, &shared.stats, shared.idle_timeout),
                &cx,
            )
            .await;
            // close_notify (a relay has sent it already; this is then a no-op), bounded.
            let _ = timeout(CLOSE_TIMEOUT, tls.shutdown()).await;
            tunnel::log_closed(&report);
        }
        Alpn::Http => {
            let http = http::serve(
                tls,
                shared.http.clone(),
                subject.into(),
                &shutdown,
                &hard_stop,
            );
            if let Err(err) = http.await {
                debug!("HTTP connection ended: {err:#}");
            }
        }
    }
}

/// The TLS handshake, with the configuration picked from the ClientHello: a client offering
/// only unknown ALPN ids completes without ALPN (and gets the HTTP API) instead of an alert.
async fn handshake(
    tcp: TcpStream,
    credentials: &Credentials,
) -> std::io::Result<TlsStream<TcpStream>> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    let knows_ours = match start.client_hello().alpn() {
        None => true,
        Some(mut offered) => offered.any(|id| Alpn::SERVER_OFFER.contains(&id)),
    };
    let config = if knows_ours {
        credentials.tls.clone()
    } else {
        credentials.tls_no_alpn.clone()
    };
    start.into_stream(config).await
}
