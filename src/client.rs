//! The client side of the protocol (what a GoDoxy server does): TLS tunnels, probes, the API.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use http_body_util::BodyExt as _;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, ToSocketAddrs, UdpSocket};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use webrtc_dtls::config::{Config as DtlsConfig, ExtendedMasterSecretType};
use webrtc_dtls::conn::DTLSConn;

use crate::dtls::record::{self, Opener, PAYLOAD_AT, Sealer, content};

use crate::config::Config;
use crate::protocol::{
    ALPN_HTTP1, ALPN_STREAM, DTLS_CIPHER_SUITE, DTLS_READ_BUF, SERVER_NAME, TunnelHeader,
};

/// Client TLS settings: trust the agent's CA, present a client certificate.
#[derive(Clone)]
pub struct ClientTls {
    stream: TlsConnector,
    http: TlsConnector,
    dtls: DtlsConfig,
}

impl ClientTls {
    /// From PEM text. `cert_key` is `None` to connect without a client certificate.
    pub fn from_pem(ca: &[u8], cert_key: Option<(&[u8], &[u8])>) -> anyhow::Result<Self> {
        crate::tls::install_default_provider();
        let mut roots = RootCertStore::empty();
        for cert in crate::tls::parse_certs(ca).context("CA certificate")? {
            roots.add(cert).context("CA certificate")?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::client_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("selecting TLS versions")?;
        let mut dtls = DtlsConfig {
            cipher_suites: vec![DTLS_CIPHER_SUITE],
            extended_master_secret: ExtendedMasterSecretType::Require,
            roots_cas: roots.clone(),
            // SNI, and the name the server certificate is verified as.
            server_name: SERVER_NAME.to_owned(),
            ..Default::default()
        };
        let builder = builder.with_root_certificates(roots);
        let config = match cert_key {
            Some((cert, key)) => {
                let chain = crate::tls::parse_certs(cert).context("client certificate")?;
                let key =
                    PrivateKeyDer::from_pem_slice(key).map_err(|e| anyhow!("client key: {e}"))?;
                dtls.certificates = vec![crate::tls::dtls_certificate(chain.clone(), &key)?];
                builder
                    .with_client_auth_cert(chain, key)
                    .context("client certificate and key")?
            }
            None => builder.with_no_client_auth(),
        };
        let with_alpn = |alpn: &[u8]| {
            let mut c = config.clone();
            c.alpn_protocols = vec![alpn.to_vec()];
            TlsConnector::from(Arc::new(c))
        };
        Ok(Self {
            stream: with_alpn(ALPN_STREAM),
            http: with_alpn(ALPN_HTTP1),
            dtls,
        })
    }

    /// Trusting the CA of an agent's own configuration, presenting no certificate: what the
    /// agent's health check on its own host needs.
    pub fn for_health_check(config: &Config) -> anyhow::Result<Self> {
        let ca = crate::tls::read_pem(&config.tls.ca, "tls.ca")?;
        Self::from_pem(&ca, None)
    }

    /// From a folder written by `certs init`: `ca.pem`, `client.pem`, `client.key`.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        Self::from_pem(
            &read("ca.pem")?,
            Some((&read("client.pem")?, &read("client.key")?)),
        )
    }

    /// A TLS connection negotiating the stream ALPN, with `header` written (and flushed).
    pub async fn open_tunnel(
        &self,
        server: impl ToSocketAddrs,
        header: &TunnelHeader,
    ) -> io::Result<TlsStream<TcpStream>> {
        let mut tls = self.connect(server, &self.stream).await?;
        tls.write_all(&header.encode()).await?;
        tls.flush().await?;
        Ok(tls)
    }

    /// A TLS connection negotiating the stream ALPN, nothing written yet.
    pub async fn connect_stream(
        &self,
        server: impl ToSocketAddrs,
    ) -> io::Result<TlsStream<TcpStream>> {
        self.connect(server, &self.stream).await
    }

    /// A TLS connection for the HTTP API (ALPN `http/1.1`).
    pub async fn connect_http(
        &self,
        server: impl ToSocketAddrs,
    ) -> io::Result<TlsStream<TcpStream>> {
        self.connect(server, &self.http).await
    }

    /// A DTLS session to the agent's UDP port with `header` sent as the first record.
    pub async fn open_udp(
        &self,
        server: SocketAddr,
        header: &TunnelHeader,
        handshake_timeout: Duration,
    ) -> anyhow::Result<UdpTunnel> {
        let tunnel = self.connect_dtls(server, None, handshake_timeout).await?;
        tunnel.send(&header.encode()).await?;
        Ok(tunnel)
    }

    /// A DTLS session, nothing sent yet; from `local` when given (default: an ephemeral
    /// port on the unspecified address of the server's family).
    pub async fn connect_dtls(
        &self,
        server: SocketAddr,
        local: Option<SocketAddr>,
        handshake_timeout: Duration,
    ) -> anyhow::Result<UdpTunnel> {
        self.try_connect_dtls(server, local, handshake_timeout)
            .await
            .map_err(|e| anyhow!("DTLS handshake with {server}: {e}"))
    }

    /// As [`ClientTls::connect_dtls`], saying why the handshake failed (for `doctor`).
    pub async fn try_connect_dtls(
        &self,
        server: SocketAddr,
        local: Option<SocketAddr>,
        handshake_timeout: Duration,
    ) -> Result<UdpTunnel, DtlsConnectError> {
        let (conn, transport) = self
            .handshake_dtls(server, local, handshake_timeout)
            .await?;
        let keys = conn.record_keys().await?;
        let (sealer, opener) = record::split(&keys).map_err(|e| io::Error::other(e.to_string()))?;
        // The session protects its own records from here: dropping the DTLSConn stops its
        // reader; what that reader diverted meanwhile waits in `early`.
        drop(conn);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while Arc::strong_count(&transport) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let socket = transport.socket.clone();
        let early = std::mem::take(&mut *lock(&transport.early));
        Ok(UdpTunnel {
            local: socket.local_addr()?,
            socket,
            sealer,
            opener: std::sync::Mutex::new(Inbox {
                opener,
                early,
                held: None,
            }),
        })
    }

    async fn handshake_dtls(
        &self,
        server: SocketAddr,
        local: Option<SocketAddr>,
        within: Duration,
    ) -> Result<(DTLSConn, Arc<HandshakeSocket>), DtlsConnectError> {
        let local = local.unwrap_or_else(|| match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        });
        let socket = UdpSocket::bind(local).await?;
        socket.connect(server).await?;
        let socket = Arc::new(HandshakeSocket {
            socket: Arc::new(socket),
            early: std::sync::Mutex::default(),
        });
        let transport: Arc<dyn webrtc_util::Conn + Send + Sync> = socket.clone();
        let conn = tokio::time::timeout(
            within,
            DTLSConn::new(transport, self.dtls.clone(), true, None),
        )
        .await
        .map_err(|_| DtlsConnectError::TimedOut(within))??;
        Ok((conn, socket))
    }

    /// TCP health probe: a stream tunnel with the probe flag, which the agent must close
    /// without dialing. Returns the time from connect to the close.
    pub async fn probe_tcp(
        &self,
        server: SocketAddr,
        within: Duration,
    ) -> anyhow::Result<Duration> {
        timed(within, async {
            let mut tls = self
                .connect_stream(server)
                .await
                .map_err(|e| anyhow!("TLS connection failed: {e}"))?;
            if tls.get_ref().1.alpn_protocol() != Some(ALPN_STREAM) {
                bail!(
                    "the agent does not offer TCP stream tunnels (no godoxy-agent-stream/1 ALPN)"
                );
            }
            tls.write_all(&TunnelHeader::probe().encode()).await?;
            tls.flush().await?;
            let mut rest = [0u8; 64];
            match tls.read(&mut rest).await {
                Ok(0) => Ok(()),
                // Closed without close_notify still answers the probe.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
                Ok(_) => bail!("the agent sent data in reply to a probe"),
                Err(e) => Err(anyhow!("the connection failed: {e}")),
            }
        })
        .await
    }

    /// UDP health probe: a DTLS session whose first record is a probe header; the agent must
    /// close it with close_notify.
    pub async fn probe_udp(
        &self,
        server: SocketAddr,
        within: Duration,
    ) -> anyhow::Result<Duration> {
        timed(within, async {
            let tunnel = self.connect_dtls(server, None, within).await?;
            tunnel.probe(within).await
        })
        .await
    }

    /// Liveness of the TLS port without a client certificate (a container health check needs
    /// none on the agent's host): the server must present a certificate from our CA and then
    /// either refuse us with an alert (client certificate required) or answer HTTP.
    pub async fn check_tls_alive(
        &self,
        server: SocketAddr,
        within: Duration,
    ) -> anyhow::Result<String> {
        deadline(within, async {
            let mut tls = match self.connect_http(server).await {
                Ok(tls) => tls,
                Err(e) => return server_alert(&e).ok_or_else(|| anyhow!("TLS: {e}")),
            };
            // TLS 1.3: the client's side completes first; the verdict comes with the reply.
            tls.write_all(b"GET /godoxy/agent/version HTTP/1.1\r\nHost: godoxy.agent\r\nConnection: close\r\n\r\n")
                .await?;
            let mut reply = [0u8; 12];
            match tls.read(&mut reply).await {
                Ok(n) if reply[..n].starts_with(b"HTTP/1.1 200") => {
                    Ok("answered HTTP (client certificates are not required)".to_owned())
                }
                Ok(n) => bail!("unexpected reply {:?}", String::from_utf8_lossy(&reply[..n])),
                Err(e) => server_alert(&e).ok_or_else(|| anyhow!("TLS: {e}")),
            }
        })
        .await
    }

    /// As [`ClientTls::check_tls_alive`] for the DTLS port.
    pub async fn check_dtls_alive(
        &self,
        server: SocketAddr,
        within: Duration,
    ) -> anyhow::Result<String> {
        match self.handshake_dtls(server, None, within).await {
            Ok((conn, _transport)) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
                Ok("handshake completed (client certificates are not required)".to_owned())
            }
            Err(DtlsConnectError::Dtls(webrtc_dtls::Error::ErrAlertFatalOrClose)) => {
                Ok("refused us with an alert: client certificate required".to_owned())
            }
            Err(e) => Err(anyhow!("DTLS: {e}")),
        }
    }

    /// `GET /godoxy/agent/info`, as the GoDoxy server does when an agent is added.
    pub async fn fetch_info(
        &self,
        server: SocketAddr,
        within: Duration,
    ) -> anyhow::Result<AgentInfoReply> {
        let (status, body) = self.get(server, "/godoxy/agent/info", within).await?;
        if !status.is_success() {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        serde_json::from_slice::<AgentInfoReply>(&body)
            .map_err(|e| anyhow!("the reply is not the expected JSON: {e}"))
    }

    /// `GET path` on the agent's HTTP side (a new connection; at most 64 KiB of body kept):
    /// the status and the body.
    pub async fn get(
        &self,
        server: SocketAddr,
        path: &str,
        within: Duration,
    ) -> anyhow::Result<(hyper::StatusCode, hyper::body::Bytes)> {
        deadline(within, async {
            let tls = self
                .connect_http(server)
                .await
                .map_err(|e| anyhow!("TLS connection failed: {e}"))?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            let request = hyper::Request::get(path)
                .header(hyper::header::HOST, SERVER_NAME)
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = http_body_util::Limited::new(response.into_body(), 64 * 1024)
                .collect()
                .await
                .map_err(|e| anyhow!("reading the reply: {e}"))?
                .to_bytes();
            Ok((status, body))
        })
        .await
    }

    async fn connect(
        &self,
        server: impl ToSocketAddrs,
        connector: &TlsConnector,
    ) -> io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(server).await?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(SERVER_NAME).map_err(io::Error::other)?;
        connector.connect(name, tcp).await
    }
}

