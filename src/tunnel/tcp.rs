//! The TCP side of the pipeline: the header is the first 275 bytes of the TLS stream, the
//! destination a TCP connection, the relay a half-closing copy both ways.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::relay::Relay;
use super::{Counts, End, Link};
use crate::protocol::{HEADER_LEN, HeaderError};
use crate::stats::{Stats, Transport};

/// An authenticated TLS stream that carries one tunnel.
pub(crate) struct TcpLink<'a, S> {
    client: &'a mut S,
    stats: &'a Stats,
    /// No byte either way for this long ends the relay; `None` = never.
    idle: Option<Duration>,
}

impl<'a, S> TcpLink<'a, S> {
    pub(crate) fn new(client: &'a mut S, stats: &'a Stats, idle: Option<Duration>) -> Self {
        Self {
            client,
            stats,
            idle,
        }
    }
}

impl<S> Link for TcpLink<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const TRANSPORT: Transport = Transport::Tcp;
    type Upstream = TcpStream;

    async fn read_header(&mut self) -> Result<[u8; HEADER_LEN], End> {
        // Exactly the header, no buffering: payload sent behind it stays in the stream.
        let mut bytes = [0u8; HEADER_LEN];
        match self.client.read_exact(&mut bytes).await {
            Ok(_) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(End::InvalidHeader(HeaderError::Short))
            }
            Err(e) => Err(End::Io(e)),
        }
    }

    async fn dial(&mut self, addrs: &[SocketAddr]) -> io::Result<TcpStream> {
        // Each address in turn, IPv4 and IPv6 alike; a slice is never resolved.
        let upstream = TcpStream::connect(addrs).await?;
        Stats::bump(&self.stats.tcp_tunnels);
        tune(&upstream);
        Ok(upstream)
    }

    async fn relay(
        &mut self,
        mut upstream: TcpStream,
        stop: &CancellationToken,
        counts: &mut Counts,
    ) -> End {
        let mut relay = Relay::new();
        let i = Transport::Tcp.index();
        let live = [&self.stats.up_bytes[i], &self.stats.down_bytes[i]];
        let result = tokio::select! {
            r = async {
                match self.idle {
                    Some(idle) => {
                        relay
                            .run_until_idle(self.client, &mut upstream, Some(&live), idle)
                            .await
                    }
                    None => relay
                        .run(self.client, &mut upstream, Some(&live))
                        .await
                        .map(|()| true),
                }
            } => Some(r),
            () = stop.cancelled() => None,
        };
        counts.up_bytes = relay.a_to_b();
        counts.down_bytes = relay.b_to_a();
        match result {
            None => End::Shutdown,
            Some(Ok(true)) => End::Eof,
            Some(Ok(false)) => End::Idle,
            // Many TLS clients close the socket without close_notify after a complete exchange.
            Some(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => End::Eof,
            Some(Err(e)) => End::Io(e),
        }
    }
}

/// Latency and liveness options for both legs of a tunnel.
pub(crate) fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}
