//! One sample of the host in the JSON shape GoDoxy's dashboard reads (GoDoxy's `SystemInfo`,
//! with the field names of the gopsutil fork it pins), and the same shape read back from the
//! history file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything one tick of the sampler saw. A part that is switched off or failed is `None`
/// (`null`), or zero for `memory` and `network`, which GoDoxy always writes out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Sample {
    /// Unix time in seconds.
    pub(crate) timestamp: i64,
    /// CPU busy percentage over the last interval, all cores together (0-100).
    pub(crate) cpu_average: Option<f64>,
    /// Memory in bytes.
    #[serde(default)]
    pub(crate) memory: Memory,
    /// Filesystem usage by device (or mount point when there is no device).
    #[serde(default)]
    pub(crate) disks: Option<BTreeMap<String, DiskUsage>>,
    /// Disk I/O by whole-disk device name (`sda`, `nvme0n1`).
    #[serde(default)]
    pub(crate) disks_io: Option<BTreeMap<String, DiskIo>>,
    /// Network bytes of all interfaces together, and speeds.
    #[serde(default)]
    pub(crate) network: Network,
    /// Temperature sensors, in the order the kernel lists them.
    #[serde(default)]
    pub(crate) sensors: Option<Vec<Sensor>>,
}

impl Sample {
    /// A sample with no figures, as GoDoxy writes one with every part disabled.
    pub(crate) fn empty(timestamp: i64) -> Self {
        Self {
            timestamp,
            ..Self::default()
        }
    }
}

/// `memory`: GoDoxy writes `total` as `available + used` and `used_percent` from the two.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "MemoryJson", from = "MemoryJson")]
pub(crate) struct Memory {
    /// Bytes available to programs without swapping (`MemAvailable`).
    pub(crate) available: u64,
    /// `MemTotal - MemAvailable`.
    pub(crate) used: u64,
}

impl Memory {
    /// `available + used`: `MemTotal`.
    pub(crate) fn total(self) -> u64 {
        self.available.saturating_add(self.used)
    }

    /// `used / total` in percent; 0 when there is nothing.
    pub(crate) fn used_percent(self) -> f64 {
        percent(self.used, self.total())
    }
}

#[derive(Serialize, Deserialize)]
struct MemoryJson {
    available: u64,
    used: u64,
    #[serde(default)]
    total: u64,
    #[serde(default)]
    used_percent: f64,
}

impl From<Memory> for MemoryJson {
    fn from(m: Memory) -> Self {
        Self {
            available: m.available,
            used: m.used,
            total: m.total(),
            used_percent: m.used_percent(),
        }
    }
}

impl From<MemoryJson> for Memory {
    fn from(m: MemoryJson) -> Self {
        Self {
            available: m.available,
            used: m.used,
        }
    }
}

/// One entry of `disks`: GoDoxy writes `total` as `free + used` (the blocks reserved for root
/// are in neither), as `df` and psutil compute `used` and the percentage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "DiskUsageJson", from = "DiskUsageJson")]
pub(crate) struct DiskUsage {
    /// The mount point.
    pub(crate) path: String,
    /// The filesystem type as mounted (`ext4`, `xfs`, `overlay`).
    pub(crate) fstype: String,
    /// Bytes an unprivileged user may still write (`f_bavail`).
    pub(crate) free: u64,
    /// Bytes in use (`f_blocks - f_bfree`).
    pub(crate) used: u64,
}

impl DiskUsage {
    /// `free + used`.
    pub(crate) fn total(&self) -> u64 {
        self.free.saturating_add(self.used)
    }
}

#[derive(Serialize, Deserialize)]
struct DiskUsageJson {
    path: String,
    fstype: String,
    #[serde(default)]
    total: u64,
    free: u64,
    used: u64,
    #[serde(default)]
    used_percent: f64,
}

impl From<DiskUsage> for DiskUsageJson {
    fn from(d: DiskUsage) -> Self {
        let total = d.total();
        Self {
            used_percent: percent(d.used, total),
            path: d.path,
            fstype: d.fstype,
            total,
            free: d.free,
            used: d.used,
        }
    }
}

impl From<DiskUsageJson> for DiskUsage {
    fn from(d: DiskUsageJson) -> Self {
        Self {
            path: d.path,
            fstype: d.fstype,
            free: d.free,
            used: d.used,
        }
    }
}

/// One entry of `disks_io`: counters since boot, and rates over the last interval. The names
/// are camelCase in the gopsutil fork GoDoxy pins (older releases wrote snake_case, which the
/// history file reader also takes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DiskIo {
    /// Reads completed.
    #[serde(alias = "read_count")]
    pub(crate) read_count: u64,
    /// Writes completed.
    #[serde(alias = "write_count")]
    pub(crate) write_count: u64,
    /// Bytes read.
    #[serde(alias = "read_bytes")]
    pub(crate) read_bytes: u64,
    /// Bytes written.
    #[serde(alias = "write_bytes")]
    pub(crate) write_bytes: u64,
    /// The device name, as the key.
    pub(crate) name: String,
    /// Reads and writes per second.
    pub(crate) iops: u64,
    /// Bytes read per second.
    #[serde(alias = "read_speed")]
    pub(crate) read_speed: f32,
    /// Bytes written per second.
    #[serde(alias = "write_speed")]
    pub(crate) write_speed: f32,
}

