//! SIGTERM and SIGINT: the first asks for a graceful shutdown, a second one forces the hard
//! stop (open tunnels are closed at once instead of after the grace period). SIGHUP reloads
//! the TLS material.

use godoxy_agent::Reloader;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Cancels `shutdown` on the first SIGTERM/SIGINT and `hard_stop` on the second.
pub async fn watch_with_hard_stop(shutdown: CancellationToken, hard_stop: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(
        signal = name,
        "shutdown requested; a second signal stops at once"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    warn!(signal = name, "second signal: closing open tunnels now");
    hard_stop.cancel();
}

/// Cancels `shutdown` on the first SIGTERM/SIGINT; a second one exits the process at once
/// (for commands that have no grace period of their own).
pub async fn watch(shutdown: CancellationToken) {
    let hard_stop = CancellationToken::new();
    tokio::spawn(watch_with_hard_stop(shutdown, hard_stop.clone()));
    hard_stop.cancelled().await;
    std::process::exit(130);
}

/// Reloads the TLS material on each SIGHUP (`systemctl reload`), for the process's life.
pub async fn watch_reload(reloader: Reloader) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot install the SIGHUP handler; certificates reload only on restart");
        return;
    };
    while hup.recv().await.is_some() {
        info!(signal = "SIGHUP", "reloading the TLS material");
        // Reading files and building configurations: off the async workers.
        let reloader = reloader.clone();
        let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
    }
}
