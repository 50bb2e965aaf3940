//! The TCP workloads (throughput, ping-pong RTT, tunnels per second), the same client code
//! for every target, and the CPU meter read around each run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use godoxy_agent::client::ClientTls;
use godoxy_agent::tunnel::header::TunnelHeader;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::echo;
use crate::procs;

/// Thread-name prefix of the client runtime.
pub const CLIENT_THREAD: &str = "bench-client";
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes per write and per read in the throughput runs.
const CHUNK: usize = 64 * 1024;
/// The payload repeats with this (prime) period: lost, duplicated or reordered bytes show.
const PERIOD: usize = 65521;

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

/// The payload: byte `i` of every stream is `pattern()[i % PERIOD]`.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let period: Vec<u8> = (0..PERIOD)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 56) as u8
            })
            .collect();
        // Byte i of the stream is period[i % PERIOD]; the tail lets a chunk start anywhere
        // in the period and still be one slice.
        period
            .iter()
            .cycle()
            .take(PERIOD + CHUNK)
            .copied()
            .collect()
    })
}

/// `conns` connections each send `bytes` to the echo while reading them back, checked.
/// Timed (and metered) from when every connection is open until the last byte is back.
pub async fn throughput(
    ep: &Endpoints,
    target: Target,
    conns: usize,
    bytes: u64,
    meter: &Meter,
    limit: Duration,
) -> Result<Cpu> {
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        streams.push(ep.open(target).await?);
    }
    let before = meter.snap();
    let mut set = JoinSet::new();
    for stream in streams {
        set.spawn(transfer(stream, bytes));
    }
    let mut done = Vec::with_capacity(conns);
    let all = async {
        while let Some(joined) = set.join_next().await {
            done.push(joined.context("transfer task")??);
        }
        anyhow::Ok(())
    };
    let outcome = timeout(limit, all).await;
    let cpu = meter.since(&before);
    match outcome {
        Err(_) => bail!("{} throughput run exceeded {limit:?}", target.name()),
        Ok(Err(e)) => return Err(e.context(format!("{} throughput run", target.name()))),
        Ok(Ok(())) => {}
    }
    let mut closing = JoinSet::new();
    for stream in done {
        closing.spawn(close(stream));
    }
    while closing.join_next().await.is_some() {}
    Ok(cpu)
}

async fn transfer(stream: Stream, bytes: u64) -> Result<Stream> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let p = pattern();
        let mut off = 0u64;
        while off < bytes {
            let start = (off % PERIOD as u64) as usize;
            let len = (bytes - off).min(CHUNK as u64) as usize;
            wr.write_all(&p[start..start + len]).await?;
            off += len as u64;
        }
        wr.flush().await?;
        std::io::Result::Ok(wr)
    });
    let read = async {
        let p = pattern();
        let mut buf = vec![0u8; CHUNK];
        let mut off = 0u64;
        while off < bytes {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                bail!("the stream ended after {off} of {bytes} bytes");
            }
            let start = (off % PERIOD as u64) as usize;
            if buf[..n] != p[start..start + n] {
                bail!(mismatch(&buf[..n], off));
            }
            off += n as u64;
        }
        if off != bytes {
            bail!("{off} bytes came back, {bytes} were sent");
        }
        Ok(())
    };
    if let Err(e) = read.await {
        writer.abort();
        return Err(e);
    }
    let wr = writer.await.context("writer task")??;
    Ok(rd.unsplit(wr))
}

/// Describes a payload mismatch: where it starts and, when the bytes there belong to the
/// pattern at another offset, by how much the stream is shifted (lost or repeated bytes).
fn mismatch(got: &[u8], off: u64) -> String {
    let p = pattern();
    let start = (off % PERIOD as u64) as usize;
    let first = got
        .iter()
        .zip(&p[start..])
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    let at = off + first as u64;
    let probe = &got[first..(first + 32).min(got.len())];
    let shift = (0..PERIOD)
        .find(|&s| p[s..s + probe.len()] == *probe)
        .map(|s| {
            let expected = (at % PERIOD as u64) as i64;
            let mut d = s as i64 - expected;
            if d > PERIOD as i64 / 2 {
                d -= PERIOD as i64;
            } else if d < -(PERIOD as i64) / 2 {
                d += PERIOD as i64;
            }
            d
        });
    format!(
        "payload mismatch at byte {at} (read of {} bytes at {off}); {}",
        got.len(),
        match shift {
            Some(d) if d > 0 => format!("the stream skipped {d} bytes (mod {PERIOD})"),
            Some(d) => format!("the stream repeated {} bytes (mod {PERIOD})", -d),
            None => "the bytes there are not from the pattern".to_owned(),
        }
    )
}

