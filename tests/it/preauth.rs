//! Malformed DTLS from peers that have not authenticated: the fuzzer's crash inputs and a
//! flood of them reach the real agent, which drops and counts them, panics nowhere, logs one
//! line per interval instead of one per datagram, and still serves a legitimate client. Also
//! the patched webrtc-dtls (patches/) on what the pre-authentication check cannot see.

use std::any::Any;
use std::collections::VecDeque;
use std::io::Cursor;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{Running, TestDaemon, TestPki, UdpEcho, agent, field};
use godoxy_agent::protocol::TunnelHeader;
use tokio::net::UdpSocket;
use tokio::process::Command;
use webrtc_util::Conn;

const WAIT: Duration = Duration::from_secs(5);

/// tests/data/dtls_preauth/: inputs that panicked webrtc-dtls 0.12 before the check and the
/// patch. `fuzz-*` are what `cargo fuzz run dtls_raw` found; `crafted-*` reach the other
/// parsers with the same defect. Each file is the fuzz targets' input format: datagrams, each
/// a big-endian u16 length and its bytes.
fn crash_inputs() -> Vec<(String, Vec<Vec<u8>>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dtls_preauth");
    let mut inputs: Vec<(String, Vec<Vec<u8>>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, datagrams(&std::fs::read(&path).unwrap()))
        })
        .filter(|(name, _)| !name.ends_with(".md"))
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 10,
        "crash inputs missing from {}",
        dir.display()
    );
    inputs
}

fn datagrams(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let end = (2 + len).min(data.len());
        out.push(data[2..end].to_vec());
        data = &data[end..];
    }
    out
}

/// Neither the default panic report nor the agent's own once-per-site line (`panics=N` in the
/// aggregate line is a count, allowed).
fn assert_no_panic(log: &str) {
    assert!(
        !log.contains("panicked") && !log.contains("panic in"),
        "a panic was reported:\n{log}"
    );
    for line in log.lines().filter(|l| l.contains(" panics=")) {
        assert_eq!(field(line, "panics"), "0", "{line}");
    }
}

async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A tunnel through the daemon to an echo, one datagram there and back.
async fn echo_once(pki: &TestPki, server: SocketAddr) {
    let echo = UdpEcho::start().await;
    let header = TunnelHeader::new(
        &echo.addr.ip().to_string(),
        &echo.addr.port().to_string(),
        0,
    )
    .unwrap();
    let tunnel = pki.client().open_udp(server, &header, WAIT).await.unwrap();
    tunnel.send(b"still served").await.unwrap();
    let mut buf = godoxy_agent::client::UdpTunnel::buffer();
    let n = tunnel.recv(&mut buf, WAIT).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"still served");
    tunnel.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_inputs_are_dropped_and_counted() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let server = daemon.udp.unwrap();
    // The crafted inputs are one malformed datagram each: refused before any state exists.
    for (name, datagrams) in crash_inputs()
        .into_iter()
        .filter(|(n, _)| n.starts_with("crafted-"))
    {
        let before = daemon.stat(|s| &s.udp_preauth_drops);
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for datagram in &datagrams {
            socket.send_to(datagram, server).await.unwrap();
        }
        let want = before + datagrams.len() as u64;
        eventually(WAIT, &name, || {
            daemon.stat(|s| &s.udp_preauth_drops) == want
        })
        .await;
        assert_eq!(daemon.stat(|s| &s.udp_table), 0, "{name} opened a session");
    }
    // The fuzzer's inputs mix real datagrams (a real ClientHello opens a session) with the
    // mutated ones, which are dropped; each holds at least one of those.
    let fuzzed: Vec<_> = crash_inputs()
        .into_iter()
        .filter(|(n, _)| n.starts_with("fuzz-"))
        .collect();
    let before = daemon.stat(|s| &s.udp_preauth_drops);
    for (_, datagrams) in &fuzzed {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for datagram in datagrams {
            socket.send_to(datagram, server).await.unwrap();
        }
    }
    eventually(WAIT, "a drop per fuzz input", || {
        daemon.stat(|s| &s.udp_preauth_drops) >= before + fuzzed.len() as u64
    })
    .await;
    assert_eq!(daemon.stat(|s| &s.udp_handshakes), 0);
    assert_eq!(daemon.stat(|s| &s.dtls_panics), 0);
    // A legitimate client is served meanwhile.
    echo_once(&pki, server).await;
    assert_eq!(daemon.stat(|s| &s.udp_handshakes), 1);
    daemon.stop().await;
}

