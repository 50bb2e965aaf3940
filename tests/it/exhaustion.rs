//! Strangers cannot exhaust the agent's handshakes (issue 11): floods of connections and DTLS
//! handshakes that never authenticate, from one address and from many, against the real
//! binary, while a legitimate client probes from another address with a 1 s deadline. Each
//! test prints the probes' latencies and the log bytes the attack caused, the figures of
//! docs/SECURITY.md (`cargo test --test it exhaustion -- --nocapture`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UdpSocket};
use tokio::process::Command;

use crate::common::{
    Running, TestPki, agent, capture_client_hello, field, stalled_handshake, tcp_from,
};

/// The legitimate client's deadline: the "succeeds during the attack within 1 s".
const PROBE_WITHIN: Duration = Duration::from_secs(1);

/// The real agent, logging at the default level, on 127.0.0.1 with TCP and UDP.
async fn start_agent(pki: &TestPki) -> (Running, SocketAddr, SocketAddr) {
    let config = pki.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"exhaustion\"\n[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"127.0.0.1:0\"\n\
             [docker]\naccess = \"off\"\n[metrics]\nenabled = false\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
        ),
    )
    .unwrap();
    let mut cmd = agent();
    cmd.arg("run").arg("--config").arg(&config);
    let mut running = Running::spawn(cmd);
    let listening = running.wait_for(&["agent listening"]).await;
    let tcp = field(&listening, "tcp").parse().unwrap();
    let udp = field(&listening, "udp").parse().unwrap();
    (running, tcp, udp)
}

/// Whether a log line is one the attack caused: not the legitimate client's probes (one line
/// each) and not the shutdown's own lines, which any stop writes.
fn caused_by_attack(line: &str) -> bool {
    !(line.contains("reason=probe")
        || line.contains("shutdown requested")
        || line.contains("listeners closed")
        || line.contains("shutdown complete"))
}

/// SIGTERM, then the log from `from` on up to the closing line: (lines, bytes of the lines the
/// attack caused).
async fn stop_and_log(mut running: Running, from: usize) -> (Vec<String>, usize) {
    let pid = running.child.id().unwrap().to_string();
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(&pid)
        .output()
        .await
        .unwrap();
    assert!(kill.status.success());
    running.wait_for(&["shutdown complete"]).await;
    let lines = running.log[from..].to_vec();
    let bytes = lines
        .iter()
        .filter(|l| caused_by_attack(l))
        .map(|l| l.len() + 1)
        .sum();
    let all = running.log.join("\n");
    assert!(!all.contains("panicked"), "{all}");
    (lines, bytes)
}

/// Raises this process's open-file limit for thousands of attacker sockets.
fn room_for_sockets(n: u64) {
    let _ = rlimit::increase_nofile_limit(n + 512);
}

/// The loopback address of attacker `i` of `sources` (127.0.0.2 for one source).
fn attacker(i: usize, sources: usize) -> String {
    if sources == 1 {
        "127.0.0.2".to_owned()
    } else {
        format!("127.0.{}.{}", 2 + i % sources / 250, 1 + i % sources % 250)
    }
}

