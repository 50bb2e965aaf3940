//! Host metrics for GoDoxy's dashboard: a sampler task reads the host once an interval
//! (`collect`), keeps the latest sample and GoDoxy's five-period history (`history`), and
//! writes the history to the state folder every 5 minutes and at shutdown, atomically.
//! `http/system_info.rs` serves it.

mod collect;
mod history;
mod sample;

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use self::collect::{Collector, Parts};
pub(crate) use self::history::{Aggregate, Period};
use self::history::{Chart, History};
use self::sample::Sample;
use crate::config::MetricsConfig;

/// The history file's name in the state folder (GoDoxy's name too).
const FILE_NAME: &str = "system_info.json";
/// How often the history is written (GoDoxy's save interval).
const SAVE_EVERY: Duration = Duration::from_secs(5 * 60);
/// The first sample's CPU window (GoDoxy measures CPU over 500 ms in each poll).
const FIRST_WINDOW: Duration = Duration::from_millis(500);
/// A history file larger than this is not ours (500 samples of a busy host are ~1 MiB).
const MAX_FILE: u64 = 64 << 20;
/// WebSocket sessions open at once at most (the dashboard opens nine per agent and viewer).
const MAX_SESSIONS: usize = 256;
/// How long open WebSocket sessions get to send their close frame at shutdown.
const SESSIONS_CLOSE: Duration = Duration::from_secs(2);

/// The shared handle: cheap to clone.
#[derive(Clone)]
pub(crate) struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    enabled: bool,
    interval: Duration,
    parts: Parts,
    /// The history file, when there is a state folder.
    file: Option<PathBuf>,
    /// The latest sample as JSON, rendered once per sample.
    latest: RwLock<Option<Bytes>>,
    history: Mutex<History>,
    /// Fired at shutdown: WebSocket sessions close.
    stop: CancellationToken,
    sessions: TaskTracker,
    slots: Arc<Semaphore>,
}

impl Metrics {
    /// Reads the history file, if any (a missing or unreadable one is logged and ignored), and
    /// checks that the state folder can be written. Samples start with [`Metrics::run`].
    pub(crate) fn new(config: &MetricsConfig) -> Self {
        let now = Instant::now();
        let file = config
            .state_dir
            .as_ref()
            .filter(|_| config.enabled)
            .map(|dir| dir.join(FILE_NAME));
        let history = match &file {
            Some(file) => {
                check_writable(file);
                load(file, now)
            }
            None => {
                if config.enabled {
                    info!(
                        "metrics: no state folder ([metrics] state_dir, or systemd's \
                         StateDirectory=); the dashboard's history starts afresh at each restart"
                    );
                }
                History::new(now)
            }
        };
        Self {
            inner: Arc::new(Inner {
                enabled: config.enabled,
                interval: config.interval,
                parts: Parts {
                    cpu: config.cpu,
                    memory: config.memory,
                    disk: config.disk,
                    network: config.network,
                    sensors: config.sensors,
                },
                file,
                latest: RwLock::new(None),
                history: Mutex::new(history),
                stop: CancellationToken::new(),
                sessions: TaskTracker::new(),
                slots: Arc::new(Semaphore::new(MAX_SESSIONS)),
            }),
        }
    }

