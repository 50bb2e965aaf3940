//! The UDP workload: 1200-byte datagrams, a window of 64 in flight per session, through a
//! DTLS session to the agent (the library's `ClientTls::open_udp`) or straight to the echo.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use godoxy_agent::client::UdpTunnel;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::load::{Cpu, Endpoints, Meter};
use crate::stats::percentile;

/// Payload bytes per datagram.
pub const PAYLOAD: usize = 1200;
/// Datagrams in flight per session.
pub const WINDOW: usize = 64;
/// No reply for this long with the window full: one in-flight datagram is taken as lost and
/// the next is sent anyway (a later arrival gives the slot back).
const STALL: Duration = Duration::from_millis(200);
/// After the last send, wait this long for stragglers before counting the rest as lost.
const DRAIN: Duration = Duration::from_secs(1);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Sequence number of warm-up datagrams (not counted).
const WARM_SEQ: u64 = u64::MAX;
const SEQ_PATTERN: usize = 251;

/// One session's transport.
pub enum Dgram {
    /// A DTLS session through the agent.
    Dtls(Box<UdpTunnel>),
    /// A plain UDP socket connected to the echo.
    Plain(UdpSocket),
}

impl Dgram {
    /// A DTLS session to the agent naming the UDP echo (the header is sent).
    pub async fn agent(ep: &Endpoints) -> Result<Self> {
        let tunnel = ep
            .tls
            .open_udp(ep.agent_udp, &ep.udp_header()?, HANDSHAKE_TIMEOUT)
            .await?;
        Ok(Self::Dtls(Box::new(tunnel)))
    }

    /// A socket straight to the UDP echo.
    pub async fn direct(echo: SocketAddr) -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(echo).await?;
        Ok(Self::Plain(socket))
    }

    async fn send(&self, payload: &[u8]) -> Result<()> {
        match self {
            Self::Dtls(t) => t.send(payload).await,
            Self::Plain(s) => {
                s.send(payload).await?;
                Ok(())
            }
        }
    }

    /// `Ok(None)` when nothing came within `within`.
    async fn recv(&self, buf: &mut [u8], within: Duration) -> Result<Option<usize>> {
        match self {
            // DTLSConn::read is cancel safe (a channel receive): an outer timeout tells a
            // quiet moment apart from an error.
            Self::Dtls(t) => {
                match timeout(within, t.recv(buf, within + Duration::from_secs(1))).await {
                    Err(_) => Ok(None),
                    Ok(Ok(Some(n))) => Ok(Some(n)),
                    Ok(Ok(None)) => bail!("the agent closed the session"),
                    Ok(Err(e)) => Err(anyhow!("{e}")),
                }
            }
            Self::Plain(s) => match timeout(within, s.recv(buf)).await {
                Err(_) => Ok(None),
                Ok(r) => Ok(Some(r?)),
            },
        }
    }

    /// Closes the session (close_notify for DTLS).
    pub async fn close(self) {
        if let Self::Dtls(t) = self {
            (*t).close().await;
        }
    }

    /// Sends one warm-up datagram until it comes back (the session is then set up at the
    /// agent: its socket to the echo exists).
    pub async fn warm_up(&self) -> Result<()> {
        let mut payload = vec![0u8; PAYLOAD];
        fill(&mut payload, WARM_SEQ, 0);
        let mut buf = vec![0u8; 8192];
        for _ in 0..5 {
            self.send(&payload).await?;
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                if let Some(n) = self.recv(&mut buf, Duration::from_millis(200)).await?
                    && buf[..n] == payload[..]
                {
                    return Ok(());
                }
            }
        }
        Err(anyhow!("no warm-up datagram came back in 5 tries"))
    }
}

fn seq_pattern() -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        (0..PAYLOAD + SEQ_PATTERN)
            .map(|i| (i * 7 + 3) as u8)
            .collect()
    })
}

fn fill(buf: &mut [u8], seq: u64, session: u32) {
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..12].copy_from_slice(&session.to_le_bytes());
    let at = (seq % SEQ_PATTERN as u64) as usize;
    buf[12..].copy_from_slice(&seq_pattern()[at..at + PAYLOAD - 12]);
}

fn check(buf: &[u8], session: u32) -> Option<u64> {
    if buf.len() != PAYLOAD || buf[8..12] != session.to_le_bytes() {
        return None;
    }
    let seq = u64::from_le_bytes(buf[..8].try_into().ok()?);
    let at = (seq % SEQ_PATTERN as u64) as usize;
    (buf[12..] == seq_pattern()[at..at + PAYLOAD - 12]).then_some(seq)
}

/// What one session saw.
#[derive(Debug, Default)]
struct Session {
    sent: u64,
    received: u64,
    duplicates: u64,
    corrupt: u64,
    stalls: u64,
    errors: u64,
    last_rx: Duration,
    rtts: Vec<u64>,
}

