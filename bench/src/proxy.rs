//! The `proxy` section: HTTP routes through the agent's `/godoxy/agent/proxy/http` against nginx
//! doing the same job, and WebSocket round trips through the agent against a direct connection.
//!
//! - An nginx origin (one process, no TLS, no access log) serves a 1 KiB and a 64 KiB file.
//! - Two nginx reverse proxies run beside the agent, one with 1 worker and one with 2: TLS in
//!   with the agent's server certificate and its client certificate required, `proxy_pass` to
//!   the same origin with upstream keep-alive (`keepalive 64`, HTTP/1.1, `Connection ""`).
//! - The load generator is this bench's own: `clients` kept-alive HTTP/1.1 connections
//!   (hyper over the library's `ClientTls`, client certificate, ALPN `http/1.1`), each sending
//!   the next GET as soon as the previous response has been read (closed loop). Each response
//!   is checked (status and length; the whole body on every connection's first request). The
//!   same requests (path, `Host` and `X-Proxy-*` headers) go to the agent and to nginx.
//! - Reported per body size, client count and target: requests/s, p50 and p99 latency, and CPU
//!   per request of the proxy (its process and children, from /proc), the origin and this
//!   bench's client threads, and the machine's busy share.
//! - WebSocket: an echo (tokio-tungstenite) on its own thread; 64-byte binary messages
//!   ping-ponged on one connection, direct (plain TCP), through the agent and through nginx.
//!
//! nginx is not installed here: scripts/bench.sh installs it when missing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use godoxy_agent::client::ClientTls;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HOST, HeaderName, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::harness::Bench;
use crate::load::{Cpu, Meter, OPEN_TIMEOUT, Stream};
use crate::procs::{self, Proc};
use crate::stats::{Check, Summary, percentile, show, table};

/// Where a GoDoxy server puts a route's path on the agent; nginx serves the same path.
const PREFIX: &str = "/godoxy/agent/proxy/http";
/// The response bodies the origin serves: (file name, bytes).
const BODIES: [(&str, usize); 2] = [("1k", 1024), ("64k", 64 * 1024)];
/// Concurrent clients, each on its own kept-alive connection.
const CLIENTS: [usize; 2] = [8, 64];
/// Upstream keep-alive connections nginx keeps per worker (`keepalive`).
const NGINX_KEEPALIVE: usize = 64;
/// The HTTP targets, in the order each round runs them.
const HTTP_VIA: [Via; 3] = [Via::Agent, Via::Nginx1, Via::Nginx2];
/// The WebSocket targets, in the order each round runs them.
const WS_VIA: [Via; 3] = [Via::Agent, Via::Nginx2, Via::Direct];
/// The nginx the targets are judged against: as many workers as the agent's runtime has
/// worker threads on a 2-core machine (tokio's default: one per core).
const JUDGED: Via = Via::Nginx2;
/// The WebSocket message size.
const WS_MESSAGE: usize = 64;
/// Thread name of the WebSocket echo's runtime: it starts with the echo's, so the meter
/// counts it as the echo.
const WS_THREAD: &str = "bench-echo-ws";
/// Bound on one request (headers and body).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Via {
    /// TLS to the agent, `/godoxy/agent/proxy/http/...` with the route's `X-Proxy-*` headers.
    Agent,
    /// TLS to nginx with `worker_processes 1`, `proxy_pass` to the origin.
    Nginx1,
    /// The same with `worker_processes 2`.
    Nginx2,
    /// Plain TCP straight to the origin (WebSocket only).
    Direct,
}

impl Via {
    fn name(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Nginx1 => "nginx-1w",
            Self::Nginx2 => "nginx-2w",
            Self::Direct => "direct",
        }
    }
}

/// Where everything listens, and what the client needs.
struct Route {
    tls: ClientTls,
    agent: SocketAddr,
    nginx1: SocketAddr,
    nginx2: SocketAddr,
    /// The nginx origin (HTTP).
    origin: SocketAddr,
    /// The WebSocket echo.
    ws: SocketAddr,
    /// The headers GoDoxy sends for an http route to the origin (and the `Host`).
    http_headers: Vec<(HeaderName, HeaderValue)>,
    /// The same naming the WebSocket echo.
    ws_headers: Vec<(HeaderName, HeaderValue)>,
    /// The bodies the origin serves, by file name.
    bodies: BTreeMap<&'static str, Bytes>,
}