/// The check admits what real clients send: the agent's own client (a port of pion/dtls,
/// GoDoxy's), with and without a certificate, and openssl s_client. None of them fragments a
/// handshake message, so not one of their datagrams is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_pass_the_check_untouched() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let server = daemon.udp.unwrap();
    for _ in 0..20 {
        echo_once(&pki, server).await;
    }
    // Refused for want of a certificate, but by webrtc-dtls, after the whole flight.
    let _ = pki
        .client_without_cert()
        .connect_dtls(server, None, WAIT)
        .await;
    let script = format!(
        "sleep 1 | openssl s_client -dtls1_2 -cipher ECDHE-ECDSA-AES128-GCM-SHA256 \
         -connect {server} -cert {d}/client.pem -key {d}/client.key -CAfile {d}/ca.pem \
         -servername godoxy.agent -verify_return_error",
        d = pki.dir.path().display()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
    eventually(WAIT, "22 handshakes", || {
        daemon.stat(|s| &s.udp_handshakes) == 21 && daemon.stat(|s| &s.udp_handshake_failures) == 1
    })
    .await;
    assert_eq!(daemon.stat(|s| &s.udp_preauth_drops), 0);
    daemon.stop().await;
}

/// A ClientHello as the agent's client sends it, captured on a plain socket.
async fn real_client_hello(pki: &TestPki) -> Vec<u8> {
    let raw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = raw.local_addr().unwrap();
    let client = pki.client();
    let attempt =
        tokio::spawn(async move { client.connect_dtls(to, None, WAIT).await.map(|_| ()) });
    let mut buf = vec![0u8; 4096];
    let (n, _) = raw.recv_from(&mut buf).await.unwrap();
    attempt.abort();
    buf.truncate(n);
    buf
}

/// `hello` with `count` more extensions of a type webrtc-dtls does not know appended to its
/// extension block (the last field of a ClientHello), every length adjusted.
fn with_unknown_extensions(hello: &[u8], count: u16) -> Vec<u8> {
    let added = usize::from(count) * 4;
    let mut out = hello.to_vec();
    for i in 0..count {
        out.extend_from_slice(&(0xfa00 + i).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    let bump = |bytes: &mut [u8]| {
        let mut n = bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b));
        n += added;
        for b in bytes.iter_mut().rev() {
            *b = n as u8;
            n >>= 8;
        }
    };
    bump(&mut out[11..13]); // record length
    bump(&mut out[14..17]); // handshake length
    bump(&mut out[22..25]); // fragment length
    // The extension block's length: after version, random, session id, cookie, suites and
    // compression methods.
    let mut at = 25 + 2 + 32;
    at += 1 + usize::from(out[at]);
    at += 1 + usize::from(out[at]);
    at += 2 + usize::from(u16::from_be_bytes([out[at], out[at + 1]]));
    at += 1 + usize::from(out[at]);
    bump(&mut out[at..at + 2]);
    out
}

