//! The HTTP API as GoDoxy and an operator see it: curl with the client certificate, openssl
//! s_client negotiating the stream ALPN, and our own client speaking raw HTTP/1.1.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use crate::common::{TestDaemon, TestPki, curl, run};
use godoxy_agent::client::ClientTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// `openssl s_client` with the client certificate, verifying the agent as godoxy.agent, offering
/// `alpn` (a comma list) when given.
fn s_client(pki: &TestPki, addr: SocketAddr, alpn: Option<&str>) -> Command {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-cert")
        .arg(pki.path("client.pem"))
        .arg("-key")
        .arg(pki.path("client.key"))
        .arg("-CAfile")
        .arg(pki.path("ca.pem"))
        .arg("-servername")
        .arg("godoxy.agent")
        .arg("-verify_hostname")
        .arg("godoxy.agent");
    if let Some(alpn) = alpn {
        cmd.arg("-alpn").arg(alpn);
    }
    cmd
}

/// Splits curl's stdout into (body, status, content type).
fn split_curl(output: &Output) -> (String, u16, String) {
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    let (body, trailer) = stdout.rsplit_once('\n').unwrap();
    let (status, content_type) = trailer.split_once(' ').unwrap();
    (
        body.to_owned(),
        status.parse().unwrap(),
        content_type.to_owned(),
    )
}

#[tokio::test]
async fn curl_with_client_certificate_gets_info() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;

    let (body, status, content_type) =
        split_curl(&curl(&pki, Some(&pki), daemon.addr, "/godoxy/agent/info").await);
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/json");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "version": "v0.31.0",
            "name": "test-agent",
            "runtime": "docker",
        })
    );
    daemon.stop().await;
}

#[tokio::test]
async fn curl_gets_the_plain_text_endpoints() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    for (path, expected) in [
        ("/godoxy/agent/version", "v0.31.0"),
        ("/godoxy/agent/name", "test-agent"),
        ("/godoxy/agent/runtime", "docker"),
    ] {
        let (body, status, content_type) =
            split_curl(&curl(&pki, Some(&pki), daemon.addr, path).await);
        assert_eq!(status, 200, "{path}");
        assert_eq!(body, expected, "{path}");
        assert_eq!(content_type, "text/plain; charset=utf-8", "{path}");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn curl_unknown_path_gets_404_json() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    // Outside /godoxy/agent/ is the Docker API (tests/it/docker.rs).
    for path in [
        "/godoxy/agent/nope",
        "/godoxy/agent/info/extra",
        "/godoxy/agent/",
    ] {
        let (body, status, content_type) =
            split_curl(&curl(&pki, Some(&pki), daemon.addr, path).await);
        assert_eq!(status, 404, "{path}");
        assert_eq!(content_type, "application/json", "{path}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json, serde_json::json!({"error": "not found"}), "{path}");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn openssl_s_client_negotiates_the_stream_alpn() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let output = run(&mut s_client(
        &pki,
        daemon.addr,
        Some("godoxy-agent-stream/1"),
    ))
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ALPN protocol: godoxy-agent-stream/1"),
        "{stdout}"
    );
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
    // The stream side got no header: nothing was dialed.
    assert_eq!(daemon.dials(), 0);
    daemon.stop().await;
}

#[tokio::test]
async fn openssl_s_client_prefers_the_stream_alpn_and_falls_back_to_http() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    // Offering both, the client gets the stream protocol (the server's preference).
    let output = run(&mut s_client(
        &pki,
        daemon.addr,
        Some("http/1.1,godoxy-agent-stream/1"),
    ))
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ALPN protocol: godoxy-agent-stream/1"),
        "{stdout}"
    );
    // Offering http/1.1 only: http/1.1.
    let output = run(&mut s_client(&pki, daemon.addr, Some("http/1.1"))).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("ALPN protocol: http/1.1"), "{stdout}");
    // No ALPN at all: the handshake succeeds (and the connection is the HTTP API).
    let output = run(&mut s_client(&pki, daemon.addr, None)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("No ALPN negotiated"), "{stdout}");
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
    daemon.stop().await;
}

/// One HTTP/1.1 response: status, headers (names lowercased), body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (headers, then exactly content-length bytes) from `r`.
async fn read_response<R: AsyncReadExt + Unpin>(r: &mut R) -> Response {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = r.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before the end of the headers");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(raw[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status = status_line[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .expect("no content-length");
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < len {
        let n = r.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed inside the body");
        body.extend_from_slice(&buf[..n]);
    }
    assert_eq!(body.len(), len, "more bytes than content-length");
    Response {
        status,
        headers,
        body,
    }
}

async fn get(client: &ClientTls, addr: SocketAddr, path: &str) -> Response {
    let mut tls = client.connect_http(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: godoxy.agent\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), read_response(&mut tls))
        .await
        .expect("no response within 5 s");
    // Connection: close is honoured: the server ends the connection.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "connection left open after Connection: close"
    );
    assert!(rest.is_empty());
    response
}

#[tokio::test]
async fn our_client_speaks_http_to_the_api() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let client = pki.client();

    let info = get(&client, daemon.addr, "/godoxy/agent/info").await;
    assert_eq!(info.status, 200);
    assert_eq!(info.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(json["version"], "v0.31.0");
    assert_eq!(json["name"], "test-agent");
    assert_eq!(json["runtime"], "docker");

    let name = get(&client, daemon.addr, "/godoxy/agent/name").await;
    assert_eq!(
        (name.status, name.body.as_slice()),
        (200, &b"test-agent"[..])
    );

    let missing = get(&client, daemon.addr, "/godoxy/agent/nope").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("content-type"), Some("application/json"));
    assert_eq!(missing.body, br#"{"error":"not found"}"#);
    daemon.stop().await;
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let mut tls = pki.client().connect_http(daemon.addr).await.unwrap();
    for (path, body) in [
        ("/godoxy/agent/version", "v0.31.0"),
        ("/godoxy/agent/runtime", "docker"),
        ("/godoxy/agent/name", "test-agent"),
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: godoxy.agent\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), read_response(&mut tls))
            .await
            .expect("no response within 5 s");
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.body, body.as_bytes(), "{path}");
    }
    tls.shutdown().await.unwrap();
    daemon.stop().await;
}

/// The stream ALPN is never mistaken for HTTP: a GET sent as a "header" is refused, not answered.
#[tokio::test]
async fn http_request_on_the_stream_alpn_gets_no_http_answer() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let mut tls = pki.client().connect_stream(daemon.addr).await.unwrap();
    let mut request = b"GET /godoxy/agent/info HTTP/1.1\r\nHost: godoxy.agent\r\n\r\n".to_vec();
    request.resize(275, b' '); // a full header's worth, so the agent decides at once
    tls.write_all(&request).await.unwrap();
    tls.flush().await.unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "connection left open");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert_eq!(daemon.dials(), 0);
    daemon.stop().await;
}

/// A client offering only protocols the agent does not know completes the handshake without
/// ALPN (PROTOCOL.md: "anything else" goes to the HTTP API) and never reaches the tunnel.
#[tokio::test]
async fn unknown_alpn_never_reaches_the_tunnel() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let output = run(&mut s_client(
        &pki,
        daemon.addr,
        Some("h2,godoxy-agent-stream/2"),
    ))
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("No ALPN negotiated"), "{stdout}");
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
    assert_eq!(daemon.dials(), 0);
    let info = get(&pki.client(), daemon.addr, "/godoxy/agent/info").await;
    assert_eq!(info.status, 200);
    daemon.stop().await;
}