/// Probes `what` every 100 ms while `attack` runs, each within [`PROBE_WITHIN`]; returns the
/// latencies. Every probe must pass.
async fn probe_during<F, P>(
    attack: tokio::task::JoinHandle<F>,
    mut probe: impl FnMut() -> P,
) -> (F, Vec<Duration>)
where
    F: Send + 'static,
    P: Future<Output = anyhow::Result<Duration>>,
{
    let mut latencies = Vec::new();
    while !attack.is_finished() {
        let started = Instant::now();
        match probe().await {
            Ok(_) => latencies.push(started.elapsed()),
            Err(err) => panic!("legitimate probe failed during the attack: {err:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And once with the attack's connections still held.
    let started = Instant::now();
    probe()
        .await
        .unwrap_or_else(|e| panic!("legitimate probe failed after the attack: {e:#}"));
    latencies.push(started.elapsed());
    (attack.await.unwrap(), latencies)
}

fn summary(latencies: &[Duration]) -> String {
    let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    format!(
        "{} probes, median {:.1} ms, max {:.1} ms",
        ms.len(),
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    )
}

/// 4000 TCP connections that never send a byte, from `sources` addresses, opened as fast as
/// the machine allows and held; a legitimate TCP probe from 127.0.0.1 passes throughout.
async fn silent_tcp_flood(sources: usize) {
    room_for_sockets(4000);
    let pki = TestPki::new();
    let (running, tcp, _) = start_agent(&pki).await;
    let quiet_from = running.log.len();
    let attack = tokio::spawn(async move {
        let mut held: Vec<TcpStream> = Vec::new();
        let mut failed = 0usize;
        for i in 0..4000 {
            match tcp_from(&attacker(i, sources), tcp).await {
                Ok(stream) => held.push(stream),
                Err(_) => failed += 1,
            }
            if i % 200 == 199 {
                tokio::task::yield_now().await;
            }
        }
        (held, failed)
    });
    let client = pki.client();
    let ((held, failed), latencies) =
        probe_during(attack, || client.probe_tcp(tcp, PROBE_WITHIN)).await;
    drop(held);
    let (lines, log_bytes) = stop_and_log(running, quiet_from).await;
    let report = lines
        .iter()
        .find(|l| l.contains("unauthenticated peers") && field(l, "transport") == "TLS")
        .unwrap_or_else(|| panic!("no aggregate TLS line:\n{}", lines.join("\n")));
    let summary_line = lines
        .iter()
        .find(|l| l.contains("shutdown complete"))
        .unwrap();
    eprintln!(
        "silent TCP flood, 4000 connections from {sources} source(s) ({failed} connects failed): \
         legitimate probe {}; {} log lines, {log_bytes} bytes caused by the attack ({:.1} per \
         connection)\n  {report}\n  {summary_line}",
        summary(&latencies),
        lines.len(),
        log_bytes as f64 / 4000.0,
    );
    // One aggregate line per interval, not a line per connection.
    assert!(lines.len() < 40, "{}", lines.join("\n"));
    if sources == 1 {
        // Once the pool is half full, one source's connections beyond its 16 are closed at
        // once: it never holds more than half the pool.
        assert!(
            field(report, "source_full").parse::<u64>().unwrap() > 2000,
            "{report}"
        );
    } else {
        // Many sources fill the pool (1024): the oldest are shed.
        assert!(
            field(report, "shed").parse::<u64>().unwrap() > 1000,
            "{report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tcp_flood_from_one_address_does_not_block_a_probe() {
    silent_tcp_flood(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tcp_flood_from_many_addresses_is_shed() {
    silent_tcp_flood(500).await;
}

/// 256 DTLS handshakes that complete the cookie round and stall, then a trickle of one every
/// 20 ms for 3 s, from `sources` addresses; a legitimate DTLS probe from 127.0.0.1 passes
/// throughout. Also sent: cookie-less hellos from 1000 ports, which must hold nothing.
async fn stalled_dtls_flood(sources: usize) {
    room_for_sockets(1500);
    let pki = TestPki::new();
    let (running, _, udp) = start_agent(&pki).await;
    let quiet_from = running.log.len();
    let hello = capture_client_hello(&pki.client()).await;
    let hello_len = hello.len();
    let attack = tokio::spawn(async move {
        let mut held: Vec<UdpSocket> = Vec::new();
        let mut bytes = 0usize;
        // Cookie-less hellos (what a spoofed source sends): answered, nothing kept.
        let spoof = UdpSocket::bind("127.0.0.3:0").await.unwrap();
        for _ in 0..1000 {
            spoof.send_to(&hello, udp).await.unwrap();
            bytes += hello_len;
        }
        let mut i = 0;
        for _ in 0..256 {
            if let Some(s) =
                stalled_handshake(&attacker(i, sources), udp, &hello, Duration::from_secs(1)).await
            {
                held.push(s);
            }
            bytes += 2 * hello_len + 20;
            i += 1;
        }
        let trickle_until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < trickle_until {
            if let Some(s) =
                stalled_handshake(&attacker(i, sources), udp, &hello, Duration::from_secs(1)).await
            {
                held.push(s);
            }
            bytes += 2 * hello_len + 20;
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (held, i, bytes)
    });
    let client = pki.client();
    let ((held, attempts, attack_bytes), latencies) =
        probe_during(attack, || client.probe_udp(udp, PROBE_WITHIN)).await;
    let opened = held.len();
    drop(held);
    let (lines, log_bytes) = stop_and_log(running, quiet_from).await;
    let ratio = log_bytes as f64 / attack_bytes as f64;
    eprintln!(
        "stalled DTLS flood from {sources} source(s): {attempts} cookie rounds ({opened} \
         answered), 1000 cookie-less hellos, {attack_bytes} attacker bytes: legitimate probe \
         {}; {} log lines, {log_bytes} bytes caused by the attack: {ratio:.4} log bytes per \
         attacker byte",
        summary(&latencies),
        lines.len(),
    );
    for line in lines.iter().filter(|l| caused_by_attack(l)) {
        eprintln!("  {line}");
    }
    assert!(ratio < 0.01, "{ratio} log bytes per attacker byte");
    let report = lines
        .iter()
        .find(|l| l.contains("unauthenticated peers") && field(l, "transport") == "DTLS")
        .unwrap_or_else(|| panic!("no aggregate DTLS line:\n{}", lines.join("\n")));
    if sources == 1 {
        assert!(
            field(report, "source_full").parse::<u64>().unwrap() > 100,
            "{report}"
        );
    } else {
        assert!(
            field(report, "shed").parse::<u64>().unwrap() > 0,
            "{report}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_dtls_handshakes_from_one_address_do_not_block_a_probe() {
    stalled_dtls_flood(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_dtls_handshakes_from_many_addresses_are_shed() {
    stalled_dtls_flood(400).await;
}
