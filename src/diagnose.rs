//! Certificate diagnosis for `doctor`: the server's chain as a TLS handshake shows it, and why
//! it would fail the checks a GoDoxy server makes (name, validity period, CA), in words.

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context as _, anyhow};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use x509_parser::prelude::{GeneralName, ParsedExtension, X509Certificate};

use crate::protocol::{ALPN_HTTP1, SERVER_NAME};

/// What a TLS handshake showed of the server.
pub struct ServerHello {
    /// The chain the server presented, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// `TLSv1_3` or `TLSv1_2`.
    pub protocol: String,
}

/// A TLS handshake on `tcp` that records the server's chain and accepts it whatever it is
/// (the handshake signature is still checked): judging the chain is [`judge_server_chain`]'s
/// work, so that a refusal can say why. No client certificate is sent.
pub async fn handshake_recording(tcp: TcpStream) -> anyhow::Result<ServerHello> {
    crate::tls::install_default_provider();
    let provider = crate::tls::client_provider();
    let recorder = Arc::new(Recorder {
        chain: Mutex::new(Vec::new()),
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("selecting TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| anyhow!("{e}"))?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let protocol = tls
        .get_ref()
        .1
        .protocol_version()
        .map_or_else(|| "TLS".to_owned(), |v| format!("{v:?}"));
    let chain = std::mem::take(
        &mut *recorder
            .chain
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    Ok(ServerHello { chain, protocol })
}

/// Why a server certificate fails GoDoxy's checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertProblem {
    /// Valid, from the right CA, but not for `godoxy.agent`.
    WrongName {
        /// The names it is for (DNS and IP SANs, else the subject CN).
        names: Vec<String>,
    },
    /// Past its end date.
    Expired {
        /// When it ended.
        not_after: String,
    },
    /// Before its start date: usually a clock that is behind (here or where it was made).
    NotYetValid {
        /// When it starts.
        not_before: String,
        /// This host's clock.
        now: String,
    },
    /// Not signed by the CA given.
    OtherCa {
        /// The certificate's issuer, with its key id.
        issuer: String,
        /// The trusted CA, with its key id.
        ca: String,
    },
    /// Anything else (unparsable, wrong key usage, …).
    Unusable(String),
}

impl std::fmt::Display for CertProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WrongName { names } => write!(
                f,
                "the certificate is for {}, GoDoxy expects {SERVER_NAME}",
                if names.is_empty() {
                    "no name".to_owned()
                } else {
                    names.join(", ")
                }
            ),
            Self::Expired { not_after } => write!(f, "the certificate expired on {not_after}"),
            Self::NotYetValid { not_before, now } => write!(
                f,
                "the certificate is not yet valid: it starts on {not_before}, this host's clock \
                 says {now} (clock skew?)"
            ),
            Self::OtherCa { issuer, ca } => write!(
                f,
                "the certificate is signed by another CA: issuer {issuer}, trusted CA {ca}"
            ),
            Self::Unusable(reason) => write!(f, "the certificate is refused: {reason}"),
        }
    }
}

/// Judges `chain` (leaf first) as a GoDoxy server does: it must chain to `ca_pem` and be valid
/// now for `godoxy.agent`. `Ok` carries a one-line summary (names and end date).
pub fn judge_server_chain(
    ca_pem: &[u8],
    chain: &[CertificateDer<'static>],
) -> anyhow::Result<Result<String, CertProblem>> {
    crate::tls::install_default_provider();
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Ok(Err(CertProblem::Unusable(
            "no certificate was presented".to_owned(),
        )));
    };
    let ca_certs = crate::tls::parse_certs(ca_pem).context("CA certificate")?;
    let mut roots = RootCertStore::empty();
    for cert in &ca_certs {
        roots.add(cert.clone()).context("CA certificate")?;
    }
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
            .build()
            .context("building the certificate verifier")?;
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| anyhow!("{e}"))?;
    let parsed = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map(|(_, cert)| cert)
        .map_err(|e| anyhow!("the server certificate does not parse: {e}"));
    let verdict = verifier.verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now());
    let parsed = match (verdict, parsed) {
        (Err(err), Err(_)) => return Ok(Err(CertProblem::Unusable(err.to_string()))),
        (_, Err(err)) => return Err(err),
        (verdict, Ok(parsed)) => match verdict {
            Ok(_) => {
                return Ok(Ok(format!(
                    "for {}, valid until {}",
                    names(&parsed).join(", "),
                    parsed.validity().not_after
                )));
            }
            Err(err) => (err, parsed),
        },
    };
    let (err, cert) = parsed;
    Ok(Err(classify(err, &cert, &ca_certs)))
}

