//! The client commands (`probe`, `info`, `forward`) run as a user would, against the real agent.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{TcpEcho, TestDaemon, TestPki, UdpEcho, bin, pattern};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

async fn run(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn certs(pki: &TestPki) -> String {
    pki.dir.path().display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_passes_for_both_transports() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let server = daemon.addr.to_string();
    // The UDP port is another ephemeral port in the tests; probe each on its own.
    let (code, out, err) = run(&[
        "probe",
        "--server",
        &server,
        "--tcp",
        "--certs",
        &certs(&pki),
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("tcp  ok "), "{out}");
    let udp = daemon.udp.unwrap().to_string();
    let (code, out, err) =
        run(&["probe", "--server", &udp, "--udp", "--certs", &certs(&pki)]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("udp  ok "), "{out}");
    assert_eq!(daemon.dials(), 0, "a probe dialed");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_all_on_one_port_and_failures_exit_1() {
    let pki = TestPki::new();
    // Both listeners on the same port number, as in production.
    let port = free_port_pair().await;
    let text = TestDaemon::config_text_with_udp(&pki, &format!("127.0.0.1:{port}"), "").replace(
        "tcp = \"127.0.0.1:0\"",
        &format!("tcp = \"127.0.0.1:{port}\""),
    );
    let config = godoxy_agent::Config::from_toml(&text, None, |_| None)
        .unwrap()
        .0;
    let daemon = TestDaemon::start_config(config).await;
    let server = format!("127.0.0.1:{port}");
    let (code, out, _) = run(&["probe", "--server", &server, "--certs", &certs(&pki)]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("tcp  ok ") && out.contains("udp  ok "),
        "{out}"
    );

    // A client certificate from another CA: refused, exit 1, the reason printed.
    let other = TestPki::new();
    let (code, out, _) = run(&[
        "probe",
        "--server",
        &server,
        "--timeout",
        "3s",
        "--ca",
        &pki.path("ca.pem").display().to_string(),
        "--cert",
        &other.path("client.pem").display().to_string(),
        "--key",
        &other.path("client.key").display().to_string(),
    ])
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("tcp  FAIL") && out.contains("udp  FAIL"),
        "{out}"
    );
    assert!(
        out.to_lowercase().contains("alert") || out.contains("timed out"),
        "{out}"
    );
    daemon.stop().await;

    // Nothing listening: refused.
    let (code, out, _) = run(&[
        "probe",
        "--server",
        &server,
        "--tcp",
        "--certs",
        &certs(&pki),
    ])
    .await;
    assert_eq!(code, 1);
    assert!(
        out.contains("tcp  FAIL") && out.contains("refused"),
        "{out}"
    );
}

/// A port number free for both TCP and UDP on 127.0.0.1.
pub async fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_reports_what_godoxy_checks() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await; // UDP disabled
    let server = daemon.addr.to_string();
    let (code, out, err) = run(&[
        "info",
        "--server",
        &server,
        "--certs",
        &certs(&pki),
        "--timeout",
        "2s",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("name:     test-agent"), "{out}");
    assert!(out.contains("version:  v0.31.0"), "{out}");
    assert!(out.contains("runtime:  docker"), "{out}");
    assert!(out.contains("tcp:      supported ("), "{out}");
    assert!(out.contains("udp:      not supported"), "{out}");
    let (code, out, _) = run(&[
        "info",
        "--server",
        &server,
        "--certs",
        &certs(&pki),
        "--json",
        "--timeout",
        "2s",
    ])
    .await;
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["name"], "test-agent");
    assert_eq!(json["tcp"]["supported"], true);
    assert_eq!(json["udp"]["supported"], false);
    daemon.stop().await;
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_forward(args: &[String]) -> Killed {
    Killed(
        Command::new(bin())
            .arg("forward")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn free_local(udp: bool) -> SocketAddr {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_forward_echoes() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let echo = TcpEcho::start().await;
    let listen = free_local(false);
    let _fwd = spawn_forward(&[
        "--server".into(),
        daemon.addr.to_string(),
        "--listen".into(),
        listen.to_string(),
        "--target".into(),
        echo.addr.to_string(),
        "--certs".into(),
        certs(&pki),
    ]);
    let started = Instant::now();
    let mut conn = loop {
        match TcpStream::connect(listen).await {
            Ok(c) => break c,
            Err(_) if started.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("forward never listened: {e}"),
        }
    };
    let data = pattern(200_000, 3);
    conn.write_all(&data).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert!(back == data, "echo differs ({} bytes)", back.len());
    assert_eq!(echo.accepted(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_forward_echoes() {
    let pki = TestPki::new();
    // The forwarded session stays open until the forwarder goes idle: a short grace ends it.
    let daemon = TestDaemon::start_udp(&pki, "shutdown_grace = \"500ms\"").await;
    let echo = UdpEcho::start().await;
    let listen = free_local(true);
    let _fwd = spawn_forward(&[
        "--udp".into(),
        "--server".into(),
        daemon.udp.unwrap().to_string(),
        "--listen".into(),
        listen.to_string(),
        "--target".into(),
        echo.addr.to_string(),
        "--certs".into(),
        certs(&pki),
    ]);
    let local = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    local.connect(listen).await.unwrap();
    let mut buf = vec![0u8; 9000];
    // The first datagrams may go out before the forwarder is listening: retry until one echoes.
    let started = Instant::now();
    loop {
        local.send(b"first").await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), local.recv(&mut buf)).await
        {
            assert_eq!(&buf[..n], b"first");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no echo through the UDP forward"
        );
    }
    for i in 0..50u64 {
        let datagram = pattern(1 + (i as usize * 97) % 1400, i);
        local.send(&datagram).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), local.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], &datagram[..], "datagram {i}");
    }
    // One DTLS session served this local client.
    assert_eq!(daemon.stat(|s| &s.udp_handshakes), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_needs_no_client_certificate() {
    let pki = TestPki::new();
    let port = free_port_pair().await;
    let text = TestDaemon::config_text_with_udp(&pki, &format!("127.0.0.1:{port}"), "").replace(
        "tcp = \"127.0.0.1:0\"",
        &format!("tcp = \"127.0.0.1:{port}\""),
    );
    let file = pki.path("agent.toml");
    std::fs::write(&file, &text).unwrap();
    let config = godoxy_agent::Config::from_toml(&text, None, |_| None)
        .unwrap()
        .0;
    let daemon = TestDaemon::start_config(config).await;
    let file = file.display().to_string();
    let (code, out, err) = run(&["health", "--config", &file]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("tcp  ok ") && out.contains("udp  ok "),
        "{out}"
    );
    assert!(out.contains("client certificate required"), "{out}");
    assert_eq!(daemon.dials(), 0);
    daemon.stop().await;
    let (code, out, _) = run(&["health", "--config", &file, "--timeout", "1s"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("tcp  FAIL") && out.contains("udp  FAIL"),
        "{out}"
    );
}

/// SIGTERM to `forward --udp` closes every session with close_notify: the agent's session
/// count drops to 0 at once, not after its idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_forward_drains_its_sessions_on_sigterm() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "udp_idle_timeout = \"120s\"").await;
    let echo = UdpEcho::start().await;
    let listen = free_local(true);
    let fwd = spawn_forward(&[
        "--udp".into(),
        "--server".into(),
        daemon.udp.unwrap().to_string(),
        "--listen".into(),
        listen.to_string(),
        "--target".into(),
        echo.addr.to_string(),
        "--certs".into(),
        certs(&pki),
    ]);
    let mut clients = Vec::new();
    for i in 0..20u64 {
        let local = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        local.connect(listen).await.unwrap();
        let mut buf = [0u8; 64];
        let started = Instant::now();
        loop {
            local.send(&i.to_be_bytes()).await.unwrap();
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(500), local.recv(&mut buf)).await
            {
                assert_eq!(&buf[..n], &i.to_be_bytes());
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "client {i}: no echo"
            );
        }
        clients.push(local);
    }
    assert_eq!(daemon.stat(|s| &s.udp_sessions), 20);

    let pid = fwd.0.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let started = Instant::now();
    while daemon.stat(|s| &s.udp_sessions) > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{} sessions still open 1 s after SIGTERM",
            daemon.stat(|s| &s.udp_sessions)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("20 sessions closed {:?} after SIGTERM", started.elapsed());
    daemon.stop().await;
}

/// SIGTERM to a TCP `forward`: the open tunnel is closed cleanly both ways and the forwarder
/// exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_forward_closes_its_tunnels_on_sigterm() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let echo = TcpEcho::start().await;
    let listen = free_local(false);
    let mut fwd = spawn_forward(&[
        "--server".into(),
        daemon.addr.to_string(),
        "--listen".into(),
        listen.to_string(),
        "--target".into(),
        echo.addr.to_string(),
        "--certs".into(),
        certs(&pki),
    ]);
    let started = Instant::now();
    let mut conn = loop {
        match TcpStream::connect(listen).await {
            Ok(c) => break c,
            Err(_) if started.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("forward never listened: {e}"),
        }
    };
    conn.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    conn.read_exact(&mut back).await.unwrap();
    let kill = Command::new("kill")
        .args(["-TERM", &fwd.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), conn.read_to_end(&mut rest))
        .await
        .expect("local connection not closed within 2 s of SIGTERM")
        .unwrap();
    assert!(rest.is_empty());
    let status = tokio::task::spawn_blocking(move || fwd.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    daemon.stop().await;
}
