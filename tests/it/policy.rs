//! `[policy]`: what the agent may dial for a client. Every test runs on 127.0.0.1 and proves a
//! refusal where it matters: a live echo (or origin) on a denied loopback address sees no
//! connection and the daemon's dial counter stays at 0. Non-local destinations (metadata,
//! unspecified) are only ever named after a loopback refusal has shown that refusals happen
//! before dialing, so a regression fails there first and nothing is sent off the host.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::{Running, TcpEcho, TestDaemon, TestPki, UdpEcho, bin, field};
use godoxy_agent::Config;
use godoxy_agent::client::{ClientTls, UdpTunnel};
use godoxy_agent::protocol::TunnelHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(5);

/// Every way to write 127.0.0.1 that the system resolver understands, and `localhost`.
const LOOPBACK_SPELLINGS: &[&str] = &[
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f.1",
    "0x7f000001",
    "0177.0.0.1",
    "127.000.000.001",
    "::ffff:127.0.0.1",
    "localhost",
];

/// Every way to write the cloud metadata address, its IPv6 siblings and the unspecified
/// addresses: refused by the defaults.
const METADATA_SPELLINGS: &[&str] = &[
    "169.254.169.254",
    "0xa9.0xfe.0xa9.0xfe",
    "2852039166",
    "0251.0376.0251.0376",
    "169.254.43518",
    "::ffff:169.254.169.254",
    "fd00:ec2::254",
    "fe80::1",
    "100.100.100.200",
    "0.0.0.0",
    "0",
    "::",
];

/// Loopback denied in both families, so `localhost` has nowhere to go whatever it maps to.
const DENY_LOOPBACK: &str = "deny = [\"127.0.0.0/8\", \"::1\"]";

/// The daemon with `policy` under `[policy]`; with DTLS on 127.0.0.1:0 when `udp`.
async fn daemon(pki: &TestPki, udp: bool, policy: &str) -> TestDaemon {
    let udp = if udp { "127.0.0.1:0" } else { "" };
    let text = format!(
        "{}[policy]\n{policy}\n",
        TestDaemon::config_text_with_udp(pki, udp, "dial_timeout = \"2s\"")
    );
    let config = Config::from_toml(&text, None, |_| None).unwrap().0;
    TestDaemon::start_config(config).await
}

fn header(host: &str, port: u16) -> TunnelHeader {
    TunnelHeader::new(host, &port.to_string(), 0).unwrap()
}

/// A TCP tunnel to `host:port` that the agent must close without relaying anything.
async fn assert_tcp_refused(client: &ClientTls, daemon: &TestDaemon, host: &str, port: u16) {
    let mut tls = client
        .open_tunnel(daemon.addr, &header(host, port))
        .await
        .unwrap();
    let _ = tls.write_all(b"hello?").await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "{host}: tunnel left open");
    assert!(rest.is_empty(), "{host}: {} bytes came back", rest.len());
}

/// A TCP tunnel to `host:port` that must echo.
async fn assert_tcp_echoes(client: &ClientTls, daemon: &TestDaemon, host: &str, port: u16) {
    let mut tls = client
        .open_tunnel(daemon.addr, &header(host, port))
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(WAIT, tls.read_exact(&mut back))
        .await
        .unwrap_or_else(|_| panic!("{host}: no echo"))
        .unwrap_or_else(|e| panic!("{host}: {e}"));
    assert_eq!(&back, b"ping", "{host}");
}

/// A UDP session to `host:port` that the agent must close; `send` sends a datagram first
/// (never for a non-local destination).
async fn assert_udp_refused(
    client: &ClientTls,
    daemon: &TestDaemon,
    host: &str,
    port: u16,
    send: bool,
) {
    let tunnel = client
        .open_udp(daemon.udp.unwrap(), &header(host, port), WAIT)
        .await
        .unwrap();
    if send {
        let _ = tunnel.send(b"hello?").await;
    }
    let mut buf = UdpTunnel::buffer();
    let got = tunnel.recv(&mut buf, WAIT).await;
    assert!(
        matches!(got, Ok(None)),
        "{host}: session not closed ({got:?})"
    );
}

