//! The `mem` section: a fresh agent's idle RSS, RSS per idle TCP tunnel and per idle UDP
//! session, and the binary's size.

use std::fs;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinSet;

use crate::dgram::Dgram;
use crate::harness::{Agent, Bench, MIB};
use crate::load::{self, Target};
use crate::procs;
use crate::stats::{Check, Summary, table};

/// The agent's memory and fds at one moment.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct MemReading {
    fds: usize,
    rss: u64,
    anon: u64,
    file: u64,
}

impl MemReading {
    fn of(agent: &Agent) -> Self {
        let pid = agent.pid();
        Self {
            fds: agent.fds(),
            rss: procs::rss_kb(pid),
            anon: procs::status_kb(pid, "RssAnon:").unwrap_or(0),
            file: procs::status_kb(pid, "RssFile:").unwrap_or(0),
        }
    }

    /// kB of RSS per item over `base`.
    fn per(&self, base: &Self, items: usize) -> f64 {
        (self.rss as f64 - base.rss as f64) / items.max(1) as f64
    }
}

/// What one memory round saw.
struct MemRound {
    rows: Vec<(String, MemReading, String)>,
    idle: MemReading,
    per_tcp: f64,
    per_tcp_used: f64,
    per_udp: f64,
    per_udp_used: f64,
    echo_seen: usize,
    notes: Vec<String>,
}

