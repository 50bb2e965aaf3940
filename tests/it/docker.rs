//! The Docker Engine API through the agent, against a real engine (podman's Docker API on a
//! unix socket, started by scripts/docker-engine.sh) and real clients: the docker CLI over
//! mTLS, curl, and our own HTTP client reading the event stream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Command;

use crate::common::{Running, TestDaemon, TestPki, run};

const IMAGE: &str = "localhost/godoxy-test:latest";

/// The engine's socket, started once for the whole test binary (and reused across runs).
pub fn engine() -> &'static Path {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker-engine");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/docker-engine.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg("start")
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running scripts/docker-engine.sh");
        assert!(
            out.status.success(),
            "scripts/docker-engine.sh start failed (the Docker API tests need podman, root):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The docker CLI straight on the engine socket (set-up and clean-up, not under test).
async fn docker_direct(args: &[&str]) -> Output {
    let mut cmd = Command::new("docker");
    cmd.arg("--host")
        .arg(format!("unix://{}", engine().display()))
        .args(args);
    run(&mut cmd).await
}

/// A running container of the test image (it prints "tick" every second), removed on drop.
struct Container {
    name: String,
}

impl Container {
    async fn start() -> Self {
        let name = unique("gda");
        let out =
            docker_direct(&["run", "-d", "--name", &name, "--stop-timeout", "1", IMAGE]).await;
        assert!(out.status.success(), "docker run: {}", text(&out.stderr));
        Self { name }
    }

    async fn remove(self) {
        let _ = docker_direct(&["rm", "-f", &self.name]).await;
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An in-process agent relaying to the engine with `docker` lines under `[docker]`.
async fn agent_for(pki: &TestPki, docker: &str) -> TestDaemon {
    TestDaemon::start_with(
        pki,
        &format!("[docker]\nsocket = \"{}\"\n{docker}", engine().display()),
    )
    .await
}

/// A folder as the docker CLI wants it for `--tlsverify`: ca.pem, cert.pem, key.pem.
fn docker_cert_dir(pki: &TestPki) -> PathBuf {
    let dir = pki.path("docker-certs");
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("client.pem", "cert.pem"),
        ("client.key", "key.pem"),
    ] {
        std::fs::copy(pki.path(from), dir.join(to)).unwrap();
    }
    dir
}

/// The docker CLI through the agent, as an operator points it at a GoDoxy agent: the name
/// godoxy.agent resolves to 127.0.0.1 in a private mount namespace.
async fn docker_via_agent(pki: &TestPki, addr: SocketAddr, args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/with-hosts.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .arg("godoxy.agent=127.0.0.1")
        .arg("--")
        .arg("docker")
        .args(args)
        .env("DOCKER_HOST", format!("tcp://godoxy.agent:{}", addr.port()))
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", docker_cert_dir(pki))
        .env("DOCKER_CONFIG", pki.path("docker-config"));
    run(&mut cmd).await
}

/// curl through the agent with the client certificate: `-X METHOD` and extra arguments;
/// stdout ends with `\n<status>`.
async fn curl_via_agent(
    pki: &TestPki,
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &[&str],
) -> (u16, String, String) {
    let port = addr.port();
    let mut cmd = Command::new("curl");
    cmd.arg("-sS")
        .arg("--max-time")
        .arg("8")
        .arg("--cacert")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("client.pem"))
        .arg("--key")
        .arg(pki.path("client.key"))
        .arg("--resolve")
        .arg(format!("godoxy.agent:{port}:127.0.0.1"))
        .arg("-X")
        .arg(method)
        .arg("-D")
        .arg("/dev/stderr")
        .args(extra)
        .arg("-w")
        .arg("\n%{http_code}")
        .arg(format!("https://godoxy.agent:{port}{path}"));
    let out = run(&mut cmd).await;
    let stdout = text(&out.stdout);
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (
        status.trim().parse().unwrap_or(0),
        body.to_owned(),
        text(&out.stderr),
    )
}

/// An HTTP/1.1 connection to the agent's API with the client certificate.
async fn http_via_agent(pki: &TestPki, addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let tls = pki.client().connect_http(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// An HTTP/1.1 connection straight to the engine socket.
async fn http_direct() -> SendRequest<Empty<Bytes>> {
    let unix = UnixStream::connect(engine()).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(unix))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn get(path: &str) -> hyper::Request<Empty<Bytes>> {
    hyper::Request::get(path)
        .header(hyper::header::HOST, "godoxy.agent")
        .body(Empty::new())
        .unwrap()
}

/// Event stream filter for one container, as GoDoxy asks for it (URL-encoded JSON).
fn events_path(container: &str) -> String {
    let filters = serde_json::json!({"type": ["container"], "container": [container]});
    let encoded: String = filters
        .to_string()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("/v1.41/events?filters={encoded}")
}

/// Reads events (one JSON object per line) from a streamed body into a channel with the
/// instant each arrived.
fn collect_events(
    body: Incoming,
) -> (
    tokio::sync::mpsc::UnboundedReceiver<(Instant, Value)>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut body = body;
        let mut pending = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let now = Instant::now();
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if let Ok(event) = serde_json::from_slice::<Value>(&line)
                    && tx.send((now, event)).is_err()
                {
                    return;
                }
            }
        }
    });
    (rx, task)
}

