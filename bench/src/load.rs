//! What every workload shares: the targets a connection goes through, where they listen, the
//! same client code to open and close a connection through each, and the CPU meter read around
//! each run. The workloads themselves live with their sections (`tcp`, `rtt`, `tps`, `udp`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use godoxy_agent::client::ClientTls;
use godoxy_agent::protocol::TunnelHeader;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::echo;
use crate::procs;

/// Thread-name prefix of the client runtime.
pub const CLIENT_THREAD: &str = "bench-client";
/// Bound on opening a connection (and, in the tunnels/s run, on its one echo).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// TLS + 275-byte header to the agent, which dials the echo.
    Agent,
    /// TLS (same client, no header) to stunnel, which dials the echo.
    Stunnel,
    /// Plain TCP to socat, which dials the echo.
    Socat,
    /// Plain TCP straight to the echo.
    Direct,
}

impl Target {
    /// Lowercase name, as in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Stunnel => "stunnel",
            Self::Socat => "socat",
            Self::Direct => "direct",
        }
    }
}

/// Anything the workloads can read and write.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
/// A connection through any target.
pub type Stream = Box<dyn Io>;

/// Where everything listens.
#[derive(Clone)]
pub struct Endpoints {
    /// Client TLS: the bench's client certificate, verifying the server as `godoxy.agent`.
    pub tls: ClientTls,
    /// The agent's TLS port.
    pub agent_tcp: SocketAddr,
    /// The agent's DTLS port.
    pub agent_udp: SocketAddr,
    /// stunnel's accept port.
    pub stunnel: SocketAddr,
    /// socat's listen port.
    pub socat: SocketAddr,
    /// The TCP echo.
    pub echo_tcp: SocketAddr,
    /// The UDP echo.
    pub echo_udp: SocketAddr,
}

impl Endpoints {
    /// The header naming the TCP echo.
    pub fn tcp_header(&self) -> Result<TunnelHeader> {
        Ok(TunnelHeader::new(
            "127.0.0.1",
            &self.echo_tcp.port().to_string(),
            0,
        )?)
    }

    /// The header naming the UDP echo.
    pub fn udp_header(&self) -> Result<TunnelHeader> {
        Ok(TunnelHeader::new(
            "127.0.0.1",
            &self.echo_udp.port().to_string(),
            0,
        )?)
    }

    /// A connection to the echo through `target`, ready for payload.
    pub async fn open(&self, target: Target) -> Result<Stream> {
        let open = async {
            let stream: Stream = match target {
                Target::Agent => Box::new(
                    self.tls
                        .open_tunnel(self.agent_tcp, &self.tcp_header()?)
                        .await?,
                ),
                Target::Stunnel => Box::new(self.tls.connect_stream(self.stunnel).await?),
                Target::Socat => Box::new(plain(self.socat).await?),
                Target::Direct => Box::new(plain(self.echo_tcp).await?),
            };
            anyhow::Ok(stream)
        };
        timeout(OPEN_TIMEOUT, open)
            .await
            .map_err(|_| anyhow!("opening a {} connection timed out", target.name()))?
            .with_context(|| format!("opening a {} connection", target.name()))
    }

    /// The negotiated TLS version and cipher suite with `target` (agent or stunnel).
    pub async fn tls_suite(&self, target: Target) -> Result<String> {
        let tls = match target {
            Target::Agent => self.tls.connect_stream(self.agent_tcp).await?,
            Target::Stunnel => self.tls.connect_stream(self.stunnel).await?,
            _ => return Ok("-".to_owned()),
        };
        let (_, conn) = tls.get_ref();
        let suite = format!(
            "{:?} {:?}",
            conn.protocol_version(),
            conn.negotiated_cipher_suite().map(|s| s.suite())
        );
        let mut stream: Stream = Box::new(tls);
        if target == Target::Agent {
            // The agent waits for a header: send a health probe so it closes cleanly.
            stream.write_all(&TunnelHeader::probe().encode()).await?;
        }
        close(stream).await;
        Ok(suite)
    }
}

async fn plain(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Closes our write side and reads until the far end closes (bounded): the tunnel is then
/// gone from the proxy too. `false` when that did not end in a clean EOF.
pub async fn close(mut stream: Stream) -> bool {
    let done = async {
        if stream.shutdown().await.is_err() {
            return false;
        }
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    };
    timeout(CLOSE_TIMEOUT, done).await.unwrap_or(false)
}

/// CPU time read around a run: the proxy process (with its children), our client and echo
/// threads, and the whole machine.
pub struct Meter {
    proxy: Option<u32>,
}

/// One reading of the meter.
#[derive(Clone, Copy)]
pub struct Snap {
    at: Instant,
    proxy: (u64, u64),
    client: u64,
    echo: u64,
    machine: (u64, u64),
}

/// CPU seconds spent during a run, and its wall time.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Cpu {
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// The proxy under test (agent, stunnel or socat with its forked children).
    pub proxy_s: f64,
    /// The part of `proxy_s` spent in the kernel (system time).
    pub proxy_sys_s: f64,
    /// The bench's client threads (TLS, pattern generation and checking).
    pub client_s: f64,
    /// The echo thread.
    pub echo_s: f64,
    /// Busy CPU seconds of the whole machine (2 cores: at most 2 x wall).
    pub machine_s: f64,
}

impl Meter {
    /// A meter for `proxy` (no process for direct runs).
    pub fn new(proxy: Option<u32>) -> Self {
        Self { proxy }
    }

    /// Reads every counter now.
    pub fn snap(&self) -> Snap {
        Snap {
            at: Instant::now(),
            proxy: self.proxy.map_or((0, 0), procs::tree_ticks),
            client: procs::thread_ticks(CLIENT_THREAD),
            echo: procs::thread_ticks(echo::THREAD),
            machine: procs::machine_ticks(),
        }
    }

    /// What was spent since `before`.
    pub fn since(&self, before: &Snap) -> Cpu {
        let now = self.snap();
        let tck = procs::clk_tck();
        let s = |a: u64, b: u64| a.saturating_sub(b) as f64 / tck;
        Cpu {
            wall_s: now.at.duration_since(before.at).as_secs_f64(),
            proxy_s: s(now.proxy.0 + now.proxy.1, before.proxy.0 + before.proxy.1),
            proxy_sys_s: s(now.proxy.1, before.proxy.1),
            client_s: s(now.client, before.client),
            echo_s: s(now.echo, before.echo),
            machine_s: s(now.machine.0, before.machine.0),
        }
    }
}
