//! The `docker` section: the Docker Engine API through the agent (TLS with ALPN `http/1.1`; the
//! agent relays to the engine's unix socket) against the same calls straight on that socket.
//!
//! - `GET /v1.41/containers/json?all=1` on one kept-alive connection: p50 and p99 of sequential
//!   calls after a warm-up (and `GET /v1.41/_ping` the same way: the relay's cost without the
//!   list's body); then `clients` clients, each on its own kept-alive connection, for a fixed
//!   time: calls per second. CPU per call of the agent, the engine and the bench's client.
//! - `GET /events` (filtered to this run's containers) opened through the agent and straight on
//!   the socket at the same moment, plus a second direct stream as a control; then a container
//!   is stopped and started `cycles` times: how much later each event arrived through the agent
//!   (and on the second direct stream) than on the first direct stream.
//!
//! [`CONTAINERS`] containers of [`IMAGE`] are created and started on the engine first (so the
//! list is a realistic one) and removed at the end, also when a measurement fails. The engine
//! is not started here: scripts/bench.sh starts one and passes `--docker-socket`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use godoxy_agent::client::ClientTls;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::harness::Bench;
use crate::load::{Cpu, Meter, OPEN_TIMEOUT, Target};
use crate::procs;
use crate::stats::{Check, Summary, percentile, ratio_check, show, table};

/// Containers created (and started) for the section.
pub const CONTAINERS: usize = 8;
/// The image they run: scripts/docker-engine.sh builds it (busybox printing "tick" each second).
pub const IMAGE: &str = "localhost/godoxy-test:latest";
/// The call measured.
const LIST: &str = "/v1.41/containers/json?all=1";
/// A call with a 2-byte reply, timed as well: the relay's cost without the list's body.
const PING: &str = "/v1.41/_ping";
/// The label every container of the bench carries; its value names the run.
const LABEL: &str = "godoxy.bench";
/// Bound on one call that changes the engine's state (create, start, stop, remove).
const ENGINE_CALL: Duration = Duration::from_secs(60);
/// The targets of this section, in the order each round runs them.
const VIA: [Target; 2] = [Target::Agent, Target::Direct];
/// The agent's added p50 this section aims at, in microseconds.
const ADDED_P50_TARGET_US: f64 = 300.0;
/// Calls per second through the agent, as a share of direct, this section aims at.
const RATE_TARGET: f64 = 0.7;

type Sender = SendRequest<Full<Bytes>>;

/// Where the calls go.
#[derive(Clone)]
struct Api {
    tls: ClientTls,
    agent: SocketAddr,
    socket: Arc<PathBuf>,
}

impl Api {
    /// A kept-alive HTTP/1.1 connection through `via` (the agent or straight on the socket).
    async fn connect(&self, via: Target) -> Result<Sender> {
        let open = async {
            match via {
                Target::Agent => handshake(self.tls.connect_http(self.agent).await?).await,
                _ => handshake(UnixStream::connect(&*self.socket).await?).await,
            }
        };
        timeout(OPEN_TIMEOUT, open)
            .await
            .map_err(|_| anyhow!("opening a {} connection timed out", via.name()))?
            .with_context(|| format!("opening a {} connection", via.name()))
    }
}

async fn handshake<I>(io: I) -> Result<Sender>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn request(method: Method, path: &str, body: Option<&Value>) -> Result<Request<Full<Bytes>>> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "docker");
    if body.is_some() {
        req = req.header(CONTENT_TYPE, "application/json");
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    Ok(req.body(Full::new(body))?)
}

