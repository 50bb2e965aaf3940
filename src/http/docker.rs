//! The Docker Engine API: every request outside `/godoxy/agent/` goes to the engine's unix
//! socket, filtered by `docker.access`. Method, path and query pass byte for byte, bodies
//! stream both ways frame by frame, upgrades (attach, exec) are spliced, and a missing or
//! silent engine answers at once with a Docker-style `{"message":...}` error.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use hyper::body::{Bytes, Incoming};
use hyper::header;
use hyper::{Method, Request, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixStream;
use tracing::{debug, warn};

use super::relay::{error_chain, splice, strip_hop_by_hop, wants_upgrade};
use super::{Response, reply};
use crate::config::{DockerAccess, DockerConfig};

/// Idle pooled connections to the engine are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle pooled connections kept at most.
const POOL_MAX_IDLE: usize = 32;
/// A refusal is logged at most this often; the line counts the ones left out.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// The relay to one engine socket.
pub(crate) struct Docker {
    client: Client<UnixConnector, Incoming>,
    access: DockerAccess,
    response_timeout: Duration,
    socket: Arc<PathBuf>,
    refusals: Throttle,
}

impl Docker {
    pub(crate) fn new(config: &DockerConfig) -> Self {
        let socket = Arc::new(config.socket.clone());
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .build(UnixConnector(socket.clone()));
        Self {
            client,
            access: config.access,
            response_timeout: config.response_timeout,
            socket,
            refusals: Throttle::default(),
        }
    }

    /// Relays one request, or refuses it.
    pub(crate) async fn handle(&self, mut req: Request<Incoming>, subject: &str) -> Response {
        if !allows(self.access, req.method(), req.uri().path()) {
            if let Some(suppressed) = self.refusals.admit() {
                warn!(
                    subject,
                    method = %req.method(),
                    path = req.uri().path(),
                    access = self.access.as_str(),
                    suppressed,
                    "Docker API call refused by docker.access"
                );
            }
            return docker_error(
                StatusCode::FORBIDDEN,
                &format!(
                    "{} {} is not allowed by this agent's docker.access = \"{}\"",
                    req.method(),
                    req.uri().path(),
                    self.access.as_str()
                ),
            );
        }
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        // The pool is keyed by scheme and authority; the engine ignores both.
        let uri = match Uri::builder()
            .scheme("http")
            .authority("docker")
            .path_and_query(path_and_query)
            .build()
        {
            Ok(uri) => uri,
            Err(err) => return docker_error(StatusCode::BAD_REQUEST, &format!("bad path: {err}")),
        };
        let upgrade = wants_upgrade(req.headers());
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        strip_hop_by_hop(req.headers_mut(), upgrade);
        *req.uri_mut() = uri;

        let started = Instant::now();
        let response = match tokio::time::timeout(self.response_timeout, self.client.request(req))
            .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                warn!(socket = %self.socket.display(), "Docker engine unreachable: {err:#}");
                return docker_error(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "the Docker engine at {} is unreachable: {}",
                        self.socket.display(),
                        error_chain(&err)
                    ),
                );
            }
            Err(_) => {
                warn!(socket = %self.socket.display(), timeout = ?self.response_timeout, "Docker engine did not answer");
                return docker_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "the Docker engine at {} did not answer within {:?}",
                        self.socket.display(),
                        self.response_timeout
                    ),
                );
            }
        };
        let (mut parts, body) = response.into_parts();
        // Our hop is HTTP/1.1, whatever the origin spoke (HTTP/1.0, h2c).
        parts.version = Version::HTTP_11;
        debug!(status = parts.status.as_u16(), elapsed = ?started.elapsed(), "docker answered");
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            let mut engine_response = hyper::Response::from_parts(parts.clone(), body);
            let engine_side = hyper::upgrade::on(&mut engine_response);
            match client_side {
                Some(client_side) => {
                    tokio::spawn(splice("docker", client_side, engine_side));
                }
                None => {
                    return docker_error(
                        StatusCode::BAD_GATEWAY,
                        "the Docker engine switched protocols on a request that asked for none",
                    );
                }
            }
            strip_hop_by_hop(&mut parts.headers, true);
            return hyper::Response::from_parts(parts, super::empty());
        }
        strip_hop_by_hop(&mut parts.headers, false);
        hyper::Response::from_parts(parts, body.boxed())
    }
}

/// Whether `access` lets `method path` through. `path` is the raw request path: nothing is
/// decoded or cleaned, so `..`, `%2e` and `//` tricks match no rule.
pub(crate) fn allows(access: DockerAccess, method: &Method, path: &str) -> bool {
    let read = *method == Method::GET || *method == Method::HEAD;
    match access {
        DockerAccess::Off => false,
        DockerAccess::Full => true,
        DockerAccess::ReadOnly => read,
        DockerAccess::Godoxy => godoxy_allows(read, method, strip_version(path)),
    }
}

/// The calls a GoDoxy server makes through an agent (and the docker CLI's `version`).
fn godoxy_allows(read: bool, method: &Method, path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    if read {
        match segments.as_slice() {
            ["_ping" | "version" | "info" | "events"] | ["containers", "json"] => true,
            ["containers", id, "json" | "logs" | "stats"] => is_name(id),
            _ => false,
        }
    } else if *method == Method::POST {
        match segments.as_slice() {
            [
                "containers",
                id,
                "start" | "stop" | "restart" | "pause" | "unpause" | "kill",
            ] => is_name(id),
            _ => false,
        }
    } else {
        false
    }
}