impl Route {
    fn addr(&self, via: Via) -> SocketAddr {
        match via {
            Via::Agent => self.agent,
            Via::Nginx1 => self.nginx1,
            Via::Nginx2 => self.nginx2,
            Via::Direct => self.ws,
        }
    }

    /// A kept-alive HTTP/1.1 connection to the agent or an nginx (TLS, client certificate).
    async fn connect(&self, via: Via) -> Result<SendRequest<Empty<Bytes>>> {
        let open = async {
            let tls = self.tls.connect_http(self.addr(via)).await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            anyhow::Ok(sender)
        };
        timeout(OPEN_TIMEOUT, open)
            .await
            .map_err(|_| anyhow!("opening a connection to {} timed out", via.name()))?
            .with_context(|| format!("opening a connection to {}", via.name()))
    }

    /// `GET PREFIX/<file>` with the route's headers.
    fn request(&self, file: &str) -> Result<Request<Empty<Bytes>>> {
        let mut req = Request::get(format!("{PREFIX}/{file}")).body(Empty::new())?;
        for (name, value) in &self.http_headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        Ok(req)
    }

    /// The negotiated TLS version and cipher suite with `via`.
    async fn tls_suite(&self, via: Via) -> Result<String> {
        let tls = self.tls.connect_http(self.addr(via)).await?;
        let (_, conn) = tls.get_ref();
        Ok(format!(
            "{} {}",
            conn.protocol_version()
                .map_or_else(|| "-".to_owned(), |v| format!("{v:?}")),
            conn.negotiated_cipher_suite()
                .map_or_else(|| "-".to_owned(), |s| format!("{:?}", s.suite()))
        ))
    }
}

/// The route's headers as GoDoxy sends them: `X-Proxy-Host`, `X-Proxy-Scheme: http`,
/// `X-Proxy-Config: e30=` (`{}`), and a `Host`.
fn route_headers(target: SocketAddr) -> Result<Vec<(HeaderName, HeaderValue)>> {
    Ok(vec![
        (HOST, HeaderValue::from_static("godoxy.agent")),
        (
            HeaderName::from_static("x-proxy-host"),
            HeaderValue::from_str(&target.to_string())?,
        ),
        (
            HeaderName::from_static("x-proxy-scheme"),
            HeaderValue::from_static("http"),
        ),
        (
            HeaderName::from_static("x-proxy-config"),
            HeaderValue::from_static("e30="),
        ),
    ])
}

/// The body of file `len` bytes long: a pattern with a prime period.
fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// The nginx binary: from PATH, else Debian's /usr/sbin/nginx.
fn nginx_binary() -> Result<PathBuf> {
    procs::which("nginx")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
        .ok_or_else(|| {
            anyhow!(
                "nginx not found on PATH or in /usr/sbin: install the nginx package \
                 (`apt-get install -y nginx`), or run scripts/bench.sh, which installs it"
            )
        })
}

/// The `*_temp_path` lines: everything nginx may write stays in our folder.
fn temp_paths(dir: &Path, name: &str) -> String {
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .fold(String::new(), |mut out, kind| {
            let _ = writeln!(
                out,
                "    {kind}_temp_path {}/tmp/{name}-{kind};",
                dir.display()
            );
            out
        })
}

/// The origin: one nginx process serving `dir/files`, no TLS, no access log, keep-alive
/// without a request limit.
fn origin_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "# written by the bench: the proxy section's origin\n\
         daemon off;\n\
         master_process off;\n\
         worker_processes 1;\n\
         pid {d}/origin.pid;\n\
         error_log {d}/origin.err warn;\n\
         events {{\n    worker_connections 4096;\n}}\n\
         http {{\n\
         {temp}\
         \x20   access_log off;\n\
         \x20   default_type application/octet-stream;\n\
         \x20   sendfile on;\n\
         \x20   open_file_cache max=16;\n\
         \x20   keepalive_requests 1000000;\n\
         \x20   keepalive_timeout 600s;\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port};\n\
         \x20       root {d}/files;\n\
         \x20   }}\n\
         }}\n",
        temp = temp_paths(dir, "origin"),
    )
}

