//! rustls configuration: PEM loading, the client-certificate verifier, ALPN, peer subjects,
//! and the rules a client certificate must meet after every handshake ([`ClientRules`]).

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
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
        crls: &[CertificateRevocationListDer<'static>],
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
        let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        if !crls.is_empty() {
            // A full handshake is refused with a proper alert; a client of a CA the list does
            // not cover is let through, as without a list. ClientRules repeats the check
            // after every handshake, resumed ones included.
            verifier = verifier
                .with_crls(crls.iter().cloned())
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
        }
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

/// The validity period's end of a certificate, and its subject, for expiry warnings.
pub(crate) fn subject_and_expiry(cert: &CertificateDer<'_>) -> Option<(String, SystemTime)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
    Some((
        parsed.subject().to_string(),
        UNIX_EPOCH + Duration::from_secs(secs),
    ))
}

/// One entry of `tls.allow_clients`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientId {
    /// `cn:NAME`: a common name of the subject.
    Cn(String),
    /// `san:NAME`: a DNS name, e-mail address, URI or IP address of the subjectAltName.
    San(String),
    /// `sha256:HEX`: the SHA-256 of the certificate (DER), colons allowed.
    Sha256([u8; 32]),
}

impl ClientId {
    /// Parses `cn:`, `san:` or `sha256:` entries; the error says what is expected.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{text}` is not an identity like cn:NAME, san:NAME or sha256:HEX (64 hex \
                 digits, colons allowed)"
            )
        };
        let (kind, value) = text.split_once(':').ok_or_else(bad)?;
        let value = value.trim();
        if value.is_empty() {
            return Err(bad());
        }
        match kind.trim().to_ascii_lowercase().as_str() {
            "cn" => Ok(Self::Cn(value.to_owned())),
            "san" => Ok(Self::San(value.to_owned())),
            "sha256" => {
                let hex: Vec<u8> = value.bytes().filter(|b| *b != b':').collect();
                if hex.len() != 64 {
                    return Err(bad());
                }
                let mut digest = [0u8; 32];
                for (out, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
                    let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
                    *out = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
                }
                Ok(Self::Sha256(digest))
            }
            _ => Err(bad()),
        }
    }
}

/// The revoked serial numbers of one CRL issuer.
struct Revoked {
    /// The issuer's name, DER.
    issuer: Vec<u8>,
    serials: HashSet<Vec<u8>>,
}

/// What a client certificate must meet after every handshake, full or resumed: inside its
/// validity period now (a resumed TLS session carries the certificate of its first
/// handshake, which may have expired since), on the allow-list when there is one, and not
/// on the CRL. One rule for TCP and DTLS.
#[derive(Default)]
pub(crate) struct ClientRules {
    allow: Vec<ClientId>,
    revoked: Vec<Revoked>,
}

