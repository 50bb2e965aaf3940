//! UDP tunnels over DTLS through the real daemon: datagrams, concurrency, handshake isolation,
//! refusals, idle sessions, resource return, and openssl interop.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::{
    TestDaemon, TestPki, UdpEcho, capture_client_hello, pattern, stalled_handshake,
};
use godoxy_agent::client::{ClientTls, UdpTunnel};
use godoxy_agent::protocol::MAX_PAYLOAD;
use godoxy_agent::protocol::TunnelHeader;
use tokio::net::UdpSocket;

const HANDSHAKE: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(5);

fn header_to(addr: SocketAddr) -> TunnelHeader {
    TunnelHeader::new(&addr.ip().to_string(), &addr.port().to_string(), 0).unwrap()
}

async fn open(client: &ClientTls, daemon: &TestDaemon, dest: SocketAddr) -> UdpTunnel {
    client
        .open_udp(daemon.udp.unwrap(), &header_to(dest), HANDSHAKE)
        .await
        .unwrap()
}

/// Sends `payloads` with at most `window` in flight and returns what came back.
async fn echo_all(tunnel: &UdpTunnel, payloads: &[Vec<u8>], window: usize) -> Vec<Vec<u8>> {
    let mut back = Vec::new();
    let mut buf = UdpTunnel::buffer();
    let mut sent = 0;
    while back.len() < payloads.len() {
        while sent < payloads.len() && sent - back.len() < window {
            tunnel.send(&payloads[sent]).await.unwrap();
            sent += 1;
        }
        let n = tunnel
            .recv(&mut buf, WAIT)
            .await
            .unwrap_or_else(|e| panic!("after {} of {} echoes: {e}", back.len(), payloads.len()))
            .expect("session closed early");
        back.push(buf[..n].to_vec());
    }
    back
}

/// Waits until `cond` holds, polling; panics with `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the agent ends the session: recv sees the close, or times out (false).
async fn agent_closes(tunnel: &UdpTunnel) -> bool {
    let mut buf = UdpTunnel::buffer();
    matches!(tunnel.recv(&mut buf, WAIT).await, Ok(None))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_datagrams_of_every_size_round_trip() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let echo = UdpEcho::start().await;
    let tunnel = open(&pki.client(), &daemon, echo.addr).await;
    // 1000 distinct sizes from 1 to 8155: the size identifies the datagram, the seed its bytes.
    let sizes: Vec<usize> = (0..1000).map(|i| 1 + i * (MAX_PAYLOAD - 1) / 999).collect();
    assert_eq!((sizes[0], sizes[999]), (1, MAX_PAYLOAD));
    let payloads: Vec<Vec<u8>> = sizes.iter().map(|&n| pattern(n, n as u64)).collect();
    let back = echo_all(&tunnel, &payloads, 8).await;
    let mut seen = HashSet::new();
    for datagram in &back {
        let n = datagram.len();
        assert!(
            *datagram == pattern(n, n as u64),
            "datagram of {n} bytes corrupted"
        );
        assert!(seen.insert(n), "datagram of {n} bytes echoed twice");
    }
    assert_eq!(seen.len(), 1000);
    assert_eq!(echo.received(), 1000, "the destination saw other datagrams");
    tunnel.close().await;
    daemon.stop().await;
}

/// Empty datagrams are datagrams: they cross both ways, alone and between others (the agent
/// sends runs of equal-sized datagrams in one system call; an empty one cannot be part of one).
#[tokio::test]
async fn empty_datagrams_cross_both_ways() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let echo = UdpEcho::start().await;
    let tunnel = open(&pki.client(), &daemon, echo.addr).await;
    let sizes = [0, 1200, 1200, 0, 0, 1200, 700, 0, 1200, 1200, 1200, 0];
    let payloads: Vec<Vec<u8>> = sizes.iter().map(|&n| pattern(n, n as u64)).collect();
    let back = echo_all(&tunnel, &payloads, sizes.len()).await;
    let mut got: Vec<usize> = back.iter().map(Vec::len).collect();
    got.sort_unstable();
    let mut want = sizes.to_vec();
    want.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(echo.received(), sizes.len());
    tunnel.close().await;
    daemon.stop().await;
}

