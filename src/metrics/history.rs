//! GoDoxy's history of samples: five periods (5m, 15m, 1h, 1d, 1mo) of at most 100 points
//! each, a point taken when `max(period / 100, 1s)` has passed since the last; the
//! aggregates its dashboard charts (`{"total", "data"}`); and the history file, in the format
//! of GoDoxy's `data/metrics/system_info.json`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::ser::{SerializeMap as _, SerializeStruct as _};
use serde::{Deserialize, Serialize, Serializer};

use super::sample::Sample;

/// Points kept per period.
pub(crate) const POINTS: usize = 100;

/// One of GoDoxy's periods (`period=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Period {
    M5,
    M15,
    H1,
    D1,
    Mo1,
}

impl Period {
    /// All of them, shortest first.
    pub(crate) const ALL: [Self; 5] = [Self::M5, Self::M15, Self::H1, Self::D1, Self::Mo1];

    /// The query value.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::M5 => "5m",
            Self::M15 => "15m",
            Self::H1 => "1h",
            Self::D1 => "1d",
            Self::Mo1 => "1mo",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == text)
    }

    /// What the period spans (a month is 30 days).
    pub(crate) fn span(self) -> Duration {
        const MINUTE: u64 = 60;
        Duration::from_secs(match self {
            Self::M5 => 5 * MINUTE,
            Self::M15 => 15 * MINUTE,
            Self::H1 => 60 * MINUTE,
            Self::D1 => 24 * 60 * MINUTE,
            Self::Mo1 => 30 * 24 * 60 * MINUTE,
        })
    }

    /// Time between two points: `max(span / 100, 1s)` (3 s, 9 s, 36 s, 14.4 min, 7.2 h).
    pub(crate) fn interval(self) -> Duration {
        (self.span() / 100).max(Duration::from_secs(1))
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One period's points, oldest first.
#[derive(Debug)]
struct Ring {
    points: VecDeque<Arc<Sample>>,
    last_added: Instant,
}

/// All five periods. A sample taken by more than one period is shared, so the history holds
/// at most 500 samples.
#[derive(Debug)]
pub(crate) struct History {
    rings: [Ring; 5],
}

impl History {
    /// Empty; each period takes its first point one interval after `now` (as GoDoxy does).
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            rings: std::array::from_fn(|_| Ring {
                points: VecDeque::with_capacity(POINTS),
                last_added: now,
            }),
        }
    }

    /// Offers a sample to every period; each takes it when its interval has passed.
    pub(crate) fn add(&mut self, now: Instant, sample: &Arc<Sample>) {
        for period in Period::ALL {
            let ring = &mut self.rings[period.index()];
            if now.saturating_duration_since(ring.last_added) < period.interval() {
                continue;
            }
            if ring.points.len() == POINTS {
                ring.points.pop_front();
            }
            ring.points.push_back(sample.clone());
            ring.last_added = now;
        }
    }

    /// A period's points, oldest first.
    pub(crate) fn points(&self, period: Period) -> impl Iterator<Item = &Arc<Sample>> {
        self.rings[period.index()].points.iter()
    }

    /// Points over all periods (a shared sample counts in each).
    pub(crate) fn len(&self) -> usize {
        self.rings.iter().map(|r| r.points.len()).sum()
    }

    /// The points of every period, for saving outside the lock.
    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            rings: std::array::from_fn(|i| self.rings[i].points.iter().cloned().collect()),
        }
    }

    /// Reads a history file. Each period keeps its newest 100 points and takes its next one
    /// an interval after `now`; the intervals written in the file are not trusted.
    pub(crate) fn from_file(bytes: &[u8], now: Instant) -> Result<Self, serde_json::Error> {
        let file: FileIn = serde_json::from_slice(bytes)?;
        let mut history = Self::new(now);
        for (name, ring) in file.entries {
            let Some(period) = Period::parse(&name) else {
                continue;
            };
            let skip = ring.entries.len().saturating_sub(POINTS);
            history.rings[period.index()].points =
                ring.entries.into_iter().skip(skip).map(Arc::new).collect();
        }
        Ok(history)
    }
}

/// The points of every period at one moment.
pub(crate) struct Snapshot {
    rings: [Vec<Arc<Sample>>; 5],
}

