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
use tracing::{Instrument as _, debug, field, info, info_span, warn};

use crate::alpn::Alpn;
use crate::http_api::{self, AgentInfo};
use crate::stats::Stats;
use crate::tunnel::{self, Timeouts};

/// How long sending close_notify may take at the end of a connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// What every connection task needs.
pub struct Shared {
    /// TLS with client authentication and the ALPN offer.
    pub tls: Arc<rustls::ServerConfig>,
    /// The same without ALPN: for clients that offer only protocols we do not speak, which
    /// PROTOCOL.md routes to the HTTP API rather than refusing.
    pub tls_no_alpn: Arc<rustls::ServerConfig>,
    /// For the HTTP API.
    pub info: Arc<AgentInfo>,
    /// Time a client has to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Tunnel timeouts.
    pub timeouts: Timeouts,
    /// Counters.
    pub stats: Arc<Stats>,
}

/// Accepts until `shutdown` fires. Each connection runs in its own task on `tasks`; a tunnel
/// keeps relaying after `shutdown` until `hard_stop`.
pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
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
            Ok(conn) => conn,
            Err(err) => {
                warn!(%err, "accept failed; retrying");
                sleep(ACCEPT_RETRY_DELAY).await;
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
    tunnel::tune(&tcp);
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
            warn!("TLS handshake failed: {err}");
            return;
        }
        Err(_) => {
            Stats::bump(&shared.stats.tls_handshake_failures);
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
            let report = tunnel::serve(
                &mut tls,
                shared.timeouts,
                &shared.stats,
                &shutdown,
                &hard_stop,
            )
            .await;
            // close_notify (a relay has sent it already; this is then a no-op), bounded.
            let _ = timeout(CLOSE_TIMEOUT, tls.shutdown()).await;
            let destination = report
                .destination
                .as_ref()
                .map_or_else(|| "-".to_owned(), ToString::to_string);
            let duration_ms = report.duration.as_millis() as u64;
            macro_rules! log_end {
                ($level:ident) => {
                    $level!(
                        destination,
                        up = report.up,
                        down = report.down,
                        duration_ms,
                        reason = %report.end,
                        "tunnel closed"
                    )
                };
            }
            // Refusals and failures are worth an operator's look; normal ends are not.
            if report.end.is_clean() || matches!(report.end, tunnel::End::Shutdown) {
                log_end!(info);
            } else {
                log_end!(warn);
            }
        }
        Alpn::Http => {
            if let Err(err) =
                http_api::serve(tls, shared.info.clone(), shared.timeouts.header, shutdown).await
            {
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