impl ClientRules {
    /// The allow-list from `tls.allow_clients` and the CRLs read from `tls.crl`; `ca` are
    /// the trusted CAs, one of which must have issued each CRL.
    pub(crate) fn new(
        allow: &[String],
        crls: &[CertificateRevocationListDer<'static>],
        ca: &[CertificateDer<'static>],
    ) -> anyhow::Result<Self> {
        let allow = allow
            .iter()
            .map(|entry| ClientId::parse(entry).map_err(|e| anyhow!("tls.allow_clients: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ca_subjects: Vec<Vec<u8>> = ca
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
            .map(|(_, c)| c.subject().as_raw().to_vec())
            .collect();
        let mut revoked = Vec::new();
        for crl in crls {
            let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
                .map_err(|e| anyhow!("not a certificate revocation list: {e}"))?;
            let issuer = parsed.issuer().as_raw().to_vec();
            if !ca_subjects.contains(&issuer) {
                bail!(
                    "the list is issued by {}, which is not a CA of tls.ca",
                    parsed.issuer()
                );
            }
            let serials = parsed
                .iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec())
                .collect();
            revoked.push(Revoked { issuer, serials });
        }
        Ok(Self { allow, revoked })
    }

    /// Checks the client's chain (leaf first; `None` or empty when it sent none) at `now`.
    /// The error is the reason, for the log.
    pub(crate) fn check(
        &self,
        chain: Option<&[CertificateDer<'_>]>,
        now: SystemTime,
    ) -> Result<(), String> {
        let Some(leaf) = chain.and_then(|c| c.first()) else {
            // Without a certificate there is nothing to check; the verifier decided whether
            // that is allowed (tls.require_client_cert), but an allow-list needs an identity.
            if self.allow.is_empty() {
                return Ok(());
            }
            return Err("no client certificate, and tls.allow_clients is set".to_owned());
        };
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|_| "unparsable client certificate".to_owned())?;
        let now_secs = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let validity = cert.validity();
        if now_secs > validity.not_after.timestamp() {
            return Err(format!(
                "client certificate expired at {}",
                validity.not_after
            ));
        }
        if now_secs < validity.not_before.timestamp() {
            return Err(format!(
                "client certificate not valid before {}",
                validity.not_before
            ));
        }
        let issuer = cert.issuer().as_raw();
        if self
            .revoked
            .iter()
            .any(|r| r.issuer == issuer && r.serials.contains(cert.raw_serial()))
        {
            return Err(format!(
                "client certificate revoked (serial {}) by tls.crl",
                cert.raw_serial_as_string()
            ));
        }
        if self.allow.is_empty() || self.allow.iter().any(|id| matches(id, leaf, &cert)) {
            Ok(())
        } else {
            Err("client certificate not in tls.allow_clients".to_owned())
        }
    }
}

/// Whether `cert` (DER `der`) carries the identity `id`.
fn matches(
    id: &ClientId,
    der: &CertificateDer<'_>,
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> bool {
    use x509_parser::extensions::GeneralName;
    match id {
        ClientId::Cn(name) => cert
            .subject()
            .iter_common_name()
            .any(|cn| cn.as_str().is_ok_and(|cn| cn == name)),
        ClientId::San(name) => {
            let Ok(Some(san)) = cert.subject_alternative_name() else {
                return false;
            };
            san.value.general_names.iter().any(|general| match general {
                GeneralName::DNSName(v) | GeneralName::RFC822Name(v) | GeneralName::URI(v) => {
                    v.eq_ignore_ascii_case(name)
                }
                GeneralName::IPAddress(bytes) => {
                    ip_from(bytes).is_some_and(|ip| name.parse::<IpAddr>().is_ok_and(|n| n == ip))
                }
                _ => false,
            })
        }
        ClientId::Sha256(digest) => {
            ring::digest::digest(&ring::digest::SHA256, der.as_ref()).as_ref() == digest
        }
    }
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// Reads `tls.crl`: PEM (`X509 CRL` blocks) or one DER list.
pub(crate) fn read_crls(path: &Path) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("tls.crl: reading {}", path.display()))?;
    let pem = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("tls.crl ({}): bad PEM: {e}", path.display()))?;
    if !pem.is_empty() {
        return Ok(pem);
    }
    if bytes.first() == Some(&0x30) {
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    bail!("tls.crl ({}): no X509 CRL block found", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        assert_eq!(
            ClientId::parse("cn:godoxy"),
            Ok(ClientId::Cn("godoxy".into()))
        );
        assert_eq!(
            ClientId::parse("SAN: a.example"),
            Ok(ClientId::San("a.example".into()))
        );
        let hex = "ab".repeat(32);
        assert_eq!(
            ClientId::parse(&format!("sha256:{hex}")),
            Ok(ClientId::Sha256([0xab; 32]))
        );
        assert!(ClientId::parse("sha256:abcd").is_err());
        assert!(ClientId::parse("godoxy").is_err());
        assert!(ClientId::parse("cn:").is_err());
        assert!(ClientId::parse("dn:x").is_err());
    }
}
