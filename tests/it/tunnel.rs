//! TCP stream tunnels through the real daemon: bytes, half-close, concurrency, refusals.

use std::time::{Duration, Instant};

use crate::common::{TcpEcho, TestDaemon, TestPki, pattern};
use godoxy_agent::protocol::TunnelHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn header_to(addr: std::net::SocketAddr) -> TunnelHeader {
    TunnelHeader::new(&addr.ip().to_string(), &addr.port().to_string(), 0).unwrap()
}

/// Reads until the connection ends; true when it ended (EOF or error) rather than timing out.
async fn closes_within<R: AsyncReadExt + Unpin>(r: &mut R, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    match tokio::time::timeout(limit, r.read_to_end(&mut out)).await {
        Ok(_) => (out, true),
        Err(_) => (out, false),
    }
}

#[tokio::test]
async fn header_and_payload_in_one_write_arrive_intact() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let echo = TcpEcho::start().await;

    let payload = pattern(1000, 1);
    let mut first = header_to(echo.addr).encode().to_vec();
    first.extend_from_slice(&payload);
    // ClientTls::open_tunnel writes the header alone; here header and payload go in ONE write.
    let mut tls = pki.client().connect_stream(daemon.addr).await.unwrap();
    tls.write_all(&first).await.unwrap();
    tls.flush().await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
    tls.shutdown().await.unwrap();
    let (rest, closed) = closes_within(&mut tls, Duration::from_secs(5)).await;
    assert!(closed && rest.is_empty());
    assert_eq!(echo.accepted(), 1);
    daemon.stop().await;
}

#[tokio::test]
async fn eight_mib_each_way_byte_for_byte() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let echo = TcpEcho::start().await;
    let tls = pki
        .client()
        .open_tunnel(daemon.addr, &header_to(echo.addr))
        .await
        .unwrap();
    let data = pattern(8 << 20, 7);
    let (mut r, mut w) = tokio::io::split(tls);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(100_003) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(data.len());
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
    daemon.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_tunnels() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let echo = TcpEcho::start().await;
    let client = pki.client();
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let client = client.clone();
        let header = header_to(echo.addr);
        let addr = daemon.addr;
        tasks.push(tokio::spawn(async move {
            let mut tls = client.open_tunnel(addr, &header).await.unwrap();
            let data = pattern(64 * 1024 + i as usize, i + 100);
            tls.write_all(&data).await.unwrap();
            tls.shutdown().await.unwrap();
            let mut back = Vec::new();
            tls.read_to_end(&mut back).await.unwrap();
            assert!(back == data, "tunnel {i}: echo differs");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(echo.accepted(), 50);
    daemon.stop().await;
}

/// A request/response destination: reads the request to EOF, then answers and closes.
#[tokio::test]
async fn client_half_close_still_receives_whole_reply() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    let reply = pattern(300_000, 9);
    let expected = reply.clone();
    let dest = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let mut request = Vec::new();
        s.read_to_end(&mut request).await.unwrap(); // only ends if the FIN was carried across
        s.write_all(&reply).await.unwrap();
        s.shutdown().await.unwrap();
        request
    });
    let mut tls = pki
        .client()
        .open_tunnel(daemon.addr, &header_to(server_addr))
        .await
        .unwrap();
    tls.write_all(b"GET everything").await.unwrap();
    tls.shutdown().await.unwrap();
    let mut got = Vec::new();
    tls.read_to_end(&mut got).await.unwrap();
    assert_eq!(dest.await.unwrap(), b"GET everything");
    assert!(got == expected, "reply differs: {} bytes", got.len());
    daemon.stop().await;
}

#[tokio::test]
async fn probe_closes_and_dials_nothing() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let echo = TcpEcho::start().await;
    // A probe that even names the echo: nothing may be dialed.
    let header = TunnelHeader::new(
        &echo.addr.ip().to_string(),
        &echo.addr.port().to_string(),
        1,
    )
    .unwrap();
    let mut tls = pki
        .client()
        .open_tunnel(daemon.addr, &header)
        .await
        .unwrap();
    let (rest, closed) = closes_within(&mut tls, Duration::from_secs(5)).await;
    assert!(closed, "probe connection was not closed");
    assert!(rest.is_empty());
    let mut tls = pki
        .client()
        .open_tunnel(daemon.addr, &TunnelHeader::probe())
        .await
        .unwrap();
    assert!(closes_within(&mut tls, Duration::from_secs(5)).await.1);
    assert_eq!(echo.accepted(), 0);
    assert_eq!(daemon.dials(), 0);
    daemon.stop().await;
}

