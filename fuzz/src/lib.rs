//! What the DTLS targets share: an input split into datagrams, webrtc-dtls's record and
//! handshake parsers applied as its connection applies them, and a real webrtc-dtls server
//! (the agent's configuration) fed the datagrams through an in-memory transport.

use std::any::Any;
use std::collections::VecDeque;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use tokio::sync::Notify;
use webrtc_dtls::config::Config as DtlsConfig;
use webrtc_dtls::conn::DTLSConn;
use webrtc_dtls::content::ContentType;
use webrtc_dtls::handshake::Handshake;
use webrtc_dtls::record_layer::RecordLayer;
use webrtc_dtls::record_layer::record_layer_header::RecordLayerHeader;
use webrtc_util::Conn;

/// Bytes of a DTLS record header and of a handshake message header.
pub const RECORD_HEADER: usize = 13;
pub const HANDSHAKE_HEADER: usize = 12;
/// The agent's default `stream.handshake_timeout`.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The most datagrams one input is split into.
const MAX_DATAGRAMS: usize = 16;
/// webrtc-dtls reads each datagram into a buffer of this size (`INBOUND_BUFFER_SIZE`).
const INBOUND_BUFFER: usize = 8192;

/// The input as datagrams: each one a big-endian u16 length and that many bytes (the last
/// one takes what is left).
pub fn datagrams(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < MAX_DATAGRAMS {
        let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let end = (2 + len).min(data.len());
        out.push(data[2..end].to_vec());
        data = &data[end..];
    }
    out
}

/// webrtc-dtls's parsing of one datagram as `DTLSConn` does it before any state is involved:
/// the datagram cut into records (`unpack_datagram`), each record's header, then a handshake
/// record's messages as the fragment buffer hands them on whole (`Handshake::unmarshal`),
/// and any other record through `RecordLayer::unmarshal`.
pub fn parse_datagram(datagram: &[u8]) {
    let datagram = &datagram[..datagram.len().min(INBOUND_BUFFER)];
    let mut offset = 0;
    while offset != datagram.len() {
        if datagram.len() - offset <= RECORD_HEADER {
            return;
        }
        let len = RECORD_HEADER
            + usize::from(u16::from_be_bytes([
                datagram[offset + RECORD_HEADER - 2],
                datagram[offset + RECORD_HEADER - 1],
            ]));
        if offset + len > datagram.len() {
            return;
        }
        parse_record(&datagram[offset..offset + len]);
        offset += len;
    }
}