/// The first event with `action` within 10 s, and when it arrived.
async fn wait_event(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Instant, Value)>,
    action: &str,
) -> (Instant, Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((at, event))) if event["Action"] == action => return (at, event),
            Ok(Some(_)) => {}
            Ok(None) => panic!("event stream ended before a {action} event"),
            Err(_) => panic!("no {action} event within 10 s"),
        }
    }
}

#[tokio::test]
async fn docker_cli_works_through_the_agent() {
    let pki = TestPki::new();
    let daemon = agent_for(&pki, "").await;
    let container = Container::start().await;
    let name = container.name.as_str();

    let version = docker_via_agent(
        &pki,
        daemon.addr,
        &["version", "--format", "{{.Server.APIVersion}}"],
    )
    .await;
    assert!(
        version.status.success(),
        "docker version: {}",
        text(&version.stderr)
    );
    assert!(!text(&version.stdout).trim().is_empty());

    let ps = docker_via_agent(&pki, daemon.addr, &["ps", "-a", "--format", "{{.Names}}"]).await;
    assert!(ps.status.success(), "docker ps: {}", text(&ps.stderr));
    assert!(
        text(&ps.stdout).lines().any(|l| l == name),
        "{}",
        text(&ps.stdout)
    );

    let inspect = docker_via_agent(&pki, daemon.addr, &["inspect", name]).await;
    assert!(
        inspect.status.success(),
        "docker inspect: {}",
        text(&inspect.stderr)
    );
    let json: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        json[0]["Name"].as_str().map(|n| n.trim_start_matches('/')),
        Some(name)
    );

    // The image prints "tick" once a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = docker_via_agent(&pki, daemon.addr, &["logs", name]).await;
        assert!(logs.status.success(), "docker logs: {}", text(&logs.stderr));
        if text(&logs.stdout).contains("tick") {
            break;
        }
        assert!(Instant::now() < deadline, "no tick in the logs within 10 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let stop = docker_via_agent(&pki, daemon.addr, &["stop", name]).await;
    assert!(stop.status.success(), "docker stop: {}", text(&stop.stderr));
    let state = docker_direct(&["inspect", "--format", "{{.State.Running}}", name]).await;
    assert_eq!(text(&state.stdout).trim(), "false");

    let start = docker_via_agent(&pki, daemon.addr, &["start", name]).await;
    assert!(
        start.status.success(),
        "docker start: {}",
        text(&start.stderr)
    );
    let state = docker_direct(&["inspect", "--format", "{{.State.Running}}", name]).await;
    assert_eq!(text(&state.stdout).trim(), "true");

    container.remove().await;
    daemon.stop().await;
}

