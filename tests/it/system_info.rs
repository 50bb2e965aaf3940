//! `/godoxy/agent/system_info`, GoDoxy's dashboard endpoint: figures checked against an
//! independent reader (Python's psutil) on this machine, every period and aggregate of a
//! known history, bad values, the WebSocket stream with a real client (Python's websockets),
//! the history file across restarts, and the settings that switch parts off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use godoxy_agent::Config;
use godoxy_agent::client::ClientTls;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

use crate::common::{Running, TestDaemon, TestPki, field};

const PATH: &str = "/godoxy/agent/system_info";
const PERIODS: [&str; 5] = ["5m", "15m", "1h", "1d", "1mo"];
const AGGREGATES: [&str; 10] = [
    "cpu_average",
    "memory_usage",
    "memory_usage_percent",
    "disks_read_speed",
    "disks_write_speed",
    "disks_iops",
    "disk_usage",
    "network_speed",
    "network_transfer",
    "sensor_temperature",
];

// ---------------------------------------------------------------------------------------------
// Helpers.

/// GET `path`; returns (status, content type, body).
async fn get(client: &ClientTls, addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    request(client, addr, "GET", path).await
}

async fn request(
    client: &ClientTls,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> (u16, String, Vec<u8>) {
    let mut tls = client.connect_http(addr).await.unwrap();
    let head =
        format!("{method} {path} HTTP/1.1\r\nHost: godoxy.agent\r\nConnection: close\r\n\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut raw))
        .await
        .expect("no complete response within 5 s");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    (status, content_type, raw[split + 4..].to_vec())
}

/// GET `path` expecting 200 JSON.
async fn get_json(client: &ClientTls, addr: SocketAddr, path: &str) -> Value {
    let (status, content_type, body) = get(client, addr, path).await;
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    assert_eq!(content_type, "application/json; charset=utf-8");
    serde_json::from_slice(&body).unwrap()
}

/// The latest sample, waiting through the 204s before the first.
async fn first_sample(client: &ClientTls, addr: SocketAddr) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, body) = get(client, addr, PATH).await;
        match status {
            200 => return serde_json::from_slice(&body).unwrap(),
            204 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => panic!("{status}: {}", String::from_utf8_lossy(&body)),
        }
    }
}

/// `[metrics]` lines after the test daemon's `[stream]` table.
fn metrics_table(lines: &str) -> String {
    format!("\n[metrics]\n{lines}\n")
}

fn state_dir_line(dir: &Path) -> String {
    format!("state_dir = \"{}\"", dir.display())
}

/// The virtualenv's python with tests/peers/metrics-requirements.txt installed (made once,
/// again when that file changes; a few seconds with PyPI the first time).
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("metrics-venv");
        let requirements = peers().join("metrics-requirements.txt");
        // One process at a time per folder; rebuilt when the requirements change.
        let script = r#"
            set -euo pipefail
            venv=$1 req=$2
            mkdir -p "$(dirname "$venv")"
            exec 9>"$venv.lock"; flock 9
            want=$(sha256sum "$req" | cut -d' ' -f1)
            if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$want" ]; then
              rm -rf "$venv"
              python3 -m venv "$venv" >&2
              "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$req" >&2
              echo "$want" >"$venv/.requirements"
            fi
        "#;
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .arg("venv")
            .arg(&venv)
            .arg(&requirements)
            .stdin(Stdio::null())
            .output()
            .expect("running bash");
        assert!(
            out.status.success(),
            "making the metrics virtualenv failed (python3 with venv, and PyPI the first time):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        venv.join("bin/python")
    })
}

