//! The client side of the protocol (what a GoDoxy server does): TLS tunnels, probes, the API.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpStream, ToSocketAddrs, UdpSocket};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use webrtc_dtls::config::{Config as DtlsConfig, ExtendedMasterSecretType};
use webrtc_dtls::conn::DTLSConn;

use crate::alpn::Alpn;
use crate::certs::SERVER_NAME;
use crate::dtls;
use crate::dtls::session::READ_BUF;
use crate::tunnel::header::TunnelHeader;

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
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("selecting TLS versions")?;
        let mut dtls = DtlsConfig {
            cipher_suites: vec![dtls::CIPHER_SUITE],
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
                dtls.certificates = vec![dtls::certificate(chain.clone(), &key)?];
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
            stream: with_alpn(Alpn::STREAM),
            http: with_alpn(Alpn::HTTP1),
            dtls,
        })
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
        let local = local.unwrap_or_else(|| match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        });
        let socket = UdpSocket::bind(local)
            .await
            .with_context(|| format!("binding {local}"))?;
        socket
            .connect(server)
            .await
            .with_context(|| format!("connecting to {server}"))?;
        let local = socket.local_addr()?;
        let socket = Arc::new(socket);
        let transport: Arc<dyn webrtc_util::Conn + Send + Sync> = socket.clone();
        let conn = tokio::time::timeout(
            handshake_timeout,
            DTLSConn::new(transport, self.dtls.clone(), true, None),
        )
        .await
        .map_err(|_| anyhow!("DTLS handshake with {server} timed out after {handshake_timeout:?}"))?
        .map_err(|e| anyhow!("DTLS handshake with {server} failed: {e}"))?;
        Ok(UdpTunnel {
            conn,
            local,
            socket,
        })
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

    /// Receives one record into `buf` (use at least [`READ_BUF`] bytes: a record that does
    /// not fit is lost). `Ok(None)` when the agent closed the session.
    pub async fn recv(&self, buf: &mut [u8], within: Duration) -> anyhow::Result<Option<usize>> {
        match self.conn.read(buf, Some(within)).await {
            Ok(n) => Ok(Some(n)),
            Err(webrtc_dtls::Error::ErrAlertFatalOrClose | webrtc_dtls::Error::ErrConnClosed) => {
                Ok(None)
            }
            Err(e) => Err(anyhow!("DTLS read: {e}")),
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

    /// A buffer of the right size for [`UdpTunnel::recv`].
    pub fn buffer() -> Vec<u8> {
        vec![0u8; READ_BUF]
    }
}
