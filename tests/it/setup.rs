//! Bringing an agent into GoDoxy from the agent's side: `certs init --godoxy-addr` writes the
//! zip GoDoxy reads, the certificates have GoDoxy's profile field by field, and `godoxy.env`
//! starts the agent whichever way an operator feeds it (a shell, podman's --env-file).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::common::{Running, agent, field, run};

/// `certs init --out DIR --godoxy-addr ADDR`; returns stdout.
async fn certs_init(dir: &Path, addr: &str) -> String {
    let out = run(agent()
        .arg("certs")
        .arg("init")
        .arg("--out")
        .arg(dir)
        .arg("--godoxy-addr")
        .arg(addr))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn certs_init_writes_the_zip_godoxy_reads_and_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("set");
    let stdout = certs_init(&dir, "10.1.2.3:8890").await;
    let zip_path = dir.join("10.1.2.3:8890.zip");
    let mode = std::fs::metadata(&zip_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "zip mode {mode:o}");
    assert!(
        stdout.contains(&format!("wrote {}", zip_path.display())),
        "{stdout}"
    );
    // The two steps on the GoDoxy side.
    assert!(stdout.contains("certs/"), "{stdout}");
    assert!(stdout.contains("providers:"), "{stdout}");
    assert!(stdout.contains("agents:"), "{stdout}");
    assert!(stdout.contains("- 10.1.2.3:8890"), "{stdout}");

    // Exactly ca.pem, cert.pem (the client certificate) and key.pem (its key), as unzip sees.
    let listing = run(Command::new("unzip").arg("-Z1").arg(&zip_path)).await;
    assert!(listing.status.success(), "unzip is needed for this test");
    let names = String::from_utf8_lossy(&listing.stdout);
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        ["ca.pem", "cert.pem", "key.pem"]
    );
    for (inside, file) in [
        ("ca.pem", "ca.pem"),
        ("cert.pem", "client.pem"),
        ("key.pem", "client.key"),
    ] {
        let out = run(Command::new("unzip").arg("-p").arg(&zip_path).arg(inside)).await;
        assert_eq!(
            out.stdout,
            std::fs::read(dir.join(file)).unwrap(),
            "{inside}"
        );
    }
    let modes = run(Command::new("unzip").arg("-Z").arg(&zip_path)).await;
    let modes = String::from_utf8_lossy(&modes.stdout);
    assert_eq!(modes.matches("-rw-------").count(), 3, "{modes}");

    // A bad address is refused before anything is written.
    let out = run(agent()
        .arg("certs")
        .arg("init")
        .arg("--out")
        .arg(tmp.path().join("bad"))
        .arg("--godoxy-addr")
        .arg("../x:1"))
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--godoxy-addr"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Go's crypto/tls is not here: the profile is checked field by field with Python's
/// `cryptography`, the way GoDoxy's generator writes it.
const PROFILE_CHECK: &str = r#"
import hashlib, sys, datetime
from cryptography import x509
from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID, ExtensionOID
from cryptography.hazmat.primitives import serialization, hashes
from cryptography.hazmat.primitives.asymmetric import ec

d = sys.argv[1]
def cert(name):
    return x509.load_pem_x509_certificate(open(f"{d}/{name}", "rb").read())
def ext(c, oid):
    return c.extensions.get_extension_for_oid(oid)
def names(n):
    return [(a.oid, a.value) for a in n]

ca, server, client = cert("ca.pem"), cert("server.pem"), cert("client.pem")
O, OU, CN = NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME
assert names(ca.subject) == [(O, "GoDoxy"), (CN, "godoxy.agent")], ca.subject
assert names(server.subject) == [(O, "GoDoxy"), (OU, "Server"), (CN, "godoxy.agent")], server.subject
assert names(client.subject) == [(O, "GoDoxy"), (OU, "Client"), (CN, "godoxy.agent")], client.subject
for c in (ca, server, client):
    assert c.issuer == ca.subject
    assert isinstance(c.public_key(), ec.EllipticCurvePublicKey)
    assert c.public_key().curve.name == "secp256r1"
    assert c.signature_hash_algorithm.name == "sha256"
    assert 0 < c.serial_number < 2**128
    days = (c.not_valid_after_utc - c.not_valid_before_utc).days
    assert days > 365 * 999, days

