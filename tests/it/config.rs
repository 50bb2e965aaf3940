//! Configuration: file errors name the key and line, GoDoxy's environment variables win over
//! the file, the example file loads, and both key encodings GoDoxy meets start a daemon.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{TestDaemon, TestPki};
use base64::Engine as _;
use godoxy_agent::Config;
use godoxy_agent::certs::CertSet;
use godoxy_agent::client::ClientTls;
use godoxy_agent::config::{
    ConfigError, ConfigErrors, Diagnostics, DockerAccess, PemSource, Runtime,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An environment made of `pairs` only.
fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The errors of a load that must fail.
fn errors_of(result: Result<(Config, Diagnostics), ConfigErrors>) -> ConfigErrors {
    match result {
        Ok((config, _)) => panic!("expected errors, got a config: {config:?}"),
        Err(errors) => errors,
    }
}

/// Minimal TOML that listens on an ephemeral port without UDP; `extra` is appended.
fn local_toml(extra: &str) -> String {
    format!("name = \"test-agent\"\n[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"\"\n{extra}")
}

/// GET `path` over the HTTP API with our client; returns (status, content-type, body).
async fn http_get(client: &ClientTls, addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    let mut tls = client.connect_http(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: godoxy.agent\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut raw))
        .await
        .expect("no complete response within 5 s");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    (status, content_type, body)
}

/// Asserts `/godoxy/agent/info` answers with the given name and runtime.
async fn assert_info(client: &ClientTls, addr: SocketAddr, name: &str, runtime: &str) {
    let (status, content_type, body) = http_get(client, addr, "/godoxy/agent/info").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/json");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "version": "v0.31.0",
            "name": name,
            "runtime": runtime,
        })
    );
}

// ---------------------------------------------------------------------------------------------
// The file: errors name the key and the line.

#[test]
fn unknown_key_names_the_key_and_the_line() {
    let text = "name = \"a\"\n[listen]\nbogus = 1\n";
    let errors = errors_of(Config::from_toml(
        text,
        Some(Path::new("/x/agent.toml")),
        no_env,
    ));
    assert_eq!(errors.0.len(), 1);
    let message = errors.to_string();
    assert!(message.contains("unknown field `bogus`"), "{message}");
    assert!(message.contains("line 3"), "{message}");
    assert!(message.starts_with("/x/agent.toml: "), "{message}");
    assert!(matches!(errors.0[0], ConfigError::Parse { .. }));
}

#[test]
fn unknown_top_level_table_is_an_error() {
    let text = "[listen]\ntcp = \"127.0.0.1:1\"\n\n[tunnel]\nx = 1\n";
    let message = errors_of(Config::from_toml(text, None, no_env)).to_string();
    assert!(message.contains("unknown field `tunnel`"), "{message}");
    assert!(message.contains("line 4"), "{message}");
}

#[test]
fn bad_duration_names_the_key_and_the_line() {
    let text = "[stream]\ndial_timeout = \"5s\"\nheader_timeout = \"ten seconds\"\n";
    let errors = errors_of(Config::from_toml(text, None, no_env));
    assert_eq!(errors.0.len(), 1);
    let message = errors.to_string();
    assert!(message.contains("header_timeout"), "{message}");
    assert!(message.contains("line 3"), "{message}");
}

#[test]
fn duration_without_unit_is_an_error() {
    let text = "[stream]\nheader_timeout = \"10\"\n";
    let message = errors_of(Config::from_toml(text, None, no_env)).to_string();
    assert!(message.contains("header_timeout"), "{message}");
    assert!(message.contains("line 2"), "{message}");
}

#[test]
fn bad_listen_address_names_the_key_and_the_line() {
    for (text, key, line) in [
        ("[listen]\ntcp = \"localhost:8890\"\n", "tcp", "line 2"),
        (
            "[listen]\ntcp = \"0.0.0.0:8890\"\nudp = \"0.0.0.0\"\n",
            "udp",
            "line 3",
        ),
        ("[listen]\ntcp = \"0.0.0.0:99999\"\n", "tcp", "line 2"),
    ] {
        let message = errors_of(Config::from_toml(text, None, no_env)).to_string();
        assert!(message.contains(key), "{text}: {message}");
        assert!(message.contains(line), "{text}: {message}");
    }
    let message = errors_of(Config::from_toml(
        "[listen]\nudp = \"0.0.0.0\"\n",
        None,
        no_env,
    ))
    .to_string();
    assert!(
        message.contains("`0.0.0.0` is not an address like 0.0.0.0:8890"),
        "{message}"
    );
}

