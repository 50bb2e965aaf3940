//! Client authentication and the time limits before a connection is trusted: no certificate,
//! a certificate from another CA, silent clients before and after the handshake.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::{TcpEcho, TestDaemon, TestPki, curl, tcp_from};
use godoxy_agent::Stats;
use godoxy_agent::client::ClientTls;
use godoxy_agent::protocol::TunnelHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn header_to(addr: SocketAddr) -> TunnelHeader {
    TunnelHeader::new(&addr.ip().to_string(), &addr.port().to_string(), 0).unwrap()
}

/// Reads until the connection ends; true when it ended (EOF or error) within `limit`.
async fn closes_within<R: AsyncReadExt + Unpin>(r: &mut R, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    match tokio::time::timeout(limit, r.read_to_end(&mut out)).await {
        Ok(_) => (out, true),
        Err(_) => (out, false),
    }
}

/// Tries to open a tunnel to `echo` with `client` and send bytes; asserts the agent ends the
/// connection within 5 s without a byte back, and that nothing was dialed.
async fn tunnel_is_refused(client: &ClientTls, daemon: &TestDaemon, echo: &TcpEcho) {
    // With TLS 1.3 the client may finish its handshake before the server has checked the
    // client certificate: the refusal then arrives on the first read.
    match client.open_tunnel(daemon.addr, &header_to(echo.addr)).await {
        Err(_) => {}
        Ok(mut tls) => {
            let _ = tls.write_all(b"hello through the tunnel").await;
            let _ = tls.flush().await;
            let (back, closed) = closes_within(&mut tls, Duration::from_secs(5)).await;
            assert!(closed, "connection still open after 5 s");
            assert!(back.is_empty(), "got bytes back: {back:?}");
        }
    }
    // Same for the HTTP side: no answer.
    match client.connect_http(daemon.addr).await {
        Err(_) => {}
        Ok(mut tls) => {
            let _ = tls
                .write_all(b"GET /godoxy/agent/info HTTP/1.1\r\nHost: godoxy.agent\r\n\r\n")
                .await;
            let _ = tls.flush().await;
            let (back, closed) = closes_within(&mut tls, Duration::from_secs(5)).await;
            assert!(closed, "HTTP connection still open after 5 s");
            assert!(back.is_empty(), "got an HTTP answer: {back:?}");
        }
    }
    assert_eq!(echo.accepted(), 0, "the destination saw a connection");
    assert_eq!(daemon.dials(), 0);
    assert_eq!(Stats::get(&daemon.stats.tls_handshakes), 0);
    assert!(Stats::get(&daemon.stats.tls_handshake_failures) >= 2);
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let echo = TcpEcho::start().await;

    let output = curl(&pki, None, daemon.addr, "/godoxy/agent/info").await;
    assert!(
        !output.status.success(),
        "curl without a certificate got in"
    );
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("version"),
        "info leaked: {}",
        String::from_utf8_lossy(&output.stdout)
    );

    tunnel_is_refused(&pki.client_without_cert(), &daemon, &echo).await;
    daemon.stop().await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let echo = TcpEcho::start().await;

    let output = curl(&pki, Some(&other), daemon.addr, "/godoxy/agent/info").await;
    assert!(
        !output.status.success(),
        "curl with another CA's certificate got in"
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("version"));

    tunnel_is_refused(&pki.client_with_cert_of(&other), &daemon, &echo).await;

    // The right certificate still works on the same daemon.
    let output = curl(&pki, Some(&pki), daemon.addr, "/godoxy/agent/info").await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    daemon.stop().await;
}

/// The server certificate of another set is not accepted by a client trusting our CA (the
/// client side of mutual authentication).
#[tokio::test]
async fn client_refuses_a_server_from_another_ca() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let echo = TcpEcho::start().await;
    let result = other
        .client()
        .open_tunnel(daemon.addr, &header_to(echo.addr))
        .await;
    assert!(result.is_err(), "client trusted a server from another CA");
    assert_eq!(echo.accepted(), 0);
    assert_eq!(daemon.dials(), 0);
    daemon.stop().await;
}

/// Skipping the client check (AGENT_SKIP_CLIENT_CERT_CHECK) lets a client without a
/// certificate through; this is what the loud warning is about.
#[tokio::test]
async fn skip_client_cert_check_admits_anonymous_clients() {
    let pki = TestPki::new();
    let text = TestDaemon::config_text(&pki, "");
    let config = godoxy_agent::Config::from_toml(&text, None, |var| {
        (var == "AGENT_SKIP_CLIENT_CERT_CHECK").then(|| "true".to_owned())
    })
    .unwrap()
    .0;
    assert!(!config.tls.require_client_cert);
    let daemon = TestDaemon::start_config(config).await;
    let echo = TcpEcho::start().await;
    let mut tls = pki
        .client_without_cert()
        .open_tunnel(daemon.addr, &header_to(echo.addr))
        .await
        .unwrap();
    tls.write_all(b"anonymous").await.unwrap();
    tls.shutdown().await.unwrap();
    let mut back = Vec::new();
    tls.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"anonymous");
    assert_eq!(echo.accepted(), 1);
    daemon.stop().await;
}