/// A reverse proxy with `workers` worker processes doing what the agent does for an http
/// route: TLS in with the agent's certificate and its client certificate required, the
/// prefix stripped, `X-Proxy-*` removed, `X-Forwarded-Proto: https`, the client's `Host`
/// kept, upstream keep-alive; WebSocket upgrades on `PREFIX/ws` to the echo.
fn proxy_conf(
    dir: &Path,
    certs: &Path,
    workers: usize,
    port: u16,
    origin: SocketAddr,
    ws: SocketAddr,
) -> String {
    let (d, c) = (dir.display(), certs.display());
    let name = format!("nginx-{workers}w");
    format!(
        "# written by the bench: the proxy section's nginx with {workers} worker(s)\n\
         daemon off;\n\
         master_process on;\n\
         worker_processes {workers};\n\
         pid {d}/{name}.pid;\n\
         error_log {d}/{name}.err warn;\n\
         events {{\n    worker_connections 4096;\n}}\n\
         http {{\n\
         {temp}\
         \x20   access_log off;\n\
         \x20   keepalive_requests 1000000;\n\
         \x20   keepalive_timeout 600s;\n\
         \x20   upstream origin {{\n\
         \x20       server {origin};\n\
         \x20       keepalive {NGINX_KEEPALIVE};\n\
         \x20       keepalive_requests 1000000;\n\
         \x20       keepalive_timeout 600s;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port} ssl;\n\
         \x20       ssl_certificate {c}/server.pem;\n\
         \x20       ssl_certificate_key {c}/server.key;\n\
         \x20       ssl_client_certificate {c}/ca.pem;\n\
         \x20       ssl_verify_client on;\n\
         \x20       ssl_protocols TLSv1.2 TLSv1.3;\n\
         \x20       location = {PREFIX}/ws {{\n\
         \x20           proxy_pass http://{ws};\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Upgrade $http_upgrade;\n\
         \x20           proxy_set_header Connection \"upgrade\";\n\
         \x20           proxy_read_timeout 600s;\n\
         \x20       }}\n\
         \x20       location {PREFIX}/ {{\n\
         \x20           proxy_pass http://origin/;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20           proxy_set_header Host $http_host;\n\
         \x20           proxy_set_header X-Proxy-Host \"\";\n\
         \x20           proxy_set_header X-Proxy-Scheme \"\";\n\
         \x20           proxy_set_header X-Proxy-Config \"\";\n\
         \x20           proxy_set_header X-Forwarded-Proto https;\n\
         \x20           proxy_hide_header X-Powered-By;\n\
         \x20           proxy_max_temp_file_size 0;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n",
        temp = temp_paths(dir, &name),
    )
}

/// Starts nginx on `conf` and waits until it listens on `port`.
fn start_nginx(bin: &Path, dir: &Path, name: &str, conf: &str, port: u16) -> Result<Proc> {
    let path = dir.join(format!("{name}.conf"));
    fs::write(&path, conf)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join(format!("{name}.err")));
    let mut proc = Proc::spawn(name, cmd, &dir.join(format!("{name}.log")))?;
    proc.wait_until("listening", Duration::from_secs(10), || {
        procs::tcp_listening(port)
    })
    .with_context(|| {
        format!(
            "{name}: {}",
            fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default()
        )
    })?;
    Ok(proc)
}

/// The WebSocket echo, on its own one-thread runtime.
struct WsEcho {
    addr: SocketAddr,
    runtime: Option<Runtime>,
}

