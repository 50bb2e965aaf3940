//! `bench`: the agent (the release binary, as a child process) against stunnel, socat and a
//! direct connection, all on 127.0.0.1. Prints tables and the issue's targets, writes JSON.
//!
//! ```text
//! cargo run --release --bin bench -- --out bench.json [--quick] [--only tcp,rtt,tps,udp,mem]
//! ```
//!
//! Every figure is the median of `--runs` runs (3; 1 with `--quick`) with min and max; per
//! round the targets run interleaved (agent, stunnel, socat, direct). CPU time, RSS and fds are
//! read from /proc for the proxies; the client and echo run on named threads of this process.

#[path = "bench/echo.rs"]
mod echo;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/procs.rs"]
mod procs;
#[path = "bench/stats.rs"]
mod stats;
#[path = "bench/udp.rs"]
mod udp;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, ValueEnum};
use godoxy_agent::certs::CertSet;
use godoxy_agent::client::ClientTls;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

use crate::echo::Echo;
use crate::load::{Cpu, Endpoints, Meter, Target};
use crate::procs::{Proc, TempDir};
use crate::stats::{Check, Summary, percentile, show};
use crate::udp::Dgram;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Benchmark godoxy-agent against stunnel4, socat and direct on 127.0.0.1"
)]
struct Args {
    /// Write the results as JSON here.
    #[arg(long, value_name = "PATH", default_value = "bench.json")]
    out: PathBuf,
    /// Small sizes and one run each: a smoke run of a minute or so.
    #[arg(long)]
    quick: bool,
    /// Sections to run, comma separated [default: all].
    #[arg(long, value_delimiter = ',', value_name = "SECTIONS")]
    only: Vec<Section>,
    /// Runs per figure (the median is reported) [default: 3, 1 with --quick].
    #[arg(long)]
    runs: Option<usize>,
    /// The agent binary [default: godoxy-agent beside this executable, built first].
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Do not run `cargo build --release --bin godoxy-agent` first.
    #[arg(long)]
    no_build: bool,
    /// Do not apt-get install socat and stunnel4 when missing.
    #[arg(long)]
    no_install: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Section {
    Tcp,
    Rtt,
    Tps,
    Udp,
    Mem,
}

/// How much each section does.
struct Sizes {
    runs: usize,
    tcp1: u64,
    tcp8: u64,
    rtt_warm: usize,
    rtt: usize,
    tps: usize,
    tps_parallel: usize,
    udp: u64,
    udp_sessions: usize,
    mem_tcp: usize,
    mem_udp: usize,
}

impl Sizes {
    fn new(args: &Args) -> Self {
        const MIB: u64 = 1 << 20;
        let quick = args.quick;
        let q = |full: u64, small: u64| if quick { small } else { full };
        Self {
            runs: args.runs.unwrap_or(if quick { 1 } else { 3 }).max(1),
            tcp1: q(512, 32) * MIB,
            tcp8: q(64, 4) * MIB,
            rtt_warm: q(2000, 200) as usize,
            rtt: q(20_000, 2000) as usize,
            tps: q(2000, 200) as usize,
            tps_parallel: 8,
            udp: q(200_000, 20_000),
            udp_sessions: 8,
            mem_tcp: q(1000, 200) as usize,
            mem_udp: q(200, 50) as usize,
        }
    }
}

const TARGETS: [Target; 4] = [
    Target::Agent,
    Target::Stunnel,
    Target::Socat,
    Target::Direct,
];
const PROXIES: [Target; 3] = [Target::Agent, Target::Stunnel, Target::Socat];
const MIB: f64 = 1048576.0;
/// "Back near idle" after the tunnels/s run: fds within this many of idle...
const NEAR_IDLE_FDS: usize = 2;
/// ... and RSS within this many kB of idle.
const NEAR_IDLE_RSS_KB: u64 = 1024;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(err) => {
            eprintln!("bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A running agent started for one section.
struct Agent {
    proc: Proc,
    tcp: SocketAddr,
    udp: SocketAddr,
}

impl Agent {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }
    fn rss_kb(&self) -> u64 {
        procs::rss_kb(self.pid())
    }
    fn fds(&self) -> usize {
        procs::fd_count(self.pid())
    }
    /// Warnings and errors the agent logged (RUST_LOG=warn: nothing else is logged).
    fn log_note(&self) -> Option<String> {
        let n = self.proc.log_count(" WARN ") + self.proc.log_count(" ERROR ");
        (n > 0).then(|| {
            format!(
                "note: the agent logged {n} warning/error lines; last ones:\n{}",
                self.proc.log_tail(3)
            )
        })
    }
}

/// The agent's memory and fds at one moment.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct MemReading {
    fds: usize,
    rss: u64,
    anon: u64,
    file: u64,
}

impl MemReading {
    fn of(agent: &Agent) -> Self {
        let pid = agent.pid();
        Self {
            fds: agent.fds(),
            rss: procs::rss_kb(pid),
            anon: procs::status_kb(pid, "RssAnon:").unwrap_or(0),
            file: procs::status_kb(pid, "RssFile:").unwrap_or(0),
        }
    }

