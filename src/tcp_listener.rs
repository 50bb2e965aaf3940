//! The TLS port: accept loop, per-connection handshake under a timeout, routing by ALPN.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, timeout};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, field, info_span, warn};

use crate::alpn::Alpn;
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
    /// TLS with client authentication and the ALPN offer.
    pub(crate) tls: Arc<rustls::ServerConfig>,
    /// The same without ALPN: for clients that offer only protocols we do not speak, which
    /// PROTOCOL.md routes to the HTTP API rather than refusing.
    pub(crate) tls_no_alpn: Arc<rustls::ServerConfig>,
    /// For the HTTP API.
    pub(crate) http: Arc<HttpShared>,
    /// Time a client has to complete the TLS handshake.
    pub(crate) handshake_timeout: Duration,
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
    limit: Arc<Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        // Take the permit before accepting, so at the cap the kernel backlog pushes back.
        let Some(permit) = shutdown
            .run_until_cancelled(limit.clone().acquire_owned())
            .await
        else {
            break;
        };
        let Ok(permit) = permit else { break };
        let Some(accepted) = shutdown.run_until_cancelled(listener.accept()).await else {
            break;
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => {
                backoff = ACCEPT_BACKOFF_FIRST;
                conn
            }
            Err(err) => {
                warn!(%err, retry_in = ?backoff, "accept failed");
                if shutdown.run_until_cancelled(sleep(backoff)).await.is_none() {
                    break;
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let span = info_span!("tcp", %peer, alpn = field::Empty, subject = field::Empty);
        tasks.spawn(
            serve_connection(
                tcp,
                shared.clone(),
                shutdown.clone(),
                hard_stop.clone(),
                permit,
            )
            .instrument(span),
        );
    }
}

async fn serve_connection(
    tcp: TcpStream,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    tune(&tcp);
    let handshake = tokio::select! {
        r = timeout(shared.handshake_timeout, handshake(tcp, &shared)) => r,
        // Not a tunnel yet: no grace period.
        () = shutdown.cancelled() => return,
    };
    let tls = match handshake {
        Ok(Ok(tls)) => {
            Stats::bump(&shared.stats.tls_handshakes);
            tls
        }
        Ok(Err(err)) => {
            Stats::bump(&shared.stats.tls_handshake_failures);
            let reason = failure_reason(&err);
            shared.stats.prom.handshake_failed(Transport::Tcp, reason);
            warn!(reason, "TLS handshake failed: {err}");
            return;
        }
        Err(_) => {
            Stats::bump(&shared.stats.tls_handshake_failures);
            shared
                .stats
                .prom
                .handshake_failed(Transport::Tcp, "timeout");
            warn!(timeout = ?shared.handshake_timeout, "TLS handshake timed out");
            return;
        }
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
            let report = tunnel::serve(&mut TcpLink::new(&mut tls, &shared.stats), &cx).await;
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
async fn handshake(tcp: TcpStream, shared: &Shared) -> std::io::Result<TlsStream<TcpStream>> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    let knows_ours = match start.client_hello().alpn() {
        None => true,
        Some(mut offered) => offered.any(|id| Alpn::SERVER_OFFER.contains(&id)),
    };
    let config = if knows_ours {
        shared.tls.clone()
    } else {
        shared.tls_no_alpn.clone()
    };
    start.into_stream(config).await
}

/// The `reason` label of a failed TLS handshake: the names the DTLS side counts by
/// (`dtls::report`), plus `io` for a connection that broke before TLS could say anything.
fn failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<E>()) else {
        return "io";
    };
    match tls {
        E::NoCertificatesPresented => "no_client_cert",
        E::InvalidCertificate(_) => "bad_client_cert",
        E::AlertReceived(_) => "peer_alert",
        E::PeerIncompatible(_) | E::NoApplicationProtocol => "no_common_parameters",
        _ => "other",
    }
}