    /// The latest sample as JSON; `None` before the first. With metrics off, a sample holding
    /// only the time (as GoDoxy's agent answers with every part disabled).
    pub(crate) fn latest(&self) -> Option<Bytes> {
        if !self.inner.enabled {
            let empty = Sample::empty(collect::unix_now());
            return serde_json::to_vec(&empty).ok().map(Bytes::from);
        }
        self.inner
            .latest
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A chart of one period: `{"data":[...],"total":N}`.
    pub(crate) fn chart(&self, period: Period, aggregate: Aggregate) -> Bytes {
        let rows = {
            let history = self
                .inner
                .history
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            aggregate.rows(history.points(period))
        };
        match serde_json::to_vec(&Chart::new(rows)) {
            Ok(json) => Bytes::from(json),
            Err(err) => {
                error!("metrics: rendering a chart: {err}");
                Bytes::from_static(br#"{"data":[],"total":0}"#)
            }
        }
    }

    /// A place for one more WebSocket session, or `None` when all are taken.
    pub(crate) fn session_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.inner.slots.clone().try_acquire_owned().ok()
    }

    /// Runs a WebSocket session; [`Metrics::run`] waits for them at shutdown.
    pub(crate) fn spawn_session(&self, session: impl Future<Output = ()> + Send + 'static) {
        self.inner.sessions.spawn(session);
    }

    /// Fires when the agent shuts down.
    pub(crate) fn stopping(&self) -> CancellationToken {
        self.inner.stop.clone()
    }

    /// Samples until `shutdown`, saving every 5 minutes; then saves once more and closes the
    /// WebSocket sessions.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        if self.inner.enabled {
            self.sample_until(&shutdown).await;
            self.save().await;
        } else {
            shutdown.cancelled().await;
        }
        self.inner.stop.cancel();
        self.inner.sessions.close();
        if tokio::time::timeout(SESSIONS_CLOSE, self.inner.sessions.wait())
            .await
            .is_err()
        {
            debug!("metrics: WebSocket sessions still closing");
        }
    }

    async fn sample_until(&self, shutdown: &CancellationToken) {
        let parts = self.inner.parts;
        let Some(Ok(collector)) = shutdown
            .run_until_cancelled(tokio::task::spawn_blocking(move || Collector::new(parts)))
            .await
        else {
            return;
        };
        let mut collector = Some(collector);
        let first = FIRST_WINDOW.min(self.inner.interval);
        if shutdown
            .run_until_cancelled(tokio::time::sleep(first))
            .await
            .is_none()
        {
            return;
        }
        info!(interval = ?self.inner.interval, parts = %parts.names(), "metrics: sampling");
        let mut ticks = tokio::time::interval(self.inner.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut saves =
            tokio::time::interval_at(tokio::time::Instant::now() + SAVE_EVERY, SAVE_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = saves.tick() => self.save().await,
                _ = ticks.tick() => {
                    let Some(mut current) = collector.take() else { return };
                    // Blocking reads (statvfs of a network filesystem can hang) stay off the
                    // async workers.
                    let job = tokio::task::spawn_blocking(move || {
                        let sample = current.sample();
                        (current, sample)
                    });
                    match shutdown.run_until_cancelled(job).await {
                        None => return,
                        Some(Ok((back, sample))) => {
                            collector = Some(back);
                            self.publish(sample);
                        }
                        Some(Err(err)) => {
                            error!("metrics: the sampler failed and stops: {err}");
                            return;
                        }
                    }
                }
            }
        }
    }

    fn publish(&self, sample: Sample) {
        let json = match serde_json::to_vec(&sample) {
            Ok(json) => Bytes::from(json),
            Err(err) => {
                error!("metrics: rendering a sample: {err}");
                return;
            }
        };
        let sample = Arc::new(sample);
        self.inner
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(Instant::now(), &sample);
        *self
            .inner
            .latest
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(json);
    }

    /// Writes the history file, if there is a state folder; failures are logged.
    async fn save(&self) {
        let Some(file) = self.inner.file.clone() else {
            return;
        };
        let (snapshot, points) = {
            let history = self
                .inner
                .history
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            (history.snapshot(), history.len())
        };
        let written = tokio::task::spawn_blocking(move || {
            let bytes = snapshot.to_file().map_err(std::io::Error::other)?;
            write_atomically(&file, &bytes).map(|()| (file, bytes.len()))
        })
        .await;
        match written {
            Ok(Ok((file, bytes))) => {
                debug!(file = %file.display(), points, bytes, "metrics: history saved")
            }
            Ok(Err(err)) => warn!("metrics: saving the history: {err}"),
            Err(err) => warn!("metrics: saving the history: {err}"),
        }
    }
}

/// Reads the history file; a missing, oversized or corrupt one gives an empty history.
fn load(file: &Path, now: Instant) -> History {
    let bytes = std::fs::File::open(file).and_then(|f| {
        let mut bytes = Vec::new();
        f.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
        Ok(bytes)
    });
    let bytes = match bytes {
        Ok(bytes) if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_FILE => {
            warn!(file = %file.display(), "metrics: the history file is larger than {MAX_FILE} bytes; ignoring it");
            return History::new(now);
        }
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            info!(file = %file.display(), "metrics: no history yet; starting empty");
            return History::new(now);
        }
        Err(err) => {
            warn!(file = %file.display(), "metrics: cannot read the history ({err}); starting empty");
            return History::new(now);
        }
    };
    match History::from_file(&bytes, now) {
        Ok(history) => {
            info!(file = %file.display(), points = history.len(), "metrics: history loaded");
            history
        }
        Err(err) => {
            warn!(
                file = %file.display(),
                "metrics: the history file is damaged ({err}); starting empty (the next save \
                 replaces it)"
            );
            History::new(now)
        }
    }
}

/// Warns at start when the history could not be saved, rather than at the first save.
fn check_writable(file: &Path) {
    let probe = temp_path(file, "probe");
    let result = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&probe)
        })
        .and_then(|_| std::fs::remove_file(&probe));
    if let Err(err) = result {
        warn!(
            file = %file.display(),
            "metrics: the state folder is not writable ({err}); the history will not survive \
             a restart (systemd: StateDirectory=; a container: a volume writable by its user)"
        );
    }
}

/// `<dir>/.system_info.json.<pid>.<what>`: unique to this process.
fn temp_path(file: &Path, what: &str) -> PathBuf {
    let name = file
        .file_name()
        .map_or_else(|| FILE_NAME.into(), |n| n.to_string_lossy().into_owned());
    file.with_file_name(format!(".{name}.{}.{what}", std::process::id()))
}

/// Write to a temporary file beside `file`, flush it to disk, rename it over `file`, and
/// flush the folder: a crash leaves the old file or the new one, never half of one.
fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let temp = temp_path(file, "tmp");
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, file));
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
        return result;
    }
    if let Some(dir) = file.parent() {
        // Makes the rename itself durable; not every filesystem allows it.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/system_info.json");
        write_atomically(&file, b"one").unwrap();
        write_atomically(&file, b"two").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        let names: Vec<String> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["system_info.json"]);
    }

    #[test]
    fn damaged_missing_and_oversized_files_give_an_empty_history() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(FILE_NAME);
        assert_eq!(load(&file, Instant::now()).len(), 0);
        std::fs::write(&file, br#"{"entries":{"5m":{"entries":[{"timestamp":1,"#).unwrap();
        assert_eq!(load(&file, Instant::now()).len(), 0);
        std::fs::write(&file, b"\xff\xfe").unwrap();
        assert_eq!(load(&file, Instant::now()).len(), 0);
    }
}
