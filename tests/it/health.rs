//! `GET /godoxy/agent/health`: the health checks a GoDoxy server asks the agent to run, against
//! live and dead targets on 127.0.0.1 (nginx and the Python origin from tests/peers/, plain
//! listeners, closed ports, a listener whose backlog is full) and the agent's own files.

use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::{TcpListener, UdpSocket};

use crate::common::{TestDaemon, TestPki, curl};
use crate::proxy::peers::{Nginx, PyPeer, closed_port};

/// A query as Go's `url.Values.Encode` writes it: keys sorted, `QueryEscape`d.
fn query(pairs: &[(&str, &str)]) -> String {
    let escape = |text: &str| -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let mut sorted = pairs.to_vec();
    sorted.sort_by_key(|(k, _)| *k);
    sorted
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// One health request: status, content type, body and how long it took.
struct Answer {
    status: u16,
    content_type: String,
    body: String,
    took: Duration,
}

async fn ask(pki: &TestPki, daemon: &TestDaemon, pairs: &[(&str, &str)]) -> Answer {
    let path = format!("/godoxy/agent/health?{}", query(pairs));
    let started = Instant::now();
    let out = curl(pki, Some(pki), daemon.addr, &path).await;
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = stdout
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("curl {path}: {}", String::from_utf8_lossy(&out.stderr)));
    let (status, content_type) = tail.split_once(' ').unwrap_or((tail, ""));
    Answer {
        status: status.parse().unwrap_or(0),
        content_type: content_type.to_owned(),
        body: body.to_owned(),
        took,
    }
}

/// A check that must answer 200 with `{"healthy","detail","latency"}`.
async fn check(pki: &TestPki, daemon: &TestDaemon, pairs: &[(&str, &str)]) -> (Value, Duration) {
    let answer = ask(pki, daemon, pairs).await;
    assert_eq!(answer.status, 200, "{pairs:?}: {}", answer.body);
    assert!(
        answer.content_type.starts_with("application/json"),
        "{pairs:?}: {}",
        answer.content_type
    );
    let result: Value = serde_json::from_str(&answer.body)
        .unwrap_or_else(|e| panic!("{pairs:?}: {e}: {}", answer.body));
    assert!(result["healthy"].is_boolean(), "{result}");
    assert!(result["detail"].is_string(), "{result}");
    assert!(
        result["latency"].is_u64(),
        "latency is not integer nanoseconds: {result}"
    );
    (result, answer.took)
}

fn healthy(result: &Value) -> bool {
    result["healthy"].as_bool().unwrap()
}

fn detail(result: &Value) -> String {
    result["detail"].as_str().unwrap().to_owned()
}

fn latency(result: &Value) -> Duration {
    Duration::from_nanos(result["latency"].as_u64().unwrap())
}

/// A TCP listener that accepts and counts.
async fn tcp_listener(bind: &str) -> Option<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind(bind).await.ok()?;
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((_stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    Some((addr, accepted))
}

/// A listener that never accepts, with its backlog filled: a new connection's SYN is dropped,
/// so a dial to it times out (locally, on 127.0.0.1).
fn full_backlog() -> (SocketAddr, socket2::Socket, Vec<StdTcpStream>) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut held = Vec::new();
    while held.len() < 16 {
        match StdTcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(stream) => held.push(stream),
            Err(_) => return (addr, socket, held),
        }
    }
    panic!("the backlog of {addr} never filled");
}

#[tokio::test]
async fn http_and_https_checks_head_the_path_without_verifying() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let nginx = Nginx::start().await;
    let dead = format!("127.0.0.1:{}", closed_port());
    for (scheme, addr) in [("http", nginx.http), ("https", nginx.https)] {
        let host = addr.to_string();
        let (live, _) = check(
            &pki,
            &daemon,
            &[
                ("scheme", scheme),
                ("host", &host),
                ("path", "/hello"),
                ("timeout", "3000"),
            ],
        )
        .await;
        assert!(healthy(&live), "{scheme}: {live}");
        assert!(
            latency(&live) > Duration::ZERO && latency(&live) < Duration::from_secs(3),
            "{live}"
        );
        // A HEAD for the path (nginx's certificate is from a CA the agent does not know).
        let entry = nginx
            .wait_log(|e| e["port"] == addr.port().to_string().as_str() && e["uri"] == "/hello")
            .await;
        assert_eq!(entry["method"], "HEAD", "{entry}");
        assert_eq!(entry["scheme"], scheme);

        let (down, _) = check(
            &pki,
            &daemon,
            &[("scheme", scheme), ("host", &host), ("path", "/status/503")],
        )
        .await;
        assert!(!healthy(&down), "{scheme}: {down}");
        let text = detail(&down);
        assert!(
            text.contains("Service") && text.contains("Unavailable"),
            "{scheme}: detail {text:?}"
        );

        let (gone, _) = check(
            &pki,
            &daemon,
            &[("scheme", scheme), ("host", &dead), ("path", "/")],
        )
        .await;
        assert!(!healthy(&gone), "{scheme}: {gone}");
        assert!(!detail(&gone).is_empty(), "{gone}");
    }

    // Any status below 500 is healthy: a 404 from the Python origin.
    let origin = PyPeer::start("http_origin.py", &[]).await;
    let (missing, _) = check(
        &pki,
        &daemon,
        &[
            ("scheme", "http"),
            ("host", &origin.addr.to_string()),
            ("path", "/no/such/route"),
        ],
    )
    .await;
    assert!(healthy(&missing), "{missing}");
    daemon.stop().await;
}

