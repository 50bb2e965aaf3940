//! The HTTP API served on TLS connections without the stream ALPN.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// What `/godoxy/agent/*` reports, rendered once at start.
pub struct AgentInfo {
    version: Bytes,
    name: Bytes,
    runtime: Bytes,
    json: Bytes,
}

impl AgentInfo {
    /// From the effective configuration; version is the crate version.
    pub fn new(config: &Config) -> Self {
        let version = env!("CARGO_PKG_VERSION");
        let json = serde_json::json!({
            "version": version,
            "name": config.name,
            "runtime": config.runtime.as_str(),
        });
        Self {
            version: Bytes::from_static(version.as_bytes()),
            name: Bytes::from(config.name.clone()),
            runtime: Bytes::from_static(config.runtime.as_str().as_bytes()),
            json: Bytes::from(json.to_string()),
        }
    }
}

/// Serves HTTP/1.1 on one connection until the client closes it or `shutdown` fires (then
/// the request in progress finishes and the connection closes).
pub async fn serve<S>(
    io: S,
    info: Arc<AgentInfo>,
    header_timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let info = info.clone();
        async move { Ok::<_, Infallible>(route(&req, &info)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

fn route(req: &Request<Incoming>, info: &AgentInfo) -> Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET {
        return not_found();
    }
    match req.uri().path() {
        "/godoxy/agent/info" => reply(StatusCode::OK, JSON, info.json.clone()),
        "/godoxy/agent/version" => reply(StatusCode::OK, TEXT, info.version.clone()),
        "/godoxy/agent/name" => reply(StatusCode::OK, TEXT, info.name.clone()),
        "/godoxy/agent/runtime" => reply(StatusCode::OK, TEXT, info.runtime.clone()),
        _ => not_found(),
    }
}

fn not_found() -> Response<Full<Bytes>> {
    reply(
        StatusCode::NOT_FOUND,
        "application/json",
        Bytes::from_static(br#"{"error":"not found"}"#),
    )
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