impl Bench {
    fn mem_round(&mut self) -> Result<MemRound> {
        let (n_tcp, n_udp) = (self.sizes.mem_tcp, self.sizes.mem_udp);
        let settle = || std::thread::sleep(Duration::from_millis(500));
        // Waits (bounded) until the agent holds at least `want` fds.
        let wait_fds = |agent: &Agent, want: usize| {
            let deadline = Instant::now() + Duration::from_secs(15);
            while agent.fds() < want && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let mut rows: Vec<(String, MemReading, String)> = Vec::new();

        // TCP: a fresh agent, idle, then n idle tunnels (header sent, no payload).
        let agent = self.start_agent()?;
        settle();
        let idle = MemReading::of(&agent);
        rows.push(("fresh agent, idle".into(), idle, String::new()));
        let ep = Arc::new(self.endpoints(&agent));
        self.warm_up(&ep, &[Target::Agent])?;
        settle();
        let base = MemReading::of(&agent);
        rows.push(("after one tunnel (base)".into(), base, String::new()));
        let e = ep.clone();
        let streams = self.block(async move {
            open_many(n_tcp, 8, move || {
                let e = e.clone();
                async move { e.open(Target::Agent).await }
            })
            .await
        })??;
        // Each tunnel is 2 fds in the agent (client TLS, echo side) once dialed.
        wait_fds(&agent, base.fds + 2 * n_tcp);
        settle();
        let open = MemReading::of(&agent);
        let echo_seen = self.echo.active();
        let per_tcp = open.per(&base, n_tcp);
        rows.push((
            format!("{n_tcp} idle TCP tunnels (header only)"),
            open,
            format!("{per_tcp:.1} kB/tunnel"),
        ));
        // The same tunnels after one 64-byte echo each: buffers the relay allocated but had
        // not touched (calloc from fresh heap pages) become resident.
        let streams = self.block(async move {
            let mut set = JoinSet::new();
            for mut s in streams {
                set.spawn(async move {
                    let msg = [7u8; 64];
                    let mut back = [0u8; 64];
                    let r = tokio::time::timeout(Duration::from_secs(10), async {
                        s.write_all(&msg).await?;
                        s.flush().await?;
                        s.read_exact(&mut back).await
                    })
                    .await;
                    (s, matches!(r, Ok(Ok(_))) && back == msg)
                });
            }
            let mut out = Vec::new();
            let mut bad = 0usize;
            while let Some(Ok((s, ok))) = set.join_next().await {
                bad += usize::from(!ok);
                out.push(s);
            }
            (out, bad)
        })?;
        settle();
        let used = MemReading::of(&agent);
        let per_tcp_used = used.per(&base, n_tcp);
        rows.push((
            format!("same, after one 64-byte echo each ({} failed)", streams.1),
            used,
            format!("{per_tcp_used:.1} kB/tunnel"),
        ));
        self.block(async move {
            let mut set = JoinSet::new();
            for s in streams.0 {
                set.spawn(load::close(s));
            }
            while set.join_next().await.is_some() {}
        })?;
        settle();
        let closed = MemReading::of(&agent);
        rows.push(("TCP tunnels closed".into(), closed, String::new()));
        let tcp_note = agent.log_note();
        drop(agent);

        // UDP: another fresh agent, n idle DTLS sessions (header sent).
        let agent = self.start_agent()?;
        let ep = Arc::new(self.endpoints(&agent));
        let e = ep.clone();
        self.block(async move {
            let d = Dgram::agent(&e).await?;
            d.warm_up().await?;
            d.close().await;
            anyhow::Ok(())
        })??;
        settle();
        let ubase = MemReading::of(&agent);
        rows.push((
            "fresh agent, after one UDP session (base)".into(),
            ubase,
            String::new(),
        ));
        let e = ep.clone();
        let sessions = self.block(async move {
            open_many(n_udp, 8, move || {
                let e = e.clone();
                async move { Dgram::agent(&e).await }
            })
            .await
        })??;
        // One socket to the echo per session, once its header is in.
        wait_fds(&agent, ubase.fds + n_udp);
        settle();
        let uopen = MemReading::of(&agent);
        let per_udp = uopen.per(&ubase, n_udp);
        rows.push((
            format!("{n_udp} idle UDP sessions (header only)"),
            uopen,
            format!("{per_udp:.1} kB/session"),
        ));
        let sessions = self.block(async move {
            let mut set = JoinSet::new();
            for d in sessions {
                set.spawn(async move {
                    let ok = d.warm_up().await.is_ok();
                    (d, ok)
                });
            }
            let mut out = Vec::new();
            let mut bad = 0usize;
            while let Some(Ok((d, ok))) = set.join_next().await {
                bad += usize::from(!ok);
                out.push(d);
            }
            (out, bad)
        })?;
        settle();
        let uused = MemReading::of(&agent);
        let per_udp_used = uused.per(&ubase, n_udp);
        rows.push((
            format!("same, after one datagram each ({} failed)", sessions.1),
            uused,
            format!("{per_udp_used:.1} kB/session"),
        ));
        self.block(async move {
            let mut set = JoinSet::new();
            for d in sessions.0 {
                set.spawn(d.close());
            }
            while set.join_next().await.is_some() {}
        })?;
        settle();
        let uclosed = MemReading::of(&agent);
        rows.push(("UDP sessions closed".into(), uclosed, String::new()));
        let udp_note = agent.log_note();
        drop(agent);
        Ok(MemRound {
            rows,
            idle,
            per_tcp,
            per_tcp_used,
            per_udp,
            per_udp_used,
            echo_seen,
            notes: [tcp_note, udp_note].into_iter().flatten().collect(),
        })
    }

    /// Memory per idle tunnel and session, idle RSS and binary size.
    pub fn section_mem(&mut self) -> Result<()> {
        let size = fs::metadata(&self.agent_bin)?.len();
        let (n_tcp, n_udp, runs) = (self.sizes.mem_tcp, self.sizes.mem_udp, self.sizes.runs);
        let mut rounds = Vec::with_capacity(runs);
        for round in 0..runs {
            let r = self.mem_round()?;
            eprintln!(
                "bench: mem round {}/{runs}: idle {} kB, {:.1} kB/TCP tunnel, {:.1} kB/UDP \
                 session",
                round + 1,
                r.idle.rss,
                r.per_tcp,
                r.per_udp
            );
            rounds.push(r);
        }
        let sum = |f: &dyn Fn(&MemRound) -> f64| {
            Summary::of(&rounds.iter().map(f).collect::<Vec<_>>())
                .ok_or_else(|| anyhow::anyhow!("no memory round ran"))
        };
        let idle = sum(&|r| r.idle.rss as f64)?;
        let idle_anon = sum(&|r| r.idle.anon as f64)?;
        let idle_file = sum(&|r| r.idle.file as f64)?;
        let per_tcp = sum(&|r| r.per_tcp)?;
        let per_tcp_used = sum(&|r| r.per_tcp_used)?;
        let per_udp = sum(&|r| r.per_udp)?;
        let per_udp_used = sum(&|r| r.per_udp_used)?;
        let last = rounds
            .last()
            .ok_or_else(|| anyhow::anyhow!("no memory round ran"))?;
        let checks = [
            Check::new(
                "<= 16 kB RSS per idle TCP tunnel",
                format!(
                    "{} kB ({n_tcp} tunnels, header only; {} kB after one echo each)",
                    per_tcp.show(1),
                    per_tcp_used.show(1)
                ),
                per_tcp.median <= 16.0,
            ),
            Check::new(
                "<= 24 kB RSS per idle UDP session",
                format!(
                    "{} kB ({n_udp} sessions, header only; {} kB after one datagram each)",
                    per_udp.show(1),
                    per_udp_used.show(1)
                ),
                per_udp.median <= 24.0,
            ),
            Check::new(
                "<= 4 MB idle RSS",
                format!(
                    "{} kB (anon {} kB, file-backed {} kB)",
                    idle.show(0),
                    idle_anon.show(0),
                    idle_file.show(0)
                ),
                idle.median <= 4096.0,
            ),
            Check::new(
                "binary <= 6 MB",
                format!(
                    "{size} bytes ({:.2} MiB, {:.2} MB)",
                    size as f64 / MIB,
                    size as f64 / 1e6
                ),
                size as f64 <= 6.0 * MIB,
            ),
        ];
        let table_rows: Vec<Vec<String>> = last
            .rows
            .iter()
            .map(|(label, m, per)| {
                vec![
                    label.clone(),
                    m.rss.to_string(),
                    m.anon.to_string(),
                    m.file.to_string(),
                    m.fds.to_string(),
                    if per.is_empty() {
                        "-".into()
                    } else {
                        per.clone()
                    },
                ]
            })
            .collect();
        println!(
            "\n== Memory: agent RSS (/proc/PID/status) with idle tunnels; per tunnel = (RSS - \
             base) / count; a fresh agent for each half of each round\n\
             summary over {runs} round(s): idle RSS {} kB (anon {}, file-backed {}); per idle \
             TCP tunnel {} kB (after one echo each {}); per idle UDP session {} kB (after one \
             datagram each {})\nlast round:\n{}",
            idle.show(0),
            idle_anon.show(0),
            idle_file.show(0),
            per_tcp.show(1),
            per_tcp_used.show(1),
            per_udp.show(1),
            per_udp_used.show(1),
            table(
                &["state", "RSS kB", "anon kB", "file kB", "fds", "per tunnel"],
                &table_rows
            )
        );
        println!(
            "echo saw {} TCP connections with the tunnels open",
            last.echo_seen
        );
        for c in checks {
            println!("{}", c.line());
            self.checks.push(c);
        }
        for note in &last.notes {
            println!("{note}");
        }
        self.json.insert(
            "mem".into(),
            json!({
                "binary_bytes": size,
                "idle_rss_kb": idle, "idle_anon_kb": idle_anon, "idle_file_kb": idle_file,
                "tcp": {"tunnels": n_tcp, "kb_per_tunnel": per_tcp,
                        "kb_per_tunnel_after_echo": per_tcp_used},
                "udp": {"sessions": n_udp, "kb_per_session": per_udp,
                        "kb_per_session_after_datagram": per_udp_used},
                "rounds": rounds.iter().map(|r| r.rows.iter()
                    .map(|(label, m, _)| json!({"state": label, "reading": m}))
                    .collect::<Vec<_>>()).collect::<Vec<_>>(),
            }),
        );
        Ok(())
    }
}

/// Opens `n` things, `parallel` at a time; all or an error.
async fn open_many<T, F, Fut>(n: usize, parallel: usize, open: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<T>> + Send,
{
    let mut set = JoinSet::new();
    for w in 0..parallel {
        let open = open.clone();
        let count = n / parallel + usize::from(w < n % parallel);
        set.spawn(async move {
            let mut got = Vec::with_capacity(count);
            for _ in 0..count {
                got.push(open().await?);
            }
            anyhow::Ok(got)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    Ok(all)
}
