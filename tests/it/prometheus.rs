//! `/metrics` (OpenMetrics, parsed by prometheus_client's Python parser) after known traffic
//! through real tunnels, on the plain scrape listener and on the mTLS port; JSON and text log
//! lines of the real binary, control characters from the network escaped in both; the
//! shutdown summary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use godoxy_agent::protocol::TunnelHeader;
use godoxy_agent::{Config, Stats, Transport};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::common::{Running, TcpEcho, TestDaemon, TestPki, UdpEcho, agent, curl, pattern, run};
use crate::proxy::peers::{closed_port, peers_dir, python};

const HANDSHAKE: Duration = Duration::from_secs(5);
/// A destination no rule accepts, with a newline and an ANSI colour sequence in it.
const EVIL_HOST: &str = "evil\n\x1b[31mhost";
/// The common name of a client certificate, likewise.
const EVIL_CN: &str = "client\n\x1b[2Jname";

/// A set whose client certificate's common name is [`EVIL_CN`] (keys as PKCS#8, which the
/// agent reads as well as SEC1).
fn pki_with_evil_client() -> TestPki {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };
    let name = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "GoDoxy");
        dn.push(DnType::CommonName, cn);
        dn
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name = name("test ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = |cn: &str, eku| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["godoxy.agent".to_owned()]).unwrap();
        params.distinguished_name = name(cn);
        params.extended_key_usages = vec![eku];
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("godoxy.agent", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf(EVIL_CN, ExtendedKeyUsagePurpose::ClientAuth);
    let set = godoxy_agent::certs::CertSet {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    };
    let dir = tempfile::tempdir().unwrap();
    set.write(dir.path(), false).unwrap();
    TestPki { dir, set }
}

fn header_to(addr: SocketAddr) -> TunnelHeader {
    TunnelHeader::new(&addr.ip().to_string(), &addr.port().to_string(), 0).unwrap()
}

/// One parsed sample.
#[derive(Debug, Clone)]
struct Sample {
    family: String,
    kind: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Samples of an exposition, through prometheus_client's OpenMetrics parser.
async fn parse(exposition: &[u8]) -> Vec<Sample> {
    let mut child = Command::new(python())
        .arg(peers_dir().join("parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(exposition).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("parser did not finish")
        .unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(exposition)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            Sample {
                family: v["family"].as_str().unwrap().to_owned(),
                kind: v["type"].as_str().unwrap().to_owned(),
                name: v["name"].as_str().unwrap().to_owned(),
                labels: v["labels"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect(),
                value: v["value"].as_f64().unwrap(),
            }
        })
        .collect()
}

/// The value of the sample `name` with exactly `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && s.labels == want)
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
    found[0].value
}

/// `curl http://addr/metrics`: the body and the content type.
async fn scrape_plain(addr: SocketAddr) -> (Vec<u8>, String) {
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "5", "-D", "-"])
        .arg(format!("http://{addr}/metrics")))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = out.stdout;
    let split = text.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&text[..split]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap();
    (text[split + 4..].to_vec(), content_type)
}