async fn assert_udp_echoes(client: &ClientTls, daemon: &TestDaemon, host: &str, port: u16) {
    let tunnel = client
        .open_udp(daemon.udp.unwrap(), &header(host, port), WAIT)
        .await
        .unwrap();
    tunnel.send(b"ping").await.unwrap();
    let mut buf = UdpTunnel::buffer();
    let n = tunnel
        .recv(&mut buf, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{host}: {e}"))
        .unwrap_or_else(|| panic!("{host}: closed"));
    assert_eq!(&buf[..n], b"ping", "{host}");
    tunnel.close().await;
}

// ---------------------------------------------------------------------------------------------
// Tunnels: every spelling, both transports.

#[tokio::test]
async fn tcp_tunnels_refuse_every_spelling_of_a_denied_range() {
    let pki = TestPki::new();
    let daemon = daemon(&pki, false, DENY_LOOPBACK).await;
    let echo = TcpEcho::start().await;
    let client = pki.client();
    for host in LOOPBACK_SPELLINGS {
        assert_tcp_refused(&client, &daemon, host, echo.addr.port()).await;
    }
    // Not a host name at all: refused before the resolver sees it.
    assert_tcp_refused(&client, &daemon, "[::ffff:127.0.0.1]", echo.addr.port()).await;
    assert_eq!(echo.accepted(), 0, "a denied destination was reached");
    assert_eq!(daemon.dials(), 0, "a denied destination was dialed");
    daemon.stop().await;
}

#[tokio::test]
async fn udp_sessions_refuse_every_spelling_of_a_denied_range() {
    let pki = TestPki::new();
    let daemon = daemon(&pki, true, DENY_LOOPBACK).await;
    let echo = UdpEcho::start().await;
    let client = pki.client();
    for host in LOOPBACK_SPELLINGS {
        assert_udp_refused(&client, &daemon, host, echo.addr.port(), true).await;
    }
    assert_eq!(echo.received(), 0, "a denied destination got a datagram");
    assert_eq!(daemon.dials(), 0, "a denied destination was dialed");
    daemon.stop().await;
}

/// The control: with the defaults, the same spellings reach the echo, so the refusals above
/// are the policy's doing and not a spelling the agent cannot dial.
#[tokio::test]
async fn the_same_spellings_pass_the_defaults() {
    let pki = TestPki::new();
    let daemon = daemon(&pki, true, "").await;
    let tcp = TcpEcho::start().await;
    let udp = UdpEcho::start().await;
    let client = pki.client();
    for host in LOOPBACK_SPELLINGS {
        assert_tcp_echoes(&client, &daemon, host, tcp.addr.port()).await;
        // UDP dials a name's first address: `localhost` may be ::1 first on other hosts.
        if *host != "localhost" {
            assert_udp_echoes(&client, &daemon, host, udp.addr.port()).await;
        }
    }
    assert_eq!(tcp.accepted(), LOOPBACK_SPELLINGS.len());
    daemon.stop().await;
}

#[tokio::test]
async fn metadata_and_unspecified_addresses_are_refused_by_default_over_tcp_and_udp() {
    let pki = TestPki::new();
    let daemon = daemon(&pki, true, DENY_LOOPBACK).await;
    let client = pki.client();
    // The guard: refusals come before any dial (a regression stops here, on loopback).
    let echo = TcpEcho::start().await;
    assert_tcp_refused(&client, &daemon, "127.1", echo.addr.port()).await;
    assert_udp_refused(&client, &daemon, "127.1", echo.addr.port(), false).await;
    assert_eq!((echo.accepted(), daemon.dials()), (0, 0));
    for host in METADATA_SPELLINGS {
        assert_tcp_refused(&client, &daemon, host, 80).await;
        assert_udp_refused(&client, &daemon, host, 53, false).await;
        assert_eq!(daemon.dials(), 0, "{host} was dialed");
    }
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Allow-list mode.

#[tokio::test]
async fn allow_list_mode_passes_only_the_listed_range() {
    let pki = TestPki::new();
    let inside = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let inside_addr = inside.local_addr().unwrap();
    let inside_count = serve_echo(inside);
    let udp_inside = udp_echo_on("127.0.0.2:0").await;
    let outside = TcpEcho::start().await; // on 127.0.0.1
    let udp_outside = UdpEcho::start().await;
    let daemon = daemon(&pki, true, "allow = [\"127.0.0.2/32\"]").await;
    let client = pki.client();

    assert_tcp_echoes(&client, &daemon, "127.0.0.2", inside_addr.port()).await;
    assert_udp_echoes(&client, &daemon, "127.0.0.2", udp_inside.port()).await;
    let dials = daemon.dials();
    assert_eq!(dials, 2);
    for host in ["127.0.0.1", "127.1", "localhost"] {
        assert_tcp_refused(&client, &daemon, host, outside.addr.port()).await;
        assert_udp_refused(&client, &daemon, host, udp_outside.addr.port(), true).await;
    }
    assert_eq!(inside_count.load(Ordering::SeqCst), 1);
    assert_eq!(outside.accepted(), 0);
    assert_eq!(udp_outside.received(), 0);
    assert_eq!(
        daemon.dials(),
        dials,
        "a destination outside the list was dialed"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn allow_list_entries_with_ports_and_names() {
    let pki = TestPki::new();
    let listed = TcpEcho::start().await;
    let other = TcpEcho::start().await;
    let named = TcpEcho::start().await;
    let policy = format!(
        "allow = [\"127.0.0.1:{}\", \"localhost:{}\"]",
        listed.addr.port(),
        named.addr.port()
    );
    let daemon = daemon(&pki, false, &policy).await;
    let client = pki.client();
    assert_tcp_echoes(&client, &daemon, "127.0.0.1", listed.addr.port()).await;
    // The port is not listed.
    assert_tcp_refused(&client, &daemon, "127.0.0.1", other.addr.port()).await;
    // A name entry lets the name through, not the address it resolves to.
    assert_tcp_echoes(&client, &daemon, "localhost", named.addr.port()).await;
    assert_tcp_refused(&client, &daemon, "127.0.0.1", named.addr.port()).await;
    assert_tcp_refused(&client, &daemon, "127.1", named.addr.port()).await;
    assert_eq!(
        (listed.accepted(), other.accepted(), named.accepted()),
        (1, 0, 1)
    );
    assert_eq!(daemon.dials(), 2);
    daemon.stop().await;
}

#[tokio::test]
async fn deny_wins_over_allow() {
    let pki = TestPki::new();
    let echo = TcpEcho::start().await;
    let policy = format!(
        "allow = [\"*\"]\ndeny = [\"127.0.0.1:{}\"]",
        echo.addr.port()
    );
    let daemon = daemon(&pki, false, &policy).await;
    assert_tcp_refused(&pki.client(), &daemon, "127.1", echo.addr.port()).await;
    assert_eq!((echo.accepted(), daemon.dials()), (0, 0));
    daemon.stop().await;
}

fn serve_echo(listener: TcpListener) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    count
}

async fn udp_echo_on(addr: &str) -> SocketAddr {
    let socket = UdpSocket::bind(addr).await.unwrap();
    let local = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], peer).await;
        }
    });
    local
}