fn peers() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// Runs a Python peer with the client certificate folder, within 60 s; its stdout is JSON.
async fn peer(script: &str, daemon_addr: SocketAddr, pki: &TestPki, args: &[&str]) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(peers().join(script))
        .arg(daemon_addr.port().to_string())
        .arg(pki.dir.path())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out: Output = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("peer did not finish within 60 s")
        .expect("peer could not start");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("{script}: {err}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

// ---------------------------------------------------------------------------------------------
// The figures, against psutil.

#[tokio::test]
async fn figures_agree_with_psutil() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let out = peer("psutil_reader.py", daemon.addr, &pki, &[]).await;

    // Memory: both read MemTotal and MemAvailable; the total is exact, "available" moves.
    let (agent, psutil) = (&out["memory"]["agent"], &out["memory"]["psutil"]);
    let total = u(&psutil["total"]);
    assert_eq!(u(&agent["total"]), total, "{out}");
    assert_eq!(
        u(&agent["total"]),
        u(&agent["available"]) + u(&agent["used"])
    );
    let drift = u(&agent["available"]).abs_diff(u(&psutil["available"]));
    assert!(
        drift < total / 20,
        "available differs by {drift} bytes: {out}"
    );
    assert!(
        (f(&agent["used_percent"]) - 100.0 * f(&agent["used"]) / f(&agent["total"])).abs() < 1e-9
    );

    // The filesystem at /: used and free as df and psutil count them; total = used + free.
    let (agent, psutil) = (&out["disk_root"]["agent"], &out["disk_root"]["psutil"]);
    assert!(
        agent.is_object(),
        "no disk with path / in the sample: {out}"
    );
    let slack = (256 << 20).max(u(&psutil["total"]) / 100);
    assert!(
        u(&agent["used"]).abs_diff(u(&psutil["used"])) < slack,
        "{out}"
    );
    assert!(
        u(&agent["free"]).abs_diff(u(&psutil["free"])) < slack,
        "{out}"
    );
    assert_eq!(u(&agent["total"]), u(&agent["used"]) + u(&agent["free"]));
    assert!(
        (f(&agent["used_percent"]) - f(&psutil["percent"])).abs() < 1.0,
        "{out}"
    );

    // Network counters (all interfaces, loopback included): the agent's sample before and
    // after psutil's reading bracket it exactly.
    let net = &out["network"];
    for key in ["bytes_sent", "bytes_recv"] {
        let (before, value, after) = (
            u(&net["before"][key]),
            u(&net["psutil"][key]),
            u(&net["after"][key]),
        );
        assert!(
            before <= value && value <= after,
            "{key}: {before} <= {value} <= {after}"
        );
    }
    assert!(u(&net["after"]["bytes_recv"]) > 0);

    // Disk I/O counters of the whole disks the agent reports, bracketed the same way.
    let io = &out["disk_io"];
    let disks = io["after"].as_object().unwrap();
    if disks.is_empty() {
        eprintln!("no whole disk with I/O on this machine; disk I/O not compared");
    }
    for (name, after) in disks {
        let (Some(before), Some(value)) = (io["before"].get(name), io["psutil"].get(name)) else {
            continue;
        };
        assert_eq!(after["name"], json!(name));
        for (ours, theirs) in [
            ("readCount", "read_count"),
            ("writeCount", "write_count"),
            ("readBytes", "read_bytes"),
            ("writeBytes", "write_bytes"),
        ] {
            let (b, v, a) = (u(&before[ours]), u(&value[theirs]), u(&after[ours]));
            assert!(b <= v && v <= a, "{name} {ours}: {b} <= {v} <= {a}");
        }
    }

    // CPU busy percent over the same five seconds, with one core kept busy.
    let agent: Vec<f64> = out["cpu"]["agent"]
        .as_array()
        .unwrap()
        .iter()
        .map(f)
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let mean = agent.iter().sum::<f64>() / agent.len() as f64;
    let psutil = f(&out["cpu"]["psutil"]);
    assert!(
        (mean - psutil).abs() <= 8.0,
        "agent {mean:.1}% ({agent:?}) vs psutil {psutil:.1}%"
    );
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The latest sample.

#[tokio::test]
async fn latest_sample_has_godoxys_shape() {
    let pki = TestPki::new();
    let started = Instant::now();
    let daemon = TestDaemon::start(&pki).await;
    let client = pki.client();

    // The first sample comes 500 ms after start; a request before it gets 204 and no body.
    let (status, _, body) = get(&client, daemon.addr, PATH).await;
    if started.elapsed() < Duration::from_millis(400) {
        assert_eq!((status, body.len()), (204, 0));
    } else {
        eprintln!(
            "first request took {:?}; 204 not checked",
            started.elapsed()
        );
    }

    let sample = first_sample(&client, daemon.addr).await;
    let keys: Vec<&str> = sample
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "cpu_average",
            "disks",
            "disks_io",
            "memory",
            "network",
            "sensors",
            "timestamp"
        ]
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(u(&sample["timestamp"]).abs_diff(now) <= 2);
    assert!((0.0..=100.0).contains(&f(&sample["cpu_average"])));
    let object_keys =
        |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(
        object_keys(&sample["memory"]),
        ["available", "total", "used", "used_percent"]
    );
    assert_eq!(
        object_keys(&sample["network"]),
        ["bytes_recv", "bytes_sent", "download_speed", "upload_speed"]
    );
    for disk in sample["disks"].as_object().unwrap().values() {
        assert_eq!(
            object_keys(disk),
            ["free", "fstype", "path", "total", "used", "used_percent"]
        );
    }
    for (name, io) in sample["disks_io"].as_object().unwrap() {
        assert_eq!(
            object_keys(io),
            [
                "iops",
                "name",
                "readBytes",
                "readCount",
                "readSpeed",
                "writeBytes",
                "writeCount",
                "writeSpeed"
            ]
        );
        assert_eq!(io["name"], json!(name));
    }
    assert!(sample["sensors"].is_array());

    // HEAD: the same status, no body.
    let (status, _, body) = request(&client, daemon.addr, "HEAD", PATH).await;
    assert_eq!((status, body.len()), (200, 0));
    daemon.stop().await;
}