bc = ext(ca, ExtensionOID.BASIC_CONSTRAINTS)
assert bc.critical and bc.value.ca and bc.value.path_length == 0
ku = ext(ca, ExtensionOID.KEY_USAGE)
assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
ski = ext(ca, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value.digest
raw = ca.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
assert ski == hashlib.sha1(raw).digest(), "CA key id is not SHA-1 of the key, as Go writes it"

for c, eku in ((server, ExtendedKeyUsageOID.SERVER_AUTH), (client, ExtendedKeyUsageOID.CLIENT_AUTH)):
    san = ext(c, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value.get_values_for_type(x509.DNSName)
    assert san == ["godoxy.agent"], san
    ku = ext(c, ExtensionOID.KEY_USAGE)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext(c, ExtensionOID.EXTENDED_KEY_USAGE).value) == [eku]
    aki = ext(c, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value.key_identifier
    assert aki == ski, "leaf's authority key id is not the CA's key id"
    try:
        ext(c, ExtensionOID.BASIC_CONSTRAINTS)
        raise AssertionError("a leaf has basic constraints; Go writes none")
    except x509.ExtensionNotFound:
        pass

for key, c in (("ca.key", ca), ("server.key", server), ("client.key", client)):
    pem = open(f"{d}/{key}", "rb").read()
    assert pem.startswith(b"-----BEGIN EC PRIVATE KEY-----"), key
    k = serialization.load_pem_private_key(pem, None)
    assert k.public_key().public_numbers() == c.public_key().public_numbers(), key
print("profile ok")
"#;

#[tokio::test]
async fn certificates_have_godoxys_profile_and_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("set");
    certs_init(&dir, "127.0.0.1:8890").await;
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(PROFILE_CHECK)
        .arg(&dir))
    .await;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The agent serves with the set, and a client holding only the zip's three files (what a
    // GoDoxy server has) gets /info and both probes.
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"127.0.0.1:0\"\n[docker]\naccess = \"off\"\n\
             [tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/server.pem\"\nkey = \"{0}/server.key\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut agent = Running::start(&config);
    let listening = agent.wait_for(&["agent listening"]).await;
    let tcp: SocketAddr = field(&listening, "tcp").parse().unwrap();
    let udp: SocketAddr = field(&listening, "udp").parse().unwrap();
    let godoxy_side = unzip_to(&dir.join("127.0.0.1:8890.zip"), &tmp.path().join("godoxy")).await;
    let client = godoxy_agent::client::ClientTls::from_pem(
        &std::fs::read(godoxy_side.join("ca.pem")).unwrap(),
        Some((
            &std::fs::read(godoxy_side.join("cert.pem")).unwrap(),
            &std::fs::read(godoxy_side.join("key.pem")).unwrap(),
        )),
    )
    .unwrap();
    let info = client
        .fetch_info(tcp, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(info.version, "v0.31.0");
    client.probe_tcp(tcp, Duration::from_secs(5)).await.unwrap();
    client.probe_udp(udp, Duration::from_secs(5)).await.unwrap();
    let _ = agent.child.kill().await;
}

async fn unzip_to(zip: &Path, dir: &Path) -> PathBuf {
    let out = run(Command::new("unzip")
        .arg("-o")
        .arg("-q")
        .arg(zip)
        .arg("-d")
        .arg(dir))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_owned()
}

/// A config that takes its certificates from the environment only.
fn env_only_config(dir: &Path) -> PathBuf {
    let config = dir.join("env-agent.toml");
    std::fs::write(
        &config,
        "name = \"env-agent\"\n[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"\"\n\
         [docker]\naccess = \"off\"\n\
         [tls]\nca = \"/nonexistent/ca.pem\"\ncert = \"/nonexistent/server.pem\"\n\
         key = \"/nonexistent/server.key\"\n",
    )
    .unwrap();
    config
}

/// The agent started with `env`, answering a client of the same set: it loaded the
/// certificates from the environment.
async fn serves_with(cmd: Command, set: &Path) {
    let mut agent = Running::spawn(cmd);
    let listening = agent.wait_for(&["agent listening"]).await;
    let tcp: SocketAddr = field(&listening, "tcp").parse().unwrap();
    let client = godoxy_agent::client::ClientTls::from_dir(set).unwrap();
    let info = client
        .fetch_info(tcp, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(info.name, "env-agent");
    assert!(
        !agent.log.iter().any(|l| l.contains("WARN")),
        "{}",
        agent.log.join("\n")
    );
    let _ = agent.child.kill().await;
}

#[tokio::test]
async fn godoxy_env_sourced_by_a_shell_starts_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let set = tmp.path().join("set");
    certs_init(&set, "127.0.0.1:8890").await;
    let config = env_only_config(tmp.path());
    let mut shell = Command::new("bash");
    shell
        .arg("-c")
        .arg("set -a; . \"$1\"; set +a; exec \"$2\" run --config \"$3\"")
        .arg("bash")
        .arg(set.join("godoxy.env"))
        .arg(crate::common::bin())
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    serves_with(shell, &set).await;
}

/// podman's `--env-file` keeps the double quotes in the value; the agent takes them off.
/// The values are read back from a real container's environment.
#[tokio::test]
async fn godoxy_env_through_podmans_env_file_starts_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let set = tmp.path().join("set");
    certs_init(&set, "127.0.0.1:8890").await;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker-engine");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/docker-engine.sh");
    // The engine's storage holds the test image (scripts/docker-engine.sh builds it).
    crate::docker::engine();
    let out = run(Command::new("bash")
        .arg(&script)
        .arg("podman")
        .arg(&dir)
        .args(["run", "--rm", "--env-file"])
        .arg(set.join("godoxy.env"))
        .args(["localhost/godoxy-test:latest", "env"]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut cmd = agent();
    let mut seen = 0;
    for line in env.lines() {
        if let Some((name, value)) = line.split_once('=')
            && name.starts_with("AGENT_")
        {
            assert!(
                value.starts_with('"'),
                "podman passed {name} without its quotes"
            );
            cmd.env(name, value);
            seen += 1;
        }
    }
    assert_eq!(seen, 2, "{env}");
    cmd.arg("run")
        .arg("--config")
        .arg(env_only_config(tmp.path()))
        .env("RUST_LOG", "info");
    serves_with(cmd, &set).await;
}