#[tokio::test]
async fn silent_client_after_handshake_is_closed_after_header_timeout() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_with(&pki, "header_timeout = \"1s\"").await;
    let mut tls = pki.client().connect_stream(daemon.addr).await.unwrap();
    let started = Instant::now();
    let (rest, closed) = closes_within(&mut tls, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(closed, "still open 5 s after a 1 s header timeout");
    assert!(rest.is_empty());
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}, before the header timeout"
    );
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
    assert_eq!(daemon.dials(), 0);
    daemon.stop().await;
}

#[tokio::test]
async fn silent_tcp_client_is_closed_after_handshake_timeout_without_delaying_others() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_with(&pki, "handshake_timeout = \"1s\"").await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(daemon.addr).await.unwrap();

    // Meanwhile another client gets /info quickly.
    let mut tls = pki.client().connect_http(daemon.addr).await.unwrap();
    tls.write_all(
        b"GET /godoxy/agent/info HTTP/1.1\r\nHost: godoxy.agent\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let other_done = started.elapsed();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains("\"name\":\"test-agent\""), "{response}");
    assert!(
        other_done < Duration::from_millis(900),
        "the other client waited {other_done:?} behind a silent one"
    );

    let (rest, closed) = closes_within(&mut silent, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(closed, "silent TCP client still connected after 5 s");
    assert!(rest.is_empty());
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}, before the handshake timeout"
    );
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
    assert_eq!(Stats::get(&daemon.stats.tls_handshake_failures), 1);
    assert_eq!(Stats::get(&daemon.stats.tls_handshakes), 1);
    daemon.stop().await;
}

/// A client that starts the handshake and stalls halfway (a ClientHello fragment) is also
/// bounded by the handshake timeout.
#[tokio::test]
async fn partial_client_hello_is_closed_after_handshake_timeout() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_with(&pki, "handshake_timeout = \"1s\"").await;
    let mut tcp = TcpStream::connect(daemon.addr).await.unwrap();
    // A TLS handshake record header announcing 512 bytes, then only 4 of them.
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .await
        .unwrap();
    let started = Instant::now();
    let (_, closed) = closes_within(&mut tcp, Duration::from_secs(5)).await;
    assert!(closed, "stalled handshake still open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(900));
    daemon.stop().await;
}

/// Many silent TCP clients at once do not block a real client either.
#[tokio::test]
async fn many_silent_tcp_clients_do_not_block_a_real_one() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_with(
        &pki,
        "handshake_timeout = \"2s\"\nmax_handshakes_per_source = 64",
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(tcp_from("127.0.0.2", daemon.addr).await.unwrap());
    }
    let echo = TcpEcho::start().await;
    let started = Instant::now();
    let mut tls = pki
        .client()
        .open_tunnel(daemon.addr, &header_to(echo.addr))
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "tunnel took {:?} behind silent clients",
        started.elapsed()
    );
    drop(tls);
    drop(silent);
    daemon.stop().await;
}

/// An HTTP-API connection that never sends a request is closed after http.header_timeout, so
/// it cannot hold a connection slot; one that goes quiet after a request is kept for
/// http.idle_timeout, measured apart (GoDoxy reuses idle connections).
#[tokio::test]
async fn silent_http_client_is_closed_after_header_timeout() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_with(
        &pki,
        "[http]\nheader_timeout = \"1s\"\nidle_timeout = \"2s\"",
    )
    .await;
    let mut tls = pki.client().connect_http(daemon.addr).await.unwrap();
    let started = Instant::now();
    let (rest, closed) = closes_within(&mut tls, Duration::from_secs(5)).await;
    assert!(closed, "silent HTTP client still connected after 5 s");
    assert!(rest.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));

    // Keep-alive: one request answered, then silence.
    let mut tls = pki.client().connect_http(daemon.addr).await.unwrap();
    tls.write_all(b"GET /godoxy/agent/name HTTP/1.1\r\nHost: godoxy.agent\r\n\r\n")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let started = Instant::now();
    let (response, closed) = closes_within(&mut tls, Duration::from_secs(5)).await;
    assert!(closed, "idle keep-alive connection still open after 5 s");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\ntest-agent"), "{response}");
    assert!(started.elapsed() >= Duration::from_millis(1900));
    daemon.stop().await;
}

/// Shutdown gives open connections `shutdown_grace`, then closes the rest. A stream client
/// that completed the handshake but has not sent its header yet must not hold shutdown up
/// until its header timeout.
#[tokio::test]
async fn shutdown_does_not_wait_for_a_pending_header_beyond_grace() {
    let pki = TestPki::new();
    let daemon =
        TestDaemon::start_with(&pki, "header_timeout = \"4s\"\nshutdown_grace = \"1s\"").await;
    let _tls = pki.client().connect_stream(daemon.addr).await.unwrap();
    let started = Instant::now();
    daemon.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
}
