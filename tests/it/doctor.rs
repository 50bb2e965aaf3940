//! `godoxy-agent doctor`, run as a user would: against real agents with each failure the issue
//! names made for real (nothing on UDP, another CA, expired, not yet valid, wrong name, a
//! client certificate the agent does not trust, a port held by another program), asserting
//! the exit code and the cause line.

use std::path::Path;
use std::process::Command;

use godoxy_agent::Config;
use godoxy_agent::certs::CertSet;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::client_cli::free_port_pair;
use crate::common::{TestDaemon, TestPki, bin};

/// `godoxy-agent doctor ARGS`: exit code, stdout.
async fn doctor(args: &[&str]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin())
            .arg("doctor")
            .args(&args)
            .env("RUST_LOG", "warn")
            .env_remove("INVOCATION_ID")
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

fn dir(pki: &TestPki) -> String {
    pki.dir.path().display().to_string()
}

/// The `cause:` line of a report.
fn cause(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("cause: "))
        .unwrap_or_else(|| panic!("no cause line:\n{out}"))
}

/// A configuration for `pki`'s server files; `top` lines before the sections, `sections` after.
fn config_text(pki: &TestPki, tcp: &str, udp: &str, top: &str, sections: &str) -> String {
    format!(
        "name = \"doctor-test\"\n{top}\n\
         [listen]\ntcp = \"{tcp}\"\nudp = \"{udp}\"\n\
         [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{sections}\n",
        pki.path("ca.pem").display(),
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
    )
}

/// An in-process agent with TCP and UDP on one port, as in production.
async fn agent(pki: &TestPki, top: &str, sections: &str) -> (TestDaemon, String) {
    let port = free_port_pair().await;
    let addr = format!("127.0.0.1:{port}");
    let text = config_text(pki, &addr, &addr, top, sections);
    let config = Config::from_toml(&text, None, |_| None).unwrap().0;
    (TestDaemon::start_config(config).await, addr)
}

/// A CA and a server and client certificate whose server certificate has `names` and the
/// validity period given (days from now).
fn pki_with_server(names: &[&str], from_days: i64, to_days: i64) -> TestPki {
    pki_with(names, (from_days, to_days), (-1, 1))
}

