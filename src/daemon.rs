//! `Daemon::bind` binds every socket; `Daemon::run` serves until shutdown, then drains.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admission::{Admission, PreauthLimits};
use crate::config::Config;
use crate::credentials::{CredentialStore, Reloader};
use crate::dtls::cookie::Cookies;
use crate::dtls::report::Tally;
use crate::dtls::{self, UdpLimits, UdpShared};
use crate::http::{AgentInfo, Docker, Health, HttpShared, Proxy};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::prometheus::Exporter;
use crate::stats::{Stats, Transport};
use crate::tcp_listener::{self, Shared};
use crate::tunnel::Timeouts;

/// How long the start-up check of the Docker engine may take.
const DOCKER_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A bound, ready-to-run agent.
pub struct Daemon {
    config: Arc<Config>,
    tcp: TcpListener,
    shared: Arc<Shared>,
    udp: Option<(Arc<UdpSocket>, Arc<UdpShared>)>,
    /// The plain-HTTP scrape listener, when `prometheus.listen` is set.
    prometheus: Option<(TcpListener, Arc<Exporter>)>,
}

impl Daemon {
    /// Loads the TLS material and binds the listeners. Errors say which file or address.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        crate::tls::install_default_provider();
        let stats = Arc::new(Stats::default());
        let credentials = Arc::new(CredentialStore::load(
            &config.tls,
            config.listen.udp.is_some(),
            stats.clone(),
        )?);
        let tcp = bind_tcp(config.listen.tcp)
            .with_context(|| format!("listen.tcp: binding {}", config.listen.tcp))?;
        let prometheus = Arc::new(Exporter::new(stats.clone(), config.godoxy_version.as_str()));
        let prometheus_listener = match config.prometheus.listen {
            Some(addr) => Some(
                crate::prometheus::bind(addr)
                    .await
                    .with_context(|| format!("prometheus.listen: binding {addr}"))?,
            ),
            None => None,
        };
        // One policy for every dial made for a client: tunnels, HTTP routes, health checks.
        let policy = Arc::new(Policy::new(&config.policy).map_err(|errors| {
            let reasons: Vec<String> = errors
                .iter()
                .map(|e| format!("{}: {}", e.key, e.reason))
                .collect();
            anyhow::anyhow!("{}", reasons.join("; "))
        })?);
        let timeouts = Timeouts {
            header: config.stream.header_timeout,
            dial: config.stream.dial_timeout,
        };
        let preauth = |capacity: usize| PreauthLimits {
            capacity,
            per_source: config.stream.max_handshakes_per_source.get(),
            timeout: config.stream.handshake_timeout,
            busy_timeout: config.stream.busy_handshake_timeout,
        };
        let udp = match config.listen.udp {
            Some(addr) => {
                let (socket, granted) = dual_stack(addr, dtls::bind)
                    .with_context(|| format!("listen.udp: binding {addr}"))?;
                if granted < dtls::SOCKET_RCVBUF {
                    warn!(
                        granted,
                        wanted = dtls::SOCKET_RCVBUF,
                        "UDP receive buffer is smaller than wanted; bursts may drop datagrams \
                         (raise net.core.rmem_max)"
                    );
                }
                let limits = UdpLimits {
                    timeouts,
                    idle_timeout: config.stream.udp_idle_timeout,
                    max_sessions: config.stream.max_udp_sessions.get(),
                    preauth: preauth(config.stream.max_udp_handshakes.get()),
                };
                let shared = UdpShared {
                    credentials: credentials.clone(),
                    limits,
                    stats: stats.clone(),
                    policy: policy.clone(),
                    admission: Arc::new(Admission::new(
                        limits.preauth,
                        Transport::Udp,
                        stats.clone(),
                    )),
                    cookies: Cookies::new()?,
                };
                Some((Arc::new(socket), Arc::new(shared)))
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            credentials,
            http: Arc::new(HttpShared {
                info: AgentInfo::new(&config),
                docker: Docker::new(&config.docker),
                proxy: Proxy::new(policy.clone()),
                health: Health::new(policy.clone()),
                metrics: Metrics::new(&config.metrics),
                stats: stats.clone(),
                prometheus: config.prometheus.mtls.then(|| prometheus.clone()),
                header_timeout: config.http.header_timeout,
                idle_timeout: config.http.idle_timeout,
            }),
            admission: Arc::new(Admission::new(
                preauth(config.stream.max_tls_handshakes.get()),
                Transport::Tcp,
                stats.clone(),
            )),
            connections: Arc::new(Semaphore::new(config.stream.max_connections.get())),
            tally: Tally::new("TLS"),
            idle_timeout: Some(config.stream.idle_timeout).filter(|d| !d.is_zero()),
            timeouts,
            policy,
            stats,
        });
        Ok(Self {
            config: Arc::new(config),
            tcp,
            shared,
            udp,
            prometheus: prometheus_listener.map(|listener| (listener, prometheus)),
        })
    }

    /// Loads and checks the TLS material as [`Daemon::bind`] would, binding nothing: what
    /// `check-config` runs.
    pub fn check_tls(config: &Config) -> anyhow::Result<()> {
        crate::tls::install_default_provider();
        let stats = Arc::new(Stats::default());
        CredentialStore::load(&config.tls, config.listen.udp.is_some(), stats)?;
        Ok(())
    }

    /// Whether the Docker engine at `docker.socket` answers, and as what (engine, version,
    /// API version): what `check-config` and the start-up log report.
    pub async fn probe_docker(config: &Config) -> Result<String, String> {
        Self::probe_docker_within(config, DOCKER_PROBE_TIMEOUT).await
    }

    /// As [`Daemon::probe_docker`] with the deadline given (`doctor --timeout`).
    pub async fn probe_docker_within(config: &Config, within: Duration) -> Result<String, String> {
        crate::http::probe_docker(&config.docker.socket, within).await
    }

    /// The bound TLS address (tests bind port 0 and read it here).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp.local_addr().unwrap_or(self.config.listen.tcp)
    }

    /// The bound DTLS address, when UDP is enabled.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().and_then(|(s, _)| s.local_addr().ok())
    }

    /// The bound Prometheus scrape address, when `prometheus.listen` is set.
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.prometheus
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// Reloads the TLS material of the running daemon (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader(self.shared.credentials.clone())
    }

    /// The counters, shared with the running daemon.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// Serves until `shutdown` fires; then stops accepting, gives open tunnels
    /// `stream.shutdown_grace` to finish, and closes the rest.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.run_with_hard_stop(shutdown, CancellationToken::new())
            .await
    }

    /// As [`Daemon::run`]; `hard_stop` also ends the grace period early (a second signal).
    pub async fn run_with_hard_stop(
        self,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let tasks = TaskTracker::new();
        let udp_addr = self.udp_addr();
        let demux = self.udp.clone().map(|(socket, shared)| {
            tokio::spawn(dtls::run(
                socket,
                shared,
                tasks.clone(),
                shutdown.clone(),
                hard_stop.clone(),
            ))
        });
        let docker = &self.config.docker;
        match crate::http::probe_docker(&docker.socket, DOCKER_PROBE_TIMEOUT).await {
            Ok(engine) => info!(
                socket = %docker.socket.display(),
                access = docker.access.as_str(),
                engine,
                "Docker API relay ready"
            ),
            Err(err) if docker.access == crate::config::DockerAccess::Off => {
                debug!(socket = %docker.socket.display(), "Docker API relay off ({err})");
            }
            Err(err) => warn!(
                socket = %docker.socket.display(),
                access = docker.access.as_str(),
                "Docker engine not reachable: {err}; Docker API calls will answer 502 until it is \
                 (set docker.socket or DOCKER_SOCKET, and give the agent access to the socket)"
            ),
        }
        info!(
            tcp = %self.tcp_addr(),
            udp = %udp_addr.map_or_else(|| "disabled".to_owned(), |a| a.to_string()),
            name = %self.config.name,
            version = env!("CARGO_PKG_VERSION"),
            godoxy_api = self.config.godoxy_version.as_str(),
            "agent listening"
        );
        let scrape = self.prometheus.map(|(listener, exporter)| {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "Prometheus metrics at http://{addr}/metrics");
            }
            tokio::spawn(crate::prometheus::serve(
                listener,
                exporter,
                shutdown.clone(),
            ))
        });
        // Host metrics: sampled until shutdown, then the history is saved.
        let metrics = tokio::spawn(self.shared.http.metrics.clone().run(shutdown.clone()));
        let expiry = tokio::spawn(
            self.shared
                .credentials
                .clone()
                .watch_expiry(shutdown.clone()),
        );
        let accept = tokio::spawn(tcp_listener::run(
            self.tcp,
            self.shared.clone(),
            tasks.clone(),
            shutdown.clone(),
            hard_stop.clone(),
        ));
        shutdown.cancelled().await;
        let _ = accept.await;
        tasks.close();
        let open = tasks.len();
        info!(open, grace = ?self.config.stream.shutdown_grace, "shutting down: listeners closed");
        if tokio::time::timeout(self.config.stream.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            warn!(
                open = tasks.len(),
                "shutdown grace period over; closing the remaining connections"
            );
            hard_stop.cancel();
            tasks.wait().await;
        }
        // Every session has ended; the demultiplexer goes with the last of them.
        hard_stop.cancel();
        if let Some(demux) = demux {
            let _ = demux.await;
        }
        let _ = metrics.await;
        let _ = expiry.await;
        if let Some(scrape) = scrape {
            let _ = scrape.await;
        }
        log_summary(&self.shared.stats);
        Ok(())
    }
}

