//! `Daemon::bind` binds every socket; `Daemon::run` serves until shutdown, then drains.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::dtls::{self, UdpLimits, UdpShared};
use crate::http::{AgentInfo, HttpShared};
use crate::stats::Stats;
use crate::tcp_listener::{self, Shared};
use crate::tls::TlsMaterial;
use crate::tunnel::Timeouts;

/// A bound, ready-to-run agent.
pub struct Daemon {
    config: Arc<Config>,
    tcp: TcpListener,
    shared: Arc<Shared>,
    udp: Option<(Arc<UdpSocket>, Arc<UdpShared>)>,
}

impl Daemon {
    /// Loads the TLS material and binds the listeners. Errors say which file or address.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        crate::tls::install_default_provider();
        let material = TlsMaterial::load(&config.tls)?;
        let server_config = material.server_config(config.tls.require_client_cert)?;
        let tcp = TcpListener::bind(config.listen.tcp)
            .await
            .with_context(|| format!("listen.tcp: binding {}", config.listen.tcp))?;
        let stats = Arc::new(Stats::default());
        let timeouts = Timeouts {
            header: config.stream.header_timeout,
            dial: config.stream.dial_timeout,
        };
        let udp = match config.listen.udp {
            Some(addr) => {
                let dtls = dtls::server_config(&material, config.tls.require_client_cert)
                    .context("tls.key/tls.cert for DTLS")?;
                let (socket, granted) =
                    dtls::bind(addr).with_context(|| format!("listen.udp: binding {addr}"))?;
                if granted < dtls::SOCKET_RCVBUF {
                    warn!(
                        granted,
                        wanted = dtls::SOCKET_RCVBUF,
                        "UDP receive buffer is smaller than wanted; bursts may drop datagrams \
                         (raise net.core.rmem_max)"
                    );
                }
                let limits = UdpLimits {
                    handshake_timeout: config.stream.handshake_timeout,
                    timeouts,
                    idle_timeout: config.stream.udp_idle_timeout,
                    max_sessions: config.stream.max_udp_sessions.get(),
                    max_handshakes: config.stream.max_udp_handshakes.get(),
                };
                let shared = UdpShared {
                    dtls,
                    limits,
                    stats: stats.clone(),
                };
                Some((Arc::new(socket), Arc::new(shared)))
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            tls_no_alpn: {
                let mut plain = (*server_config).clone();
                plain.alpn_protocols.clear();
                Arc::new(plain)
            },
            tls: server_config,
            http: Arc::new(HttpShared {
                info: AgentInfo::new(&config),
                header_timeout: config.stream.header_timeout,
            }),
            handshake_timeout: config.stream.handshake_timeout,
            timeouts,
            stats,
        });
        Ok(Self {
            config: Arc::new(config),
            tcp,
            shared,
            udp,
        })
    }

    /// Loads and checks the TLS material as [`Daemon::bind`] would, binding nothing: what
    /// `check-config` runs.
    pub fn check_tls(config: &Config) -> anyhow::Result<()> {
        crate::tls::install_default_provider();
        let material = TlsMaterial::load(&config.tls)?;
        material.server_config(config.tls.require_client_cert)?;
        if config.listen.udp.is_some() {
            dtls::server_config(&material, config.tls.require_client_cert)
                .context("tls.key/tls.cert for DTLS")?;
        }
        Ok(())
    }

    /// The bound TLS address (tests bind port 0 and read it here).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp.local_addr().unwrap_or(self.config.listen.tcp)
    }

    /// The bound DTLS address, when UDP is enabled.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().and_then(|(s, _)| s.local_addr().ok())
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
        let limit = Arc::new(Semaphore::new(self.config.stream.max_connections.get()));
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
        info!(
            tcp = %self.tcp_addr(),
            udp = %udp_addr.map_or_else(|| "disabled".to_owned(), |a| a.to_string()),
            name = %self.config.name,
            version = env!("CARGO_PKG_VERSION"),
            "agent listening"
        );
        let accept = tokio::spawn(tcp_listener::run(
            self.tcp,
            self.shared.clone(),
            limit,
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
        info!("shutdown complete");
        Ok(())
    }
}
