//! `GET /godoxy/agent/health`: GoDoxy's health checks of the routes on this agent, run from
//! here. Query: `scheme`, `host` (`host:port`), `port`, `path`, `timeout` (milliseconds; empty
//! or 0 = 5 s). Answer: `{"healthy","detail","latency"}` with the latency in nanoseconds.
//! A target the destination policy refuses is not checked: 403 with a line of text, as a
//! refused `/proxy/http` request (GoDoxy shows it as the check's failure).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri, Version, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::net::{TcpStream, UdpSocket};
use tracing::{debug, warn};

use super::relay::error_chain;
use super::{Response, reply};
use crate::policy::{Denial, Policy, PolicyConnector, Refused, denial_in, host_of};

/// When the query gives no timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What GoDoxy reads back.
#[derive(Debug, Serialize)]
struct Outcome {
    healthy: bool,
    detail: String,
    /// Nanoseconds.
    latency: u64,
}

impl Outcome {
    fn healthy(latency: Duration) -> Self {
        Self {
            healthy: true,
            detail: String::new(),
            latency: nanos(latency),
        }
    }

    fn unhealthy(latency: Duration, detail: String) -> Self {
        Self {
            healthy: false,
            detail,
            latency: nanos(latency),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A check that could not be made at all: GoDoxy shows 502 as "unhealthy: HTTP 502 ...".
struct CheckFailed(String);

/// The parsed query.
#[derive(Default)]
pub(super) struct Query {
    scheme: String,
    host: String,
    port: String,
    path: String,
    timeout: String,
}

impl Query {
    pub(super) fn parse(query: &str) -> Self {
        let mut parsed = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "scheme" => &mut parsed.scheme,
                "host" => &mut parsed.host,
                "port" => &mut parsed.port,
                "path" => &mut parsed.path,
                "timeout" => &mut parsed.timeout,
                _ => continue,
            };
            // url.Values.Get: the first value counts.
            if slot.is_empty() {
                *slot = value.into_owned();
            }
        }
        parsed
    }

    pub(super) fn timeout(&self) -> Duration {
        match self.timeout.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => DEFAULT_TIMEOUT,
        }
    }
}

/// The health checks, with their clients: every dial goes through the destination policy.
pub(crate) struct Health {
    policy: Arc<Policy>,
    /// http and https; an error (TLS set-up) is each check's answer.
    http: Result<HttpClient, String>,
    h2c: H2cClient,
}

impl Health {
    pub(crate) fn new(policy: Arc<Policy>) -> Self {
        Self {
            http: http_client(&policy),
            h2c: h2c_client(&policy),
            policy,
        }
    }

    /// Answers one health request.
    pub(super) async fn handle(&self, method: &Method, query: Option<&str>) -> Response {
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET".to_owned());
        }
        let query = Query::parse(query.unwrap_or(""));
        answer(self, &query).await
    }
}

/// Runs the check a query asks for, or says why not.
async fn answer(health: &Health, query: &Query) -> Response {
    let started = Instant::now();
    let result = match check(health, query).await {
        Ok(outcome) => outcome,
        Err(NoCheck::BadRequest(reason)) => return text(StatusCode::BAD_REQUEST, reason),
        Err(NoCheck::Denied(denial)) => {
            // The client's subject is on the connection's span.
            warn!(scheme = %query.scheme, host = %query.host, "health check denied by policy: {denial}");
            return text(
                StatusCode::FORBIDDEN,
                format!("403 Forbidden: destination denied by the agent's policy: {denial}"),
            );
        }
    };
    match result {
        Ok(outcome) => {
            if outcome.healthy {
                debug!(scheme = %query.scheme, host = %query.host, path = %query.path, elapsed = ?started.elapsed(), "health check: healthy");
            } else {
                warn!(scheme = %query.scheme, host = %query.host, path = %query.path, detail = %outcome.detail, elapsed = ?started.elapsed(), "health check: unhealthy");
            }
            let body = serde_json::to_vec(&outcome).unwrap_or_default();
            reply(StatusCode::OK, "application/json", Bytes::from(body))
        }
        Err(CheckFailed(reason)) => {
            warn!(scheme = %query.scheme, host = %query.host, elapsed = ?started.elapsed(), "health check failed: {reason}");
            text(StatusCode::BAD_GATEWAY, reason)
        }
    }
}