/// `warm` then `n` 64-byte ping-pongs on one connection: the round-trip times in ns.
pub async fn rtt(
    ep: &Endpoints,
    target: Target,
    warm: usize,
    n: usize,
    meter: &Meter,
    limit: Duration,
) -> Result<(Vec<u64>, Cpu)> {
    let mut stream = ep.open(target).await?;
    let mut samples = Vec::with_capacity(n);
    let mut before = meter.snap();
    let run = async {
        let mut msg = [0u8; 64];
        let mut back = [0u8; 64];
        for i in 0..warm + n {
            if i == warm {
                before = meter.snap();
            }
            msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
            msg[8] = msg[8].wrapping_add(1);
            let t0 = Instant::now();
            stream.write_all(&msg).await?;
            stream.flush().await?;
            stream.read_exact(&mut back).await?;
            let dt = t0.elapsed();
            if back != msg {
                bail!("echo mismatch at round trip {i}");
            }
            if i >= warm {
                samples.push(dt.as_nanos() as u64);
            }
        }
        anyhow::Ok(())
    };
    match timeout(limit, run).await {
        Err(_) => bail!("{} RTT run exceeded {limit:?}", target.name()),
        Ok(r) => r.with_context(|| format!("{} RTT run", target.name()))?,
    }
    let cpu = meter.since(&before);
    close(stream).await;
    Ok((samples, cpu))
}

/// What a tunnels-per-second run did.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Tps {
    /// Tunnels completed per second.
    pub per_s: f64,
    /// Tunnels that failed (connect, handshake, echo or close).
    pub failed: usize,
    /// Tunnels whose close did not end in a clean EOF (counted, not failed).
    pub unclean_close: usize,
    /// CPU during the run.
    pub cpu: Cpu,
}

/// `total` tunnels, `parallel` at a time: open (TCP, TLS, header), one 64-byte echo, close
/// (our FIN or close_notify, then the far side's EOF).
pub async fn tps(
    ep: Arc<Endpoints>,
    target: Target,
    total: usize,
    parallel: usize,
    meter: &Meter,
    limit: Duration,
) -> Result<Tps> {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let unclean = Arc::new(AtomicUsize::new(0));
    let before = meter.snap();
    let mut set = JoinSet::new();
    for _ in 0..parallel {
        let (ep, next, failed, unclean) =
            (ep.clone(), next.clone(), failed.clone(), unclean.clone());
        set.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                match one_tunnel(&ep, target).await {
                    Ok(true) => {}
                    Ok(false) => {
                        unclean.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let all = async { while set.join_next().await.is_some() {} };
    if timeout(limit, all).await.is_err() {
        bail!("{} tunnels/s run exceeded {limit:?}", target.name());
    }
    let cpu = meter.since(&before);
    let failed = failed.load(Ordering::Relaxed);
    if failed * 10 > total {
        bail!(
            "{} tunnels/s run: {failed} of {total} tunnels failed",
            target.name()
        );
    }
    Ok(Tps {
        per_s: (total - failed) as f64 / cpu.wall_s,
        failed,
        unclean_close: unclean.load(Ordering::Relaxed),
        cpu,
    })
}

async fn one_tunnel(ep: &Endpoints, target: Target) -> Result<bool> {
    let mut stream = ep.open(target).await?;
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    timeout(OPEN_TIMEOUT, async {
        stream.write_all(&msg).await?;
        stream.flush().await?;
        stream.read_exact(&mut back).await
    })
    .await
    .map_err(|_| anyhow!("echo timed out"))??;
    if back != msg {
        bail!("echo mismatch");
    }
    Ok(close(stream).await)
}
