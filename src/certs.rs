//! `certs init`: a CA, server and client certificate set with GoDoxy's profile.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::protocol::SERVER_NAME;

/// A generated set, as PEM text.
#[derive(Clone)]
pub struct CertSet {
    /// CA certificate.
    pub ca_cert: String,
    /// CA private key (SEC1).
    pub ca_key: String,
    /// Server certificate, signed by the CA.
    pub server_cert: String,
    /// Server private key (SEC1).
    pub server_key: String,
    /// Client certificate, signed by the CA.
    pub client_cert: String,
    /// Client private key (SEC1).
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

/// `O=GoDoxy[, OU=unit], CN=godoxy.agent`, in the order Go's x509 writes a name.
fn subject(unit: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "GoDoxy");
    if let Some(unit) = unit {
        dn.push(DnType::OrganizationalUnitName, unit);
    }
    dn.push(DnType::CommonName, SERVER_NAME);
    dn
}

/// A positive 128-bit random serial number.
fn serial() -> anyhow::Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for a serial number"))?;
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The key as SEC1 PEM (`EC PRIVATE KEY`) with its curve named, as Go's x509 writes keys
/// (without the curve, OpenSSL cannot tell what the key is).
fn sec1_pem(key: &KeyPair) -> anyhow::Result<String> {
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    use p256::pkcs8::{AssociatedOid as _, DecodePrivateKey as _};
    use sec1::der::EncodePem as _;
    let secret = p256::SecretKey::from_pkcs8_der(&key.serialize_der())
        .map_err(|e| anyhow::anyhow!("re-reading a new P-256 key: {e}"))?;
    let private = secret.to_bytes();
    let public = secret.public_key().to_encoded_point(false);
    let sec1 = sec1::EcPrivateKey {
        private_key: &private,
        parameters: Some(sec1::EcParameters::NamedCurve(p256::NistP256::OID)),
        public_key: Some(public.as_bytes()),
    };
    sec1.to_pem(sec1::LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("writing a key as SEC1: {e}"))
}

impl CertSet {
    /// A fresh set with the profile GoDoxy's own generator gives agents: ECDSA P-256 keys
    /// (written as SEC1 `EC PRIVATE KEY`), ECDSA-SHA256 signatures, 128-bit random serials;
    /// CA `O=GoDoxy, CN=godoxy.agent` (certSign and cRLSign, path length 0, a SHA-1 subject
    /// key identifier); server and client `O=GoDoxy, OU=Server|Client, CN=godoxy.agent` with
    /// SAN `godoxy.agent`, digitalSignature, serverAuth or clientAuth, and the CA's key
    /// identifier as authority key identifier. GoDoxy's are valid for 1000 years from the
    /// moment they are made; these start a day earlier, so a server whose clock is behind
    /// accepts them at once.
    pub fn generate() -> anyhow::Result<Self> {
        let now = OffsetDateTime::now_utc();
        let not_before = now - Duration::days(1);
        let not_after = now + Duration::days(365 * 1000);

        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name = subject(None);
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = not_before;
        ca.not_after = not_after;
        ca.serial_number = Some(serial()?);
        // RFC 5280's method 1, as Go's x509 computes it: SHA-1 of the public key bits.
        ca.key_identifier_method = KeyIdMethod::PreSpecified(
            ring::digest::digest(
                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                ca_key.public_key_raw(),
            )
            .as_ref()
            .to_vec(),
        );
        let ca_cert = ca.self_signed(&ca_key)?;

        let leaf = |eku: ExtendedKeyUsagePurpose, unit: &str| -> anyhow::Result<(String, String)> {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
            params.distinguished_name = subject(Some(unit));
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![eku];
            params.not_before = not_before;
            params.not_after = not_after;
            params.serial_number = Some(serial()?);
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
            Ok((cert.pem(), sec1_pem(&key)?))
        };
        let (server_cert, server_key) = leaf(ExtendedKeyUsagePurpose::ServerAuth, "Server")?;
        let (client_cert, client_key) = leaf(ExtendedKeyUsagePurpose::ClientAuth, "Client")?;
        Ok(Self {
            ca_cert: ca_cert.pem(),
            ca_key: sec1_pem(&ca_key)?,
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }

    /// The agent's certificates as GoDoxy's variables, in a form every common reader takes:
    /// `AGENT_CA_CERT="base64(CA cert PEM)"` (the CA key stays off the agent) and
    /// `AGENT_SSL_CERT="base64(cert PEM);base64(key PEM)"`. The double quotes keep the `;`
    /// out of a shell's reach (`set -a; . ./godoxy.env`); compose `.env`/`env_file` and
    /// systemd's `EnvironmentFile=` remove them; `docker|podman run --env-file` keeps them,
    /// and the agent removes them itself. Base64 has no character that needs escaping.
    pub fn godoxy_env(&self) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        format!(
            "# godoxy-agent: this agent's certificates in GoDoxy's variables. Use it as a compose\n\
             # .env or env_file, a systemd EnvironmentFile=, `set -a; . ./godoxy.env` in a shell,\n\
             # or `docker|podman run --env-file`. The CA's private key is not here: agents do not\n\
             # need it (it stays in ca.key, with whoever issues certificates).\n\
             AGENT_CA_CERT=\"{}\"\n\
             AGENT_SSL_CERT=\"{};{}\"\n",
            b64(&self.ca_cert),
            b64(&self.server_cert),
            b64(&self.server_key),
        )
    }

    /// What a GoDoxy server reads for an agent it did not create: `ca.pem`, `cert.pem` (the
    /// client certificate) and `key.pem` (its key), stored (not compressed) in a zip named
    /// after the address it dials.
    pub fn godoxy_zip(&self) -> anyhow::Result<Vec<u8>> {
        use zip::write::SimpleFileOptions;
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .unix_permissions(0o600);
        for (name, text) in [
            ("ca.pem", &self.ca_cert),
            ("cert.pem", &self.client_cert),
            ("key.pem", &self.client_key),
        ] {
            zip.start_file(name, options)
                .with_context(|| format!("adding {name} to the zip"))?;
            zip.write_all(text.as_bytes())
                .with_context(|| format!("adding {name} to the zip"))?;
        }
        Ok(zip.finish().context("finishing the zip")?.into_inner())
    }

    /// Writes `<addr>.zip` (see [`CertSet::godoxy_zip`]) into `dir`, mode 0600. `addr` is the
    /// `host:port` the GoDoxy server will dial, as it will be written under
    /// `providers.agents`.
    pub fn write_godoxy_zip(&self, dir: &Path, addr: &str, force: bool) -> anyhow::Result<PathBuf> {
        check_agent_addr(addr)?;
        let path = dir.join(format!("{addr}.zip"));
        if !force && path.exists() {
            bail!(
                "refusing to overwrite {} (use --force to replace it)",
                path.display()
            );
        }
        let bytes = self.godoxy_zip()?;
        write_file(&path, &bytes, 0o600).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
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

/// `host:port` as GoDoxy takes an agent address, and usable as a file name.
fn check_agent_addr(addr: &str) -> anyhow::Result<()> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        bail!("--godoxy-addr {addr:?}: expected HOST:PORT, the address the GoDoxy server dials");
    };
    if host.is_empty()
        || !host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
        })
    {
        bail!("--godoxy-addr {addr:?}: {host:?} is not a host name or IP address");
    }
    if !port.parse::<u16>().is_ok_and(|p| p != 0) {
        bail!("--godoxy-addr {addr:?}: {port:?} is not a port (1-65535)");
    }
    Ok(())
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
