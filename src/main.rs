//! The `godoxy-agent` command: run the daemon, make certificates, check a configuration; the
//! client commands live in `cli::client`, signal handling in `cli::signals`.

mod cli;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cli::client::{CertArgs, client_command, coded_command};
use godoxy_agent::config::{
    Config, DEFAULT_CONFIG_PATH, Diagnostics, DockerAccess, LogFormat, PemSource,
};
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
    /// Health-probe an agent (TCP and/or UDP); exit 0 when every probe passes.
    Probe {
        /// The agent, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        server: String,
        /// Probe the TCP stream tunnel only.
        #[arg(long, conflicts_with_all = ["udp", "all"])]
        tcp: bool,
        /// Probe the UDP (DTLS) tunnel only.
        #[arg(long, conflicts_with_all = ["tcp", "all"])]
        udp: bool,
        /// Probe both (the default).
        #[arg(long)]
        all: bool,
        /// Deadline for each probe.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        certs: CertArgs,
    },
    /// Health check for the agent's own host or container, needing no client certificate:
    /// each listener must answer a handshake with a certificate from the configured CA.
    /// Reads the same configuration and environment as `run`.
    Health {
        /// Configuration file [default: as for `run`].
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Deadline for each check.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// What a GoDoxy server checks when an agent is added: /info, then TCP and UDP probes.
    Info {
        /// The agent, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        server: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Deadline for each step.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        certs: CertArgs,
    },
    /// Find what stops GoDoxy from using an agent: with --server, run the steps a GoDoxy server
    /// runs (TCP, TLS, certificates both ways, /info and its version, the TCP probe, DTLS and
    /// the UDP probe, the Docker API through the agent); without it, check this host for `run`
    /// (configuration, files, key permissions, Docker socket, ports, systemd or container).
    /// One line per step; the first failure gets a cause and a next step.
    #[command(after_help = cli::doctor::EXIT_CODES)]
    Doctor {
        /// The agent, HOST:PORT, as GoDoxy dials it (remote mode).
        #[arg(long, value_name = "HOST:PORT", conflicts_with = "config")]
        server: Option<String>,
        /// The agent's UDP address when it is not the same as --server.
        #[arg(long, value_name = "HOST:PORT", requires = "server")]
        udp: Option<String>,
        /// The GoDoxy server's release (e.g. v0.31.0): also check the agent's major matches.
        #[arg(long, value_name = "VERSION", requires = "server")]
        godoxy_version: Option<String>,
        /// Local mode: configuration file [default: as for `run`].
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Deadline for each step.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        certs: CertArgs,
    },
    /// Forward a local port through the agent to TARGET (one tunnel per connection; with
    /// --udp, one DTLS session per local client address).
    Forward {
        /// The agent, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        server: String,
        /// Local address to listen on.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// Destination as the agent sees it, HOST:PORT ([v6]:PORT for IPv6).
        #[arg(long, value_name = "HOST:PORT")]
        target: String,
        /// Forward UDP instead of TCP.
        #[arg(long)]
        udp: bool,
        /// UDP: close a local client's session after this much silence.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        idle: Duration,
        /// Handshake deadline.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        certs: CertArgs,
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
        /// The HOST:PORT a GoDoxy server will dial for this agent: also write
        /// `HOST:PORT.zip` (the client half, as GoDoxy reads it) and print how to add the agent.
        #[arg(long, value_name = "HOST:PORT")]
        godoxy_addr: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` reads `[log] format` from its configuration and starts logging once loaded.
    if !matches!(cli.command, Command::Run { .. }) {
        cli::logging::init(LogFormat::Text);
    }
    match cli.command {
        Command::Run { config } => run(config.as_deref()),
        Command::Certs {
            command:
                CertsCommand::Init {
                    out,
                    force,
                    godoxy_addr,
                },
        } => certs_init(&out, force, godoxy_addr.as_deref()),
        Command::CheckConfig { config } => check_config(config.as_deref()),
        Command::Probe {
            server,
            tcp,
            udp,
            all: _,
            timeout,
            certs,
        } => {
            let (tcp, udp) = if tcp || udp { (tcp, udp) } else { (true, true) };
            client_command(cli::client::probe(server, tcp, udp, timeout, certs))
        }
        Command::Info {
            server,
            json,
            timeout,
            certs,
        } => client_command(cli::client::info(server, json, timeout, certs)),
        Command::Health { config, timeout } => match load_config(config.as_deref()) {
            Ok((config, _)) => client_command(cli::client::health(config, timeout)),
            Err(code) => code,
        },
        Command::Doctor {
            server: Some(server),
            udp,
            godoxy_version,
            config: _,
            timeout,
            certs,
        } => coded_command(cli::doctor::remote(
            server,
            udp,
            godoxy_version,
            timeout,
            certs,
        )),
        Command::Doctor {
            server: None,
            config,
            timeout,
            ..
        } => coded_command(cli::doctor::local(config_path(config.as_deref()), timeout)),
        Command::Forward {
            server,
            listen,
            target,
            udp,
            idle,
            timeout,
            certs,
        } => client_command(cli::client::forward(
            server, listen, target, udp, idle, timeout, certs,
        )),
    }
}

/// The explicit path, else the default path when that file exists, else none (defaults).
fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(path) => Some(path.to_owned()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
    }
}

fn load_config(explicit: Option<&Path>) -> Result<(Config, Diagnostics), ExitCode> {
    let path = config_path(explicit);
    match Config::load(path.as_deref()) {
        Ok(loaded) => Ok(loaded),
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
    let (config, diagnostics) = match load_config(explicit) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    cli::logging::init(config.log.format);
    for warning in &diagnostics.warnings {
        warn!("{warning}");
    }
    for notice in &diagnostics.notices {
        info!("{notice}");
    }
    raise_fd_limit(&config);
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
        let (shutdown, hard_stop) = (CancellationToken::new(), CancellationToken::new());
        tokio::spawn(cli::signals::watch_with_hard_stop(
            shutdown.clone(),
            hard_stop.clone(),
        ));
        tokio::spawn(cli::signals::watch_reload(daemon.reloader()));
        notify_systemd(&daemon);
        daemon.run_with_hard_stop(shutdown, hard_stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Each TCP tunnel takes two descriptors and each UDP session one (its destination socket;
/// the DTLS socket is shared): raise the soft open-file limit (often 1024) toward what the
/// configured caps need, within the hard limit.
fn raise_fd_limit(config: &Config) {
    let needed = 2 * config.stream.max_connections.get() as u64
        + config.stream.max_tls_handshakes.get() as u64
        + config.stream.max_udp_sessions.get() as u64
        + 64;
    match rlimit::increase_nofile_limit(needed) {
        Ok(got) if got < needed => warn!(
            limit = got,
            needed,
            "the open-file limit is below what max_connections, max_tls_handshakes and \
             max_udp_sessions need; \
             beyond it connections fail to be accepted (raise LimitNOFILE / ulimit -n)"
        ),
        Ok(_) => {}
        Err(err) => warn!("raising the open-file limit: {err}"),
    }
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
    let me = std::env::current_exe()
        .map_or_else(|_| "godoxy-agent".to_owned(), |p| p.display().to_string());
    info!(dir = %d, "generated a CA, server and client certificate set for a local trial");
    eprintln!(
        "\nNew certificates in {d}\n\
         \x20 client certificate: {d}/client.pem  key: {d}/client.key  CA: {d}/ca.pem\n\
         \x20 GoDoxy env (AGENT_CA_CERT, AGENT_SSL_CERT): {d}/godoxy.env\n\
         Try it, in another shell:\n\
         \x20 # what a GoDoxy server checks: /info, then a TCP and a UDP probe\n\
         \x20 {me} info --server 127.0.0.1:{port} --certs {d}\n\
         \x20 # a tunnel: local port 18890 -> the agent -> 127.0.0.1:22 (any TCP service here)\n\
         \x20 {me} forward --server 127.0.0.1:{port} --certs {d} --listen 127.0.0.1:18890 --target 127.0.0.1:22\n\
         \x20 # the HTTP API with curl\n\
         \x20 curl --cacert {d}/ca.pem --cert {d}/client.pem --key {d}/client.key \\\n\
         \x20      --resolve godoxy.agent:{port}:127.0.0.1 https://godoxy.agent:{port}/godoxy/agent/info\n"
    );
}

fn certs_init(out: &Path, force: bool, godoxy_addr: Option<&str>) -> ExitCode {
    let result = certs::CertSet::generate().and_then(|set| {
        let mut files = set.write(out, force)?;
        if let Some(addr) = godoxy_addr {
            files.push(set.write_godoxy_zip(out, addr, force)?);
        }
        Ok(files)
    });
    let files = match result {
        Ok(files) => files,
        Err(err) => {
            eprintln!("godoxy-agent: certs init: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    for file in &files {
        println!("wrote {}", file.display());
    }
    if let Some(addr) = godoxy_addr {
        let d = out.display();
        println!(
            "\nOn this agent's host: run the agent with {d}/godoxy.env (or point tls.ca, \
             tls.cert, tls.key at {d}/ca.pem, server.pem, server.key).\n\
             On the GoDoxy server:\n\
             \x20 1. copy {d}/{addr}.zip into GoDoxy's certs/ folder (beside config/; /app/certs \
             in its container), keeping the name;\n\
             \x20 2. add the agent to config/config.yml and restart (or reload) GoDoxy:\n\
             \x20      providers:\n\
             \x20        agents:\n\
             \x20          - {addr}\n\
             If GoDoxy does not add it: `godoxy-agent doctor --server {addr} --certs {d}` \
             names the failing step (and `godoxy-agent doctor` on the agent's host).\n\
             Keep {d}/ca.key off both hosts' shared places: whoever holds it can issue client \
             certificates."
        );
    }
    ExitCode::SUCCESS
}

fn check_config(explicit: Option<&Path>) -> ExitCode {
    let (config, diagnostics) = match load_config(explicit) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let mut problems = Vec::new();
    let will_generate = config.tls.generate_if_missing
        && [&config.tls.ca, &config.tls.cert, &config.tls.key]
            .iter()
            .all(|s| matches!(s, PemSource::File(p) if !p.exists()));
    if !will_generate && let Err(err) = Daemon::check_tls(&config) {
        problems.push(format!("{err:#}"));
    }
    if !problems.is_empty() {
        eprintln!("godoxy-agent: invalid configuration:");
        for p in problems {
            eprintln!("  {p}");
        }
        return ExitCode::FAILURE;
    }
    for warning in &diagnostics.warnings {
        eprintln!("warning: {warning}");
    }
    let docker = &config.docker;
    if docker.access != DockerAccess::Off {
        let probe = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(Daemon::probe_docker(&config)));
        match probe {
            Ok(engine) => eprintln!(
                "docker: {} answers: {engine} (access = {})",
                docker.socket.display(),
                docker.access.as_str()
            ),
            Err(err) => eprintln!(
                "warning: docker: {err}; Docker API calls will answer 502 until the engine is \
                 reachable (docker.socket / DOCKER_SOCKET, and the agent's access to the socket)"
            ),
        }
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
