//! The `tps` section: tunnels per second (connect, handshake, header, one echo, close) through
//! the agent, stunnel and socat, and whether the agent's fds and RSS come back to idle after;
//! and the tunnels workload itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::harness::{Bench, PROXIES};
use crate::load::{Cpu, Endpoints, Meter, OPEN_TIMEOUT, Target, close};
use crate::procs;
use crate::stats::{Check, Summary, ratio_check, show, table};

/// "Back near idle" after the tunnels/s run: fds within this many of idle...
const NEAR_IDLE_FDS: usize = 2;
/// ... and RSS within this many kB of idle.
const NEAR_IDLE_RSS_KB: u64 = 1024;

impl Bench {
    /// Tunnels per second through the agent, stunnel and socat.
    pub fn section_tps(&mut self) -> Result<()> {
        let mut agent = self.start_agent()?;
        std::thread::sleep(Duration::from_millis(300));
        let fresh = (agent.fds(), agent.rss_kb());
        let ep = Arc::new(self.endpoints(&agent));
        self.warm_up(&ep, &PROXIES)?;
        std::thread::sleep(Duration::from_millis(300));
        let idle = (agent.fds(), agent.rss_kb());
        let (total, parallel, runs) = (self.sizes.tps, self.sizes.tps_parallel, self.sizes.runs);
        let mut results: BTreeMap<&str, Vec<Tps>> = BTreeMap::new();
        let mut rounds = Vec::new();
        for round in 0..runs {
            for t in PROXIES {
                self.ensure_running(&mut agent)?;
                let meter = Meter::new(self.proxy_pid(&agent, t));
                let e = ep.clone();
                let r = self.block(async move {
                    tunnels(e, t, total, parallel, &meter, Duration::from_secs(300)).await
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
pub async fn tunnels(
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