/// `/v1.41/containers/json` -> `/containers/json`; other paths unchanged.
fn strip_version(path: &str) -> &str {
    let Some(rest) = path.strip_prefix("/v") else {
        return path;
    };
    let end = rest.find('/').unwrap_or(rest.len());
    let version = &rest[..end];
    match version.split_once('.') {
        Some((major, minor))
            if !major.is_empty()
                && !minor.is_empty()
                && major.bytes().all(|b| b.is_ascii_digit())
                && minor.bytes().all(|b| b.is_ascii_digit()) =>
        {
            &rest[end..]
        }
        _ => path,
    }
}

/// A container id or name as the engines accept them: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
fn is_name(segment: &str) -> bool {
    let mut bytes = segment.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A Docker-style error: `{"message": "..."}`.
pub(super) fn docker_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "message": message }).to_string();
    reply(status, "application/json", Bytes::from(body))
}

/// Connects the pooled client to the engine's socket, whatever the URI says.
#[derive(Clone)]
struct UnixConnector(Arc<PathBuf>);

impl tower_service::Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let socket = self.0.clone();
        Box::pin(async move {
            UnixStream::connect(&*socket)
                .await
                .map(TokioIo::new)
                .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", socket.display())))
        })
    }
}

/// Lets one event through per interval and counts the ones held back.
#[derive(Default)]
struct Throttle {
    /// Milliseconds since `START` of the next admitted event.
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    /// `Some(held back since the last one)` when this event may be logged.
    fn admit(&self) -> Option<u64> {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let start = START.get_or_init(Instant::now);
        let now = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next.load(Ordering::Relaxed);
        let every = u64::try_from(REFUSAL_LOG_EVERY.as_millis()).unwrap_or(1000);
        if now >= next
            && self
                .next
                .compare_exchange(next, now + every, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Whether the engine answers, and as what: for the start-up log and `check-config`.
pub(crate) async fn probe(socket: &Path, within: Duration) -> Result<String, String> {
    let work = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("{}: {e}", socket.display()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = Request::get("/version")
            .header(header::HOST, "docker")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("GET /version answered {status}"));
        }
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_owned();
        let name = v
            .get("Components")
            .and_then(|c| c.get(0))
            .and_then(|c| c.get("Name"))
            .and_then(|n| n.as_str())
            .unwrap_or("engine")
            .to_owned();
        Ok(format!(
            "{name} {} (API {}, minimum {})",
            field("Version"),
            field("ApiVersion"),
            field("MinAPIVersion")
        ))
    };
    tokio::time::timeout(within, work)
        .await
        .map_err(|_| format!("{}: no answer within {within:?}", socket.display()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn godoxy(method: Method, path: &str) -> bool {
        allows(DockerAccess::Godoxy, &method, path)
    }

    #[test]
    fn godoxy_table_with_and_without_version() {
        for prefix in ["", "/v1.41", "/v1.47"] {
            for path in [
                "/_ping",
                "/version",
                "/info",
                "/events",
                "/containers/json",
                "/containers/abc123/json",
                "/containers/my_app.1-x/logs",
                "/containers/abc/stats",
            ] {
                assert!(
                    godoxy(Method::GET, &format!("{prefix}{path}")),
                    "{prefix}{path}"
                );
            }
            assert!(godoxy(Method::HEAD, &format!("{prefix}/_ping")));
            for action in ["start", "stop", "restart", "pause", "unpause", "kill"] {
                assert!(godoxy(
                    Method::POST,
                    &format!("{prefix}/containers/abc/{action}")
                ));
            }
        }
    }

    #[test]
    fn godoxy_refuses_the_rest() {
        for (method, path) in [
            (Method::POST, "/containers/create"),
            (Method::POST, "/containers/abc/exec"),
            (Method::POST, "/exec/abc/start"),
            (Method::GET, "/images/json"),
            (Method::POST, "/images/create"),
            (Method::DELETE, "/containers/abc"),
            (Method::GET, "/containers/abc/archive"),
            (Method::GET, "/containers/x/../../images/json"),
            (Method::POST, "/containers/../start"),
            (Method::POST, "/containers/%2e%2e/start"),
            (Method::GET, "//containers/json"),
            (Method::GET, "/containers/json/"),
            (Method::GET, "/v1.41"),
            (Method::GET, "/v1.x/containers/json"),
            (Method::POST, "/containers/json"),
            (Method::GET, "containers/json"),
        ] {
            assert!(!godoxy(method.clone(), path), "{method} {path}");
        }
    }

    #[test]
    fn read_only_full_off() {
        assert!(allows(DockerAccess::ReadOnly, &Method::GET, "/images/json"));
        assert!(!allows(
            DockerAccess::ReadOnly,
            &Method::POST,
            "/containers/x/start"
        ));
        assert!(allows(
            DockerAccess::Full,
            &Method::POST,
            "/containers/create"
        ));
        assert!(!allows(DockerAccess::Off, &Method::GET, "/_ping"));
    }

    #[test]
    fn throttle_admits_one_per_interval() {
        let t = Throttle::default();
        assert_eq!(t.admit(), Some(0));
        assert_eq!(t.admit(), None);
        assert_eq!(t.admit(), None);
        assert_eq!(t.suppressed.load(Ordering::Relaxed), 2);
    }
}
