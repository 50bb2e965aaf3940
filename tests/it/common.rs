//! Shared test fixtures: per-test PKI, an in-process daemon on 127.0.0.1:0, echo peers, vectors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use godoxy_agent::Stats;
use godoxy_agent::certs::CertSet;
use godoxy_agent::client::ClientTls;
use godoxy_agent::{Config, Daemon};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A fresh CA, server and client set written to a temporary folder.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub set: CertSet,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let set = CertSet::generate().unwrap();
        set.write(dir.path(), false).unwrap();
        Self { dir, set }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Trusts the CA and presents the client certificate.
    pub fn client(&self) -> ClientTls {
        ClientTls::from_pem(
            self.set.ca_cert.as_bytes(),
            Some((
                self.set.client_cert.as_bytes(),
                self.set.client_key.as_bytes(),
            )),
        )
        .unwrap()
    }

    /// Trusts the CA, presents no certificate.
    pub fn client_without_cert(&self) -> ClientTls {
        ClientTls::from_pem(self.set.ca_cert.as_bytes(), None).unwrap()
    }

    /// Trusts this CA but presents a client certificate from `other`'s CA.
    pub fn client_with_cert_of(&self, other: &TestPki) -> ClientTls {
        ClientTls::from_pem(
            self.set.ca_cert.as_bytes(),
            Some((
                other.set.client_cert.as_bytes(),
                other.set.client_key.as_bytes(),
            )),
        )
        .unwrap()
    }
}

/// The daemon running in this process on ephemeral ports.
pub struct TestDaemon {
    pub addr: SocketAddr,
    /// The DTLS address when started with UDP.
    pub udp: Option<SocketAddr>,
    /// The Prometheus scrape listener, when `[prometheus] listen` is set.
    pub prometheus: Option<SocketAddr>,
    pub stats: Arc<Stats>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestDaemon {
    /// A config text for `pki` listening on 127.0.0.1:0; `stream` lines go under `[stream]`.
    pub fn config_text(pki: &TestPki, stream: &str) -> String {
        Self::config_text_with_udp(pki, "", stream)
    }

    /// As `config_text`, with `udp` as `listen.udp` ("" disables).
    pub fn config_text_with_udp(pki: &TestPki, udp: &str, stream: &str) -> String {
        format!(
            "name = \"test-agent\"\n\
             [listen]\ntcp = \"127.0.0.1:0\"\nudp = \"{udp}\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [stream]\n{stream}\n",
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
        )
    }

    pub async fn start(pki: &TestPki) -> Self {
        Self::start_with(pki, "").await
    }

    pub async fn start_with(pki: &TestPki, stream: &str) -> Self {
        let text = Self::config_text(pki, stream);
        let config = Config::from_toml(&text, None, |_| None).unwrap().0;
        Self::start_config(config).await
    }

    /// With the DTLS listener on 127.0.0.1:0.
    pub async fn start_udp(pki: &TestPki, stream: &str) -> Self {
        let text = Self::config_text_with_udp(pki, "127.0.0.1:0", stream);
        let config = Config::from_toml(&text, None, |_| None).unwrap().0;
        Self::start_config(config).await
    }

    pub async fn start_config(config: Config) -> Self {
        let daemon = Daemon::bind(config).await.unwrap();
        let addr = daemon.tcp_addr();
        let udp = daemon.udp_addr();
        let prometheus = daemon.prometheus_addr();
        let stats = daemon.stats();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(daemon.run(shutdown.clone()));
        Self {
            addr,
            udp,
            prometheus,
            stats,
            shutdown,
            task,
        }
    }

    pub fn stat(&self, pick: impl Fn(&Stats) -> &std::sync::atomic::AtomicU64) -> u64 {
        Stats::get(pick(&self.stats))
    }

    pub fn dials(&self) -> u64 {
        Stats::get(&self.stats.dials)
    }

    /// Starts the shutdown without waiting for it; `finish` then waits.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// Waits for `run` to return Ok within `limit`, after `begin_stop`.
    pub async fn finish(self, limit: Duration) {
        let result = tokio::time::timeout(limit, self.task)
            .await
            .expect("daemon did not stop in time")
            .expect("daemon task panicked");
        result.expect("daemon returned an error");
    }

    /// Cancels and asserts that `run` returns Ok within 5 s.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("daemon did not stop within 5 s")
            .expect("daemon task panicked");
        result.expect("daemon returned an error");
    }
}

