//! Child processes (agent, stunnel, socat) and what /proc says about them and about us.

use std::collections::HashMap;
use std::fs;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

/// A child process that is stopped (SIGTERM, then SIGKILL) with its descendants when dropped,
/// also when the bench fails half way.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// The process id: its CPU time, RSS and fds are read from /proc/PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error naming the exit status and the log's last lines when the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                self.log_tail(20)
            );
        }
        Ok(())
    }

    /// The last `n` lines of the process's output.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Lines of the log that contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (bounded) until `ready` holds, failing early when the process exits.
    pub fn wait_until(
        &mut self,
        what: &str,
        within: Duration,
        ready: impl Fn() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.ensure_running()?;
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: {what} not within {within:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.pid();
        // socat forks a process per connection: they must go too.
        let kids = descendants(pid);
        signal("TERM", pid);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for kid in kids {
            if Path::new(&format!("/proc/{kid}")).exists() {
                signal("KILL", kid);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(sig: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A folder removed (with everything in it) when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh folder under the system temp dir.
    pub fn new(prefix: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Clock ticks per second for /proc's utime and stime (`getconf CLK_TCK`, else 100).
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|v| *v > 0.0)
            .unwrap_or(100.0)
    })
}

/// The fields of /proc/PID/stat after the `(comm)` one: index 0 is field 3 (state).
fn stat_fields(path: &str) -> Option<(String, Vec<u64>, u32)> {
    let text = fs::read_to_string(path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let ppid = rest.get(1)?.parse().ok()?;
    let nums = rest.iter().map(|f| f.parse::<u64>().unwrap_or(0)).collect();
    Some((comm, nums, ppid))
}

/// (user, system) ticks of one process: utime + cutime, stime + cstime (reaped children).
fn own_ticks(pid: u32) -> (u64, u64) {
    let Some((_, f, _)) = stat_fields(&format!("/proc/{pid}/stat")) else {
        return (0, 0);
    };
    // fields 14..=17: utime stime cutime cstime (index = field - 3)
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    (get(11) + get(13), get(12) + get(14))
}

/// Every live descendant of `pid`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((_, _, ppid)) = stat_fields(&format!("/proc/{p}/stat")) {
                parent.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &kid in parent.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(kid);
            todo.push(kid);
        }
    }
    out
}

/// (user, system) CPU ticks of a process, its live descendants and its reaped children
/// (socat forks one process per connection; stunnel and the agent use threads, which stat
/// already sums).
pub fn tree_ticks(pid: u32) -> (u64, u64) {
    descendants(pid)
        .into_iter()
        .chain([pid])
        .map(own_ticks)
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// CPU ticks of this process's threads whose name starts with `prefix`.
pub fn thread_ticks(prefix: &str) -> u64 {
    let Ok(dir) = fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| stat_fields(&format!("{}/stat", e.path().display())))
        .filter(|(comm, _, _)| comm.starts_with(prefix))
        .map(|(_, f, _)| f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0))
        .sum()
}

/// (busy, total) ticks of the whole machine from /proc/stat.
pub fn machine_ticks() -> (u64, u64) {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// A `kB` line of /proc/PID/status (VmRSS, VmHWM...).
pub fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Resident set size in kB (KiB, as /proc counts).
pub fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:").unwrap_or(0)
}

/// Open file descriptors.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The soft limit on open files of this process.
pub fn nofile_limit() -> Option<u64> {
    let text = fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn net_has(file: &str, port: u16, listen_only: bool) -> bool {
    let text = fs::read_to_string(file).unwrap_or_default();
    let want = format!(":{port:04X}");
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && (!listen_only || f[3] == "0A")
    })
}

/// Whether something listens on TCP `port` (read from /proc: no connection is made, so the
/// agent logs nothing).
pub fn tcp_listening(port: u16) -> bool {
    net_has("/proc/net/tcp", port, true) || net_has("/proc/net/tcp6", port, true)
}

/// Whether a UDP socket is bound to `port`.
pub fn udp_bound(port: u16) -> bool {
    net_has("/proc/net/udp", port, false) || net_has("/proc/net/udp6", port, false)
}

/// The kernel's UDP counters (`/proc/net/snmp`): InErrors, RcvbufErrors, SndbufErrors.
pub fn udp_errors() -> [u64; 3] {
    let text = fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    if lines.len() < 2 {
        return [0; 3];
    }
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let vals: Vec<&str> = lines[1].split_whitespace().collect();
    let get = |n: &str| {
        names
            .iter()
            .position(|x| *x == n)
            .and_then(|i| vals.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    [get("InErrors"), get("RcvbufErrors"), get("SndbufErrors")]
}

/// A 127.0.0.1 port free for TCP (and for UDP too with `udp`), found by binding port 0.
pub fn free_port(udp: bool) -> Result<u16> {
    for _ in 0..100 {
        let tcp = TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if !udp || UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], port))).is_ok() {
            return Ok(port);
        }
    }
    Err(anyhow!("no free port found on 127.0.0.1"))
}

/// The first `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// socat and stunnel (`stunnel4` or `stunnel`) from PATH: (socat, stunnel). The bench installs
/// nothing itself; scripts/bench.sh does.
pub fn find_tools() -> Result<(PathBuf, PathBuf)> {
    let missing = |package: &str| {
        anyhow!(
            "{package} not found on PATH: install the {package} package \
             (`apt-get install -y {package}`), or run scripts/bench.sh, which installs it"
        )
    };
    let socat = which("socat").ok_or_else(|| missing("socat"))?;
    let stunnel = which("stunnel4")
        .or_else(|| which("stunnel"))
        .ok_or_else(|| missing("stunnel4"))?;
    Ok((socat, stunnel))
}

/// The first line a tool prints about its version.
pub fn tool_version(bin: &Path, arg: &str) -> String {
    Command::new(bin)
        .arg(arg)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| l.contains("version") || l.starts_with("stunnel "))
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}