#[tokio::test]
async fn oversize_datagram_from_destination_is_counted_not_sent() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    // Answers each datagram with one of MAX_PAYLOAD + 1 bytes, then one of MAX_PAYLOAD.
    let dest = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dest_addr = dest.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((_, peer)) = dest.recv_from(&mut buf).await {
            let _ = dest.send_to(&vec![1u8; MAX_PAYLOAD + 1], peer).await;
            let _ = dest.send_to(&vec![2u8; MAX_PAYLOAD], peer).await;
        }
    });
    let tunnel = open(&pki.client(), &daemon, dest_addr).await;
    tunnel.send(b"go").await.unwrap();
    let mut buf = UdpTunnel::buffer();
    let n = tunnel.recv(&mut buf, WAIT).await.unwrap().unwrap();
    assert_eq!(
        &buf[..n],
        &vec![2u8; MAX_PAYLOAD][..],
        "the oversize datagram was sent on"
    );
    assert_eq!(daemon.stat(|s| &s.udp_oversize_drops), 1);
    tunnel.close().await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_concurrent_sessions() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let echo = UdpEcho::start().await;
    let client = pki.client();
    let server = daemon.udp.unwrap();
    let mut tasks = Vec::new();
    for i in 0..25u64 {
        let client = client.clone();
        let header = header_to(echo.addr);
        tasks.push(tokio::spawn(async move {
            let tunnel = client.open_udp(server, &header, HANDSHAKE).await.unwrap();
            let payloads: Vec<Vec<u8>> = (0..40)
                .map(|k| pattern(100 + k * 37, i * 1000 + k as u64))
                .collect();
            let back = echo_all(&tunnel, &payloads, 4).await;
            let mut want: Vec<_> = payloads.clone();
            let mut got = back;
            want.sort();
            got.sort();
            assert!(got == want, "session {i}: echoes differ");
            tunnel.close().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eventually(WAIT, "table empty", || daemon.stat(|s| &s.udp_table) == 0).await;
    assert_eq!(daemon.stat(|s| &s.udp_queue_drops), 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_do_not_delay_others() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(
        &pki,
        "handshake_timeout = \"10s\"\nmax_handshakes_per_source = 64",
    )
    .await;
    let echo = UdpEcho::start().await;
    let client = pki.client();
    let hello = capture_client_hello(&client).await;
    let server = daemon.udp.unwrap();
    // 51 peers (from another address) complete the cookie round and go silent.
    let mut stalled = Vec::new();
    for _ in 0..51 {
        stalled.push(
            stalled_handshake("127.0.0.2", server, &hello, WAIT)
                .await
                .expect("a HelloVerifyRequest"),
        );
    }
    eventually(WAIT, "stalled peers in the table", || {
        daemon.stat(|s| &s.udp_table) >= 51
    })
    .await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..10u64 {
        let client = client.clone();
        let header = header_to(echo.addr);
        tasks.push(tokio::spawn(async move {
            let tunnel = client.open_udp(server, &header, HANDSHAKE).await.unwrap();
            let back = echo_all(&tunnel, &[pattern(64, i)], 1).await;
            assert_eq!(back[0], pattern(64, i));
            tunnel.close().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "10 clients behind 51 stalled handshakes took {took:?}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn same_address_reconnects_after_clean_close() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let echo = UdpEcho::start().await;
    let client = pki.client();
    let server = daemon.udp.unwrap();
    let first = open(&client, &daemon, echo.addr).await;
    let local = first.local_addr();
    assert_eq!(
        echo_all(&first, &[b"one".to_vec()], 1).await,
        vec![b"one".to_vec()]
    );
    first.close().await;
    let second = client
        .connect_dtls(server, Some(local), HANDSHAKE)
        .await
        .unwrap();
    assert_eq!(second.local_addr(), local);
    second.send(&header_to(echo.addr).encode()).await.unwrap();
    assert_eq!(
        echo_all(&second, &[b"two".to_vec()], 1).await,
        vec![b"two".to_vec()]
    );
    second.close().await;
    daemon.stop().await;
}

#[tokio::test]
async fn handshake_without_or_with_foreign_certificate_is_refused() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let server = daemon.udp.unwrap();
    for (name, client) in [
        ("no certificate", pki.client_without_cert()),
        ("another CA", pki.client_with_cert_of(&other)),
    ] {
        let result = client.connect_dtls(server, None, HANDSHAKE).await;
        // The client may finish its side before the server's verdict; then the session is
        // closed on the first read.
        if let Ok(tunnel) = result {
            assert!(agent_closes(&tunnel).await, "{name}: session stayed open");
        }
    }
    eventually(WAIT, "two handshake failures", || {
        daemon.stat(|s| &s.udp_handshake_failures) == 2
    })
    .await;
    assert_eq!(daemon.stat(|s| &s.udp_handshakes), 0);
    assert_eq!(daemon.dials(), 0);
    // Failed handshakes leave nothing behind in the table.
    eventually(WAIT, "table empty after refusals", || {
        daemon.stat(|s| &s.udp_table) == 0
    })
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn invalid_probe_and_rejected_headers_reach_no_destination() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let echo = UdpEcho::start().await;
    let client = pki.client();
    let server = daemon.udp.unwrap();
    let v = crate::common::vectors();
    let mut headers: Vec<(String, Vec<u8>)> = v
        .invalid
        .iter()
        .chain(&v.rejected_destination)
        .map(|vector| (vector.name.clone(), vector.bytes()))
        .collect();
    // A probe naming the live echo, and a refused host that would otherwise reach it.
    let port = echo.addr.port().to_string();
    headers.push((
        "probe".into(),
        TunnelHeader::new("127.0.0.1", &port, 1)
            .unwrap()
            .encode()
            .to_vec(),
    ));
    headers.push((
        "nul host".into(),
        TunnelHeader::from_raw(b"127.0.0.1\0", port.as_bytes(), 0)
            .unwrap()
            .encode()
            .to_vec(),
    ));
    for (name, header) in &headers {
        let tunnel = client.connect_dtls(server, None, HANDSHAKE).await.unwrap();
        tunnel.send(header).await.unwrap();
        let _ = tunnel.send(b"payload that must not arrive").await;
        assert!(
            agent_closes(&tunnel).await,
            "{name}: session not closed with close_notify"
        );
    }
    assert_eq!(echo.received(), 0);
    assert_eq!(daemon.dials(), 0);
    daemon.stop().await;
}

#[tokio::test]
async fn idle_session_of_a_vanished_client_ends() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "udp_idle_timeout = \"300ms\"").await;
    let echo = UdpEcho::start().await;
    let tunnel = open(&pki.client(), &daemon, echo.addr).await;
    assert_eq!(echo_all(&tunnel, &[b"x".to_vec()], 1).await.len(), 1);
    // Vanish: no close_notify, the socket just stays silent.
    eventually(WAIT, "idle session removed", || {
        daemon.stat(|s| &s.udp_table) == 0 && daemon.stat(|s| &s.udp_sessions) == 0
    })
    .await;
    drop(tunnel);
    daemon.stop().await;
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_sequential_sessions_leave_nothing_behind() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let echo = UdpEcho::start().await;
    let client = pki.client();
    // Warm up once, so lazily created runtime resources are in the baseline.
    let t = open(&client, &daemon, echo.addr).await;
    echo_all(&t, &[b"warm".to_vec()], 1).await;
    t.close().await;
    eventually(WAIT, "table empty", || daemon.stat(|s| &s.udp_table) == 0).await;
    let fds = open_fds();
    for i in 0..2000u64 {
        let t = open(&client, &daemon, echo.addr).await;
        let payload = i.to_be_bytes().to_vec();
        assert_eq!(
            echo_all(&t, std::slice::from_ref(&payload), 1).await,
            vec![payload],
            "session {i}"
        );
        t.close().await;
    }
    eventually(WAIT, "table empty after 2000 sessions", || {
        daemon.stat(|s| &s.udp_table) == 0 && daemon.stat(|s| &s.udp_sessions) == 0
    })
    .await;
    eventually(WAIT, "fd count back", || open_fds() <= fds).await;
    assert_eq!(daemon.stat(|s| &s.udp_handshakes), 2001);
    assert_eq!(daemon.stat(|s| &s.udp_handshake_failures), 0);
    daemon.stop().await;
}

/// An independent DTLS implementation: openssl s_client, with the header as its own record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_interop() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let echo = UdpEcho::start().await;
    let header = header_to(echo.addr).encode();
    let header_path = pki.path("header.bin");
    std::fs::write(&header_path, header).unwrap();
    // s_client sends one record per read of its input: write the header in one write, then a
    // payload in another, with pauses so the pipe never merges them; then wait for the echo.
    let feeder = format!(
        "import os,sys,time\n\
         os.write(1, open('{h}','rb').read()); time.sleep(0.3)\n\
         os.write(1, b'hello-from-openssl'); time.sleep(1.5)\n",
        h = header_path.display()
    );
    let script = format!(
        "python3 -c \"$FEEDER\" | openssl s_client -dtls1_2 -cipher ECDHE-ECDSA-AES128-GCM-SHA256 \
         -connect {addr} -cert {d}/client.pem -key {d}/client.key -CAfile {d}/ca.pem \
         -servername godoxy.agent -verify_hostname godoxy.agent -verify_return_error",
        addr = daemon.udp.unwrap(),
        d = pki.dir.path().display()
    );
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("FEEDER", feeder)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Protocol  : DTLSv1.2"), "{stdout}");
    assert!(stdout.contains("ECDHE-ECDSA-AES128-GCM-SHA256"), "{stdout}");
    assert!(stdout.contains("Extended master secret: yes"), "{stdout}");
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
    assert!(
        stdout.contains("hello-from-openssl"),
        "payload not echoed back:\n{stdout}"
    );
    assert_eq!(echo.received(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_beyond_the_cap_are_refused_and_counted() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "max_udp_sessions = 1").await;
    let echo = UdpEcho::start().await;
    let client = pki.client();
    let first = open(&client, &daemon, echo.addr).await;
    let refused = client
        .connect_dtls(daemon.udp.unwrap(), None, Duration::from_secs(1))
        .await;
    assert!(
        refused.is_err(),
        "a second session was admitted over max_udp_sessions = 1"
    );
    assert!(daemon.stat(|s| &s.udp_refused_sessions) >= 1);
    // The admitted session is unaffected, and its slot frees when it closes.
    assert_eq!(
        echo_all(&first, &[b"still here".to_vec()], 1).await.len(),
        1
    );
    first.close().await;
    eventually(WAIT, "slot freed", || daemon.stat(|s| &s.udp_table) == 0).await;
    let again = open(&client, &daemon, echo.addr).await;
    assert_eq!(echo_all(&again, &[b"again".to_vec()], 1).await.len(), 1);
    again.close().await;
    daemon.stop().await;
}
