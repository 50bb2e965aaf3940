//! `/godoxy/agent/system_info`, GoDoxy's dashboard endpoint: the latest sample (204 before
//! the first), or with `period` and `aggregate` a chart `{"data":[...],"total":N}`; either one
//! as a WebSocket stream, a frame per `interval` (at least 1 s), unchanged frames skipped,
//! the text `ping` answered `pong`, and the socket closed after 5 s without a ping.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::debug;

use super::{Response, empty, reply};
use crate::metrics::{Aggregate, Metrics, Period};

/// What gin writes for `c.JSON`.
const JSON: &str = "application/json; charset=utf-8";
/// A WebSocket client must send `ping` this often (GoDoxy's dashboard sends one every 2 s).
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// The shortest time between frames (GoDoxy's poll interval).
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Time to write `pong` (GoDoxy: 2 s) and the close frame.
const CONTROL_WRITE: Duration = Duration::from_secs(2);
/// Clients send only `ping`: anything large is not one of ours.
const MAX_MESSAGE: usize = 64 << 10;

/// What the query asks for.
#[derive(Debug, Clone, Copy)]
enum View {
    Latest,
    Chart(Period, Aggregate),
}

impl View {
    /// GoDoxy's rules: no (or an empty) `period` is the latest sample; otherwise both must be
    /// known values.
    fn parse(period: Option<&str>, aggregate: Option<&str>) -> Result<Self, String> {
        let period = match period {
            None | Some("") => return Ok(Self::Latest),
            Some(text) => Period::parse(text)
                .ok_or_else(|| format!("invalid period `{text}`: one of 5m, 15m, 1h, 1d, 1mo"))?,
        };
        let aggregate = aggregate.unwrap_or("");
        let aggregate = Aggregate::parse(aggregate).ok_or_else(|| {
            let names: Vec<&str> = Aggregate::ALL.iter().map(|a| a.name()).collect();
            format!(
                "invalid aggregate `{aggregate}`: one of {}",
                names.join(", ")
            )
        })?;
        Ok(Self::Chart(period, aggregate))
    }

    /// The current frame; `None` before the first sample.
    fn render(self, metrics: &Metrics) -> Option<Bytes> {
        match self {
            Self::Latest => metrics.latest(),
            Self::Chart(period, aggregate) => Some(metrics.chart(period, aggregate)),
        }
    }
}

/// Answers a request for `/godoxy/agent/system_info`.
pub(super) fn handle(req: Request<Incoming>, metrics: &Metrics) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
            "system_info answers GET and HEAD",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let query = req.uri().query().unwrap_or("");
    let first = |key: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    };
    let view = match View::parse(first("period").as_deref(), first("aggregate").as_deref()) {
        Ok(view) => view,
        // GoDoxy's body: {"message":"bad request","error":"invalid period"}.
        Err(why) => return error(StatusCode::BAD_REQUEST, "bad request", &why),
    };
    if wants_websocket(req.headers()) {
        let every = first("interval")
            .as_deref()
            .and_then(parse_go_duration)
            .map_or(MIN_INTERVAL, |d| d.max(MIN_INTERVAL));
        return upgrade(req, metrics, view, every);
    }
    match view.render(metrics) {
        Some(json) => reply(StatusCode::OK, JSON, json),
        None => {
            let mut response = hyper::Response::new(empty());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
    }
}

/// `{"message":...,"error":...}`, GoDoxy's error body.
fn error(status: StatusCode, message: &str, detail: &str) -> Response {
    let body = serde_json::json!({ "message": message, "error": detail });
    reply(status, JSON, Bytes::from(body.to_string()))
}