/// A TCP echo server that counts the connections it accepted. It echoes until EOF, then
/// half-closes its write side (so a client's shutdown gets the whole reply, then EOF).
pub struct TcpEcho {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl TcpEcho {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Self { addr, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A UDP echo that counts datagrams received.
pub struct UdpEcho {
    pub addr: SocketAddr,
    pub received: Arc<AtomicUsize>,
}

impl UdpEcho {
    pub async fn start() -> Self {
        // A large receive buffer: 25 sessions' windows arrive at this one socket at once, and
        // the kernel's default (208 KiB) overflows on a loaded machine.
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        socket.set_recv_buffer_size(4 << 20).unwrap();
        socket.set_nonblocking(true).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let socket = UdpSocket::from_std(socket.into()).unwrap();
        let addr = socket.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let count = received.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                count.fetch_add(1, Ordering::SeqCst);
                let _ = socket.send_to(&buf[..n], peer).await;
            }
        });
        Self { addr, received }
    }

    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

/// One entry of tests/data/vectors.json.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Vector {
    pub name: String,
    pub hex: String,
    pub host: Option<String>,
    pub port: Option<String>,
    pub flag: Option<u8>,
    pub probe: Option<bool>,
    pub why: Option<String>,
}

impl Vector {
    pub fn bytes(&self) -> Vec<u8> {
        hex(&self.hex)
    }
}

#[derive(Debug, serde::Deserialize)]
pub struct Vectors {
    pub header_size: usize,
    pub version: String,
    pub valid: Vec<Vector>,
    pub invalid: Vec<Vector>,
    pub rejected_destination: Vec<Vector>,
}

pub fn vectors_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors.json")
}

pub fn vectors() -> Vectors {
    serde_json::from_slice(&std::fs::read(vectors_path()).unwrap()).unwrap()
}

pub fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Path of the built binary, for tests that run the command.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_godoxy-agent")
}

/// Runs a command with stdin closed, killing it if it takes longer than 10 s.
pub async fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("command did not finish within 10 s")
        .expect("command could not be started")
}

/// `curl` against `path` on the daemon, verifying it as godoxy.agent; `cert_pki` adds the
/// client certificate and key of that set. Returns the output; stdout is the body followed by
/// `\n<status> <content type>`.
pub async fn curl(
    pki: &TestPki,
    cert_pki: Option<&TestPki>,
    addr: SocketAddr,
    path: &str,
) -> Output {
    let port = addr.port();
    let mut cmd = Command::new("curl");
    cmd.arg("-sS")
        .arg("--max-time")
        .arg("5")
        .arg("--cacert")
        .arg(pki.path("ca.pem"));
    if let Some(cert_pki) = cert_pki {
        cmd.arg("--cert")
            .arg(cert_pki.path("client.pem"))
            .arg("--key")
            .arg(cert_pki.path("client.key"));
    }
    cmd.arg("--resolve")
        .arg(format!("godoxy.agent:{port}:127.0.0.1"))
        .arg("-w")
        .arg("\n%{http_code} %{content_type}")
        .arg(format!("https://godoxy.agent:{port}{path}"));
    run(&mut cmd).await
}

/// Variables of GoDoxy's that would change what the command does; the test process's own
/// environment must not leak into the child.
const GODOXY_VARS: [&str; 7] = [
    "AGENT_NAME",
    "AGENT_PORT",
    "AGENT_CA_CERT",
    "AGENT_SSL_CERT",
    "AGENT_SKIP_CLIENT_CERT_CHECK",
    "RUNTIME",
    "DOCKER_SOCKET",
];