/// Why no check was made.
enum NoCheck {
    /// A query GoDoxy would never send: 400.
    BadRequest(String),
    /// The policy refuses the target: 403.
    Denied(Denial),
}

async fn check(health: &Health, query: &Query) -> Result<Result<Outcome, CheckFailed>, NoCheck> {
    let timeout = query.timeout();
    match query.scheme.as_str() {
        "" => Err(NoCheck::BadRequest("missing scheme".to_owned())),
        "fileserver" => {
            if query.path.is_empty() {
                return Err(NoCheck::BadRequest("missing path".to_owned()));
            }
            Ok(file_exists(query.path.clone()).await)
        }
        scheme @ ("http" | "https" | "h2c") => {
            if query.host.is_empty() {
                return Err(NoCheck::BadRequest("missing host".to_owned()));
            }
            let uri = format!(
                "{}://{}/{}",
                if scheme == "https" { "https" } else { "http" },
                query.host,
                query.path.trim_start_matches('/')
            );
            let uri: Uri = uri
                .parse()
                .map_err(|e| NoCheck::BadRequest(format!("bad host or path: {e}")))?;
            head(health, uri, scheme == "h2c", timeout)
                .await
                .map(Ok)
                .map_err(NoCheck::Denied)
        }
        scheme @ ("tcp" | "tcp4" | "tcp6" | "udp" | "udp4" | "udp6") => {
            if query.host.is_empty() {
                return Err(NoCheck::BadRequest("missing host".to_owned()));
            }
            let has_port = query.host.contains(':');
            let host = match (query.port.is_empty(), has_port) {
                (false, true) => {
                    return Err(NoCheck::BadRequest(
                        "port and host with port cannot both be provided".to_owned(),
                    ));
                }
                (false, false) => format!("{}:{}", query.host, query.port),
                (true, _) => query.host.clone(),
            };
            connect(&health.policy, scheme, &host, timeout).await
        }
        other => Err(NoCheck::BadRequest(format!(
            "unknown scheme {other:?}: expected http, https, h2c, tcp, tcp4, tcp6, udp, udp4, \
             udp6 or fileserver"
        ))),
    }
}