#[tokio::test]
async fn invalid_and_rejected_vectors_close_without_dialing() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let v = crate::common::vectors();
    for vector in v.invalid.iter().chain(&v.rejected_destination) {
        let mut tls = pki.client().connect_stream(daemon.addr).await.unwrap();
        tls.write_all(&vector.bytes()).await.unwrap();
        if vector.why.as_deref() == Some("short") {
            tls.shutdown().await.unwrap(); // 274 bytes then EOF
        }
        let (rest, closed) = closes_within(&mut tls, Duration::from_secs(5)).await;
        assert!(closed, "{}: connection left open", vector.name);
        assert!(rest.is_empty(), "{}", vector.name);
    }
    assert_eq!(
        daemon.dials(),
        0,
        "an invalid or rejected header was dialed"
    );
    daemon.stop().await;
}

/// The vectors name far-away destinations; these name the echo itself, so "saw no
/// connection" is observed at the destination too.
#[tokio::test]
async fn broken_headers_naming_a_live_destination_reach_nothing() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let echo = TcpEcho::start().await;
    let good = header_to(echo.addr).encode();
    let mut crc = good;
    crc[270] ^= 0x02; // flag bit flipped in transit
    let mut version = good;
    version[2] = b'2';
    let tail = crc32fast::hash(&version[..271]).to_be_bytes();
    version[271..].copy_from_slice(&tail);
    let nul_host =
        TunnelHeader::from_raw(b"127.0.0.1\0", echo.addr.port().to_string().as_bytes(), 0)
            .unwrap()
            .encode();
    for (name, bytes) in [("crc", crc), ("version", version), ("nul host", nul_host)] {
        let mut tls = pki.client().connect_stream(daemon.addr).await.unwrap();
        tls.write_all(&bytes).await.unwrap();
        assert!(
            closes_within(&mut tls, Duration::from_secs(5)).await.1,
            "{name}: not closed"
        );
    }
    assert_eq!(echo.accepted(), 0);
    daemon.stop().await;
}

#[tokio::test]
async fn silent_client_is_closed_after_header_timeout() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_with(&pki, "header_timeout = \"1s\"").await;
    let mut tls = pki.client().connect_stream(daemon.addr).await.unwrap();
    tls.write_all(b"0.1.0").await.unwrap(); // part of a header, then nothing
    let started = Instant::now();
    let (_, closed) = closes_within(&mut tls, Duration::from_secs(5)).await;
    assert!(closed, "still open 5 s after a 1 s header timeout");
    assert!(started.elapsed() >= Duration::from_millis(900));
    daemon.stop().await;
}

#[tokio::test]
async fn unreachable_destination_closes_the_tunnel() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    // A port that was just free: connecting is refused.
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let mut tls = pki
        .client()
        .open_tunnel(daemon.addr, &header_to(closed_port))
        .await
        .unwrap();
    let _ = tls.write_all(b"hello").await;
    let (rest, closed) = closes_within(&mut tls, Duration::from_secs(5)).await;
    assert!(closed && rest.is_empty());
    assert_eq!(daemon.dials(), 1);
    daemon.stop().await;
}

/// Destinations by IPv6 literal (no brackets in the header) and by name, resolved by the agent.
#[tokio::test]
async fn ipv6_literal_and_host_name_destinations() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let v6 = match TcpListener::bind("[::1]:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("no IPv6 loopback here ({e}); checking the name only");
            daemon.stop().await;
            return;
        }
    };
    let v6_port = v6.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = v6.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let echo = TcpEcho::start().await;
    for (host, port) in [("::1", v6_port), ("localhost", echo.addr.port())] {
        let header = TunnelHeader::new(host, &port.to_string(), 0).unwrap();
        let mut tls = pki
            .client()
            .open_tunnel(daemon.addr, &header)
            .await
            .unwrap();
        tls.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("{host}: no echo"))
            .unwrap();
        assert_eq!(&back, b"ping", "{host}");
    }
    daemon.stop().await;
}

/// The default `[::]` listeners are dual-stack: IPv4 and IPv6 clients reach both the TLS and
/// the DTLS port.
#[tokio::test]
async fn unspecified_ipv6_listeners_take_ipv4_and_ipv6_clients() {
    let pki = TestPki::new();
    let text = TestDaemon::config_text_with_udp(&pki, "[::]:0", "")
        .replace("tcp = \"127.0.0.1:0\"", "tcp = \"[::]:0\"");
    let config = godoxy_agent::Config::from_toml(&text, None, |_| None)
        .unwrap()
        .0;
    let daemon = TestDaemon::start_config(config).await;
    let udp = daemon.udp.unwrap();
    let client = pki.client();
    for ip in ["127.0.0.1", "::1"] {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        let tcp = std::net::SocketAddr::new(ip, daemon.addr.port());
        client
            .probe_tcp(tcp, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("TCP probe to {tcp}: {e:#}"));
        let udp = std::net::SocketAddr::new(ip, udp.port());
        client
            .probe_udp(udp, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("UDP probe to {udp}: {e:#}"));
    }
    daemon.stop().await;
}