impl Snapshot {
    /// The history file: `{"entries":{"5m":{"entries":[...],"interval":<ns>},...}}`.
    pub(crate) fn to_file(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

impl Serialize for Snapshot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Periods<'a>(&'a Snapshot);
        impl Serialize for Periods<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(Some(Period::ALL.len()))?;
                for period in Period::ALL {
                    map.serialize_entry(
                        period.name(),
                        &RingOut(&self.0.rings[period.index()], period),
                    )?;
                }
                map.end()
            }
        }
        struct RingOut<'a>(&'a [Arc<Sample>], Period);
        impl Serialize for RingOut<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut ring = s.serialize_struct("Entries", 2)?;
                ring.serialize_field("entries", &Points(self.0))?;
                let nanos = u64::try_from(self.1.interval().as_nanos()).unwrap_or(u64::MAX);
                ring.serialize_field("interval", &nanos)?;
                ring.end()
            }
        }
        struct Points<'a>(&'a [Arc<Sample>]);
        impl Serialize for Points<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|p| &**p))
            }
        }
        let mut file = s.serialize_struct("Period", 1)?;
        file.serialize_field("entries", &Periods(self))?;
        file.end()
    }
}

#[derive(Deserialize)]
struct FileIn {
    entries: BTreeMap<String, RingIn>,
}

#[derive(Deserialize)]
struct RingIn {
    #[serde(default)]
    entries: Vec<Sample>,
}

/// What a chart shows (`aggregate=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Aggregate {
    /// `cpu_average`: percent.
    CpuAverage,
    /// `memory_usage`: bytes used.
    MemoryUsage,
    /// `memory_usage_percent`.
    MemoryUsagePercent,
    /// Each disk's read speed, bytes/s, keyed by device name.
    DisksReadSpeed,
    /// Each disk's write speed, bytes/s.
    DisksWriteSpeed,
    /// Each disk's reads and writes per second.
    DisksIops,
    /// Each filesystem's used bytes, keyed as in `disks`.
    DiskUsage,
    /// `upload` and `download` in bytes/s.
    NetworkSpeed,
    /// `upload` and `download`: bytes since boot.
    NetworkTransfer,
    /// Each sensor's temperature, keyed by its name.
    SensorTemperature,
}

impl Aggregate {
    pub(crate) const ALL: [Self; 10] = [
        Self::CpuAverage,
        Self::MemoryUsage,
        Self::MemoryUsagePercent,
        Self::DisksReadSpeed,
        Self::DisksWriteSpeed,
        Self::DisksIops,
        Self::DiskUsage,
        Self::NetworkSpeed,
        Self::NetworkTransfer,
        Self::SensorTemperature,
    ];