#[test]
fn zero_timeout_names_the_dotted_key() {
    let text = "[stream]\ndial_timeout = \"0s\"\n";
    let errors = errors_of(Config::from_toml(
        text,
        Some(Path::new("agent.toml")),
        no_env,
    ));
    assert_eq!(errors.0.len(), 1);
    assert!(matches!(
        errors.0[0],
        ConfigError::Invalid {
            key: "stream.dial_timeout",
            ..
        }
    ));
    assert_eq!(
        errors.to_string(),
        "agent.toml: `stream.dial_timeout`: must be longer than 0s"
    );
}

#[test]
fn several_problems_are_reported_together() {
    let text = "name = \" \"\n[stream]\nhandshake_timeout = \"0s\"\nheader_timeout = \"0s\"\n\
                dial_timeout = \"0ms\"\nudp_idle_timeout = \"0s\"\n";
    let errors = errors_of(Config::from_toml(
        text,
        None,
        env_of(&[("AGENT_PORT", "abc"), ("RUNTIME", "lxc")]),
    ));
    assert_eq!(errors.0.len(), 7, "{errors}");
    let message = errors.to_string();
    for key in [
        "`name`",
        "`stream.handshake_timeout`",
        "`stream.header_timeout`",
        "`stream.dial_timeout`",
        "`stream.udp_idle_timeout`",
        "AGENT_PORT",
        "RUNTIME",
    ] {
        assert!(message.contains(key), "{key} missing from:\n{message}");
    }
    assert_eq!(message.lines().count(), 7, "one error per line:\n{message}");
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let errors = errors_of(Config::load_with_env(Some(&path), no_env));
    assert!(matches!(errors.0[0], ConfigError::Read { .. }));
    assert!(
        errors.to_string().starts_with(&path.display().to_string()),
        "{errors}"
    );
}

#[test]
fn relative_tls_paths_are_taken_from_the_file_folder() {
    let text = "[tls]\nca = \"certs/ca.pem\"\ncert = \"/abs/server.pem\"\n";
    let config = Config::from_toml(text, Some(Path::new("/etc/agent/agent.toml")), no_env)
        .unwrap()
        .0;
    assert!(
        matches!(&config.tls.ca, PemSource::File(p) if p == Path::new("/etc/agent/certs/ca.pem"))
    );
    assert!(matches!(&config.tls.cert, PemSource::File(p) if p == Path::new("/abs/server.pem")));
    assert!(
        matches!(&config.tls.key, PemSource::File(p) if p == Path::new("/etc/godoxy-agent/server.key"))
    );
}

// ---------------------------------------------------------------------------------------------
// The environment wins over the file.

#[test]
fn env_name_port_runtime_override_the_file() {
    let text = "name = \"from-file\"\nruntime = \"docker\"\n\
                [listen]\ntcp = \"127.0.0.1:1234\"\nudp = \"0.0.0.0:1235\"\n";
    let (config, _) = Config::from_toml(text, None, no_env).unwrap();
    assert_eq!(config.name, "from-file");
    assert_eq!(config.runtime, Runtime::Docker);

    let env = env_of(&[
        ("AGENT_NAME", "from-env"),
        ("AGENT_PORT", "9999"),
        ("RUNTIME", "podman"),
    ]);
    let (config, diagnostics) = Config::from_toml(text, None, env).unwrap();
    assert_eq!(config.name, "from-env");
    assert_eq!(config.runtime, Runtime::Podman);
    assert_eq!(config.listen.tcp, "127.0.0.1:9999".parse().unwrap());
    assert_eq!(config.listen.udp, Some("0.0.0.0:9999".parse().unwrap()));
    assert!(
        diagnostics.warnings.is_empty(),
        "{:?}",
        diagnostics.warnings
    );
}

