//! The TOML file and GoDoxy's environment variables, merged into one validated [`Config`].

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Where `godoxy-agent run` looks for its configuration when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/godoxy-agent/config.toml";

/// The default port of both listeners (GoDoxy's agent port).
pub const DEFAULT_PORT: u16 = 8890;

/// The whole effective configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Reported by `/godoxy/agent/name` and `/info`.
    pub name: String,
    /// Reported by `/godoxy/agent/runtime`.
    pub runtime: Runtime,
    /// Listening sockets.
    pub listen: Listen,
    /// Certificates and client authentication.
    pub tls: TlsConfig,
    /// Tunnel timeouts and limits.
    pub stream: StreamConfig,
    /// The GoDoxy release whose agent API this agent answers as, reported by `/info`.
    pub godoxy_version: GodoxyVersion,
    /// The HTTP side of the TLS port.
    pub http: HttpConfig,
    /// The Docker Engine API relay.
    pub docker: DockerConfig,
    /// Host metrics for GoDoxy's dashboard (`/godoxy/agent/system_info`).
    pub metrics: MetricsConfig,
    /// Which destinations the agent dials for a client.
    pub policy: PolicyConfig,
    /// Prometheus/OpenMetrics exposition of the agent's own counters.
    pub prometheus: PrometheusConfig,
    /// Log output.
    pub log: LogConfig,
}

/// A GoDoxy release string, `vMAJOR.MINOR.PATCH` with an optional `-suffix`: what a GoDoxy
/// server parses from `/info` to pick the agent API it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct GodoxyVersion {
    text: String,
}

impl GodoxyVersion {
    /// The release whose agent API this agent implements.
    pub const DEFAULT: &'static str = "v0.31.0";
    /// GoDoxy servers use their legacy proxy headers with agents at or below this release.
    const LEGACY_AT_OR_BELOW: (u64, u64, u64) = (0, 18, 6);

    /// Checks the form GoDoxy's server accepts and that it is newer than the legacy API.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{text}` is not a GoDoxy release like {} (vMAJOR.MINOR.PATCH)",
                Self::DEFAULT
            )
        };
        let rest = text.strip_prefix('v').ok_or_else(bad)?;
        let (numbers, suffix) = match rest.split_once('-') {
            Some((numbers, suffix)) => (numbers, Some(suffix)),
            None => (rest, None),
        };
        if suffix.is_some_and(|s| {
            s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        }) {
            return Err(bad());
        }
        let mut parts = numbers.split('.').map(|p| {
            (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u64>().ok())
                .flatten()
        });
        let (Some(Some(major)), Some(Some(minor)), Some(Some(patch)), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if (major, minor, patch) <= Self::LEGACY_AT_OR_BELOW {
            return Err(format!(
                "`{text}` is not newer than v0.18.6: GoDoxy would use its legacy agent API"
            ));
        }
        Ok(Self {
            text: text.to_owned(),
        })
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Default for GodoxyVersion {
    fn default() -> Self {
        Self {
            text: Self::DEFAULT.to_owned(),
        }
    }
}

impl From<GodoxyVersion> for String {
    fn from(version: GodoxyVersion) -> Self {
        version.text
    }
}

impl<'de> Deserialize<'de> for GodoxyVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `[http]`: connections that carry the HTTP API and the Docker relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Time a client has to send a request's headers once it has started one.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// An idle keep-alive connection (no request in flight) is closed after this long.
    /// GoDoxy keeps idle connections and reuses them: keep it long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// `[docker]`: the Docker Engine API relayed from the TLS port to a local socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// The Docker-compatible engine's unix socket.
    pub socket: PathBuf,
    /// Which calls are relayed.
    pub access: DockerAccess,
    /// Time the engine has to start answering a call (a stream, once started, has no limit).
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/var/run/docker.sock"),
            access: DockerAccess::Godoxy,
            response_timeout: Duration::from_secs(60),
        }
    }
}

