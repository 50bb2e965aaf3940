//! The `godoxy-agent` command: run the daemon, make certificates, check a configuration.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use godoxy_agent::config::{Config, DEFAULT_CONFIG_PATH, PemSource};
use godoxy_agent::{Daemon, certs};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "godoxy-agent",
    version,
    about = "GoDoxy agent: mTLS TCP and DTLS UDP tunnels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent daemon.
    Run {
        /// Configuration file [default: /etc/godoxy-agent/config.toml when it exists,
        /// otherwise built-in defaults]. Environment variables override it.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Certificate tools.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Validate the configuration and print the effective settings.
    CheckConfig {
        /// Configuration file [default: as for `run`].
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA, server and client certificate set (GoDoxy's profile) and godoxy.env.
    Init {
        /// Output folder.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Run { config } => run(config.as_deref()),
        Command::Certs {
            command: CertsCommand::Init { out, force },
        } => certs_init(&out, force),
        Command::CheckConfig { config } => check_config(config.as_deref()),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// The explicit path, else the default path when that file exists, else none (defaults).
fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(path) => Some(path.to_owned()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
    }
}

fn load_config(explicit: Option<&Path>) -> Result<Config, ExitCode> {
    let path = config_path(explicit);
    match Config::load(path.as_deref()) {
        Ok(config) => Ok(config),
        Err(errors) => {
            eprintln!("godoxy-agent: invalid configuration:");
            for err in &errors.0 {
                eprintln!("  {}", err.to_string().replace('\n', "\n  "));
            }
            Err(ExitCode::FAILURE)
        }
    }
}

fn run(explicit: Option<&Path>) -> ExitCode {
    let config = match load_config(explicit) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for warning in &config.warnings {
        warn!("{warning}");
    }
    for notice in &config.notices {
        info!("{notice}");
    }
    match certs::generate_if_missing(&config.tls) {
        Ok(Some(set)) => print_trial_help(&config, &set.dir),
        Ok(None) => {}
        Err(err) => {
            error!("{err:#}");
            return ExitCode::FAILURE;
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            error!("starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let daemon = Daemon::bind(config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone()));
        notify_systemd(&daemon);
        daemon.run(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
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
    info!(signal = name, "shutdown requested");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
}

/// Tells systemd (Type=notify) that both listeners are bound, and keeps its watchdog fed from
/// the runtime itself: a wedged runtime stops the pings and systemd restarts the agent.
/// Outside systemd (no NOTIFY_SOCKET) these calls do nothing.
fn notify_systemd(daemon: &Daemon) {
    let status = format!(
        "listening on {} (tcp), {} (udp)",
        daemon.tcp_addr(),
        daemon
            .udp_addr()
            .map_or_else(|| "disabled".to_owned(), |a| a.to_string())
    );
    if let Err(err) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]) {
        warn!("telling systemd we are ready: {err}");
    }
    if let Some(period) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
}

fn print_trial_help(config: &Config, dir: &Path) {
    let port = config.listen.tcp.port();
    let d = dir.display();
    info!(dir = %d, "generated a CA, server and client certificate set for a local trial");
    eprintln!(
        "\nNew certificates in {d}\n\
         \x20 client certificate: {d}/client.pem  key: {d}/client.key  CA: {d}/ca.pem\n\
         \x20 GoDoxy env (AGENT_CA_CERT, AGENT_SSL_CERT): {d}/godoxy.env\n\
         Try it:\n\
         \x20 curl --cacert {d}/ca.pem --cert {d}/client.pem --key {d}/client.key \\\n\
         \x20      --resolve godoxy.agent:{port}:127.0.0.1 https://godoxy.agent:{port}/godoxy/agent/info\n"
    );
}

fn certs_init(out: &Path, force: bool) -> ExitCode {
    let result = certs::CertSet::generate().and_then(|set| set.write(out, force));
    match result {
        Ok(files) => {
            for file in files {
                println!("wrote {}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("godoxy-agent: certs init: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(explicit: Option<&Path>) -> ExitCode {
    let config = match load_config(explicit) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut problems = Vec::new();
    let will_generate = config.tls.generate_if_missing
        && [&config.tls.ca, &config.tls.cert, &config.tls.key]
            .iter()
            .all(|s| matches!(s, PemSource::File(p) if !p.exists()));
    if !will_generate {
        godoxy_agent::tls::install_default_provider();
        match godoxy_agent::tls::TlsMaterial::load(&config.tls)
            .and_then(|m| m.server_config(config.tls.require_client_cert))
        {
            Ok(_) => {}
            Err(err) => problems.push(format!("{err:#}")),
        }
    }
    if !problems.is_empty() {
        eprintln!("godoxy-agent: invalid configuration:");
        for p in problems {
            eprintln!("  {p}");
        }
        return ExitCode::FAILURE;
    }
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    match toml::to_string_pretty(&config) {
        Ok(text) => {
            println!("# effective configuration (file, then environment overrides)");
            println!(
                "# \"<from $VAR, elided>\" marks certificates and keys taken from the environment"
            );
            print!("{text}");
            if will_generate {
                println!(
                    "# tls files are missing and will be generated at start (generate_if_missing)"
                );
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("godoxy-agent: printing the configuration: {err}");
            ExitCode::FAILURE
        }
    }
}