/// The agent binary with a clean GoDoxy environment and stdin closed.
pub fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_godoxy-agent"));
    for var in GODOXY_VARS {
        cmd.env_remove(var);
    }
    cmd.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A running `godoxy-agent run`, its stderr read line by line in a task.
pub struct Running {
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    pub log: Vec<String>,
}

impl Running {
    /// `godoxy-agent run --config CONFIG` with RUST_LOG=info.
    pub fn start(config: &Path) -> Self {
        let mut cmd = agent();
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info");
        Self::spawn(cmd)
    }

    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The next log line containing every one of `needles`, within 5 s.
    pub async fn wait_for(&mut self, needles: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.log.push(line.clone());
                    if needles.iter().all(|n| line.contains(n)) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "stderr ended before a line with {needles:?}:\n{}",
                    self.log.join("\n")
                ),
                Err(_) => panic!(
                    "no line with {needles:?} within 5 s:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }
}

/// The value of `key=` in a log line (up to the next space), without the quotes tracing puts
/// around string values.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + key.len()
        + 2;
    let value = line[start..].split(' ').next().unwrap();
    value.trim_matches('"')
}

/// A TCP connection to `to` from the loopback address `from` (127.0.0.2 and so on: another
/// source as far as the agent's per-source caps are concerned).
pub async fn tcp_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.parse().expect("an IPv4 address"), 0))?;
    socket.connect(to).await
}

/// The first datagram `client`'s DTLS handshake sends: a ClientHello without a cookie.
pub async fn capture_client_hello(client: &ClientTls) -> Vec<u8> {
    let raw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = raw.local_addr().unwrap();
    let client = client.clone();
    let attempt = tokio::spawn(async move {
        client
            .connect_dtls(to, None, Duration::from_secs(5))
            .await
            .map(|_| ())
    });
    let mut buf = vec![0u8; 4096];
    let (n, _) = raw.recv_from(&mut buf).await.unwrap();
    attempt.abort();
    buf.truncate(n);
    buf
}

/// `hello` (one record holding one ClientHello) with `cookie` in it, as message 1: the answer
/// to a HelloVerifyRequest.
pub fn with_cookie(hello: &[u8], cookie: &[u8]) -> Vec<u8> {
    let (record, rest) = hello.split_at(13);
    let (handshake, body) = rest.split_at(12);
    let sid_end = 35 + usize::from(body[34]);
    let cookie_at = sid_end;
    let old_cookie = usize::from(body[cookie_at]);
    let mut new_body = body[..cookie_at].to_vec();
    new_body.push(u8::try_from(cookie.len()).unwrap());
    new_body.extend_from_slice(cookie);
    new_body.extend_from_slice(&body[cookie_at + 1 + old_cookie..]);
    let len = u32::try_from(new_body.len()).unwrap().to_be_bytes();
    let mut out = record[..11].to_vec();
    out.extend_from_slice(&u16::try_from(12 + new_body.len()).unwrap().to_be_bytes());
    out.push(handshake[0]);
    out.extend_from_slice(&len[1..]);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&len[1..]);
    out.extend_from_slice(&new_body);
    out
}

/// The cookie of a HelloVerifyRequest datagram.
pub fn cookie_of(hello_verify_request: &[u8]) -> Vec<u8> {
    hello_verify_request[13 + 12 + 3..].to_vec()
}

/// From a new socket on `from`, runs the cookie round with the agent at `server` (hello,
/// HelloVerifyRequest, hello with the cookie), so the agent opens a handshake, and then goes
/// silent. The socket is returned so the peer's address stays taken. `None` when no
/// HelloVerifyRequest came within `wait`.
pub async fn stalled_handshake(
    from: &str,
    server: SocketAddr,
    hello: &[u8],
    wait: Duration,
) -> Option<UdpSocket> {
    let socket = UdpSocket::bind((from, 0)).await.unwrap();
    socket.send_to(hello, server).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(wait, socket.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    if buf.get(13) != Some(&3) {
        return None;
    }
    let answer = with_cookie(hello, &cookie_of(&buf[..n]));
    socket.send_to(&answer, server).await.unwrap();
    Some(socket)
}