/// As `pki_with_server`, with the client certificate's validity period too.
fn pki_with(names: &[&str], server: (i64, i64), client: (i64, i64)) -> TestPki {
    let (from_days, to_days) = server;
    let now = OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "godoxy.agent");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca.not_before = now - Duration::days(2000);
    ca.not_after = now + Duration::days(2000);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>, eku, from: i64, to: i64| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, "test");
        params.extended_key_usages = vec![eku];
        params.not_before = now + Duration::days(from);
        params.not_after = now + Duration::days(to);
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let names = names.iter().map(|n| (*n).to_owned()).collect();
    let (server_cert, server_key) = leaf(
        names,
        ExtendedKeyUsagePurpose::ServerAuth,
        from_days,
        to_days,
    );
    let (client_cert, client_key) = leaf(
        vec!["godoxy.agent".to_owned()],
        ExtendedKeyUsagePurpose::ClientAuth,
        client.0,
        client.1,
    );
    let set = CertSet {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    };
    let dir = tempfile::tempdir().unwrap();
    set.write(dir.path(), false).unwrap();
    TestPki { dir, set }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_agent_passes_every_step() {
    let pki = TestPki::new();
    let docker = format!(
        "[docker]\nsocket = \"{}\"",
        crate::docker::engine().display()
    );
    let (daemon, server) = agent(&pki, "", &docker).await;
    let (code, out) = doctor(&[
        "--server",
        &server,
        "--certs",
        &dir(&pki),
        "--godoxy-version",
        "v0.31.2",
        // The engine can be slow to answer its first call on a loaded machine.
        "--timeout",
        "15s",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    for step in [
        "address",
        "tcp connect",
        "tls handshake",
        "server certificate",
        "client certificate",
        "/info",
        "version",
        "tcp probe",
        "dtls handshake",
        "udp probe",
        "docker api",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("ok ") && l[6..].starts_with(step)),
            "no ok line for {step}:\n{out}"
        );
    }
    assert!(out.contains("for godoxy.agent, valid until"), "{out}");
    assert!(out.contains("all steps passed"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    assert_eq!(daemon.dials(), 0, "a probe dialed");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_on_tcp() {
    let pki = TestPki::new();
    let port = free_port_pair().await;
    let (code, out) = doctor(&[
        "--server",
        &format!("127.0.0.1:{port}"),
        "--certs",
        &dir(&pki),
    ])
    .await;
    assert_eq!(code, 10, "{out}");
    assert!(out.contains("FAIL  tcp connect"), "{out}");
    assert!(cause(&out).contains("nothing listens on"), "{out}");
    assert!(out.contains(&format!("-p {port}:{port}/udp")), "{out}");
    assert!(out.contains("skip  docker api"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_blocked_names_the_port() {
    let pki = TestPki::new();
    // The TLS port is up; nothing listens on the same port number over UDP.
    let port = free_port_pair().await;
    let addr = format!("127.0.0.1:{port}");
    let text = config_text(&pki, &addr, "", "", "");
    let config = Config::from_toml(&text, None, |_| None).unwrap().0;
    let daemon = TestDaemon::start_config(config).await;
    let (code, out) = doctor(&["--server", &addr, "--certs", &dir(&pki), "--timeout", "1s"]).await;
    assert_eq!(code, 16, "{out}");
    assert!(out.contains("ok    tcp probe"), "{out}");
    assert!(out.contains("FAIL  dtls handshake"), "{out}");
    let cause = cause(&out);
    assert!(cause.starts_with("cause: TCP ok"), "{out}");
    assert!(
        cause.contains(&format!("UDP port {port}")) && cause.contains("not published"),
        "{out}"
    );
    assert!(out.contains(&format!("-p {port}:{port}/udp")), "{out}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_says_another_ca() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let (daemon, server) = agent(&pki, "", "").await;
    // GoDoxy holds another set than the agent's.
    let (code, out) = doctor(&["--server", &server, "--certs", &dir(&other)]).await;
    assert_eq!(code, 12, "{out}");
    assert!(out.contains("ok    tls handshake"), "{out}");
    assert!(out.contains("FAIL  server certificate"), "{out}");
    assert!(
        cause(&out).contains("signed by another CA (the agent's ca.crt differs from the server's)"),
        "{out}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_server_certificate() {
    let pki = pki_with_server(&["godoxy.agent"], -30, -1);
    let (daemon, server) = agent(&pki, "", "").await;
    let (code, out) = doctor(&["--server", &server, "--certs", &dir(&pki)]).await;
    assert_eq!(code, 12, "{out}");
    assert!(
        cause(&out).contains("server certificate expired on"),
        "{out}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_the_future_is_clock_skew() {
    let pki = pki_with_server(&["godoxy.agent"], 2, 30);
    let (daemon, server) = agent(&pki, "", "").await;
    let (code, out) = doctor(&["--server", &server, "--certs", &dir(&pki)]).await;
    assert_eq!(code, 12, "{out}");
    assert!(
        cause(&out).contains("clock skew: server certificate not yet valid"),
        "{out}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_name_says_what_the_certificate_is_for() {
    let pki = pki_with_server(&["agent.example.com"], -1, 30);
    let (daemon, server) = agent(&pki, "", "").await;
    let (code, out) = doctor(&["--server", &server, "--certs", &dir(&pki)]).await;
    assert_eq!(code, 12, "{out}");
    assert!(
        cause(&out)
            .contains("server certificate is for agent.example.com, GoDoxy expects godoxy.agent"),
        "{out}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_refused_by_an_agent_trusting_another_ca() {
    let pki = TestPki::new();
    let other = TestPki::new();
    // The agent presents pki's server certificate but trusts other's CA for clients.
    let port = free_port_pair().await;
    let addr = format!("127.0.0.1:{port}");
    let text = config_text(&pki, &addr, &addr, "", "").replace(
        &pki.path("ca.pem").display().to_string(),
        &other.path("ca.pem").display().to_string(),
    );
    let config = Config::from_toml(&text, None, |_| None).unwrap().0;
    let daemon = TestDaemon::start_config(config).await;
    let (code, out) = doctor(&["--server", &addr, "--certs", &dir(&pki)]).await;
    assert_eq!(code, 13, "{out}");
    assert!(out.contains("ok    server certificate"), "{out}");
    assert!(
        cause(&out).contains("client certificate refused by the agent")
            && cause(&out).contains("it trusts another CA"),
        "{out}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_api_off_and_dead_socket() {
    let pki = TestPki::new();
    let (daemon, server) = agent(&pki, "", "[docker]\naccess = \"off\"").await;
    let (code, out) = doctor(&["--server", &server, "--certs", &dir(&pki)]).await;
    assert_eq!(code, 17, "{out}");
    assert!(out.contains("ok    udp probe"), "{out}");
    assert!(cause(&out).contains("docker.access = \"off\""), "{out}");
    daemon.stop().await;

    let missing = pki.path("no-such.sock");
    let docker = format!("[docker]\nsocket = \"{}\"", missing.display());
    let (daemon, server) = agent(&pki, "", &docker).await;
    let (code, out) = doctor(&["--server", &server, "--certs", &dir(&pki)]).await;
    assert_eq!(code, 17, "{out}");
    assert!(
        cause(&out).contains("the agent cannot reach its Docker socket"),
        "{out}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_major_differs_from_the_server() {
    let pki = TestPki::new();
    let (daemon, server) = agent(&pki, "godoxy_version = \"v1.2.0\"", "").await;
    let (code, out) = doctor(&[
        "--server",
        &server,
        "--certs",
        &dir(&pki),
        "--godoxy-version",
        "v0.31.0",
    ])
    .await;
    assert_eq!(code, 14, "{out}");
    assert!(cause(&out).contains("major version mismatch"), "{out}");
    daemon.stop().await;
}

/// A configuration file for local mode (Docker off unless `sections` says otherwise).
fn local_config(pki: &TestPki, tcp: &str, udp: &str, sections: &str) -> std::path::PathBuf {
    let path = pki.path("config.toml");
    let sections = if sections.is_empty() {
        "[docker]\naccess = \"off\""
    } else {
        sections
    };
    std::fs::write(&path, config_text(pki, tcp, udp, "", sections)).unwrap();
    path
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_passes_and_sees_a_running_agent() {
    let pki = TestPki::new();
    let port = free_port_pair().await;
    let addr = format!("127.0.0.1:{port}");
    let config = local_config(&pki, &addr, &addr, "");
    let (code, out) = doctor(&["--config", &path_str(&config)]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok    tcp port"), "{out}");
    assert!(out.contains(&format!("{addr} is free")), "{out}");
    assert!(out.contains("skip  docker socket"), "{out}");

    // Under systemd the environment line says so.
    let out = tokio::task::spawn_blocking({
        let config = path_str(&config);
        move || {
            Command::new(bin())
                .args(["doctor", "--config", &config])
                .env("INVOCATION_ID", "0123")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.contains("ok    environment") && out.contains("systemd unit"),
        "{out}"
    );

    // With the agent running, its own ports are no problem.
    let loaded = Config::load(Some(&config)).unwrap().0;
    let daemon = TestDaemon::start_config(loaded).await;
    let (code, out) = doctor(&["--config", &path_str(&config)]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("held by a running agent with this CA"),
        "{out}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_port_in_use() {
    let pki = TestPki::new();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let config = local_config(&pki, &addr, "", "");
    let (code, out) = doctor(&["--config", &path_str(&config)]).await;
    assert_eq!(code, 23, "{out}");
    assert!(out.contains("FAIL  tcp port"), "{out}");
    assert!(
        cause(&out).contains("is in use by another program"),
        "{out}"
    );
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_files() {
    use std::os::unix::fs::PermissionsExt as _;
    let pki = TestPki::new();
    let config = local_config(&pki, "127.0.0.1:0", "", "");

    // A key every user can read.
    let key = pki.path("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = doctor(&["--config", &path_str(&config)]).await;
    assert_eq!(code, 21, "{out}");
    assert!(cause(&out).contains("readable by every user"), "{out}");
    assert!(
        out.contains(&format!("chmod 600 {}", key.display())),
        "{out}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A key of another set: not the certificate's pair.
    let other = TestPki::new();
    std::fs::copy(other.path("server.key"), &key).unwrap();
    let (code, out) = doctor(&["--config", &path_str(&config)]).await;
    assert_eq!(code, 21, "{out}");
    assert!(out.contains("FAIL  tls files"), "{out}");

    // A missing file.
    std::fs::remove_file(pki.path("server.pem")).unwrap();
    let (code, out) = doctor(&["--config", &path_str(&config)]).await;
    assert_eq!(code, 21, "{out}");
    assert!(cause(&out).contains("does not exist"), "{out}");

    // The configuration itself.
    std::fs::write(&config, "[listen]\ntcp = \"nowhere\"\n").unwrap();
    let (code, out) = doctor(&["--config", &path_str(&config)]).await;
    assert_eq!(code, 20, "{out}");
    assert!(
        cause(&out).contains("the configuration does not load"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_folder_mixing_two_sets() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let (daemon, server) = agent(&pki, "", "").await;
    let (code, out) = doctor(&[
        "--server",
        &server,
        "--ca",
        &path_str(&pki.path("ca.pem")),
        "--cert",
        &path_str(&other.path("client.pem")),
        "--key",
        &path_str(&other.path("client.key")),
    ])
    .await;
    assert_eq!(code, 13, "{out}");
    assert!(
        cause(&out).contains("the folder mixes files of two sets"),
        "{out}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mode_docker_socket() {
    let pki = TestPki::new();
    let engine = format!(
        "[docker]\nsocket = \"{}\"",
        crate::docker::engine().display()
    );
    let config = local_config(&pki, "127.0.0.1:0", "", &engine);
    // The engine can be slow to answer its first call on a loaded machine.
    let (code, out) = doctor(&["--config", &path_str(&config), "--timeout", "15s"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok    docker socket"), "{out}");
    assert!(out.contains("answers:"), "{out}");

    let missing = pki.path("gone.sock");
    let config = local_config(
        &pki,
        "127.0.0.1:0",
        "",
        &format!("[docker]\nsocket = \"{}\"", missing.display()),
    );
    let (code, out) = doctor(&["--config", &path_str(&config)]).await;
    assert_eq!(code, 22, "{out}");
    assert!(cause(&out).contains("is absent"), "{out}");
    assert!(
        out.contains("-v /var/run/docker.sock:/var/run/docker.sock"),
        "{out}"
    );

    // A plain file where the socket should be.
    std::fs::write(&missing, "").unwrap();
    let (code, out) = doctor(&["--config", &path_str(&config)]).await;
    assert_eq!(code, 22, "{out}");
    assert!(cause(&out).contains("is not a unix socket"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificate_is_named_before_the_agent_refuses_it() {
    let pki = pki_with(&["godoxy.agent"], (-1, 30), (-30, -2));
    let (daemon, server) = agent(&pki, "", "").await;
    let (code, out) = doctor(&["--server", &server, "--certs", &dir(&pki)]).await;
    assert_eq!(code, 13, "{out}");
    assert!(out.contains("ok    server certificate"), "{out}");
    assert!(
        cause(&out).contains("client.pem: the certificate expired on"),
        "{out}"
    );
    daemon.stop().await;
}
