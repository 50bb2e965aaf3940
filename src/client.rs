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
        let (conn, socket) = self
            .handshake_dtls(server, local, handshake_timeout)
            .await?;
        let local = socket.local_addr()?;
        Ok(UdpTunnel {
            conn,
            local,
            socket,
        })
    }

    async fn handshake_dtls(
        &self,
        server: SocketAddr,
        local: Option<SocketAddr>,
        within: Duration,
    ) -> Result<(DTLSConn, Arc<UdpSocket>), DtlsConnectError> {
        let local = local.unwrap_or_else(|| match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        });
        let socket = UdpSocket::bind(local).await?;
        socket.connect(server).await?;
        let socket = Arc::new(socket);
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
            Ok((conn, _socket)) => {
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
pub struct UdpTunnel {
    conn: DTLSConn,
    local: SocketAddr,
    socket: Arc<UdpSocket>,
}

impl UdpTunnel {
    /// The local UDP address of this session.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends one record.
    pub async fn send(&self, payload: &[u8]) -> anyhow::Result<()> {
        self.conn
            .write(payload, None)
            .await
            .map_err(|e| anyhow!("DTLS write: {e}"))?;
        Ok(())
    }

    /// Receives one record into `buf` (use at least [`DTLS_READ_BUF`] bytes: a record that does
    /// not fit is lost). `Ok(None)` when the agent closed the session.
    pub async fn recv(&self, buf: &mut [u8], within: Duration) -> Result<Option<usize>, RecvError> {
        match self.conn.read(buf, Some(within)).await {
            Ok(n) => Ok(Some(n)),
            Err(webrtc_dtls::Error::ErrAlertFatalOrClose | webrtc_dtls::Error::ErrConnClosed) => {
                Ok(None)
            }
            Err(webrtc_dtls::Error::ErrDeadlineExceeded) => Err(RecvError::TimedOut(within)),
            Err(e) => Err(RecvError::Failed(e.to_string())),
        }
    }

    /// Sends close_notify and releases the socket: when this returns, the local address can
    /// be bound again.
    pub async fn close(self) {
        let Self { conn, socket, .. } = self;
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
        drop(conn);
        // webrtc-dtls's reader task lets go of the socket shortly after close().
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while Arc::strong_count(&socket) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
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