#[tokio::test]
async fn h2c_checks_speak_http2_with_prior_knowledge() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let nginx = Nginx::start().await;
    let h2c = nginx.h2c.to_string();
    let (live, _) = check(
        &pki,
        &daemon,
        &[("scheme", "h2c"), ("host", &h2c), ("path", "/hello")],
    )
    .await;
    assert!(healthy(&live), "{live}");
    let entry = nginx.wait_uri("/hello").await;
    assert_eq!(entry["method"], "HEAD", "{entry}");
    assert_eq!(entry["protocol"], "HTTP/2.0", "{entry}");

    let (down, _) = check(
        &pki,
        &daemon,
        &[("scheme", "h2c"), ("host", &h2c), ("path", "/status/503")],
    )
    .await;
    assert!(!healthy(&down), "{down}");
    assert!(detail(&down).contains("Unavailable"), "{down}");

    // nginx's HTTP/1.1-only port does not speak HTTP/2.
    let (http1, _) = check(
        &pki,
        &daemon,
        &[
            ("scheme", "h2c"),
            ("host", &nginx.http.to_string()),
            ("path", "/hello"),
        ],
    )
    .await;
    assert!(!healthy(&http1), "{http1}");

    let dead = format!("127.0.0.1:{}", closed_port());
    let (gone, _) = check(
        &pki,
        &daemon,
        &[("scheme", "h2c"), ("host", &dead), ("path", "/")],
    )
    .await;
    assert!(!healthy(&gone), "{gone}");
    assert!(!detail(&gone).is_empty());
    daemon.stop().await;
}