/// `[policy]`: the destinations the agent dials for a client (TCP and UDP tunnels,
/// `/proxy/http`, `/health`). Every address a name resolves to is judged; only allowed
/// addresses are dialed. Entries are checked when the file loads (`crate::policy` has the
/// grammar); `config/godoxy-agent.toml` documents them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Destinations allowed (addresses, CIDRs, host names, `@host-addresses`,
    /// `@host-networks`, `*`, each optionally `:PORTS`); empty = the defaults: loopback, the
    /// private ranges, this host's addresses and the networks on its interfaces.
    pub allow: Vec<String>,
    /// Destinations refused, on top of the built-in refusals; deny wins over allow.
    pub deny: Vec<String>,
    /// The built-in refusals: link-local ranges and cloud metadata endpoints (169.254.0.0/16,
    /// fe80::/10, fd00:ec2::254, 100.100.100.200). The unspecified addresses (0.0.0.0, ::)
    /// are refused whatever this says.
    pub deny_link_local: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            deny_link_local: true,
        }
    }
}

/// `[metrics]`: the sampler behind `/godoxy/agent/system_info`, GoDoxy's dashboard figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Sample the host at all. Off, the endpoint answers with a timestamp and no figures, as
    /// GoDoxy's agent does with every part disabled, and no history is kept.
    pub enabled: bool,
    /// Time between two samples (GoDoxy: 1s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Folder of the history file, `system_info.json`, written every 5 minutes and at
    /// shutdown. `""` (the default): systemd's `$STATE_DIRECTORY` when set, else the history
    /// is kept in memory only.
    #[serde(with = "optional_path")]
    pub state_dir: Option<PathBuf>,
    /// CPU usage (`cpu_average`).
    pub cpu: bool,
    /// Memory (`memory`).
    pub memory: bool,
    /// Filesystem usage and disk I/O (`disks`, `disks_io`).
    pub disk: bool,
    /// Network byte counters and speeds (`network`).
    pub network: bool,
    /// Temperature sensors (`sensors`).
    pub sensors: bool,
}

impl MetricsConfig {
    /// The shortest and longest `interval`.
    pub const INTERVAL_RANGE: (Duration, Duration) =
        (Duration::from_secs(1), Duration::from_secs(60));
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(1),
            state_dir: None,
            cpu: true,
            memory: true,
            disk: true,
            network: true,
            sensors: true,
        }
    }
}

/// `[prometheus]`: the agent's own counters (tunnels, bytes, handshakes, HTTP requests,
/// certificate expiry) in the OpenMetrics text format. Named apart from `[metrics]`, which is
/// the host sampler behind GoDoxy's dashboard: the two serve different readers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrometheusConfig {
    /// A plain-HTTP listener serving `/metrics`, e.g. `127.0.0.1:9108`; `""` (the default):
    /// none. No TLS and no authentication: bind it to loopback or a scrape-only network.
    #[serde(with = "optional_addr")]
    pub listen: Option<SocketAddr>,
    /// Also serve `/metrics` on the mTLS port, to scrapers holding a client certificate.
    pub mtls: bool,
}

/// `[log]`: how log lines are written (the level comes from `RUST_LOG`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (the default) or `json` (one object per line; docs/LOGS.md has the fields).
    pub format: LogFormat,
}

/// The form of a log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `key=value` fields after the message, for people and the journal.
    #[default]
    Text,
    /// One JSON object per line, for log shippers and audit trails.
    Json,
}

/// Picks one of the part switches of [`MetricsConfig`].
type MetricsPart = fn(&mut MetricsConfig) -> &mut bool;

/// GoDoxy's switches for the parts of a sample, each `true` turning one off.
const METRICS_DISABLE_VARS: [(&str, MetricsPart); 5] = [
    ("METRICS_DISABLE_CPU", |m| &mut m.cpu),
    ("METRICS_DISABLE_MEMORY", |m| &mut m.memory),
    ("METRICS_DISABLE_DISK", |m| &mut m.disk),
    ("METRICS_DISABLE_NETWORK", |m| &mut m.network),
    ("METRICS_DISABLE_SENSORS", |m| &mut m.sensors),
];

/// Which Docker Engine API calls the agent relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DockerAccess {
    /// Exactly the calls a GoDoxy server makes (discovery, events, health, idle-sleep, WebUI).
    Godoxy,
    /// Any GET or HEAD.
    ReadOnly,
    /// Everything: whoever holds a client certificate is root on this host.
    Full,
    /// Nothing.
    Off,
}

impl DockerAccess {
    /// As written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Godoxy => "godoxy",
            Self::ReadOnly => "read-only",
            Self::Full => "full",
            Self::Off => "off",
        }
    }
}

