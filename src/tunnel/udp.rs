//! The UDP side of the pipeline: the header is the session's first DTLS record, the
//! destination a connected UDP socket, the relay one record per datagram each way.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;
use webrtc_dtls::conn::DTLSConn;

use super::{Counts, End, Link};
use crate::protocol::{DTLS_READ_BUF, HEADER_LEN, HeaderError, MAX_PAYLOAD};
use crate::stats::{Stats, Transport};

/// The index of this transport's byte counters.
const UDP: usize = Transport::Udp as usize;

/// Datagrams taken from the destination per readiness event before the client's side gets a
/// turn.
const DOWN_BATCH: usize = 32;

/// An established DTLS session that carries one tunnel.
pub(crate) struct UdpLink<'a> {
    dtls: &'a DTLSConn,
    idle_timeout: Duration,
    stats: &'a Stats,
    /// One record buffer serves the header and both relay directions.
    buf: Vec<u8>,
}

impl<'a> UdpLink<'a> {
    pub(crate) fn new(dtls: &'a DTLSConn, idle_timeout: Duration, stats: &'a Stats) -> Self {
        Self {
            dtls,
            idle_timeout,
            stats,
            buf: vec![0u8; DTLS_READ_BUF],
        }
    }
}

impl Link for UdpLink<'_> {
    const TRANSPORT: Transport = Transport::Udp;
    type Upstream = UdpSocket;

    async fn read_header(&mut self) -> Result<[u8; HEADER_LEN], End> {
        // The header is the first application record, alone.
        let n = self
            .dtls
            .read(&mut self.buf, None)
            .await
            .map_err(read_error)?;
        self.buf[..n]
            .try_into()
            .map_err(|_| End::InvalidHeader(HeaderError::Short))
    }

    async fn dial(&mut self, addrs: &[SocketAddr]) -> io::Result<UdpSocket> {
        connect(addrs).await
    }

    /// Datagrams both ways until the client closes, the session idles out, or `stop`. The
    /// DTLS read is cancel-safe, and the destination side waits for readiness before it
    /// borrows the buffer, so one buffer serves both directions.
    async fn relay(
        &mut self,
        udp: UdpSocket,
        stop: &CancellationToken,
        counts: &mut Counts,
    ) -> End {
        let Self {
            dtls,
            idle_timeout: idle,
            stats,
            buf,
        } = self;
        let idle = *idle;
        let mut last = Instant::now();
        let deadline = sleep_until((last + idle).into());
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = dtls.read(buf, None) => {
                    let n = match r {
                        Ok(n) => n,
                        Err(err) => return read_error(err),
                    };
                    last = Instant::now();
                    counts.up_datagrams += 1;
                    counts.up_bytes += n as u64;
                    Stats::add(&stats.up_bytes[UDP], n as u64);
                    if let Err(err) = udp.send(&buf[..n]).await {
                        // ICMP unreachable from an earlier datagram: the destination may come
                        // back, as with a plain UDP socket; anything else ends the session.
                        if err.kind() != io::ErrorKind::ConnectionRefused {
                            return End::Io(err);
                        }
                    }
                }
                r = udp.readable() => {
                    if let Err(err) = r {
                        return End::Io(err);
                    }
                    // A bounded batch, so a destination that never pauses cannot starve the
                    // client's direction; readiness stays set when the batch ends early.
                    for _ in 0..DOWN_BATCH {
                        let n = match udp.try_recv(buf) {
                            Ok(n) => n,
                            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => break,
                            Err(err) => return End::Io(err),
                        };
                        last = Instant::now();
                        if n > MAX_PAYLOAD {
                            // Would not fit one record the client can read: drop, count.
                            counts.dropped += 1;
                            Stats::bump(&stats.udp_oversize_drops);
                            continue;
                        }
                        counts.down_datagrams += 1;
                        counts.down_bytes += n as u64;
                        Stats::add(&stats.down_bytes[UDP], n as u64);
                        if let Err(err) = dtls.write(&buf[..n], None).await {
                            return End::Io(io::Error::other(format!("writing to client: {err}")));
                        }
                    }
                }
                () = &mut deadline => {
                    if last.elapsed() >= idle {
                        return End::Idle;
                    }
                    deadline.as_mut().reset((last + idle).into());
                }
                () = stop.cancelled() => return End::Shutdown,
            }
        }
    }
}

fn read_error(err: webrtc_dtls::Error) -> End {
    match err {
        webrtc_dtls::Error::ErrAlertFatalOrClose | webrtc_dtls::Error::ErrConnClosed => {
            End::ClientClosed
        }
        other => End::Io(io::Error::other(format!("reading from client: {other}"))),
    }
}

/// A UDP socket connected to the first allowed address (a datagram has no handshake that
/// would tell a dead address from a live one).
async fn connect(addrs: &[SocketAddr]) -> io::Result<UdpSocket> {
    let addr = *addrs
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address to dial"))?;
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(addr).await?;
    Ok(socket)
}
