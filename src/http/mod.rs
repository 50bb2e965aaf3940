//! The HTTP side of the TLS port (connections without the stream ALPN): connection handling
//! and routing by path; each endpoint family lives in its own file.

mod info;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

pub(crate) use self::info::AgentInfo;

/// Every response body: small replies and streamed ones alike.
type Body = BoxBody<Bytes, hyper::Error>;
/// A response of any endpoint.
type Response = hyper::Response<Body>;

/// Where GoDoxy's agent endpoints live; everything else on the port is not ours.
const PREFIX: &str = "/godoxy/agent/";

/// What every HTTP connection needs.
pub(crate) struct HttpShared {
    /// `/info` and the legacy endpoints.
    pub(crate) info: AgentInfo,
    /// Time a client has to send a request's headers.
    pub(crate) header_timeout: Duration,
}

/// Serves HTTP/1.1 on one connection until the client closes it or `shutdown` fires (then
/// the request in progress finishes and the connection closes).
pub(crate) async fn serve<S>(
    io: S,
    shared: Arc<HttpShared>,
    shutdown: CancellationToken,
) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = shared.header_timeout;
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(&req, &shared)) }
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

fn route(req: &Request<Incoming>, shared: &HttpShared) -> Response {
    let endpoint = req.uri().path().strip_prefix(PREFIX);
    endpoint
        .and_then(|endpoint| shared.info.handle(req.method(), endpoint))
        .unwrap_or_else(not_found)
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