/// What the operator should hear about how a configuration was put together, returned beside
/// it by every loader.
#[derive(Debug, Default)]
pub struct Diagnostics {
    /// Worth a warning: weakened security, key material that should not be here.
    pub warnings: Vec<String>,
    /// Worth one info line: GoDoxy variables that were set but mean nothing here.
    pub notices: Vec<String>,
}

/// A checked non-zero constant: a zero fails the build, not the daemon.
const fn non_zero(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => panic!("a limit constant is zero"),
    }
}

/// Container runtime reported to the GoDoxy server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// Docker (the default).
    Docker,
    /// Podman.
    Podman,
}

impl Runtime {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
        }
    }
}

/// `[listen]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// The TLS port (ALPN mux between the stream tunnel and the HTTP API).
    pub tcp: SocketAddr,
    /// The DTLS port; `""` disables UDP tunnels.
    #[serde(with = "optional_addr")]
    pub udp: Option<SocketAddr>,
}

impl Default for Listen {
    /// Dual-stack: `[::]` takes IPv4 too (the daemon binds it with IPv6-only off, and falls
    /// back to 0.0.0.0 on a host without IPv6).
    fn default() -> Self {
        let any = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, DEFAULT_PORT));
        Self {
            tcp: any,
            udp: Some(any),
        }
    }
}

/// `[tls]`, after environment overrides.
#[derive(Debug, Clone, Serialize)]
pub struct TlsConfig {
    /// The CA that client certificates must chain to.
    pub ca: PemSource,
    /// The server certificate (chain).
    pub cert: PemSource,
    /// The server private key (SEC1 or PKCS#8 PEM).
    pub key: PemSource,
    /// Refuse clients without a certificate from `ca`. Off only with a loud warning.
    pub require_client_cert: bool,
    /// Create a fresh CA, server and client set when the files are missing (local trials).
    pub generate_if_missing: bool,
    /// Client identities allowed (`cn:NAME`, `san:NAME`, `sha256:HEX`); empty = any
    /// certificate from `ca`.
    pub allow_clients: Vec<String>,
    /// A PEM or DER certificate revocation list from the CA; `None` = no revocation check.
    #[serde(serialize_with = "optional_path::serialize")]
    pub crl: Option<PathBuf>,
    /// Warn this long before the server or CA certificate expires (and daily after); 0 = never.
    #[serde(with = "humantime_serde")]
    pub expiry_warning: Duration,
}

/// Where a piece of PEM comes from.
#[derive(Clone, Serialize)]
#[serde(untagged)]
pub enum PemSource {
    /// A file on disk.
    File(PathBuf),
    /// Decoded from an environment variable; the bytes are never printed.
    #[serde(serialize_with = "serialize_env_pem")]
    Env {
        /// The variable it came from.
        var: &'static str,
        /// PEM text.
        pem: Vec<u8>,
    },
}

impl fmt::Debug for PemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Env { var, .. } => write!(f, "Env({var}, MASKED)"),
        }
    }
}

impl fmt::Display for PemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Env { var, .. } => write!(f, "${var}"),
        }
    }
}

fn serialize_env_pem<S: serde::Serializer>(
    var: &&'static str,
    _pem: &[u8],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("<from ${var}, elided>"))
}

/// `[stream]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Time a client has to finish the TLS or DTLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time a client has, after the handshake, to send the 275-byte header.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time allowed to resolve and connect to a tunnel destination.
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// A UDP session with no datagram either way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub udp_idle_timeout: Duration,
    /// Open UDP sessions at most; new handshakes beyond it are refused.
    pub max_udp_sessions: NonZeroUsize,
    /// DTLS handshakes in progress at most; when full, the oldest is abandoned for a new one.
    pub max_udp_handshakes: NonZeroUsize,
    /// TCP connections in TLS handshake at most; when full, the oldest is abandoned for a new
    /// one.
    pub max_tls_handshakes: NonZeroUsize,
    /// While a handshake pool is more than half full: handshakes in progress from one source
    /// (IPv4 address, IPv6 /64) at most; one more from it is refused at once.
    pub max_handshakes_per_source: NonZeroUsize,
    /// The handshake deadline of a connection or DTLS handshake that arrives while its pool
    /// (`max_tls_handshakes`, `max_udp_handshakes`) is more than half full (`handshake_timeout`
    /// when that is shorter).
    #[serde(with = "humantime_serde")]
    pub busy_handshake_timeout: Duration,
    /// Authenticated TLS connections (tunnels and HTTP) open at most; one more is closed.
    pub max_connections: NonZeroUsize,
    /// On SIGTERM/SIGINT, how long open tunnels may go on before they are closed.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A TCP tunnel with no byte either way for this long is closed; 0 (the default) = never
    /// (GoDoxy routes carry database connections that idle for hours).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(10),
            udp_idle_timeout: Duration::from_secs(120),
            max_udp_sessions: const { non_zero(4096) },
            max_udp_handshakes: const { non_zero(256) },
            max_tls_handshakes: const { non_zero(1024) },
            max_handshakes_per_source: const { non_zero(16) },
            busy_handshake_timeout: Duration::from_secs(2),
            max_connections: const { non_zero(4096) },
            shutdown_grace: Duration::from_secs(10),
            idle_timeout: Duration::ZERO,
        }
    }
}

