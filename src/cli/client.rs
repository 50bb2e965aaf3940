//! The client commands (`probe`, `info`, `health`, `forward`): what a GoDoxy server does to an
//! agent, as one-shot commands with plain-text (or JSON) output and an exit code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use godoxy_agent::Config;
use godoxy_agent::client::ClientTls;
use godoxy_agent::protocol::TunnelHeader;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Client certificate flags: a `certs init` folder, or each file on its own.
#[derive(clap::Args)]
pub struct CertArgs {
    /// Folder with ca.pem, client.pem and client.key (what `certs init` writes).
    #[arg(long, value_name = "DIR", default_value = ".")]
    certs: PathBuf,
    /// CA certificate [default: DIR/ca.pem].
    #[arg(long, value_name = "PATH")]
    ca: Option<PathBuf>,
    /// Client certificate [default: DIR/client.pem].
    #[arg(long, value_name = "PATH")]
    cert: Option<PathBuf>,
    /// Client key [default: DIR/client.key].
    #[arg(long, value_name = "PATH")]
    key: Option<PathBuf>,
}

impl CertArgs {
    /// Reads the three files.
    pub fn read(&self) -> anyhow::Result<CertFiles> {
        let path = |given: &Option<PathBuf>, name: &str| {
            given.clone().unwrap_or_else(|| self.certs.join(name))
        };
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let (ca_path, cert_path, key_path) = (
            path(&self.ca, "ca.pem"),
            path(&self.cert, "client.pem"),
            path(&self.key, "client.key"),
        );
        Ok(CertFiles {
            ca: read(&ca_path)?,
            cert: read(&cert_path)?,
            key: read(&key_path)?,
            ca_path,
            cert_path,
            key_path,
        })
    }

    fn client(&self) -> anyhow::Result<ClientTls> {
        self.read()?.client()
    }
}

