//! `bench`: the agent (its release binary, as a child process) against stunnel, socat and a
//! direct connection, all on 127.0.0.1, its Docker API relay against the engine's socket, and
//! its HTTP routes against nginx. Prints tables and the issue's targets, writes JSON.
//!
//! ```text
//! scripts/bench.sh --out bench.json [--quick] [--only tcp,rtt,tps,udp,mem,docker,proxy]
//! target/release/bench --agent target/release/godoxy-agent --docker-socket S --out bench.json
//! ```
//!
//! The bench builds, installs and starts nothing outside itself: scripts/bench.sh installs
//! socat, stunnel4 and nginx, raises the open-files limit, builds the agent and the bench, and
//! starts a Docker-compatible engine (scripts/docker-engine.sh) whose socket it passes.
//!
//! Every figure is the median of `--runs` runs (3; 1 with `--quick`) with min and max; per
//! round the targets run interleaved (agent, stunnel, socat, direct). CPU time, RSS and fds are
//! read from /proc for the proxies; the client and echo run on named threads of this process.
//!
//! One file per section (`tcp`, `rtt`, `tps`, `udp`, `mem`, `docker`, `proxy`), each with its
//! workload; `harness` starts the agent, stunnel and socat; `load` and `dgram` are the client
//! side every workload shares; `echo`, `procs` and `stats` are the echo peers, /proc and the
//! figures.

mod dgram;
mod docker;
mod echo;
mod harness;
mod load;
mod mem;
mod procs;
mod proxy;
mod rtt;
mod stats;
mod tcp;
mod tps;
mod udp;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

use crate::harness::{Bench, MIB};

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
    /// The agent binary to measure, relative to the current folder (the last --agent wins).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "target/release/godoxy-agent",
        overrides_with = "agent"
    )]
    agent: PathBuf,
    /// The Docker-compatible engine's unix socket, for the docker section and every agent's
    /// `[docker] socket` (scripts/bench.sh starts a test engine and passes its socket).
    #[arg(long, value_name = "PATH")]
    docker_socket: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Section {
    Tcp,
    Rtt,
    Tps,
    Udp,
    Mem,
    Docker,
    Proxy,
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
    docker_warm: usize,
    docker_requests: usize,
    docker_clients: usize,
    docker_secs: u64,
    docker_cycles: usize,
    proxy_warm_ms: u64,
    proxy_secs: u64,
    ws_warm: usize,
    ws: usize,
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
            mem_udp: q(1000, 50) as usize,
            docker_warm: q(200, 50) as usize,
            docker_requests: q(2000, 300) as usize,
            docker_clients: 8,
            docker_secs: q(5, 2),
            docker_cycles: q(5, 2) as usize,
            proxy_warm_ms: q(1000, 300),
            proxy_secs: q(5, 1),
            ws_warm: q(2000, 200) as usize,
            ws: q(20_000, 2000) as usize,
        }
    }
}

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

fn run(args: Args) -> Result<bool> {
    let sizes = Sizes::new(&args);
    let mut sections = if args.only.is_empty() {
        vec![
            Section::Tcp,
            Section::Rtt,
            Section::Tps,
            Section::Udp,
            Section::Mem,
            Section::Docker,
            Section::Proxy,
        ]
    } else {
        args.only.clone()
    };
    sections.sort();
    sections.dedup();
    let agent_bin = agent_binary(&args)?;
    let docker_socket = args
        .docker_socket
        .as_deref()
        .map(docker_socket_path)
        .transpose()?;
    let proxies = sections
        .iter()
        .any(|s| matches!(s, Section::Tcp | Section::Rtt | Section::Tps));
    let tools = if proxies {
        Some(procs::find_tools()?)
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

    let mut bench = Bench::new(sizes, agent_bin, tools.as_ref())?;
    bench.docker_socket = docker_socket;
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
            Section::Docker => bench.section_docker(),
            Section::Proxy => bench.section_proxy(),
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

/// The agent binary `--agent` names: it must exist (the bench builds nothing).
fn agent_binary(args: &Args) -> Result<PathBuf> {
    let path = &args.agent;
    if !path.is_file() {
        let cwd = std::env::current_dir().unwrap_or_default();
        bail!(
            "the agent binary {} was not found (in {}): run scripts/bench.sh, which builds it, or \
             `cargo build --release` from the workspace root first, or name it with --agent PATH",
            path.display(),
            cwd.display()
        );
    }
    Ok(path.clone())
}

/// `--docker-socket` made absolute (the agent resolves relative paths against its config's
/// folder); it must be UTF-8, as it goes into the agent's TOML.
fn docker_socket_path(path: &std::path::Path) -> Result<PathBuf> {
    let path =
        std::path::absolute(path).with_context(|| format!("--docker-socket {}", path.display()))?;
    if path.to_str().is_none() {
        bail!("--docker-socket {}: not UTF-8", path.display());
    }
    Ok(path)
}

impl Bench {
    /// The lines printed before the first section.
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

    /// The JSON's `meta`: the machine, the tools' versions and the sizes.
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
                "udp_sessions": s.udp_sessions, "udp_payload": dgram::PAYLOAD,
                "udp_window": udp::WINDOW,
                "mem_tcp_tunnels": s.mem_tcp, "mem_udp_sessions": s.mem_udp,
                "docker_list_requests": s.docker_requests, "docker_list_warm_up": s.docker_warm,
                "docker_clients": s.docker_clients, "docker_seconds": s.docker_secs,
                "docker_event_cycles": s.docker_cycles, "docker_containers": docker::CONTAINERS,
                "proxy_warm_up_ms": s.proxy_warm_ms, "proxy_seconds": s.proxy_secs,
                "ws_round_trips": s.ws, "ws_warm_up": s.ws_warm,
            },
            "docker_socket": self.docker_socket.as_ref().map(|p| p.display().to_string()),
            "cpu_split": "proxy: its process (socat: with its forked children); client: threads \
                          'bench-client' (2 workers); echo: thread 'bench-echo' (1 worker); \
                          machine: /proc/stat busy time",
        })
    }
}