/// One thing wrong with the configuration, naming where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML does not parse, or a key is unknown or has a bad value (message has the line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message: line, column, the offending key and what was expected.
        message: String,
    },
    /// A value that parsed but breaks a rule.
    #[error("{origin}: `{key}`: {reason}")]
    Invalid {
        /// The file, or "defaults".
        origin: String,
        /// Dotted key, e.g. `stream.header_timeout`.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An environment variable with a bad value.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// Its name.
        var: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Every error found in one load, so an operator fixes them all in one go.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The file as written: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    runtime: Option<Runtime>,
    godoxy_version: GodoxyVersion,
    listen: Listen,
    tls: FileTls,
    stream: StreamConfig,
    http: HttpConfig,
    docker: DockerConfig,
    metrics: MetricsConfig,
    policy: PolicyConfig,
    prometheus: PrometheusConfig,
    log: LogConfig,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FileTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    require_client_cert: bool,
    generate_if_missing: bool,
    allow_clients: Vec<String>,
    #[serde(with = "optional_path")]
    crl: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    expiry_warning: Duration,
}

impl Default for FileTls {
    fn default() -> Self {
        Self {
            ca: PathBuf::from("/etc/godoxy-agent/ca.pem"),
            cert: PathBuf::from("/etc/godoxy-agent/server.pem"),
            key: PathBuf::from("/etc/godoxy-agent/server.key"),
            require_client_cert: true,
            generate_if_missing: false,
            allow_clients: Vec::new(),
            crl: None,
            expiry_warning: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

impl Config {
    /// Loads the file at `path` (or only defaults when `None`) and applies the process
    /// environment.
    pub fn load(path: Option<&Path>) -> Result<(Self, Diagnostics), ConfigErrors> {
        Self::load_with_env(path, |var| std::env::var(var).ok())
    }

    /// As [`Config::load`], reading variables through `env` (tests pass their own).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Self, Diagnostics), ConfigErrors> {
        let (text, origin) = match path {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => (text, Some(path)),
                Err(source) => {
                    return Err(ConfigErrors(vec![ConfigError::Read {
                        path: path.to_owned(),
                        source,
                    }]));
                }
            },
            None => (String::new(), None),
        };
        Self::from_toml(&text, origin, env)
    }

    /// Parses TOML text; relative certificate paths are taken from `origin`'s folder.
    pub fn from_toml(
        text: &str,
        origin: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Self, Diagnostics), ConfigErrors> {
        let origin_name = origin.map_or_else(|| "defaults".to_owned(), |p| p.display().to_string());
        let file: FileConfig = toml::from_str(text).map_err(|err| {
            ConfigErrors(vec![ConfigError::Parse {
                path: origin.map_or_else(|| PathBuf::from("<defaults>"), Path::to_owned),
                message: err.to_string().trim_end().to_owned(),
            }])
        })?;
        let base = origin
            .and_then(Path::parent)
            .map(Path::to_owned)
            .unwrap_or_default();
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        let mut config = Config {
            name: file.name.unwrap_or_else(default_name),
            runtime: file.runtime.unwrap_or(Runtime::Docker),
            listen: file.listen,
            tls: TlsConfig {
                ca: PemSource::File(resolve(file.tls.ca)),
                cert: PemSource::File(resolve(file.tls.cert)),
                key: PemSource::File(resolve(file.tls.key)),
                require_client_cert: file.tls.require_client_cert,
                generate_if_missing: file.tls.generate_if_missing,
                allow_clients: file.tls.allow_clients,
                crl: file.tls.crl.map(resolve),
                expiry_warning: file.tls.expiry_warning,
            },
            stream: file.stream,
            godoxy_version: file.godoxy_version,
            http: file.http,
            docker: DockerConfig {
                socket: resolve(file.docker.socket),
                ..file.docker
            },
            metrics: MetricsConfig {
                state_dir: file.metrics.state_dir.map(resolve),
                ..file.metrics
            },
            policy: file.policy,
            prometheus: file.prometheus,
            log: file.log,
        };
        let mut errors = Vec::new();
        let mut diagnostics = Diagnostics::default();
        // The environment wins over the file: check what results from both.
        config.apply_env(&env, &mut errors, &mut diagnostics);
        config.validate(&origin_name, &mut errors);
        if errors.is_empty() {
            Ok((config, diagnostics))
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn validate(&self, origin: &str, errors: &mut Vec<ConfigError>) {
        let mut invalid = |key, reason: &str| {
            errors.push(ConfigError::Invalid {
                origin: origin.to_owned(),
                key,
                reason: reason.to_owned(),
            })
        };
        if self.name.trim().is_empty() {
            invalid("name", "must not be empty");
        }
        let timeouts = [
            ("stream.handshake_timeout", self.stream.handshake_timeout),
            (
                "stream.busy_handshake_timeout",
                self.stream.busy_handshake_timeout,
            ),
            ("stream.header_timeout", self.stream.header_timeout),
            ("stream.dial_timeout", self.stream.dial_timeout),
            ("stream.udp_idle_timeout", self.stream.udp_idle_timeout),
            ("http.header_timeout", self.http.header_timeout),
            ("http.idle_timeout", self.http.idle_timeout),
            ("docker.response_timeout", self.docker.response_timeout),
        ];
        for (key, value) in timeouts {
            if value.is_zero() {
                invalid(key, "must be longer than 0s");
            }
        }
        let (shortest, longest) = MetricsConfig::INTERVAL_RANGE;
        if !(shortest..=longest).contains(&self.metrics.interval) {
            invalid("metrics.interval", "must be between 1s and 60s");
        }
        if let Some(addr) = self.prometheus.listen
            && addr.port() != 0
            && addr.port() == self.listen.tcp.port()
        {
            invalid(
                "prometheus.listen",
                "must not use the port of listen.tcp (e.g. 127.0.0.1:9108)",
            );
        }
        for entry in &self.tls.allow_clients {
            if let Err(reason) = crate::tls::ClientId::parse(entry) {
                invalid("tls.allow_clients", &reason);
            }
        }
        if let Err(entries) = crate::policy::Policy::new(&self.policy) {
            for entry in entries {
                invalid(entry.key, &entry.reason);
            }
        }
    }

    fn apply_env(
        &mut self,
        env: &impl Fn(&str) -> Option<String>,
        errors: &mut Vec<ConfigError>,
        diagnostics: &mut Diagnostics,
    ) {
        // GoDoxy reads each variable also with its GODOXY_ and GOPROXY_ prefixes, those first;
        // an empty value counts as unset.
        let var = |name: &str| {
            ["GODOXY_", "GOPROXY_", ""]
                .iter()
                .find_map(|prefix| env(&format!("{prefix}{name}")).filter(|v| !v.trim().is_empty()))
        };
        if let Some(name) = var("AGENT_NAME") {
            self.name = name.trim().to_owned();
        }
        if let Some(port) = var("AGENT_PORT") {
            match port.trim().parse::<u16>() {
                Ok(port) if port != 0 => {
                    self.listen.tcp.set_port(port);
                    if let Some(udp) = &mut self.listen.udp {
                        udp.set_port(port);
                    }
                }
                _ => errors.push(ConfigError::Env {
                    var: "AGENT_PORT",
                    reason: format!("`{port}` is not a port number (1-65535)"),
                }),
            }
        }
        if let Some(runtime) = var("RUNTIME") {
            match runtime.trim() {
                "docker" => self.runtime = Runtime::Docker,
                "podman" => self.runtime = Runtime::Podman,
                other => errors.push(ConfigError::Env {
                    var: "RUNTIME",
                    reason: format!("`{other}` is not one of docker, podman"),
                }),
            }
        }
        if let Some(value) = var("AGENT_CA_CERT") {
            match decode_pem_pair("AGENT_CA_CERT", &value) {
                Ok((cert, key)) => {
                    self.tls.ca = PemSource::Env {
                        var: "AGENT_CA_CERT",
                        pem: cert,
                    };
                    if key.is_some() {
                        diagnostics.warnings.push(
                            "AGENT_CA_CERT carries the CA private key; the agent does not need it \
                             and has dropped it. Ship only the CA certificate to agents: whoever \
                             holds that key can mint client certificates."
                                .to_owned(),
                        );
                    }
                }
                Err(err) => errors.push(err),
            }
        }
        if let Some(value) = var("AGENT_SSL_CERT") {
            match decode_pem_pair("AGENT_SSL_CERT", &value) {
                Ok((cert, Some(key))) => {
                    self.tls.cert = PemSource::Env {
                        var: "AGENT_SSL_CERT",
                        pem: cert,
                    };
                    self.tls.key = PemSource::Env {
                        var: "AGENT_SSL_CERT",
                        pem: key,
                    };
                    self.tls.generate_if_missing = false;
                }
                Ok((_, None)) => errors.push(ConfigError::Env {
                    var: "AGENT_SSL_CERT",
                    reason: "expected base64(cert PEM);base64(key PEM) but found no key part"
                        .to_owned(),
                }),
                Err(err) => errors.push(err),
            }
        }
        if let Some(value) = var("AGENT_SKIP_CLIENT_CERT_CHECK") {
            match parse_go_bool(value.trim()) {
                Some(skip) => self.tls.require_client_cert = !skip,
                None => errors.push(ConfigError::Env {
                    var: "AGENT_SKIP_CLIENT_CERT_CHECK",
                    reason: format!("`{value}` is not a boolean (true/false/1/0)"),
                }),
            }
        }
        if let Some(socket) = var("DOCKER_SOCKET") {
            self.docker.socket = PathBuf::from(socket.trim());
        }
        for (name, part) in METRICS_DISABLE_VARS {
            if let Some(value) = var(name) {
                match parse_go_bool(value.trim()) {
                    Some(disable) => *part(&mut self.metrics) = !disable,
                    None => errors.push(ConfigError::Env {
                        var: name,
                        reason: format!("`{value}` is not a boolean (true/false/1/0)"),
                    }),
                }
            }
        }
        // systemd's StateDirectory= hands the unit its folder in STATE_DIRECTORY (several are
        // colon-separated): the history goes there unless the file names a state_dir.
        if self.metrics.state_dir.is_none()
            && let Some(dirs) = env("STATE_DIRECTORY")
            && let Some(dir) = dirs.split(':').map(str::trim).find(|d| !d.is_empty())
        {
            self.metrics.state_dir = Some(PathBuf::from(dir));
        }
        let ignored: Vec<&str> = IGNORED_GODOXY_VARS
            .iter()
            .copied()
            .filter(|name| var(name).is_some())
            .collect();
        if !ignored.is_empty() {
            diagnostics.notices.push(format!(
                "ignoring GoDoxy socket-proxy variables (this agent relays the Docker API on \
                 its own port, filtered by docker.access): {}",
                ignored.join(", ")
            ));
        }
        if var("LISTEN_ADDR").is_some() {
            diagnostics.warnings.push(
                "LISTEN_ADDR is set, asking for GoDoxy's Docker socket proxy; this agent does \
                 not provide one and listens only on the agent port"
                    .to_owned(),
            );
        }
        if !self.tls.require_client_cert {
            diagnostics.warnings.push(
                "client certificates are NOT required: anyone who can reach the TLS port can \
                 open tunnels to any destination this host can reach. Set \
                 tls.require_client_cert = true and unset AGENT_SKIP_CLIENT_CERT_CHECK."
                    .to_owned(),
            );
        }
    }
}

/// Variables GoDoxy's agent compose file may set for its separate Docker socket proxy, which
/// this agent does not run: accepted, reported once, otherwise ignored.
const IGNORED_GODOXY_VARS: &[&str] = &[
    "DOCKER_HOST",
    "LISTEN_ADDR",
    "POST",
    "ALLOW_RESTARTS",
    "ALLOW_START",
    "ALLOW_STOP",
    "AUTH",
    "BUILD",
    "COMMIT",
    "CONFIGS",
    "CONTAINERS",
    "DISTRIBUTION",
    "EVENTS",
    "EXEC",
    "GRPC",
    "IMAGES",
    "INFO",
    "NETWORKS",
    "NODES",
    "PING",
    "PLUGINS",
    "SECRETS",
    "SERVICES",
    "SESSION",
    "SWARM",
    "SYSTEM",
    "TASKS",
    "VERSION",
    "VOLUMES",
];

/// Decodes GoDoxy's `base64(cert PEM);base64(key PEM)` form.
fn decode_pem_pair(
    var: &'static str,
    value: &str,
) -> Result<(Vec<u8>, Option<Vec<u8>>), ConfigError> {
    let err = |reason: String| ConfigError::Env { var, reason };
    // `docker|podman run --env-file` passes a quoted value with its quotes.
    let value = value.trim();
    let value = ['"', '\'']
        .iter()
        .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
        .unwrap_or(value);
    let (cert, key) = match value.split_once(';') {
        Some((cert, key)) => (cert, Some(key).filter(|k| !k.trim().is_empty())),
        None => (value, None),
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let cert = b64
        .decode(cert.trim())
        .map_err(|e| err(format!("certificate part is not base64: {e}")))?;
    if !contains_pem_label(&cert, "CERTIFICATE") {
        return Err(err(
            "certificate part does not decode to a PEM certificate".to_owned()
        ));
    }
    let key = match key {
        Some(key) => {
            let key = b64
                .decode(key.trim())
                .map_err(|e| err(format!("private key part is not base64: {e}")))?;
            if !contains_pem_label(&key, "PRIVATE KEY") {
                return Err(err(
                    "private key part does not decode to a PEM private key".to_owned()
                ));
            }
            Some(key)
        }
        None => None,
    };
    Ok((cert, key))
}

fn contains_pem_label(bytes: &[u8], label: &str) -> bool {
    String::from_utf8_lossy(bytes)
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.contains(label))
}

/// Go's `strconv.ParseBool`, which GoDoxy uses for its flags.
fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn default_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "godoxy-agent".to_owned())
}

/// A path where `""` means none.
mod optional_path {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(path: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match path {
            Some(path) => s.collect_str(&path.display()),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        let text = String::deserialize(d)?;
        Ok((!text.is_empty()).then(|| PathBuf::from(text)))
    }
}

mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "`{text}` is not an address like 0.0.0.0:8890 or [::]:8890 (\"\" disables)"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults() {
        let (c, _) = Config::from_toml("", None, no_env).unwrap();
        assert_eq!(c.listen.tcp.port(), 8890);
        assert_eq!(c.stream.header_timeout, Duration::from_secs(10));
        assert!(c.tls.require_client_cert);
        assert!(c.tls.allow_clients.is_empty() && c.tls.crl.is_none());
        assert_eq!(c.tls.expiry_warning, Duration::from_secs(30 * 86_400));
        assert_eq!(c.stream.idle_timeout, Duration::ZERO);
    }