/// GoDoxy reads each of its variables also as GODOXY_NAME and GOPROXY_NAME, those first.
#[test]
fn env_names_with_godoxy_and_goproxy_prefixes() {
    let env = env_of(&[
        ("GODOXY_AGENT_NAME", "godoxy-prefixed"),
        ("AGENT_NAME", "plain"),
        ("GOPROXY_AGENT_PORT", "9998"),
        ("GODOXY_DOCKER_SOCKET", "/run/podman/podman.sock"),
    ]);
    let (config, _) = Config::from_toml("", None, env).unwrap();
    assert_eq!(config.name, "godoxy-prefixed");
    assert_eq!(config.listen.tcp.port(), 9998);
    assert_eq!(
        config.docker.socket,
        PathBuf::from("/run/podman/podman.sock")
    );
    // An empty prefixed value counts as unset.
    let env = env_of(&[("GODOXY_AGENT_NAME", ""), ("AGENT_NAME", "plain")]);
    assert_eq!(Config::from_toml("", None, env).unwrap().0.name, "plain");
}

#[test]
fn docker_socket_from_the_file_and_the_environment() {
    let text = "[docker]\nsocket = \"run/docker.sock\"\naccess = \"read-only\"\n";
    let (config, _) =
        Config::from_toml(text, Some(Path::new("/etc/agent/agent.toml")), no_env).unwrap();
    assert_eq!(
        config.docker.socket,
        PathBuf::from("/etc/agent/run/docker.sock")
    );
    assert_eq!(config.docker.access, DockerAccess::ReadOnly);
    let env = env_of(&[("DOCKER_SOCKET", "/var/run/other.sock")]);
    let (config, diagnostics) = Config::from_toml(text, None, env).unwrap();
    assert_eq!(config.docker.socket, PathBuf::from("/var/run/other.sock"));
    assert!(diagnostics.notices.is_empty(), "{:?}", diagnostics.notices);
}

#[test]
fn bad_docker_access_and_godoxy_version_name_the_key() {
    let message = errors_of(Config::from_toml(
        "[docker]\naccess = \"all\"\n",
        None,
        no_env,
    ))
    .to_string();
    assert!(message.contains("access"), "{message}");
    assert!(message.contains("godoxy"), "{message}");
    assert!(message.contains("line 2"), "{message}");
    for (version, why) in [
        ("0.31.0", "vMAJOR.MINOR.PATCH"),
        ("v0.31", "vMAJOR.MINOR.PATCH"),
        ("v0.31.0-", "vMAJOR.MINOR.PATCH"),
        ("v1.2.3.4", "vMAJOR.MINOR.PATCH"),
        ("v0.18.6", "legacy"),
        ("v0.9.99", "legacy"),
    ] {
        let text = format!("godoxy_version = \"{version}\"\n");
        let message = errors_of(Config::from_toml(&text, None, no_env)).to_string();
        assert!(message.contains("godoxy_version"), "{version}: {message}");
        assert!(message.contains(why), "{version}: {message}");
    }
    for version in ["v0.18.7", "v0.31.0", "v1.0.0-rc1"] {
        let text = format!("godoxy_version = \"{version}\"\n");
        let (config, _) = Config::from_toml(&text, None, no_env).unwrap();
        assert_eq!(config.godoxy_version.as_str(), version);
    }
}

#[test]
fn env_port_keeps_udp_disabled() {
    let text = "[listen]\ntcp = \"127.0.0.1:1234\"\nudp = \"\"\n";
    let config = Config::from_toml(text, None, env_of(&[("AGENT_PORT", "8891")]))
        .unwrap()
        .0;
    assert_eq!(config.listen.tcp.port(), 8891);
    assert_eq!(config.listen.udp, None);
}

#[test]
fn empty_env_values_are_ignored() {
    let text = "name = \"from-file\"\n";
    let env = env_of(&[("AGENT_NAME", ""), ("AGENT_PORT", " "), ("RUNTIME", "")]);
    let config = Config::from_toml(text, None, env).unwrap().0;
    assert_eq!(config.name, "from-file");
    assert_eq!(config.listen.tcp.port(), 8890);
}