/// The flood from one socket at the agent binary with its default log filter: ~10 MB of the
/// crash inputs' datagrams and 1 MB of well-formed hellos carrying 40 unknown extensions each
/// (webrtc-dtls warns about each; its target is at error by default). The agent must not
/// panic, must not log per datagram (under 0.01 log bytes per attacker byte), and a
/// legitimate client must be served right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_malformed_hellos_is_dropped_quietly() {
    let pki = TestPki::new();
    let config = pki.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"flood\"\n[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"127.0.0.1:0\"\n\
             [docker]\naccess = \"off\"\n[metrics]\nenabled = false\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
        ),
    )
    .unwrap();
    // `agent()` clears RUST_LOG: the default filter (info, webrtc_dtls=error).
    let mut cmd = agent();
    cmd.arg("run").arg("--config").arg(&config);
    let mut agent = Running::spawn(cmd);
    let listening = agent.wait_for(&["agent listening"]).await;
    let server: SocketAddr = field(&listening, "udp").parse().unwrap();
    let quiet_from = agent.log.len();

    let hello = real_client_hello(&pki).await;
    let chatty = with_unknown_extensions(&hello, 40);
    let mut malformed: Vec<Vec<u8>> = crash_inputs()
        .into_iter()
        .flat_map(|(_, datagrams)| datagrams)
        .collect();
    malformed.push(hello[..hello.len() - 1].to_vec());
    // What to send, in order: the malformed datagrams round and round up to 10 MB, then 1 MB
    // of chatty hellos.
    let mut flood: Vec<&[u8]> = Vec::new();
    let mut malformed_bytes = 0;
    while malformed_bytes < 10 << 20 {
        for datagram in &malformed {
            flood.push(datagram);
            malformed_bytes += datagram.len();
        }
    }
    flood.extend(std::iter::repeat_n(
        chatty.as_slice(),
        (1 << 20) / chatty.len() + 1,
    ));
    let sent = flood.len();
    let sent_bytes: usize = flood.iter().map(|d| d.len()).sum();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let started = Instant::now();
    for (i, datagram) in flood.iter().enumerate() {
        socket.send_to(datagram, server).await.unwrap();
        // Paced a little, so the kernel's receive buffer does not drop most of it.
        if i % 64 == 63 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let flood_took = started.elapsed();
    // A legitimate client, right after.
    echo_once(&pki, server).await;

    // SIGTERM: the demultiplexer writes its last aggregate line before the daemon ends.
    let pid = agent.child.id().unwrap().to_string();
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(&pid)
        .output()
        .await
        .unwrap();
    assert!(kill.status.success());
    agent.wait_for(&["shutdown complete"]).await;
    let logged = &agent.log[quiet_from..];
    let logged_bytes: usize = logged.iter().map(|l| l.len() + 1).sum();
    let all = agent.log.join("\n");
    assert_no_panic(&all);
    let reports: Vec<&String> = logged
        .iter()
        .filter(|l| l.contains("unauthenticated peers"))
        .collect();
    assert!(!reports.is_empty(), "no aggregate line:\n{all}");
    let dropped: usize = reports
        .iter()
        .map(|l| field(l, "dropped").parse::<usize>().unwrap())
        .sum();
    assert!(
        reports
            .iter()
            .all(|l| field(l, "top").starts_with("127.0.0.1=")),
        "{reports:?}"
    );
    // The kernel may drop some of a flood; most must have reached the agent and been counted.
    assert!(
        dropped * 2 > sent,
        "{dropped} of {sent} datagrams counted:\n{all}"
    );
    let ratio = logged_bytes as f64 / sent_bytes as f64;
    eprintln!(
        "flood: {sent} datagrams, {sent_bytes} bytes in {flood_took:?}; {dropped} counted as \
         dropped; {} log lines, {logged_bytes} bytes: {ratio:.2e} log bytes per attacker byte",
        logged.len()
    );
    for line in logged {
        eprintln!("  {line}");
    }
    assert!(
        ratio < 0.01,
        "{logged_bytes} log bytes for {sent_bytes}:\n{all}"
    );
    // One line per interval (and the closing one), not one per datagram.
    assert!(logged.len() < 20, "{} lines:\n{all}", logged.len());
}