/// Runs `work` under `within` and says how long it took.
async fn timed(
    within: Duration,
    work: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    deadline(within, work).await?;
    Ok(started.elapsed())
}

/// Runs `work` under `within`; running out of time is an error that says so.
async fn deadline<T>(
    within: Duration,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(within, work)
        .await
        .map_err(|_| anyhow!("timed out after {within:?}"))?
}

/// Why a DTLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum DtlsConnectError {
    /// The local socket failed (bind, connect, or an ICMP error such as port unreachable).
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// No handshake within the deadline: nothing answered, or the answers were lost.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The handshake itself failed (an alert, a certificate the client refused).
    #[error("failed: {0}")]
    Dtls(#[from] webrtc_dtls::Error),
}

/// An alert the server sent us: proof that it is up and judged our (absent) certificate.
fn server_alert(err: &io::Error) -> Option<String> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(format!(
            "refused us with an alert: {alert:?} (client certificate required)"
        )),
        _ => None,
    }
}

/// Why [`UdpTunnel::recv`] returned no record.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// Nothing arrived in time; the session is still usable.
    #[error("no record within {0:?}")]
    TimedOut(Duration),
    /// The session failed.
    #[error("DTLS read: {0}")]
    Failed(String),
}

/// What `/godoxy/agent/info` reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AgentInfoReply {
    /// Agent version.
    pub version: String,
    /// Agent name.
    pub name: String,
    /// `docker` or `podman`.
    pub runtime: String,
}