/// `GET /events` streams: each event comes through as the engine writes it (compared with
/// the same stream read straight from the socket), and a stream with nothing to say for
/// longer than the idle timeout is not cut.
#[tokio::test]
async fn events_stream_through_the_agent_as_they_happen() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_with(
        &pki,
        &format!(
            "[http]\nidle_timeout = \"1s\"\n[docker]\nsocket = \"{}\"",
            engine().display()
        ),
    )
    .await;
    let container = Container::start().await;
    let path = events_path(&container.name);

    let mut via_agent = http_via_agent(&pki, daemon.addr).await;
    let response = via_agent.send_request(get(&path)).await.unwrap();
    assert_eq!(response.status(), 200);
    let (mut agent_events, agent_stream) = collect_events(response.into_body());
    let mut direct = http_direct().await;
    let response = direct.send_request(get(&path)).await.unwrap();
    let (mut direct_events, direct_stream) = collect_events(response.into_body());

    // Longer than http.idle_timeout with no event: the stream stays open.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let stop = docker_direct(&["stop", &container.name]).await;
    assert!(stop.status.success(), "{}", text(&stop.stderr));
    let start = docker_direct(&["start", &container.name]).await;
    assert!(start.status.success(), "{}", text(&start.stderr));

    for action in ["die", "start"] {
        let (agent_at, event) = wait_event(&mut agent_events, action).await;
        let (direct_at, direct_event) = wait_event(&mut direct_events, action).await;
        assert_eq!(event["timeNano"], direct_event["timeNano"], "{event}");
        let behind = agent_at.saturating_duration_since(direct_at);
        eprintln!("{action} event: through the agent {behind:?} behind the socket");
        // A buffered (unflushed) stream would hold the event back until far more arrived.
        assert!(
            behind < Duration::from_millis(500),
            "{action} event {behind:?} late"
        );
    }
    // Walk away from both streams; the agent's side must notice and let the daemon stop.
    agent_stream.abort();
    direct_stream.abort();
    drop((via_agent, direct));
    container.remove().await;
    daemon.stop().await;
}

/// GoDoxy's client negotiates the API version from `_ping`'s Api-Version header.
#[tokio::test]
async fn ping_relays_the_api_version() {
    let pki = TestPki::new();
    let daemon = agent_for(&pki, "").await;
    let mut direct = http_direct().await;
    let engine_ping = direct.send_request(get("/_ping")).await.unwrap();
    let api = engine_ping.headers()["api-version"]
        .to_str()
        .unwrap()
        .to_owned();
    for method in ["HEAD", "GET"] {
        let extra: &[&str] = if method == "HEAD" { &["-I"] } else { &[] };
        let (status, body, headers) =
            curl_via_agent(&pki, daemon.addr, method, "/_ping", extra).await;
        assert_eq!(status, 200, "{method} {headers}");
        let line = headers
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("api-version:"))
            .unwrap_or_else(|| panic!("no Api-Version in {headers}"));
        assert_eq!(line.split_once(':').unwrap().1.trim(), api);
        if method == "GET" {
            assert_eq!(body, "OK");
        }
    }
    daemon.stop().await;
}