    /// The query value.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::CpuAverage => "cpu_average",
            Self::MemoryUsage => "memory_usage",
            Self::MemoryUsagePercent => "memory_usage_percent",
            Self::DisksReadSpeed => "disks_read_speed",
            Self::DisksWriteSpeed => "disks_write_speed",
            Self::DisksIops => "disks_iops",
            Self::DiskUsage => "disk_usage",
            Self::NetworkSpeed => "network_speed",
            Self::NetworkTransfer => "network_transfer",
            Self::SensorTemperature => "sensor_temperature",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == text)
    }

    /// The chart's rows, oldest first, as GoDoxy builds them: a sample without the figure is
    /// skipped (no CPU reading, no memory, no disks, no network bytes at all).
    pub(crate) fn rows<'a>(self, points: impl Iterator<Item = &'a Arc<Sample>>) -> Vec<Row> {
        points.filter_map(|s| self.row(s)).collect()
    }

    fn row(self, s: &Sample) -> Option<Row> {
        let mut values = Vec::new();
        let mut put = |key: &str, value: Num| values.push((key.to_owned(), value));
        match self {
            Self::CpuAverage => put("cpu_average", Num::F64(s.cpu_average?)),
            Self::MemoryUsage => {
                if s.memory.used == 0 {
                    return None;
                }
                put("memory_usage", Num::U64(s.memory.used));
            }
            Self::MemoryUsagePercent => {
                let percent = s.memory.used_percent();
                if percent <= 0.0 {
                    return None;
                }
                put("memory_usage_percent", Num::F64(percent));
            }
            Self::DisksReadSpeed | Self::DisksWriteSpeed | Self::DisksIops => {
                for (name, io) in s.disks_io.as_ref()? {
                    put(
                        name,
                        match self {
                            Self::DisksReadSpeed => Num::F32(io.read_speed),
                            Self::DisksWriteSpeed => Num::F32(io.write_speed),
                            _ => Num::U64(io.iops),
                        },
                    );
                }
            }
            Self::DiskUsage => {
                for (name, disk) in s.disks.as_ref()? {
                    put(name, Num::U64(disk.used));
                }
            }
            Self::NetworkSpeed => {
                if s.network.bytes_sent == 0 && s.network.bytes_recv == 0 {
                    return None;
                }
                put("upload", Num::F32(s.network.upload_speed));
                put("download", Num::F32(s.network.download_speed));
            }
            Self::NetworkTransfer => {
                if s.network.bytes_sent == 0 && s.network.bytes_recv == 0 {
                    return None;
                }
                put("upload", Num::U64(s.network.bytes_sent));
                put("download", Num::U64(s.network.bytes_recv));
            }
            Self::SensorTemperature => {
                for sensor in s.sensors.as_ref()? {
                    put(&sensor.name, Num::F32(sensor.temperature));
                }
            }
        }
        Some(Row {
            timestamp: s.timestamp,
            values,
        })
    }
}

/// A number as GoDoxy types it (f32 rates print in f32's shortest form).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Num {
    I64(i64),
    U64(u64),
    F32(f32),
    F64(f64),
}

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Self::I64(v) => s.serialize_i64(v),
            Self::U64(v) => s.serialize_u64(v),
            Self::F32(v) => s.serialize_f32(v),
            Self::F64(v) => s.serialize_f64(v),
        }
    }
}

/// One point of a chart: `{"timestamp": ..., "<key>": <value>, ...}`, keys in byte order as
/// Go writes a map. A key that comes twice (two sensors of one name) keeps the last value,
/// as Go's map does.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub(crate) timestamp: i64,
    pub(crate) values: Vec<(String, Num)>,
}

