//! The UDP side of the pipeline: the header is the session's first application record, the
//! destination a connected UDP socket, the relay one record per datagram each way. Records
//! are opened and sealed here, in the session's task (`dtls::record`): a datagram from the
//! client is decrypted in the buffer the demultiplexer filled, and one from the destination
//! is read, sealed and sent from a per-thread scratch buffer without an await in between, so
//! an idle session holds no buffer.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use super::{Counts, End, Link};
use crate::dtls::record::{self, Opener, PAYLOAD_AT, RecordError, Sealer, content};
use crate::protocol::{DTLS_READ_BUF, HEADER_LEN, HeaderError, MAX_PAYLOAD};
use crate::stats::{Stats, Transport};

/// The index of this transport's byte counters.
const UDP: usize = Transport::Udp as usize;

/// Datagrams taken from the destination per readiness event before the client's side gets a
/// turn.
const DOWN_BATCH: usize = 32;

/// How long sending close_notify may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Alert levels and the one description the relay acts on (RFC 5246 §7.2).
const FATAL: u8 = 2;
const CLOSE_NOTIFY: u8 = 0;

/// An established DTLS session that carries one tunnel.
pub(crate) struct UdpLink<'a> {
    sealer: Sealer,
    opener: Opener,
    /// The client's datagrams, from the demultiplexer.
    datagrams: mpsc::Receiver<BytesMut>,
    /// The agent's DTLS socket, shared by every session.
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    /// The server's last handshake flight: sent again while the client repeats its own (it
    /// did not get ours), dropped with the first application record.
    flight: Vec<Bytes>,
    /// A datagram being read, and where its next record starts.
    held: Option<(BytesMut, usize)>,
    idle_timeout: Duration,
    stats: &'a Stats,
}

/// What one record of the client's asks for.
enum Incoming {
    /// Application data: this range of the held datagram.
    Data(Range<usize>),
    /// close_notify or a fatal alert.
    Closed,
    /// The client repeated its last flight.
    Repeated,
    /// Nothing to do: a warning alert, or a record that failed (silently discarded, as
    /// RFC 6347 §4.1.2.7 says).
    Ignored,
}

/// What reading one datagram from the destination came to.
enum Down {
    Sent(usize),
    Empty,
    Oversize,
    /// The client's socket was not ready: the sealed record, to send with an await.
    Later(Vec<u8>, usize),
    Failed(End),
}

impl<'a> UdpLink<'a> {
    /// A session whose handshake is done: its keys, its datagrams and its last flight.
    pub(crate) fn new(
        (sealer, opener): (Sealer, Opener),
        datagrams: mpsc::Receiver<BytesMut>,
        (socket, peer): (Arc<UdpSocket>, SocketAddr),
        flight: Vec<Bytes>,
        idle_timeout: Duration,
        stats: &'a Stats,
    ) -> Self {
        Self {
            sealer,
            opener,
            datagrams,
            socket,
            peer,
            flight,
            held: None,
            idle_timeout,
            stats,
        }
    }

    /// Opens the next record of the held datagram; `None` when it is used up.
    fn next_record(&mut self) -> Option<Incoming> {
        let (datagram, at) = self.held.as_mut()?;
        let start = *at;
        let Some(record) = record::records(&mut datagram[start..]).next() else {
            self.held = None;
            return None;
        };
        *at += record.len();
        let kind = record[0];
        Some(match self.opener.open(record) {
            Ok((content::APPLICATION_DATA, plain)) => {
                self.flight = Vec::new();
                let from = start + PAYLOAD_AT;
                Incoming::Data(from..from + plain.len())
            }
            Ok((content::ALERT, &[level, description])) => {
                if level == FATAL || description == CLOSE_NOTIFY {
                    Incoming::Closed
                } else {
                    Incoming::Ignored
                }
            }
            Ok((content::HANDSHAKE, _)) => Incoming::Repeated,
            Err(RecordError::Epoch(_))
                if kind == content::HANDSHAKE || kind == content::CHANGE_CIPHER_SPEC =>
            {
                Incoming::Repeated
            }
            Ok(_) | Err(_) => Incoming::Ignored,
        })
    }

    /// Sends the last flight again (once per datagram of the client's repeated flight).
    async fn repeat_flight(&mut self) {
        self.held = None;
        for datagram in &self.flight {
            let _ = self.socket.send_to(datagram, self.peer).await;
        }
    }

