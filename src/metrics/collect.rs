//! Reads the host's figures from /proc and /sys, as GoDoxy's gopsutil fork does, so the
//! numbers mean what they mean on a Go agent: /proc/stat (CPU), /proc/meminfo, the mount table
//! of PID 1 with statvfs(2) (disks), /proc/diskstats (disk I/O), /proc/net/dev (network) and
//! /sys/class/hwmon or thermal zones (sensors). Parsing is pure and tested below; a file that
//! cannot be read or parsed fails its part of the sample only.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, info, warn};

use super::sample::{DiskIo, DiskUsage, Memory, Network, Sample, Sensor};

/// The parts of a sample that may be switched off, as GoDoxy's `METRICS_DISABLE_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parts {
    pub(crate) cpu: bool,
    pub(crate) memory: bool,
    pub(crate) disk: bool,
    pub(crate) network: bool,
    pub(crate) sensors: bool,
}

impl Parts {
    /// The parts switched on, for the log: `cpu,memory,disk`.
    pub(crate) fn names(self) -> String {
        let all = [
            (self.cpu, "cpu"),
            (self.memory, "memory"),
            (self.disk, "disk"),
            (self.network, "network"),
            (self.sensors, "sensors"),
        ];
        let on: Vec<&str> = all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect();
        if on.is_empty() {
            "none".to_owned()
        } else {
            on.join(",")
        }
    }
}

/// How often the list of sensor files is read again (hotplugged chips are rare; each listing
/// walks every hwmon directory).
const SENSOR_RESCAN: Duration = Duration::from_secs(60);
/// /proc/diskstats counts 512-byte sectors whatever the device's block size.
const SECTOR: u64 = 512;
/// A /proc or /sys file larger than this is not what we expect (mountinfo of a busy host is a
/// few hundred KiB at most).
const MAX_FILE: u64 = 8 << 20;

/// The sampler's memory between two ticks: the previous counters that rates are taken from,
/// the sensor files found, and which parts are failing (so each failure is logged once).
pub(crate) struct Collector {
    parts: Parts,
    cpu_prev: Option<CpuTimes>,
    disk_prev: Option<(Instant, HashMap<String, DiskCounters>)>,
    net_prev: Option<(Instant, u64, u64)>,
    sensors: Vec<SensorFile>,
    sensors_scanned: Option<Instant>,
    /// Where mount points are read: PID 1's table (the host's, unless in a container), or our
    /// own when that is hidden (systemd's ProtectProc=invisible).
    mountinfo: &'static str,
    failing: [Option<String>; 5],
    buf: String,
}

/// The five parts, for the failure log.
#[derive(Debug, Clone, Copy)]
enum Part {
    Cpu,
    Memory,
    Disk,
    Network,
    Sensors,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory",
            Self::Disk => "disk",
            Self::Network => "network",
            Self::Sensors => "sensors",
        }
    }
}

impl Collector {
    /// A collector whose first sample has rates: the counters are read once now.
    pub(crate) fn new(parts: Parts) -> Self {
        let mut collector = Self {
            parts,
            cpu_prev: None,
            disk_prev: None,
            net_prev: None,
            sensors: Vec::new(),
            sensors_scanned: None,
            mountinfo: "/proc/1/mountinfo",
            failing: Default::default(),
            buf: String::new(),
        };
        if parts.cpu {
            collector.cpu_prev = collector.read_cpu().ok();
        }
        if parts.disk {
            let now = Instant::now();
            collector.disk_prev = collector.read_diskstats().ok().map(|d| (now, d));
        }
        if parts.network {
            let now = Instant::now();
            collector.net_prev = collector.read_net().ok().map(|(tx, rx)| (now, tx, rx));
        }
        collector
    }