/// A client's DTLS session: each `send` is one record (one datagram at the destination).
/// webrtc-dtls does the handshake; the session then protects its records itself
/// (`dtls::record`), as the agent does.
pub struct UdpTunnel {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    sealer: Sealer,
    opener: std::sync::Mutex<Inbox>,
}

/// The receiving side's state.
struct Inbox {
    opener: Opener,
    /// Datagrams with protected records that arrived while webrtc-dtls still read the socket.
    early: std::collections::VecDeque<Vec<u8>>,
    /// A datagram with records still to be read, and where the next one starts.
    held: Option<(Vec<u8>, usize)>,
}

/// What the next record of a datagram was.
enum Opened {
    Data(usize),
    Closed,
    Skip,
}

impl Inbox {
    /// Opens the records of the held datagram until one carries data, which is moved to the
    /// start of `buf`; `None` when the datagram is used up.
    fn next(&mut self, buf: &mut [u8]) -> Option<Opened> {
        let (datagram, at) = self.held.as_mut()?;
        let Some(rec) = record::records(&mut datagram[*at..]).next() else {
            self.held = None;
            return None;
        };
        *at += rec.len();
        Some(match self.opener.open(rec) {
            Ok((content::APPLICATION_DATA, plain)) if plain.len() <= buf.len() => {
                buf[..plain.len()].copy_from_slice(plain);
                Opened::Data(plain.len())
            }
            // close_notify, or any fatal alert.
            Ok((content::ALERT, &[level, description])) if level == 2 || description == 0 => {
                Opened::Closed
            }
            _ => Opened::Skip,
        })
    }
}