/// `network`: all interfaces together, loopback included (as gopsutil and psutil count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Network {
    /// Bytes sent since boot.
    pub(crate) bytes_sent: u64,
    /// Bytes received since boot.
    pub(crate) bytes_recv: u64,
    /// Bytes sent per second over the last interval.
    #[serde(default)]
    pub(crate) upload_speed: f32,
    /// Bytes received per second over the last interval.
    #[serde(default)]
    pub(crate) download_speed: f32,
}

/// One temperature sensor, in degrees Celsius; `high` and `critical` are 0 when the kernel
/// gives none, and are rounded to 0.1 as GoDoxy writes them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Sensor {
    /// hwmon chip name and label, `coretemp_package_id_0`, or a thermal zone's type.
    pub(crate) name: String,
    /// The current reading.
    pub(crate) temperature: f32,
    /// The chip's `max` threshold.
    #[serde(default)]
    pub(crate) high: f64,
    /// The chip's `crit` threshold.
    #[serde(default)]
    pub(crate) critical: f64,
}

/// `part / whole` in percent; 0 for an empty whole.
pub(crate) fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)] // byte counts far below 2^53 in practice
    let ratio = part as f64 / whole as f64;
    ratio * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_godoxys_names_and_derived_fields() {
        let sample = Sample {
            timestamp: 123_456,
            cpu_average: Some(45.5),
            memory: Memory {
                available: 6,
                used: 2,
            },
            disks: Some(BTreeMap::from([(
                "/dev/sda1".to_owned(),
                DiskUsage {
                    path: "/".to_owned(),
                    fstype: "ext4".to_owned(),
                    free: 3,
                    used: 1,
                },
            )])),
            disks_io: Some(BTreeMap::from([(
                "sda".to_owned(),
                DiskIo {
                    read_count: 1,
                    write_count: 2,
                    read_bytes: 3,
                    write_bytes: 4,
                    name: "sda".to_owned(),
                    iops: 5,
                    read_speed: 100.5,
                    write_speed: 0.1,
                },
            )])),
            network: Network {
                bytes_sent: 7,
                bytes_recv: 8,
                upload_speed: 1024.5,
                download_speed: 2048.5,
            },
            sensors: Some(vec![Sensor {
                name: "coretemp_core_0".to_owned(),
                temperature: 41.0,
                high: 84.0,
                critical: 100.0,
            }]),
        };
        let json = serde_json::to_value(&sample).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "timestamp": 123_456,
                "cpu_average": 45.5,
                "memory": {"available": 6, "used": 2, "total": 8, "used_percent": 25.0},
                "disks": {"/dev/sda1": {"path": "/", "fstype": "ext4", "total": 4, "free": 3,
                                        "used": 1, "used_percent": 25.0}},
                "disks_io": {"sda": {"readCount": 1, "writeCount": 2, "readBytes": 3,
                                     "writeBytes": 4, "name": "sda", "iops": 5,
                                     "readSpeed": 100.5, "writeSpeed": 0.1_f32}},
                "network": {"bytes_sent": 7, "bytes_recv": 8, "upload_speed": 1024.5,
                            "download_speed": 2048.5},
                "sensors": [{"name": "coretemp_core_0", "temperature": 41.0, "high": 84.0,
                             "critical": 100.0}],
            })
        );
        // f32 rates print as f32 (shortest form), not widened to f64 digits.
        let text = serde_json::to_string(&sample).unwrap();
        assert!(text.contains(r#""writeSpeed":0.1}"#), "{text}");
        // And the shape reads back into the same sample (the history file).
        let back: Sample = serde_json::from_str(&text).unwrap();
        assert_eq!(back, sample);
    }

    #[test]
    fn an_empty_sample_writes_every_key() {
        let json = serde_json::to_value(Sample::empty(1)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "timestamp": 1,
                "cpu_average": null,
                "memory": {"available": 0, "used": 0, "total": 0, "used_percent": 0.0},
                "disks": null,
                "disks_io": null,
                "network": {"bytes_sent": 0, "bytes_recv": 0, "upload_speed": 0.0,
                            "download_speed": 0.0},
                "sensors": null,
            })
        );
    }

    #[test]
    fn older_snake_case_disk_io_reads() {
        let io: DiskIo = serde_json::from_str(
            r#"{"name":"sda","read_bytes":1,"write_bytes":2,"read_count":3,"write_count":4,
                "iops":5,"read_speed":6,"write_speed":7}"#,
        )
        .unwrap();
        assert_eq!((io.read_bytes, io.write_count, io.write_speed), (1, 4, 7.0));
    }
}