    /// Reads every enabled part. Never fails: a part that cannot be read is left out.
    pub(crate) fn sample(&mut self) -> Sample {
        let mut sample = Sample::empty(unix_now());
        if self.parts.cpu {
            let cpu = self.cpu();
            sample.cpu_average = self.outcome(Part::Cpu, cpu);
        }
        if self.parts.memory {
            let memory = self.read_memory();
            sample.memory = self.outcome(Part::Memory, memory).unwrap_or_default();
        }
        if self.parts.disk {
            let disks = self.disks();
            let io = self.disks_io();
            let both = match (disks, io) {
                (Ok(disks), Ok(io)) => Ok((Some(disks), Some(io))),
                (Err(err), Ok(io)) => {
                    sample.disks_io = Some(io);
                    Err(err)
                }
                (Ok(disks), Err(err)) => {
                    sample.disks = Some(disks);
                    Err(err)
                }
                (Err(a), Err(b)) => Err(format!("{a}; {b}")),
            };
            if let Some((disks, io)) = self.outcome(Part::Disk, both) {
                sample.disks = disks;
                sample.disks_io = io;
            }
        }
        if self.parts.network {
            let network = self.network();
            sample.network = self.outcome(Part::Network, network).unwrap_or_default();
        }
        if self.parts.sensors {
            let sensors = self.sensors();
            sample.sensors = self.outcome(Part::Sensors, sensors);
        }
        sample
    }

    /// Logs a part's failure when it starts and its recovery when it ends.
    fn outcome<T>(&mut self, part: Part, result: Result<T, String>) -> Option<T> {
        let slot = &mut self.failing[part as usize];
        match result {
            Ok(value) => {
                if slot.take().is_some() {
                    info!(part = part.name(), "metrics: readable again");
                }
                Some(value)
            }
            Err(err) => {
                if slot.as_deref() != Some(err.as_str()) {
                    warn!(
                        part = part.name(),
                        "metrics: cannot read {err}; the dashboard shows no {} figures until \
                         this changes",
                        part.name()
                    );
                    *slot = Some(err);
                }
                None
            }
        }
    }

