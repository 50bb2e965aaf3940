//! One UDP session's transport, as the `udp` and `mem` sections use it: a DTLS session
//! through the agent (the library's `ClientTls::open_udp`) or a plain socket straight to the
//! echo, with checked 1200-byte datagrams that carry a sequence number and a session id.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use godoxy_agent::client::UdpTunnel;
use tokio::net::UdpSocket;
use tokio::time::timeout;

use crate::load::Endpoints;

/// Payload bytes per datagram (the largest size the sections use).
pub const PAYLOAD: usize = 1200;
/// The small datagram size the `udp` section also measures.
pub const SMALL: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Sequence number of warm-up datagrams (not counted).
pub const WARM_SEQ: u64 = u64::MAX;
const SEQ_PATTERN: usize = 251;

/// One session's transport.
pub enum Dgram {
    /// A DTLS session through the agent.
    Dtls(Box<UdpTunnel>),
    /// A plain UDP socket connected to the echo.
    Plain(UdpSocket),
}

impl Dgram {
    /// A DTLS session to the agent naming the UDP echo (the header is sent).
    pub async fn agent(ep: &Endpoints) -> Result<Self> {
        let tunnel = ep
            .tls
            .open_udp(ep.agent_udp, &ep.udp_header()?, HANDSHAKE_TIMEOUT)
            .await?;
        Ok(Self::Dtls(Box::new(tunnel)))
    }

    /// A socket straight to the UDP echo.
    pub async fn direct(echo: SocketAddr) -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(echo).await?;
        Ok(Self::Plain(socket))
    }

    /// Sends one datagram.
    pub async fn send(&self, payload: &[u8]) -> Result<()> {
        match self {
            Self::Dtls(t) => t.send(payload).await,
            Self::Plain(s) => {
                s.send(payload).await?;
                Ok(())
            }
        }
    }

    /// `Ok(None)` when nothing came within `within`.
    pub async fn recv(&self, buf: &mut [u8], within: Duration) -> Result<Option<usize>> {
        match self {
            // DTLSConn::read is cancel safe (a channel receive): an outer timeout tells a
            // quiet moment apart from an error.
            Self::Dtls(t) => {
                match timeout(within, t.recv(buf, within + Duration::from_secs(1))).await {
                    Err(_) => Ok(None),
                    Ok(Ok(Some(n))) => Ok(Some(n)),
                    Ok(Ok(None)) => bail!("the agent closed the session"),
                    Ok(Err(e)) => Err(anyhow!("{e}")),
                }
            }
            Self::Plain(s) => match timeout(within, s.recv(buf)).await {
                Err(_) => Ok(None),
                Ok(r) => Ok(Some(r?)),
            },
        }
    }

    /// Closes the session (close_notify for DTLS).
    pub async fn close(self) {
        if let Self::Dtls(t) = self {
            (*t).close().await;
        }
    }

    /// Sends one warm-up datagram until it comes back (the session is then set up at the
    /// agent: its socket to the echo exists).
    pub async fn warm_up(&self) -> Result<()> {
        let mut payload = vec![0u8; PAYLOAD];
        fill(&mut payload, WARM_SEQ, 0);
        let mut buf = vec![0u8; 8192];
        for _ in 0..5 {
            self.send(&payload).await?;
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                if let Some(n) = self.recv(&mut buf, Duration::from_millis(200)).await?
                    && buf[..n] == payload[..]
                {
                    return Ok(());
                }
            }
        }
        Err(anyhow!("no warm-up datagram came back in 5 tries"))
    }
}

fn seq_pattern() -> &'static [u8] {
    static P: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        (0..PAYLOAD + SEQ_PATTERN)
            .map(|i| (i * 7 + 3) as u8)
            .collect()
    })
}

/// Fills a datagram of 12 to `PAYLOAD` bytes: sequence number, session id, then a pattern
/// that depends on `seq`.
pub fn fill(buf: &mut [u8], seq: u64, session: u32) {
    let len = buf.len();
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..12].copy_from_slice(&session.to_le_bytes());
    let at = (seq % SEQ_PATTERN as u64) as usize;
    buf[12..].copy_from_slice(&seq_pattern()[at..at + len - 12]);
}

/// The sequence number of an intact `size`-byte datagram of `session`; `None` when it is
/// not one.
pub fn check(buf: &[u8], session: u32, size: usize) -> Option<u64> {
    if buf.len() != size || size < 12 || buf[8..12] != session.to_le_bytes() {
        return None;
    }
    let seq = u64::from_le_bytes(buf[..8].try_into().ok()?);
    let at = (seq % SEQ_PATTERN as u64) as usize;
    (buf[12..] == seq_pattern()[at..at + size - 12]).then_some(seq)
}