impl WsEcho {
    fn start() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(WS_THREAD)
            .enable_all()
            .build()
            .context("building the WebSocket echo's runtime")?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        runtime.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((tcp, _)) => {
                        tokio::spawn(ws_echo(tcp));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        Ok(Self {
            addr,
            runtime: Some(runtime),
        })
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Echoes every data message until the client closes.
async fn ws_echo(tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_binary() || message.is_text()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

/// Context switches so far (voluntary and not) of every live thread of a process and its
/// descendants; 0 without a process.
fn context_switches(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else {
        return 0;
    };
    let mut switches = 0;
    for p in procs::descendants(pid).into_iter().chain([pid]) {
        for task in fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
            switches += status
                .lines()
                .filter_map(|l| l.split_once(':'))
                .filter(|(k, _)| {
                    *k == "voluntary_ctxt_switches" || *k == "nonvoluntary_ctxt_switches"
                })
                .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    switches
}

/// One timed load run of one target.
#[derive(Clone, Debug, Serialize)]
struct LoadRun {
    requests: usize,
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    cpu: Cpu,
    origin_s: f64,
    /// The proxy's context switches during the run.
    proxy_ctx_switches: u64,
}

impl LoadRun {
    fn per_request_us(&self, seconds: f64) -> f64 {
        seconds / self.requests.max(1) as f64 * 1e6
    }
    fn busy_pct(&self) -> f64 {
        self.cpu.machine_s / self.cpu.wall_s.max(1e-9) * 100.0
    }
}

/// One response read to the end and checked: 200 and `body.len()` bytes (the bytes
/// themselves with `whole`).
async fn fetch(
    sender: &mut SendRequest<Empty<Bytes>>,
    req: Request<Empty<Bytes>>,
    body: &Bytes,
    whole: bool,
) -> Result<()> {
    let run = async {
        sender.ready().await?;
        let response = sender.send_request(req).await?;
        let status = response.status();
        let mut incoming = response.into_body();
        let mut got = 0usize;
        let mut first = Vec::new();
        while let Some(frame) = incoming.frame().await {
            if let Ok(data) = frame?.into_data() {
                got += data.len();
                if whole || status != StatusCode::OK {
                    first.extend_from_slice(&data);
                }
            }
        }
        if status != StatusCode::OK {
            bail!(
                "answered {status}: {}",
                String::from_utf8_lossy(&first[..first.len().min(300)])
            );
        }
        if got != body.len() || (whole && first != body[..]) {
            bail!(
                "a {got}-byte body instead of the origin's {} bytes{}",
                body.len(),
                if got == body.len() {
                    " (different bytes)"
                } else {
                    ""
                }
            );
        }
        anyhow::Ok(())
    };
    timeout(REQUEST_TIMEOUT, run)
        .await
        .map_err(|_| anyhow!("no whole response within {REQUEST_TIMEOUT:?}"))?
}

/// `clients` connections to `via`, each sending GETs of `file` back to back for `warm` (not
/// counted), then for `span`: requests/s, latencies, CPU.
async fn load(
    route: Arc<Route>,
    via: Via,
    file: &'static str,
    clients: usize,
    (warm, span): (Duration, Duration),
    meter: Meter,
    (proxy, origin): (Option<u32>, u32),
) -> Result<LoadRun> {
    let body = route
        .bodies
        .get(file)
        .cloned()
        .ok_or_else(|| anyhow!("no body {file}"))?;
    let mut senders = Vec::with_capacity(clients);
    for _ in 0..clients {
        senders.push(route.connect(via).await?);
    }
    let warm_end = Instant::now() + warm;
    let end = warm_end + span;
    let mut tasks = JoinSet::new();
    for mut sender in senders {
        let (route, body) = (route.clone(), body.clone());
        tasks.spawn(async move {
            let mut samples = Vec::with_capacity(16 * 1024);
            let mut first = true;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                fetch(&mut sender, route.request(file)?, &body, first).await?;
                first = false;
                if t0 >= warm_end {
                    samples.push(t0.elapsed().as_nanos() as u64);
                }
            }
            anyhow::Ok(samples)
        });
    }
    let limit = warm + span + Duration::from_secs(60);
    let run = async {
        tokio::time::sleep_until(warm_end.into()).await;
        let before = meter.snap();
        let switches_before = context_switches(proxy);
        let origin_before = procs::tree_ticks(origin);
        let mut samples = Vec::new();
        while let Some(done) = tasks.join_next().await {
            samples.extend(done.map_err(|e| anyhow!("client task: {e}"))??);
        }
        let cpu = meter.since(&before);
        let origin_after = procs::tree_ticks(origin);
        let switches_after = context_switches(proxy);
        let origin_s = (origin_after.0 + origin_after.1)
            .saturating_sub(origin_before.0 + origin_before.1) as f64
            / procs::clk_tck();
        samples.sort_unstable();
        let requests = samples.len();
        anyhow::Ok(LoadRun {
            requests,
            requests_per_s: requests as f64 / cpu.wall_s.max(1e-9),
            p50_us: percentile(&samples, 50.0) as f64 / 1e3,
            p99_us: percentile(&samples, 99.0) as f64 / 1e3,
            cpu,
            origin_s,
            proxy_ctx_switches: switches_after.saturating_sub(switches_before),
        })
    };
    timeout(limit, run)
        .await
        .map_err(|_| anyhow!("{} load run exceeded {limit:?}", via.name()))?
        .with_context(|| format!("{} {file} x {clients} clients", via.name()))
}

/// A WebSocket to the echo through `via` (direct: plain TCP).
async fn ws_open(route: &Route, via: Via) -> Result<WebSocketStream<Stream>> {
    let open = async {
        let (stream, mut req): (Stream, _) = match via {
            Via::Direct => {
                let tcp = TcpStream::connect(route.ws).await?;
                tcp.set_nodelay(true)?;
                (
                    Box::new(tcp),
                    format!("ws://{}/ws", route.ws).into_client_request()?,
                )
            }
            _ => (
                Box::new(route.tls.connect_http(route.addr(via)).await?),
                format!("ws://godoxy.agent{PREFIX}/ws").into_client_request()?,
            ),
        };
        if via != Via::Direct {
            for (name, value) in &route.ws_headers {
                if name != HOST {
                    req.headers_mut().insert(name.clone(), value.clone());
                }
            }
        }
        let (ws, response) = tokio_tungstenite::client_async(req, stream).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            bail!("answered {}", response.status());
        }
        anyhow::Ok(ws)
    };
    timeout(OPEN_TIMEOUT, open)
        .await
        .map_err(|_| anyhow!("opening a WebSocket through {} timed out", via.name()))?
        .with_context(|| format!("opening a WebSocket through {}", via.name()))
}

/// `warm` then `n` 64-byte binary messages ping-ponged on one WebSocket: round trips in ns.
async fn ws_ping_pong(
    route: Arc<Route>,
    via: Via,
    (warm, n): (usize, usize),
    meter: Meter,
) -> Result<(Vec<u64>, Cpu)> {
    let mut ws = ws_open(&route, via).await?;
    let mut samples = Vec::with_capacity(n);
    let mut before = meter.snap();
    let run = async {
        let mut msg = [0u8; WS_MESSAGE];
        for i in 0..warm + n {
            if i == warm {
                before = meter.snap();
            }
            msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let sent = Bytes::copy_from_slice(&msg);
            let t0 = Instant::now();
            ws.send(Message::Binary(sent.clone())).await?;
            let back = loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(back))) => break back,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(other)) => bail!("unexpected message {other:?}"),
                    Some(Err(err)) => return Err(err.into()),
                    None => bail!("the WebSocket closed"),
                }
            };
            let dt = t0.elapsed();
            if back != sent {
                bail!("echo mismatch at message {i}");
            }
            if i >= warm {
                samples.push(dt.as_nanos() as u64);
            }
        }
        anyhow::Ok(())
    };
    let limit = Duration::from_secs(120);
    match timeout(limit, run).await {
        Err(_) => bail!("{} WebSocket run exceeded {limit:?}", via.name()),
        Ok(r) => r.with_context(|| format!("{} WebSocket run", via.name()))?,
    }
    let cpu = meter.since(&before);
    let _ = timeout(Duration::from_secs(5), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    samples.sort_unstable();
    Ok((samples, cpu))
}

