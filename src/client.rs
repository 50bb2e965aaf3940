//! The client side of the protocol (what a GoDoxy server does): TLS tunnels, probes, the API.

use std::io;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::alpn::Alpn;
use crate::certs::SERVER_NAME;
use crate::tunnel::header::TunnelHeader;

/// Client TLS settings: trust the agent's CA, present a client certificate.
#[derive(Clone)]
pub struct ClientTls {
    stream: TlsConnector,
    http: TlsConnector,
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
            .context("selecting TLS versions")?
            .with_root_certificates(roots);
        let config = match cert_key {
            Some((cert, key)) => {
                let chain = crate::tls::parse_certs(cert).context("client certificate")?;
                let key =
                    PrivateKeyDer::from_pem_slice(key).map_err(|e| anyhow!("client key: {e}"))?;
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