    /// Reads a whole small file into the reused buffer.
    fn read(&mut self, path: &str) -> Result<&str, String> {
        self.buf.clear();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_FILE).read_to_string(&mut self.buf))
            .map_err(|err| format!("{path}: {err}"))?;
        Ok(&self.buf)
    }

    fn read_cpu(&mut self) -> Result<CpuTimes, String> {
        let text = self.read("/proc/stat")?;
        text.lines()
            .next()
            .and_then(parse_cpu_line)
            .ok_or_else(|| "/proc/stat: no `cpu` line".to_owned())
    }

    fn cpu(&mut self) -> Result<f64, String> {
        let now = self.read_cpu()?;
        let percent = self.cpu_prev.map_or(0.0, |prev| cpu_percent(prev, now));
        self.cpu_prev = Some(now);
        Ok(percent)
    }

    fn read_memory(&mut self) -> Result<Memory, String> {
        let text = self.read("/proc/meminfo")?;
        parse_meminfo(text).ok_or_else(|| "/proc/meminfo: no MemTotal".to_owned())
    }

    fn disks(&mut self) -> Result<BTreeMap<String, DiskUsage>, String> {
        const OWN: &str = "/proc/self/mountinfo";
        if let Err(err) = self.read(self.mountinfo) {
            if self.mountinfo == OWN {
                return Err(err);
            }
            debug!("metrics: {err}; reading {OWN} instead");
            self.mountinfo = OWN;
            self.read(OWN)?;
        }
        let mounts = parse_mountinfo(&self.buf);
        let mut disks = BTreeMap::new();
        let mut last_error = None;
        for mount in mounts {
            if !should_collect(&mount) {
                continue;
            }
            let key = disk_key(&mount);
            if disks.contains_key(&key) {
                // The same filesystem mounted again (bind mounts): the first mount stands.
                continue;
            }
            match statvfs_usage(&mount.mount_point) {
                Ok((free, used)) => {
                    disks.insert(
                        key,
                        DiskUsage {
                            path: mount.mount_point,
                            fstype: mount.fstype,
                            free,
                            used,
                        },
                    );
                }
                Err(err) => {
                    debug!(mount = %mount.mount_point, "metrics: statvfs: {err}");
                    last_error = Some(format!("statvfs {}: {err}", mount.mount_point));
                }
            }
        }
        match last_error {
            Some(err) if disks.is_empty() => Err(err),
            _ => Ok(disks),
        }
    }

    fn read_diskstats(&mut self) -> Result<HashMap<String, DiskCounters>, String> {
        let text = self.read("/proc/diskstats")?;
        Ok(parse_diskstats(text))
    }

    fn disks_io(&mut self) -> Result<BTreeMap<String, DiskIo>, String> {
        let now = Instant::now();
        let counters = self.read_diskstats()?;
        let prev = self.disk_prev.as_ref();
        let io = counters
            .iter()
            .map(|(name, c)| {
                let (iops, read_speed, write_speed) = prev
                    .and_then(|(at, before)| {
                        let before = before.get(name)?;
                        let secs = now.duration_since(*at).as_secs_f64();
                        let ops = (c.reads + c.writes)
                            .saturating_sub(before.reads.saturating_add(before.writes));
                        Some((
                            per_second_u64(ops, secs),
                            per_second(c.read_bytes.saturating_sub(before.read_bytes), secs),
                            per_second(c.write_bytes.saturating_sub(before.write_bytes), secs),
                        ))
                    })
                    .unwrap_or_default();
                let entry = DiskIo {
                    read_count: c.reads,
                    write_count: c.writes,
                    read_bytes: c.read_bytes,
                    write_bytes: c.write_bytes,
                    name: name.clone(),
                    iops,
                    read_speed,
                    write_speed,
                };
                (name.clone(), entry)
            })
            .collect();
        self.disk_prev = Some((now, counters));
        Ok(io)
    }

    fn read_net(&mut self) -> Result<(u64, u64), String> {
        let text = self.read("/proc/net/dev")?;
        parse_net_dev(text).ok_or_else(|| "/proc/net/dev: unexpected format".to_owned())
    }

    fn network(&mut self) -> Result<Network, String> {
        let now = Instant::now();
        let (sent, recv) = self.read_net()?;
        let (upload_speed, download_speed) = match self.net_prev {
            Some((at, prev_sent, prev_recv)) => {
                let secs = now.duration_since(at).as_secs_f64();
                (
                    per_second(sent.saturating_sub(prev_sent), secs),
                    per_second(recv.saturating_sub(prev_recv), secs),
                )
            }
            None => (0.0, 0.0),
        };
        self.net_prev = Some((now, sent, recv));
        Ok(Network {
            bytes_sent: sent,
            bytes_recv: recv,
            upload_speed,
            download_speed,
        })
    }

    fn sensors(&mut self) -> Result<Vec<Sensor>, String> {
        if self
            .sensors_scanned
            .is_none_or(|at| at.elapsed() >= SENSOR_RESCAN)
        {
            self.sensors = scan_sensors(Path::new("/sys/class"));
            self.sensors_scanned = Some(Instant::now());
            debug!(count = self.sensors.len(), "metrics: temperature sensors");
        }
        let mut readings = Vec::with_capacity(self.sensors.len());
        for file in &self.sensors {
            let Some(value) = read_number(&file.input) else {
                continue;
            };
            #[allow(clippy::cast_possible_truncation)] // a temperature fits an f32
            let temperature = (value / 1000.0) as f32;
            readings.push(Sensor {
                name: file.name.clone(),
                temperature,
                high: file.high,
                critical: file.critical,
            });
        }
        Ok(readings)
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `amount / secs` as GoDoxy's float32 rates; 0 over no time.
fn per_second(amount: u64, secs: f64) -> f32 {
    if secs <= 0.0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    let rate = (amount as f64 / secs) as f32;
    rate
}

/// `amount / secs` rounded, as GoDoxy's integer IOPS.
fn per_second_u64(amount: u64, secs: f64) -> u64 {
    if secs <= 0.0 {
        return 0;
    }
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let rate = (amount as f64 / secs).round() as u64;
    rate
}

/// The aggregate line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CpuTimes {
    /// Everything but guest time (already inside user and nice).
    total: u64,
    /// Idle and I/O wait.
    idle: u64,
}

/// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`.
fn parse_cpu_line(line: &str) -> Option<CpuTimes> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
    if values.len() < 4 {
        return None;
    }
    let field = |i: usize| values.get(i).copied().unwrap_or(0);
    // gopsutil and psutil: total = user + nice + system + idle + iowait + irq + softirq +
    // steal (guest and guest_nice are counted in user and nice already); busy = total - idle
    // - iowait.
    let total = (0..8).map(field).fold(0u64, u64::saturating_add);
    let idle = field(3).saturating_add(field(4));
    Some(CpuTimes { total, idle })
}