/// `HEAD` with certificates unverified: a 5xx is unhealthy, any other status healthy, no answer
/// unhealthy with the reason; a target the policy refuses is the denial.
async fn head(health: &Health, uri: Uri, h2c: bool, timeout: Duration) -> Result<Outcome, Denial> {
    let mut request = Request::head(uri)
        .header(
            header::USER_AGENT,
            concat!("godoxy-agent/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::ACCEPT, "text/plain,text/html,*/*;q=0.8")
        .header(header::ACCEPT_ENCODING, "identity")
        .header(header::CACHE_CONTROL, "no-cache")
        .header(header::PRAGMA, "no-cache")
        .body(Empty::<Bytes>::new())
        .unwrap_or_default();
    let started = Instant::now();
    let sent = if h2c {
        *request.version_mut() = Version::HTTP_2;
        tokio::time::timeout(timeout, health.h2c.request(request)).await
    } else {
        let client = match &health.http {
            Ok(client) => client,
            Err(reason) => return Ok(Outcome::unhealthy(Duration::ZERO, reason.clone())),
        };
        tokio::time::timeout(timeout, client.request(request)).await
    };
    let latency = started.elapsed();
    if let Ok(Err(err)) = &sent
        && let Some(denial) = denial_in(err)
    {
        return Err(denial.clone());
    }
    Ok(match sent {
        Err(_) => Outcome::unhealthy(latency, format!("timed out after {timeout:?}")),
        Ok(Err(err)) => Outcome::unhealthy(latency, error_chain(&err)),
        Ok(Ok(response)) if response.status().is_server_error() => Outcome::unhealthy(
            latency,
            response
                .status()
                .canonical_reason()
                .unwrap_or("server error")
                .to_owned(),
        ),
        Ok(Ok(_)) => Outcome::healthy(latency),
    })
}

/// Connects (TCP) or "connects" (UDP: a connected socket, as Go's dial): refused, reset or
/// aborted is an unhealthy target; anything else (no route, time-out) a failed check. The
/// addresses come from the policy (resolved once, each judged), so a denied target is refused
/// before any packet leaves for it.
async fn connect(
    policy: &Policy,
    scheme: &str,
    host: &str,
    timeout: Duration,
) -> Result<Result<Outcome, CheckFailed>, NoCheck> {
    let started = Instant::now();
    let Some((name, port)) = host
        .rsplit_once(':')
        .and_then(|(name, port)| Some((name, port.parse::<u16>().ok().filter(|&p| p != 0)?)))
    else {
        return Ok(Ok(Outcome::unhealthy(
            Duration::ZERO,
            "no port specified".to_owned(),
        )));
    };
    let addrs = match tokio::time::timeout(timeout, policy.resolve(&host_of(name), port)).await {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(Refused::Denied(denial))) => return Err(NoCheck::Denied(denial)),
        Ok(Err(Refused::Resolve(err))) => {
            return Ok(Err(CheckFailed(format!("dial {scheme} {host}: {err}"))));
        }
        Err(_) => {
            return Ok(Err(CheckFailed(format!(
                "dial {scheme} {host}: timed out after {timeout:?}"
            ))));
        }
    };
    let attempt = async {
        let addrs: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| match scheme.chars().last() {
                Some('4') => a.is_ipv4(),
                Some('6') => a.is_ipv6(),
                _ => true,
            })
            .collect();
        let Some(&first) = addrs.first() else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host}: no address of the asked family"),
            ));
        };
        if scheme.starts_with("udp") {
            let local: SocketAddr = if first.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = UdpSocket::bind(local).await?;
            return socket.connect(first).await;
        }
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(_) => return Ok(()),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no address")))
    };
    Ok(match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Ok(Outcome::healthy(started.elapsed())),
        Ok(Err(err))
            if matches!(
                err.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            Ok(Outcome::unhealthy(
                started.elapsed(),
                format!("dial {scheme} {host}: {err}"),
            ))
        }
        Ok(Err(err)) => Err(CheckFailed(format!("dial {scheme} {host}: {err}"))),
        Err(_) => Err(CheckFailed(format!(
            "dial {scheme} {host}: timed out after {timeout:?}"
        ))),
    })
}

/// Whether a path exists on the agent's filesystem.
async fn file_exists(path: String) -> Result<Outcome, CheckFailed> {
    let started = Instant::now();
    let stat = tokio::task::spawn_blocking(move || {
        std::fs::metadata(&path).map(|_| ()).map_err(|e| (path, e))
    })
    .await
    .map_err(|e| CheckFailed(format!("stat: {e}")))?;
    let latency = started.elapsed();
    match stat {
        Ok(()) => Ok(Outcome::healthy(latency)),
        Err((path, err)) if err.kind() == io::ErrorKind::NotFound => Ok(Outcome::unhealthy(
            Duration::ZERO,
            format!("stat {path}: {err}"),
        )),
        Err((path, err)) => Err(CheckFailed(format!("stat {path}: {err}"))),
    }
}

/// For http and https checks: certificates are not verified (GoDoxy's checks do not either).
/// One connection per check, as GoDoxy's checks open their own: nothing is kept idle.
fn http_client(policy: &Arc<Policy>) -> Result<HttpClient, String> {
    let provider = crate::tls::client_provider();
    let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS client: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(super::proxy::NoVerification::new(provider)))
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(PolicyConnector::new(policy.clone()));
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector))
}

type HttpClient = Client<HttpsConnector<PolicyConnector>, Empty<Bytes>>;
type H2cClient = Client<PolicyConnector, Empty<Bytes>>;

fn h2c_client(policy: &Arc<Policy>) -> H2cClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_max_idle_per_host(0)
        .build(PolicyConnector::new(policy.clone()))
}

fn text(status: StatusCode, message: String) -> Response {
    reply(status, "text/plain; charset=utf-8", Bytes::from(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_like_go_url_values() {
        let q = Query::parse(
            "scheme=http&host=app%3A8080&path=%2Fhealth%3Fx%3D1&timeout=1500&scheme=tcp",
        );
        assert_eq!(q.scheme, "http");
        assert_eq!(q.host, "app:8080");
        assert_eq!(q.path, "/health?x=1");
        assert_eq!(q.timeout(), Duration::from_millis(1500));
        assert_eq!(Query::parse("timeout=0").timeout(), DEFAULT_TIMEOUT);
        assert_eq!(Query::parse("timeout=").timeout(), DEFAULT_TIMEOUT);
        assert_eq!(Query::parse("").timeout(), DEFAULT_TIMEOUT);
    }
}
