//! The `godoxy-agent` command as an operator runs it: `certs init`, `check-config`, and `run`
//! with its log lines and SIGTERM shutdown.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Running, TcpEcho, TestPki, agent, field};
use base64::Engine as _;
use godoxy_agent::client::ClientTls;
use godoxy_agent::protocol::TunnelHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Runs to completion (10 s at most).
async fn output(cmd: &mut Command) -> Output {
    tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("command did not finish within 10 s")
        .expect("command could not be started")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn openssl(args: &[&str], dir: &Path) -> String {
    let out = output(
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null()),
    )
    .await;
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn b64_decode(value: &str) -> String {
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(value)
            .unwrap(),
    )
    .unwrap()
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

// ---------------------------------------------------------------------------------------------
// certs init

#[tokio::test]
async fn certs_init_writes_the_set_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs"); // created by the command
    let out = output(agent().arg("certs").arg("init").arg("--out").arg(&dir)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);

    let expected = [
        ("ca.pem", 0o644),
        ("ca.key", 0o600),
        ("server.pem", 0o644),
        ("server.key", 0o600),
        ("client.pem", 0o644),
        ("client.key", 0o600),
        ("godoxy.env", 0o600),
    ];
    for (name, mode) in expected {
        let path = dir.join(name);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            meta.permissions().mode() & 0o777,
            mode,
            "{name}: mode {:o}",
            meta.permissions().mode() & 0o777
        );
        assert!(
            stdout.contains(&format!("wrote {}", path.display())),
            "{stdout}"
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    want.sort();
    assert_eq!(names, want);
    for key in ["ca.key", "server.key", "client.key"] {
        let pem = std::fs::read_to_string(dir.join(key)).unwrap();
        assert!(pem.contains("PRIVATE KEY-----"), "{key}: {pem}");
    }
    let first_ca = std::fs::read(dir.join("ca.pem")).unwrap();

    // Again without --force: refused, nothing changed.
    let out = output(agent().arg("certs").arg("init").arg("--out").arg(&dir)).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    assert!(
        stderr.contains(&dir.join("ca.pem").display().to_string()),
        "{stderr}"
    );
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), first_ca);

    // A single existing file is enough to refuse.
    let partial = tmp.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("client.key"), "mine").unwrap();
    let out = output(agent().arg("certs").arg("init").arg("--out").arg(&partial)).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("refusing to overwrite"));
    assert_eq!(
        std::fs::read_to_string(partial.join("client.key")).unwrap(),
        "mine"
    );
    assert!(!partial.join("ca.pem").exists(), "wrote part of a set");

    // With --force: a new set, modes kept.
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = output(
        agent()
            .arg("certs")
            .arg("init")
            .arg("--out")
            .arg(&dir)
            .arg("--force"),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_ne!(std::fs::read(dir.join("ca.pem")).unwrap(), first_ca);
    for (name, mode) in expected {
        let meta = std::fs::metadata(dir.join(name)).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            mode,
            "{name} after --force"
        );
    }
    // The new set works with our client.
    ClientTls::from_dir(&dir).unwrap();
}