/// Busy share of the time between two readings, in percent.
fn cpu_percent(prev: CpuTimes, now: CpuTimes) -> f64 {
    let total = now.total.saturating_sub(prev.total);
    let idle = now.idle.saturating_sub(prev.idle);
    if total == 0 {
        return 0.0;
    }
    super::sample::percent(total.saturating_sub(idle), total).clamp(0.0, 100.0)
}

/// `MemTotal` and `MemAvailable` (or, before Linux 3.14, free + cached + reclaimable slab).
fn parse_meminfo(text: &str) -> Option<Memory> {
    let (mut total, mut available, mut free, mut cached, mut reclaimable) =
        (None, None, 0u64, 0u64, 0u64);
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(kib) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        let bytes = kib.saturating_mul(1024);
        match key.trim() {
            "MemTotal" => total = Some(bytes),
            "MemAvailable" => available = Some(bytes),
            "MemFree" => free = bytes,
            "Cached" => cached = bytes,
            "SReclaimable" => reclaimable = bytes,
            _ => {}
        }
    }
    let total = total?;
    let available = available
        .unwrap_or_else(|| free.saturating_add(cached).saturating_add(reclaimable))
        .min(total);
    Some(Memory {
        available,
        used: total - available,
    })
}

/// One line of /proc/PID/mountinfo, as much as the disk figures need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    /// What gopsutil calls the device: the mount source when it is a path (or for a whole
    /// filesystem), else the root of the mount; a later mount of an already seen filesystem
    /// takes the first one's.
    device: String,
    mount_point: String,
    fstype: String,
}

/// Parses a mount table the way gopsutil's `Partitions(all=true)` does on Linux.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut seen: HashMap<&str, String> = HashMap::new();
    let mut mounts = Vec::new();
    for line in text.lines() {
        // 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split_whitespace().collect();
        let mut right = right.split_whitespace();
        let (Some(dev_id), Some(root), Some(mount_point), Some(fstype), Some(source)) = (
            left.get(2),
            left.get(3),
            left.get(4),
            right.next(),
            right.next(),
        ) else {
            continue;
        };
        let mut device = if source.starts_with('/') || *root == "/" {
            unescape_octal(source)
        } else {
            unescape_octal(root)
        };
        match seen.get(dev_id) {
            Some(first) => device.clone_from(first),
            None => {
                seen.insert(dev_id, device.clone());
            }
        }
        if device.starts_with("/dev/mapper/")
            && let Ok(real) = std::fs::canonicalize(&device)
        {
            device = real.display().to_string();
        }
        // `/dev/root` is not a real name: the block device behind major:minor says which it is.
        if device == "/dev/root"
            && let Ok(link) = std::fs::read_link(format!("/sys/dev/block/{dev_id}"))
            && let Some(name) = link.file_name()
        {
            device = format!("/dev/{}", name.to_string_lossy());
        }
        mounts.push(Mount {
            device,
            mount_point: unescape_octal(mount_point),
            fstype: unescape_octal(fstype),
        });
    }
    mounts
}

/// GoDoxy's choice of filesystems: `/`, anything under /mnt/ (WSL's drives, but not its own
/// /mnt/wsl*), and anything mounted from a /dev/ node.
fn should_collect(mount: &Mount) -> bool {
    let mp = mount.mount_point.as_str();
    mp == "/"
        || (mp.starts_with("/mnt/") && !mp.starts_with("/mnt/wsl"))
        || mount.device.starts_with("/dev/")
}

/// The key in `disks`: the device, or the mount point when there is none to name.
fn disk_key(mount: &Mount) -> String {
    match mount.device.as_str() {
        "" | "none" | "/dev/root" => mount.mount_point.clone(),
        device => device.to_owned(),
    }
}