/// `datagrams` records of 600 one-byte fragments of handshake message `seq`, chained (each
/// names the next by its offset) and never complete: webrtc-dtls 0.12 reassembles such a chain
/// by recursion, one level per fragment, each time a record arrives. 200 of these datagrams
/// (1.6 MB) from one peer overflowed the stack of the agent before this check, aborting the
/// process.
fn fragment_chain(datagrams: u32, seq: u8) -> Vec<Vec<u8>> {
    let per_datagram = 600;
    let mut chain = Vec::new();
    for d in 0..datagrams {
        let sequence = (d + 10).to_be_bytes();
        let mut record = vec![22, 254, 253, 0, 0, 0, 0];
        record.extend_from_slice(&sequence);
        let mut body = Vec::new();
        for i in 0..per_datagram {
            let offset = d * per_datagram + i;
            // Fragment 0 claims a 2-byte message, so the chain is never complete; the others
            // claim a 1-byte one, each pointing at the next.
            let length: u32 = if offset == 0 { 2 } else { 1 };
            body.push(1);
            body.extend_from_slice(&length.to_be_bytes()[1..]);
            body.extend_from_slice(&[0, seq]);
            body.extend_from_slice(&offset.to_be_bytes()[1..]);
            body.extend_from_slice(&[0, 0, 1]);
            body.extend(std::iter::repeat_n(0, length as usize));
        }
        record.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        record.extend_from_slice(&body);
        chain.push(record);
    }
    chain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragment_chain_from_a_stranger_is_dropped() {
    let pki = TestPki::new();
    let daemon = TestDaemon::start_udp(&pki, "").await;
    let server = daemon.udp.unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // A real ClientHello opens a session; the chain continues its message sequence.
    socket
        .send_to(&real_client_hello(&pki).await, server)
        .await
        .unwrap();
    for datagram in fragment_chain(200, 1) {
        socket.send_to(&datagram, server).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eventually(WAIT, "200 drops", || {
        daemon.stat(|s| &s.udp_preauth_drops) == 200
    })
    .await;
    echo_once(&pki, server).await;
    daemon.stop().await;
}

/// What the check cannot see: records decrypted after a key exchange reach webrtc-dtls's
/// handshake parsers whatever they hold. The patched parsers return errors on the crafted
/// messages that made 0.12.0 index out of bounds.
#[test]
fn patched_parsers_refuse_short_messages() {
    use webrtc_dtls::handshake::Handshake;
    for (name, datagrams) in crash_inputs()
        .into_iter()
        .filter(|(n, _)| n.starts_with("crafted-"))
    {
        for datagram in datagrams {
            // One record, one whole message: the message is what follows the record header.
            let parsed = Handshake::unmarshal(&mut Cursor::new(&datagram[13..]));
            assert!(parsed.is_err(), "{name}: parsed");
        }
    }
}

/// A chain of one-byte handshake fragments, which webrtc-dtls reassembles recursively (one
/// level per fragment), fed to a real webrtc-dtls server on a thread with a small stack: the
/// patch's cap of 1024 buffered fragments keeps it from overflowing the stack (16 datagrams of
/// 600 fragments did with 0.12.0's unbounded buffer).
#[test]
fn fragment_chain_cannot_exhaust_the_stack() {
    let chain = fragment_chain(16, 0);
    let server = std::thread::Builder::new()
        .stack_size(512 << 10)
        .spawn(move || run_server(chain))
        .unwrap();
    server.join().expect("the webrtc-dtls server thread died");
}

/// A webrtc-dtls server (as the agent configures it) reading `datagrams` from memory until it
/// has read them all.
fn run_server(datagrams: Vec<Vec<u8>>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let feeder = Arc::new(Feeder {
            queue: Mutex::new(datagrams.into()),
            drained: tokio::sync::Notify::new(),
        });
        let transport: Arc<dyn Conn + Send + Sync> = feeder.clone();
        let config = webrtc_dtls::config::Config {
            certificates: vec![
                webrtc_dtls::crypto::Certificate::generate_self_signed(vec![
                    "godoxy.agent".to_owned(),
                ])
                .unwrap(),
            ],
            cipher_suites: vec![godoxy_agent::protocol::DTLS_CIPHER_SUITE],
            client_auth: webrtc_dtls::config::ClientAuthType::RequireAndVerifyClientCert,
            ..Default::default()
        };
        tokio::select! {
            _ = webrtc_dtls::conn::DTLSConn::new(transport, config, false, None) => {}
            () = feeder.drained.notified() => {}
            () = tokio::time::sleep(WAIT) => panic!("the server did not read every datagram"),
        }
    });
}