/// The default relays only what GoDoxy uses; `full` relays everything; `off` nothing.
#[tokio::test]
async fn access_policy_godoxy_full_and_off() {
    let pki = TestPki::new();
    let create = format!(r#"{{"Image":"{IMAGE}","Cmd":["true"]}}"#);
    let container = Container::start().await;
    let exec_path = format!("/containers/{}/exec", container.name);
    let exec_body = r#"{"Cmd":["true"]}"#;
    let json = ["-H", "Content-Type: application/json", "--data"];

    let daemon = agent_for(&pki, "").await;
    for (method, path, body) in [
        ("POST", "/containers/create", Some(create.as_str())),
        ("POST", exec_path.as_str(), Some(exec_body)),
        ("GET", "/images/json", None),
        ("GET", "/v1.41/images/json", None),
        ("DELETE", "/containers/nothing-here", None),
        ("GET", "/containers/x/../../images/json", None),
    ] {
        let mut extra: Vec<&str> = vec!["--path-as-is"];
        if let Some(body) = body {
            extra.extend(json);
            extra.push(body);
        }
        let (status, reply, _) = curl_via_agent(&pki, daemon.addr, method, path, &extra).await;
        assert_eq!(status, 403, "{method} {path}: {reply}");
        let reply: Value = serde_json::from_str(&reply).unwrap();
        assert!(
            reply["message"].as_str().unwrap().contains("docker.access"),
            "{reply}"
        );
    }
    // What GoDoxy uses passes, with and without the version prefix.
    for path in [
        "/containers/json?all=1",
        "/v1.41/containers/json?all=1",
        "/info",
    ] {
        let (status, _, _) = curl_via_agent(&pki, daemon.addr, "GET", path, &[]).await;
        assert_eq!(status, 200, "{path}");
    }
    daemon.stop().await;

    let daemon = agent_for(&pki, "access = \"full\"").await;
    let mut extra: Vec<&str> = json.to_vec();
    extra.push(&create);
    let (status, reply, _) =
        curl_via_agent(&pki, daemon.addr, "POST", "/containers/create", &extra).await;
    assert_eq!(status, 201, "{reply}");
    let created: Value = serde_json::from_str(&reply).unwrap();
    let id = created["Id"].as_str().unwrap().to_owned();
    let mut extra: Vec<&str> = json.to_vec();
    extra.push(exec_body);
    let (status, reply, _) = curl_via_agent(&pki, daemon.addr, "POST", &exec_path, &extra).await;
    assert_eq!(status, 201, "{reply}");
    let (status, _, _) = curl_via_agent(&pki, daemon.addr, "GET", "/images/json", &[]).await;
    assert_eq!(status, 200);
    let (status, _, _) = curl_via_agent(
        &pki,
        daemon.addr,
        "DELETE",
        &format!("/containers/{id}"),
        &[],
    )
    .await;
    assert_eq!(status, 204);
    daemon.stop().await;

    let daemon = agent_for(&pki, "access = \"off\"").await;
    let (status, reply, _) = curl_via_agent(&pki, daemon.addr, "GET", "/_ping", &[]).await;
    assert_eq!(status, 403, "{reply}");
    daemon.stop().await;
    container.remove().await;
}

/// A refusal is logged at warn with who asked and what; a loop of refusals is throttled.
#[tokio::test]
async fn refusals_are_logged_with_the_subject_and_throttled() {
    let pki = TestPki::new();
    let config = pki.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"docker-agent\"\n[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[docker]\nsocket = \"{}\"\n",
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
            engine().display(),
        ),
    )
    .unwrap();
    let mut agent = Running::start(&config);
    agent.wait_for(&["Docker API relay ready", "engine="]).await;
    let listening = agent.wait_for(&["agent listening", "tcp=127.0.0.1:"]).await;
    let addr: SocketAddr = crate::common::field(&listening, "tcp").parse().unwrap();

    for _ in 0..20 {
        let (status, _, _) =
            curl_via_agent(&pki, addr, "POST", "/containers/create", &["--data", "{}"]).await;
        assert_eq!(status, 403);
    }
    let line = agent.wait_for(&["Docker API call refused", "WARN"]).await;
    assert!(
        line.contains("subject=\"O=GoDoxy, OU=Client, CN=godoxy.agent\""),
        "{line}"
    );
    assert!(line.contains("method=POST"), "{line}");
    assert!(line.contains("path=\"/containers/create\""), "{line}");
    // 20 refusals inside a second or two: far fewer lines.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, _) = curl_via_agent(&pki, addr, "GET", "/images/json", &[]).await;
    assert_eq!(status, 403);
    let next = agent.wait_for(&["Docker API call refused"]).await;
    let suppressed: u64 = crate::common::field(&next, "suppressed").parse().unwrap();
    assert!(suppressed > 0, "{next}");
    let lines = agent
        .log
        .iter()
        .filter(|l| l.contains("Docker API call refused"))
        .count();
    assert!(lines <= 5, "{lines} refusal lines for 21 refusals");
    let _ = agent.child.kill().await;
}

