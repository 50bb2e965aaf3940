//! Client identity after the handshake: an expired certificate cannot come back through TLS
//! 1.3 resumption, `tls.allow_clients` (CN, SAN, SHA-256), `tls.crl`, and
//! `stream.idle_timeout` for TCP tunnels. Certificates are made here with rcgen, so each test
//! picks its client's names, serial number and validity.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use godoxy_agent::Config;
use godoxy_agent::client::ClientTls;
use godoxy_agent::protocol::{SERVER_NAME, TunnelHeader};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, PKCS_ECDSA_P256_SHA256,
    RevokedCertParams, SerialNumber,
};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

use crate::common::{Running, TcpEcho, TestDaemon, UdpEcho, field};

const HANDSHAKE: Duration = Duration::from_secs(5);
/// A bound for reads that must either answer or end; never asserted on.
const WAIT: Duration = Duration::from_secs(5);

/// A CA, the agent's certificate and key in a temporary folder, and client certificates on
/// demand.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A client certificate and its key, PEM, and the certificate's DER.
pub struct ClientCert {
    pub cert: String,
    pub key: String,
    pub der: Vec<u8>,
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

impl Pki {
    pub fn new(ca_name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn(ca_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(30);
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()]).unwrap();
        params.distinguished_name = dn(SERVER_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(30);
        let server = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        Self { dir, ca, ca_key }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A client certificate with common name `cn`, DNS names `sans`, serial `serial`, valid
    /// from a day ago until `not_after`.
    pub fn client(
        &self,
        cn: &str,
        sans: &[&str],
        serial: u64,
        not_after: OffsetDateTime,
    ) -> ClientCert {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = dn(cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from(serial));
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        ClientCert {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Our client trusting this CA and presenting `cert`.
    pub fn tls(&self, cert: &ClientCert) -> ClientTls {
        ClientTls::from_pem(
            self.ca_pem().as_bytes(),
            Some((cert.cert.as_bytes(), cert.key.as_bytes())),
        )
        .unwrap()
    }

    /// Our client trusting this CA and `other`'s, presenting `cert`: whether a handshake
    /// works is then up to the agent.
    pub fn tls_trusting_both(&self, other: &Pki, cert: &ClientCert) -> ClientTls {
        let cas = format!("{}{}", self.ca_pem(), other.ca_pem());
        ClientTls::from_pem(
            cas.as_bytes(),
            Some((cert.cert.as_bytes(), cert.key.as_bytes())),
        )
        .unwrap()
    }

    /// Writes `tls.crl` revoking `serials`; returns its path.
    pub fn write_crl(&self, serials: &[u64]) -> PathBuf {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + time::Duration::days(7),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - time::Duration::minutes(5),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.ca, &self.ca_key).unwrap();
        let path = self.path("revoked.crl");
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        path
    }

    /// A config for this PKI on 127.0.0.1:0 (TCP and UDP); `tls` and `stream` are extra
    /// lines of those sections.
    pub fn config_text(&self, tls: &str, stream: &str) -> String {
        format!(
            "name = \"identity-test\"\n\
             [listen]\ntcp = \"127.0.0.1:0\"\nudp = \"127.0.0.1:0\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{tls}\n\
             [stream]\n{stream}\n",
            self.path("ca.pem").display(),
            self.path("server.pem").display(),
            self.path("server.key").display(),
        )
    }

    pub async fn start(&self, tls: &str) -> TestDaemon {
        let text = self.config_text(tls, "");
        let config = Config::from_toml(&text, None, |_| None).unwrap().0;
        TestDaemon::start_config(config).await
    }
}

fn in_days(days: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::days(days)
}

fn header_to(addr: SocketAddr) -> TunnelHeader {
    TunnelHeader::new(&addr.ip().to_string(), &addr.port().to_string(), 0).unwrap()
}

/// Whether a TCP tunnel through the agent at `addr` echoes a few bytes.
pub async fn tcp_echoes(client: &ClientTls, addr: SocketAddr, echo: SocketAddr) -> bool {
    let Ok(mut tls) = client.open_tunnel(addr, &header_to(echo)).await else {
        return false;
    };
    if tls.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut back = [0u8; 4];
    let read = tokio::time::timeout(WAIT, tls.read_exact(&mut back)).await;
    matches!(read, Ok(Ok(_))) && &back == b"ping"
}

/// Whether a UDP tunnel through the agent's DTLS port `udp` echoes a datagram.
pub async fn udp_echoes(client: &ClientTls, udp: SocketAddr, echo: SocketAddr) -> bool {
    let Ok(tunnel) = client.open_udp(udp, &header_to(echo), HANDSHAKE).await else {
        return false;
    };
    if tunnel.send(b"ping").await.is_err() {
        return false;
    }
    let mut buf = godoxy_agent::client::UdpTunnel::buffer();
    let got = matches!(tunnel.recv(&mut buf, WAIT).await, Ok(Some(4))) && &buf[..4] == b"ping";
    tunnel.close().await;
    got
}

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}:"))
        .collect::<String>()
        .trim_end_matches(':')
        .to_owned()
}

#[tokio::test]
async fn allow_list_admits_by_cn_san_and_fingerprint_and_refuses_the_rest() {
    let pki = Pki::new("Identity CA");
    let by_cn = pki.client("godoxy-main", &[], 11, in_days(10));
    let by_san = pki.client("anything", &["proxy.example.org"], 12, in_days(10));
    let by_fp = pki.client("pinned", &[], 13, in_days(10));
    let other = pki.client("stranger", &["other.example.org"], 14, in_days(10));
    let tls = format!(
        "allow_clients = [\"cn:godoxy-main\", \"san:proxy.example.org\", \"sha256:{}\"]",
        sha256_hex(&by_fp.der)
    );
    let daemon = pki.start(&tls).await;
    let (tcp_echo, udp_echo) = (TcpEcho::start().await, UdpEcho::start().await);
    let udp = daemon.udp.unwrap();
    for (name, cert) in [("cn", &by_cn), ("san", &by_san), ("sha256", &by_fp)] {
        let client = pki.tls(cert);
        assert!(
            tcp_echoes(&client, daemon.addr, tcp_echo.addr).await,
            "{name}: TCP refused"
        );
        assert!(
            udp_echoes(&client, udp, udp_echo.addr).await,
            "{name}: UDP refused"
        );
    }
    let stranger = pki.tls(&other);
    assert!(!tcp_echoes(&stranger, daemon.addr, tcp_echo.addr).await);
    assert!(!udp_echoes(&stranger, udp, udp_echo.addr).await);
    // Nothing was dialed for the stranger: three TCP tunnels, three UDP sessions.
    assert_eq!(tcp_echo.accepted(), 3);
    daemon.stop().await;
}

#[tokio::test]
async fn a_revoked_client_is_refused_on_tcp_and_udp() {
    let pki = Pki::new("CRL CA");
    let good = pki.client("good", &[], 21, in_days(10));
    let revoked = pki.client("revoked", &[], 22, in_days(10));
    let crl = pki.write_crl(&[22, 99]);
    let daemon = pki.start(&format!("crl = \"{}\"", crl.display())).await;
    let (tcp_echo, udp_echo) = (TcpEcho::start().await, UdpEcho::start().await);
    let udp = daemon.udp.unwrap();
    let good = pki.tls(&good);
    assert!(tcp_echoes(&good, daemon.addr, tcp_echo.addr).await);
    assert!(udp_echoes(&good, udp, udp_echo.addr).await);
    let revoked = pki.tls(&revoked);
    assert!(!tcp_echoes(&revoked, daemon.addr, tcp_echo.addr).await);
    assert!(!udp_echoes(&revoked, udp, udp_echo.addr).await);
    assert_eq!(tcp_echo.accepted(), 1);
    daemon.stop().await;
}

#[tokio::test]
async fn a_crl_from_another_ca_is_a_start_up_error() {
    let pki = Pki::new("Agent CA");
    let other = Pki::new("Other CA");
    let crl = other.write_crl(&[1]);
    let text = pki.config_text(&format!("crl = \"{}\"", crl.display()), "");
    let config = Config::from_toml(&text, None, |_| None).unwrap().0;
    let err = match godoxy_agent::Daemon::bind(config).await {
        Ok(_) => panic!("a CRL of another CA was accepted"),
        Err(err) => format!("{err:#}"),
    };
    assert!(err.contains("tls.crl"), "{err}");
    assert!(err.contains("Other CA"), "{err}");
}

#[tokio::test]
async fn a_bad_allow_list_entry_names_the_key() {
    let pki = Pki::new("Agent CA");
    let text = pki.config_text("allow_clients = [\"godoxy-main\"]", "");
    let err = Config::from_toml(&text, None, |_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tls.allow_clients"), "{err}");
    assert!(err.contains("cn:NAME"), "{err}");
}

/// `openssl s_client` sending one HTTP request for the agent's name over ALPN http/1.1,
/// saving the session it receives to `sess_out` and offering `sess_in` when given. Returns
/// stdout.
async fn s_client(
    addr: SocketAddr,
    pki: &Pki,
    client: (&Path, &Path),
    sess_in: Option<&Path>,
    sess_out: &Path,
) -> String {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args([
            "-servername",
            SERVER_NAME,
            "-alpn",
            "http/1.1",
            "-tls1_3",
            "-ign_eof",
        ])
        .arg("-CAfile")
        .arg(pki.path("ca.pem"))
        .arg("-cert")
        .arg(client.0)
        .arg("-key")
        .arg(client.1)
        .arg("-sess_out")
        .arg(sess_out);
    if let Some(sess_in) = sess_in {
        cmd.arg("-sess_in").arg(sess_in);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let request = format!(
        "GET /godoxy/agent/name HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n"
    );
    stdin.write_all(request.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("openssl s_client did not finish within 10 s")
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_ticket_taken_while_the_certificate_was_valid_fails_after_it_expires() {
    let pki = Pki::new("Resumption CA");
    let config = pki.path("agent.toml");
    std::fs::write(&config, pki.config_text("", "")).unwrap();
    let mut agent = Running::start(&config);
    let listening = agent.wait_for(&["agent listening", "tcp=127.0.0.1:"]).await;
    let addr: SocketAddr = field(&listening, "tcp").parse().unwrap();

    // Valid for a few seconds from now: a full handshake, then a resumption, both in time.
    let not_after = OffsetDateTime::now_utc() + time::Duration::seconds(8);
    let short = pki.client("short-lived", &[], 31, not_after);
    let (cert, key) = (pki.path("short.pem"), pki.path("short.key"));
    std::fs::write(&cert, &short.cert).unwrap();
    std::fs::write(&key, &short.key).unwrap();
    let (first, second) = (pki.path("first.sess"), pki.path("second.sess"));

    let full = s_client(addr, &pki, (&cert, &key), None, &first).await;
    assert!(full.contains("HTTP/1.1 200"), "{full}");
    assert!(full.contains("\nNew, TLSv1.3"), "{full}");
    let resumed = s_client(addr, &pki, (&cert, &key), Some(&first), &second).await;
    assert!(resumed.contains("\nReused, TLSv1.3"), "{resumed}");
    assert!(resumed.contains("HTTP/1.1 200"), "{resumed}");

    // Past notAfter, the newest ticket still resumes the session, and the agent refuses it.
    let expiry = std::time::SystemTime::from(not_after) + Duration::from_secs(1);
    if let Ok(left) = expiry.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    let after = s_client(
        addr,
        &pki,
        (&cert, &key),
        Some(&second),
        &pki.path("third.sess"),
    )
    .await;
    assert!(after.contains("\nReused, TLSv1.3"), "{after}");
    assert!(!after.contains("HTTP/1.1"), "{after}");
    let refused = agent
        .wait_for(&["client refused", "client certificate expired"])
        .await;
    assert!(refused.contains("resumed=true"), "{refused}");
    assert!(refused.contains("CN=short-lived"), "{refused}");

    // A full handshake with the expired certificate fails as before.
    let fresh = s_client(addr, &pki, (&cert, &key), None, &pki.path("fourth.sess")).await;
    assert!(!fresh.contains("HTTP/1.1"), "{fresh}");
}

#[tokio::test]
async fn an_idle_tcp_tunnel_is_closed_with_reason_idle() {
    let pki = Pki::new("Idle CA");
    let config = pki.path("agent.toml");
    std::fs::write(&config, pki.config_text("", "idle_timeout = \"1s\"")).unwrap();
    let mut agent = Running::start(&config);
    let listening = agent.wait_for(&["agent listening", "tcp=127.0.0.1:"]).await;
    let addr: SocketAddr = field(&listening, "tcp").parse().unwrap();
    let echo = TcpEcho::start().await;
    let client = pki.tls(&pki.client("idle", &[], 41, in_days(10)));
    let mut tls = client
        .open_tunnel(addr, &header_to(echo.addr))
        .await
        .unwrap();
    tls.write_all(b"before idling").await.unwrap();
    let mut back = [0u8; 13];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"before idling");
    // Send nothing: the agent ends the tunnel, and the client sees the end.
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "the idle tunnel was not closed");
    assert!(rest.is_empty());
    let closed = agent.wait_for(&["tunnel closed", "reason=idle"]).await;
    assert_eq!(field(&closed, "up_bytes"), "13", "{closed}");
    assert_eq!(field(&closed, "down_bytes"), "13", "{closed}");
}