/// The client's files, read once: the checks name them and judge their contents.
pub struct CertFiles {
    pub ca_path: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl CertFiles {
    pub fn client(&self) -> anyhow::Result<ClientTls> {
        ClientTls::from_pem(&self.ca, Some((&self.cert, &self.key)))
    }

    pub fn describe(&self) -> String {
        let dir = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir(&self.ca_path) == dir(&self.cert_path) && dir(&self.cert_path) == dir(&self.key_path)
        {
            format!("{}/", dir(&self.ca_path).display())
        } else {
            format!(
                "{}, {}, {}",
                self.ca_path.display(),
                self.cert_path.display(),
                self.key_path.display()
            )
        }
    }
}

/// Runs a client command; its error (if any) is printed and the exit code is 1.
pub fn client_command(work: impl Future<Output = anyhow::Result<bool>>) -> ExitCode {
    coded_command(async {
        match work.await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(err) => {
                eprintln!("godoxy-agent: {err:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Runs a command that picks its own exit code.
pub fn coded_command(work: impl Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(work),
        Err(err) => {
            eprintln!("godoxy-agent: starting the runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("resolving {server} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("{server} resolved to no address"))
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub async fn probe(
    server: String,
    tcp: bool,
    udp: bool,
    timeout: Duration,
    certs: CertArgs,
) -> anyhow::Result<bool> {
    let client = certs.client()?;
    let addr = resolve(&server).await?;
    let mut all_ok = true;
    if tcp {
        all_ok &= report("tcp", client.probe_tcp(addr, timeout).await, addr);
    }
    if udp {
        all_ok &= report("udp", client.probe_udp(addr, timeout).await, addr);
    }
    Ok(all_ok)
}

fn report(transport: &str, result: anyhow::Result<Duration>, addr: SocketAddr) -> bool {
    match result {
        Ok(latency) => {
            println!("{transport}  ok    {:>9}  {addr}", millis(latency));
            true
        }
        Err(err) => {
            println!("{transport}  FAIL  {addr}: {err:#}");
            false
        }
    }
}

pub async fn info(
    server: String,
    json: bool,
    timeout: Duration,
    certs: CertArgs,
) -> anyhow::Result<bool> {
    let client = certs.client()?;
    let addr = resolve(&server).await?;
    let info = client
        .fetch_info(addr, timeout)
        .await
        .with_context(|| format!("GET https://{addr}/godoxy/agent/info"))?;
    let tcp = client.probe_tcp(addr, timeout).await;
    let udp = client.probe_udp(addr, timeout).await;
    let support = |r: &anyhow::Result<Duration>| match r {
        Ok(d) => serde_json::json!({"supported": true, "latency_ms": d.as_secs_f64() * 1000.0}),
        Err(e) => serde_json::json!({"supported": false, "error": format!("{e:#}")}),
    };
    if json {
        let out = serde_json::json!({
            "server": addr.to_string(),
            "name": info.name,
            "version": info.version,
            "runtime": info.runtime,
            "tcp": support(&tcp),
            "udp": support(&udp),
        });
        println!("{out:#}");
    } else {
        let line = |r: &anyhow::Result<Duration>| match r {
            Ok(d) => format!("supported ({})", millis(*d)),
            Err(e) => format!("not supported: {e:#}"),
        };
        println!("server:   {addr}");
        println!("name:     {}", info.name);
        println!("version:  {}", info.version);
        println!("runtime:  {}", info.runtime);
        println!("tcp:      {}", line(&tcp));
        println!("udp:      {}", line(&udp));
    }
    Ok(true)
}

/// The address to reach a listener bound to `addr` from the same host.
fn local_target(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

pub async fn health(config: Config, timeout: Duration) -> anyhow::Result<bool> {
    let client = ClientTls::for_health_check(&config)?;
    let tcp = local_target(config.listen.tcp);
    let mut all_ok = report_alive("tcp", client.check_tls_alive(tcp, timeout).await, tcp);
    if let Some(udp) = config.listen.udp {
        let udp = local_target(udp);
        all_ok &= report_alive("udp", client.check_dtls_alive(udp, timeout).await, udp);
    }
    Ok(all_ok)
}

fn report_alive(transport: &str, result: anyhow::Result<String>, addr: SocketAddr) -> bool {
    match result {
        Ok(how) => {
            println!("{transport}  ok    {addr}: {how}");
            true
        }
        Err(err) => {
            println!("{transport}  FAIL  {addr}: {err:#}");
            false
        }
    }
}

/// HOST:PORT or [IPv6]:PORT into the header's host and port fields.
fn target_header(target: &str) -> anyhow::Result<TunnelHeader> {
    let (host, port) = target
        .rsplit_once(':')
        .with_context(|| format!("--target {target}: expected HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let header = TunnelHeader::new(host, port, 0).with_context(|| format!("--target {target}"))?;
    header
        .destination()
        .map_err(|e| anyhow::anyhow!("--target {target}: the agent would refuse it: {e}"))?;
    Ok(header)
}

pub async fn forward(
    server: String,
    listen: SocketAddr,
    target: String,
    udp: bool,
    idle: Duration,
    timeout: Duration,
    certs: CertArgs,
) -> anyhow::Result<bool> {
    let forward = godoxy_agent::forward::Forward {
        client: certs.client()?,
        server: resolve(&server).await?,
        header: target_header(&target)?,
        handshake_timeout: timeout,
        idle_timeout: idle,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::cli::signals::watch(shutdown.clone()));
    if udp {
        let socket = tokio::net::UdpSocket::bind(listen)
            .await
            .with_context(|| format!("binding {listen}/udp"))?;
        info!(listen = %socket.local_addr()?, %target, agent = %forward.server, "forwarding UDP");
        godoxy_agent::forward::udp(socket, forward, shutdown).await;
    } else {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}/tcp"))?;
        info!(listen = %listener.local_addr()?, %target, agent = %forward.server, "forwarding TCP");
        godoxy_agent::forward::tcp(listener, forward, shutdown).await;
    }
    Ok(true)
}