#[tokio::test]
async fn parts_switched_off_are_null_and_off_means_a_bare_timestamp() {
    let pki = TestPki::new();
    let table = metrics_table("cpu = false\ndisk = false\nsensors = false");
    let daemon = TestDaemon::start_with(&pki, &table).await;
    let client = pki.client();
    let sample = first_sample(&client, daemon.addr).await;
    for key in ["cpu_average", "disks", "disks_io", "sensors"] {
        assert_eq!(sample[key], Value::Null, "{key}: {sample}");
    }
    assert!(u(&sample["memory"]["total"]) > 0);
    assert!(u(&sample["network"]["bytes_recv"]) > 0);
    daemon.stop().await;

    // Metrics off: what GoDoxy's agent answers with every part disabled, at once.
    let daemon = TestDaemon::start_with(&pki, &metrics_table("enabled = false")).await;
    let sample = get_json(&client, daemon.addr, PATH).await;
    assert_eq!(sample["cpu_average"], Value::Null);
    assert_eq!(
        sample["memory"],
        json!({"available": 0, "used": 0, "total": 0, "used_percent": 0.0})
    );
    assert_eq!(sample["disks"], Value::Null);
    assert!(u(&sample["timestamp"]) > 1_700_000_000);
    let chart = get_json(
        &client,
        daemon.addr,
        &format!("{PATH}?period=5m&aggregate=cpu_average"),
    )
    .await;
    assert_eq!(chart, json!({"total": 0, "data": []}));
    daemon.stop().await;
}