/// A UDP run over all sessions.
#[derive(Clone, Debug, Serialize)]
pub struct UdpRun {
    /// Sessions.
    pub sessions: usize,
    /// Datagrams sent.
    pub sent: u64,
    /// Distinct datagrams that came back intact.
    pub received: u64,
    /// Datagrams that did not come back within the drain time.
    pub lost: u64,
    /// Echoed datagrams per second (from the start to the last arrival).
    pub dgrams_per_s: f64,
    /// Payload MB (10^6 bytes) per second, one way.
    pub mb_per_s: f64,
    /// Round trip at 64 in flight, median, microseconds.
    pub rtt_p50_us: f64,
    /// Round trip at 64 in flight, 99th percentile, microseconds.
    pub rtt_p99_us: f64,
    /// Times the window was full for STALL and a datagram was taken as lost.
    pub stalls: u64,
    /// Duplicated or corrupt datagrams, and send/receive errors.
    pub anomalies: u64,
    /// Kernel UDP counters during the run (InErrors, RcvbufErrors, SndbufErrors), machine-wide.
    pub kernel_udp_errors: [u64; 3],
    /// CPU during the run.
    pub cpu: Cpu,
}

/// Runs `per_session` datagrams on every session at once (sessions already open and warm).
pub async fn run(
    sessions: Vec<Arc<Dgram>>,
    per_session: u64,
    meter: &Meter,
    limit: Duration,
) -> Result<(UdpRun, Vec<Arc<Dgram>>)> {
    let count = sessions.len();
    let kernel_before = crate::procs::udp_errors();
    let before = meter.snap();
    let start = Instant::now();
    let deadline = start + limit;
    let mut set = JoinSet::new();
    for (i, d) in sessions.iter().enumerate() {
        set.spawn(session(d.clone(), i as u32, per_session, start, deadline));
    }
    let mut all = Vec::with_capacity(count);
    while let Some(r) = set.join_next().await {
        all.push(r?);
    }
    let cpu = meter.since(&before);
    let kernel_after = crate::procs::udp_errors();
    let sent: u64 = all.iter().map(|s| s.sent).sum();
    let received: u64 = all.iter().map(|s| s.received).sum();
    let span = all
        .iter()
        .map(|s| s.last_rx)
        .max()
        .unwrap_or_default()
        .as_secs_f64()
        .max(1e-9);
    let mut rtts: Vec<u64> = all.iter().flat_map(|s| s.rtts.iter().copied()).collect();
    rtts.sort_unstable();
    let run = UdpRun {
        sessions: count,
        sent,
        received,
        lost: sent - received,
        dgrams_per_s: received as f64 / span,
        mb_per_s: received as f64 * PAYLOAD as f64 / span / 1e6,
        rtt_p50_us: percentile(&rtts, 50.0) as f64 / 1e3,
        rtt_p99_us: percentile(&rtts, 99.0) as f64 / 1e3,
        stalls: all.iter().map(|s| s.stalls).sum(),
        anomalies: all
            .iter()
            .map(|s| s.duplicates + s.corrupt + s.errors)
            .sum(),
        kernel_udp_errors: [0, 1, 2].map(|i| kernel_after[i].saturating_sub(kernel_before[i])),
        cpu,
    };
    if received == 0 {
        bail!("no datagram came back");
    }
    Ok((run, sessions))
}

async fn session(d: Arc<Dgram>, id: u32, n: u64, start: Instant, deadline: Instant) -> Session {
    let window = Arc::new(Semaphore::new(WINDOW));
    // Slots handed out on a stall: an arrival pays one back instead of freeing a slot.
    let owed = Arc::new(AtomicU64::new(0));
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let (d, window, owed, sent_at, done) = (
            d.clone(),
            window.clone(),
            owed.clone(),
            sent_at.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let mut buf = vec![0u8; PAYLOAD];
            let (mut sent, mut stalls, mut errors) = (0u64, 0u64, 0u64);
            for seq in 0..n {
                if Instant::now() > deadline {
                    break;
                }
                match timeout(STALL, window.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    Ok(Err(_)) => break,
                    Err(_) => {
                        stalls += 1;
                        owed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                fill(&mut buf, seq, id);
                sent_at[seq as usize].store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                if d.send(&buf).await.is_err() {
                    errors += 1;
                    if errors > 1000 {
                        break;
                    }
                }
                sent += 1;
            }
            done.store(true, Ordering::Release);
            (sent, stalls, errors)
        })
    };
    let mut s = Session::default();
    let mut got = vec![false; n as usize];
    let mut buf = vec![0u8; 8192];
    let mut quiet_since: Option<Instant> = None;
    s.rtts.reserve(n as usize);
    while s.received < n && Instant::now() < deadline {
        match d.recv(&mut buf, Duration::from_millis(100)).await {
            Ok(Some(len)) => {
                quiet_since = None;
                let Some(seq) = check(&buf[..len], id) else {
                    s.corrupt += 1;
                    continue;
                };
                if seq == WARM_SEQ {
                    continue;
                }
                if seq >= n || got[seq as usize] {
                    s.duplicates += 1;
                    continue;
                }
                got[seq as usize] = true;
                s.received += 1;
                let now = start.elapsed();
                s.last_rx = now;
                let sent = sent_at[seq as usize].load(Ordering::Relaxed);
                s.rtts.push((now.as_nanos() as u64).saturating_sub(sent));
                let paid = owed
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| o.checked_sub(1))
                    .is_ok();
                if !paid {
                    window.add_permits(1);
                }
            }
            Ok(None) => {
                if done.load(Ordering::Acquire) {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > DRAIN {
                        break;
                    }
                }
            }
            Err(_) => {
                s.errors += 1;
                if s.errors > 1000 {
                    break;
                }
            }
        }
    }
    window.close();
    let (sent, stalls, errors) = sender.await.unwrap_or((0, 0, 1));
    s.sent = sent;
    s.stalls = stalls;
    s.errors += errors;
    s
}