// ---------------------------------------------------------------------------------------------
// The HTTP side: /proxy/http and /health.

/// A tiny HTTP origin answering `200 ok` to every request, counting its connections.
async fn http_origin() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (addr, count)
}

/// One request over the HTTP API: (status, body).
async fn http(
    client: &ClientTls,
    daemon: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut tls = client.connect_http(daemon).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut raw))
        .await
        .expect("no complete response within 10 s");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn proxy(client: &ClientTls, daemon: SocketAddr, scheme: &str, host: &str) -> (u16, String) {
    http(
        client,
        daemon,
        "/godoxy/agent/proxy/http/some/path",
        &[
            ("X-Proxy-Host", host),
            ("X-Proxy-Scheme", scheme),
            ("X-Proxy-Config", "e30="),
        ],
    )
    .await
}

async fn health(client: &ClientTls, daemon: SocketAddr, scheme: &str, host: &str) -> (u16, String) {
    let host: String = form_urlencoded::byte_serialize(host.as_bytes()).collect();
    let path = format!("/godoxy/agent/health?scheme={scheme}&host={host}&timeout=2000");
    http(client, daemon, &path, &[]).await
}

/// Whether an https client can name `host` in TLS (numeric spellings like `127.1` are neither
/// a DNS name nor an IP address there).
fn tls_name_ok(host: &str) -> bool {
    rustls_pki_types::ServerName::try_from(host).is_ok()
}

/// `host:port`, IPv6 in brackets as a URL authority writes it.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[tokio::test]
async fn proxy_requests_to_denied_destinations_answer_403() {
    let pki = TestPki::new();
    let daemon = daemon(&pki, false, DENY_LOOPBACK).await;
    let (origin, connections) = http_origin().await;
    let client = pki.client();
    for host in LOOPBACK_SPELLINGS {
        for scheme in ["http", "https", "h2c"] {
            let (status, body) = proxy(
                &client,
                daemon.addr,
                scheme,
                &authority(host, origin.port()),
            )
            .await;
            if scheme == "https" && !tls_name_ok(host) {
                // No TLS server name can be made of it: refused before any dial, policy or not.
                assert_eq!(status, 502, "{scheme}://{host}: {body}");
                assert!(
                    body.contains("invalid dns name"),
                    "{scheme}://{host}: {body}"
                );
                continue;
            }
            assert_eq!(status, 403, "{scheme}://{host}: {body}");
            assert!(body.contains("denied"), "{scheme}://{host}: {body}");
        }
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "a denied origin was reached"
    );
    // The defaults, after the guard above: metadata and unspecified, never dialed.
    for host in METADATA_SPELLINGS {
        let (status, body) = proxy(&client, daemon.addr, "http", &authority(host, 80)).await;
        assert_eq!(status, 403, "{host}: {body}");
    }
    daemon.stop().await;
}