#[tokio::test]
async fn certs_init_has_godoxys_profile() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = output(agent().arg("certs").arg("init").arg("--out").arg(dir)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    let ca = openssl(&["x509", "-in", "ca.pem", "-noout", "-text"], dir).await;
    // GoDoxy's profile, names in the order Go's x509 writes them.
    assert!(
        ca.contains("Subject: O = GoDoxy, CN = godoxy.agent"),
        "{ca}"
    );
    assert!(ca.contains("Issuer: O = GoDoxy, CN = godoxy.agent"), "{ca}");
    assert!(ca.contains("CA:TRUE, pathlen:0"), "{ca}");
    assert!(ca.contains("Certificate Sign, CRL Sign"), "{ca}");
    assert!(ca.contains("ASN1 OID: prime256v1"), "{ca}");
    assert!(
        ca.contains("Signature Algorithm: ecdsa-with-SHA256"),
        "{ca}"
    );

    let server = openssl(&["x509", "-in", "server.pem", "-noout", "-text"], dir).await;
    assert!(
        server.contains("Subject: O = GoDoxy, OU = Server, CN = godoxy.agent"),
        "{server}"
    );
    assert!(server.contains("DNS:godoxy.agent"), "{server}");
    assert!(server.contains("TLS Web Server Authentication"), "{server}");
    assert!(
        !server.contains("TLS Web Client Authentication"),
        "{server}"
    );
    assert!(!server.contains("CA:TRUE"), "{server}");
    assert!(
        server.contains("Issuer: O = GoDoxy, CN = godoxy.agent"),
        "{server}"
    );
    assert!(server.contains("ASN1 OID: prime256v1"), "{server}");
    assert!(
        server.contains("Signature Algorithm: ecdsa-with-SHA256"),
        "{server}"
    );

    let client = openssl(&["x509", "-in", "client.pem", "-noout", "-text"], dir).await;
    assert!(
        client.contains("Subject: O = GoDoxy, OU = Client, CN = godoxy.agent"),
        "{client}"
    );
    assert!(client.contains("DNS:godoxy.agent"), "{client}");
    assert!(client.contains("TLS Web Client Authentication"), "{client}");
    assert!(
        !client.contains("TLS Web Server Authentication"),
        "{client}"
    );
    assert!(
        client.contains("Issuer: O = GoDoxy, CN = godoxy.agent"),
        "{client}"
    );

    for key in ["ca.key", "server.key", "client.key"] {
        let text = openssl(&["pkey", "-in", key, "-noout", "-text"], dir).await;
        assert!(text.contains("ASN1 OID: prime256v1"), "{key}: {text}");
    }
    // Each key belongs to its certificate.
    for (cert, key) in [
        ("ca.pem", "ca.key"),
        ("server.pem", "server.key"),
        ("client.pem", "client.key"),
    ] {
        let from_cert = openssl(&["x509", "-in", cert, "-noout", "-pubkey"], dir).await;
        let from_key = openssl(&["pkey", "-in", key, "-pubout"], dir).await;
        assert_eq!(from_cert, from_key, "{cert} and {key} do not match");
    }

    let verify = openssl(
        &["verify", "-CAfile", "ca.pem", "server.pem", "client.pem"],
        dir,
    )
    .await;
    assert_eq!(verify, "server.pem: OK\nclient.pem: OK\n");
    let verify = openssl(
        &[
            "verify",
            "-CAfile",
            "ca.pem",
            "-purpose",
            "sslserver",
            "-verify_hostname",
            "godoxy.agent",
            "server.pem",
        ],
        dir,
    )
    .await;
    assert_eq!(verify, "server.pem: OK\n");
    let verify = openssl(
        &[
            "verify",
            "-CAfile",
            "ca.pem",
            "-purpose",
            "sslclient",
            "client.pem",
        ],
        dir,
    )
    .await;
    assert_eq!(verify, "client.pem: OK\n");

    // godoxy.env: GoDoxy's variables for the files just written, quoted (a shell would cut
    // the value at the `;`); the CA key stays out.
    let env = std::fs::read_to_string(dir.join("godoxy.env")).unwrap();
    let value = |var: &str| {
        let quoted = env
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{var}=")))
            .unwrap_or_else(|| panic!("no {var}= line in:\n{env}"));
        quoted
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{var} is not double-quoted: {quoted}"))
            .to_owned()
    };
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let ssl = value("AGENT_SSL_CERT");
    let (cert, key) = ssl.split_once(';').unwrap();
    assert_eq!(b64_decode(cert), read("server.pem"));
    assert_eq!(b64_decode(key), read("server.key"));
    let ca = value("AGENT_CA_CERT");
    assert!(!ca.contains(';'), "the CA key is in godoxy.env");
    assert_eq!(b64_decode(&ca), read("ca.pem"));
}

// ---------------------------------------------------------------------------------------------
// check-config

