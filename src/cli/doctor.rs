//! `doctor`: the steps a GoDoxy server runs against an agent (or, with `--config`, what the
//! agent needs on its own host), one line each; the first failure is explained with its most
//! likely cause and a next step, and sets the exit code of its class.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use godoxy_agent::Daemon;
use godoxy_agent::client::{ClientTls, DtlsConnectError, UdpTunnel};
use godoxy_agent::config::{Config, DockerAccess, GodoxyVersion, PemSource};
use godoxy_agent::diagnose::{self, CertProblem};
use godoxy_agent::protocol::SERVER_NAME;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::client::{CertArgs, CertFiles};

/// The exit codes, for `--help` and docs/DOCTOR.md.
pub const EXIT_CODES: &str = "\
Exit codes:
   0  every step passed
   1  doctor could not run (unreadable --certs files, no runtime)
   2  bad command line
  10  address or TCP connect (nothing listening, firewall, DNS)
  11  TLS handshake (not TLS on that port, handshake refused)
  12  server certificate (name, validity period, other CA)
  13  client certificate refused by the agent
  14  /godoxy/agent/info or its version
  15  TCP probe tunnel
  16  UDP: DTLS handshake or probe (UDP blocked or not published)
  17  Docker API through the agent
  20  --config: the configuration does not load
  21  --config: certificate or key files (missing, unreadable, permissions, mismatch)
  22  --config: the Docker socket
  23  --config: the listening port is in use";

/// A failure class: its exit code.
#[derive(Clone, Copy)]
enum Class {
    Connect = 10,
    Tls = 11,
    ServerCert = 12,
    ClientCert = 13,
    Info = 14,
    TcpProbe = 15,
    Udp = 16,
    Docker = 17,
    Config = 20,
    Files = 21,
    DockerSocket = 22,
    PortInUse = 23,
}

/// A failed step: what the line says, then the cause and the next step.
struct Failed {
    class: Class,
    detail: String,
    cause: String,
    next: String,
}

fn fail(
    class: Class,
    detail: impl Into<String>,
    cause: impl Into<String>,
    next: impl Into<String>,
) -> Failed {
    Failed {
        class,
        detail: detail.into(),
        cause: cause.into(),
        next: next.into(),
    }
}

/// The steps run so far; after the first failure the rest are skipped.
#[derive(Default)]
struct Steps {
    failed: Option<Failed>,
}

impl Steps {
    /// Runs one step unless an earlier one failed; prints its line.
    async fn run<T>(
        &mut self,
        name: &str,
        work: impl Future<Output = Result<(T, String), Failed>>,
    ) -> Option<T> {
        if self.failed.is_some() {
            self.skip(name, "");
            return None;
        }
        let started = Instant::now();
        let result = work.await;
        let took = format!("{:.1} ms", started.elapsed().as_secs_f64() * 1000.0);
        match result {
            Ok((value, detail)) => {
                println!("ok    {name:<20} {took:>10}  {detail}");
                Some(value)
            }
            Err(failed) => {
                println!("FAIL  {name:<20} {took:>10}  {}", failed.detail);
                self.failed = Some(failed);
                None
            }
        }
    }

    /// A step that does not apply, with the reason.
    fn skip(&self, name: &str, why: &str) {
        let line = format!("skip  {name:<20} {:>10}  {why}", "");
        println!("{}", line.trim_end());
    }

    /// Prints the cause and next step of the first failure; its class is the exit code.
    fn finish(self) -> ExitCode {
        match self.failed {
            None => {
                println!("\nall steps passed");
                ExitCode::SUCCESS
            }
            Some(failed) => {
                println!("\ncause: {}", failed.cause);
                println!("next:  {}", failed.next);
                ExitCode::from(failed.class as u8)
            }
        }
    }
}