#[test]
fn switches_from_file_and_environment() {
    let env = |var: &str| match var {
        "METRICS_DISABLE_CPU" => Some("true".to_owned()),
        "GODOXY_METRICS_DISABLE_SENSORS" => Some("1".to_owned()),
        "METRICS_DISABLE_DISK" => Some("false".to_owned()),
        "STATE_DIRECTORY" => Some("/var/lib/godoxy-agent:/var/lib/other".to_owned()),
        _ => None,
    };
    let (config, _) =
        Config::from_toml("[metrics]\ndisk = false\nnetwork = false\n", None, env).unwrap();
    let m = &config.metrics;
    assert_eq!(
        (m.cpu, m.memory, m.disk, m.network, m.sensors),
        (false, true, true, false, false)
    );
    // systemd's StateDirectory= (its first folder) when the file names none.
    assert_eq!(
        m.state_dir.as_deref(),
        Some(Path::new("/var/lib/godoxy-agent"))
    );
    let (config, _) = Config::from_toml("[metrics]\nstate_dir = \"/srv/m\"\n", None, env).unwrap();
    assert_eq!(
        config.metrics.state_dir.as_deref(),
        Some(Path::new("/srv/m"))
    );
    let (config, _) = Config::from_toml("", None, |_| None).unwrap();
    assert_eq!(config.metrics.state_dir, None);
    assert_eq!(config.metrics.interval, Duration::from_secs(1));

    let err = Config::from_toml("", None, |v: &str| {
        (v == "METRICS_DISABLE_NETWORK").then(|| "yes".to_owned())
    })
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "environment variable METRICS_DISABLE_NETWORK: `yes` is not a boolean (true/false/1/0)"
    );
    for (toml, message) in [
        (
            "[metrics]\ninterval = \"500ms\"\n",
            "`metrics.interval`: must be between 1s and 60s",
        ),
        (
            "[metrics]\ninterval = \"2m\"\n",
            "`metrics.interval`: must be between 1s and 60s",
        ),
        ("[metrics]\ncpus = false\n", "unknown field `cpus`"),
    ] {
        let err = Config::from_toml(toml, None, |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(message), "{toml}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Periods and aggregates.

/// Timestamps of the history written by hand, far in the past so new points are told apart.
const OLD: i64 = 1_000_000_000;

/// A sample with every part, its figures derived from `n`.
fn full_sample(n: i64) -> Value {
    #[allow(clippy::cast_precision_loss)]
    let x = n as f64;
    json!({
        "timestamp": OLD + n,
        "cpu_average": 10.0 + x,
        "memory": {"available": 3000 + n, "used": 1000 + n, "total": 4000 + 2 * n, "used_percent": 0.0},
        "disks": {
            "/dev/sda1": {"path": "/", "fstype": "ext4", "total": 0, "free": 500, "used": 100 + n, "used_percent": 0.0},
            "/mnt/data": {"path": "/mnt/data", "fstype": "9p", "total": 0, "free": 7, "used": 200 + n, "used_percent": 0.0},
        },
        "disks_io": {
            "sda": {"readCount": 1, "writeCount": 2, "readBytes": 3, "writeBytes": 4, "name": "sda",
                    "iops": 5 + n, "readSpeed": 100.5 + x, "writeSpeed": 200.25 + x},
            "nvme0n1": {"readCount": 1, "writeCount": 2, "readBytes": 3, "writeBytes": 4, "name": "nvme0n1",
                        "iops": 6 + n, "readSpeed": 0.5, "writeSpeed": 1.5},
        },
        "network": {"bytes_sent": 5000 + n, "bytes_recv": 9000 + n, "upload_speed": 1024.5 + x, "download_speed": 2048.5},
        "sensors": [
            {"name": "coretemp_core_0", "temperature": 40.5 + x, "high": 84.0, "critical": 100.0},
            {"name": "nvme_composite", "temperature": 35.0, "high": 0.0, "critical": 0.0},
        ],
    })
}

/// A sample with nothing in it, which every aggregate but the per-device ones skips.
fn bare_sample(n: i64) -> Value {
    json!({
        "timestamp": OLD + n,
        "cpu_average": null,
        "memory": {"available": 0, "used": 0, "total": 0, "used_percent": 0.0},
        "disks": null, "disks_io": null,
        "network": {"bytes_sent": 0, "bytes_recv": 0, "upload_speed": 0.0, "download_speed": 0.0},
        "sensors": null,
    })
}

/// The samples of period number `p` in the hand-written history.
fn period_samples(p: i64) -> Vec<Value> {
    vec![
        full_sample(p * 100 + 1),
        bare_sample(p * 100 + 2),
        full_sample(p * 100 + 3),
    ]
}

/// GoDoxy's aggregate rules, restated over the sample JSON.
fn expected_rows(samples: &[Value], aggregate: &str) -> Vec<Value> {
    let mut rows = Vec::new();
    for s in samples {
        let mut row = serde_json::Map::new();
        let per_device = |key: &str, field: &str, row: &mut serde_json::Map<String, Value>| {
            for (name, v) in s[key].as_object()? {
                row.insert(name.clone(), v[field].clone());
            }
            Some(())
        };
        let keep = match aggregate {
            "cpu_average" => {
                row.insert("cpu_average".into(), s["cpu_average"].clone());
                !s["cpu_average"].is_null()
            }
            "memory_usage" => {
                row.insert("memory_usage".into(), s["memory"]["used"].clone());
                u(&s["memory"]["used"]) > 0
            }
            "memory_usage_percent" => {
                let used = f(&s["memory"]["used"]);
                let total = used + f(&s["memory"]["available"]);
                let percent = if total > 0.0 {
                    used / total * 100.0
                } else {
                    0.0
                };
                row.insert("memory_usage_percent".into(), json!(percent));
                percent > 0.0
            }
            "disks_read_speed" => per_device("disks_io", "readSpeed", &mut row).is_some(),
            "disks_write_speed" => per_device("disks_io", "writeSpeed", &mut row).is_some(),
            "disks_iops" => per_device("disks_io", "iops", &mut row).is_some(),
            "disk_usage" => per_device("disks", "used", &mut row).is_some(),
            "network_speed" | "network_transfer" => {
                let (up, down) = if aggregate == "network_speed" {
                    ("upload_speed", "download_speed")
                } else {
                    ("bytes_sent", "bytes_recv")
                };
                row.insert("upload".into(), s["network"][up].clone());
                row.insert("download".into(), s["network"][down].clone());
                u(&s["network"]["bytes_sent"]) > 0 || u(&s["network"]["bytes_recv"]) > 0
            }
            "sensor_temperature" => match s["sensors"].as_array() {
                Some(sensors) => {
                    for sensor in sensors {
                        row.insert(
                            sensor["name"].as_str().unwrap().to_owned(),
                            sensor["temperature"].clone(),
                        );
                    }
                    true
                }
                None => false,
            },
            other => panic!("{other}"),
        };
        if keep {
            row.insert("timestamp".into(), s["timestamp"].clone());
            rows.push(Value::Object(row));
        }
    }
    rows
}

/// A history file in GoDoxy's format with three samples per period.
fn write_history(dir: &Path) {
    let mut entries = serde_json::Map::new();
    for (p, name) in (0..).zip(PERIODS) {
        entries.insert(
            name.to_owned(),
            json!({"entries": period_samples(p), "interval": 1}),
        );
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("system_info.json"),
        serde_json::to_vec(&json!({ "entries": entries })).unwrap(),
    )
    .unwrap();
}

/// Every chart of every period, compared with [`expected_rows`] (points the running daemon
/// added itself, with today's timestamps, are left out of the comparison).
async fn assert_charts(client: &ClientTls, addr: SocketAddr) {
    for (p, period) in (0..).zip(PERIODS) {
        let samples = period_samples(p);
        for aggregate in AGGREGATES {
            let chart = get_json(
                client,
                addr,
                &format!("{PATH}?period={period}&aggregate={aggregate}"),
            )
            .await;
            let keys: Vec<&String> = chart.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["data", "total"]);
            let data = chart["data"].as_array().unwrap();
            assert_eq!(u(&chart["total"]), data.len() as u64);
            let old: Vec<Value> = data
                .iter()
                .filter(|row| row["timestamp"].as_i64().unwrap() < OLD + 1_000_000)
                .cloned()
                .collect();
            assert_eq!(
                old,
                expected_rows(&samples, aggregate),
                "{period} {aggregate}"
            );
        }
    }
}

#[tokio::test]
async fn every_period_and_aggregate_of_a_known_history() {
    let pki = TestPki::new();
    let state = tempfile::tempdir().unwrap();
    write_history(state.path());
    let table = metrics_table(&state_dir_line(state.path()));
    let daemon = TestDaemon::start_with(&pki, &table).await;
    let client = pki.client();
    assert_charts(&client, daemon.addr).await;

    // One spot check written out in full, as the dashboard receives it.
    let chart = get_json(
        &client,
        daemon.addr,
        &format!("{PATH}?period=1d&aggregate=network_speed"),
    )
    .await;
    let data = &chart["data"];
    assert_eq!(
        data[0],
        json!({"timestamp": OLD + 301, "upload": 1325.5, "download": 2048.5})
    );
    assert_eq!(
        data[1],
        json!({"timestamp": OLD + 303, "upload": 1327.5, "download": 2048.5})
    );
    daemon.stop().await;
}

#[tokio::test]
async fn bad_values_are_400_with_a_message() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let client = pki.client();
    for (query, error) in [
        ("period=2h&aggregate=cpu_average", "invalid period `2h`"),
        ("period=5M&aggregate=cpu_average", "invalid period `5M`"),
        ("period=5m", "invalid aggregate ``"),
        ("period=1h&aggregate=cpu", "invalid aggregate `cpu`"),
        ("period=1h&aggregate=", "invalid aggregate ``"),
    ] {
        let (status, content_type, body) =
            get(&client, daemon.addr, &format!("{PATH}?{query}")).await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(content_type, "application/json; charset=utf-8");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["message"], "bad request", "{query}");
        assert!(
            body["error"].as_str().unwrap().starts_with(error),
            "{query}: {body}"
        );
    }
    // An empty period is no period: the latest sample (GoDoxy's c.Query semantics).
    first_sample(&client, daemon.addr).await;
    let sample = get_json(
        &client,
        daemon.addr,
        &format!("{PATH}?period=&aggregate=nonsense"),
    )
    .await;
    assert!(sample["timestamp"].is_u64());
    let (status, _, body) = request(&client, daemon.addr, "POST", PATH).await;
    assert_eq!(status, 405);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["message"],
        "method not allowed"
    );
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket.