impl Serialize for Row {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut sorted: BTreeMap<&str, Num> = BTreeMap::new();
        for (key, value) in &self.values {
            sorted.insert(key, *value);
        }
        // Written last, as GoDoxy does: a sensor named "timestamp" cannot hide it.
        sorted.insert("timestamp", Num::I64(self.timestamp));
        let mut map = s.serialize_map(Some(sorted.len()))?;
        for (key, value) in &sorted {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// The reply to `period=...&aggregate=...`: `{"data":[...],"total":N}`.
#[derive(Serialize)]
pub(crate) struct Chart {
    pub(crate) data: Vec<Row>,
    pub(crate) total: usize,
}

impl Chart {
    pub(crate) fn new(data: Vec<Row>) -> Self {
        Self {
            total: data.len(),
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::sample::{DiskIo, Memory, Network, Sensor};

    fn sample(timestamp: i64) -> Arc<Sample> {
        Arc::new(Sample {
            timestamp,
            cpu_average: Some(12.5),
            memory: Memory {
                available: 3,
                used: 1,
            },
            disks_io: Some(BTreeMap::from([(
                "sda".to_owned(),
                DiskIo {
                    name: "sda".to_owned(),
                    read_speed: 0.1,
                    iops: 7,
                    ..DiskIo::default()
                },
            )])),
            network: Network {
                bytes_sent: 10,
                bytes_recv: 20,
                upload_speed: 1.5,
                download_speed: 2.5,
            },
            sensors: Some(vec![Sensor {
                name: "zeta".to_owned(),
                temperature: 40.5,
                ..Sensor::default()
            }]),
            ..Sample::default()
        })
    }

    #[test]
    fn intervals_are_a_hundredth_at_least_a_second() {
        let secs: Vec<f64> = Period::ALL
            .iter()
            .map(|p| p.interval().as_secs_f64())
            .collect();
        assert_eq!(secs, vec![3.0, 9.0, 36.0, 864.0, 25_920.0]);
        assert_eq!(Period::parse("1mo"), Some(Period::Mo1));
        assert_eq!(Period::parse("1M"), None);
    }

    #[test]
    fn each_period_takes_a_point_per_interval_and_keeps_100() {
        let start = Instant::now();
        let mut history = History::new(start);
        // One sample a second for 20 minutes.
        for i in 1..=1200u64 {
            history.add(
                start + Duration::from_secs(i),
                &sample(i64::try_from(i).unwrap()),
            );
        }
        let count = |p| history.points(p).count();
        assert_eq!(count(Period::M5), 100);
        assert_eq!(count(Period::M15), 100);
        assert_eq!(count(Period::H1), 1200 / 36);
        assert_eq!(count(Period::D1), 1);
        assert_eq!(count(Period::Mo1), 0);
        // 5m: every 3 s, the newest last; the oldest were dropped.
        let stamps: Vec<i64> = history.points(Period::M5).map(|s| s.timestamp).collect();
        assert_eq!(stamps.first(), Some(&903));
        assert_eq!(stamps.last(), Some(&1200));
        assert!(stamps.windows(2).all(|w| w[1] - w[0] == 3));
    }

    #[test]
    fn rows_have_godoxys_keys() {
        let points = [sample(1), sample(2)];
        let json =
            |a: Aggregate| serde_json::to_string(&Chart::new(a.rows(points.iter()))).unwrap();
        assert_eq!(
            json(Aggregate::CpuAverage),
            r#"{"data":[{"cpu_average":12.5,"timestamp":1},{"cpu_average":12.5,"timestamp":2}],"total":2}"#
        );
        assert!(
            json(Aggregate::DisksReadSpeed).starts_with(r#"{"data":[{"sda":0.1,"timestamp":1}"#)
        );
        assert!(json(Aggregate::DisksIops).contains(r#"{"sda":7,"timestamp":2}"#));
        assert!(
            json(Aggregate::NetworkSpeed)
                .contains(r#"{"download":2.5,"timestamp":1,"upload":1.5}"#)
        );
        assert!(
            json(Aggregate::NetworkTransfer)
                .contains(r#"{"download":20,"timestamp":1,"upload":10}"#)
        );
        assert!(json(Aggregate::SensorTemperature).contains(r#"{"timestamp":1,"zeta":40.5}"#));
        assert!(json(Aggregate::MemoryUsagePercent).contains(r#""memory_usage_percent":25.0"#));
        // No disks in these samples: every row is skipped.
        assert_eq!(json(Aggregate::DiskUsage), r#"{"data":[],"total":0}"#);
    }

    #[test]
    fn file_round_trip_keeps_the_newest_100() {
        let start = Instant::now();
        let mut history = History::new(start);
        for i in 1..=400u64 {
            history.add(
                start + Duration::from_secs(i),
                &sample(i64::try_from(i).unwrap()),
            );
        }
        let bytes = history.snapshot().to_file().unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"entries":{"5m":{"entries":[{"timestamp":"#),
            "{text:.80}"
        );
        assert!(text.contains(r#""interval":3000000000}"#));
        let back = History::from_file(&bytes, Instant::now()).unwrap();
        assert_eq!(back.len(), history.len());
        let a: Vec<&Arc<Sample>> = history.points(Period::M15).collect();
        let b: Vec<&Arc<Sample>> = back.points(Period::M15).collect();
        assert_eq!(a, b);

        // A file with more than 100 points keeps the newest; unknown periods are ignored.
        let many: Vec<Sample> = (0..150).map(|i| (*sample(i)).clone()).collect();
        let file = serde_json::json!({"entries": {"5m": {"entries": many, "interval": 1}, "2h": {"entries": []}}});
        let back = History::from_file(file.to_string().as_bytes(), Instant::now()).unwrap();
        let stamps: Vec<i64> = back.points(Period::M5).map(|s| s.timestamp).collect();
        assert_eq!((stamps.len(), stamps[0], stamps[99]), (100, 50, 149));

        for bad in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"entries\":{\"5m\":{\"entries\":[{\"timestamp\":\"x\"}]}}}",
        ] {
            assert!(History::from_file(bad, Instant::now()).is_err());
        }
    }
}
