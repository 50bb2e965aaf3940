//! The `tcp` section: throughput of 1 and of 8 tunnels, every byte echoed and checked, with the
//! CPU each side spent; and the throughput workload itself (also the warm-up of every section).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::harness::{Bench, TARGETS};
use crate::load::{Cpu, Endpoints, Meter, Stream, Target, close};
use crate::stats::{cpu_summary, ratio_check, show, table};

/// Bytes per write and per read in the throughput runs.
const CHUNK: usize = 64 * 1024;
/// The payload repeats with this (prime) period: lost, duplicated or reordered bytes show.
const PERIOD: usize = 65521;

impl Bench {
    /// TCP throughput, 1 tunnel then 8, against every target.
    pub fn section_tcp(&mut self) -> Result<()> {
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
                        throughput(&e, t, conns, bytes, &meter, limit).await
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