fn parse_record(record: &[u8]) {
    let Ok(header) = RecordLayerHeader::unmarshal(&mut Cursor::new(record)) else {
        return;
    };
    if header.content_type != ContentType::Handshake {
        let _ = RecordLayer::unmarshal(&mut Cursor::new(record));
        return;
    }
    let mut rest = &record[RECORD_HEADER..];
    while rest.len() >= HANDSHAKE_HEADER {
        let length = u24(&rest[1..4]);
        let fragment_offset = u24(&rest[6..9]);
        let fragment_length = u24(&rest[9..12]);
        let end = (HANDSHAKE_HEADER + length).min(rest.len());
        let body = &rest[HANDSHAKE_HEADER..end];
        // A message in one piece comes out of the fragment buffer as its header (offsets
        // normalised) and the bytes that followed it.
        if fragment_offset == 0 && (fragment_length == length || fragment_length == 0) {
            let mut message = rest[..HANDSHAKE_HEADER].to_vec();
            message[6..9].fill(0);
            message[9..12].copy_from_slice(&rest[1..4]);
            message.extend_from_slice(body);
            let _ = Handshake::unmarshal(&mut Cursor::new(message.as_slice()));
        }
        rest = &rest[end..];
    }
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// The agent's DTLS server configuration, built once per fuzzing process.
static SERVER: LazyLock<DtlsConfig> = LazyLock::new(|| {
    godoxy_agent::fuzzing::dtls_server_config().expect("a generated certificate set loads")
});

/// Runs a real webrtc-dtls server (the agent's configuration) on `datagrams`, in order, as
/// the agent's demultiplexer would hand them to one peer's session, until it has read them
/// all (or the handshake ended). The server's HelloVerifyRequest cookie is random, so a later
/// ClientHello whose cookie has the same length gets the real cookie written in: a peer
/// echoes it, and the fuzzer then reaches what follows the cookie exchange.
pub fn run_server(datagrams: Vec<Vec<u8>>) {
    if datagrams.is_empty() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds");
    runtime.block_on(async {
        let feeder = Arc::new(Feeder::new(datagrams));
        let transport: Arc<dyn Conn + Send + Sync> = feeder.clone();
        // The clock is paused and jumps ahead whenever every task waits, so the agent's
        // handshake deadline costs no real time.
        tokio::select! {
            _ = DTLSConn::new(transport, SERVER.clone(), false, None) => {}
            () = feeder.drained.notified() => {}
            () = tokio::time::sleep(HANDSHAKE_TIMEOUT) => {}
        }
        // Let the handshake task finish the flight it was given.
        for _ in 0..32 {
            tokio::task::yield_now().await;
        }
    });
    // Dropping the runtime drops the reader and handshake tasks with it.
    drop(runtime);
}

/// The transport: hands out the queued datagrams, records the server's cookie.
struct Feeder {
    queue: Mutex<VecDeque<Vec<u8>>>,
    cookie: Mutex<Option<Vec<u8>>>,
    drained: Notify,
}

impl Feeder {
    fn new(datagrams: Vec<Vec<u8>>) -> Self {
        Self {
            queue: Mutex::new(datagrams.into()),
            cookie: Mutex::new(None),
            drained: Notify::new(),
        }
    }

    fn next(&self) -> Option<Vec<u8>> {
        let mut datagram = self.queue.lock().ok()?.pop_front()?;
        if let Some(cookie) = self.cookie.lock().ok()?.as_deref() {
            echo_cookie(&mut datagram, cookie);
        }
        Some(datagram)
    }
}

/// Writes `cookie` over the cookie of each ClientHello in `datagram` whose cookie has its
/// length, reading the layout as webrtc-dtls does (one session-id byte, then the cookie).
fn echo_cookie(datagram: &mut [u8], cookie: &[u8]) {
    let mut offset = 0;
    while datagram.len() - offset > RECORD_HEADER {
        let len = usize::from(u16::from_be_bytes([
            datagram[offset + 11],
            datagram[offset + 12],
        ]));
        let end = (offset + RECORD_HEADER + len).min(datagram.len());
        if datagram[offset] == 22 {
            let mut at = offset + RECORD_HEADER;
            while end.saturating_sub(at) >= HANDSHAKE_HEADER {
                let body = at + HANDSHAKE_HEADER;
                let cookie_len_at = body + 2 + 32 + 1;
                if datagram[at] == 1
                    && cookie_len_at < end
                    && usize::from(datagram[cookie_len_at]) == cookie.len()
                    && cookie_len_at + 1 + cookie.len() <= end
                {
                    datagram[cookie_len_at + 1..cookie_len_at + 1 + cookie.len()]
                        .copy_from_slice(cookie);
                }
                at = body + u24(&datagram[at + 9..at + 12]);
            }
        }
        offset = end;
    }
}

/// The cookie of a HelloVerifyRequest in a datagram the server sent.
fn sent_cookie(datagram: &[u8]) -> Option<Vec<u8>> {
    let at = RECORD_HEADER + HANDSHAKE_HEADER;
    if datagram.first() != Some(&22) || datagram.get(RECORD_HEADER) != Some(&3) {
        return None;
    }
    let len = usize::from(*datagram.get(at + 2)?);
    datagram.get(at + 3..at + 3 + len).map(<[u8]>::to_vec)
}

#[async_trait]
impl Conn for Feeder {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(())
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        // The HelloVerifyRequest may still be on its way out: give the handshake task a turn.
        for _ in 0..8 {
            if self.cookie.lock().map(|c| c.is_some()).unwrap_or(true) {
                break;
            }
            tokio::task::yield_now().await;
        }
        match self.next() {
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
        Ok((self.recv(buf).await?, peer()))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        if let Some(cookie) = sent_cookie(buf) {
            if let Ok(mut slot) = self.cookie.lock() {
                *slot = Some(cookie);
            }
        }
        Ok(buf.len())
    }

    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        self.send(buf).await
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(SocketAddr::from(([127, 0, 0, 1], 8890)))
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(peer())
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }
}

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}