/// An in-memory transport: hands out the queued datagrams, then says it is drained.
struct Feeder {
    queue: Mutex<VecDeque<Vec<u8>>>,
    drained: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl Conn for Feeder {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(())
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let next = self.queue.lock().unwrap().pop_front();
        match next {
            Some(datagram) => {
                let n = datagram.len().min(buf.len());
                buf[..n].copy_from_slice(&datagram[..n]);
                Ok(n)
            }
            None => {
                self.drained.notify_one();
                std::future::pending().await
            }
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        Ok((self.recv(buf).await?, SocketAddr::from(([127, 0, 0, 1], 1))))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(buf.len())
    }

    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(buf.len())
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(SocketAddr::from(([127, 0, 0, 1], 2)))
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], 1)))
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }
}

/// The way past the check: a client that sends no certificate still gets webrtc-dtls to derive
/// keys from its ClientKeyExchange (it refuses such a client only after its Finished), and its
/// encrypted records are then decrypted and parsed whatever they hold, where the check sees
/// only ciphertext. This client does that by hand and sends, encrypted, a Finished and an empty
/// ClientKeyExchange (which made 0.12.0's parser index out of bounds). The patched agent must
/// not panic; that the server refused it for want of a certificate (`no_client_cert`, not a
/// timeout) shows it decrypted both records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_malformed_message_after_key_exchange_without_certificate() {
    let pki = TestPki::new();
    let config = pki.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"keyed\"\n[listen]\ntcp = \"127.0.0.1:0\"\nudp = \"127.0.0.1:0\"\n\
             [docker]\naccess = \"off\"\n[metrics]\nenabled = false\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.path("ca.pem").display(),
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
        ),
    )
    .unwrap();
    let mut cmd = agent();
    cmd.arg("run").arg("--config").arg(&config);
    let mut agent = Running::spawn(cmd);
    let listening = agent.wait_for(&["agent listening"]).await;
    let server: SocketAddr = field(&listening, "udp").parse().unwrap();

    let mut client = keyless::Client::connect(server).await;
    // Flight 5 without Certificate: ClientKeyExchange, ChangeCipherSpec, then in epoch 1 a
    // Finished (message 3; webrtc-dtls does not check its verify_data) and the malformed
    // message 4. Each plaintext is 24 bytes, a Finished's size, as the check requires.
    let finished = keyless::message(20, 3, &[0x5a; 12]);
    let mut empty_key_exchange = keyless::message(16, 4, &[]);
    empty_key_exchange.extend_from_slice(&keyless::message(0, 100, &[]));
    client
        .send_flight_five(&[&finished, &empty_key_exchange])
        .await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = agent.child.id().unwrap().to_string();
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(&pid)
        .output()
        .await
        .unwrap();
    assert!(kill.status.success());
    agent.wait_for(&["shutdown complete"]).await;
    let all = agent.log.join("\n");
    assert_no_panic(&all);
    let report = agent
        .log
        .iter()
        .find(|l| l.contains("unauthenticated peers"))
        .unwrap_or_else(|| panic!("no aggregate line:\n{all}"));
    assert!(report.contains("no_client_cert=1"), "{report}");
    assert_eq!(field(report, "dropped"), "0", "{report}");
}

/// A DTLS 1.2 client written out by hand (ring for the arithmetic), just far enough to hold
/// the keys of a session the server has not authenticated.
mod keyless {
    use std::net::SocketAddr;
    use std::time::Duration;