/// Polls until `done` (tunnels end in their own tasks after the client has its bytes).
async fn settle(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn scrape_counts_known_traffic_exactly() {
    let pki = TestPki::new();
    let text = TestDaemon::config_text_with_udp(&pki, "127.0.0.1:0", "")
        + &format!(
            "[prometheus]\nlisten = \"127.0.0.1:0\"\nmtls = true\n\
             [docker]\nsocket = \"{}\"\n",
            pki.path("no-docker.sock").display()
        );
    let config = Config::from_toml(&text, None, |_| None).unwrap().0;
    let daemon = TestDaemon::start_config(config).await;
    let scrape_addr = daemon.prometheus.expect("scrape listener bound");
    let echo = TcpEcho::start().await;
    let udp_echo = UdpEcho::start().await;
    let client = pki.client();

    // Three TCP tunnels through the echo: 1000, 2000, 3000 bytes each way.
    for (i, len) in [1000usize, 2000, 3000].into_iter().enumerate() {
        let mut tls = client
            .open_tunnel(daemon.addr, &header_to(echo.addr))
            .await
            .unwrap();
        let data = pattern(len, i as u64);
        tls.write_all(&data).await.unwrap();
        tls.shutdown().await.unwrap();
        let mut back = Vec::new();
        tls.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data);
    }
    // One to a closed port (dial_failed), one to a destination the rule refuses (rejected).
    let dead: SocketAddr = ([127, 0, 0, 1], closed_port()).into();
    let refused = TunnelHeader::new(EVIL_HOST, "80", 0).unwrap();
    for header in [header_to(dead), refused] {
        let mut tls = client.open_tunnel(daemon.addr, &header).await.unwrap();
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest).await;
    }
    // Two UDP sessions: 3 datagrams of 100 bytes and 2 of 50, echoed, then close_notify.
    for (count, len) in [(3usize, 100usize), (2, 50)] {
        let tunnel = client
            .open_udp(daemon.udp.unwrap(), &header_to(udp_echo.addr), HANDSHAKE)
            .await
            .unwrap();
        let mut buf = godoxy_agent::client::UdpTunnel::buffer();
        for k in 0..count {
            tunnel.send(&pattern(len, k as u64)).await.unwrap();
            let n = tunnel.recv(&mut buf, HANDSHAKE).await.unwrap().unwrap();
            assert_eq!(n, len);
        }
        tunnel.close().await;
    }
    // A client without a certificate: one failed TLS handshake.
    let mut no_cert = pki.client_without_cert().connect_stream(daemon.addr).await;
    if let Ok(tls) = &mut no_cert {
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest).await;
    }
    // One Docker API call (no engine: 502) and one HTTP-route call without a target (400).
    let docker = curl(&pki, Some(&pki), daemon.addr, "/version").await;
    let proxy = curl(&pki, Some(&pki), daemon.addr, "/godoxy/agent/proxy/http/").await;
    let status = |out: &std::process::Output| {
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let last = text.lines().last().unwrap().to_owned();
        last.split(' ').next().unwrap().to_owned()
    };
    let (docker_status, proxy_status) = (status(&docker), status(&proxy));
    assert_eq!(docker_status, "502");
    assert_eq!(proxy_status, "400");

    let stats = daemon.stats.clone();
    let closed = move |t: Transport| Stats::get(&stats.tunnels_closed[t.index()]);
    settle("5 TCP and 2 UDP tunnels closed", || {
        closed(Transport::Tcp) == 5
            && closed(Transport::Udp) == 2
            && Stats::get(&daemon.stats.udp_sessions) == 0
            && Stats::get(&daemon.stats.tls_handshake_failures) == 1
    })
    .await;

    let (body, content_type) = scrape_plain(scrape_addr).await;
    assert_eq!(
        content_type.trim(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let s = parse(&body).await;
    let tcp = [("transport", "tcp")];
    let udp = [("transport", "udp")];
    let closed_with = |t: &str, r: &str| {
        value(
            &s,
            "godoxy_agent_tunnels_closed_total",
            &[("transport", t), ("reason", r)],
        )
    };
    assert_eq!(value(&s, "godoxy_agent_tunnels_opened_total", &tcp), 5.0);
    assert_eq!(value(&s, "godoxy_agent_tunnels_opened_total", &udp), 2.0);
    assert_eq!(closed_with("tcp", "eof"), 3.0);
    assert_eq!(closed_with("tcp", "dial_failed"), 1.0);
    assert_eq!(closed_with("tcp", "rejected"), 1.0);
    assert_eq!(closed_with("udp", "closed"), 2.0);
    let closed_samples = s
        .iter()
        .filter(|x| x.name == "godoxy_agent_tunnels_closed_total")
        .count();
    assert_eq!(closed_samples, 4, "only the reasons seen appear");
    assert_eq!(value(&s, "godoxy_agent_tunnels_open", &tcp), 0.0);
    assert_eq!(value(&s, "godoxy_agent_tunnels_open", &udp), 0.0);
    let bytes = |t: &str, d: &str| {
        value(
            &s,
            "godoxy_agent_tunnel_bytes_total",
            &[("transport", t), ("direction", d)],
        )
    };
    assert_eq!(bytes("tcp", "up"), 6000.0);
    assert_eq!(bytes("tcp", "down"), 6000.0);
    assert_eq!(bytes("udp", "up"), 400.0);
    assert_eq!(bytes("udp", "down"), 400.0);
    assert_eq!(
        value(&s, "godoxy_agent_dial_duration_seconds_count", &tcp),
        3.0
    );
    assert_eq!(
        value(&s, "godoxy_agent_dial_duration_seconds_count", &udp),
        2.0
    );
    let inf = value(
        &s,
        "godoxy_agent_dial_duration_seconds_bucket",
        &[("transport", "tcp"), ("le", "+Inf")],
    );
    assert_eq!(inf, 3.0);
    assert_eq!(value(&s, "godoxy_agent_handshakes_total", &udp), 2.0);
    assert_eq!(
        value(
            &s,
            "godoxy_agent_handshake_failures_total",
            &[("transport", "tcp"), ("reason", "no_client_cert")]
        ),
        1.0
    );
    // The 5 tunnels and the 2 curl calls.
    assert_eq!(value(&s, "godoxy_agent_handshakes_total", &tcp), 7.0);
    assert_eq!(
        value(
            &s,
            "godoxy_agent_http_requests_total",
            &[("route", "docker"), ("code", "502")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "godoxy_agent_http_requests_total",
            &[("route", "proxy"), ("code", "400")]
        ),
        1.0
    );
    for route in ["docker", "proxy"] {
        let count = value(
            &s,
            "godoxy_agent_http_request_duration_seconds_count",
            &[("route", route)],
        );
        assert_eq!(count, 1.0, "{route}");
    }
    assert_eq!(value(&s, "godoxy_agent_dtls_sessions", &[]), 0.0);
    for t in [tcp, udp] {
        assert_eq!(value(&s, "godoxy_agent_preauth_connections", &t), 0.0);
        assert_eq!(value(&s, "godoxy_agent_preauth_shed_total", &t), 0.0);
    }
    // The generated certificates are valid for centuries.
    for cert in ["server", "ca"] {
        let left = value(
            &s,
            "godoxy_agent_certificate_expiry_seconds",
            &[("certificate", cert)],
        );
        assert!(left > 100.0 * 365.0 * 86400.0, "{cert}: {left}");
    }
    let build = value(
        &s,
        "godoxy_agent_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("godoxy_api", "v0.31.0"),
        ],
    );
    assert_eq!(build, 1.0);
    let kinds: BTreeMap<&str, &str> = s
        .iter()
        .map(|x| (x.family.as_str(), x.kind.as_str()))
        .collect();
    assert_eq!(kinds["godoxy_agent_tunnels_closed"], "counter");
    assert_eq!(kinds["godoxy_agent_dial_duration_seconds"], "histogram");
    assert_eq!(kinds["godoxy_agent_tunnels_open"], "gauge");
    assert_eq!(kinds["godoxy_agent_build"], "info");

    // The same families on the mTLS port, for a client with a certificate; the scrape itself
    // is an HTTP request on that port, and the 2 earlier ones stay as they were.
    let out = curl(&pki, Some(&pki), daemon.addr, "/metrics").await;
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, tail) = text.rsplit_once('\n').unwrap();
    assert_eq!(
        tail,
        "200 application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let over_tls = parse(body.as_bytes()).await;
    let families = |s: &[Sample]| {
        s.iter()
            .map(|x| x.family.clone())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(families(&over_tls), families(&s));
    assert_eq!(
        value(&over_tls, "godoxy_agent_tunnels_opened_total", &tcp),
        5.0
    );
    assert_eq!(value(&over_tls, "godoxy_agent_handshakes_total", &tcp), 8.0);
    // Without a client certificate the port refuses the handshake.
    let out = curl(&pki, None, daemon.addr, "/metrics").await;
    assert!(!String::from_utf8_lossy(&out.stdout).contains("godoxy_agent_"));

    // The scrape listener serves /metrics only.
    let out = run(Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{scrape_addr}/other")))
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    daemon.stop().await;
}

#[tokio::test]
async fn metrics_on_the_tls_port_are_off_by_default() {
    let pki = TestPki::new();
    let text = TestDaemon::config_text(&pki, "")
        + &format!(
            "[docker]\nsocket = \"{}\"\n",
            pki.path("no-docker.sock").display()
        );
    let config = Config::from_toml(&text, None, |_| None).unwrap().0;
    let daemon = TestDaemon::start_config(config).await;
    assert!(daemon.prometheus.is_none());
    // /metrics is then an ordinary Docker API path, which docker.access = "godoxy" refuses.
    let out = curl(&pki, Some(&pki), daemon.addr, "/metrics").await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("godoxy_agent_"), "{text}");
    assert!(text.ends_with("403 application/json"), "{text}");
    daemon.stop().await;
}

/// Starts the binary with `log_format`, opens one echo tunnel (5 bytes) and one to
/// [`EVIL_HOST`], with a client certificate named [`EVIL_CN`]; stops it with SIGTERM and
/// returns every stderr line.
async fn binary_log(log_format: &str, json: bool) -> Vec<String> {
    let pki = pki_with_evil_client();
    let config = pki.path("agent.toml");
    let text = TestDaemon::config_text(&pki, "")
        + &format!("[log]\nformat = \"{log_format}\"\n[metrics]\nenabled = false\n");
    std::fs::write(&config, text).unwrap();
    let echo = TcpEcho::start().await;
    let mut agent = Running::start(&config);
    let listening = agent.wait_for(&["agent listening"]).await;
    let addr: SocketAddr = if json {
        let v: Value = serde_json::from_str(&listening).unwrap();
        v["tcp"].as_str().unwrap().parse().unwrap()
    } else {
        crate::common::field(&listening, "tcp").parse().unwrap()
    };
    let client = pki.client();
    let mut tls = client
        .open_tunnel(addr, &header_to(echo.addr))
        .await
        .unwrap();
    tls.write_all(b"hello").await.unwrap();
    tls.shutdown().await.unwrap();
    let mut back = Vec::new();
    tls.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hello");
    agent.wait_for(&["tunnel closed", "eof"]).await;
    let refused = TunnelHeader::new(EVIL_HOST, "80", 0).unwrap();
    let mut tls = client.open_tunnel(addr, &refused).await.unwrap();
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest).await;
    agent.wait_for(&["tunnel closed", "rejected"]).await;
    let pid = agent.child.id().unwrap().to_string();
    let out = run(Command::new("kill").args(["-TERM", &pid])).await;
    assert!(out.status.success());
    agent.wait_for(&["shutdown complete"]).await;
    let status = tokio::time::timeout(Duration::from_secs(5), agent.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    agent.log.clone()
}

#[tokio::test]
async fn json_log_lines_have_the_documented_fields() {
    let lines = binary_log("json", true).await;
    let all = lines.join("\n");
    assert!(
        !all.contains('\x1b'),
        "a raw escape reached the log:\n{all}"
    );
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for e in &events {
        assert!(e["timestamp"].is_string() && e["level"].is_string(), "{e}");
        assert!(e["message"].is_string(), "{e}");
    }
    let closed: Vec<&Value> = events
        .iter()
        .filter(|e| e["message"] == "tunnel closed")
        .collect();
    assert_eq!(closed.len(), 2, "{all}");
    let ok = closed.iter().find(|e| e["reason"] == "eof").unwrap();
    assert_eq!(ok["level"], "INFO");
    assert_eq!(ok["transport"], "tcp");
    assert_eq!(ok["up_bytes"], 5);
    assert_eq!(ok["down_bytes"], 5);
    assert!(ok["duration_ms"].is_u64());
    assert!(
        ok["destination"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(ok.get("err").is_none() && ok.get("up_datagrams").is_none());
    assert_eq!(ok["span"]["name"], "tcp");
    assert!(
        ok["span"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(ok["span"]["subject"], format!("O=GoDoxy, CN={EVIL_CN}"));
    let bad = closed.iter().find(|e| e["reason"] == "rejected").unwrap();
    assert_eq!(bad["level"], "WARN");
    // The destination as sent, control characters and all, inside a JSON string.
    assert_eq!(bad["destination"], format!("{EVIL_HOST}:80"));
    assert_eq!(
        bad["err"],
        "destination refused: host contains control bytes"
    );
    let raw = lines.iter().find(|l| l.contains("rejected")).unwrap();
    assert!(raw.contains(r"evil\n\u001b[31mhost:80"), "{raw}");
    let summary = events
        .iter()
        .find(|e| e["message"] == "shutdown complete")
        .unwrap();
    assert_eq!(summary["tcp_tunnels"], 2);
    assert_eq!(summary["udp_tunnels"], 0);
    assert_eq!(summary["up_bytes"], 5);
    assert_eq!(summary["down_bytes"], 5);
    assert_eq!(summary["tls_handshakes"], 2);
    assert!(summary["uptime_s"].is_u64());
}

#[tokio::test]
async fn text_log_escapes_control_characters() {
    let lines = binary_log("text", false).await;
    let all = lines.join("\n");
    assert!(
        !all.contains('\x1b'),
        "a raw escape reached the log:\n{all}"
    );
    let bad = lines
        .iter()
        .find(|l| l.contains("tunnel closed") && l.contains("reason=rejected"))
        .unwrap();
    assert!(bad.contains(r"destination=evil\n\x1b[31mhost:80 "), "{bad}");
    let summary = lines
        .iter()
        .find(|l| l.contains("shutdown complete"))
        .unwrap();
    assert_eq!(crate::common::field(summary, "tcp_tunnels"), "2");
    assert_eq!(crate::common::field(summary, "up_bytes"), "5");
}

#[tokio::test]
async fn check_config_prints_the_new_sections() {
    let pki = TestPki::new();
    let config = pki.path("agent.toml");
    let text = TestDaemon::config_text(&pki, "")
        + "[prometheus]\nlisten = \"127.0.0.1:9108\"\n[log]\nformat = \"json\"\n";
    std::fs::write(&config, text).unwrap();
    let out = run(agent().arg("check-config").arg("--config").arg(&config)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("[prometheus]\nlisten = \"127.0.0.1:9108\"\nmtls = false\n"),
        "{stdout}"
    );
    assert!(stdout.contains("[log]\nformat = \"json\"\n"), "{stdout}");
    // A bad value names the key.
    std::fs::write(&config, "[log]\nformat = \"xml\"\n").unwrap();
    let out = run(agent().arg("check-config").arg("--config").arg(&config)).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("format") && stderr.contains("xml"),
        "{stderr}"
    );
}

#[tokio::test]
async fn bytes_of_an_open_tunnel_show_before_it_closes() {
    let pki = TestPki::new();
    let text = TestDaemon::config_text(&pki, "") + "[prometheus]\nlisten = \"127.0.0.1:0\"\n";
    let config = Config::from_toml(&text, None, |_| None).unwrap().0;
    let daemon = TestDaemon::start_config(config).await;
    let echo = TcpEcho::start().await;
    let mut tls = pki
        .client()
        .open_tunnel(daemon.addr, &header_to(echo.addr))
        .await
        .unwrap();
    let data = pattern(777, 3);
    tls.write_all(&data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);
    // The client has the echo, so both directions were read by the relay (and counted).
    let (body, _) = scrape_plain(daemon.prometheus.unwrap()).await;
    let s = parse(&body).await;
    let tcp = |d| [("transport", "tcp"), ("direction", d)];
    assert_eq!(
        value(&s, "godoxy_agent_tunnel_bytes_total", &tcp("up")),
        777.0
    );
    assert_eq!(
        value(&s, "godoxy_agent_tunnel_bytes_total", &tcp("down")),
        777.0
    );
    assert_eq!(
        value(&s, "godoxy_agent_tunnels_open", &[("transport", "tcp")]),
        1.0
    );
    assert_eq!(
        s.iter()
            .filter(|x| x.name == "godoxy_agent_tunnels_closed_total")
            .count(),
        0
    );
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).await.unwrap();
    daemon.stop().await;
}
