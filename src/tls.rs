//! rustls configuration: PEM loading, the client-certificate verifier, ALPN, peer subjects.

use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use webrtc_dtls::crypto::{Certificate, CryptoPrivateKey};

use crate::alpn::Alpn;
use crate::config::{PemSource, TlsConfig};

/// The crypto provider for TLS and DTLS alike: webrtc-dtls needs `ring`, and rustls can only
/// pick a process default when exactly one provider is built in.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The provider for our client side, with TLS 1.3 suites in Go's order (AES-128-GCM first, as
/// the GoDoxy server's crypto/tls offers them on hardware with AES): what the agent is measured
/// against is what it will see.
pub(crate) fn client_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as suite;
    let mut provider = rustls::crypto::ring::default_provider();
    let tls13_first = [
        suite::TLS13_AES_128_GCM_SHA256,
        suite::TLS13_AES_256_GCM_SHA384,
        suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    provider
        .cipher_suites
        .retain(|s| !tls13_first.iter().any(|t| t.suite() == s.suite()));
    provider.cipher_suites.splice(0..0, tls13_first);
    Arc::new(provider)
}

/// Installs [`provider`] as the process default; harmless when already installed.
pub(crate) fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Certificates and key, parsed.
pub(crate) struct TlsMaterial {
    /// Trusted CA certificates for client authentication.
    pub(crate) ca: Vec<CertificateDer<'static>>,
    /// The server's certificate chain, leaf first.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// The server's private key.
    pub(crate) key: PrivateKeyDer<'static>,
}

impl TlsMaterial {
    /// Reads and parses the configured files or environment values.
    pub(crate) fn load(config: &TlsConfig) -> anyhow::Result<Self> {
        let ca_pem = read_pem(&config.ca, "tls.ca")?;
        let cert_pem = read_pem(&config.cert, "tls.cert")?;
        let key_pem = read_pem(&config.key, "tls.key")?;
        let ca = parse_certs(&ca_pem).with_context(|| format!("tls.ca ({})", config.ca))?;
        let chain =
            parse_certs(&cert_pem).with_context(|| format!("tls.cert ({})", config.cert))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| anyhow!("tls.key ({}): no usable private key: {e}", config.key))?;
        Ok(Self { ca, chain, key })
    }

    /// The rustls server configuration of the TLS port.
    pub(crate) fn server_config(
        &self,
        require_client_cert: bool,
    ) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let provider = provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("selecting TLS versions")?;
        let mut roots = RootCertStore::empty();
        for cert in &self.ca {
            roots
                .add(cert.clone())
                .context("tls.ca: not a usable CA certificate")?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = if require_client_cert {
            verifier.build()
        } else {
            verifier.allow_unauthenticated().build()
        }
        .context("building the client certificate verifier")?;
        let mut config = builder
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("tls.cert and tls.key do not form a usable pair")?;
        config.alpn_protocols = Alpn::SERVER_OFFER.iter().map(|p| p.to_vec()).collect();
        // Resumption through stateless tickets (encrypted under a rotating key): a client that
        // keeps a session cache skips the certificate signature and verification on its next
        // tunnel, and the agent keeps no per-session state. One ticket per connection suffices
        // for clients that use each ticket once.
        config.ticketer =
            rustls::crypto::ring::Ticketer::new().context("creating the ticket key")?;
        config.send_tls13_tickets = 1;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Arc::new(config))
    }
}

/// Reads one PEM source; the error names the key and where it was looked for.
pub(crate) fn read_pem(source: &PemSource, key: &str) -> anyhow::Result<Vec<u8>> {
    match source {
        PemSource::File(path) => {
            std::fs::read(path).with_context(|| format!("{key}: reading {}", path.display()))
        }
        PemSource::Env { pem, .. } => Ok(pem.clone()),
    }
}

/// Every `CERTIFICATE` block of a PEM text; an error when there is none.
pub(crate) fn parse_certs(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("bad PEM: {e}"))?;
    if certs.is_empty() {
        bail!("no CERTIFICATE block found");
    }
    Ok(certs)
}

/// A certificate's `notAfter` as Unix seconds, or `None` when it does not parse.
pub(crate) fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .ok()
        .map(|(_, parsed)| parsed.validity().not_after.timestamp())
}

/// The subject of a peer's certificate in RFC 4514 form, for logs.
pub(crate) fn subject(cert: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(cert.as_ref()) {
        Ok((_, parsed)) => parsed.subject().to_string(),
        Err(_) => "<unparsable certificate>".to_owned(),
    }
}

/// A webrtc-dtls certificate from a chain and a P-256 key in any PEM form rustls reads.
/// webrtc-dtls loads PKCS#8 only; GoDoxy writes SEC1: convert.
pub(crate) fn dtls_certificate(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> anyhow::Result<Certificate> {
    let secret = match key {
        PrivateKeyDer::Sec1(der) => p256::SecretKey::from_sec1_der(der.secret_sec1_der())
            .map_err(|e| anyhow!("SEC1 key is not a P-256 key: {e}"))?,
        PrivateKeyDer::Pkcs8(der) => p256::SecretKey::from_pkcs8_der(der.secret_pkcs8_der())
            .map_err(|e| anyhow!("PKCS#8 key is not a P-256 key: {e}"))?,
        _ => {
            return Err(anyhow!(
                "UDP (DTLS) needs an ECDSA P-256 key, found another kind"
            ));
        }
    };
    let pkcs8 = secret
        .to_pkcs8_der()
        .map_err(|e| anyhow!("re-encoding the key as PKCS#8: {e}"))?;
    let pair = rcgen::KeyPair::try_from(pkcs8.as_bytes()).context("loading the P-256 key")?;
    let private_key =
        CryptoPrivateKey::from_key_pair(&pair).map_err(|e| anyhow!("DTLS key: {e}"))?;
    Ok(Certificate {
        certificate: chain,
        private_key,
    })
}
