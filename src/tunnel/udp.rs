//! The UDP side of the pipeline: the header is the session's first application record, the
//! destination a connected UDP socket, the relay one record per datagram each way. Records
//! are opened and sealed here, in the session's task (`dtls::record`): a datagram from the
//! client is decrypted in the buffer the demultiplexer filled, and one from the destination
//! is read, sealed and sent from a per-thread scratch buffer without an await in between, so
//! an idle session holds no buffer.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_udp::RecvMeta;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use super::{Counts, End, Link};
use crate::dtls::batch::{BATCH, Batched};
use crate::dtls::record::{self, Opener, PAYLOAD_AT, RecordError, Sealer, content};
use crate::protocol::{DTLS_READ_BUF, HEADER_LEN, HeaderError, MAX_PAYLOAD};
use crate::stats::{Stats, Transport};

/// The index of this transport's byte counters.
const UDP: usize = Transport::Udp as usize;

/// Batches (of up to `BATCH` datagrams) taken from the destination per readiness event before
/// the client's side gets a turn.
const DOWN_BATCHES: usize = 2;

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
    /// Batched system calls (its offload state serves the destination socket too).
    batched: Arc<Batched>,
    peer: SocketAddr,
    /// The server's last handshake flight: sent again while the client repeats its own (it
    /// did not get ours), dropped with the first application record.
    flight: Vec<Bytes>,
    /// A datagram being read, and where its next record starts.
    held: Option<(BytesMut, usize)>,
    /// Datagrams received and not yet read.
    inbox: VecDeque<BytesMut>,
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

/// What one read from the destination came to.
enum Down {
    Sent(Batch),
    Empty,
    Failed(End),
}

/// Datagrams forwarded to the client in one batch.
#[derive(Default)]
struct Batch {
    datagrams: u64,
    bytes: u64,
    oversize: u64,
    /// Records the client's socket had no room for yet (packed, and their lengths): sent
    /// with an await.
    later: Option<(Vec<u8>, Vec<usize>)>,
}

/// One datagram's room in the scratch buffer: header and nonce, the largest datagram read,
/// the tag.
const SLOT: usize = DTLS_READ_BUF + record::OVERHEAD;

/// The downstream direction's per-thread buffers.
#[derive(Default)]
struct Scratch {
    buf: Vec<u8>,
    meta: Vec<RecvMeta>,
    lens: Vec<usize>,
}

thread_local! {
    static DOWN: RefCell<Scratch> = RefCell::default();
    static UP: RefCell<Scratch> = RefCell::default();
}

/// What one batch from the client came to.
#[derive(Default)]
struct Up {
    datagrams: u64,
    bytes: u64,
    /// Payloads the destination socket had no room for yet: sent with an await.
    later: Option<(Vec<u8>, Vec<usize>)>,
    /// An alert or a repeated flight that ended the batch.
    event: Option<Incoming>,
    error: Option<io::Error>,
}

