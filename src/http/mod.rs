//! The HTTP side of the TLS port (connections without the stream ALPN): connection handling
//! and routing by path. Each endpoint family lives in its own file; everything outside
//! `/godoxy/agent/` is the Docker Engine API.

mod conn;
mod docker;
mod health;
mod info;
mod proxy;
mod relay;
mod system_info;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use self::conn::{ConnClock, Tracked, Verdict, Watched};
pub(crate) use self::docker::{Docker, probe as probe_docker};
pub(crate) use self::health::Health;
pub(crate) use self::info::AgentInfo;
pub(crate) use self::proxy::Proxy;
use crate::metrics::Metrics;
use crate::prometheus::{Exporter, Route};
use crate::stats::Stats;

/// The request parsers the fuzz targets reach (`godoxy_agent::fuzzing`, feature `fuzzing`).
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing {
    pub(crate) use super::docker::allows as docker_allows;

    /// `/proxy/http`'s target from the request headers: its Debug form, or the 400 body.
    pub(crate) fn proxy_target(headers: &hyper::HeaderMap) -> Result<String, String> {
        super::proxy::Target::from_headers(headers).map(|target| format!("{target:?}"))
    }

    /// `/health`'s query, parsed, and the timeout it asks for.
    pub(crate) fn health_timeout(query: &str) -> std::time::Duration {
        super::health::Query::parse(query).timeout()
    }
}

/// Every response body: small replies and streamed ones alike.
type Body = BoxBody<Bytes, hyper::Error>;
/// A response of any endpoint.
type Response = hyper::Response<Body>;

/// Where GoDoxy's agent endpoints live.
const PREFIX: &str = "/godoxy/agent/";

/// What every HTTP connection needs.
pub(crate) struct HttpShared {
    /// `/info` and the legacy endpoints.
    pub(crate) info: AgentInfo,
    /// The Docker Engine API relay.
    pub(crate) docker: Docker,
    /// HTTP routes.
    pub(crate) proxy: Proxy,
    /// Health checks of the routes.
    pub(crate) health: Health,
    /// `/system_info`: host metrics.
    pub(crate) metrics: Metrics,
    /// Counters (requests by route and status).
    pub(crate) stats: Arc<Stats>,
    /// `/metrics` for scrapers with a client certificate, when `prometheus.mtls` is on.
    pub(crate) prometheus: Option<Arc<Exporter>>,
    /// Time a client has to send a request's headers once it started one.
    pub(crate) header_timeout: Duration,
    /// An idle keep-alive connection is closed after this long.
    pub(crate) idle_timeout: Duration,
}

/// Serves HTTP/1.1 on one connection until the client closes it, it idles out, or `shutdown`
/// fires (then the requests in progress, event streams included, may finish until `stop`).
pub(crate) async fn serve<S>(
    io: S,
    shared: Arc<HttpShared>,
    subject: Arc<str>,
    shutdown: &CancellationToken,
    stop: &CancellationToken,
) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let clock = ConnClock::new();
    let (header_timeout, idle_timeout) = (shared.header_timeout, shared.idle_timeout);
    let service = {
        let clock = clock.clone();
        hyper::service::service_fn(move |req| {
            let in_flight = clock.start_request();
            let (shared, subject) = (shared.clone(), subject.clone());
            async move {
                let response = route(req, &shared, &subject).await;
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, in_flight)))
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(Watched::new(io, clock.clone())), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let wake = match clock.verdict(header_timeout, idle_timeout) {
            Verdict::WaitUntil(at) => at,
            Verdict::Idle => {
                debug!(idle = ?idle_timeout, "closing an idle HTTP connection");
                conn.as_mut().graceful_shutdown();
                return conn.await;
            }
            Verdict::HeaderTimeout => {
                debug!(timeout = ?header_timeout, "request headers too slow; closing");
                return Ok(());
            }
        };
        tokio::select! {
            r = conn.as_mut() => return r,
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = stop.cancelled() => return Ok(()),
            () = sleep_until(wake) => {}
        }
    }
}

async fn route(req: Request<Incoming>, shared: &HttpShared, subject: &str) -> Response {
    Stats::bump(&shared.stats.http_requests);
    let path = req.uri().path();
    let started = Instant::now();
    if path
        .strip_prefix(proxy::PREFIX)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    {
        let response = shared.proxy.handle(req).await;
        let prom = &shared.stats.prom;
        prom.http_answered(Route::Proxy, response.status(), started.elapsed());
        return response;
    }
    match path.strip_prefix(PREFIX) {
        Some("health") => shared.health.handle(req.method(), req.uri().query()).await,
        Some("system_info") => system_info::handle(req, &shared.metrics),
        Some(endpoint) => shared.info.handle(endpoint).unwrap_or_else(not_found),
        None => match &shared.prometheus {
            Some(exporter) if path == "/metrics" => crate::prometheus::boxed_response(exporter),
            _ => {
                let response = shared.docker.handle(req, subject).await;
                let prom = &shared.stats.prom;
                prom.http_answered(Route::Docker, response.status(), started.elapsed());
                response
            }
        },
    }
}

fn not_found() -> Response {
    reply(
        StatusCode::NOT_FOUND,
        "application/json",
        Bytes::from_static(br#"{"error":"not found"}"#),
    )
}

/// A complete small response.
fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response {
    let body = Full::new(body).map_err(|never| match never {}).boxed();
    let mut response = hyper::Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// An empty body.
fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}