/// The last line: what the agent did in its life.
fn log_summary(stats: &Stats) {
    let get = Stats::get;
    let [tcp, udp] = Transport::ALL.map(Transport::index);
    info!(
        uptime_s = stats.started.elapsed().as_secs(),
        tcp_tunnels = get(&stats.tunnels_opened[tcp]),
        udp_tunnels = get(&stats.tunnels_opened[udp]),
        up_bytes = Stats::total(&stats.up_bytes),
        down_bytes = Stats::total(&stats.down_bytes),
        tls_handshakes = get(&stats.tls_handshakes),
        tls_handshake_failures = get(&stats.tls_handshake_failures),
        dtls_handshakes = get(&stats.udp_handshakes),
        dtls_handshake_failures = get(&stats.udp_handshake_failures),
        http_requests = get(&stats.http_requests),
        shed = get(&stats.shed_tcp) + get(&stats.shed_dtls),
        refused = get(&stats.preauth_refused_tcp) + get(&stats.preauth_refused_dtls),
        "shutdown complete"
    );
}

/// Binds the TLS port; `[::]` is dual-stack (see [`dual_stack`]).
fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    dual_stack(addr, |addr| {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    })
}

/// Binds with `bind`; an IPv6 unspecified address that the host cannot bind (no IPv6) falls
/// back to 0.0.0.0 on the same port, as GoDoxy's `:PORT` does.
fn dual_stack<T>(addr: SocketAddr, bind: impl Fn(SocketAddr) -> io::Result<T>) -> io::Result<T> {
    match bind(addr) {
        Err(err)
            if addr.ip().is_unspecified()
                && addr.is_ipv6()
                && matches!(err.raw_os_error(), Some(EAFNOSUPPORT | EADDRNOTAVAIL)) =>
        {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            info!(%addr, fallback = %v4, "no IPv6 on this host; listening on IPv4 only");
            bind(v4)
        }
        other => other,
    }
}

/// Linux errno values for "address family not supported" and "cannot assign address".
const EAFNOSUPPORT: i32 = 97;
const EADDRNOTAVAIL: i32 = 99;
