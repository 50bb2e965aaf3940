//! `certs init`: a CA, server and client certificate set with GoDoxy's profile.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::protocol::SERVER_NAME;

/// A generated set, as PEM text.
#[derive(Clone)]
pub struct CertSet {
    /// CA certificate.
    pub ca_cert: String,
    /// CA private key (PKCS#8).
    pub ca_key: String,
    /// Server certificate, signed by the CA.
    pub server_cert: String,
    /// Server private key (PKCS#8).
    pub server_key: String,
    /// Client certificate, signed by the CA.
    pub client_cert: String,
    /// Client private key (PKCS#8).
    pub client_key: String,
}

/// The file names `certs init` writes, in order.
pub const FILES: [&str; 6] = [
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
];

impl CertSet {
    /// A fresh set: ECDSA P-256, SHA-256, valid from yesterday for ten years.
    pub fn generate() -> anyhow::Result<Self> {
        let now = OffsetDateTime::now_utc();
        let not_before = now - Duration::days(1);
        let not_after = now + Duration::days(3650);

        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, SERVER_NAME);
        dn.push(DnType::OrganizationName, "GoDoxy");
        ca.distinguished_name = dn;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.not_before = not_before;
        ca.not_after = not_after;
        let ca_cert = ca.self_signed(&ca_key)?;

        let leaf = |eku: ExtendedKeyUsagePurpose, cn: &str| -> anyhow::Result<(String, String)> {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn);
            dn.push(DnType::OrganizationName, "GoDoxy");
            params.distinguished_name = dn;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![eku];
            params.not_before = not_before;
            params.not_after = not_after;
            let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) =
            leaf(ExtendedKeyUsagePurpose::ServerAuth, "godoxy-agent server")?;
        let (client_cert, client_key) =
            leaf(ExtendedKeyUsagePurpose::ClientAuth, "godoxy-agent client")?;
        Ok(Self {
            ca_cert: ca_cert.pem(),
            ca_key: ca_key.serialize_pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }

    /// `AGENT_CA_CERT` and `AGENT_SSL_CERT` lines in GoDoxy's `base64(cert);base64(key)` form.
    pub fn godoxy_env(&self) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        format!(
            "# GoDoxy agent environment (base64(cert PEM);base64(key PEM)).\n\
             # godoxy-agent needs only the CA certificate: it drops the CA key part with a warning,\n\
             # and `AGENT_CA_CERT=<base64 cert>` alone also works. Keep the CA key off agents.\n\
             AGENT_CA_CERT={};{}\n\
             AGENT_SSL_CERT={};{}\n",
            b64(&self.ca_cert),
            b64(&self.ca_key),
            b64(&self.server_cert),
            b64(&self.server_key),
        )
    }

    /// Writes the six PEM files and `godoxy.env` into `dir` (keys mode 0600). Without
    /// `force`, refuses when any of them exists.
    pub fn write(&self, dir: &Path, force: bool) -> anyhow::Result<Vec<PathBuf>> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let contents = [
            (FILES[0], self.ca_cert.as_str(), 0o644),
            (FILES[1], self.ca_key.as_str(), 0o600),
            (FILES[2], self.server_cert.as_str(), 0o644),
            (FILES[3], self.server_key.as_str(), 0o600),
            (FILES[4], self.client_cert.as_str(), 0o644),
            (FILES[5], self.client_key.as_str(), 0o600),
        ];
        let env = self.godoxy_env();
        let all: Vec<(&str, &str, u32)> = contents
            .into_iter()
            .chain([("godoxy.env", env.as_str(), 0o600)])
            .collect();
        if !force {
            let existing: Vec<String> = all
                .iter()
                .map(|(name, _, _)| dir.join(name))
                .filter(|p| p.exists())
                .map(|p| p.display().to_string())
                .collect();
            if !existing.is_empty() {
                bail!(
                    "refusing to overwrite {} (use --force to replace them)",
                    existing.join(", ")
                );
            }
        }
        let mut written = Vec::new();
        for (name, text, mode) in all {
            let path = dir.join(name);
            write_file(&path, text.as_bytes(), mode)
                .with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
        Ok(written)
    }
}

/// Creates `path`, failing when it exists (no overwrite, even in a race).
fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    // An existing file keeps its old mode through open(): set it explicitly.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Where a generated trial set was written.
pub struct TrialSet {
    /// The folder with the client certificate and key, `ca.key` and `godoxy.env`.
    pub dir: PathBuf,
}

/// With `tls.generate_if_missing`, creates a certificate set when none of the configured files
/// exists: the CA, server certificate and key at the configured paths, the client pair,
/// `ca.key` and `godoxy.env` beside the server certificate. Returns `None` when nothing was
/// needed. Some files present and others missing is an error: never overwrite half a set.
pub fn generate_if_missing(tls: &crate::config::TlsConfig) -> anyhow::Result<Option<TrialSet>> {
    use crate::config::PemSource;
    if !tls.generate_if_missing {
        return Ok(None);
    }
    let (PemSource::File(ca), PemSource::File(cert), PemSource::File(key)) =
        (&tls.ca, &tls.cert, &tls.key)
    else {
        return Ok(None);
    };
    let present: Vec<&PathBuf> = [ca, cert, key].into_iter().filter(|p| p.exists()).collect();
    match present.len() {
        3 => return Ok(None),
        0 => {}
        _ => bail!(
            "tls.generate_if_missing: {} exist(s) but not all of tls.ca, tls.cert, tls.key do; \
             refusing to generate over a partial set",
            present
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
    let dir = cert.parent().map(Path::to_owned).unwrap_or_default();
    let set = CertSet::generate()?;
    let env = set.godoxy_env();
    let files = [
        (ca.clone(), set.ca_cert.as_str(), 0o644),
        (cert.clone(), set.server_cert.as_str(), 0o644),
        (key.clone(), set.server_key.as_str(), 0o600),
        (dir.join("client.pem"), set.client_cert.as_str(), 0o644),
        (dir.join("client.key"), set.client_key.as_str(), 0o600),
        (dir.join("ca.key"), set.ca_key.as_str(), 0o600),
        (dir.join("godoxy.env"), env.as_str(), 0o600),
    ];
    // The client half, CA key and env file sit beside the server certificate: any of them
    // left from another set would be overwritten or mismatched. Never overwrite.
    let leftovers: Vec<String> = files[3..]
        .iter()
        .filter(|(path, _, _)| path.exists())
        .map(|(path, _, _)| path.display().to_string())
        .collect();
    if !leftovers.is_empty() {
        bail!(
            "tls.generate_if_missing: tls.ca, tls.cert and tls.key are missing but {} exist(s) \
             beside them; refusing to overwrite (move them away or point tls.* at that set)",
            leftovers.join(", ")
        );
    }
    for (path, _, _) in &files {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    for (path, text, mode) in files {
        write_new_file(&path, text.as_bytes(), mode)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(Some(TrialSet { dir }))
}
