//! The bench's harness: the agent started fresh for each section, stunnel and socat, the
//! client runtime every workload runs on, and the state the sections report into.

use std::fs;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use godoxy_agent::certs::CertSet;
use godoxy_agent::client::ClientTls;
use serde_json::Value;
use tokio::runtime::Runtime;

use crate::Sizes;
use crate::echo::Echo;
use crate::load::{self, Endpoints, Meter, Target};
use crate::procs::{self, Proc, TempDir};
use crate::stats::Check;
use crate::tcp;

/// Every target, in the order each round runs them.
pub const TARGETS: [Target; 4] = [
    Target::Agent,
    Target::Stunnel,
    Target::Socat,
    Target::Direct,
];
/// The targets that are a process of their own.
pub const PROXIES: [Target; 3] = [Target::Agent, Target::Stunnel, Target::Socat];
/// Bytes in a MiB, for sizes shown in MiB.
pub const MIB: f64 = 1048576.0;

/// A running agent started for one section.
pub struct Agent {
    /// The child process.
    proc: Proc,
    /// Its TLS port.
    tcp: SocketAddr,
    /// Its DTLS port.
    udp: SocketAddr,
}

impl Agent {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
    /// Its RSS in kB.
    pub fn rss_kb(&self) -> u64 {
        procs::rss_kb(self.pid())
    }
    /// Its open fds.
    pub fn fds(&self) -> usize {
        procs::fd_count(self.pid())
    }
    /// Warnings and errors the agent logged (RUST_LOG=warn: nothing else is logged).
    pub fn log_note(&self) -> Option<String> {
        let n = self.proc.log_count(" WARN ") + self.proc.log_count(" ERROR ");
        (n > 0).then(|| {
            format!(
                "note: the agent logged {n} warning/error lines; last ones:\n{}",
                self.proc.log_tail(3)
            )
        })
    }
}

/// Everything the sections share: the sizes, the certificates' folder, the agent binary, the
/// echo, the client runtime and TLS, stunnel and socat, and what the sections report.
pub struct Bench {
    /// How much each section does.
    pub sizes: Sizes,
    dir: TempDir,
    /// The agent binary measured.
    pub agent_bin: PathBuf,
    /// The TCP and UDP echo every target forwards to.
    pub echo: Echo,
    rt: Runtime,
    tls: ClientTls,
    stunnel: Option<(Proc, SocketAddr)>,
    socat: Option<(Proc, SocketAddr)>,
    agents_started: usize,
    /// The Docker-compatible engine's unix socket (`--docker-socket`, absolute): written into
    /// every agent's `[docker] socket`; without it the agents' Docker relay is off.
    pub docker_socket: Option<PathBuf>,
    /// The JSON written at the end: one key per section, then `targets` and `errors`.
    pub json: serde_json::Map<String, Value>,
    /// The targets judged so far.
    pub checks: Vec<Check>,
}

impl Bench {
    /// Certificates in a fresh temporary folder, the echo, the client runtime and, with
    /// `tools` (socat, stunnel), stunnel and socat forwarding to the echo.
    pub fn new(
        sizes: Sizes,
        agent_bin: PathBuf,
        tools: Option<&(PathBuf, PathBuf)>,
    ) -> Result<Self> {
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
        let mut bench = Self {
            sizes,
            dir,
            agent_bin,
            echo,
            rt,
            tls,
            stunnel: None,
            socat: None,
            agents_started: 0,
            docker_socket: None,
            json: serde_json::Map::new(),
            checks: Vec::new(),
        };
        if let Some((socat, stunnel)) = tools {
            bench.start_proxies(socat, stunnel)?;
        }
        Ok(bench)
    }

    /// Runs `fut` on the client runtime's worker threads (so its CPU counts as the client's).
    pub fn block<F>(&self, fut: F) -> Result<F::Output>
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
    pub fn start_agent(&mut self) -> Result<Agent> {
        self.agents_started += 1;
        let n = self.agents_started;
        let port = procs::free_port(true)?;
        let conf = self.dir.0.join(format!("agent-{n}.toml"));
        fs::write(&conf, agent_config(port, self.docker_socket.as_deref()))?;
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
            "DOCKER_SOCKET",
            "LISTEN_ADDR",
        ] {
            // The agent reads these also with GoDoxy's prefixes.
            for prefix in ["", "GODOXY_", "GOPROXY_"] {
                cmd.env_remove(format!("{prefix}{var}"));
            }
        }
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC"] {
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

    /// The folder with the certificates (`ca.pem`, `server.pem`, `server.key`, `client.*`);
    /// removed at the end.
    pub fn cert_dir(&self) -> &Path {
        &self.dir.0
    }

    /// Where the echo, `agent`, stunnel and socat listen.
    pub fn endpoints(&self, agent: &Agent) -> Endpoints {
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

    /// The process whose CPU time a run of `target` meters.
    pub fn proxy_pid(&self, agent: &Agent, target: Target) -> Option<u32> {
        match target {
            Target::Agent => Some(agent.pid()),
            Target::Stunnel => self.stunnel.as_ref().map(|s| s.0.pid()),
            Target::Socat => self.socat.as_ref().map(|s| s.0.pid()),
            Target::Direct => None,
        }
    }

    /// An error when the agent, stunnel or socat has exited.
    pub fn ensure_running(&mut self, agent: &mut Agent) -> Result<()> {
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
    pub fn warm_up(&self, ep: &Arc<Endpoints>, targets: &[Target]) -> Result<()> {
        for &t in targets {
            let ep = ep.clone();
            let meter = Meter::new(None);
            self.block(async move {
                tcp::throughput(&ep, t, 1, 1 << 20, &meter, Duration::from_secs(30)).await
            })??;
        }
        Ok(())
    }
}

/// The agent's configuration: its ports, the bench's certificates, limits above what the bench
/// needs, and the Docker relay to `docker` (off without one).
fn agent_config(port: u16, docker: Option<&Path>) -> String {
    // A TOML basic string: JSON's escapes are a subset of TOML's.
    let docker = match docker {
        Some(socket) => format!(
            "[docker]\nsocket = {}\naccess = \"godoxy\"\n",
            Value::from(socket.to_string_lossy())
        ),
        None => "[docker]\naccess = \"off\"\n".to_owned(),
    };
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
         shutdown_grace = \"1s\"\n\
         {docker}"
    )
}