/// The remote checks against `server` (and `udp`, default the same address).
pub async fn remote(
    server: String,
    udp: Option<String>,
    godoxy_version: Option<String>,
    timeout: Duration,
    certs: CertArgs,
) -> ExitCode {
    let files = match certs.read() {
        Ok(files) => files,
        Err(err) => {
            eprintln!("godoxy-agent doctor: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let client = match files.client() {
        Ok(client) => client,
        Err(err) => {
            eprintln!("godoxy-agent doctor: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let server_version = match godoxy_version.as_deref().map(parse_release).transpose() {
        Ok(v) => v,
        Err(err) => {
            eprintln!("godoxy-agent doctor: --godoxy-version: {err}");
            return ExitCode::from(2);
        }
    };
    println!(
        "godoxy-agent doctor: {server}, as a GoDoxy server would see it (certificates: {})\n",
        files.describe()
    );
    let mut steps = Steps::default();

    let Some(addr) = steps.run("address", resolve(&server)).await else {
        steps.skip("tcp connect", "");
        skip_rest(&steps, REMOTE_STEPS_AFTER_CONNECT);
        return steps.finish();
    };
    let port = addr.port();
    let Some(tcp) = steps.run("tcp connect", tcp_connect(addr, timeout)).await else {
        skip_rest(&steps, REMOTE_STEPS_AFTER_CONNECT);
        return steps.finish();
    };
    // A step whose input an earlier failure did not produce is printed as skipped.
    let hello = steps
        .run("tls handshake", tls_handshake(tcp, port, timeout))
        .await;
    if let Some(hello) = hello {
        steps
            .run("server certificate", server_certificate(&files, &hello))
            .await;
    } else {
        steps.skip("server certificate", "");
    }
    steps
        .run(
            "client certificate",
            client_certificate(&client, &files, addr, timeout),
        )
        .await;
    let info = steps.run("/info", info(&client, addr, timeout)).await;
    if let Some(info) = info {
        steps
            .run("version", version(&info.version, server_version))
            .await;
    } else {
        steps.skip("version", "");
    }
    steps
        .run("tcp probe", tcp_probe(&client, addr, timeout))
        .await;
    let udp_addr = match udp {
        None => Some(addr),
        Some(udp) => steps.run("udp address", resolve(&udp)).await,
    };
    let tunnel = match udp_addr {
        Some(udp_addr) => {
            steps
                .run("dtls handshake", dtls_handshake(&client, udp_addr, timeout))
                .await
        }
        None => {
            steps.skip("dtls handshake", "");
            None
        }
    };
    if let Some(tunnel) = tunnel {
        steps.run("udp probe", udp_probe(tunnel, timeout)).await;
    } else {
        steps.skip("udp probe", "");
    }
    steps
        .run("docker api", docker_ping(&client, addr, timeout))
        .await;
    steps.finish()
}

const REMOTE_STEPS_AFTER_CONNECT: &[&str] = &[
    "tls handshake",
    "server certificate",
    "client certificate",
    "/info",
    "version",
    "tcp probe",
    "dtls handshake",
    "udp probe",
    "docker api",
];

fn skip_rest(steps: &Steps, names: &[&str]) {
    for name in names {
        steps.skip(name, "");
    }
}

async fn resolve(server: &str) -> Result<(SocketAddr, String), Failed> {
    let found = tokio::net::lookup_host(server).await.map_err(|e| {
        fail(
            Class::Connect,
            format!("{server}: {e}"),
            format!("`{server}` does not resolve here (expected HOST:PORT)"),
            "use the address GoDoxy dials (its config.yml `agents:` entry), as HOST:PORT",
        )
    })?;
    let addrs: Vec<SocketAddr> = found.collect();
    let addr = *addrs.first().ok_or_else(|| {
        fail(
            Class::Connect,
            format!("{server}: no address"),
            format!("`{server}` resolved to no address"),
            "check the name in DNS or /etc/hosts",
        )
    })?;
    Ok((addr, addr.to_string()))
}

async fn tcp_connect(addr: SocketAddr, within: Duration) -> Result<(TcpStream, String), Failed> {
    let port = addr.port();
    let published = format!(
        "on the agent's host: `ss -ltnup | grep :{port}` and the agent's log (`docker logs \
         godoxy-agent` / `journalctl -u godoxy-agent`); in a container publish both: \
         `-p {port}:{port}/tcp -p {port}:{port}/udp`"
    );
    match tokio::time::timeout(within, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => Ok((tcp, "connected".to_owned())),
        Err(_) => Err(fail(
            Class::Connect,
            format!("no answer within {}", secs(within)),
            format!(
                "no answer from {addr} TCP within {}: a firewall drops the packets, or the host \
                 is down or unreachable from here",
                secs(within)
            ),
            format!(
                "open TCP {port} on the agent's host (`ufw allow {port}/tcp`, the cloud's \
                 security group) and check the route from here (ping, traceroute)"
            ),
        )),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(fail(
            Class::Connect,
            format!("refused: {e}"),
            format!(
                "nothing listens on {addr} TCP (the host answered with a reset): the agent is \
                 not running, listens on another port, or its container port is not published"
            ),
            published,
        )),
        Ok(Err(e)) => Err(fail(
            Class::Connect,
            e.to_string(),
            format!("cannot reach {addr} TCP: {e}"),
            "check the address and the route from here to the agent's host",
        )),
    }
}

async fn tls_handshake(
    tcp: TcpStream,
    port: u16,
    within: Duration,
) -> Result<(diagnose::ServerHello, String), Failed> {
    let not_agent = format!(
        "check what listens on {port} on the agent's host (`ss -ltnp | grep :{port}`); a reverse \
         proxy or load balancer in front of the agent must pass TCP through (TLS passthrough), \
         not terminate TLS"
    );
    match tokio::time::timeout(within, diagnose::handshake_recording(tcp)).await {
        Ok(Ok(hello)) => {
            let detail = hello.protocol.clone();
            Ok((hello, detail))
        }
        Err(_) => Err(fail(
            Class::Tls,
            format!("no TLS answer within {}", secs(within)),
            format!(
                "TCP {port} accepts connections but sends no TLS answer: something other than \
                 the agent listens there, or the agent is at stream.max_connections"
            ),
            not_agent,
        )),
        Ok(Err(err)) => {
            let text = format!("{err:#}");
            let tls_error = err
                .downcast_ref::<io::Error>()
                .and_then(|e| e.get_ref())
                .and_then(|e| e.downcast_ref::<rustls::Error>());
            let cause = match tls_error {
                Some(rustls::Error::AlertReceived(alert)) => format!(
                    "the server refused the TLS handshake with alert {alert:?}: it does not \
                     accept our TLS offer (an old TLS server, or not the agent)"
                ),
                Some(rustls::Error::InvalidMessage(_)) => format!(
                    "the peer on TCP {port} answers, but not with TLS (plain HTTP or another \
                     protocol): it is not the agent"
                ),
                _ => format!(
                    "the peer on TCP {port} does not complete a TLS handshake ({text}): it is \
                     not the agent, or a proxy in front of it closes the connection"
                ),
            };
            Err(fail(Class::Tls, text, cause, not_agent))
        }
    }
}

async fn server_certificate(
    files: &CertFiles,
    hello: &diagnose::ServerHello,
) -> Result<((), String), Failed> {
    let verdict = diagnose::judge_server_chain(&files.ca, &hello.chain).map_err(|e| {
        fail(
            Class::ServerCert,
            format!("{e:#}"),
            format!("the certificate could not be judged: {e:#}"),
            format!("check {} (a PEM CA certificate)", files.ca_path.display()),
        )
    })?;
    let problem = match verdict {
        Ok(summary) => return Ok(((), summary)),
        Err(problem) => problem,
    };
    let ca = files.ca_path.display();
    let new_set = "make one set for both ends: `godoxy-agent certs init --out DIR --godoxy-addr \
                   HOST:PORT` (the agent gets ca.pem, server.pem, server.key; GoDoxy gets \
                   HOST:PORT.zip)";
    let (cause, next) = match &problem {
        CertProblem::WrongName { names } => (
            format!(
                "server certificate is for {}, GoDoxy expects {SERVER_NAME} (it verifies that \
                 name whatever address it dials)",
                names.join(", ")
            ),
            format!("give the agent a certificate with SAN {SERVER_NAME}; {new_set}"),
        ),
        CertProblem::Expired { not_after } => (
            format!("server certificate expired on {not_after}"),
            format!("check this host's clock (`date -u`); if it is right, {new_set}"),
        ),
        CertProblem::NotYetValid { not_before, now } => (
            format!(
                "clock skew: server certificate not yet valid (valid from {not_before}, this \
                 host's clock says {now})"
            ),
            "set the clocks right on this host, the GoDoxy server and the agent's host \
             (`timedatectl set-ntp true`, chrony); a GoDoxy server with a clock behind refuses \
             the certificate the same way"
                .to_owned(),
        ),
        CertProblem::OtherCa {
            issuer,
            ca: ca_name,
        } => (
            format!(
                "server certificate signed by another CA (the agent's ca.crt differs from the \
                 server's): it was issued by {issuer}, {ca} is {ca_name}"
            ),
            format!(
                "GoDoxy's certs/HOST:PORT.zip (ca.pem) and the agent's AGENT_CA_CERT / \
                 AGENT_SSL_CERT (tls.ca, tls.cert) must come from the same set; {new_set}"
            ),
        ),
        CertProblem::Unusable(reason) => (
            format!("server certificate refused: {reason}"),
            new_set.to_owned(),
        ),
    };
    Err(fail(Class::ServerCert, problem.to_string(), cause, next))
}

async fn client_certificate(
    client: &ClientTls,
    files: &CertFiles,
    addr: SocketAddr,
    within: Duration,
) -> Result<((), String), Failed> {
    if let Ok(Err(problem)) = diagnose::judge_client_cert(&files.ca, &files.cert) {
        let cert = files.cert_path.display();
        let (cause, next) = match &problem {
            CertProblem::OtherCa { .. } => (
                format!(
                    "our own client certificate {cert} is not signed by {}: the folder mixes \
                     files of two sets",
                    files.ca_path.display()
                ),
                "use ca.pem, client.pem and client.key from the same `certs init` (or the \
                 same GoDoxy HOST:PORT.zip)"
                    .to_owned(),
            ),
            CertProblem::NotYetValid { .. } => (
                format!("clock skew: client certificate {cert}: {problem}"),
                "set this host's clock right (`timedatectl set-ntp true`, chrony)".to_owned(),
            ),
            _ => (
                format!("client certificate {cert}: {problem}"),
                "make a new set: `godoxy-agent certs init --out DIR --godoxy-addr HOST:PORT`"
                    .to_owned(),
            ),
        };
        return Err(fail(Class::ClientCert, problem.to_string(), cause, next));
    }
    let refused = |alert: String| {
        // Our certificate is valid here (checked above): a date refusal is the agent's clock.
        if alert == "CertificateExpired" {
            return fail(
                Class::ClientCert,
                format!("the agent answered with alert {alert}"),
                "clock skew: client certificate refused by the agent as expired or not yet \
                 valid, though it is valid by this host's clock",
                "set the agent host's clock right (`timedatectl set-ntp true`, chrony)",
            );
        }
        fail(
            Class::ClientCert,
            format!("the agent answered with alert {alert}"),
            format!(
                "client certificate refused by the agent ({alert}): it trusts another CA (its \
                 tls.ca / AGENT_CA_CERT is not the CA that signed {})",
                files.cert_path.display()
            ),
            format!(
                "give the agent {} as its CA (tls.ca or AGENT_CA_CERT), or give GoDoxy the \
                 client half of the agent's own set",
                files.ca_path.display()
            ),
        )
    };
    let work = async {
        let mut tls = match client.connect_http(addr).await {
            Ok(tls) => tls,
            Err(e) => return Err(alert_of(&e).map_or_else(|| other_tls(&e), refused)),
        };
        tls.write_all(
            b"GET /godoxy/agent/info HTTP/1.1\r\nHost: godoxy.agent\r\nConnection: close\r\n\r\n",
        )
        .await
        .map_err(|e| alert_of(&e).map_or_else(|| other_tls(&e), refused))?;
        // TLS 1.3: the agent's verdict on our certificate arrives with its first reply.
        let mut reply = [0u8; 12];
        match tls.read(&mut reply).await {
            Ok(n) if reply[..n].starts_with(b"HTTP/1.1") => {
                Ok(((), "accepted (the agent answered HTTP)".to_owned()))
            }
            Ok(n) => Err(fail(
                Class::ClientCert,
                format!(
                    "unexpected reply {:?}",
                    String::from_utf8_lossy(&reply[..n])
                ),
                "the agent closed the connection instead of answering",
                "look at the agent's log for this connection",
            )),
            Err(e) => Err(alert_of(&e).map_or_else(|| other_tls(&e), refused)),
        }
    };
    tokio::time::timeout(within, work)
        .await
        .unwrap_or_else(|_| {
            Err(fail(
                Class::ClientCert,
                format!("no answer within {}", secs(within)),
                "the agent did not answer after the handshake",
                "look at the agent's log for this connection",
            ))
        })
}

fn alert_of(err: &io::Error) -> Option<String> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(format!("{alert:?}")),
        _ => None,
    }
}

fn other_tls(err: &io::Error) -> Failed {
    fail(
        Class::ClientCert,
        err.to_string(),
        format!("the TLS connection with our client certificate failed: {err}"),
        "look at the agent's log for this connection",
    )
}

async fn info(
    client: &ClientTls,
    addr: SocketAddr,
    within: Duration,
) -> Result<(godoxy_agent::client::AgentInfoReply, String), Failed> {
    match client.fetch_info(addr, within).await {
        Ok(info) => {
            let detail = format!(
                "name {:?}, version {}, runtime {}",
                info.name, info.version, info.runtime
            );
            Ok((info, detail))
        }
        Err(err) => Err(fail(
            Class::Info,
            format!("{err:#}"),
            format!("GET /godoxy/agent/info failed ({err:#}): GoDoxy adds no agent without it"),
            "look at the agent's log; a proxy in front of it must not answer for it",
        )),
    }
}

/// `vMAJOR.MINOR.PATCH[-suffix]` into its numbers.
fn parse_release(text: &str) -> Result<(u64, u64, u64), String> {
    let bad = || format!("`{text}` is not a release like v0.31.0");
    let rest = text.strip_prefix('v').ok_or_else(bad)?;
    let numbers = rest.split_once('-').map_or(rest, |(n, _)| n);
    let parts: Vec<u64> = numbers
        .split('.')
        .map(|p| p.parse::<u64>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    match parts[..] {
        [major, minor, patch] => Ok((major, minor, patch)),
        _ => Err(bad()),
    }
}

async fn version(reported: &str, server: Option<(u64, u64, u64)>) -> Result<((), String), Failed> {
    let next = "set godoxy_version in the agent's configuration to the GoDoxy server's release \
                (e.g. godoxy_version = \"v0.31.0\")";
    if let Err(why) = GodoxyVersion::parse(reported) {
        return Err(fail(
            Class::Info,
            why.clone(),
            format!(
                "version contract: {why}; GoDoxy reads vMAJOR.MINOR.PATCH strictly newer than \
                 v0.18.6, else it falls back to its legacy agent API"
            ),
            next,
        ));
    }
    let Some(server) = server else {
        return Ok(((), format!("{reported} (newer than v0.18.6)")));
    };
    let agent = parse_release(reported).unwrap_or((0, 0, 0));
    if agent.0 != server.0 {
        return Err(fail(
            Class::Info,
            format!("major {} here, {} on the server", agent.0, server.0),
            format!(
                "version contract: the agent reports {reported}, the server is v{}.{}.{}: GoDoxy \
                 logs \"major version mismatch\"",
                server.0, server.1, server.2
            ),
            next,
        ));
    }
    Ok((
        (),
        format!(
            "{reported} (newer than v0.18.6, same major as v{}.{}.{})",
            server.0, server.1, server.2
        ),
    ))
}

async fn tcp_probe(
    client: &ClientTls,
    addr: SocketAddr,
    within: Duration,
) -> Result<((), String), Failed> {
    client
        .probe_tcp(addr, within)
        .await
        .map(|_| ((), "closed without dialing, as a probe must".to_owned()))
        .map_err(|err| {
            fail(
                Class::TcpProbe,
                format!("{err:#}"),
                format!("the agent did not answer the TCP probe tunnel: {err:#}"),
                "look at the agent's log; is it a GoDoxy agent (ALPN godoxy-agent-stream/1)?",
            )
        })
}

async fn dtls_handshake(
    client: &ClientTls,
    udp: SocketAddr,
    within: Duration,
) -> Result<(UdpTunnel, String), Failed> {
    let port = udp.port();
    let published = format!(
        "publish UDP (`-p {port}:{port}/udp`), open it in the firewall (`ufw allow {port}/udp`, \
         security groups), check the agent's listen.udp is not \"\""
    );
    match client.try_connect_dtls(udp, None, within).await {
        Ok(tunnel) => Ok((tunnel, format!("{udp}"))),
        Err(DtlsConnectError::TimedOut(t)) => Err(fail(
            Class::Udp,
            format!("no answer within {}", secs(t)),
            format!(
                "TCP ok, DTLS no answer within {}: UDP port {port} is blocked or not published",
                secs(t)
            ),
            published,
        )),
        Err(DtlsConnectError::Io(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(fail(
            Class::Udp,
            format!("refused: {e}"),
            format!(
                "TCP ok, UDP port {port} refused (ICMP port unreachable): nothing listens \
                     there; the agent's UDP side is off or the port is not published"
            ),
            published,
        )),
        Err(DtlsConnectError::Dtls(webrtc_dtls::Error::ErrAlertFatalOrClose)) => Err(fail(
            Class::Udp,
            "the agent ended the DTLS handshake with an alert",
            "TCP ok, the agent refused the DTLS handshake (our client certificate over DTLS)",
            "look at the agent's log for this peer",
        )),
        Err(e) => Err(fail(
            Class::Udp,
            e.to_string(),
            format!("TCP ok, the DTLS handshake on UDP {port} failed: {e}"),
            published,
        )),
    }
}

async fn udp_probe(tunnel: UdpTunnel, within: Duration) -> Result<((), String), Failed> {
    tunnel
        .probe(within)
        .await
        .map(|()| ((), "closed without dialing, as a probe must".to_owned()))
        .map_err(|err| {
            fail(
                Class::Udp,
                format!("{err:#}"),
                format!("the DTLS handshake passed but the UDP probe failed: {err:#}"),
                "look at the agent's log for this peer",
            )
        })
}

async fn docker_ping(
    client: &ClientTls,
    addr: SocketAddr,
    within: Duration,
) -> Result<((), String), Failed> {
    let (status, body) = client.get(addr, "/_ping", within).await.map_err(|err| {
        fail(
            Class::Docker,
            format!("{err:#}"),
            format!("GET /_ping through the agent failed: {err:#}"),
            "look at the agent's log",
        )
    })?;
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
    match status.as_u16() {
        200 => Ok(((), format!("GET /_ping: 200 {message}"))),
        403 => Err(fail(
            Class::Docker,
            format!("GET /_ping: 403 {message}"),
            "the agent refuses Docker API calls (docker.access = \"off\"): GoDoxy cannot list \
             containers through it",
            "set docker.access = \"godoxy\" in the agent's configuration (routes by address \
             work without it)",
        )),
        502 => Err(fail(
            Class::Docker,
            format!("GET /_ping: 502 {message}"),
            format!("the agent cannot reach its Docker socket: {message}"),
            "mount the socket into the agent's container (`-v \
             /var/run/docker.sock:/var/run/docker.sock`), check docker.socket / DOCKER_SOCKET \
             and that the agent's user may open it; `godoxy-agent doctor --config` on the \
             agent's host says more",
        )),
        _ => Err(fail(
            Class::Docker,
            format!("GET /_ping: {status} {message}"),
            format!("the Docker API through the agent answered {status}"),
            "look at the agent's log",
        )),
    }
}

fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

// ---- local mode ----

/// The local checks: the configuration `run` would load from `path`, its files, the Docker
/// socket, the ports, and the environment.
pub async fn local(path: Option<PathBuf>, timeout: Duration) -> ExitCode {
    println!(
        "godoxy-agent doctor: this host, with {}\n",
        path.as_ref().map_or_else(
            || "built-in defaults and the environment".to_owned(),
            |p| p.display().to_string()
        )
    );
    let mut steps = Steps::default();
    let loaded = steps.run("config", load(path.as_deref())).await;
    let Some((config, warnings)) = loaded else {
        skip_rest(
            &steps,
            &[
                "environment",
                "tls files",
                "server certificate",
                "docker socket",
                "tcp port",
                "udp port",
            ],
        );
        return steps.finish();
    };
    for warning in &warnings {
        println!("      warning: {warning}");
    }
    steps.run("environment", environment()).await;
    let generated = steps.run("tls files", tls_files(&config)).await;
    if generated == Some(false) {
        steps
            .run("server certificate", local_server_certificate(&config))
            .await;
    } else {
        steps.skip("server certificate", "generated at start");
    }
    if config.docker.access == DockerAccess::Off {
        steps.skip("docker socket", "docker.access = \"off\"");
    } else {
        steps
            .run("docker socket", docker_socket(&config, timeout))
            .await;
    }
    steps.run("tcp port", tcp_port(&config, timeout)).await;
    match config.listen.udp {
        Some(udp) => {
            steps.run("udp port", udp_port(&config, udp, timeout)).await;
        }
        None => steps.skip("udp port", "listen.udp = \"\" (UDP tunnels off)"),
    }
    steps.finish()
}

async fn load(path: Option<&Path>) -> Result<((Config, Vec<String>), String), Failed> {
    match Config::load(path) {
        Ok((config, diagnostics)) => {
            let detail = format!(
                "{} (name {:?}, tcp {}, udp {})",
                path.map_or_else(|| "defaults".to_owned(), |p| p.display().to_string()),
                config.name,
                config.listen.tcp,
                config
                    .listen
                    .udp
                    .map_or_else(|| "off".to_owned(), |a| a.to_string())
            );
            Ok(((config, diagnostics.warnings), detail))
        }
        Err(errors) => {
            let all: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            Err(fail(
                Class::Config,
                all.first().cloned().unwrap_or_default(),
                format!("the configuration does not load: {}", all.join("; ")),
                "fix the keys named above; `godoxy-agent check-config` prints the effective \
                 settings",
            ))
        }
    }
}

async fn environment() -> Result<((), String), Failed> {
    let var = |name: &str| std::env::var_os(name).is_some();
    let detail = if var("INVOCATION_ID") || var("NOTIFY_SOCKET") {
        "systemd unit: logs with `journalctl -u godoxy-agent`; files must be readable by the \
         unit's User= (and allowed by ProtectSystem= / ReadOnlyPaths=)"
    } else if Path::new("/.dockerenv").exists() {
        "Docker container: paths are inside the container; publish -p 8890:8890/tcp -p \
         8890:8890/udp and mount the Docker socket"
    } else if Path::new("/run/.containerenv").exists() {
        "Podman container: paths are inside the container; publish -p 8890:8890/tcp -p \
         8890:8890/udp and mount podman's socket (docker.socket)"
    } else {
        "a plain process (no systemd unit, no container)"
    };
    Ok(((), detail.to_owned()))
}

/// Each file exists, is readable, the key is private, and the set loads as `run` loads it.
/// `Ok(true)` when the files are missing and will be generated at start.
async fn tls_files(config: &Config) -> Result<(bool, String), Failed> {
    let tls = &config.tls;
    let sources = [
        ("tls.ca", &tls.ca),
        ("tls.cert", &tls.cert),
        ("tls.key", &tls.key),
    ];
    let missing = |s: &PemSource| matches!(s, PemSource::File(p) if !p.exists());
    if tls.generate_if_missing && sources.iter().all(|(_, s)| missing(s)) {
        return Ok((
            true,
            "missing: generated at start (generate_if_missing)".to_owned(),
        ));
    }
    for (key, source) in sources {
        let PemSource::File(path) = source else {
            continue;
        };
        let meta = std::fs::metadata(path).map_err(|e| {
            let cause = if e.kind() == io::ErrorKind::NotFound {
                format!("{key} = {} does not exist", path.display())
            } else {
                format!("{key} = {}: {e}", path.display())
            };
            fail(
                Class::Files,
                format!("{key}: {}: {e}", path.display()),
                cause,
                "point the key at the file (in a container: the path inside it, with the \
                 folder mounted), or set AGENT_CA_CERT / AGENT_SSL_CERT",
            )
        })?;
        if let Err(e) = std::fs::File::open(path) {
            return Err(fail(
                Class::Files,
                format!("{key}: {}: {e}", path.display()),
                format!(
                    "{key} = {} cannot be read by this user: {e}",
                    path.display()
                ),
                "make it readable by the agent's user (chown, or the unit's User=)",
            ));
        }
        let mode = meta.permissions().mode() & 0o777;
        if key == "tls.key" && mode & 0o004 != 0 {
            return Err(fail(
                Class::Files,
                format!("tls.key: {} has mode {mode:o}", path.display()),
                format!(
                    "tls.key = {} is readable by every user (mode {mode:o}): whoever reads it \
                     can pose as this agent",
                    path.display()
                ),
                format!("chmod 600 {}", path.display()),
            ));
        }
    }
    Daemon::check_tls(config).map_err(|e| {
        fail(
            Class::Files,
            format!("{e:#}"),
            format!("the certificates do not load as `run` loads them: {e:#}"),
            "tls.cert and tls.key must be a pair (from the same `certs init` or GoDoxy's \
             generator), PEM, with an ECDSA P-256 key for UDP",
        )
    })?;
    Ok((
        false,
        "present, readable, key private, cert and key a pair".to_owned(),
    ))
}

async fn local_server_certificate(config: &Config) -> Result<((), String), Failed> {
    let read = |source: &PemSource| match source {
        PemSource::File(path) => std::fs::read(path).map_err(|e| e.to_string()),
        PemSource::Env { pem, .. } => Ok(pem.clone()),
    };
    let judged = read(&config.tls.ca)
        .and_then(|ca| Ok((ca, read(&config.tls.cert)?)))
        .and_then(|(ca, cert)| {
            diagnose::judge_server_pem(&ca, &cert).map_err(|e| format!("{e:#}"))
        });
    match judged {
        Ok(Ok(summary)) => Ok(((), summary)),
        Ok(Err(problem)) => {
            let cause = match &problem {
                CertProblem::OtherCa { .. } => format!(
                    "tls.cert ({}) is not signed by tls.ca ({}): GoDoxy checks the agent's \
                     certificate against the CA of the set it was given, so both must be one set",
                    config.tls.cert, config.tls.ca
                ),
                CertProblem::NotYetValid { .. } => {
                    format!("clock skew: tls.cert ({}) {problem}", config.tls.cert)
                }
                _ => format!("tls.cert ({}): {problem}", config.tls.cert),
            };
            Err(fail(
                Class::Files,
                problem.to_string(),
                cause,
                "make one set for both ends: `godoxy-agent certs init --out DIR --godoxy-addr \
                 HOST:PORT`",
            ))
        }
        Err(e) => Err(fail(
            Class::Files,
            e.clone(),
            format!("the certificates cannot be judged: {e}"),
            "check tls.ca and tls.cert",
        )),
    }
}

async fn docker_socket(config: &Config, within: Duration) -> Result<((), String), Failed> {
    let socket = &config.docker.socket;
    let mount = "mount the engine's socket (`-v /var/run/docker.sock:/var/run/docker.sock`; \
                 podman: /run/podman/podman.sock) and point docker.socket / DOCKER_SOCKET at it";
    let meta = std::fs::metadata(socket).map_err(|e| {
        fail(
            Class::DockerSocket,
            format!("{}: {e}", socket.display()),
            format!("the Docker socket {} is absent: {e}", socket.display()),
            mount,
        )
    })?;
    if !meta.file_type().is_socket() {
        return Err(fail(
            Class::DockerSocket,
            format!("{} is not a socket", socket.display()),
            format!(
                "docker.socket = {} is not a unix socket (a directory or file left by a bind \
                 mount made before the engine started?)",
                socket.display()
            ),
            mount,
        ));
    }
    let engine = Daemon::probe_docker_within(config, within)
        .await
        .map_err(|e| {
            let denied = e.to_lowercase().contains("permission denied");
            fail(
                Class::DockerSocket,
                e.clone(),
                if denied {
                    format!("this user may not open {}: {e}", socket.display())
                } else {
                    format!(
                        "the engine behind {} does not answer: {e}",
                        socket.display()
                    )
                },
                if denied {
                    "run the agent as a member of the socket's group (`docker`), or as root in its \
                 container"
                } else {
                    "start the engine (`systemctl start docker` / `podman.socket`) and check the \
                 socket path"
                },
            )
        })?;
    Ok((
        (),
        format!(
            "{} answers: {engine} (access = {})",
            socket.display(),
            config.docker.access.as_str()
        ),
    ))
}

/// The address to reach a listener bound to `addr` from this host.
fn local_target(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// Binds `addr` as the daemon would (an unspecified IPv6 address falls back to 0.0.0.0 on a
/// host without IPv6).
fn bind_test<T>(addr: SocketAddr, bind: impl Fn(SocketAddr) -> io::Result<T>) -> io::Result<()> {
    match bind(addr) {
        Err(e)
            if addr.ip() == IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
                && e.kind() != io::ErrorKind::AddrInUse =>
        {
            bind((Ipv4Addr::UNSPECIFIED, addr.port()).into()).map(drop)
        }
        other => other.map(drop),
    }
}

fn port_failed(transport: &str, addr: SocketAddr, e: &io::Error) -> Failed {
    let port = addr.port();
    let key = if transport == "tcp" {
        "listen.tcp"
    } else {
        "listen.udp"
    };
    if e.kind() == io::ErrorKind::PermissionDenied {
        return fail(
            Class::PortInUse,
            format!("binding {addr}/{transport}: {e}"),
            format!("port {port} is below 1024 and this user may not bind it"),
            "use a port above 1024, or grant CAP_NET_BIND_SERVICE (systemd: \
             AmbientCapabilities=CAP_NET_BIND_SERVICE)",
        );
    }
    fail(
        Class::PortInUse,
        format!("binding {addr}/{transport}: {e}"),
        format!(
            "{} port {port} is in use by another program (not an agent with this CA)",
            transport.to_uppercase()
        ),
        format!(
            "`ss -l{}np 'sport = :{port}'` shows which; stop it, or set {key} (AGENT_PORT) to \
             another port and tell GoDoxy",
            if transport == "tcp" { "t" } else { "u" }
        ),
    )
}

async fn tcp_port(config: &Config, within: Duration) -> Result<((), String), Failed> {
    let addr = config.listen.tcp;
    match bind_test(addr, std::net::TcpListener::bind) {
        Ok(()) => Ok(((), format!("{addr} is free"))),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            // A running agent holds its own port: that is no problem.
            let alive = match ClientTls::for_health_check(config) {
                Ok(client) => client
                    .check_tls_alive(local_target(addr), within)
                    .await
                    .ok(),
                Err(_) => None,
            };
            match alive {
                Some(_) => Ok((
                    (),
                    format!("{addr} is held by a running agent with this CA"),
                )),
                None => Err(port_failed("tcp", addr, &e)),
            }
        }
        Err(e) => Err(port_failed("tcp", addr, &e)),
    }
}

async fn udp_port(
    config: &Config,
    addr: SocketAddr,
    within: Duration,
) -> Result<((), String), Failed> {
    match bind_test(addr, std::net::UdpSocket::bind) {
        Ok(()) => Ok(((), format!("{addr} is free"))),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let alive = match ClientTls::for_health_check(config) {
                Ok(client) => client
                    .check_dtls_alive(local_target(addr), within)
                    .await
                    .ok(),
                Err(_) => None,
            };
            match alive {
                Some(_) => Ok((
                    (),
                    format!("{addr} is held by a running agent with this CA"),
                )),
                None => Err(port_failed("udp", addr, &e)),
            }
        }
        Err(e) => Err(port_failed("udp", addr, &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_release;

    #[test]
    fn releases() {
        assert_eq!(parse_release("v0.31.0"), Ok((0, 31, 0)));
        assert_eq!(parse_release("v1.2.3-rc1"), Ok((1, 2, 3)));
        for bad in ["0.31.0", "v0.31", "v0.31.0.1", "vx.1.2", ""] {
            assert!(parse_release(bad).is_err(), "{bad}");
        }
    }
}