#[tokio::test]
async fn websocket_streams_answers_ping_and_skips_unchanged_frames() {
    let pki = TestPki::new();
    let state = tempfile::tempdir().unwrap();
    write_history(state.path());
    let daemon = TestDaemon::start_with(&pki, &metrics_table(&state_dir_line(state.path()))).await;
    let client = pki.client();
    first_sample(&client, daemon.addr).await;

    // The latest sample, pinging every second for 7 s: the socket stays open past 5 s, a frame
    // comes about every second, each a newer sample.
    let out = peer("metrics_ws.py", daemon.addr, &pki, &["ping", "", "7"]).await;
    assert_eq!(out["status"], 101, "{out}");
    assert_eq!(out["subprotocol"], "csrf.t0ken");
    assert_eq!(out["closed"], Value::Null, "closed although pinged: {out}");
    assert!(u(&out["pongs"]) >= 6, "{out}");
    let frames = out["frames"].as_array().unwrap();
    assert!(
        (5..=9).contains(&frames.len()),
        "{} frames: {out}",
        frames.len()
    );
    assert!(
        f(&frames[0]["at"]) < 0.5,
        "the first frame comes at once: {out}"
    );
    let stamps: Vec<u64> = frames
        .iter()
        .map(|fr| {
            u(&serde_json::from_str::<Value>(fr["text"].as_str().unwrap()).unwrap()["timestamp"])
        })
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    let texts: Vec<&str> = frames
        .iter()
        .map(|fr| fr["text"].as_str().unwrap())
        .collect();
    assert!(
        texts.windows(2).all(|w| w[0] != w[1]),
        "identical frames sent"
    );

    // A chart with `interval=2s`: the 1h chart has no new point for 36 s, so after the first
    // frame nothing is sent although the socket ticks every 2 s.
    let out = peer(
        "metrics_ws.py",
        daemon.addr,
        &pki,
        &["ping", "period=1h&aggregate=disk_usage&interval=2s", "5"],
    )
    .await;
    let frames = out["frames"].as_array().unwrap();
    assert_eq!(frames.len(), 1, "{out}");
    let chart: Value = serde_json::from_str(frames[0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(
        chart["data"],
        json!(expected_rows(&period_samples(2), "disk_usage"))
    );
    daemon.stop().await;
}

#[tokio::test]
async fn websocket_without_ping_is_closed_after_5s() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let out = peer("metrics_ws.py", daemon.addr, &pki, &["silent", "", "9"]).await;
    assert_eq!(out["status"], 101, "{out}");
    let closed = &out["closed"];
    assert!(closed.is_object(), "still open after 9 s: {out}");
    let at = f(&closed["at"]);
    assert!((4.8..=6.5).contains(&at), "closed after {at} s");
    assert_eq!(closed["code"], 1000);
    daemon.stop().await;
}

#[tokio::test]
async fn websocket_with_bad_values_is_refused() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start(&pki).await;
    let out = peer(
        "metrics_ws.py",
        daemon.addr,
        &pki,
        &["silent", "period=2h&aggregate=cpu_average", "3"],
    )
    .await;
    assert_eq!(out["status"], 400, "{out}");
    let body: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["message"], "bad request");
    daemon.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The history file.