/// The handshake's transport: the connected socket, with protected records (which only the
/// session's own record layer may read) kept apart from webrtc-dtls.
pub(crate) struct HandshakeSocket {
    socket: Arc<UdpSocket>,
    early: std::sync::Mutex<std::collections::VecDeque<Vec<u8>>>,
}

/// A poisoned lock only means a panic elsewhere; the data is still consistent here.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Protected datagrams kept for the session at most while the handshake ends.
const EARLY_MAX: usize = 64;

#[async_trait::async_trait]
impl webrtc_util::Conn for HandshakeSocket {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(self.socket.connect(addr).await?)
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        loop {
            let n = self.socket.recv(buf).await?;
            if !record::is_protected(&buf[..n]) {
                return Ok(n);
            }
            let mut early = lock(&self.early);
            if early.len() < EARLY_MAX {
                early.push_back(buf[..n].to_vec());
            }
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let n = self.recv(buf).await?;
        Ok((n, self.socket.peer_addr()?))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.send(buf).await?)
    }

    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(self.socket.send(buf).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        self.socket.peer_addr().ok()
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

impl UdpTunnel {
    /// The local UDP address of this session.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends one record.
    pub async fn send(&self, payload: &[u8]) -> anyhow::Result<()> {
        if payload.len() > crate::protocol::MAX_PAYLOAD {
            bail!("{} bytes do not fit one DTLS record", payload.len());
        }
        // Sealed in the thread's scratch buffer; copied out only if the socket is not ready.
        let pending = record::with_scratch(|buf| {
            buf[PAYLOAD_AT..PAYLOAD_AT + payload.len()].copy_from_slice(payload);
            let len = self
                .sealer
                .seal_in_place(content::APPLICATION_DATA, buf, payload.len())?;
            anyhow::Ok(match self.socket.try_send(&buf[..len]) {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(buf[..len].to_vec()),
                Err(e) => return Err(anyhow!("DTLS write: {e}")),
            })
        })?;
        if let Some(record) = pending {
            self.socket
                .send(&record)
                .await
                .map_err(|e| anyhow!("DTLS write: {e}"))?;
        }
        Ok(())
    }

    /// Receives one record into `buf` (use at least [`DTLS_READ_BUF`] bytes: a record that does
    /// not fit is lost). `Ok(None)` when the agent closed the session.
    pub async fn recv(&self, buf: &mut [u8], within: Duration) -> Result<Option<usize>, RecvError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            {
                let mut inbox = lock(&self.opener);
                loop {
                    match inbox.next(buf) {
                        Some(Opened::Data(n)) => return Ok(Some(n)),
                        Some(Opened::Closed) => return Ok(None),
                        Some(Opened::Skip) => continue,
                        None => {}
                    }
                    match inbox.early.pop_front() {
                        Some(datagram) => inbox.held = Some((datagram, 0)),
                        None => break,
                    }
                }
            }
            let n = match tokio::time::timeout_at(deadline, self.socket.recv(buf)).await {
                Err(_) => return Err(RecvError::TimedOut(within)),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(RecvError::Failed(e.to_string())),
            };
            // Records are opened where they arrived when the datagram holds just one (the
            // agents send one per datagram); otherwise the datagram is kept and read in turn.
            let mut inbox = lock(&self.opener);
            let single = record::records(&mut buf[..n]).next().map(|r| r.len()) == Some(n);
            if single {
                match inbox.opener.open(&mut buf[..n]) {
                    Ok((content::APPLICATION_DATA, plain)) => {
                        let len = plain.len();
                        buf.copy_within(PAYLOAD_AT..PAYLOAD_AT + len, 0);
                        return Ok(Some(len));
                    }
                    Ok((content::ALERT, &[level, description]))
                        if level == 2 || description == 0 =>
                    {
                        return Ok(None);
                    }
                    _ => {}
                }
            } else {
                inbox.held = Some((buf[..n].to_vec(), 0));
            }
        }
    }

    /// Sends close_notify and releases the socket: when this returns, the local address can
    /// be bound again.
    pub async fn close(self) {
        if let Ok(alert) = self.sealer.seal(content::ALERT, &[1, 0]) {
            let _ = self.socket.send(&alert).await;
        }
    }

    /// Sends a probe header and waits for the agent's close_notify, then closes: the UDP health
    /// probe on an established session.
    pub async fn probe(self, within: Duration) -> anyhow::Result<()> {
        self.send(&TunnelHeader::probe().encode()).await?;
        let mut buf = Self::buffer();
        let closed = self.recv(&mut buf, within).await;
        self.close().await;
        match closed? {
            None => Ok(()),
            Some(_) => bail!("the agent sent data in reply to a probe"),
        }
    }

    /// A buffer of the right size for [`UdpTunnel::recv`].
    pub fn buffer() -> Vec<u8> {
        vec![0u8; DTLS_READ_BUF]
    }
}