    use ring::{aead, agreement, digest, hmac, rand::SecureRandom as _};
    use tokio::net::UdpSocket;

    const DTLS_1_2: [u8; 2] = [254, 253];

    pub struct Client {
        socket: UdpSocket,
        server: SocketAddr,
        /// The handshake messages hashed for the Extended Master Secret, in order.
        transcript: Vec<u8>,
        client_random: [u8; 32],
        server_random: Vec<u8>,
        server_key: Vec<u8>,
    }

    /// A whole handshake message.
    pub fn message(msg_type: u8, seq: u16, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut out = vec![msg_type, len[1], len[2], len[3]];
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, len[1], len[2], len[3]]);
        out.extend_from_slice(body);
        out
    }

    fn record(content_type: u8, epoch: u16, seq: u64, fragment: &[u8]) -> Vec<u8> {
        let mut out = vec![content_type, DTLS_1_2[0], DTLS_1_2[1]];
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes()[2..]);
        out.extend_from_slice(&u16::try_from(fragment.len()).unwrap().to_be_bytes());
        out.extend_from_slice(fragment);
        out
    }

    /// The handshake messages (type, whole message) in a datagram's epoch 0 handshake records.
    fn messages(datagram: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = datagram;
        while rest.len() >= 13 {
            let len = usize::from(u16::from_be_bytes([rest[11], rest[12]]));
            let (rec, after) = rest.split_at(13 + len);
            if rec[0] == 22 && rec[3..5] == [0, 0] {
                let mut body = &rec[13..];
                while body.len() >= 12 {
                    let n = (usize::from(body[1]) << 16)
                        | (usize::from(body[2]) << 8)
                        | usize::from(body[3]);
                    assert_eq!(body[9..12], body[1..4], "the server fragmented a message");
                    out.push((body[0], body[..12 + n].to_vec()));
                    body = &body[12 + n..];
                }
            }
            rest = after;
        }
        out
    }

    fn client_hello(random: &[u8; 32], cookie: &[u8], seq: u16) -> Vec<u8> {
        let mut body = DTLS_1_2.to_vec();
        body.extend_from_slice(random);
        body.push(0);
        body.push(u8::try_from(cookie.len()).unwrap());
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 2, 0xc0, 0x2b, 1, 0]);
        let extensions: &[u8] = &[
            0, 10, 0, 4, 0, 2, 0, 23, // supported_groups: secp256r1
            0, 11, 0, 2, 1, 0, // ec_point_formats: uncompressed
            0, 13, 0, 4, 0, 2, 4, 3, // signature_algorithms: ecdsa_secp256r1_sha256
            0, 23, 0, 0, // extended_master_secret
        ];
        body.extend_from_slice(&u16::try_from(extensions.len()).unwrap().to_be_bytes());
        body.extend_from_slice(extensions);
        message(1, seq, &body)
    }

    /// P_SHA256 (RFC 5246 5).
    fn prf(secret: &[u8], label: &[u8], seed: &[u8], len: usize) -> Vec<u8> {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let label_seed = [label, seed].concat();
        let mut a = hmac::sign(&key, &label_seed).as_ref().to_vec();
        let mut out = Vec::new();
        while out.len() < len {
            out.extend_from_slice(hmac::sign(&key, &[&a[..], &label_seed].concat()).as_ref());
            a = hmac::sign(&key, &a).as_ref().to_vec();
        }
        out.truncate(len);
        out
    }

    impl Client {
        /// ClientHello, the cookie round, ClientHello again, and the server's flight up to
        /// ServerHelloDone.
        pub async fn connect(server: SocketAddr) -> Self {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut client_random = [0u8; 32];
            ring::rand::SystemRandom::new()
                .fill(&mut client_random)
                .unwrap();
            let first = client_hello(&client_random, &[], 0);
            socket
                .send_to(&record(22, 0, 0, &first), server)
                .await
                .unwrap();
            let hvr = Self::recv_messages(&socket).await;
            let (_, hvr) = hvr
                .iter()
                .find(|(t, _)| *t == 3)
                .expect("HelloVerifyRequest");
            let cookie = &hvr[15..15 + usize::from(hvr[14])];
            let second = client_hello(&client_random, cookie, 1);
            socket
                .send_to(&record(22, 0, 1, &second), server)
                .await
                .unwrap();
            let mut transcript = second;
            let mut flight = Vec::new();
            while !flight.iter().any(|(t, _): &(u8, Vec<u8>)| *t == 14) {
                flight.extend(Self::recv_messages(&socket).await);
            }
            let mut server_random = Vec::new();
            let mut server_key = Vec::new();
            // ServerHello, Certificate, ServerKeyExchange, CertificateRequest, ServerHelloDone.
            for wanted in [2, 11, 12, 13, 14] {
                let (_, msg) = flight.iter().find(|(t, _)| *t == wanted).unwrap();
                match wanted {
                    2 => server_random = msg[14..46].to_vec(),
                    // curve type, named curve, then the u8-length point.
                    12 => server_key = msg[16..16 + usize::from(msg[15])].to_vec(),
                    _ => {}
                }
                transcript.extend_from_slice(msg);
            }
            Self {
                socket,
                server,
                transcript,
                client_random,
                server_random,
                server_key,
            }
        }

        async fn recv_messages(socket: &UdpSocket) -> Vec<(u8, Vec<u8>)> {
            let mut buf = vec![0u8; 65536];
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
                .await
                .expect("the server answered")
                .unwrap();
            messages(&buf[..n])
        }

        /// ClientKeyExchange (message 2), ChangeCipherSpec, then each plaintext of `encrypted`
        /// as a handshake record of epoch 1 under the keys both sides now hold: one datagram.
        pub async fn send_flight_five(&mut self, encrypted: &[&[u8]]) {
            let rng = ring::rand::SystemRandom::new();
            let private =
                agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng).unwrap();
            let public = private.compute_public_key().unwrap();
            let pre_master = agreement::agree_ephemeral(
                private,
                &agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, &self.server_key),
                |shared| shared.to_vec(),
            )
            .unwrap();
            let key_exchange = message(16, 2, &[&[65u8][..], public.as_ref()].concat());
            self.transcript.extend_from_slice(&key_exchange);
            let session_hash = digest::digest(&digest::SHA256, &self.transcript);
            let master = prf(
                &pre_master,
                b"extended master secret",
                session_hash.as_ref(),
                48,
            );
            let keys = prf(
                &master,
                b"key expansion",
                &[&self.server_random[..], &self.client_random].concat(),
                40,
            );
            let (client_key, client_iv) = (&keys[..16], &keys[32..36]);
            let sealing = aead::LessSafeKey::new(
                aead::UnboundKey::new(&aead::AES_128_GCM, client_key).unwrap(),
            );
            let mut datagram = record(22, 0, 2, &key_exchange);
            datagram.extend_from_slice(&record(20, 0, 3, &[1]));
            for (seq, plaintext) in encrypted.iter().enumerate() {
                let seq = seq as u64;
                let explicit = (1u64 << 48 | seq).to_be_bytes();
                let nonce: [u8; 12] = [client_iv, &explicit[..]].concat().try_into().unwrap();
                let mut aad = explicit.to_vec();
                aad.extend_from_slice(&[22, DTLS_1_2[0], DTLS_1_2[1]]);
                aad.extend_from_slice(&u16::try_from(plaintext.len()).unwrap().to_be_bytes());
                let mut sealed = plaintext.to_vec();
                sealing
                    .seal_in_place_append_tag(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(aad),
                        &mut sealed,
                    )
                    .unwrap();
                datagram.extend_from_slice(&record(22, 1, seq, &[&explicit[..], &sealed].concat()));
            }
            self.socket.send_to(&datagram, self.server).await.unwrap();
        }
    }
}