#[tokio::test]
async fn a_restart_keeps_the_history() {
    let pki = TestPki::new();
    let state = tempfile::tempdir().unwrap();
    let table = metrics_table(&state_dir_line(state.path()));
    let client = pki.client();

    // First run: long enough for the 5m period's first point (3 s after start).
    let daemon = TestDaemon::start_with(&pki, &table).await;
    let chart_path = format!("{PATH}?period=5m&aggregate=memory_usage");
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let chart = get_json(&client, daemon.addr, &chart_path).await;
        if u(&chart["total"]) > 0 {
            break chart;
        }
        assert!(Instant::now() < deadline, "no 5m point within 10 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    daemon.stop().await;

    // Saved at shutdown, atomically: the file and nothing else.
    let names: Vec<String> = std::fs::read_dir(state.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["system_info.json"]);
    let file: Value =
        serde_json::from_slice(&std::fs::read(state.path().join("system_info.json")).unwrap())
            .unwrap();
    for (period, interval) in PERIODS.iter().zip([3u64, 9, 36, 864, 25_920]) {
        assert_eq!(
            u(&file["entries"][period]["interval"]),
            interval * 1_000_000_000
        );
    }
    assert!(
        !file["entries"]["5m"]["entries"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Second run: the points are back at once.
    let daemon = TestDaemon::start_with(&pki, &table).await;
    let after = get_json(&client, daemon.addr, &chart_path).await;
    let first = &before["data"][0];
    assert_eq!(&after["data"][0], first, "{before} / {after}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_damaged_history_file_is_logged_and_replaced() {
    let pki = TestPki::new();
    let state = tempfile::tempdir().unwrap();
    write_history(state.path());
    let file = state.path().join("system_info.json");
    let whole = std::fs::read(&file).unwrap();
    std::fs::write(&file, &whole[..whole.len() / 2]).unwrap();

    let config = pki.dir.path().join("agent.toml");
    let text = TestDaemon::config_text(&pki, "") + &metrics_table(&state_dir_line(state.path()));
    std::fs::write(&config, text).unwrap();
    let mut agent = Running::start(&config);
    let line = agent
        .wait_for(&["metrics: the history file is damaged"])
        .await;
    assert!(line.contains("WARN"), "{line}");
    let listening = agent.wait_for(&["agent listening"]).await;
    let addr: SocketAddr = field(&listening, "tcp").parse().unwrap();

    let client = pki.client();
    first_sample(&client, addr).await;
    let chart = get_json(
        &client,
        addr,
        &format!("{PATH}?period=1d&aggregate=cpu_average"),
    )
    .await;
    assert_eq!(chart, json!({"total": 0, "data": []}));

    // SIGTERM: the history is saved, whole.
    let pid = agent.child.id().unwrap().to_string();
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(&pid)
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), agent.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
    let saved: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved["entries"].as_object().unwrap().len(), 5);

    // A missing folder is created; an empty file is as good as none.
    std::fs::write(&file, b"").unwrap();
    let daemon = TestDaemon::start_with(&pki, &metrics_table(&state_dir_line(state.path()))).await;
    first_sample(&client, daemon.addr).await;
    daemon.stop().await;
    let saved: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert!(saved["entries"].is_object());
}
