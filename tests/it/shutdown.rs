//! Graceful shutdown: listeners close at once, open tunnels get `shutdown_grace`, then the rest
//! are closed and `run` returns Ok.

use std::time::{Duration, Instant};

use crate::common::{TcpEcho, TestDaemon, TestPki, UdpEcho};
use godoxy_agent::client::UdpTunnel;
use godoxy_agent::protocol::TunnelHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn header_to(addr: std::net::SocketAddr) -> TunnelHeader {
    TunnelHeader::new(&addr.ip().to_string(), &addr.port().to_string(), 0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_finish_within_grace_then_the_rest_are_closed() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "shutdown_grace = \"1500ms\"").await;
    let tcp_echo = TcpEcho::start().await;
    let udp_echo = UdpEcho::start().await;
    let client = pki.client();
    let mut tcp = client
        .open_tunnel(daemon.addr, &header_to(tcp_echo.addr))
        .await
        .unwrap();
    let udp = client
        .open_udp(
            daemon.udp.unwrap(),
            &header_to(udp_echo.addr),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let mut buf = UdpTunnel::buffer();
    udp.send(b"before").await.unwrap();
    assert_eq!(
        udp.recv(&mut buf, Duration::from_secs(5)).await.unwrap(),
        Some(6)
    );

    let addr = daemon.addr;
    let started = Instant::now();
    daemon.begin_stop();
    // New connections are refused at once...
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the TLS port still accepts after shutdown began");
    // ...while open tunnels keep working during the grace period.
    tcp.write_all(b"during grace").await.unwrap();
    let mut got = [0u8; 12];
    tcp.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"during grace");
    udp.send(b"during").await.unwrap();
    assert_eq!(
        udp.recv(&mut buf, Duration::from_secs(5)).await.unwrap(),
        Some(6)
    );

    // After the grace period both are closed and run() returns Ok.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "TCP tunnel still open 5 s after shutdown began"
    );
    let closed = udp.recv(&mut buf, Duration::from_secs(5)).await;
    assert!(
        matches!(closed, Ok(None)),
        "UDP session not closed: {closed:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "closed after {took:?}, grace 1.5 s"
    );
    daemon.finish(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn idle_daemon_stops_at_once() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "shutdown_grace = \"10s\"").await;
    let started = Instant::now();
    daemon.stop().await;
    assert!(started.elapsed() < Duration::from_secs(1));
}