/// `docker exec` attaches through a connection upgrade, relayed both ways.
#[tokio::test]
async fn docker_exec_upgrades_through_the_agent_under_full() {
    let pki = TestPki::new();
    let daemon = agent_for(&pki, "access = \"full\"").await;
    let container = Container::start().await;
    let out = docker_via_agent(
        &pki,
        daemon.addr,
        &["exec", &container.name, "echo", "hello through the agent"],
    )
    .await;
    assert!(out.status.success(), "docker exec: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "hello through the agent");
    // stdin too: `exec -i` copies ours to the container and its output back.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/with-hosts.sh");
    let mut child = Command::new("bash")
        .arg(script)
        .arg("godoxy.agent=127.0.0.1")
        .arg("--")
        .args(["docker", "exec", "-i", &container.name, "cat"])
        .env(
            "DOCKER_HOST",
            format!("tcp://godoxy.agent:{}", daemon.addr.port()),
        )
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", docker_cert_dir(&pki))
        .env("DOCKER_CONFIG", pki.path("docker-config"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"line one\nline two\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(text(&out.stdout), "line one\nline two\n");
    container.remove().await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_missing_socket_answers_502_at_once() {
    let pki = TestPki::new();
    let missing = pki.path("no-such.sock");
    let daemon = TestDaemon::start_with(
        &pki,
        &format!("[docker]\nsocket = \"{}\"", missing.display()),
    )
    .await;
    let started = Instant::now();
    let (status, body, _) = curl_via_agent(&pki, daemon.addr, "GET", "/containers/json", &[]).await;
    assert_eq!(status, 502, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    daemon.stop().await;
}

/// A socket that accepts and never answers: 504 after docker.response_timeout, not a hang.
#[tokio::test]
async fn a_silent_socket_answers_504_after_the_response_timeout() {
    let pki = TestPki::new();
    let path = pki.path("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let daemon = TestDaemon::start_with(
        &pki,
        &format!(
            "[docker]\nsocket = \"{}\"\nresponse_timeout = \"1s\"",
            path.display()
        ),
    )
    .await;
    let started = Instant::now();
    let (status, body, _) = curl_via_agent(&pki, daemon.addr, "GET", "/_ping", &[]).await;
    assert_eq!(status, 504, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("did not answer"),
        "{body}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    held.abort();
    daemon.stop().await;
}

/// The engine dies in the middle of a chunked stream: the client's response ends without its
/// terminating chunk (an error, not a clean end), and the agent's connection is closed.
#[tokio::test]
async fn a_socket_closing_mid_stream_ends_the_response_as_an_error() {
    let pki = TestPki::new();
    let path = pki.path("dying.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // Every connection (the agent's start-up check too) gets the start of a chunked stream,
    // then the engine goes away.
    let engine = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                          Transfer-Encoding: chunked\r\n\r\n6\r\n{\"a\":1\r\n",
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                // Gone, mid-stream.
            });
        }
    });
    let daemon =
        TestDaemon::start_with(&pki, &format!("[docker]\nsocket = \"{}\"", path.display())).await;
    let mut client = http_via_agent(&pki, daemon.addr).await;
    let response = client.send_request(get("/events")).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"{\"a\":1");
    let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap();
    assert!(
        matches!(end, Some(Err(_))),
        "expected a broken stream, got {end:?}"
    );
    engine.abort();
    daemon.stop().await;
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A client that walks away from `/events` frees the agent's connection to the engine.
#[tokio::test]
async fn a_client_leaving_an_event_stream_frees_its_descriptors() {
    let pki = TestPki::new();
    let config = pki.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[docker]\nsocket = \"{}\"\n",
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
            engine().display(),
        ),
    )
    .unwrap();
    let mut agent = Running::start(&config);
    let listening = agent.wait_for(&["agent listening", "tcp=127.0.0.1:"]).await;
    let addr: SocketAddr = crate::common::field(&listening, "tcp").parse().unwrap();
    let pid = agent.child.id().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = open_fds(pid);

    for _ in 0..5 {
        let mut client = http_via_agent(&pki, addr).await;
        let response = client.send_request(get("/events")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            open_fds(pid) >= baseline + 2,
            "client and engine connections open"
        );
        drop(response);
        drop(client);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) > baseline {
        assert!(
            Instant::now() < deadline,
            "agent fds {} > baseline {baseline} 5 s after the clients left",
            open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = agent.child.kill().await;
}

#[tokio::test]
async fn two_hundred_concurrent_container_lists() {
    let pki = TestPki::new();
    let daemon = agent_for(&pki, "").await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let client = pki.client();
        let addr = daemon.addr;
        calls.spawn(async move {
            let tls = client.connect_http(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            let response = sender
                .send_request(get("/v1.41/containers/json?all=1"))
                .await
                .unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        });
    }
    let mut done = 0;
    while let Some(result) = calls.join_next().await {
        let (status, body) = result.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let list: Value = serde_json::from_slice(&body).unwrap();
        assert!(list.is_array());
        done += 1;
    }
    assert_eq!(done, 200);
    daemon.stop().await;
}

/// `/info` answers any method with the GoDoxy version contract.
#[tokio::test]
async fn info_answers_get_and_post_with_a_godoxy_release() {
    let pki = TestPki::new();
    let daemon = agent_for(&pki, "").await;
    for method in ["GET", "POST"] {
        let (status, body, _) =
            curl_via_agent(&pki, daemon.addr, method, "/godoxy/agent/info", &[]).await;
        assert_eq!(status, 200, "{method}");
        let info: Value = serde_json::from_str(&body).unwrap();
        let version = info["version"].as_str().unwrap();
        // GoDoxy's server: ^v(\d+)\.(\d+)\.(\d+)(-\w+)?$, and newer than v0.18.6.
        let numbers: Vec<u64> = version
            .strip_prefix('v')
            .unwrap()
            .split('.')
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(numbers.len(), 3, "{version}");
        assert!(
            (numbers[0], numbers[1], numbers[2]) > (0, 18, 6),
            "{version}"
        );
        assert_eq!(version, "v0.31.0");
    }
    daemon.stop().await;
}