#[tokio::test]
async fn check_config_lists_every_error() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.toml");
    std::fs::write(
        &path,
        "name = \"\"\n[stream]\nheader_timeout = \"0s\"\ndial_timeout = \"0s\"\n",
    )
    .unwrap();
    let out = output(
        agent()
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .env("RUNTIME", "lxc"),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("godoxy-agent: invalid configuration:\n"),
        "{stderr}"
    );
    let file = path.display().to_string();
    for line in [
        format!("  {file}: `name`: must not be empty"),
        format!("  {file}: `stream.header_timeout`: must be longer than 0s"),
        format!("  {file}: `stream.dial_timeout`: must be longer than 0s"),
        "  environment variable RUNTIME: `lxc` is not one of docker, podman".to_owned(),
    ] {
        assert!(
            stderr.lines().any(|l| l == line),
            "missing {line:?} in:\n{stderr}"
        );
    }

    // A syntax error names the key and the line.
    std::fs::write(&path, "[listen]\ntcp = \"0.0.0.0:8890\"\nport = 1\n").unwrap();
    let out = output(agent().arg("check-config").arg("--config").arg(&path)).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unknown field `port`"), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");

    // A missing file names the file.
    let missing = tmp.path().join("missing.toml");
    let out = output(agent().arg("check-config").arg("--config").arg(&missing)).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&missing.display().to_string()),
        "{}",
        text(&out.stderr)
    );

    // Certificate files that do not exist are caught too, naming the key.
    std::fs::write(
        &path,
        "[tls]\nca = \"nope/ca.pem\"\ncert = \"nope/server.pem\"\nkey = \"nope/server.key\"\n",
    )
    .unwrap();
    let out = output(agent().arg("check-config").arg("--config").arg(&path)).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("tls.ca"), "{stderr}");
    assert!(stderr.contains("nope/ca.pem"), "{stderr}");
}

#[tokio::test]
async fn check_config_prints_the_example_without_key_material() {
    // The example, in a folder of its own with a certificate set where it points, so that
    // check-config loads real key material (a clean clone has no config/certs/).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("godoxy-agent.toml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/godoxy-agent.toml"),
        &path,
    )
    .unwrap();
    godoxy_agent::certs::CertSet::generate()
        .unwrap()
        .write(&dir.path().join("certs"), false)
        .unwrap();
    let out = output(agent().arg("check-config").arg("--config").arg(&path)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("# effective configuration"), "{stdout}");
    for line in [
        "runtime = \"docker\"",
        "tcp = \"[::]:8890\"",
        "udp = \"[::]:8890\"",
        "require_client_cert = true",
        "generate_if_missing = true",
        "header_timeout = \"10s\"",
        "max_connections = 4096",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing {line:?}:\n{stdout}"
        );
    }
    let certs = path.parent().unwrap().join("certs");
    assert!(
        stdout.contains(&format!("key = \"{}\"", certs.join("server.key").display())),
        "{stdout}"
    );
    // The printed text is itself a configuration that loads.
    godoxy_agent::Config::from_toml(&stdout, None, |_| None).unwrap();
    let key = std::fs::read_to_string(certs.join("server.key")).unwrap();
    let all = format!("{stdout}{}", text(&out.stderr));
    assert!(!all.contains("PRIVATE KEY"), "{all}");
    assert!(!all.contains("-----BEGIN"), "{all}");
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!all.contains(line), "key text printed: {all}");
    }
}