/// mountinfo writes space, tab, newline and backslash as `\040`-style octal escapes.
fn unescape_octal(field: &str) -> String {
    if !field.contains('\\') {
        return field.to_owned();
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .all(|b| (b'0'..=b'7').contains(b))
                .then(|| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok())
                .flatten()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (free, used) bytes of the filesystem at `path`, as `df` and psutil count them.
fn statvfs_usage(path: &str) -> Result<(u64, u64), std::io::Error> {
    let st = rustix::fs::statvfs(path)?;
    let block = if st.f_frsize > 0 {
        st.f_frsize
    } else {
        st.f_bsize
    };
    let free = st.f_bavail.saturating_mul(block);
    let used = st.f_blocks.saturating_sub(st.f_bfree).saturating_mul(block);
    Ok((free, used))
}

/// Counters of one disk since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskCounters {
    reads: u64,
    writes: u64,
    read_bytes: u64,
    write_bytes: u64,
}

/// The whole disks of /proc/diskstats with any I/O.
fn parse_diskstats(text: &str) -> HashMap<String, DiskCounters> {
    let mut disks = HashMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 14 || !is_whole_disk(fields[2]) {
            continue;
        }
        let number = |i: usize| fields[i].parse::<u64>().ok();
        let (Some(reads), Some(sectors_read), Some(writes), Some(sectors_written)) =
            (number(3), number(5), number(7), number(9))
        else {
            continue;
        };
        let counters = DiskCounters {
            reads,
            writes,
            read_bytes: sectors_read.saturating_mul(SECTOR),
            write_bytes: sectors_written.saturating_mul(SECTOR),
        };
        if reads == 0 && writes == 0 && sectors_read == 0 && sectors_written == 0 {
            continue;
        }
        disks.insert(fields[2].to_owned(), counters);
    }
    disks
}

/// GoDoxy's whole-disk rule: SCSI/SATA/IDE/virtio (`sda`, `hdb`, `vdc`) and Xen (`xvda`)
/// disks without a partition number, NVMe namespaces (`nvme0n1`) and SD/MMC cards
/// (`mmcblk0`) without a partition; not loop, ram, dm or md devices. GoDoxy's fork also drops
/// NVMe namespaces (its test lists `nvme0n1` as excluded), so its charts miss NVMe disks; this
/// agent counts them.
fn is_whole_disk(name: &str) -> bool {
    let bytes = name.as_bytes();
    if let Some(rest) = name.strip_prefix("nvme") {
        // nvme<ctrl>n<ns>, not nvme<ctrl>n<ns>p<part> nor nvme<ctrl>c<x>n<ns>.
        let Some((ctrl, ns)) = rest.split_once('n') else {
            return false;
        };
        return all_digits(ctrl) && all_digits(ns);
    }
    if let Some(rest) = name.strip_prefix("mmcblk") {
        return all_digits(rest);
    }
    let letters = match bytes {
        [b's' | b'h' | b'v', b'd', rest @ ..] => rest,
        [b'x', b'v', b'd', rest @ ..] => rest,
        _ => return false,
    };
    !letters.is_empty() && letters.iter().all(u8::is_ascii_lowercase)
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// (bytes sent, bytes received) of all interfaces together.
fn parse_net_dev(text: &str) -> Option<(u64, u64)> {
    let mut lines = text.lines();
    // Two header lines: "Inter-|   Receive ..." and " face |bytes ...".
    if !lines.next()?.contains('|') || !lines.next()?.contains('|') {
        return None;
    }
    let (mut sent, mut recv) = (0u64, 0u64);
    for line in lines {
        let Some((_, counters)) = line.split_once(':') else {
            continue;
        };
        let fields: Vec<u64> = counters
            .split_whitespace()
            .map_while(|f| f.parse().ok())
            .collect();
        if fields.len() < 16 {
            continue;
        }
        recv = recv.saturating_add(fields[0]);
        sent = sent.saturating_add(fields[8]);
    }
    Some((sent, recv))
}

/// A temperature input found under /sys, with the thresholds read once.
#[derive(Debug, Clone, PartialEq)]
struct SensorFile {
    name: String,
    input: PathBuf,
    high: f64,
    critical: f64,
}

/// gopsutil's sensor discovery under `class` (/sys/class): hwmon chips' `temp*_input`
/// (directly or under `device/`), else the thermal zones.
fn scan_sensors(class: &Path) -> Vec<SensorFile> {
    let hwmons = sorted_entries(&class.join("hwmon"), "hwmon");
    let mut found = Vec::new();
    for sub in [None, Some("device")] {
        for hwmon in &hwmons {
            let dir = match sub {
                Some(sub) => hwmon.join(sub),
                None => hwmon.clone(),
            };
            for input in sorted_entries(&dir, "temp") {
                let Some(file_name) = input.file_name().map(|n| n.to_string_lossy().into_owned())
                else {
                    continue;
                };
                let Some(base) = file_name.strip_suffix("_input") else {
                    continue;
                };
                let Ok(chip) = std::fs::read_to_string(dir.join("name")) else {
                    continue;
                };
                let label = std::fs::read_to_string(dir.join(format!("{base}_label")))
                    .map(|l| {
                        l.trim()
                            .to_lowercase()
                            .split(' ')
                            .collect::<Vec<_>>()
                            .join("_")
                    })
                    .unwrap_or_default();
                let mut name = chip.trim().to_owned();
                if !label.is_empty() {
                    name.push('_');
                    name.push_str(&label);
                }
                let threshold = |suffix: &str| {
                    read_number(&dir.join(format!("{base}_{suffix}")))
                        .map_or(0.0, |v| (v / 100.0).round() / 10.0)
                };
                found.push(SensorFile {
                    name,
                    high: threshold("max"),
                    critical: threshold("crit"),
                    input,
                });
            }
        }
        if !found.is_empty() {
            return found;
        }
    }
    for zone in sorted_entries(&class.join("thermal"), "thermal_zone") {
        let Ok(kind) = std::fs::read_to_string(zone.join("type")) else {
            continue;
        };
        found.push(SensorFile {
            name: kind.trim().to_owned(),
            input: zone.join("temp"),
            high: 0.0,
            critical: 0.0,
        });
    }
    found
}

/// The entries of `dir` whose names start with `prefix`, in lexical order (as Go's Glob).
fn sorted_entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths
}