    /// kB of RSS per item over `base`.
    fn per(&self, base: &Self, items: usize) -> f64 {
        (self.rss as f64 - base.rss as f64) / items.max(1) as f64
    }
}

/// What one memory round saw.
struct MemRound {
    rows: Vec<(String, MemReading, String)>,
    idle: MemReading,
    per_tcp: f64,
    per_tcp_used: f64,
    per_udp: f64,
    per_udp_used: f64,
    echo_seen: usize,
    notes: Vec<String>,
}

struct Bench {
    sizes: Sizes,
    dir: TempDir,
    agent_bin: PathBuf,
    echo: Echo,
    rt: Runtime,
    tls: ClientTls,
    stunnel: Option<(Proc, SocketAddr)>,
    socat: Option<(Proc, SocketAddr)>,
    agents_started: usize,
    json: serde_json::Map<String, Value>,
    checks: Vec<Check>,
}

fn run(args: Args) -> Result<bool> {
    let sizes = Sizes::new(&args);
    let mut sections = if args.only.is_empty() {
        vec![
            Section::Tcp,
            Section::Rtt,
            Section::Tps,
            Section::Udp,
            Section::Mem,
        ]
    } else {
        args.only.clone()
    };
    sections.sort();
    sections.dedup();
    let agent_bin = agent_binary(&args)?;
    let proxies = sections
        .iter()
        .any(|s| matches!(s, Section::Tcp | Section::Rtt | Section::Tps));
    let tools = if proxies {
        Some(procs::ensure_tools(!args.no_install)?)
    } else {
        None
    };
    // 1000 open tunnels are 2000+ fds here (client and echo sides) and in the agent, which
    // inherits our limit: raise the soft limit toward the hard one.
    let _ = rlimit::increase_nofile_limit(8192.max(4 * sizes.mem_tcp as u64 + 1024));
    if let Some(limit) = procs::nofile_limit()
        && limit < 4 * sizes.mem_tcp as u64 + 256
    {
        bail!(
            "the open-files limit is {limit}: raise it (`ulimit -n 65536`, or use scripts/bench.sh)"
        );
    }

    let dir = TempDir::new("godoxy-bench")?;
    CertSet::generate()?.write(&dir.0, true)?;
    let echo = Echo::start()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(load::CLIENT_THREAD)
        .enable_all()
        .build()
        .context("building the client runtime")?;
    let tls = ClientTls::from_dir(&dir.0)?;
    let mut bench = Bench {
        sizes,
        dir,
        agent_bin,
        echo,
        rt,
        tls,
        stunnel: None,
        socat: None,
        agents_started: 0,
        json: serde_json::Map::new(),
        checks: Vec::new(),
    };
    if let Some((socat, stunnel)) = &tools {
        bench.start_proxies(socat, stunnel)?;
    }
    // Other load on the machine skews every figure: wait (up to 30 s) for a quiet second.
    let mut background = 100.0;
    for _ in 0..30 {
        let (b0, t0) = procs::machine_ticks();
        std::thread::sleep(Duration::from_secs(1));
        let (b1, t1) = procs::machine_ticks();
        background = (b1 - b0) as f64 / (t1 - t0).max(1) as f64 * 100.0;
        if background <= 10.0 {
            break;
        }
        eprintln!("bench: the machine is {background:.0}% busy before the run; waiting");
    }
    let mut meta = bench.meta(&args, tools.as_ref());
    meta["background_busy_pct"] = json!(background);
    bench.json.insert("meta".into(), meta);
    println!("{}", bench.header());
    println!(
        "machine busy before the run: {background:.0}% of all CPUs{}",
        if background > 10.0 {
            " (WARNING: other load will skew the figures)"
        } else {
            ""
        }
    );

    let started = Instant::now();
    let mut errors = BTreeMap::new();
    for section in sections {
        let result = match section {
            Section::Tcp => bench.section_tcp(),
            Section::Rtt => bench.section_rtt(),
            Section::Tps => bench.section_tps(),
            Section::Udp => bench.section_udp(),
            Section::Mem => bench.section_mem(),
        };
        if let Err(err) = result {
            let name = format!("{section:?}").to_lowercase();
            println!("\n== {name}: FAILED: {err:#}");
            errors.insert(name, format!("{err:#}"));
        }
    }

    println!("\n== Targets (from the issue)");
    for check in &bench.checks {
        println!("{}", check.line());
    }
    let passed = bench.checks.iter().filter(|c| c.pass).count();
    println!(
        "{passed} of {} targets met; {} section(s) failed; {:.0} s in all",
        bench.checks.len(),
        errors.len(),
        started.elapsed().as_secs_f64()
    );
    bench.json.insert("targets".into(), json!(bench.checks));
    bench.json.insert("errors".into(), json!(errors));
    bench
        .json
        .insert("elapsed_s".into(), json!(started.elapsed().as_secs_f64()));
    let text = serde_json::to_string_pretty(&Value::Object(bench.json.clone()))?;
    fs::write(&args.out, text).with_context(|| format!("writing {}", args.out.display()))?;
    println!("JSON: {}", args.out.display());
    Ok(errors.is_empty())
}

/// The agent binary: `--agent`, else `godoxy-agent` beside this executable, rebuilt with
/// cargo first (cargo does nothing when it is up to date) unless `--no-build`.
fn agent_binary(args: &Args) -> Result<PathBuf> {
    if let Some(path) = &args.agent {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let dir = exe.parent().context("this executable has no folder")?;
    let bin = dir.join("godoxy-agent");
    let release = dir.file_name().is_some_and(|n| n == "release");
    if !release {
        eprintln!(
            "bench: warning: not a release build ({}): the agent beside it is not what ships; \
             use `cargo run --release --bin bench`",
            dir.display()
        );
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    if !args.no_build && manifest.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.arg("build").arg("--bin").arg("godoxy-agent");
        if release {
            cmd.arg("--release");
        }
        cmd.arg("--manifest-path").arg(&manifest);
        // `cargo run` gives us its package's variables; build scripts (ring's) rerun when they
        // differ, so the nested build and the next `cargo run` would rebuild each other.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || k.starts_with("CARGO_BIN_")
                || ["CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE", "OUT_DIR"].contains(&k.as_ref())
            {
                cmd.env_remove(&key);
            }
        }
        eprintln!(
            "bench: building the agent: cargo build --bin godoxy-agent{}",
            if release { " --release" } else { "" }
        );
        let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            if bin.exists() {
                eprintln!(
                    "bench: warning: building the agent failed; measuring the existing {}",
                    bin.display()
                );
            } else {
                bail!(
                    "building the agent failed and {} does not exist",
                    bin.display()
                );
            }
        }
    }
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release --bins`",
            bin.display()
        );
    }
    Ok(bin)
}

fn agent_config(port: u16) -> String {
    format!(
        "# written by the bench\n\
         name = \"bench\"\n\
         [listen]\n\
         tcp = \"127.0.0.1:{port}\"\n\
         udp = \"127.0.0.1:{port}\"\n\
         [tls]\n\
         ca = \"ca.pem\"\n\
         cert = \"server.pem\"\n\
         key = \"server.key\"\n\
         require_client_cert = true\n\
         [stream]\n\
         handshake_timeout = \"10s\"\n\
         header_timeout = \"10s\"\n\
         dial_timeout = \"10s\"\n\
         udp_idle_timeout = \"600s\"\n\
         max_udp_sessions = 1024\n\
         max_udp_handshakes = 256\n\
         max_connections = 4096\n\
         shutdown_grace = \"1s\"\n"
    )
}

/// A plain text table with aligned columns.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width[i]))
            .collect::<Vec<_>>()
            .join(" | ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(head.iter().map(|s| s.to_string()).collect());
    out.push('\n');
    out.push_str(
        &width
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-|-"),
    );
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}

/// `a >= factor * b` (or `<=` with `at_most`), with the figures spelled out.
fn ratio_check(target: &str, a: f64, b: f64, factor: f64, at_most: bool, unit: &str) -> Check {
    let ratio = if b > 0.0 { a / b } else { f64::INFINITY };
    let pass = if at_most {
        ratio <= factor
    } else {
        ratio >= factor
    };
    Check::new(
        target,
        format!("{a:.2} vs {b:.2} {unit}: {ratio:.2}x"),
        pass,
    )
}

fn cpu_summary(runs: &[Cpu], f: impl Fn(&Cpu) -> f64) -> Option<Summary> {
    Summary::of(&runs.iter().map(f).collect::<Vec<_>>())
}

impl Bench {
    /// Runs `fut` on the client runtime's worker threads (so its CPU counts as the client's).
    fn block<F>(&self, fut: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = self.rt.spawn(fut);
        self.rt
            .block_on(task)
            .map_err(|e| anyhow::anyhow!("bench task failed: {e}"))
    }

    fn start_proxies(&mut self, socat: &Path, stunnel: &Path) -> Result<()> {
        let dir = &self.dir.0;
        let echo = self.echo.tcp.port();
        let port = procs::free_port(false)?;
        let conf = dir.join("stunnel.conf");
        fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\nsyslog = no\ndebug = 4\n\
                 [bench]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{echo}\n\
                 cert = {d}/server.pem\nkey = {d}/server.key\nCAfile = {d}/ca.pem\nverify = 2\n",
                d = dir.display()
            ),
        )?;
        let mut cmd = Command::new(stunnel);
        cmd.arg(&conf);
        let mut proc = Proc::spawn("stunnel", cmd, &dir.join("stunnel.log"))?;
        proc.wait_until("listening", Duration::from_secs(10), || {
            procs::tcp_listening(port)
        })?;
        self.stunnel = Some((proc, SocketAddr::from(([127, 0, 0, 1], port))));

        let port = procs::free_port(false)?;
        let mut cmd = Command::new(socat);
        cmd.arg(format!("TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1"))
            .arg(format!("TCP:127.0.0.1:{echo}"));
        let mut proc = Proc::spawn("socat", cmd, &dir.join("socat.log"))?;
        proc.wait_until("listening", Duration::from_secs(10), || {
            procs::tcp_listening(port)
        })?;
        self.socat = Some((proc, SocketAddr::from(([127, 0, 0, 1], port))));
        Ok(())
    }

    /// A fresh agent (each section gets its own, so idle figures mean idle).
    fn start_agent(&mut self) -> Result<Agent> {
        self.agents_started += 1;
        let n = self.agents_started;
        let port = procs::free_port(true)?;
        let conf = self.dir.0.join(format!("agent-{n}.toml"));
        fs::write(&conf, agent_config(port))?;
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg("run").arg("--config").arg(&conf);
        // Per-tunnel lines are info: at warn they cost nothing.
        cmd.env("RUST_LOG", "warn");
        for var in [
            "AGENT_NAME",
            "AGENT_PORT",
            "AGENT_CA_CERT",
            "AGENT_SSL_CERT",
            "AGENT_SKIP_CLIENT_CERT_CHECK",
            "RUNTIME",
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
        ] {
            cmd.env_remove(var);
        }
        let log = self.dir.0.join(format!("agent-{n}.log"));
        let mut proc = Proc::spawn("agent", cmd, &log)?;
        proc.wait_until("listening on tcp and udp", Duration::from_secs(10), || {
            procs::tcp_listening(port) && procs::udp_bound(port)
        })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Ok(Agent {
            proc,
            tcp: addr,
            udp: addr,
        })
    }

    fn endpoints(&self, agent: &Agent) -> Endpoints {
        let none = SocketAddr::from(([127, 0, 0, 1], 0));
        Endpoints {
            tls: self.tls.clone(),
            agent_tcp: agent.tcp,
            agent_udp: agent.udp,
            stunnel: self.stunnel.as_ref().map_or(none, |s| s.1),
            socat: self.socat.as_ref().map_or(none, |s| s.1),
            echo_tcp: self.echo.tcp,
            echo_udp: self.echo.udp,
        }
    }

    fn proxy_pid(&self, agent: &Agent, target: Target) -> Option<u32> {
        match target {
            Target::Agent => Some(agent.pid()),
            Target::Stunnel => self.stunnel.as_ref().map(|s| s.0.pid()),
            Target::Socat => self.socat.as_ref().map(|s| s.0.pid()),
            Target::Direct => None,
        }
    }

    fn ensure_running(&mut self, agent: &mut Agent) -> Result<()> {
        agent.proc.ensure_running()?;
        if let Some((p, _)) = self.stunnel.as_mut() {
            p.ensure_running()?;
        }
        if let Some((p, _)) = self.socat.as_mut() {
            p.ensure_running()?;
        }
        Ok(())
    }

    /// One checked echo through each target: the setup works before anything is timed.
    fn warm_up(&self, ep: &Arc<Endpoints>, targets: &[Target]) -> Result<()> {
        for &t in targets {
            let ep = ep.clone();
            let meter = Meter::new(None);
            self.block(async move {
                load::throughput(&ep, t, 1, 1 << 20, &meter, Duration::from_secs(30)).await
            })??;
        }
        Ok(())
    }

    fn header(&self) -> String {
        let size = fs::metadata(&self.agent_bin).map(|m| m.len()).unwrap_or(0);
        format!(
            "godoxy-agent bench: {} CPUs, everything on 127.0.0.1; agent {} ({:.2} MiB), \
             RUST_LOG=warn, a fresh agent per section\n\
             CPU split: the proxy under test (its own process), the bench's client runtime \
             (2 threads 'bench-client': TLS/DTLS client, payload generation and checks) and the \
             echo runtime (1 thread 'bench-echo') share the machine; each table gives their CPU \
             seconds (client/echo/machine columns)\n\
             figures: median [min..max] of {} run(s), targets interleaved per round; MB = 10^6 \
             bytes, kB = 1024 bytes (as /proc)",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            self.agent_bin.display(),
            size as f64 / MIB,
            self.sizes.runs
        )
    }

    fn meta(&self, args: &Args, tools: Option<&(PathBuf, PathBuf)>) -> Value {
        let size = fs::metadata(&self.agent_bin).map(|m| m.len()).unwrap_or(0);
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let s = &self.sizes;
        json!({
            "agent_binary": self.agent_bin.display().to_string(),
            "agent_binary_bytes": size,
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "kernel": kernel.trim(),
            "quick": args.quick,
            "runs": s.runs,
            "socat": tools.map(|t| procs::tool_version(&t.0, "-V")),
            "stunnel": tools.map(|t| procs::tool_version(&t.1, "-version")),
            "sizes": {
                "tcp_1_tunnel_bytes": s.tcp1, "tcp_8_tunnels_bytes_each": s.tcp8,
                "rtt_round_trips": s.rtt, "rtt_warm_up": s.rtt_warm,
                "tps_tunnels": s.tps, "tps_parallel": s.tps_parallel,
                "udp_datagrams_per_session_1": s.udp,
                "udp_datagrams_per_session_8": s.udp,
                "udp_sessions": s.udp_sessions, "udp_payload": udp::PAYLOAD,
                "udp_window": udp::WINDOW,
                "mem_tcp_tunnels": s.mem_tcp, "mem_udp_sessions": s.mem_udp,
            },
            "cpu_split": "proxy: its process (socat: with its forked children); client: threads \
                          'bench-client' (2 workers); echo: thread 'bench-echo' (1 worker); \
                          machine: /proc/stat busy time",
        })
    }

    fn section_tcp(&mut self) -> Result<()> {
        let mut agent = self.start_agent()?;
        let ep = Arc::new(self.endpoints(&agent));
        self.warm_up(&ep, &TARGETS)?;
        let mut suites = BTreeMap::new();
        for t in [Target::Agent, Target::Stunnel] {
            let e = ep.clone();
            suites.insert(t.name(), self.block(async move { e.tls_suite(t).await })??);
        }
        let s = &self.sizes;
        let cases = [
            ("1 tunnel", 1usize, s.tcp1, Duration::from_secs(300)),
            ("8 tunnels", 8usize, s.tcp8, Duration::from_secs(300)),
        ];
        let runs = s.runs;
        let mut results: BTreeMap<(usize, &str), Vec<Cpu>> = BTreeMap::new();
        for round in 0..runs {
            for (ci, &(label, conns, bytes, limit)) in cases.iter().enumerate() {
                for t in TARGETS {
                    self.ensure_running(&mut agent)?;
                    let meter = Meter::new(self.proxy_pid(&agent, t));
                    let e = ep.clone();
                    let cpu = self.block(async move {
                        load::throughput(&e, t, conns, bytes, &meter, limit).await
                    })??;
                    eprintln!(
                        "bench: tcp round {}/{runs} {label} {}: {:.1} MB/s",
                        round + 1,
                        t.name(),
                        (conns as u64 * bytes) as f64 / cpu.wall_s / 1e6
                    );
                    results.entry((ci, t.name())).or_default().push(cpu);
                }
            }
        }
        let mut out = String::new();
        let mut section = serde_json::Map::new();
        for (ci, &(label, conns, bytes, _)) in cases.iter().enumerate() {
            let total = (conns as u64 * bytes) as f64;
            let mut rows = Vec::new();
            let mut case = serde_json::Map::new();
            for t in TARGETS {
                let runs = &results[&(ci, t.name())];
                let mbps = cpu_summary(runs, |c| total / c.wall_s / 1e6);
                let proxy = cpu_summary(runs, |c| c.proxy_s);
                let sys = cpu_summary(runs, |c| c.proxy_sys_s / c.proxy_s.max(1e-9) * 100.0);
                let client = cpu_summary(runs, |c| c.client_s);
                let echo = cpu_summary(runs, |c| c.echo_s);
                let machine = cpu_summary(runs, |c| c.machine_s / c.wall_s * 100.0);
                rows.push(vec![
                    t.name().to_owned(),
                    show(mbps.as_ref(), 1),
                    if t == Target::Direct {
                        "-".to_owned()
                    } else {
                        show(proxy.as_ref(), 2)
                    },
                    if t == Target::Direct {
                        "-".to_owned()
                    } else {
                        show(sys.as_ref(), 0)
                    },
                    show(client.as_ref(), 2),
                    show(echo.as_ref(), 2),
                    show(machine.as_ref(), 0),
                ]);
                case.insert(
                    t.name().into(),
                    json!({"mb_per_s": mbps, "proxy_cpu_s": proxy, "proxy_kernel_pct": sys,
                           "client_cpu_s": client,
                           "echo_cpu_s": echo, "machine_busy_pct": machine, "runs": runs}),
                );
            }
            let _ = writeln!(
                out,
                "\n== TCP throughput, {label} x {} MiB each, echoed and checked",
                bytes >> 20
            );
            out.push_str(&table(
                &[
                    "target",
                    "MB/s (each way)",
                    "proxy CPU s",
                    "proxy kernel %",
                    "client CPU s",
                    "echo CPU s",
                    "machine busy %",
                ],
                &rows,
            ));
            out.push('\n');
            let med = |t: Target, f: &dyn Fn(&Cpu) -> f64| {
                cpu_summary(&results[&(ci, t.name())], f).map_or(0.0, |s| s.median)
            };
            let mbps = |t: Target| med(t, &|c: &Cpu| total / c.wall_s / 1e6);
            let cpu = |t: Target| med(t, &|c: &Cpu| c.proxy_s);
            let mut checks = Vec::new();
            if conns == 1 {
                checks.push(ratio_check(
                    "TCP 1 tunnel >= 1.7x stunnel",
                    mbps(Target::Agent),
                    mbps(Target::Stunnel),
                    1.7,
                    false,
                    "MB/s",
                ));
                checks.push(ratio_check(
                    "TCP 1 tunnel >= 0.8x socat",
                    mbps(Target::Agent),
                    mbps(Target::Socat),
                    0.8,
                    false,
                    "MB/s",
                ));
            } else {
                checks.push(ratio_check(
                    "TCP 8 tunnels >= 1.25x stunnel",
                    mbps(Target::Agent),
                    mbps(Target::Stunnel),
                    1.25,
                    false,
                    "MB/s",
                ));
            }
            checks.push(ratio_check(
                &format!("agent CPU per TCP run ({label}) <= 0.5x stunnel's"),
                cpu(Target::Agent),
                cpu(Target::Stunnel),
                0.5,
                true,
                "CPU s",
            ));
            for c in checks {
                let _ = writeln!(out, "{}", c.line());
                self.checks.push(c);
            }
            section.insert(
                if conns == 1 {
                    "one_tunnel"
                } else {
                    "eight_tunnels"
                }
                .into(),
                json!({"conns": conns, "bytes_each": bytes, "targets": case}),
            );
        }
        let _ = writeln!(
            out,
            "TLS: agent {}, stunnel {}",
            suites["agent"], suites["stunnel"]
        );
        // The echo thread must not be what limits a proxy's run (direct runs are the client
        // and the echo alone: there it is expected to be busy).
        let echo_busy = |direct: bool| {
            results
                .iter()
                .filter(|((_, name), _)| (*name == Target::Direct.name()) == direct)
                .flat_map(|(_, runs)| runs)
                .map(|c| c.echo_s / c.wall_s * 100.0)
                .fold(0.0, f64::max)
        };
        let proxied = echo_busy(false);
        let _ = writeln!(
            out,
            "echo thread busy at most {proxied:.0}% of a proxied run's wall time{} ({:.0}% in \
             direct runs)",
            if proxied > 80.0 {
                " (WARNING: the echo may have limited a run)"
            } else {
                ", not the bottleneck"
            },
            echo_busy(true)
        );
        if let Some(note) = agent.log_note() {
            let _ = writeln!(out, "{note}");
        }
        print!("{out}");
        section.insert("tls".into(), json!(suites));
        self.json.insert("tcp".into(), Value::Object(section));
        Ok(())
    }

    fn section_rtt(&mut self) -> Result<()> {
        let mut agent = self.start_agent()?;
        let ep = Arc::new(self.endpoints(&agent));
        self.warm_up(&ep, &TARGETS)?;
        let (warm, n, runs) = (self.sizes.rtt_warm, self.sizes.rtt, self.sizes.runs);
        let mut results: BTreeMap<&str, Vec<(f64, f64, Cpu)>> = BTreeMap::new();
        for round in 0..runs {
            for t in TARGETS {
                self.ensure_running(&mut agent)?;
                let meter = Meter::new(self.proxy_pid(&agent, t));
                let e = ep.clone();
                let (mut samples, cpu) = self.block(async move {
                    load::rtt(&e, t, warm, n, &meter, Duration::from_secs(120)).await
                })??;
                samples.sort_unstable();
                let p50 = percentile(&samples, 50.0) as f64 / 1e3;
                let p99 = percentile(&samples, 99.0) as f64 / 1e3;
                eprintln!(
                    "bench: rtt round {}/{runs} {}: p50 {p50:.1} us p99 {p99:.1} us",
                    round + 1,
                    t.name()
                );
                results.entry(t.name()).or_default().push((p50, p99, cpu));
            }
        }
        let mut rows = Vec::new();
        let mut section = serde_json::Map::new();
        for t in TARGETS {
            let r = &results[t.name()];
            let p50 = Summary::of(&r.iter().map(|x| x.0).collect::<Vec<_>>());
            let p99 = Summary::of(&r.iter().map(|x| x.1).collect::<Vec<_>>());
            let cpu_us = Summary::of(
                &r.iter()
                    .map(|x| x.2.proxy_s / n as f64 * 1e6)
                    .collect::<Vec<_>>(),
            );
            rows.push(vec![
                t.name().to_owned(),
                show(p50.as_ref(), 1),
                show(p99.as_ref(), 1),
                if t == Target::Direct {
                    "-".to_owned()
                } else {
                    show(cpu_us.as_ref(), 1)
                },
            ]);
            section.insert(
                t.name().into(),
                json!({"p50_us": p50, "p99_us": p99, "proxy_cpu_us_per_round_trip": cpu_us,
                       "cpu": r.iter().map(|x| x.2).collect::<Vec<_>>()}),
            );
        }
        let med = |t: Target| {
            Summary::of(&results[t.name()].iter().map(|x| x.0).collect::<Vec<_>>())
                .map_or(0.0, |s| s.median)
        };
        let check = ratio_check(
            "RTT p50 <= 1.1x socat's",
            med(Target::Agent),
            med(Target::Socat),
            1.1,
            true,
            "us",
        );
        println!(
            "\n== RTT, 64-byte ping-pong on one connection, {n} round trips after {warm} \
             warm-up\n{}\n{}",
            table(
                &["target", "p50 us", "p99 us", "proxy CPU us/round trip"],
                &rows
            ),
            check.line()
        );
        if let Some(note) = agent.log_note() {
            println!("{note}");
        }
        self.checks.push(check);
        section.insert("round_trips".into(), json!(n));
        self.json.insert("rtt".into(), Value::Object(section));
        Ok(())
    }

    fn section_tps(&mut self) -> Result<()> {
        let mut agent = self.start_agent()?;
        std::thread::sleep(Duration::from_millis(300));
        let fresh = (agent.fds(), agent.rss_kb());
        let ep = Arc::new(self.endpoints(&agent));
        self.warm_up(&ep, &PROXIES)?;
        std::thread::sleep(Duration::from_millis(300));
        let idle = (agent.fds(), agent.rss_kb());
        let (total, parallel, runs) = (self.sizes.tps, self.sizes.tps_parallel, self.sizes.runs);
        let mut results: BTreeMap<&str, Vec<load::Tps>> = BTreeMap::new();
        let mut rounds = Vec::new();
        for round in 0..runs {
            for t in PROXIES {
                self.ensure_running(&mut agent)?;
                let meter = Meter::new(self.proxy_pid(&agent, t));
                let e = ep.clone();
                let r = self.block(async move {
                    load::tps(e, t, total, parallel, &meter, Duration::from_secs(300)).await
                })??;
                eprintln!(
                    "bench: tps round {}/{runs} {}: {:.0} tunnels/s ({} failed)",
                    round + 1,
                    t.name(),
                    r.per_s,
                    r.failed
                );
                results.entry(t.name()).or_default().push(r);
            }
            // The agent was idle while stunnel and socat ran: growth from round to round
            // would be a leak, a step after the first round is the allocator keeping memory.
            rounds.push((agent.fds(), agent.rss_kb()));
        }
        // The agent's tunnels are gone once every client saw EOF; give it a moment.
        let deadline = Instant::now() + Duration::from_secs(3);
        while agent.fds() > idle.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        let after = (agent.fds(), agent.rss_kb());
        let hwm = procs::status_kb(agent.pid(), "VmHWM:").unwrap_or(0);

        let mut rows = Vec::new();
        let mut section = serde_json::Map::new();
        for t in PROXIES {
            let r = &results[t.name()];
            let per_s = Summary::of(&r.iter().map(|x| x.per_s).collect::<Vec<_>>());
            let cpu_ms = Summary::of(
                &r.iter()
                    .map(|x| x.cpu.proxy_s / total as f64 * 1e3)
                    .collect::<Vec<_>>(),
            );
            let client = Summary::of(&r.iter().map(|x| x.cpu.client_s).collect::<Vec<_>>());
            let sys = Summary::of(
                &r.iter()
                    .map(|x| x.cpu.proxy_sys_s / x.cpu.proxy_s.max(1e-9) * 100.0)
                    .collect::<Vec<_>>(),
            );
            let failed: usize = r.iter().map(|x| x.failed).sum();
            let unclean: usize = r.iter().map(|x| x.unclean_close).sum();
            rows.push(vec![
                t.name().to_owned(),
                show(per_s.as_ref(), 0),
                show(cpu_ms.as_ref(), 3),
                show(sys.as_ref(), 0),
                show(client.as_ref(), 2),
                failed.to_string(),
                unclean.to_string(),
            ]);
            section.insert(
                t.name().into(),
                json!({"tunnels_per_s": per_s, "proxy_cpu_ms_per_tunnel": cpu_ms,
                       "proxy_kernel_pct": sys,
                       "client_cpu_s": client, "failed": failed, "unclean_close": unclean,
                       "runs": r}),
            );
        }
        let med = |t: Target| {
            Summary::of(
                &results[t.name()]
                    .iter()
                    .map(|x| x.per_s)
                    .collect::<Vec<_>>(),
            )
            .map_or(0.0, |s| s.median)
        };
        let checks = [
            ratio_check(
                "tunnels/s >= 3x stunnel's",
                med(Target::Agent),
                med(Target::Stunnel),
                3.0,
                false,
                "tunnels/s",
            ),
            Check::new(
                format!(
                    "agent fds and RSS back near idle after the run (fds <= idle + \
                     {NEAR_IDLE_FDS}, RSS <= idle + {NEAR_IDLE_RSS_KB} kB)"
                ),
                format!(
                    "fds {} (idle {}), RSS {} kB (idle {} kB, +{} kB)",
                    after.0,
                    idle.0,
                    after.1,
                    idle.1,
                    after.1 as i64 - idle.1 as i64
                ),
                after.0 <= idle.0 + NEAR_IDLE_FDS && after.1 <= idle.1 + NEAR_IDLE_RSS_KB,
            ),
        ];
        println!(
            "\n== Tunnels per second: {total} tunnels, {parallel} at a time (connect, \
             handshake, header, one 64-byte echo, close)\n{}",
            table(
                &[
                    "target",
                    "tunnels/s",
                    "proxy CPU ms/tunnel",
                    "proxy kernel %",
                    "client CPU s",
                    "failed",
                    "unclean close"
                ],
                &rows
            )
        );
        println!(
            "agent: fresh fds {} RSS {} kB; idle (after warm-up) fds {} RSS {} kB; after \
             {} tunnels fds {} RSS {} kB; peak RSS (VmHWM) {hwm} kB; after each round \
             (fds, RSS kB): {:?}",
            fresh.0,
            fresh.1,
            idle.0,
            idle.1,
            runs * total,
            after.0,
            after.1,
            rounds
        );
        for c in checks {
            println!("{}", c.line());
            self.checks.push(c);
        }
        if let Some(note) = agent.log_note() {
            println!("{note}");
        }
        section.insert(
            "agent".into(),
            json!({"fresh": {"fds": fresh.0, "rss_kb": fresh.1},
                   "idle": {"fds": idle.0, "rss_kb": idle.1},
                   "after": {"fds": after.0, "rss_kb": after.1}, "peak_rss_kb": hwm,
                   "after_each_round": rounds.iter()
                       .map(|r| json!({"fds": r.0, "rss_kb": r.1})).collect::<Vec<_>>()}),
        );
        self.json.insert("tps".into(), Value::Object(section));
        Ok(())
    }

    fn section_udp(&mut self) -> Result<()> {
        let mut agent = self.start_agent()?;
        let ep = Arc::new(self.endpoints(&agent));
        let (n, sessions, runs) = (self.sizes.udp, self.sizes.udp_sessions, self.sizes.runs);
        // Every session sends n datagrams, also with 8 at once.
        let cases = [(1usize, n), (sessions, n)];
        let mut results: BTreeMap<(usize, &str), Vec<udp::UdpRun>> = BTreeMap::new();
        for round in 0..runs {
            for &(count, per) in &cases {
                for t in [Target::Agent, Target::Direct] {
                    self.ensure_running(&mut agent)?;
                    let meter = Meter::new(self.proxy_pid(&agent, t));
                    let e = ep.clone();
                    let r = self.block(async move {
                        let mut open = Vec::with_capacity(count);
                        for _ in 0..count {
                            let d = match t {
                                Target::Agent => Dgram::agent(&e).await?,
                                _ => Dgram::direct(e.echo_udp).await?,
                            };
                            d.warm_up().await?;
                            open.push(Arc::new(d));
                        }
                        let (run, open) =
                            udp::run(open, per, &meter, Duration::from_secs(300)).await?;
                        for d in open {
                            if let Ok(d) = Arc::try_unwrap(d) {
                                d.close().await;
                            }
                        }
                        anyhow::Ok(run)
                    })??;
                    eprintln!(
                        "bench: udp round {}/{runs} {count} session(s) {}: {:.0} datagrams/s, \
                         {} lost",
                        round + 1,
                        t.name(),
                        r.dgrams_per_s,
                        r.lost
                    );
                    results.entry((count, t.name())).or_default().push(r);
                }
            }
        }
        let mut rows = Vec::new();
        let mut section = serde_json::Map::new();
        for &(count, per) in &cases {
            for t in [Target::Agent, Target::Direct] {
                let r = &results[&(count, t.name())];
                let f = |g: &dyn Fn(&udp::UdpRun) -> f64| {
                    Summary::of(&r.iter().map(g).collect::<Vec<_>>())
                };
                let dps = f(&|x| x.dgrams_per_s);
                let mbps = f(&|x| x.mb_per_s);
                let p50 = f(&|x| x.rtt_p50_us);
                let cpu_us = f(&|x| x.cpu.proxy_s / x.received.max(1) as f64 * 1e6);
                let sys = f(&|x| x.cpu.proxy_sys_s / x.cpu.proxy_s.max(1e-9) * 100.0);
                let client = f(&|x| x.cpu.client_s / x.received.max(1) as f64 * 1e6);
                let machine = f(&|x| x.cpu.machine_s / x.cpu.wall_s * 100.0);
                let lost: u64 = r.iter().map(|x| x.lost).sum();
                let stalls: u64 = r.iter().map(|x| x.stalls).sum();
                let kernel: u64 = r.iter().map(|x| x.kernel_udp_errors[1]).sum();
                rows.push(vec![
                    format!("{count} x {per}"),
                    t.name().to_owned(),
                    show(dps.as_ref(), 0),
                    show(mbps.as_ref(), 1),
                    lost.to_string(),
                    show(p50.as_ref(), 0),
                    if t == Target::Direct {
                        "-".to_owned()
                    } else {
                        show(cpu_us.as_ref(), 1)
                    },
                    if t == Target::Direct {
                        "-".to_owned()
                    } else {
                        show(sys.as_ref(), 0)
                    },
                    show(client.as_ref(), 1),
                    show(machine.as_ref(), 0),
                    format!("{stalls}/{kernel}"),
                ]);
                section.insert(
                    format!("{}_{count}", t.name()),
                    json!({"sessions": count, "datagrams_per_session": per,
                           "datagrams_per_s": dps, "mb_per_s": mbps, "rtt_p50_us": p50,
                           "agent_cpu_us_per_datagram": cpu_us, "agent_kernel_pct": sys,
                           "client_cpu_us_per_datagram": client, "machine_busy_pct": machine,
                           "lost_all_runs": lost, "runs": r}),
                );
            }
        }
        let med = |count: usize, t: Target| {
            Summary::of(
                &results[&(count, t.name())]
                    .iter()
                    .map(|x| x.dgrams_per_s)
                    .collect::<Vec<_>>(),
            )
            .map_or(0.0, |s| s.median)
        };
        let lost8: u64 = results[&(sessions, "agent")].iter().map(|x| x.lost).sum();
        let sent8: u64 = results[&(sessions, "agent")].iter().map(|x| x.sent).sum();
        let checks = [
            ratio_check(
                "UDP 1 session >= 0.55x direct datagrams/s",
                med(1, Target::Agent),
                med(1, Target::Direct),
                0.55,
                false,
                "datagrams/s",
            ),
            Check::new(
                format!("UDP {sessions} sessions: 0 loss"),
                format!("{lost8} of {sent8} lost over {runs} run(s)"),
                lost8 == 0,
            ),
        ];
        println!(
            "\n== UDP, {}-byte datagrams, {} in flight per session; {sessions} sessions \
             each send {n} too; RTT at full window; CPU per echoed datagram; stalls = window \
             full for 200 ms, rcvbuf drops = kernel UDP RcvbufErrors (machine-wide)\n{}",
            udp::PAYLOAD,
            udp::WINDOW,
            table(
                &[
                    "sessions x datagrams",
                    "target",
                    "datagrams/s",
                    "MB/s",
                    "lost (all runs)",
                    "RTT p50 us",
                    "agent CPU us/dgram",
                    "agent kernel %",
                    "client CPU us/dgram",
                    "machine busy %",
                    "stalls/rcvbuf drops"
                ],
                &rows
            )
        );
        for c in checks {
            println!("{}", c.line());
            self.checks.push(c);
        }
        if let Some(note) = agent.log_note() {
            println!("{note}");
        }
        self.json.insert("udp".into(), Value::Object(section));
        Ok(())
    }

    /// One memory round: a fresh agent with idle TCP tunnels, another with UDP sessions.
    fn mem_round(&mut self) -> Result<MemRound> {
        let (n_tcp, n_udp) = (self.sizes.mem_tcp, self.sizes.mem_udp);
        let settle = || std::thread::sleep(Duration::from_millis(500));
        // Waits (bounded) until the agent holds at least `want` fds.
        let wait_fds = |agent: &Agent, want: usize| {
            let deadline = Instant::now() + Duration::from_secs(15);
            while agent.fds() < want && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let mut rows: Vec<(String, MemReading, String)> = Vec::new();

        // TCP: a fresh agent, idle, then n idle tunnels (header sent, no payload).
        let agent = self.start_agent()?;
        settle();
        let idle = MemReading::of(&agent);
        rows.push(("fresh agent, idle".into(), idle, String::new()));
        let ep = Arc::new(self.endpoints(&agent));
        self.warm_up(&ep, &[Target::Agent])?;
        settle();
        let base = MemReading::of(&agent);
        rows.push(("after one tunnel (base)".into(), base, String::new()));
        let e = ep.clone();
        let streams = self.block(async move {
            open_many(n_tcp, 8, move || {
                let e = e.clone();
                async move { e.open(Target::Agent).await }
            })
            .await
        })??;
        // Each tunnel is 2 fds in the agent (client TLS, echo side) once dialed.
        wait_fds(&agent, base.fds + 2 * n_tcp);
        settle();
        let open = MemReading::of(&agent);
        let echo_seen = self.echo.active();
        let per_tcp = open.per(&base, n_tcp);
        rows.push((
            format!("{n_tcp} idle TCP tunnels (header only)"),
            open,
            format!("{per_tcp:.1} kB/tunnel"),
        ));
        // The same tunnels after one 64-byte echo each: buffers the relay allocated but had
        // not touched (calloc from fresh heap pages) become resident.
        let streams = self.block(async move {
            let mut set = JoinSet::new();
            for mut s in streams {
                set.spawn(async move {
                    let msg = [7u8; 64];
                    let mut back = [0u8; 64];
                    let r = tokio::time::timeout(Duration::from_secs(10), async {
                        s.write_all(&msg).await?;
                        s.flush().await?;
                        s.read_exact(&mut back).await
                    })
                    .await;
                    (s, matches!(r, Ok(Ok(_))) && back == msg)
                });
            }
            let mut out = Vec::new();
            let mut bad = 0usize;
            while let Some(Ok((s, ok))) = set.join_next().await {
                bad += usize::from(!ok);
                out.push(s);
            }
            (out, bad)
        })?;
        settle();
        let used = MemReading::of(&agent);
        let per_tcp_used = used.per(&base, n_tcp);
        rows.push((
            format!("same, after one 64-byte echo each ({} failed)", streams.1),
            used,
            format!("{per_tcp_used:.1} kB/tunnel"),
        ));
        self.block(async move {
            let mut set = JoinSet::new();
            for s in streams.0 {
                set.spawn(load::close(s));
            }
            while set.join_next().await.is_some() {}
        })?;
        settle();
        let closed = MemReading::of(&agent);
        rows.push(("TCP tunnels closed".into(), closed, String::new()));
        let tcp_note = agent.log_note();
        drop(agent);

        // UDP: another fresh agent, n idle DTLS sessions (header sent).
        let agent = self.start_agent()?;
        let ep = Arc::new(self.endpoints(&agent));
        let e = ep.clone();
        self.block(async move {
            let d = Dgram::agent(&e).await?;
            d.warm_up().await?;
            d.close().await;
            anyhow::Ok(())
        })??;
        settle();
        let ubase = MemReading::of(&agent);
        rows.push((
            "fresh agent, after one UDP session (base)".into(),
            ubase,
            String::new(),
        ));
        let e = ep.clone();
        let sessions = self.block(async move {
            open_many(n_udp, 8, move || {
                let e = e.clone();
                async move { Dgram::agent(&e).await }
            })
            .await
        })??;
        // One socket to the echo per session, once its header is in.
        wait_fds(&agent, ubase.fds + n_udp);
        settle();
        let uopen = MemReading::of(&agent);
        let per_udp = uopen.per(&ubase, n_udp);
        rows.push((
            format!("{n_udp} idle UDP sessions (header only)"),
            uopen,
            format!("{per_udp:.1} kB/session"),
        ));
        let sessions = self.block(async move {
            let mut set = JoinSet::new();
            for d in sessions {
                set.spawn(async move {
                    let ok = d.warm_up().await.is_ok();
                    (d, ok)
                });
            }
            let mut out = Vec::new();
            let mut bad = 0usize;
            while let Some(Ok((d, ok))) = set.join_next().await {
                bad += usize::from(!ok);
                out.push(d);
            }
            (out, bad)
        })?;
        settle();
        let uused = MemReading::of(&agent);
        let per_udp_used = uused.per(&ubase, n_udp);
        rows.push((
            format!("same, after one datagram each ({} failed)", sessions.1),
            uused,
            format!("{per_udp_used:.1} kB/session"),
        ));
        self.block(async move {
            let mut set = JoinSet::new();
            for d in sessions.0 {
                set.spawn(d.close());
            }
            while set.join_next().await.is_some() {}
        })?;
        settle();
        let uclosed = MemReading::of(&agent);
        rows.push(("UDP sessions closed".into(), uclosed, String::new()));
        let udp_note = agent.log_note();
        drop(agent);
        Ok(MemRound {
            rows,
            idle,
            per_tcp,
            per_tcp_used,
            per_udp,
            per_udp_used,
            echo_seen,
            notes: [tcp_note, udp_note].into_iter().flatten().collect(),
        })
    }

    fn section_mem(&mut self) -> Result<()> {
        let size = fs::metadata(&self.agent_bin)?.len();
        let (n_tcp, n_udp, runs) = (self.sizes.mem_tcp, self.sizes.mem_udp, self.sizes.runs);
        let mut rounds = Vec::with_capacity(runs);
        for round in 0..runs {
            let r = self.mem_round()?;
            eprintln!(
                "bench: mem round {}/{runs}: idle {} kB, {:.1} kB/TCP tunnel, {:.1} kB/UDP \
                 session",
                round + 1,
                r.idle.rss,
                r.per_tcp,
                r.per_udp
            );
            rounds.push(r);
        }
        let sum = |f: &dyn Fn(&MemRound) -> f64| {
            Summary::of(&rounds.iter().map(f).collect::<Vec<_>>())
                .ok_or_else(|| anyhow::anyhow!("no memory round ran"))
        };
        let idle = sum(&|r| r.idle.rss as f64)?;
        let idle_anon = sum(&|r| r.idle.anon as f64)?;
        let idle_file = sum(&|r| r.idle.file as f64)?;
        let per_tcp = sum(&|r| r.per_tcp)?;
        let per_tcp_used = sum(&|r| r.per_tcp_used)?;
        let per_udp = sum(&|r| r.per_udp)?;
        let per_udp_used = sum(&|r| r.per_udp_used)?;
        let last = rounds
            .last()
            .ok_or_else(|| anyhow::anyhow!("no memory round ran"))?;
        let checks = [
            Check::new(
                "<= 16 kB RSS per idle TCP tunnel",
                format!(
                    "{} kB ({n_tcp} tunnels, header only; {} kB after one echo each)",
                    per_tcp.show(1),
                    per_tcp_used.show(1)
                ),
                per_tcp.median <= 16.0,
            ),
            Check::new(
                "<= 24 kB RSS per idle UDP session",
                format!(
                    "{} kB ({n_udp} sessions, header only; {} kB after one datagram each)",
                    per_udp.show(1),
                    per_udp_used.show(1)
                ),
                per_udp.median <= 24.0,
            ),
            Check::new(
                "<= 4 MB idle RSS",
                format!(
                    "{} kB (anon {} kB, file-backed {} kB)",
                    idle.show(0),
                    idle_anon.show(0),
                    idle_file.show(0)
                ),
                idle.median <= 4096.0,
            ),
            Check::new(
                "binary <= 6 MB",
                format!(
                    "{size} bytes ({:.2} MiB, {:.2} MB)",
                    size as f64 / MIB,
                    size as f64 / 1e6
                ),
                size as f64 <= 6.0 * MIB,
            ),
        ];
        let table_rows: Vec<Vec<String>> = last
            .rows
            .iter()
            .map(|(label, m, per)| {
                vec![
                    label.clone(),
                    m.rss.to_string(),
                    m.anon.to_string(),
                    m.file.to_string(),
                    m.fds.to_string(),
                    if per.is_empty() {
                        "-".into()
                    } else {
                        per.clone()
                    },
                ]
            })
            .collect();
        println!(
            "\n== Memory: agent RSS (/proc/PID/status) with idle tunnels; per tunnel = (RSS - \
             base) / count; a fresh agent for each half of each round\n\
             summary over {runs} round(s): idle RSS {} kB (anon {}, file-backed {}); per idle \
             TCP tunnel {} kB (after one echo each {}); per idle UDP session {} kB (after one \
             datagram each {})\nlast round:\n{}",
            idle.show(0),
            idle_anon.show(0),
            idle_file.show(0),
            per_tcp.show(1),
            per_tcp_used.show(1),
            per_udp.show(1),
            per_udp_used.show(1),
            table(
                &["state", "RSS kB", "anon kB", "file kB", "fds", "per tunnel"],
                &table_rows
            )
        );
        println!(
            "echo saw {} TCP connections with the tunnels open",
            last.echo_seen
        );
        for c in checks {
            println!("{}", c.line());
            self.checks.push(c);
        }
        for note in &last.notes {
            println!("{note}");
        }
        self.json.insert(
            "mem".into(),
            json!({
                "binary_bytes": size,
                "idle_rss_kb": idle, "idle_anon_kb": idle_anon, "idle_file_kb": idle_file,
                "tcp": {"tunnels": n_tcp, "kb_per_tunnel": per_tcp,
                        "kb_per_tunnel_after_echo": per_tcp_used},
                "udp": {"sessions": n_udp, "kb_per_session": per_udp,
                        "kb_per_session_after_datagram": per_udp_used},
                "rounds": rounds.iter().map(|r| r.rows.iter()
                    .map(|(label, m, _)| json!({"state": label, "reading": m}))
                    .collect::<Vec<_>>()).collect::<Vec<_>>(),
            }),
        );
        Ok(())
    }
}

/// Opens `n` things, `parallel` at a time; all or an error.
async fn open_many<T, F, Fut>(n: usize, parallel: usize, open: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<T>> + Send,
{
    let mut set = JoinSet::new();
    for w in 0..parallel {
        let open = open.clone();
        let count = n / parallel + usize::from(w < n % parallel);
        set.spawn(async move {
            let mut got = Vec::with_capacity(count);
            for _ in 0..count {
                got.push(open().await?);
            }
            anyhow::Ok(got)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    Ok(all)
}