#[test]
fn skip_client_cert_check_turns_verification_off_with_a_warning() {
    let (config, diagnostics) = Config::from_toml(
        "",
        None,
        env_of(&[("AGENT_SKIP_CLIENT_CERT_CHECK", "true")]),
    )
    .unwrap();
    assert!(!config.tls.require_client_cert);
    assert_eq!(diagnostics.warnings.len(), 1, "{:?}", diagnostics.warnings);
    assert!(
        diagnostics.warnings[0].contains("client certificates are NOT required"),
        "{:?}",
        diagnostics.warnings
    );

    // Go's strconv.ParseBool spellings; false keeps verification on.
    for (value, required) in [("1", false), ("True", false), ("false", true), ("0", true)] {
        let (config, diagnostics) =
            Config::from_toml("", None, env_of(&[("AGENT_SKIP_CLIENT_CERT_CHECK", value)]))
                .unwrap();
        assert_eq!(config.tls.require_client_cert, required, "{value}");
        assert_eq!(diagnostics.warnings.is_empty(), required, "{value}");
    }
}

#[test]
fn file_turning_verification_off_also_warns() {
    let (config, diagnostics) =
        Config::from_toml("[tls]\nrequire_client_cert = false\n", None, no_env).unwrap();
    assert!(!config.tls.require_client_cert);
    assert_eq!(diagnostics.warnings.len(), 1);
}

#[tokio::test]
async fn env_certificates_replace_the_files_and_serve() {
    let set = CertSet::generate().unwrap();
    let ca_value = format!("{};{}", b64(&set.ca_cert), b64(&set.ca_key));
    let ssl_value = format!("{};{}", b64(&set.server_cert), b64(&set.server_key));
    // The file names certificate files that do not exist: the environment must win.
    let text = local_toml(
        "[tls]\nca = \"/nonexistent/ca.pem\"\ncert = \"/nonexistent/server.pem\"\n\
         key = \"/nonexistent/server.key\"\ngenerate_if_missing = true\n",
    );
    let env = env_of(&[
        ("AGENT_CA_CERT", &ca_value),
        ("AGENT_SSL_CERT", &ssl_value),
        ("AGENT_NAME", "env-agent"),
        ("RUNTIME", "podman"),
    ]);
    let (config, diagnostics) = Config::from_toml(&text, None, env).unwrap();

    match &config.tls.ca {
        PemSource::Env { var, pem } => {
            assert_eq!(*var, "AGENT_CA_CERT");
            assert_eq!(pem, set.ca_cert.as_bytes());
        }
        other => panic!("tls.ca: {other:?}"),
    }
    match &config.tls.cert {
        PemSource::Env { var, pem } => {
            assert_eq!(*var, "AGENT_SSL_CERT");
            assert_eq!(pem, set.server_cert.as_bytes());
        }
        other => panic!("tls.cert: {other:?}"),
    }
    match &config.tls.key {
        PemSource::Env { var, pem } => {
            assert_eq!(*var, "AGENT_SSL_CERT");
            assert_eq!(pem, set.server_key.as_bytes());
        }
        other => panic!("tls.key: {other:?}"),
    }
    assert!(
        !config.tls.generate_if_missing,
        "env certificates must switch off generation"
    );
    assert!(config.tls.require_client_cert);
    assert_eq!(diagnostics.warnings.len(), 1, "{:?}", diagnostics.warnings);
    assert!(
        diagnostics.warnings[0].contains("AGENT_CA_CERT carries the CA private key")
            && diagnostics.warnings[0].contains("dropped"),
        "{:?}",
        diagnostics.warnings
    );
    // Neither Debug nor Display shows key material.
    let debug = format!("{config:?}");
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    assert!(debug.contains("Env(AGENT_SSL_CERT, MASKED)"), "{debug}");
    assert_eq!(config.tls.key.to_string(), "$AGENT_SSL_CERT");

    let daemon = TestDaemon::start_config(config).await;
    let client = ClientTls::from_pem(
        set.ca_cert.as_bytes(),
        Some((set.client_cert.as_bytes(), set.client_key.as_bytes())),
    )
    .unwrap();
    assert_info(&client, daemon.addr, "env-agent", "podman").await;
    daemon.stop().await;
}

#[test]
fn ca_cert_without_key_part_loads_without_warning() {
    let set = CertSet::generate().unwrap();
    for value in [b64(&set.ca_cert), format!("{};", b64(&set.ca_cert))] {
        let (config, diagnostics) =
            Config::from_toml("", None, env_of(&[("AGENT_CA_CERT", &value)])).unwrap();
        assert!(
            matches!(&config.tls.ca, PemSource::Env { pem, .. } if pem == set.ca_cert.as_bytes())
        );
        assert!(
            diagnostics.warnings.is_empty(),
            "{:?}",
            diagnostics.warnings
        );
    }
}