impl<'a> UdpLink<'a> {
    /// A session whose handshake is done: its keys, its datagrams and its last flight.
    pub(crate) fn new(
        (sealer, opener): (Sealer, Opener),
        datagrams: mpsc::Receiver<BytesMut>,
        (socket, batched, peer): (Arc<UdpSocket>, Arc<Batched>, SocketAddr),
        flight: Vec<Bytes>,
        idle_timeout: Duration,
        stats: &'a Stats,
    ) -> Self {
        Self {
            sealer,
            opener,
            datagrams,
            socket,
            batched,
            peer,
            flight,
            held: None,
            inbox: VecDeque::new(),
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

    /// Opens the records of the datagrams in hand, packs the payloads in this thread's buffer
    /// and sends them to the destination (GSO), stopping at an alert or a repeated flight.
    fn forward_up(&mut self, udp: &UdpSocket, destination: SocketAddr) -> Up {
        UP.with_borrow_mut(|scratch| {
            let Scratch { buf, lens, .. } = scratch;
            if buf.is_empty() {
                buf.resize(BATCH * DTLS_READ_BUF, 0);
            }
            let mut up = Up::default();
            lens.clear();
            let mut packed = 0;
            while lens.len() < BATCH {
                let incoming = match self.next_record() {
                    Some(incoming) => incoming,
                    None => match self.inbox.pop_front() {
                        Some(datagram) => {
                            self.held = Some((datagram, 0));
                            continue;
                        }
                        None => break,
                    },
                };
                match incoming {
                    Incoming::Data(range) => {
                        let Some((datagram, _)) = &self.held else {
                            continue;
                        };
                        let payload = &datagram[range];
                        if packed + payload.len() > buf.len() {
                            // Cannot happen (records are smaller than the slots); dropped.
                            continue;
                        }
                        buf[packed..packed + payload.len()].copy_from_slice(payload);
                        packed += payload.len();
                        lens.push(payload.len());
                        up.bytes += payload.len() as u64;
                    }
                    Incoming::Ignored => {}
                    event => {
                        up.event = Some(event);
                        break;
                    }
                }
            }
            up.datagrams = lens.len() as u64;
            match self
                .batched
                .try_send_packed(udp, destination, &buf[..packed], lens)
            {
                Ok(sent) if sent == lens.len() => {}
                Ok(sent) => {
                    let from: usize = lens[..sent].iter().sum();
                    up.later = Some((buf[from..packed].to_vec(), lens[sent..].to_vec()));
                }
                // ICMP unreachable from an earlier datagram: the destination may come back,
                // as with a plain UDP socket (these datagrams are lost); anything else ends
                // the session.
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(err) => up.error = Some(err),
            }
            up
        })
    }

    /// Reads what the destination has ready (one `recvmmsg`), seals each datagram where it
    /// landed, packs the records together and sends them to the client (GSO), all in this
    /// thread's buffers.
    fn forward_down(&self, udp: &UdpSocket) -> Down {
        DOWN.with_borrow_mut(|down| {
            let Scratch { buf, meta, lens } = down;
            if buf.is_empty() {
                buf.resize(BATCH * SLOT, 0);
                meta.resize(BATCH, RecvMeta::default());
            }
            let mut slots = buf.chunks_mut(SLOT);
            let mut slices: [IoSliceMut<'_>; BATCH] = std::array::from_fn(|_| {
                IoSliceMut::new(slots.next().map_or(&mut [][..], |s| {
                    &mut s[PAYLOAD_AT..PAYLOAD_AT + DTLS_READ_BUF]
                }))
            });
            let received = match self.batched.try_recv(udp, &mut slices, meta) {
                Ok(n) => n,
                // ICMP unreachable from an earlier datagram: the destination may come back.
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => 0,
                Err(err) => return Down::Failed(End::Io(err)),
            };
            let mut batch = Batch::default();
            lens.clear();
            let mut packed = 0;
            for (i, m) in meta.iter().take(received).enumerate() {
                if m.len > MAX_PAYLOAD {
                    // Would not fit one record the client can read.
                    batch.oversize += 1;
                    continue;
                }
                let slot = i * SLOT;
                let len = match self.sealer.seal_in_place(
                    content::APPLICATION_DATA,
                    &mut buf[slot..slot + SLOT],
                    m.len,
                ) {
                    Ok(len) => len,
                    Err(err) => return Down::Failed(End::Io(io::Error::other(err))),
                };
                buf.copy_within(slot..slot + len, packed);
                packed += len;
                lens.push(len);
                batch.bytes += m.len as u64;
            }
            batch.datagrams = lens.len() as u64;
            if received == 0 {
                return Down::Empty;
            }
            match self
                .batched
                .try_send_packed(&self.socket, self.peer, &buf[..packed], lens)
            {
                Ok(sent) if sent == lens.len() => {}
                Ok(sent) => {
                    let from: usize = lens[..sent].iter().sum();
                    batch.later = Some((buf[from..packed].to_vec(), lens[sent..].to_vec()));
                }
                Err(err) => {
                    return Down::Failed(End::Io(io::Error::other(format!(
                        "writing to client: {err}"
                    ))));
                }
            }
            Down::Sent(batch)
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
        let destination = match udp.peer_addr() {
            Ok(addr) => addr,
            Err(err) => return End::Io(err),
        };
        let mut last = Instant::now();
        let deadline = sleep_until((last + idle).into());
        tokio::pin!(deadline);
        loop {
            // What the client sent, in batches: the records of the datagrams in hand, packed
            // and sent to the destination in one call (GSO).
            while self.held.is_some() || !self.inbox.is_empty() {
                let up = self.forward_up(&udp, destination);
                if up.datagrams > 0 {
                    last = Instant::now();
                    counts.up_datagrams += up.datagrams;
                    counts.up_bytes += up.bytes;
                    Stats::add(&stats.up_bytes[UDP], up.bytes);
                }
                if let Some((payloads, lens)) = &up.later
                    && let Err(err) = self
                        .batched
                        .send_packed(&udp, destination, payloads, lens)
                        .await
                    && err.kind() != io::ErrorKind::ConnectionRefused
                {
                    return End::Io(err);
                }
                match up.event {
                    Some(Incoming::Closed) => return End::ClientClosed,
                    Some(Incoming::Repeated) => self.repeat_flight().await,
                    _ => {}
                }
                if let Some(err) = up.error {
                    return End::Io(err);
                }
            }
            tokio::select! {
                received = self.datagrams.recv() => match received {
                    Some(datagram) => {
                        self.inbox.push_back(datagram);
                        while self.inbox.len() < BATCH {
                            match self.datagrams.try_recv() {
                                Ok(datagram) => self.inbox.push_back(datagram),
                                Err(_) => break,
                            }
                        }
                    }
                    None => return End::Shutdown,
                },
                r = udp.readable() => {
                    if let Err(err) = r {
                        return End::Io(err);
                    }
                    // Bounded batches, so a destination that never pauses cannot starve the
                    // client's direction; readiness stays set when the batches end early.
                    for _ in 0..DOWN_BATCHES {
                        let batch = match self.forward_down(&udp) {
                            Down::Sent(batch) => batch,
                            Down::Empty => break,
                            Down::Failed(end) => return end,
                        };
                        if let Some((records, lens)) = &batch.later
                            && let Err(err) = self
                                .batched
                                .send_packed(&self.socket, self.peer, records, lens)
                                .await
                        {
                            return End::Io(io::Error::other(format!("writing to client: {err}")));
                        }
                        if batch.oversize > 0 {
                            counts.dropped += batch.oversize;
                            Stats::add(&stats.udp_oversize_drops, batch.oversize);
                        }
                        last = Instant::now();
                        counts.down_datagrams += batch.datagrams;
                        counts.down_bytes += batch.bytes;
                        Stats::add(&stats.down_bytes[UDP], batch.bytes);
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
