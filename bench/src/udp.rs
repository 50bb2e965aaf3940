//! The `udp` section: 1200-byte and 64-byte datagrams with a window in flight, on 1 session
//! then on 8, through the agent's DTLS and straight to the echo; and the windowed datagram
//! workload itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::dgram::{Dgram, PAYLOAD, SMALL, WARM_SEQ, check, fill};
use crate::harness::Bench;
use crate::load::{Cpu, Meter, Target};
use crate::stats::{Check, Summary, percentile, ratio_check, show, table};

/// Datagrams in flight per session.
pub const WINDOW: usize = 64;
/// No reply for this long with the window full: one in-flight datagram is taken as lost and
/// the next is sent anyway (a later arrival gives the slot back).
const STALL: Duration = Duration::from_millis(200);
/// After the last send, wait this long for stragglers before counting the rest as lost.
const DRAIN: Duration = Duration::from_secs(1);

impl Bench {
    /// UDP datagrams/s, loss and RTT, agent against direct.
    pub fn section_udp(&mut self) -> Result<()> {
        let mut agent = self.start_agent()?;
        let ep = Arc::new(self.endpoints(&agent));
        let (n, sessions, runs) = (self.sizes.udp, self.sizes.udp_sessions, self.sizes.runs);
        // Every session sends n datagrams, also with 8 at once; 1200 bytes, then 64.
        let cases = [
            (1usize, n, PAYLOAD),
            (sessions, n, PAYLOAD),
            (1, n, SMALL),
            (sessions, n, SMALL),
        ];
        let mut results: BTreeMap<(usize, usize, &str), Vec<UdpRun>> = BTreeMap::new();
        for round in 0..runs {
            for &(count, per, size) in &cases {
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
                            run(open, per, size, &meter, Duration::from_secs(300)).await?;
                        for d in open {
                            if let Ok(d) = Arc::try_unwrap(d) {
                                d.close().await;
                            }
                        }
                        anyhow::Ok(run)
                    })??;
                    eprintln!(
                        "bench: udp round {}/{runs} {count} session(s) x {size} B {}: {:.0} \
                         datagrams/s, {} lost",
                        round + 1,
                        t.name(),
                        r.dgrams_per_s,
                        r.lost
                    );
                    results.entry((count, size, t.name())).or_default().push(r);
                }
            }
        }
        let mut rows = Vec::new();
        let mut section = serde_json::Map::new();
        for &(count, per, size) in &cases {
            for t in [Target::Agent, Target::Direct] {
                let r = &results[&(count, size, t.name())];
                let f =
                    |g: &dyn Fn(&UdpRun) -> f64| Summary::of(&r.iter().map(g).collect::<Vec<_>>());
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
                    format!("{count} x {per} x {size} B"),
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
                // The 1200-byte keys keep their earlier names.
                let key = if size == PAYLOAD {
                    format!("{}_{count}", t.name())
                } else {
                    format!("{}_{count}_{size}b", t.name())
                };
                section.insert(
                    key,
                    json!({"sessions": count, "datagrams_per_session": per, "payload": size,
                           "datagrams_per_s": dps, "mb_per_s": mbps, "rtt_p50_us": p50,
                           "agent_cpu_us_per_datagram": cpu_us, "agent_kernel_pct": sys,
                           "client_cpu_us_per_datagram": client, "machine_busy_pct": machine,
                           "lost_all_runs": lost, "runs": r}),
                );
            }
        }
        let med = |count: usize, t: Target, g: &dyn Fn(&UdpRun) -> f64| {
            Summary::of(
                &results[&(count, PAYLOAD, t.name())]
                    .iter()
                    .map(g)
                    .collect::<Vec<_>>(),
            )
            .map_or(0.0, |s| s.median)
        };
        let dps = |x: &UdpRun| x.dgrams_per_s;
        let cpu = |x: &UdpRun| x.cpu.proxy_s / x.received.max(1) as f64 * 1e6;
        let cpu_check = |count: usize, most: f64| {
            let us = med(count, Target::Agent, &cpu);
            Check::new(
                format!("UDP agent CPU <= {most} us per echoed datagram, {count} session(s)"),
                format!("{us:.1} us ({PAYLOAD}-byte datagrams, median)"),
                us <= most,
            )
        };
        let lost8: u64 = results[&(sessions, PAYLOAD, "agent")]
            .iter()
            .map(|x| x.lost)
            .sum();
        let sent8: u64 = results[&(sessions, PAYLOAD, "agent")]
            .iter()
            .map(|x| x.sent)
            .sum();
        let checks = [
            ratio_check(
                "UDP 1 session >= 0.55x direct datagrams/s",
                med(1, Target::Agent, &dps),
                med(1, Target::Direct, &dps),
                0.55,
                false,
                "datagrams/s",
            ),
            ratio_check(
                &format!("UDP {sessions} sessions >= 0.75x direct datagrams/s"),
                med(sessions, Target::Agent, &dps),
                med(sessions, Target::Direct, &dps),
                0.75,
                false,
                "datagrams/s",
            ),
            Check::new(
                format!("UDP {sessions} sessions: 0 loss"),
                format!("{lost8} of {sent8} lost over {runs} run(s)"),
                lost8 == 0,
            ),
            cpu_check(1, 12.0),
            cpu_check(sessions, 10.0),
        ];
        println!(
            "\n== UDP, {PAYLOAD}-byte then {SMALL}-byte datagrams, {} in flight per session; \
             {sessions} sessions each send {n} too; RTT at full window; CPU per echoed datagram; \
             stalls = window full for 200 ms, rcvbuf drops = kernel UDP RcvbufErrors \
             (machine-wide)\n{}",
            WINDOW,
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
    size: usize,
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
        set.spawn(session(
            d.clone(),
            i as u32,
            per_session,
            size,
            start,
            deadline,
        ));
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
        mb_per_s: received as f64 * size as f64 / span / 1e6,
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

async fn session(
    d: Arc<Dgram>,
    id: u32,
    n: u64,
    size: usize,
    start: Instant,
    deadline: Instant,
) -> Session {
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
            let mut buf = vec![0u8; size];
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
                let Some(seq) = check(&buf[..len], id, size) else {
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
