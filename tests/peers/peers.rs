//! Real origins for the proxy and health tests, started by the tests themselves on 127.0.0.1
//! and killed when dropped:
//!
//! - [`Nginx`]: one nginx process (tests/peers/nginx.conf) with an http, an https and an h2c
//!   port, a certificate set from tests/peers/origin-certs.sh, and an access log of one JSON
//!   object a line;
//! - [`PyPeer`]: one of the Python peers in tests/peers/*.py, run in a virtualenv that
//!   tests/peers/venv.sh makes once under target/tmp (tests/peers/requirements.txt).
//!
//! Included by tests/it/proxy.rs as `crate::proxy::peers`.

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Size of the large file nginx serves and the upload tests send: 50 MiB.
pub const BIG: usize = 50 << 20;

/// tests/peers/.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// The virtualenv's python, made the first time any test asks (a few seconds with PyPI), and
/// reused by later runs while tests/peers/requirements.txt is unchanged.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("peers-venv");
        let started = Instant::now();
        let out = std::process::Command::new("bash")
            .arg(peers_dir().join("venv.sh"))
            .arg(&venv)
            .stdin(Stdio::null())
            .output()
            .expect("running tests/peers/venv.sh");
        assert!(
            out.status.success(),
            "tests/peers/venv.sh failed (it needs python3 with venv, and PyPI the first time):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("peers: python virtualenv ready in {:?}", started.elapsed());
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// `n` ports that were free a moment ago on 127.0.0.1 (for nginx, which cannot report the
/// port it bound; a small race, retried by [`Nginx::start`]).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<StdTcpListener> = (0..n)
        .map(|_| StdTcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A port with nothing listening on it (bound, then closed).
pub fn closed_port() -> u16 {
    free_ports(1)[0]
}

/// The SHA-256 of a file, as hex (`sha256sum`).
pub async fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// nginx on three ephemeral ports of 127.0.0.1, as one process in the foreground.
pub struct Nginx {
    /// Plain HTTP/1.1.
    pub http: SocketAddr,
    /// HTTPS with a certificate for origin.test and 127.0.0.1 from [`Nginx::ca`].
    pub https: SocketAddr,
    /// Plain-text HTTP/2 with prior knowledge.
    pub h2c: SocketAddr,
    // Dropped first: killed before its folder goes.
    _child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    pub async fn start() -> Self {
        let mut errors = Vec::new();
        for _ in 0..3 {
            match Self::try_start().await {
                Ok(nginx) => return nginx,
                Err(error) => errors.push(error),
            }
        }
        panic!("nginx did not start:\n{}", errors.join("\n---\n"));
    }

    async fn try_start() -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let certs = Command::new("bash")
            .arg(peers_dir().join("origin-certs.sh"))
            .arg(root)
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(
            certs.status.success(),
            "origin-certs.sh: {}",
            String::from_utf8_lossy(&certs.stderr)
        );
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::create_dir_all(root.join("files")).unwrap();
        std::fs::write(root.join("files/small.txt"), "a small file\n").unwrap();
        let ports = free_ports(3);
        let template = std::fs::read_to_string(peers_dir().join("nginx.conf")).unwrap();
        let conf = template
            .replace("@DIR@", &root.display().to_string())
            .replace("@HTTP@", &ports[0].to_string())
            .replace("@HTTPS@", &ports[1].to_string())
            .replace("@H2C@", &ports[2].to_string());
        std::fs::write(root.join("nginx.conf"), conf).unwrap();
        let out = std::fs::File::create(root.join("nginx.out")).unwrap();
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(root)
            .arg("-c")
            .arg(root.join("nginx.conf"))
            .arg("-e")
            .arg(root.join("error.log"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("nginx could not be started (is it installed?): {e}"))?;
        let addrs: Vec<SocketAddr> = ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        'ports: for addr in &addrs {
            loop {
                if TcpStream::connect(addr).await.is_ok() {
                    continue 'ports;
                }
                let exited = child.try_wait().unwrap();
                if exited.is_some() || Instant::now() > deadline {
                    let _ = child.kill().await;
                    let read = |name: &str| std::fs::read_to_string(root.join(name));
                    return Err(format!(
                        "nginx ({exited:?}) is not listening on {addr}:\n{}\n{}",
                        read("nginx.out").unwrap_or_default(),
                        read("error.log").unwrap_or_default()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(Self {
            http: addrs[0],
            https: addrs[1],
            h2c: addrs[2],
            _child: child,
            dir,
        })
    }

    /// A file in nginx's folder: ca.pem, client.pem, client.key, access.log ...
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The origin CA's certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// Writes files/big.bin ([`BIG`] bytes of /dev/urandom), served as `/files/big.bin`, and
    /// returns its path and SHA-256.
    pub async fn big_file(&self) -> (PathBuf, String) {
        let path = self.path("files/big.bin");
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("head -c {BIG} /dev/urandom > '{}'", path.display()))
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        let sum = sha256_file(&path).await;
        (path, sum)
    }

    /// nginx's error log so far (at level info: why it refused a request, for one).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.path("error.log")).unwrap_or_default()
    }

    /// Every access log entry so far.
    pub fn log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("access.log"))
            .unwrap_or_default()
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("log line {line}: {e}"))
            })
            .collect()
    }

    /// The first access log entry for which `matches` holds, within 10 s (nginx logs a
    /// request when it ends).
    pub async fn wait_log(&self, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(entry) = self.log().into_iter().find(&matches) {
                return entry;
            }
            assert!(
                Instant::now() < deadline,
                "no matching nginx log entry within 10 s; the log:\n{}",
                std::fs::read_to_string(self.path("access.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The entry for the one request whose `$request_uri` is `uri`.
    pub async fn wait_uri(&self, uri: &str) -> Value {
        self.wait_log(|e| e["uri"] == uri).await
    }
}

/// A `$http_...` or `$ssl_...` log field that nginx wrote as unset.
pub fn unset(value: &Value) -> bool {
    matches!(value.as_str(), Some("" | "-"))
}

/// One of tests/peers/*.py, on an ephemeral port of 127.0.0.1. It prints `listening ADDR`
/// first, then JSON events that [`PyPeer::event`] waits for.
pub struct PyPeer {
    pub addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Value>,
    // Dropped before the folder that holds its stderr.
    _child: Child,
    dir: tempfile::TempDir,
}

impl PyPeer {
    /// Starts `script` (a file name in tests/peers/) with `args`.
    pub async fn start(script: &str, args: &[&str]) -> Self {
        let python = python();
        let dir = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr")).unwrap();
        let mut child = Command::new(python)
            .arg(peers_dir().join(script))
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        let addr = match first {
            Ok(Ok(Some(line))) if line.starts_with("listening ") => {
                line["listening ".len()..].parse().unwrap()
            }
            other => panic!(
                "{script} did not start ({other:?}):\n{}",
                std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
            ),
        };
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Self {
            addr,
            events,
            _child: child,
            dir,
        }
    }

    /// The next event (skipping others) for which `matches` holds, within 10 s.
    pub async fn event(&mut self, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) if matches(&event) => return event,
                Ok(Some(_)) => {}
                Ok(None) => panic!("peer exited:\n{}", self.stderr()),
                Err(_) => panic!("no matching peer event within 10 s:\n{}", self.stderr()),
            }
        }
    }

    /// What the peer wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }
}