#[tokio::test]
async fn check_config_masks_environment_certificates() {
    let pki = TestPki::new();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("agent.toml");
    std::fs::write(&path, "[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"\"\n").unwrap();
    let set = &pki.set;
    let ssl = format!("{};{}", b64(&set.server_cert), b64(&set.server_key));
    let ca = format!("{};{}", b64(&set.ca_cert), b64(&set.ca_key));
    let out = output(
        agent()
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .env("AGENT_SSL_CERT", &ssl)
            .env("AGENT_CA_CERT", &ca),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        stdout.contains("cert = \"<from $AGENT_SSL_CERT, elided>\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("key = \"<from $AGENT_SSL_CERT, elided>\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("ca = \"<from $AGENT_CA_CERT, elided>\""),
        "{stdout}"
    );
    assert!(
        stderr.contains("warning: AGENT_CA_CERT carries the CA private key"),
        "{stderr}"
    );
    let all = format!("{stdout}{stderr}");
    assert!(!all.contains("PRIVATE KEY"), "{all}");
    assert!(!all.contains("-----BEGIN"), "{all}");
    for secret in [&set.server_key, &set.ca_key] {
        let encoded = b64(secret);
        // Any 16-character run of the base64 value or of the PEM body would be a leak.
        for chunk in encoded.as_bytes().chunks(16).filter(|c| c.len() == 16) {
            let chunk = std::str::from_utf8(chunk).unwrap();
            assert!(
                !all.contains(chunk),
                "base64 key text {chunk} printed:\n{all}"
            );
        }
        for line in secret.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!all.contains(line), "PEM key text printed:\n{all}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// run

#[tokio::test]
async fn run_serves_logs_tunnels_and_stops_on_sigterm() {
    let pki = TestPki::new();
    let config = pki.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"cli-agent\"\n[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"\"\n\
             [docker]\naccess = \"off\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
        ),
    )
    .unwrap();
    let mut agent = Running::start(&config);

    let listening = agent.wait_for(&["agent listening", "tcp=127.0.0.1:"]).await;
    let addr: SocketAddr = field(&listening, "tcp").parse().unwrap();
    assert_ne!(addr.port(), 0);
    assert!(listening.contains("INFO"), "{listening}");

    // A tunnel to an echo.
    let echo = TcpEcho::start().await;
    let client = pki.client();
    let header = TunnelHeader::new(
        &echo.addr.ip().to_string(),
        &echo.addr.port().to_string(),
        0,
    )
    .unwrap();
    let mut tls = client.open_tunnel(addr, &header).await.unwrap();
    tls.write_all(b"hello, agent").await.unwrap();
    let mut back = [0u8; 12];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello, agent");
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    drop(tls);

    let closed = agent.wait_for(&["tunnel closed", "reason=eof"]).await;
    assert_eq!(
        field(&closed, "destination"),
        echo.addr.to_string(),
        "{closed}"
    );
    assert_eq!(field(&closed, "up_bytes"), "12", "{closed}");
    assert_eq!(field(&closed, "down_bytes"), "12", "{closed}");
    field(&closed, "duration_ms")
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("duration_ms not a number: {closed}"));
    assert!(
        closed.contains("OU=Client") && closed.contains("CN=godoxy.agent"),
        "no client subject: {closed}"
    );
    assert!(closed.contains("O=GoDoxy"), "{closed}");
    assert!(closed.contains("INFO"), "{closed}");

    // A health probe.
    let mut tls = client
        .open_tunnel(addr, &TunnelHeader::probe())
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest))
        .await
        .expect("probe not closed within 5 s");
    assert!(rest.is_empty());
    let probe = agent.wait_for(&["tunnel closed", "reason=probe"]).await;
    assert_eq!(field(&probe, "destination"), "-", "{probe}");
    assert_eq!(echo.accepted(), 1);

    // SIGTERM: exit 0 within 5 s, saying so.
    let pid = agent.child.id().unwrap();
    let kill = output(Command::new("kill").arg("-TERM").arg(pid.to_string())).await;
    assert!(kill.status.success());
    let started = Instant::now();
    agent.wait_for(&["shutdown requested", "SIGTERM"]).await;
    agent.wait_for(&["shutdown complete"]).await;
    let status = tokio::time::timeout(Duration::from_secs(5), agent.child.wait())
        .await
        .expect("agent still running 5 s after SIGTERM")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        status.code(),
        Some(0),
        "{:?}\n{}",
        status,
        agent.log.join("\n")
    );
    // Nothing at WARN or ERROR level along the way.
    assert!(
        !agent
            .log
            .iter()
            .any(|l| l.contains(" WARN ") || l.contains(" ERROR ")),
        "{}",
        agent.log.join("\n")
    );
}

/// The first SIGTERM starts the grace period for open tunnels; a second one ends it at once.
#[tokio::test]
async fn a_second_signal_ends_the_grace_period() {
    let pki = TestPki::new();
    let config = pki.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"\"\n[docker]\naccess = \"off\"\n\
             [stream]\nshutdown_grace = \"60s\"\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
        ),
    )
    .unwrap();
    let mut agent = Running::start(&config);
    let listening = agent.wait_for(&["agent listening", "tcp=127.0.0.1:"]).await;
    let addr: SocketAddr = field(&listening, "tcp").parse().unwrap();
    let echo = TcpEcho::start().await;
    let header = TunnelHeader::new(
        &echo.addr.ip().to_string(),
        &echo.addr.port().to_string(),
        0,
    )
    .unwrap();
    let mut tls = pki.client().open_tunnel(addr, &header).await.unwrap();
    tls.write_all(b"x").await.unwrap();
    let mut back = [0u8; 1];
    tls.read_exact(&mut back).await.unwrap();

    let pid = agent.child.id().unwrap().to_string();
    let kill = output(Command::new("kill").arg("-TERM").arg(&pid)).await;
    assert!(kill.status.success());
    agent
        .wait_for(&["shutting down: listeners closed", "open=1"])
        .await;
    // The tunnel still relays in the grace period.
    tls.write_all(b"y").await.unwrap();
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"y");

    let started = Instant::now();
    let kill = output(Command::new("kill").arg("-TERM").arg(&pid)).await;
    assert!(kill.status.success());
    agent.wait_for(&["second signal"]).await;
    let status = tokio::time::timeout(Duration::from_secs(5), agent.child.wait())
        .await
        .expect("agent still running 5 s after the second SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
}