/// `Connection: Upgrade` with `Upgrade: websocket` (GoDoxy's `IsWebsocket`).
fn wants_websocket(headers: &HeaderMap) -> bool {
    super::relay::wants_upgrade(headers)
        && tokens(headers, header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket"))
}

fn tokens(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Accepts the WebSocket handshake (any Origin, as GoDoxy's agent does) and starts the
/// session once hyper hands the connection over.
fn upgrade(mut req: Request<Incoming>, metrics: &Metrics, view: View, every: Duration) -> Response {
    let headers = req.headers();
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut response = error(
            StatusCode::UPGRADE_REQUIRED,
            "bad request",
            "WebSocket version 13 only",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad request",
            "no Sec-WebSocket-Key",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    // GoDoxy's WebUI offers its CSRF token as a subprotocol `csrf.<token>`; a browser fails
    // the handshake unless it is echoed.
    let protocol = tokens(headers, header::SEC_WEBSOCKET_PROTOCOL)
        .find(|p| p.starts_with("csrf."))
        .and_then(|p| HeaderValue::from_str(p).ok());
    let Some(slot) = metrics.session_slot() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many system_info WebSockets",
            "try again later",
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let session_metrics = metrics.clone();
    metrics.spawn_session(async move {
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                debug!("system_info: WebSocket upgrade failed: {err}");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        session(ws, &session_metrics, view, every).await;
    });
    let mut response = hyper::Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(protocol) = protocol {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

/// One WebSocket client: a frame at once and then each `every` when it changed; `pong` for
/// each `ping`; closed after [`PING_TIMEOUT`] without one, or when the agent stops.
async fn session<S>(mut ws: WebSocketStream<S>, metrics: &Metrics, view: View, every: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let stop = metrics.stopping();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_deadline = Instant::now() + PING_TIMEOUT;
    let mut last: Option<Bytes> = None;
    let close = loop {
        tokio::select! {
            () = stop.cancelled() => break Some((CloseCode::Away, "agent shutting down")),
            () = sleep_until(ping_deadline) => break Some((CloseCode::Normal, "no ping for 5s")),
            _ = ticks.tick() => {
                let Some(frame) = view.render(metrics) else { continue };
                if last.as_ref() == Some(&frame) {
                    continue;
                }
                let Ok(text) = Utf8Bytes::try_from(frame.clone()) else { continue };
                match timeout(every, ws.send(Message::Text(text))).await {
                    Ok(Ok(())) => last = Some(frame),
                    Ok(Err(err)) => {
                        debug!("system_info: WebSocket write failed: {err}");
                        break None;
                    }
                    Err(_) => {
                        debug!("system_info: WebSocket client too slow; closing");
                        break None;
                    }
                }
            }
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) if text.as_str() == "ping" => {
                    ping_deadline = Instant::now() + PING_TIMEOUT;
                    let pong = Message::Text(Utf8Bytes::from_static("pong"));
                    if !matches!(timeout(CONTROL_WRITE, ws.send(pong)).await, Ok(Ok(()))) {
                        break None;
                    }
                }
                Some(Ok(Message::Close(_))) => {
                    // tungstenite has queued the reply; send it.
                    let _ = timeout(CONTROL_WRITE, ws.flush()).await;
                    break None;
                }
                // Anything else is ignored; protocol pings are answered by tungstenite.
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    debug!("system_info: WebSocket read failed: {err}");
                    break None;
                }
                None => break None,
            }
        }
    };
    if let Some((code, reason)) = close {
        debug!(reason, "system_info: closing a WebSocket");
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        if let Ok(Ok(())) = timeout(CONTROL_WRITE, ws.close(Some(frame))).await {
            // Give the client a moment to answer the close, as the protocol asks.
            let _ = timeout(CONTROL_WRITE, async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        }
    }
}

/// Go's `time.ParseDuration` for the positive durations a client may ask for (`500ms`,
/// `5s`, `1m30s`, `1.5h`); `None` for anything else, which GoDoxy treats as unset.
fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total = 0.0f64;
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_len);
        if number.is_empty() || number == "." {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * seconds;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let secs = |t: &str| parse_go_duration(t).map(|d| d.as_secs_f64());
        assert_eq!(secs("5s"), Some(5.0));
        assert_eq!(secs("1m30s"), Some(90.0));
        assert_eq!(secs("1.5h"), Some(5400.0));
        assert_eq!(secs("500ms"), Some(0.5));
        assert_eq!(secs("0"), Some(0.0));
        for bad in ["", "5", "s", "-1s", "1d", "5 s", "1..5s", "."] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn views() {
        assert!(matches!(View::parse(None, None), Ok(View::Latest)));
        assert!(matches!(
            View::parse(Some(""), Some("junk")),
            Ok(View::Latest)
        ));
        assert!(matches!(
            View::parse(Some("1h"), Some("disk_usage")),
            Ok(View::Chart(Period::H1, Aggregate::DiskUsage))
        ));
        let err = View::parse(Some("2h"), Some("cpu_average")).unwrap_err();
        assert!(err.contains("invalid period `2h`"), "{err}");
        let err = View::parse(Some("5m"), None).unwrap_err();
        assert!(
            err.starts_with("invalid aggregate ``: one of cpu_average,"),
            "{err}"
        );
    }
}
