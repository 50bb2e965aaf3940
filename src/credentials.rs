//! The TLS material every new handshake uses, swappable at run time: SIGHUP re-reads the CA,
//! certificate, key and CRL; new handshakes (TCP and DTLS) get the new set, open tunnels keep
//! the one they were made with, and a set that fails to load leaves the old one in force.
//! Also the expiry warning for the server and CA certificates.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use webrtc_dtls::config::Config as DtlsConfig;

use crate::config::TlsConfig;
use crate::stats::Stats;
use crate::tls::{ClientRules, TlsMaterial};

/// How often the expiry warning is repeated.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// One loaded set: what a handshake is made with and what the client must meet afterwards.
pub(crate) struct Credentials {
    /// TLS with client authentication and the ALPN offer.
    pub(crate) tls: Arc<rustls::ServerConfig>,
    /// The same without ALPN: for clients that offer only protocols we do not speak, which
    /// PROTOCOL.md routes to the HTTP API rather than refusing.
    pub(crate) tls_no_alpn: Arc<rustls::ServerConfig>,
    /// The DTLS configuration, when UDP is enabled.
    pub(crate) dtls: Option<DtlsConfig>,
    /// Expiry, allow-list and CRL, checked after every handshake.
    pub(crate) clients: ClientRules,
    /// Subject and end of validity of the server certificate, then of each CA certificate.
    expiries: Vec<(&'static str, String, SystemTime)>,
    /// What it was built from (the certificates' ends for `/metrics`).
    material: TlsMaterial,
}

impl Credentials {
    /// Reads and builds everything from `tls`; `udp` also builds the DTLS configuration.
    pub(crate) fn load(tls: &TlsConfig, udp: bool) -> anyhow::Result<Self> {
        let material = TlsMaterial::load(tls)?;
        let crls = match &tls.crl {
            Some(path) => crate::tls::read_crls(path)?,
            None => Vec::new(),
        };
        let clients = ClientRules::new(&tls.allow_clients, &crls, &material.ca).with_context(
            || match &tls.crl {
                Some(path) => format!("tls.crl ({})", path.display()),
                None => "tls.allow_clients".to_owned(),
            },
        )?;
        let server = material.server_config(tls.require_client_cert, &crls)?;
        let dtls = if udp {
            Some(
                crate::dtls::server_config(&material, tls.require_client_cert)
                    .context("tls.key/tls.cert for DTLS")?,
            )
        } else {
            None
        };
        let mut expiries = Vec::new();
        if let Some((subject, end)) = material
            .chain
            .first()
            .and_then(crate::tls::subject_and_expiry)
        {
            expiries.push(("server", subject, end));
        }
        for ca in &material.ca {
            if let Some((subject, end)) = crate::tls::subject_and_expiry(ca) {
                expiries.push(("CA", subject, end));
            }
        }
        Ok(Self {
            tls_no_alpn: {
                let mut plain = (*server).clone();
                plain.alpn_protocols.clear();
                Arc::new(plain)
            },
            tls: server,
            dtls,
            clients,
            expiries,
            material,
        })
    }

    /// Warns for each certificate that expires within `within` (or has expired).
    fn warn_expiry(&self, within: Duration) {
        if within.is_zero() {
            return;
        }
        let now = SystemTime::now();
        for (role, subject, end) in &self.expiries {
            let end_text = humantime::format_rfc3339_seconds(*end);
            match end.duration_since(now) {
                Err(_) => warn!(
                    role,
                    subject,
                    not_after = %end_text,
                    "{role} certificate has EXPIRED; replace it and reload (SIGHUP)"
                ),
                Ok(left) if left <= within => warn!(
                    role,
                    subject,
                    not_after = %end_text,
                    days_left = left.as_secs() / 86_400,
                    "{role} certificate expires soon; replace it and reload (SIGHUP)"
                ),
                Ok(_) => {}
            }
        }
    }
}

/// The current [`Credentials`], read once per handshake.
pub(crate) struct CredentialStore {
    current: RwLock<Arc<Credentials>>,
    config: TlsConfig,
    udp: bool,
    /// Where the certificates' ends are published (`/metrics`).
    stats: Arc<Stats>,
}

impl CredentialStore {
    /// Loads the first set.
    pub(crate) fn load(config: &TlsConfig, udp: bool, stats: Arc<Stats>) -> anyhow::Result<Self> {
        let first = Credentials::load(config, udp)?;
        stats.set_cert_expiry(&first.material);
        Ok(Self {
            current: RwLock::new(Arc::new(first)),
            config: config.clone(),
            udp,
            stats,
        })
    }

    /// The set new handshakes use.
    pub(crate) fn current(&self) -> Arc<Credentials> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the files (environment values are kept as loaded) and swaps the new set in;
    /// on an error the old set stays. Logs either way.
    pub(crate) fn reload(&self) {
        match Credentials::load(&self.config, self.udp) {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                match self.current.write() {
                    Ok(mut guard) => *guard = fresh.clone(),
                    Err(poisoned) => *poisoned.into_inner() = fresh.clone(),
                }
                self.stats.set_cert_expiry(&fresh.material);
                let (subject, not_after) = fresh
                    .expiries
                    .first()
                    .map(|(_, s, end)| {
                        (
                            s.clone(),
                            humantime::format_rfc3339_seconds(*end).to_string(),
                        )
                    })
                    .unwrap_or_default();
                info!(
                    cert = %self.config.cert,
                    subject,
                    not_after,
                    "TLS material reloaded; new handshakes use it, open tunnels keep theirs"
                );
                fresh.warn_expiry(self.config.expiry_warning);
            }
            Err(err) => {
                error!("TLS reload failed, the previous certificates stay in force: {err:#}")
            }
        }
    }

    /// Warns about certificates near their end now and then daily, until `shutdown`.
    pub(crate) async fn watch_expiry(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            self.current().warn_expiry(self.config.expiry_warning);
            let pause = tokio::time::sleep(EXPIRY_CHECK_INTERVAL);
            if shutdown.run_until_cancelled(pause).await.is_none() {
                return;
            }
        }
    }
}

/// A handle that reloads the running daemon's TLS material (what SIGHUP calls).
#[derive(Clone)]
pub struct Reloader(pub(crate) Arc<CredentialStore>);

impl Reloader {
    /// Re-reads the CA, certificate, key and CRL for new handshakes; logs the outcome.
    pub fn reload(&self) {
        self.0.reload();
    }
}