#[tokio::test]
async fn tcp_checks_connect_and_a_refusal_is_unhealthy() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let (addr, accepted) = tcp_listener("127.0.0.1:0").await.unwrap();
    let host = addr.to_string();
    let port = addr.port().to_string();
    for scheme in ["tcp", "tcp4"] {
        let (live, _) = check(&pki, &daemon, &[("scheme", scheme), ("host", &host)]).await;
        assert!(healthy(&live), "{scheme}: {live}");
        // `port` as its own parameter.
        let (split, _) = check(
            &pki,
            &daemon,
            &[("scheme", scheme), ("host", "127.0.0.1"), ("port", &port)],
        )
        .await;
        assert!(healthy(&split), "{scheme}: {split}");
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while accepted.load(Ordering::SeqCst) < 4 {
        assert!(Instant::now() < deadline, "the checks did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let dead = format!("127.0.0.1:{}", closed_port());
    for scheme in ["tcp", "tcp4"] {
        let (refused, _) = check(&pki, &daemon, &[("scheme", scheme), ("host", &dead)]).await;
        assert!(!healthy(&refused), "{refused}");
        assert!(
            detail(&refused).to_ascii_lowercase().contains("refused"),
            "{refused}"
        );
    }

    // IPv6 loopback, when the machine has it.
    if let Some((addr6, _)) = tcp_listener("[::1]:0").await {
        let (live, _) = check(
            &pki,
            &daemon,
            &[("scheme", "tcp6"), ("host", &addr6.to_string())],
        )
        .await;
        assert!(healthy(&live), "{live}");
        let dead6 = format!("[::1]:{}", closed_port());
        let (refused, _) = check(&pki, &daemon, &[("scheme", "tcp6"), ("host", &dead6)]).await;
        assert!(!healthy(&refused), "{refused}");
    } else {
        eprintln!("no IPv6 loopback: tcp6 not checked");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn udp_checks_are_healthy_with_or_without_a_listener() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let live = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let live = live.local_addr().unwrap().to_string();
    let port = closed_port().to_string();
    let mut targets = vec![
        ("udp", live.clone()),
        ("udp4", live),
        ("udp", format!("127.0.0.1:{port}")),
        ("udp4", format!("127.0.0.1:{port}")),
    ];
    if UdpSocket::bind("[::1]:0").await.is_ok() {
        targets.push(("udp6", format!("[::1]:{port}")));
    } else {
        eprintln!("no IPv6 loopback: udp6 not checked");
    }
    for (scheme, host) in targets {
        let (result, _) = check(&pki, &daemon, &[("scheme", scheme), ("host", &host)]).await;
        assert!(healthy(&result), "{scheme} {host}: {result}");
    }
    let (split, _) = check(
        &pki,
        &daemon,
        &[("scheme", "udp"), ("host", "127.0.0.1"), ("port", &port)],
    )
    .await;
    assert!(healthy(&split), "{split}");
    daemon.stop().await;
}

/// A dial that times out (not refused) answers 502 with the error for stream schemes; for
/// http it is an unhealthy result. The timeout is the one asked for.
#[tokio::test]
async fn a_dial_timeout_answers_502_within_the_timeout() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let (addr, _listener, _held) = full_backlog();
    let host = addr.to_string();
    for scheme in ["tcp", "tcp4"] {
        let answer = ask(
            &pki,
            &daemon,
            &[("scheme", scheme), ("host", &host), ("timeout", "400")],
        )
        .await;
        assert_eq!(answer.status, 502, "{scheme}: {}", answer.body);
        assert!(!answer.body.trim().is_empty());
        assert!(
            answer.took >= Duration::from_millis(350) && answer.took < Duration::from_secs(3),
            "{scheme}: answered after {:?}",
            answer.took
        );
    }
    let (result, took) = check(
        &pki,
        &daemon,
        &[
            ("scheme", "http"),
            ("host", &host),
            ("path", "/"),
            ("timeout", "400"),
        ],
    )
    .await;
    assert!(!healthy(&result), "{result}");
    assert!(!detail(&result).is_empty());
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    daemon.stop().await;
}

/// `timeout` is in milliseconds; empty, 0 or missing means 5 s.
#[tokio::test]
async fn the_timeout_is_honoured_and_defaults_to_five_seconds() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let origin = PyPeer::start("http_origin.py", &[]).await;
    let host = origin.addr.to_string();
    let base = [
        ("scheme", "http"),
        ("host", host.as_str()),
        ("path", "/sleep/1500"),
    ];
    let mut short = base.to_vec();
    short.push(("timeout", "300"));
    let (result, took) = check(&pki, &daemon, &short).await;
    assert!(!healthy(&result), "{result}");
    assert!(!detail(&result).is_empty());
    assert!(
        took < Duration::from_millis(1300),
        "answered after {took:?}"
    );

    for timeout in [Some("0"), Some(""), None] {
        let mut pairs = base.to_vec();
        if let Some(t) = timeout {
            pairs.push(("timeout", t));
        }
        let (result, took) = check(&pki, &daemon, &pairs).await;
        assert!(healthy(&result), "timeout {timeout:?}: {result}");
        assert!(took >= Duration::from_millis(1400), "{took:?}");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn fileserver_checks_the_path_on_the_agent() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let folder = pki.dir.path().display().to_string();
    let file = pki.path("ca.pem").display().to_string();
    for path in [&folder, &file] {
        let (result, _) = check(&pki, &daemon, &[("scheme", "fileserver"), ("path", path)]).await;
        assert!(healthy(&result), "{path}: {result}");
    }
    let missing = pki.path("no/such/root").display().to_string();
    let (result, _) = check(
        &pki,
        &daemon,
        &[("scheme", "fileserver"), ("path", &missing)],
    )
    .await;
    assert!(!healthy(&result), "{result}");
    assert!(!detail(&result).is_empty());
    daemon.stop().await;
}

#[tokio::test]
async fn incomplete_or_unknown_checks_answer_400() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let cases: [(&str, &[(&str, &str)]); 8] = [
        ("no parameters", &[]),
        ("no scheme", &[("host", "127.0.0.1:80"), ("path", "/")]),
        ("http without a host", &[("scheme", "http"), ("path", "/")]),
        ("h2c without a host", &[("scheme", "h2c")]),
        ("tcp without a host", &[("scheme", "tcp")]),
        ("fileserver without a path", &[("scheme", "fileserver")]),
        (
            "an unknown scheme",
            &[("scheme", "gopher"), ("host", "127.0.0.1:70")],
        ),
        (
            "a port twice",
            &[("scheme", "tcp"), ("host", "127.0.0.1:80"), ("port", "80")],
        ),
    ];
    for (name, pairs) in cases {
        let answer = ask(&pki, &daemon, pairs).await;
        assert_eq!(answer.status, 400, "{name}: {}", answer.body);
        assert!(!answer.body.trim().is_empty(), "{name}");
        assert!(
            answer.content_type.starts_with("text/plain"),
            "{name}: {}",
            answer.content_type
        );
    }
    daemon.stop().await;
}

#[tokio::test]
async fn health_needs_a_client_certificate() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let path = format!(
        "/godoxy/agent/health?{}",
        query(&[("scheme", "fileserver"), ("path", "/")])
    );
    let out = curl(&pki, None, daemon.addr, &path).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || !stdout.contains("\n200 "),
        "answered without a certificate: {stdout}"
    );
    daemon.stop().await;
}