/// A verifier's refusal of `cert` in words, with the dates, names and key ids that explain it.
fn classify(
    err: rustls::Error,
    cert: &X509Certificate<'_>,
    ca_certs: &[CertificateDer<'static>],
) -> CertProblem {
    let validity = cert.validity();
    match err {
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => CertProblem::Expired {
            not_after: validity.not_after.to_string(),
        },
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => CertProblem::NotYetValid {
            not_before: validity.not_before.to_string(),
            now: x509_parser::time::ASN1Time::now().to_string(),
        },
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => CertProblem::WrongName { names: names(cert) },
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => CertProblem::OtherCa {
            issuer: format!("{} (key id {})", cert.issuer(), authority_key_id(cert)),
            ca: ca_certs
                .first()
                .and_then(|c| x509_parser::parse_x509_certificate(c.as_ref()).ok())
                .map_or_else(
                    || "<unparsable>".to_owned(),
                    |(_, ca)| format!("{} (key id {})", ca.subject(), subject_key_id(&ca)),
                ),
        },
        other => CertProblem::Unusable(other.to_string()),
    }
}

/// As [`judge_server_chain`] for a chain in PEM (an agent's `tls.cert`).
pub fn judge_server_pem(
    ca_pem: &[u8],
    cert_pem: &[u8],
) -> anyhow::Result<Result<String, CertProblem>> {
    let chain = crate::tls::parse_certs(cert_pem).context("server certificate")?;
    judge_server_chain(ca_pem, &chain)
}

/// The DNS and IP names of a certificate's SAN, else its subject CN.
fn names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                    GeneralName::IPAddress(ip) => names.push(match ip.len() {
                        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default())
                            .to_string(),
                        16 => {
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default())
                                .to_string()
                        }
                        _ => "<bad IP>".to_owned(),
                    }),
                    _ => {}
                }
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(|cn| format!("CN={cn}")),
        );
    }
    names
}

/// The first 8 bytes of a key identifier, as `aa:bb:…`.
fn short_hex(bytes: &[u8]) -> String {
    let shown: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{}…", shown.join(":"))
}

fn authority_key_id(cert: &X509Certificate<'_>) -> String {
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|id| short_hex(id.0))
            }
            _ => None,
        })
        .unwrap_or_else(|| "none".to_owned())
}

fn subject_key_id(cert: &X509Certificate<'_>) -> String {
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(short_hex(id.0)),
            _ => None,
        })
        .unwrap_or_else(|| "none".to_owned())
}

/// Records the server's chain, accepts it, and checks handshake signatures as usual.
#[derive(Debug)]
struct Recorder {
    chain: Mutex<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *self.chain.lock().unwrap_or_else(PoisonError::into_inner) = chain;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether the client certificate in `cert_pem` chains to `ca_pem` and is valid now (what the
/// agent checks of a client certificate when its `tls.ca` is that CA).
pub fn judge_client_cert(
    ca_pem: &[u8],
    cert_pem: &[u8],
) -> anyhow::Result<Result<(), CertProblem>> {
    crate::tls::install_default_provider();
    let ca_certs = crate::tls::parse_certs(ca_pem).context("CA certificate")?;
    let mut roots = RootCertStore::empty();
    for cert in &ca_certs {
        roots.add(cert.clone()).context("CA certificate")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        crate::tls::provider(),
    )
    .build()
    .context("building the client certificate verifier")?;
    let chain = crate::tls::parse_certs(cert_pem).context("client certificate")?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Ok(Err(CertProblem::Unusable("no certificate".to_owned())));
    };
    let Err(err) = verifier.verify_client_cert(leaf, intermediates, UnixTime::now()) else {
        return Ok(Ok(()));
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| anyhow!("the client certificate does not parse: {e}"))?;
    Ok(Err(classify(err, &cert, &ca_certs)))
}