#[test]
fn bad_env_values_name_the_variable() {
    let set = CertSet::generate().unwrap();
    let no_key = b64(&set.server_cert);
    let key_as_cert = format!("{};{}", b64(&set.server_key), b64(&set.server_key));
    let cert_as_key = format!("{};{}", b64(&set.server_cert), b64(&set.server_cert));
    let cases: [(&str, &str, &str); 12] = [
        ("AGENT_PORT", "abc", "`abc` is not a port number"),
        ("AGENT_PORT", "0", "`0` is not a port number"),
        ("AGENT_PORT", "65536", "`65536` is not a port number"),
        ("RUNTIME", "lxc", "`lxc` is not one of docker, podman"),
        (
            "AGENT_SKIP_CLIENT_CERT_CHECK",
            "yes",
            "`yes` is not a boolean",
        ),
        ("AGENT_SSL_CERT", &no_key, "found no key part"),
        (
            "AGENT_SSL_CERT",
            "not base64!",
            "certificate part is not base64",
        ),
        (
            "AGENT_SSL_CERT",
            &format!("{};***", b64(&set.server_cert)),
            "private key part is not base64",
        ),
        (
            "AGENT_SSL_CERT",
            &key_as_cert,
            "does not decode to a PEM certificate",
        ),
        (
            "AGENT_SSL_CERT",
            &cert_as_key,
            "does not decode to a PEM private key",
        ),
        ("AGENT_CA_CERT", "%%%", "certificate part is not base64"),
        (
            "AGENT_CA_CERT",
            &b64("hello"),
            "does not decode to a PEM certificate",
        ),
    ];
    for (var, value, reason) in cases {
        let errors = errors_of(Config::from_toml("", None, env_of(&[(var, value)])));
        assert_eq!(errors.0.len(), 1, "{var}={value}: {errors}");
        assert!(
            matches!(&errors.0[0], ConfigError::Env { var: v, .. } if *v == var),
            "{var}={value}: {errors:?}"
        );
        let message = errors.to_string();
        assert!(
            message.starts_with(&format!("environment variable {var}: ")),
            "{message}"
        );
        assert!(message.contains(reason), "{var}={value}: {message}");
    }
}

// ---------------------------------------------------------------------------------------------
// The example file.

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/godoxy-agent.toml")
}

#[test]
fn example_config_loads_with_the_documented_values() {
    let path = example_path();
    let (config, diagnostics) = Config::load_with_env(Some(&path), no_env).unwrap();
    let certs = path.parent().unwrap().join("certs");
    assert!(!config.name.trim().is_empty());
    assert_eq!(config.runtime, Runtime::Docker);
    assert_eq!(config.listen.tcp, "[::]:8890".parse().unwrap());
    assert_eq!(config.listen.udp, Some("[::]:8890".parse().unwrap()));
    for (source, name) in [
        (&config.tls.ca, "ca.pem"),
        (&config.tls.cert, "server.pem"),
        (&config.tls.key, "server.key"),
    ] {
        assert!(
            matches!(source, PemSource::File(p) if *p == certs.join(name)),
            "{name}: {source:?}"
        );
    }
    assert!(config.tls.require_client_cert);
    assert!(config.tls.generate_if_missing);
    let s = &config.stream;
    assert_eq!(s.handshake_timeout, Duration::from_secs(10));
    assert_eq!(s.header_timeout, Duration::from_secs(10));
    assert_eq!(s.dial_timeout, Duration::from_secs(10));
    assert_eq!(s.udp_idle_timeout, Duration::from_secs(120));
    assert_eq!(s.max_udp_sessions.get(), 4096);
    assert_eq!(s.max_udp_handshakes.get(), 256);
    assert_eq!(s.max_connections.get(), 4096);
    assert_eq!(s.shutdown_grace, Duration::from_secs(10));
    assert!(
        diagnostics.warnings.is_empty(),
        "{:?}",
        diagnostics.warnings
    );
}