fn read_number(path: &Path) -> Option<f64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line_and_percent() {
        let a = parse_cpu_line("cpu  100 0 100 700 100 0 0 0 50 0").unwrap();
        let b = parse_cpu_line("cpu  150 0 150 750 150 0 0 0 90 0").unwrap();
        // 100 busy ticks of 200.
        assert!((cpu_percent(a, b) - 50.0).abs() < 1e-9);
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4"), None);
        assert_eq!(parse_cpu_line("cpu 1 2"), None);
        // Counters that went backwards (a VM restored) read as idle, not as garbage.
        assert_eq!(cpu_percent(b, a), 0.0);
    }

    #[test]
    fn meminfo() {
        let m = parse_meminfo(
            "MemTotal:       16000 kB\nMemFree:  1000 kB\nMemAvailable:   12000 kB\n",
        )
        .unwrap();
        assert_eq!(
            (m.total(), m.available, m.used),
            (16000 * 1024, 12000 * 1024, 4000 * 1024)
        );
        let old =
            parse_meminfo("MemTotal: 100 kB\nMemFree: 10 kB\nCached: 20 kB\nSReclaimable: 5 kB\n")
                .unwrap();
        assert_eq!(old.available, 35 * 1024);
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn mountinfo_devices_keys_and_choice() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw - proc proc rw
24 22 8:1 /var/lib/x /srv/bind rw - ext4 /dev/sda1 rw
25 22 0:45 / /mnt/c rw - 9p drvfs rw
26 22 0:46 / /mnt/wslg rw - tmpfs none rw
27 22 8:17 / /data\\040disk rw - xfs /dev/sdb1 rw
28 22 0:50 / / rw - overlay overlay rw
bad line without separator
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 7);
        // The bind mount of 8:1 is named after the first mount of 8:1.
        assert_eq!(mounts[2].device, "/dev/sda1");
        assert_eq!(mounts[5].mount_point, "/data disk");
        let chosen: Vec<(String, &str)> = mounts
            .iter()
            .filter(|m| should_collect(m))
            .map(|m| (disk_key(m), m.mount_point.as_str()))
            .collect();
        assert_eq!(
            chosen,
            vec![
                ("/dev/sda1".to_owned(), "/"),
                ("/dev/sda1".to_owned(), "/srv/bind"),
                ("drvfs".to_owned(), "/mnt/c"),
                ("/dev/sdb1".to_owned(), "/data disk"),
                ("overlay".to_owned(), "/"),
            ]
        );
        let none = Mount {
            device: "none".to_owned(),
            mount_point: "/mnt/x".to_owned(),
            fstype: "tmpfs".to_owned(),
        };
        assert_eq!(disk_key(&none), "/mnt/x");
    }

    #[test]
    fn octal_escapes() {
        assert_eq!(unescape_octal(r"/a\040b\134c\011"), "/a b\\c\t");
        assert_eq!(unescape_octal(r"/a\04"), r"/a\04");
        assert_eq!(unescape_octal(r"/a\999"), r"/a\999");
    }

    #[test]
    fn whole_disks() {
        for name in [
            "sda", "sdab", "hda", "vdb", "xvda", "nvme0n1", "nvme12n3", "mmcblk0",
        ] {
            assert!(is_whole_disk(name), "{name}");
        }
        for name in [
            "sda1",
            "nvme0n1p1",
            "nvme0",
            "nvme0c0n1",
            "mmcblk0p1",
            "mmcblk0boot0",
            "loop0",
            "dm-0",
            "md0",
            "sr0",
            "ram0",
            "zram0",
            "xva",
            "ab",
            "s",
            "sd",
        ] {
            assert!(!is_whole_disk(name), "{name}");
        }
    }

    #[test]
    fn diskstats() {
        let text = "\
   8       0 sda 100 5 2000 30 200 6 4000 40 0 50 70 0 0 0 0
   8       1 sda1 90 5 1800 30 190 6 3800 40 0 50 70 0 0 0 0
   7       0 loop0 10 0 20 0 0 0 0 0 0 0 0 0 0 0 0
 259       0 nvme0n1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 259       1 nvme1n1 1 0 8 0 2 0 16
";
        let disks = parse_diskstats(text);
        assert_eq!(disks.len(), 1, "{disks:?}");
        assert_eq!(
            disks["sda"],
            DiskCounters {
                reads: 100,
                writes: 200,
                read_bytes: 2000 * 512,
                write_bytes: 4000 * 512
            }
        );
    }

    #[test]
    fn net_dev_sums_every_interface() {
        let text = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
  eth0: 5000      50    0    0    0     0          0         0     7000      70    0    0    0     0       0          0
";
        assert_eq!(parse_net_dev(text), Some((8000, 6000)));
        assert_eq!(parse_net_dev("garbage"), None);
    }

    #[test]
    fn sensors_from_a_fake_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path();
        let hwmon = class.join("hwmon/hwmon0");
        std::fs::create_dir_all(&hwmon).unwrap();
        std::fs::write(hwmon.join("name"), "coretemp\n").unwrap();
        std::fs::write(hwmon.join("temp1_input"), "41500\n").unwrap();
        std::fs::write(hwmon.join("temp1_label"), "Package id 0\n").unwrap();
        std::fs::write(hwmon.join("temp1_max"), "84000\n").unwrap();
        std::fs::write(hwmon.join("temp1_crit"), "105049\n").unwrap();
        std::fs::write(hwmon.join("temp2_input"), "40000\n").unwrap();
        let found = scan_sensors(class);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].name, "coretemp_package_id_0");
        assert_eq!((found[0].high, found[0].critical), (84.0, 105.0));
        assert_eq!(found[1].name, "coretemp");
        assert_eq!(found[1].critical, 0.0);

        let zones = tempfile::tempdir().unwrap();
        let zone = zones.path().join("thermal/thermal_zone0");
        std::fs::create_dir_all(&zone).unwrap();
        std::fs::write(zone.join("type"), "x86_pkg_temp\n").unwrap();
        let found = scan_sensors(zones.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "x86_pkg_temp");
    }

    #[test]
    fn a_real_sample_on_this_machine() {
        let all = Parts {
            cpu: true,
            memory: true,
            disk: true,
            network: true,
            sensors: true,
        };
        let mut collector = Collector::new(all);
        std::thread::sleep(Duration::from_millis(50));
        let sample = collector.sample();
        assert!(sample.cpu_average.is_some());
        assert!(sample.memory.total() > 0);
        assert!(
            sample.disks.as_ref().is_some_and(|d| !d.is_empty()),
            "{sample:?}"
        );
        assert!(sample.network.bytes_recv > 0);
        assert!(sample.sensors.is_some());
        let none = Parts {
            cpu: false,
            memory: false,
            disk: false,
            network: false,
            sensors: false,
        };
        let empty = Collector::new(none).sample();
        assert_eq!(
            Sample {
                timestamp: 0,
                ..empty
            },
            Sample::empty(0)
        );
    }
}