#[tokio::test]
async fn run_with_a_bad_config_exits_1_before_listening() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, "[stream]\nheader_timeout = \"0s\"\n").unwrap();
    let out = output(agent().arg("run").arg("--config").arg(&path)).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("`stream.header_timeout`"), "{stderr}");
    assert!(!stderr.contains("agent listening"), "{stderr}");
}

#[tokio::test]
async fn run_with_missing_certificates_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("agent.toml");
    std::fs::write(
        &path,
        "[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"\"\n\
         [tls]\nca = \"ca.pem\"\ncert = \"server.pem\"\nkey = \"server.key\"\n",
    )
    .unwrap();
    let out = output(agent().arg("run").arg("--config").arg(&path)).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&tmp.path().join("ca.pem").display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("tls.ca"), "{stderr}");
}

/// generate_if_missing never overwrites: a client key or env file left beside the missing
/// server certificate (from another set) stops the start instead.
#[tokio::test]
async fn generate_if_missing_never_overwrites_files_beside_the_set() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("agent.toml");
    std::fs::write(
        &path,
        "[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"\"\n\
         [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\n\
         generate_if_missing = true\n",
    )
    .unwrap();
    std::fs::create_dir(tmp.path().join("certs")).unwrap();
    let left = tmp.path().join("certs/client.key");
    std::fs::write(&left, "an older client key").unwrap();
    let out = output(agent().arg("run").arg("--config").arg(&path)).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");
    assert!(stderr.contains(&left.display().to_string()), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&left).unwrap(),
        "an older client key"
    );
    assert!(!tmp.path().join("certs/ca.pem").exists());
}

/// GoDoxy's compose style: certificates and name from the environment, stopped with SIGINT.
#[tokio::test]
async fn run_with_godoxy_environment_and_sigint() {
    let pki = TestPki::new();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"\"\n").unwrap();
    let set = &pki.set;
    let mut cmd = agent();
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("AGENT_NAME", "compose-agent")
        .env("RUNTIME", "podman")
        .env(
            "AGENT_CA_CERT",
            format!("{};{}", b64(&set.ca_cert), b64(&set.ca_key)),
        )
        .env(
            "AGENT_SSL_CERT",
            format!("{};{}", b64(&set.server_cert), b64(&set.server_key)),
        );
    let mut agent = Running::spawn(cmd);
    agent
        .wait_for(&["WARN", "AGENT_CA_CERT carries the CA private key"])
        .await;
    let listening = agent.wait_for(&["agent listening"]).await;
    assert!(listening.contains("compose-agent"), "{listening}");
    let addr: SocketAddr = field(&listening, "tcp").parse().unwrap();

    let mut tls = pki.client().connect_http(addr).await.unwrap();
    tls.write_all(
        b"GET /godoxy/agent/info HTTP/1.1\r\nHost: godoxy.agent\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut response))
        .await
        .expect("no response within 5 s");
    let response = text(&response);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "version": "v0.31.0",
            "name": "compose-agent",
            "runtime": "podman",
        })
    );

    let pid = agent.child.id().unwrap();
    let kill = output(Command::new("kill").arg("-INT").arg(pid.to_string())).await;
    assert!(kill.status.success());
    agent.wait_for(&["shutdown requested", "SIGINT"]).await;
    agent.wait_for(&["shutdown complete"]).await;
    let status = tokio::time::timeout(Duration::from_secs(5), agent.child.wait())
        .await
        .expect("agent still running 5 s after SIGINT")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let log = agent.log.join("\n");
    assert!(!log.contains("PRIVATE KEY"), "{log}");
}

/// The README's local-trial command is `cargo run --release -- run --config ...`: with the
/// bench beside it, that only works while `default-run` names the agent.
#[test]
fn cargo_run_without_bin_runs_the_agent() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("default-run = \"godoxy-agent\""),
        "Cargo.toml must set default-run = \"godoxy-agent\""
    );
}