/// The control: with the defaults, a numeric spelling reaches the origin through the policy's
/// resolver, for the proxy and for health checks alike.
#[tokio::test]
async fn allowed_spellings_reach_the_origin_through_the_resolver() {
    let pki = TestPki::new();
    let daemon = daemon(&pki, false, "").await;
    let (origin, connections) = http_origin().await;
    let client = pki.client();
    for host in ["127.1", "0x7f.1", "localhost", "::ffff:127.0.0.1"] {
        let (status, body) = proxy(
            &client,
            daemon.addr,
            "http",
            &authority(host, origin.port()),
        )
        .await;
        assert_eq!((status, body.as_str()), (200, "ok"), "{host}");
        let (status, body) = health(
            &client,
            daemon.addr,
            "http",
            &authority(host, origin.port()),
        )
        .await;
        assert_eq!(status, 200, "{host}: {body}");
        assert!(body.contains("\"healthy\":true"), "{host}: {body}");
        let (status, body) =
            health(&client, daemon.addr, "tcp", &authority(host, origin.port())).await;
        assert!(
            status == 200 && body.contains("\"healthy\":true"),
            "{host}: {body}"
        );
    }
    assert!(connections.load(Ordering::SeqCst) >= 12);
    daemon.stop().await;
}

#[tokio::test]
async fn health_checks_of_denied_targets_answer_403() {
    let pki = TestPki::new();
    let daemon = daemon(&pki, false, DENY_LOOPBACK).await;
    let (origin, connections) = http_origin().await;
    let udp = UdpEcho::start().await;
    let client = pki.client();
    for host in LOOPBACK_SPELLINGS {
        for scheme in ["tcp", "tcp4", "http", "https", "h2c"] {
            let (status, body) = health(
                &client,
                daemon.addr,
                scheme,
                &authority(host, origin.port()),
            )
            .await;
            if scheme == "https" && !tls_name_ok(host) {
                // Unhealthy before any dial: no TLS server name can be made of it.
                assert_eq!(status, 200, "{scheme} {host}: {body}");
                assert!(body.contains("invalid dns name"), "{scheme} {host}: {body}");
                continue;
            }
            assert_eq!(status, 403, "{scheme} {host}: {body}");
            assert!(body.contains("denied"), "{scheme} {host}: {body}");
        }
        let (status, body) = health(
            &client,
            daemon.addr,
            "udp",
            &authority(host, udp.addr.port()),
        )
        .await;
        assert_eq!(status, 403, "udp {host}: {body}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "a denied target was reached"
    );
    assert_eq!(udp.received(), 0);
    for host in METADATA_SPELLINGS {
        for scheme in ["tcp", "udp", "http"] {
            let (status, body) = health(&client, daemon.addr, scheme, &authority(host, 80)).await;
            assert_eq!(status, 403, "{scheme} {host}: {body}");
        }
    }
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The log, from the binary: names from a private /etc/hosts (scripts/with-hosts.sh).

/// `godoxy-agent run` under scripts/with-hosts.sh. The agent is the script's grandchild (the
/// script waits for `unshare`, which becomes the agent), so it is ended by its own pid.
struct HostsAgent {
    running: Running,
}

impl HostsAgent {
    fn start(config: &Path, hosts: &[&str]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/with-hosts.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(script)
            .args(hosts)
            .arg("--")
            .arg(bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for var in [
            "AGENT_NAME",
            "AGENT_PORT",
            "AGENT_CA_CERT",
            "AGENT_SSL_CERT",
            "AGENT_SKIP_CLIENT_CERT_CHECK",
            "RUNTIME",
            "DOCKER_SOCKET",
        ] {
            cmd.env_remove(var);
        }
        Self {
            running: Running::spawn(cmd),
        }
    }

    /// The agent's pid: the script's child.
    fn agent_pid(&self) -> Option<u32> {
        let script = self.running.child.id()?;
        let children =
            std::fs::read_to_string(format!("/proc/{script}/task/{script}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }
}

impl Drop for HostsAgent {
    fn drop(&mut self) {
        if let Some(pid) = self.agent_pid() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
}

fn agent_config(pki: &TestPki, policy: &str) -> PathBuf {
    let config = pki.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"policy-agent\"\n[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"\"\n\
             [docker]\naccess = \"off\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[policy]\n{policy}\n",
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
        ),
    )
    .unwrap();
    config
}

#[tokio::test]
async fn denials_are_logged_with_subject_name_and_address() {
    let pki = TestPki::new();
    let config = agent_config(&pki, DENY_LOOPBACK);
    let mut agent = HostsAgent::start(
        &config,
        &["loop.test=127.0.0.1", "meta.test=169.254.169.254"],
    );
    let listening = agent
        .running
        .wait_for(&["agent listening", "tcp=127.0.0.1:"])
        .await;
    let addr: SocketAddr = field(&listening, "tcp").parse().unwrap();
    let echo = TcpEcho::start().await;
    let port = echo.addr.port();
    let client = pki.client();
    // The client certificate's subject, as the connection's span carries it.
    let subject = "OU=Client";

    // A numeric spelling and a name, both meaning 127.0.0.1.
    for host in ["127.1", "loop.test"] {
        let mut tls = client.open_tunnel(addr, &header(host, port)).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
        let line = agent
            .running
            .wait_for(&["tunnel closed", "reason=denied"])
            .await;
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(subject), "no subject: {line}");
        assert!(!line.contains("subject=\"<none>\""), "{line}");
        assert_eq!(
            field(&line, "destination"),
            format!("{host}:{port}"),
            "{line}"
        );
        assert!(
            line.contains(&format!(
                "{host} -> 127.0.0.1 (deny entry \\\"127.0.0.0/8\\\")"
            )) || line.contains(&format!("{host} -> 127.0.0.1 (deny entry \"127.0.0.0/8\")")),
            "no address and rule: {line}"
        );
    }
    assert_eq!(echo.accepted(), 0);

    // A name the defaults refuse (it resolves to the metadata address), after the guard above.
    let mut tls = client
        .open_tunnel(addr, &header("meta.test", 80))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
    let line = agent
        .running
        .wait_for(&["tunnel closed", "reason=denied", "meta.test"])
        .await;
    assert!(line.contains(subject), "{line}");
    assert!(line.contains("169.254.169.254"), "{line}");
    assert!(line.contains("built-in deny"), "{line}");

    // The HTTP side: the same names, refused with 403 and a line each.
    let (status, body) = proxy(&client, addr, "http", &format!("loop.test:{port}")).await;
    assert_eq!(status, 403, "{body}");
    let line = agent.running.wait_for(&["proxy request denied"]).await;
    assert!(line.contains("WARN") && line.contains(subject), "{line}");
    assert!(
        line.contains("loop.test") && line.contains("127.0.0.1"),
        "{line}"
    );
    let (status, body) = health(&client, addr, "tcp", &format!("meta.test:{port}")).await;
    assert_eq!(status, 403, "{body}");
    let line = agent.running.wait_for(&["health check denied"]).await;
    assert!(line.contains("WARN") && line.contains(subject), "{line}");
    assert!(
        line.contains("meta.test") && line.contains("169.254.169.254"),
        "{line}"
    );
    assert_eq!(echo.accepted(), 0);
}

// ---------------------------------------------------------------------------------------------
// Configuration.

#[test]
fn bad_policy_entries_name_the_key_and_the_entry() {
    let text = "[policy]\nallow = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n\
                deny = [\"fd00::/8:53\", \"0x7f.1\"]\n";
    let errors = match Config::from_toml(text, None, |_| None) {
        Ok(_) => panic!("bad entries accepted"),
        Err(errors) => errors,
    };
    let message = errors.to_string();
    assert_eq!(errors.0.len(), 3, "{message}");
    assert!(
        message.contains("`policy.allow`: `10.0.0.0/33`: prefix length `33` is not 0-32"),
        "{message}"
    );
    assert!(
        message.contains(
            "`policy.deny`: `fd00::/8:53`: an IPv6 address with ports is written in brackets"
        ),
        "{message}"
    );
    assert!(
        message.contains("`policy.deny`: `0x7f.1`: a numeric spelling"),
        "{message}"
    );
    let text = "[policy]\nallow = []\nblock = [\"10.0.0.0/8\"]\n";
    let message = match Config::from_toml(text, None, |_| None) {
        Ok(_) => panic!("unknown key accepted"),
        Err(errors) => errors.to_string(),
    };
    assert!(message.contains("unknown field `block`"), "{message}");
    assert!(message.contains("line 3"), "{message}");
}

#[test]
fn policy_defaults() {
    let (config, _) = Config::from_toml("", None, |_| None).unwrap();
    assert!(config.policy.allow.is_empty());
    assert!(config.policy.deny.is_empty());
    assert!(config.policy.deny_link_local);
}