/// One call, its reply read to the end.
async fn call(sender: &mut Sender, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes)> {
    sender.ready().await?;
    let response = sender.send_request(req).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// A timed call, checked: 200, and for the list a JSON array. Returns the reply's size.
async fn get(sender: &mut Sender, path: &str) -> Result<usize> {
    let (status, body) = call(sender, request(Method::GET, path, None)?).await?;
    if status != StatusCode::OK || (path == LIST && body.first() != Some(&b'[')) {
        bail!(
            "GET {path} answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(body.len())
}

/// The container list, checked.
async fn list(sender: &mut Sender) -> Result<usize> {
    get(sender, LIST).await
}

/// A call that changes the engine's state, on the socket, expecting one of `ok`.
async fn engine_call(
    sender: &mut Sender,
    method: Method,
    path: &str,
    body: Option<&Value>,
    ok: &[StatusCode],
) -> Result<Bytes> {
    let what = format!("{method} {path}");
    let (status, reply) = timeout(ENGINE_CALL, call(sender, request(method, path, body)?))
        .await
        .map_err(|_| anyhow!("{what}: no answer within {ENGINE_CALL:?}"))?
        .with_context(|| what.clone())?;
    if !ok.contains(&status) {
        bail!(
            "{what} answered {status}: {}",
            String::from_utf8_lossy(&reply[..reply.len().min(300)]).trim()
        );
    }
    Ok(reply)
}

/// Percent-encodes a query value (everything but the unreserved characters).
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The engine behind the socket: its name and version, and its process (for its CPU time).
struct Engine {
    name: String,
    pid: Option<u32>,
}

/// Checks that the engine answers `/_ping` and says what it is.
async fn probe(socket: Arc<PathBuf>) -> Result<Engine> {
    let stream = UnixStream::connect(&*socket).await?;
    // The process that listens on the socket: the engine (podman's service, dockerd).
    let pid = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .and_then(|p| u32::try_from(p).ok());
    let mut sender = handshake(stream).await?;
    let (status, _) = call(&mut sender, request(Method::GET, "/_ping", None)?).await?;
    if status != StatusCode::OK {
        bail!("GET /_ping answered {status}");
    }
    let (_, body) = call(&mut sender, request(Method::GET, "/v1.41/version", None)?).await?;
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    let name = v
        .pointer("/Components/0/Name")
        .and_then(Value::as_str)
        .unwrap_or("engine");
    Ok(Engine {
        name: format!("{name} {} (API {})", field("Version"), field("ApiVersion")),
        pid,
    })
}

/// Removes every container labelled by a bench (an earlier run that did not finish), then
/// creates and starts `n` containers labelled `run`. Returns their ids and the leftovers count.
async fn create_containers(
    socket: Arc<PathBuf>,
    run: String,
    n: usize,
) -> Result<(Vec<String>, usize)> {
    let mut sender = handshake(UnixStream::connect(&*socket).await?).await?;
    let filter = query_escape(&json!({ "label": [LABEL] }).to_string());
    let reply = engine_call(
        &mut sender,
        Method::GET,
        &format!("/v1.41/containers/json?all=1&filters={filter}"),
        None,
        &[StatusCode::OK],
    )
    .await?;
    let old: Vec<String> = serde_json::from_slice::<Vec<Value>>(&reply)
        .context("the container list is not a JSON array")?
        .iter()
        .filter_map(|c| c.get("Id").and_then(Value::as_str).map(str::to_owned))
        .collect();
    remove(&mut sender, &old).await?;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let body = json!({
            "Image": IMAGE,
            "Labels": { LABEL: run },
            // The image's shell handles SIGTERM once its `sleep 1` ends.
            "StopTimeout": 5,
        });
        let created = engine_call(
            &mut sender,
            Method::POST,
            &format!("/v1.41/containers/create?name=godoxy-bench-{run}-{i}"),
            Some(&body),
            &[StatusCode::CREATED],
        )
        .await;
        let created = match created {
            Ok(reply) => reply,
            Err(err) => {
                // What was created so far goes too.
                let _ = remove(&mut sender, &ids).await;
                return Err(err.context(format!(
                    "creating a container of {IMAGE} (scripts/docker-engine.sh start builds \
                     that image)"
                )));
            }
        };
        let id = serde_json::from_slice::<Value>(&created)
            .ok()
            .and_then(|v| v.get("Id").and_then(Value::as_str).map(str::to_owned))
            .ok_or_else(|| anyhow!("container create: no Id in the reply"))?;
        ids.push(id.clone());
        if let Err(err) = engine_call(
            &mut sender,
            Method::POST,
            &format!("/v1.41/containers/{id}/start"),
            None,
            &[StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED],
        )
        .await
        {
            let _ = remove(&mut sender, &ids).await;
            return Err(err);
        }
    }
    Ok((ids, old.len()))
}

/// Removes `ids` (running or not).
async fn remove(sender: &mut Sender, ids: &[String]) -> Result<()> {
    for id in ids {
        engine_call(
            sender,
            Method::DELETE,
            &format!("/v1.41/containers/{id}?force=1&v=1"),
            None,
            &[
                StatusCode::NO_CONTENT,
                StatusCode::OK,
                StatusCode::NOT_FOUND,
            ],
        )
        .await?;
    }
    Ok(())
}

/// The engine's CPU ticks (user + system), 0 without a known process.
fn engine_ticks(pid: Option<u32>) -> u64 {
    pid.map_or(0, |p| {
        let (u, s) = procs::tree_ticks(p);
        u + s
    })
}

/// One run of calls: CPU of the agent (0 for direct), the client and the machine, and the
/// engine's CPU seconds.
#[derive(Clone, Copy, Debug, Serialize)]
struct Calls {
    /// Calls made (timed).
    calls: usize,
    /// p50 of one call, microseconds (sequential runs).
    p50_us: f64,
    /// p99 of one call, microseconds (sequential runs).
    p99_us: f64,
    /// Calls per second.
    per_s: f64,
    /// CPU during the timed calls.
    cpu: Cpu,
    /// The engine process's CPU seconds during the timed calls.
    engine_s: f64,
    /// Everything else on the machine during the run: busy CPU time less the agent's, the
    /// bench's (client and echo threads) and the engine's, in % of one CPU.
    others_pct: f64,
}

/// `Calls::others_pct` from a run's CPU reading, the agent's CPU seconds and the engine's.
fn others_pct(cpu: &Cpu, agent_s: f64, engine_s: f64) -> f64 {
    let others = cpu.machine_s - agent_s - cpu.client_s - cpu.echo_s - engine_s;
    others.max(0.0) / cpu.wall_s.max(1e-9) * 100.0
}

impl Calls {
    fn agent_us(&self) -> f64 {
        self.cpu.proxy_s / self.calls.max(1) as f64 * 1e6
    }
    fn engine_us(&self) -> f64 {
        self.engine_s / self.calls.max(1) as f64 * 1e6
    }
    fn client_us(&self) -> f64 {
        self.cpu.client_s / self.calls.max(1) as f64 * 1e6
    }
    fn busy_pct(&self) -> f64 {
        self.cpu.machine_s / self.cpu.wall_s.max(1e-9) * 100.0
    }
}

/// One client, one kept-alive connection to the agent and one to the socket: `warm` then `n`
/// calls of `path` on each, alternating call by call (agent first on even calls, direct first
/// on odd ones), so that the engine's drift weighs on both alike. Returns the agent's figures,
/// the direct ones and the paired differences (agent minus direct, in us, call by call). The
/// CPU reading covers both, except the agent's own, which only the agent's calls use.
async fn paired(
    api: Arc<Api>,
    path: &'static str,
    warm: usize,
    n: usize,
    meter: Meter,
    engine: Option<u32>,
) -> Result<(Calls, Calls, Vec<f64>)> {
    let mut agent = api.connect(Target::Agent).await?;
    let mut direct = api.connect(Target::Direct).await?;
    let mut samples = [Vec::with_capacity(n), Vec::with_capacity(n)];
    let mut before = meter.snap();
    let mut engine_before = engine_ticks(engine);
    let run = async {
        for i in 0..warm + n {
            if i == warm {
                before = meter.snap();
                engine_before = engine_ticks(engine);
            }
            let mut took = [0u64; 2];
            for k in [i % 2, 1 - i % 2] {
                let sender = if k == 0 { &mut agent } else { &mut direct };
                let t0 = Instant::now();
                get(sender, path)
                    .await
                    .with_context(|| format!("{} GET {path}", VIA[k].name()))?;
                took[k] = t0.elapsed().as_nanos() as u64;
            }
            if i >= warm {
                samples[0].push(took[0]);
                samples[1].push(took[1]);
            }
        }
        anyhow::Ok(())
    };
    let limit = Duration::from_secs(30) + Duration::from_millis(200) * (warm + n) as u32;
    timeout(limit, run)
        .await
        .map_err(|_| anyhow!("sequential GET {path} exceeded {limit:?}"))??;
    let cpu = meter.since(&before);
    let engine_s = engine_ticks(engine).saturating_sub(engine_before) as f64 / procs::clk_tck();
    let diffs: Vec<f64> = samples[0]
        .iter()
        .zip(&samples[1])
        .map(|(a, d)| (*a as f64 - *d as f64) / 1e3)
        .collect();
    let whole = cpu;
    let figures = |sorted: &mut Vec<u64>, cpu: Cpu| {
        sorted.sort_unstable();
        Calls {
            calls: n,
            p50_us: percentile(sorted, 50.0) as f64 / 1e3,
            p99_us: percentile(sorted, 99.0) as f64 / 1e3,
            per_s: 0.0,
            cpu,
            // Half each: the engine serves both alike.
            engine_s: engine_s / 2.0,
            others_pct: others_pct(&whole, whole.proxy_s, engine_s),
        }
    };
    let [mut a, mut d] = samples;
    let direct_cpu = Cpu {
        proxy_s: 0.0,
        proxy_sys_s: 0.0,
        ..cpu
    };
    Ok((figures(&mut a, cpu), figures(&mut d, direct_cpu), diffs))
}

/// `clients` clients, each on its own kept-alive connection, listing for `secs` seconds.
async fn concurrent(
    api: Arc<Api>,
    via: Target,
    clients: usize,
    secs: u64,
    meter: Meter,
    engine: Option<u32>,
) -> Result<Calls> {
    let mut senders = Vec::with_capacity(clients);
    for _ in 0..clients {
        senders.push(api.connect(via).await?);
    }
    let start = Arc::new(Barrier::new(clients + 1));
    let span = Duration::from_secs(secs);
    let mut tasks = JoinSet::new();
    for mut sender in senders {
        let start = start.clone();
        tasks.spawn(async move {
            // One call each before the clock: the agent's pool to the engine fills up too.
            list(&mut sender).await?;
            start.wait().await;
            let end = Instant::now() + span;
            let mut n = 0usize;
            while Instant::now() < end {
                list(&mut sender).await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let limit = span + Duration::from_secs(60);
    let run = async {
        start.wait().await;
        let before = meter.snap();
        let engine_before = engine_ticks(engine);
        let mut calls = 0;
        while let Some(done) = tasks.join_next().await {
            calls += done.map_err(|e| anyhow!("client task: {e}"))??;
        }
        let cpu = meter.since(&before);
        let engine_s = engine_ticks(engine).saturating_sub(engine_before) as f64 / procs::clk_tck();
        anyhow::Ok(Calls {
            calls,
            p50_us: 0.0,
            p99_us: 0.0,
            per_s: calls as f64 / cpu.wall_s.max(1e-9),
            cpu,
            engine_s,
            others_pct: others_pct(&cpu, cpu.proxy_s, engine_s),
        })
    };
    timeout(limit, run)
        .await
        .map_err(|_| anyhow!("{} concurrent lists exceeded {limit:?}", via.name()))?
        .with_context(|| format!("{} concurrent lists ({clients} clients)", via.name()))
}

/// What one event stream saw: each event's key (id, action, timeNano) and when it arrived.
type Seen = Arc<Mutex<Vec<(String, Instant)>>>;

/// Reads an event stream, noting each event's arrival, until the task is aborted.
async fn watch(response: hyper::Response<hyper::body::Incoming>, seen: Seen) -> Result<()> {
    let mut body = response.into_body();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let now = Instant::now();
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            let s = |k: &str| event.get(k).map(|v| v.to_string()).unwrap_or_default();
            let key = format!("{} {} {}", s("id"), s("Action"), s("timeNano"));
            if let Ok(mut seen) = seen.lock() {
                seen.push((key, now));
            }
        }
    }
    Ok(())
}

/// The streams of the event measurement: agent, the first direct one, the second direct one.
const STREAMS: [(&str, Target); 3] = [
    ("agent", Target::Agent),
    ("direct", Target::Direct),
    ("direct 2", Target::Direct),
];

/// The event run: per stream, the events it saw and when.
struct EventRun {
    /// (events seen, each event's delay behind the first direct stream in us, header delay us)
    streams: Vec<(usize, Vec<f64>, f64)>,
    /// Events on the first direct stream.
    direct: usize,
    /// Stop/start cycles done.
    cycles: usize,
}

/// `later - earlier` in microseconds, negative when `later` came first.
fn signed_us(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(d) => d.as_secs_f64() * 1e6,
        None => -(earlier.duration_since(later).as_secs_f64() * 1e6),
    }
}

/// Opens the three event streams at once, stops and starts `id` `cycles` times, and matches
/// the events the streams saw.
async fn events(api: Arc<Api>, run: String, id: String, cycles: usize) -> Result<EventRun> {
    let filter = query_escape(
        &json!({ "label": [format!("{LABEL}={run}")], "type": ["container"] }).to_string(),
    );
    let path = format!("/v1.41/events?filters={filter}");
    let mut senders = Vec::new();
    for (name, via) in STREAMS {
        let mut sender = api.connect(via).await?;
        // A first call on each connection (and on the agent's pooled one to the engine): the
        // events request is then no connection's first.
        let (status, _) = call(&mut sender, request(Method::GET, "/_ping", None)?)
            .await
            .with_context(|| format!("GET /_ping ({name})"))?;
        if status != StatusCode::OK {
            bail!("GET /_ping ({name}) answered {status}");
        }
        sender.ready().await?;
        senders.push(sender);
    }
    // All three requests are queued back to back, so the engine starts them together.
    let mut pending = Vec::new();
    for sender in &mut senders {
        pending.push(sender.send_request(request(Method::GET, &path, None)?));
    }
    let mut tasks = Vec::new();
    let mut headers = Vec::new();
    let mut seen = Vec::new();
    for (future, (name, _)) in pending.into_iter().zip(STREAMS) {
        let response = timeout(OPEN_TIMEOUT, future)
            .await
            .map_err(|_| anyhow!("GET /events ({name}): no reply headers in {OPEN_TIMEOUT:?}"))?
            .with_context(|| format!("GET /events ({name})"))?;
        headers.push(Instant::now());
        if response.status() != StatusCode::OK {
            bail!("GET /events ({name}) answered {}", response.status());
        }
        let s: Seen = Arc::default();
        seen.push(s.clone());
        tasks.push(tokio::spawn(watch(response, s)));
    }
    let abort = |tasks: &[tokio::task::JoinHandle<Result<()>>]| {
        for t in tasks {
            t.abort();
        }
    };
    let work = async {
        // Give the engine a moment to follow its event log on all three.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut control = api.connect(Target::Direct).await?;
        for _ in 0..cycles {
            engine_call(
                &mut control,
                Method::POST,
                &format!("/v1.41/containers/{id}/stop?t=5"),
                None,
                &[StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED],
            )
            .await?;
            engine_call(
                &mut control,
                Method::POST,
                &format!("/v1.41/containers/{id}/start"),
                None,
                &[StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED],
            )
            .await?;
        }
        // Wait until the first direct stream has had nothing new for 1 s and the others have
        // caught up with it (bounded).
        let count = |s: &Seen| s.lock().map_or(0, |v| v.len());
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = (count(&seen[1]), Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let n = count(&seen[1]);
            if n != last.0 {
                last = (n, Instant::now());
            }
            let quiet = last.1.elapsed() >= Duration::from_secs(1);
            if (quiet && n > 0 && seen.iter().all(|s| count(s) >= n)) || Instant::now() > deadline {
                break;
            }
        }
        anyhow::Ok(())
    };
    let result = work.await;
    abort(&tasks);
    result?;
    for (t, (name, _)) in tasks.into_iter().zip(STREAMS) {
        match t.await {
            Ok(Err(err)) => return Err(err.context(format!("event stream ({name})"))),
            Ok(Ok(())) => bail!("the event stream ({name}) ended early"),
            Err(_) => {}
        }
    }
    let first = |s: &Seen| -> HashMap<String, Instant> {
        let mut m = HashMap::new();
        if let Ok(v) = s.lock() {
            for (k, t) in v.iter() {
                m.entry(k.clone()).or_insert(*t);
            }
        }
        m
    };
    let direct = first(&seen[1]);
    if direct.is_empty() {
        bail!("no container event arrived on the direct stream in {cycles} stop/start cycles");
    }
    let mut streams = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        let mine = first(s);
        let delays = direct
            .iter()
            .filter_map(|(k, d)| mine.get(k).map(|t| signed_us(*t, *d)))
            .collect();
        streams.push((mine.len(), delays, signed_us(headers[i], headers[1])));
    }
    Ok(EventRun {
        streams,
        direct: direct.len(),
        cycles,
    })
}

impl Bench {
    /// The Docker API through the agent against the engine's socket.
    pub fn section_docker(&mut self) -> Result<()> {
        let socket = self.docker_socket.clone().ok_or_else(|| {
            anyhow!(
                "no Docker engine: give --docker-socket PATH (a Docker-compatible engine's unix \
                 socket; scripts/bench.sh starts a test engine with scripts/docker-engine.sh \
                 and passes its socket)"
            )
        })?;
        let socket = Arc::new(socket);
        let s = socket.clone();
        let engine = timeout_block(self, "probing the engine", async move { probe(s).await })
            .with_context(|| {
                format!(
                    "the Docker engine at {} does not answer (start one with `bash \
                     scripts/docker-engine.sh start target/bench-engine`, as scripts/bench.sh \
                     does)",
                    socket.display()
                )
            })?;
        let run = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_micros())
        );
        let (s, r) = (socket.clone(), run.clone());
        let (ids, leftovers) = self.block(async move {
            create_containers(s, r, CONTAINERS)
                .await
                .context("creating the bench's containers")
        })??;
        let result = self.docker_measure(&socket, &engine, &run, &ids, leftovers);
        let s = socket.clone();
        let removed = self.block(async move {
            let mut sender = handshake(UnixStream::connect(&*s).await?).await?;
            remove(&mut sender, &ids).await
        });
        result?;
        removed?.context("removing the bench's containers")
    }

    fn docker_measure(
        &mut self,
        socket: &Arc<PathBuf>,
        engine: &Engine,
        run: &str,
        ids: &[String],
        leftovers: usize,
    ) -> Result<()> {
        let mut agent = self.start_agent()?;
        let ep = self.endpoints(&agent);
        let api = Arc::new(Api {
            tls: ep.tls.clone(),
            agent: ep.agent_tcp,
            socket: socket.clone(),
        });
        // What the list holds, and that the agent relays it.
        let a = api.clone();
        let (listed, running, reply_bytes) = self.block(async move {
            let mut sender = a.connect(Target::Direct).await?;
            let (status, body) = call(&mut sender, request(Method::GET, LIST, None)?).await?;
            if status != StatusCode::OK {
                bail!("GET {LIST} answered {status}");
            }
            let all: Vec<Value> = serde_json::from_slice(&body)?;
            let running = all
                .iter()
                .filter(|c| c.get("State").and_then(Value::as_str) == Some("running"))
                .count();
            let mut sender = a.connect(Target::Agent).await?;
            list(&mut sender)
                .await
                .context("the same list through the agent")?;
            anyhow::Ok((all.len(), running, body.len()))
        })??;
        let (warm, n, clients, secs, runs) = (
            self.sizes.docker_warm,
            self.sizes.docker_requests,
            self.sizes.docker_clients,
            self.sizes.docker_secs,
            self.sizes.runs,
        );
        let mut seq: BTreeMap<&str, Vec<Calls>> = BTreeMap::new();
        let mut ping: BTreeMap<&str, Vec<Calls>> = BTreeMap::new();
        let (mut seq_diff, mut ping_diff) = (Vec::new(), Vec::new());
        let mut conc: BTreeMap<&str, Vec<Calls>> = BTreeMap::new();
        for round in 0..runs {
            for (path, into, diffs) in [
                (LIST, &mut seq, &mut seq_diff),
                (PING, &mut ping, &mut ping_diff),
            ] {
                self.ensure_running(&mut agent)?;
                let pid = agent.pid();
                let a = api.clone();
                let epid = engine.pid;
                let (ra, rd, d) = self.block(async move {
                    paired(a, path, warm, n, Meter::new(Some(pid)), epid).await
                })??;
                let d = Summary::of(&d).map_or(0.0, |s| s.median);
                eprintln!(
                    "bench: docker round {}/{runs}: 1 client GET {path} p50 {:.0} us through the \
                     agent, {:.0} us direct; call by call the agent's took {d:.0} us more \
                     (median)",
                    round + 1,
                    ra.p50_us,
                    rd.p50_us,
                );
                into.entry("agent").or_default().push(ra);
                into.entry("direct").or_default().push(rd);
                diffs.push(d);
            }
            for via in VIA {
                self.ensure_running(&mut agent)?;
                let pid = self.proxy_pid(&agent, via);
                let a = api.clone();
                let epid = engine.pid;
                let r = self.block(async move {
                    concurrent(a, via, clients, secs, Meter::new(pid), epid).await
                })??;
                eprintln!(
                    "bench: docker round {}/{runs} {}: {clients} clients {:.0} calls/s",
                    round + 1,
                    via.name(),
                    r.per_s
                );
                conc.entry(via.name()).or_default().push(r);
            }
        }
        self.ensure_running(&mut agent)?;
        let (a, r, id, cycles) = (
            api.clone(),
            run.to_owned(),
            ids[0].clone(),
            self.sizes.docker_cycles,
        );
        let ev = self.block(async move { events(a, r, id, cycles).await })??;
        self.ensure_running(&mut agent)?;

        // Figures.
        let sum =
            |v: &[Calls], f: fn(&Calls) -> f64| Summary::of(&v.iter().map(f).collect::<Vec<_>>());
        let med = |s: Option<Summary>| s.map_or(0.0, |s| s.median);
        let mut section = serde_json::Map::new();
        let mut rows1 = Vec::new();
        let mut rows8 = Vec::new();
        for via in VIA {
            let (s1, s8, sp) = (&seq[via.name()], &conc[via.name()], &ping[via.name()]);
            let ping50 = sum(sp, |c| c.p50_us);
            let ping99 = sum(sp, |c| c.p99_us);
            let ping_agent = sum(sp, Calls::agent_us);
            let p50 = sum(s1, |c| c.p50_us);
            let p99 = sum(s1, |c| c.p99_us);
            let agent1 = sum(s1, Calls::agent_us);
            let rate = sum(s8, |c| c.per_s);
            let agent8 = sum(s8, Calls::agent_us);
            let kernel8 = sum(s8, |c| c.cpu.proxy_sys_s / c.cpu.proxy_s.max(1e-9) * 100.0);
            let engine8 = sum(s8, Calls::engine_us);
            let client8 = sum(s8, Calls::client_us);
            let busy8 = sum(s8, Calls::busy_pct);
            let others8 = sum(s8, |c| c.others_pct);
            let agent_only = |s: &Option<Summary>, d: usize| {
                if via == Target::Agent {
                    show(s.as_ref(), d)
                } else {
                    "-".to_owned()
                }
            };
            let engine_cell = |s: &Option<Summary>| {
                if engine.pid.is_some() {
                    show(s.as_ref(), 0)
                } else {
                    "?".to_owned()
                }
            };
            rows1.push(vec![
                via.name().to_owned(),
                show(p50.as_ref(), 0),
                show(p99.as_ref(), 0),
                agent_only(&agent1, 0),
                show(ping50.as_ref(), 0),
                show(ping99.as_ref(), 0),
                agent_only(&ping_agent, 0),
            ]);
            rows8.push(vec![
                via.name().to_owned(),
                show(rate.as_ref(), 0),
                agent_only(&agent8, 0),
                agent_only(&kernel8, 0),
                engine_cell(&engine8),
                show(client8.as_ref(), 0),
                show(busy8.as_ref(), 0),
                show(others8.as_ref(), 0),
            ]);
            section.insert(
                via.name().into(),
                json!({
                    "one_client": {"p50_us": p50, "p99_us": p99,
                                   "agent_cpu_us_per_call": agent1, "runs": s1},
                    "ping_one_client": {"p50_us": ping50, "p99_us": ping99,
                                        "agent_cpu_us_per_call": ping_agent, "runs": sp},
                    "clients": {"calls_per_s": rate, "agent_cpu_us_per_call": agent8,
                                "agent_kernel_pct": kernel8,
                                "engine_cpu_us_per_call": engine8,
                                "client_cpu_us_per_call": client8,
                                "machine_busy_pct": busy8, "others_pct": others8,
                                "runs": s8},
                }),
            );
        }
        // The paired runs' CPU readings cover both targets' calls (2 x n per run).
        let both = |v: &[Calls], f: fn(&Cpu) -> f64| {
            Summary::of(
                &v.iter()
                    .map(|c| f(&c.cpu) / (2 * c.calls.max(1)) as f64 * 1e6)
                    .collect::<Vec<_>>(),
            )
        };
        // Each side of a paired run holds half the engine's CPU: this is per call of either.
        let engine1 = sum(&seq["agent"], Calls::engine_us);
        let client1 = both(&seq["agent"], |c| c.client_s);
        let busy1 = sum(&seq["agent"], Calls::busy_pct);
        let others1 = sum(&seq["agent"], |c| c.others_pct);
        let seq_diff = Summary::of(&seq_diff);
        let ping_diff = Summary::of(&ping_diff);
        let p50 = |t: Target| med(sum(&seq[t.name()], |c| c.p50_us));
        // The agent's added p50: per run (both sides of a run are interleaved), then the median.
        let added_by_run = |m: &BTreeMap<&str, Vec<Calls>>| {
            Summary::of(
                &m["agent"]
                    .iter()
                    .zip(&m["direct"])
                    .map(|(a, d)| a.p50_us - d.p50_us)
                    .collect::<Vec<_>>(),
            )
        };
        let (added_runs, ping_added_runs) = (added_by_run(&seq), added_by_run(&ping));
        let added = med(added_runs.clone());
        let rate = |t: Target| med(sum(&conc[t.name()], |c| c.per_s));
        let checks = [
            Check::new(
                "Docker list: agent's added p50 <= 0.3 ms",
                format!(
                    "{added:.0} us (agent p50 - direct p50 in each run, median; p50 {:.0} us \
                     through the agent, {:.0} us direct; median of the call-by-call differences \
                     {:.0} us)",
                    p50(Target::Agent),
                    p50(Target::Direct),
                    seq_diff.as_ref().map_or(0.0, |s| s.median)
                ),
                added <= ADDED_P50_TARGET_US,
            ),
            ratio_check(
                &format!("Docker list: calls/s with {clients} clients >= 0.7x direct"),
                rate(Target::Agent),
                rate(Target::Direct),
                RATE_TARGET,
                false,
                "calls/s",
            ),
        ];

        let mut ev_rows = Vec::new();
        let mut ev_json = serde_json::Map::new();
        for ((name, _), (seen, delays, header)) in STREAMS.iter().zip(&ev.streams) {
            if *name == "direct" {
                continue;
            }
            let d = Summary::of(delays);
            // Beyond 5 ms: the engine's own per-stream timing (see the second direct stream).
            let far = delays.iter().filter(|d| d.abs() > 5000.0).count();
            ev_rows.push(vec![
                (*name).to_owned(),
                format!("{} of {}", delays.len(), ev.direct),
                far.to_string(),
                d.as_ref()
                    .map_or("-".into(), |d| format!("{:.0}", d.median)),
                d.as_ref().map_or("-".into(), |d| format!("{:.0}", d.max)),
                d.as_ref().map_or("-".into(), |d| format!("{:.0}", d.min)),
                format!("{header:.0}"),
            ]);
            ev_json.insert(
                name.replace(' ', "_"),
                json!({"events_seen": seen, "matched": delays.len(), "off_by_over_5_ms": far,
                       "later_than_direct_us": {"median": d.as_ref().map(|d| d.median),
                                                "max": d.as_ref().map(|d| d.max),
                                                "min": d.as_ref().map(|d| d.min),
                                                "each": delays},
                       "reply_headers_later_us": header}),
            );
        }
        ev_json.insert("direct_events".into(), json!(ev.direct));
        ev_json.insert("stop_start_cycles".into(), json!(ev.cycles));

        println!(
            "\n== Docker API: GET {LIST}, {engine_name}; {listed} containers listed ({CONTAINERS} \
             of the bench, {running} running{extra}), reply {reply_bytes} bytes",
            engine_name = engine.name,
            extra = if leftovers > 0 {
                format!("; {leftovers} left by an earlier run removed first")
            } else {
                String::new()
            }
        );
        println!(
            "1 client with one kept-alive connection to each target, {n} calls after {warm} \
             warm-up on each, alternating agent and direct call by call (the list, then GET \
             {PING} the same way):\n{}",
            table(
                &[
                    "target",
                    "list p50 us",
                    "list p99 us",
                    "agent CPU us/list",
                    "_ping p50 us",
                    "_ping p99 us",
                    "agent CPU us/_ping"
                ],
                &rows1
            )
        );
        println!(
            "call by call, the agent's call took longer than the direct one next to it by \
             (median): list {} us, /_ping {} us; per list call (both targets): engine CPU {} \
             us, client CPU {} us; machine busy {} %, of which other processes {} %",
            show(seq_diff.as_ref(), 0),
            show(ping_diff.as_ref(), 0),
            if engine.pid.is_some() {
                show(engine1.as_ref(), 0)
            } else {
                "?".to_owned()
            },
            show(client1.as_ref(), 0),
            show(busy1.as_ref(), 0),
            show(others1.as_ref(), 0),
        );
        println!(
            "{clients} clients, each on its own kept-alive connection, {secs} s:\n{}",
            table(
                &[
                    "target",
                    "calls/s",
                    "agent CPU us/call",
                    "agent kernel %",
                    "engine CPU us/call",
                    "client CPU us/call",
                    "machine busy %",
                    "other processes %"
                ],
                &rows8
            )
        );
        println!(
            "agent's added p50 (agent p50 - direct p50 per run): list {} us (target <= \
             {ADDED_P50_TARGET_US:.0} us), /_ping {} us; calls/s through the agent: {:.2}x \
             direct (target >= {RATE_TARGET}x)",
            show(added_runs.as_ref(), 0),
            show(ping_added_runs.as_ref(), 0),
            rate(Target::Agent) / rate(Target::Direct).max(1e-9)
        );
        println!(
            "\n== Docker events: GET /events (this run's containers) through the agent, \
             straight on the socket and on a second direct stream as a control, opened at \
             once; {} stop/start cycles of one container, {} events on the direct stream; \
             arrival after the direct stream's, us (negative: earlier)\n{}",
            ev.cycles,
            ev.direct,
            table(
                &[
                    "stream",
                    "events matched",
                    "off by > 5 ms",
                    "median us",
                    "max us",
                    "min us",
                    "reply headers later us"
                ],
                &ev_rows
            )
        );
        if engine.pid.is_none() {
            println!("note: the engine's process was not found: its CPU is not reported");
        }
        for c in checks {
            println!("{}", c.line());
            self.checks.push(c);
        }
        if let Some(note) = agent.log_note() {
            println!("{note}");
        }
        section.insert(
            "engine".into(),
            json!({"socket": socket.display().to_string(), "engine": engine.name,
                   "pid": engine.pid}),
        );
        section.insert(
            "containers".into(),
            json!({"listed": listed, "bench": CONTAINERS, "running": running,
                   "leftovers_removed": leftovers, "image": IMAGE,
                   "reply_bytes": reply_bytes}),
        );
        section.insert("call".into(), json!(format!("GET {LIST}")));
        section.insert("sequential_calls".into(), json!(n));
        section.insert("warm_up_calls".into(), json!(warm));
        section.insert("clients".into(), json!(clients));
        section.insert("clients_seconds".into(), json!(secs));
        section.insert("added_p50_us".into(), json!(added_runs));
        section.insert("ping_added_p50_us".into(), json!(ping_added_runs));
        section.insert(
            "one_client_both".into(),
            json!({"paired_difference_median_us": {"list": seq_diff, "ping": ping_diff},
                   "engine_cpu_us_per_list": engine1, "client_cpu_us_per_list": client1,
                   "machine_busy_pct": busy1, "others_pct": others1}),
        );
        section.insert(
            "calls_per_s_ratio".into(),
            json!(rate(Target::Agent) / rate(Target::Direct).max(1e-9)),
        );
        section.insert("events".into(), Value::Object(ev_json));
        self.json.insert("docker".into(), Value::Object(section));
        Ok(())
    }
}

/// `block` with a 30 s bound, for the engine probe.
fn timeout_block<T: Send + 'static>(
    bench: &Bench,
    what: &'static str,
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    bench.block(async move {
        timeout(Duration::from_secs(30), fut)
            .await
            .map_err(|_| anyhow!("{what}: no answer within 30 s"))?
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_a_filter() {
        assert_eq!(
            query_escape(r#"{"label":["a=b"]}"#),
            "%7B%22label%22%3A%5B%22a%3Db%22%5D%7D"
        );
    }

    #[test]
    fn signed_delays() {
        let t = Instant::now();
        let later = t + Duration::from_micros(250);
        assert!((signed_us(later, t) - 250.0).abs() < 1.0);
        assert!((signed_us(t, later) + 250.0).abs() < 1.0);
    }
}