/// The median of `f` over a case's runs.
fn median(runs: &[LoadRun], f: impl Fn(&LoadRun) -> f64) -> Option<Summary> {
    Summary::of(&runs.iter().map(f).collect::<Vec<_>>())
}

/// One case: a body size and a client count.
type Case = (&'static str, usize);

impl Bench {
    /// HTTP routes and WebSockets through the agent against nginx (and direct).
    pub fn section_proxy(&mut self) -> Result<()> {
        let nginx = nginx_binary()?;
        let mut agent = self.start_agent()?;
        let dir = self.cert_dir().join("proxy");
        fs::create_dir_all(dir.join("files"))?;
        fs::create_dir_all(dir.join("tmp"))?;
        let mut bodies = BTreeMap::new();
        for (name, len) in BODIES {
            let body = pattern(len);
            fs::write(dir.join("files").join(name), &body)?;
            bodies.insert(name, body);
        }
        let ws_echo = WsEcho::start()?;
        let origin_port = procs::free_port(false)?;
        let mut origin = start_nginx(
            &nginx,
            &dir,
            "origin",
            &origin_conf(&dir, origin_port),
            origin_port,
        )?;
        let origin_addr = SocketAddr::from(([127, 0, 0, 1], origin_port));
        let mut proxies = Vec::new();
        for workers in [1, 2] {
            let port = procs::free_port(false)?;
            let conf = proxy_conf(
                &dir,
                self.cert_dir(),
                workers,
                port,
                origin_addr,
                ws_echo.addr,
            );
            let proc = start_nginx(&nginx, &dir, &format!("nginx-{workers}w"), &conf, port)?;
            proxies.push((proc, SocketAddr::from(([127, 0, 0, 1], port))));
        }
        let ep = self.endpoints(&agent);
        let route = Arc::new(Route {
            tls: ep.tls.clone(),
            agent: ep.agent_tcp,
            nginx1: proxies[0].1,
            nginx2: proxies[1].1,
            origin: origin_addr,
            ws: ws_echo.addr,
            http_headers: route_headers(origin_addr)?,
            ws_headers: route_headers(ws_echo.addr)?,
            bodies,
        });
        let pid = |via: Via| match via {
            Via::Agent => Some(agent.pid()),
            Via::Nginx1 => Some(proxies[0].0.pid()),
            Via::Nginx2 => Some(proxies[1].0.pid()),
            Via::Direct => None,
        };
        let pids: BTreeMap<Via, Option<u32>> = [Via::Agent, Via::Nginx1, Via::Nginx2, Via::Direct]
            .into_iter()
            .map(|v| (v, pid(v)))
            .collect();
        let mut suites = Vec::new();
        for via in HTTP_VIA {
            let r = route.clone();
            let suite = self.block(async move { r.tls_suite(via).await })??;
            suites.push(format!("{} {suite}", via.name()));
        }

        let s = &self.sizes;
        let (runs, warm, span) = (
            s.runs,
            Duration::from_millis(s.proxy_warm_ms),
            Duration::from_secs(s.proxy_secs),
        );
        let (ws_warm, ws_n) = (s.ws_warm, s.ws);
        let cases: Vec<Case> = BODIES
            .iter()
            .flat_map(|(file, _)| CLIENTS.iter().map(move |&c| (*file, c)))
            .collect();
        let mut results: BTreeMap<(Case, Via), Vec<LoadRun>> = BTreeMap::new();
        let mut ws_results: BTreeMap<Via, Vec<(f64, f64, Cpu)>> = BTreeMap::new();
        let mut agent_threads = 0;
        let origin_pid = origin.pid();
        for round in 0..runs {
            for &(file, clients) in &cases {
                for via in HTTP_VIA {
                    self.ensure_running(&mut agent)?;
                    origin.ensure_running()?;
                    for (p, _) in &mut proxies {
                        p.ensure_running()?;
                    }
                    let meter = Meter::new(pids[&via]);
                    let r = route.clone();
                    let procs = (pids[&via], origin_pid);
                    let run = self.block(async move {
                        load(r, via, file, clients, (warm, span), meter, procs).await
                    })??;
                    if via == Via::Agent {
                        agent_threads = procs::status_kb(agent.pid(), "Threads:").unwrap_or(0);
                    }
                    eprintln!(
                        "bench: proxy round {}/{runs} {file} x {clients} {}: {:.0} req/s, p50 \
                         {:.0} us, p99 {:.0} us, proxy {:.1} us/req, busy {:.0}%",
                        round + 1,
                        via.name(),
                        run.requests_per_s,
                        run.p50_us,
                        run.p99_us,
                        run.per_request_us(run.cpu.proxy_s),
                        run.busy_pct()
                    );
                    results.entry(((file, clients), via)).or_default().push(run);
                }
            }
            for via in WS_VIA {
                self.ensure_running(&mut agent)?;
                let meter = Meter::new(pids[&via]);
                let r = route.clone();
                let (samples, cpu) =
                    self.block(async move { ws_ping_pong(r, via, (ws_warm, ws_n), meter).await })??;
                let p50 = percentile(&samples, 50.0) as f64 / 1e3;
                let p99 = percentile(&samples, 99.0) as f64 / 1e3;
                eprintln!(
                    "bench: websocket round {}/{runs} {}: p50 {p50:.1} us p99 {p99:.1} us",
                    round + 1,
                    via.name()
                );
                ws_results.entry(via).or_default().push((p50, p99, cpu));
            }
        }
        drop(ws_echo);

        // The HTTP table.
        let mut rows = Vec::new();
        let mut section = serde_json::Map::new();
        let mut cases_json = Vec::new();
        for &(file, clients) in &cases {
            for via in HTTP_VIA {
                let r = &results[&((file, clients), via)];
                let rate = median(r, |x| x.requests_per_s);
                let p50 = median(r, |x| x.p50_us);
                let p99 = median(r, |x| x.p99_us);
                let proxy = median(r, |x| x.per_request_us(x.cpu.proxy_s));
                let client = median(r, |x| x.per_request_us(x.cpu.client_s));
                let origin_us = median(r, |x| x.per_request_us(x.origin_s));
                let busy = median(r, LoadRun::busy_pct);
                let switches = median(r, |x| {
                    x.proxy_ctx_switches as f64 / x.requests.max(1) as f64
                });
                rows.push(vec![
                    file.to_owned(),
                    clients.to_string(),
                    via.name().to_owned(),
                    show(rate.as_ref(), 0),
                    show(p50.as_ref(), 0),
                    show(p99.as_ref(), 0),
                    show(proxy.as_ref(), 1),
                    show(client.as_ref(), 1),
                    show(origin_us.as_ref(), 1),
                    show(busy.as_ref(), 0),
                    show(switches.as_ref(), 2),
                ]);
                cases_json.push(json!({
                    "body": file, "body_bytes": route.bodies[file].len(), "clients": clients,
                    "target": via.name(), "requests_per_s": rate, "p50_us": p50, "p99_us": p99,
                    "proxy_cpu_us_per_request": proxy, "client_cpu_us_per_request": client,
                    "origin_cpu_us_per_request": origin_us, "machine_busy_pct": busy,
                    "proxy_context_switches_per_request": switches,
                    "runs": r,
                }));
            }
        }
        let med = |case: Case, via: Via, f: &dyn Fn(&LoadRun) -> f64| {
            median(&results[&(case, via)], f).map_or(0.0, |s| s.median)
        };
        // Ratios of the agent to each nginx, per case.
        let mut ratio_rows = Vec::new();
        for &case in &cases {
            for nginx in [Via::Nginx1, Via::Nginx2] {
                let ratio = |f: &dyn Fn(&LoadRun) -> f64| {
                    med(case, Via::Agent, f) / med(case, nginx, f).max(1e-9)
                };
                ratio_rows.push(vec![
                    case.0.to_owned(),
                    case.1.to_string(),
                    nginx.name().to_owned(),
                    format!("{:.2}x", ratio(&|x| x.requests_per_s)),
                    format!("{:.2}x", ratio(&|x| x.p99_us)),
                    format!(
                        "{:.2}x",
                        ratio(&|x: &LoadRun| x.per_request_us(x.cpu.proxy_s))
                    ),
                ]);
            }
        }
        let judge =
            |what: &str, f: &dyn Fn(&LoadRun) -> f64, limit: f64, at_most: bool, unit: &str| {
                let mut observed = Vec::new();
                let mut pass = true;
                for &case in &cases {
                    let (a, b) = (med(case, Via::Agent, f), med(case, JUDGED, f));
                    let ratio = a / b.max(1e-9);
                    pass &= if at_most {
                        ratio <= limit
                    } else {
                        ratio >= limit
                    };
                    observed.push(format!(
                        "{} x{}: {a:.1} vs {b:.1} {unit} = {ratio:.2}x",
                        case.0, case.1
                    ));
                }
                Check::new(
                    format!(
                        "HTTP route {what} {} {limit:.1}x nginx's (2 workers), every case",
                        if at_most { "<=" } else { ">=" }
                    ),
                    observed.join("; "),
                    pass,
                )
            };
        let checks = vec![
            judge("requests/s", &|x| x.requests_per_s, 1.0, false, "req/s"),
            judge("p99", &|x| x.p99_us, 1.2, true, "us"),
            judge(
                "agent CPU per request",
                &|x: &LoadRun| x.per_request_us(x.cpu.proxy_s),
                1.0,
                true,
                "us",
            ),
        ];
        println!(
            "\n== HTTP routes: GET through the agent's {PREFIX}/ and through nginx proxy_pass, \
             TLS in (client certificate required), keep-alive on both hops; {} s per run after \
             {} ms warm-up; CPU per request from /proc\n\
             TLS: {}\n\
             agent: {agent_threads} threads (tokio: {} worker threads, one per core); nginx: \
             master + 1 or 2 workers, upstream keepalive {NGINX_KEEPALIVE} per worker\n{}\n\n\
             agent / nginx (medians)\n{}",
            span.as_secs(),
            warm.as_millis(),
            suites.join("; "),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            table(
                &[
                    "body",
                    "clients",
                    "target",
                    "req/s",
                    "p50 us",
                    "p99 us",
                    "proxy CPU us/req",
                    "client CPU us/req",
                    "origin CPU us/req",
                    "machine busy %",
                    "proxy ctx sw/req",
                ],
                &rows
            ),
            table(
                &["body", "clients", "vs", "req/s", "p99", "proxy CPU/req"],
                &ratio_rows
            ),
        );
        for check in &checks {
            println!("{}", check.line());
        }

        // The WebSocket table.
        let mut ws_rows = Vec::new();
        let mut ws_json = serde_json::Map::new();
        for via in WS_VIA {
            let r = &ws_results[&via];
            let p50 = Summary::of(&r.iter().map(|x| x.0).collect::<Vec<_>>());
            let p99 = Summary::of(&r.iter().map(|x| x.1).collect::<Vec<_>>());
            let cpu_us = Summary::of(
                &r.iter()
                    .map(|x| x.2.proxy_s / ws_n as f64 * 1e6)
                    .collect::<Vec<_>>(),
            );
            ws_rows.push(vec![
                via.name().to_owned(),
                show(p50.as_ref(), 1),
                show(p99.as_ref(), 1),
                if via == Via::Direct {
                    "-".to_owned()
                } else {
                    show(cpu_us.as_ref(), 1)
                },
            ]);
            ws_json.insert(
                via.name().into(),
                json!({"p50_us": p50, "p99_us": p99, "proxy_cpu_us_per_round_trip": cpu_us,
                       "cpu": r.iter().map(|x| x.2).collect::<Vec<_>>()}),
            );
        }
        let ws_med = |via: Via| {
            Summary::of(&ws_results[&via].iter().map(|x| x.0).collect::<Vec<_>>())
                .map_or(0.0, |s| s.median)
        };
        let (a, d) = (ws_med(Via::Agent), ws_med(Via::Direct));
        let limit = 1.2 * d + 50.0;
        let ws_check = Check::new(
            "WebSocket round trip p50 <= 1.2x direct + 50 us",
            format!("{a:.1} us vs direct {d:.1} us: limit {limit:.1} us"),
            a <= limit,
        );
        println!(
            "\n== WebSocket: {WS_MESSAGE}-byte binary messages ping-ponged on one connection, \
             {ws_n} round trips after {ws_warm} warm-up (echo: tokio-tungstenite, own thread)\n\
             {}\n{}",
            table(
                &["target", "p50 us", "p99 us", "proxy CPU us/round trip"],
                &ws_rows
            ),
            ws_check.line()
        );
        if let Some(note) = agent.log_note() {
            println!("{note}");
        }
        for name in ["origin", "nginx-1w", "nginx-2w"] {
            let errors = fs::read_to_string(dir.join(format!("{name}.err")))
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    ["[error]", "[crit]", "[alert]", "[emerg]"]
                        .iter()
                        .any(|e| l.contains(e))
                })
                .count();
            if errors > 0 {
                println!("note: {name} logged {errors} error lines ({name}.err)");
            }
        }
        self.checks.extend(checks);
        self.checks.push(ws_check);
        section.insert("http".into(), Value::Array(cases_json));
        section.insert("websocket".into(), Value::Object(ws_json));
        section.insert(
            "setup".into(),
            json!({
                "tls": suites, "agent_threads": agent_threads,
                "nginx_workers": [1, 2], "judged_against": JUDGED.name(),
                "nginx_upstream_keepalive": NGINX_KEEPALIVE,
                "warm_up_ms": warm.as_millis() as u64, "seconds": span.as_secs(),
                "ws_round_trips": ws_n, "ws_warm_up": ws_warm, "ws_message": WS_MESSAGE,
                "origin": route.origin.to_string(),
            }),
        );
        self.json.insert("proxy".into(), Value::Object(section));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_echo_counts_as_the_echo() {
        assert!(WS_THREAD.starts_with(crate::echo::THREAD));
    }
}