    #[test]
    fn empty_udp_disables() {
        let (c, _) = Config::from_toml("[listen]\nudp = \"\"\n", None, no_env).unwrap();
        assert!(c.listen.udp.is_none());
    }

    #[test]
    fn prometheus_and_log() {
        let (c, _) = Config::from_toml("", None, no_env).unwrap();
        assert!(c.prometheus.listen.is_none() && !c.prometheus.mtls);
        assert_eq!(c.log.format, LogFormat::Text);
        let text =
            "[prometheus]\nlisten = \"127.0.0.1:9108\"\nmtls = true\n[log]\nformat = \"json\"\n";
        let (c, _) = Config::from_toml(text, None, no_env).unwrap();
        assert_eq!(c.prometheus.listen, Some("127.0.0.1:9108".parse().unwrap()));
        assert!(c.prometheus.mtls);
        assert_eq!(c.log.format, LogFormat::Json);
        let err = Config::from_toml("[log]\nformat = \"xml\"\n", None, no_env).unwrap_err();
        assert!(err.to_string().contains("unknown variant `xml`"), "{err}");
        let err =
            Config::from_toml("[prometheus]\nlisten = \"[::]:8890\"\n", None, no_env).unwrap_err();
        assert!(err.to_string().contains("`prometheus.listen`"), "{err}");
    }

    #[test]
    fn go_bools() {
        assert_eq!(parse_go_bool("True"), Some(true));
        assert_eq!(parse_go_bool("0"), Some(false));
        assert_eq!(parse_go_bool("yes"), None);
    }
}