/// The example says its values are the defaults (except those marked "example").
#[test]
fn example_values_equal_the_defaults() {
    let example = Config::load_with_env(Some(&example_path()), no_env)
        .unwrap()
        .0;
    let defaults = Config::from_toml("", None, no_env).unwrap().0;
    assert_eq!(example.runtime, defaults.runtime);
    assert_eq!(example.listen.tcp, defaults.listen.tcp);
    assert_eq!(example.listen.udp, defaults.listen.udp);
    assert_eq!(
        example.tls.require_client_cert,
        defaults.tls.require_client_cert
    );
    assert_eq!(
        format!("{:?}", example.stream),
        format!("{:?}", defaults.stream)
    );
    assert_eq!(example.godoxy_version, defaults.godoxy_version);
    assert_eq!(
        format!("{:?}", example.http),
        format!("{:?}", defaults.http)
    );
    assert_eq!(
        format!("{:?}", example.docker),
        format!("{:?}", defaults.docker)
    );
    assert_eq!(
        format!("{:?}", example.metrics),
        format!("{:?}", defaults.metrics)
    );
    assert_eq!(
        format!("{:?}", example.policy),
        format!("{:?}", defaults.policy)
    );
}

// ---------------------------------------------------------------------------------------------
// Key encodings.

#[tokio::test]
async fn sec1_server_key_loads() {
    let pki = TestPki::new();
    let pkcs8 = pki.path("server.key");
    let sec1 = pki.path("server-sec1.key");
    let status = tokio::process::Command::new("openssl")
        .arg("ec")
        .arg("-in")
        .arg(&pkcs8)
        .arg("-out")
        .arg(&sec1)
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success(), "openssl ec failed");
    let text = std::fs::read_to_string(&sec1).unwrap();
    assert!(
        text.starts_with("-----BEGIN EC PRIVATE KEY-----"),
        "not SEC1: {text}"
    );

    let toml = local_toml(&format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.path("ca.pem").display(),
        pki.path("server.pem").display(),
        sec1.display(),
    ));
    let config = Config::from_toml(&toml, None, no_env).unwrap().0;
    let daemon = TestDaemon::start_config(config).await;
    assert_info(&pki.client(), daemon.addr, "test-agent", "docker").await;
    daemon.stop().await;

    // The same SEC1 key through AGENT_SSL_CERT, as GoDoxy's compose file hands it over.
    let ssl = format!("{};{}", b64(&pki.set.server_cert), b64(&text));
    let ca = b64(&pki.set.ca_cert);
    let env = env_of(&[("AGENT_SSL_CERT", &ssl), ("AGENT_CA_CERT", &ca)]);
    let config = Config::from_toml(&local_toml(""), None, env).unwrap().0;
    let daemon = TestDaemon::start_config(config).await;
    assert_info(&pki.client(), daemon.addr, "test-agent", "docker").await;
    daemon.stop().await;
}

/// The environment wins over the file, so a name the file leaves empty but AGENT_NAME sets is
/// not an error.
#[test]
fn agent_name_replaces_an_empty_file_name() {
    let config = Config::from_toml("name = \"\"\n", None, |var| {
        (var == "AGENT_NAME").then(|| "env-name".to_owned())
    })
    .unwrap()
    .0;
    assert_eq!(config.name, "env-name");
}

#[tokio::test]
async fn mismatched_or_missing_tls_files_are_refused_at_bind() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let toml = |ca: &str, cert: &str, key: &str| {
        local_toml(&format!(
            "[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n"
        ))
    };
    let p = |pki: &TestPki, name: &str| pki.path(name).display().to_string();
    // The key of another set does not match the certificate.
    let config = Config::from_toml(
        &toml(
            &p(&pki, "ca.pem"),
            &p(&pki, "server.pem"),
            &p(&other, "server.key"),
        ),
        None,
        |_| None,
    )
    .unwrap()
    .0;
    let err = godoxy_agent::Daemon::bind(config).await.err().unwrap();
    assert!(
        format!("{err:#}").contains("tls.cert and tls.key"),
        "{err:#}"
    );
    // A missing CA file is named.
    let config = Config::from_toml(
        &toml(
            "/nonexistent/ca.pem",
            &p(&pki, "server.pem"),
            &p(&pki, "server.key"),
        ),
        None,
        |_| None,
    )
    .unwrap()
    .0;
    let err = godoxy_agent::Daemon::bind(config).await.err().unwrap();
    let text = format!("{err:#}");
    assert!(
        text.contains("tls.ca") && text.contains("/nonexistent/ca.pem"),
        "{text}"
    );
}
