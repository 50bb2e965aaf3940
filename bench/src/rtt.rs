//! The `rtt` section: 64-byte ping-pong on one connection, p50 and p99 per target, and the
//! proxy's CPU per round trip; and the ping-pong workload itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::timeout;

use crate::harness::{Bench, TARGETS};
use crate::load::{Cpu, Endpoints, Meter, Target, close};
use crate::stats::{Summary, percentile, ratio_check, show, table};

impl Bench {
    /// Round-trip times through every target.
    pub fn section_rtt(&mut self) -> Result<()> {
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
                    ping_pong(&e, t, warm, n, &meter, Duration::from_secs(120)).await
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
}

/// `warm` then `n` 64-byte ping-pongs on one connection: the round-trip times in ns.
pub async fn ping_pong(
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