    /// Reads from the destination and sends one record to the client, all in the scratch
    /// buffer.
    fn forward_down(&self, udp: &UdpSocket) -> Down {
        record::with_scratch(|buf| {
            let n = match udp.try_recv(&mut buf[PAYLOAD_AT..PAYLOAD_AT + DTLS_READ_BUF]) {
                Ok(n) => n,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    return Down::Empty;
                }
                Err(err) => return Down::Failed(End::Io(err)),
            };
            if n > MAX_PAYLOAD {
                // Would not fit one record the client can read.
                return Down::Oversize;
            }
            let len = match self.sealer.seal_in_place(content::APPLICATION_DATA, buf, n) {
                Ok(len) => len,
                Err(err) => return Down::Failed(End::Io(io::Error::other(err))),
            };
            match self.socket.try_send_to(&buf[..len], self.peer) {
                Ok(_) => Down::Sent(n),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    Down::Later(buf[..len].to_vec(), n)
                }
                Err(err) => Down::Failed(End::Io(io::Error::other(format!(
                    "writing to client: {err}"
                )))),
            }
        })
    }

    /// Sends close_notify, bounded: a vanished peer must not hold the session.
    pub(crate) async fn close(&self) {
        if let Ok(alert) = self.sealer.seal(content::ALERT, &[1, CLOSE_NOTIFY]) {
            let _ = timeout(CLOSE_TIMEOUT, self.socket.send_to(&alert, self.peer)).await;
        }
    }
}

impl Link for UdpLink<'_> {
    const TRANSPORT: Transport = Transport::Udp;
    type Upstream = UdpSocket;

    async fn read_header(&mut self) -> Result<[u8; HEADER_LEN], End> {
        // The header is the first application record, alone.
        loop {
            match self.next_record() {
                Some(Incoming::Data(range)) => {
                    let held = self.held.as_ref().map_or(&[][..], |(d, _)| &d[range]);
                    return held
                        .try_into()
                        .map_err(|_| End::InvalidHeader(HeaderError::Short));
                }
                Some(Incoming::Closed) => return Err(End::ClientClosed),
                Some(Incoming::Repeated) => self.repeat_flight().await,
                Some(Incoming::Ignored) => {}
                None => match self.datagrams.recv().await {
                    Some(datagram) => self.held = Some((datagram, 0)),
                    // The demultiplexer let go of this peer: it is stopping.
                    None => return Err(End::Shutdown),
                },
            }
        }
    }

    async fn dial(&mut self, addrs: &[SocketAddr]) -> io::Result<UdpSocket> {
        connect(addrs).await
    }

    /// Datagrams both ways until the client closes, the session idles out, or `stop`.
    async fn relay(
        &mut self,
        udp: UdpSocket,
        stop: &CancellationToken,
        counts: &mut Counts,
    ) -> End {
        let idle = self.idle_timeout;
        let stats = self.stats;
        let mut last = Instant::now();
        let deadline = sleep_until((last + idle).into());
        tokio::pin!(deadline);
        loop {
            // The records of the datagram in hand first (a datagram may carry several).
            while let Some(incoming) = self.next_record() {
                match incoming {
                    Incoming::Data(range) => {
                        let Some((datagram, _)) = &self.held else {
                            continue;
                        };
                        let payload = &datagram[range];
                        let n = payload.len();
                        last = Instant::now();
                        counts.up_datagrams += 1;
                        counts.up_bytes += n as u64;
                        Stats::add(&stats.up_bytes[UDP], n as u64);
                        if let Err(err) = udp.send(payload).await {
                            // ICMP unreachable from an earlier datagram: the destination may
                            // come back, as with a plain UDP socket; anything else ends the
                            // session.
                            if err.kind() != io::ErrorKind::ConnectionRefused {
                                return End::Io(err);
                            }
                        }
                    }
                    Incoming::Closed => return End::ClientClosed,
                    Incoming::Repeated => self.repeat_flight().await,
                    Incoming::Ignored => {}
                }
            }
            tokio::select! {
                received = self.datagrams.recv() => match received {
                    Some(datagram) => self.held = Some((datagram, 0)),
                    None => return End::Shutdown,
                },
                r = udp.readable() => {
                    if let Err(err) = r {
                        return End::Io(err);
                    }
                    // A bounded batch, so a destination that never pauses cannot starve the
                    // client's direction; readiness stays set when the batch ends early.
                    for _ in 0..DOWN_BATCH {
                        let n = match self.forward_down(&udp) {
                            Down::Sent(n) => n,
                            Down::Empty => break,
                            Down::Oversize => {
                                counts.dropped += 1;
                                Stats::bump(&stats.udp_oversize_drops);
                                continue;
                            }
                            Down::Later(record, n) => {
                                if let Err(err) = self.socket.send_to(&record, self.peer).await {
                                    return End::Io(io::Error::other(format!(
                                        "writing to client: {err}"
                                    )));
                                }
                                n
                            }
                            Down::Failed(end) => return end,
                        };
                        last = Instant::now();
                        counts.down_datagrams += 1;
                        counts.down_bytes += n as u64;
                        Stats::add(&stats.down_bytes[UDP], n as u64);
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
