//! One peer's view of the shared UDP socket, handed to `DTLSConn` as its transport for the
//! handshake. It keeps the last flight webrtc-dtls sent, which the session sends again if
//! the client repeats its final flight after the session has taken over the records.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::net::UdpSocket;
use tokio::sync::{Mutex, mpsc};
use webrtc_util::Conn;

/// Datagrams of one flight kept at most.
const MAX_FLIGHT: usize = 8;

/// Datagrams from one peer arrive through a bounded queue filled by the demultiplexer;
/// replies go out through the shared socket to that peer.
pub struct PeerConn {
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    // DTLSConn runs exactly one reader loop, so this lock is never contended.
    rx: Mutex<mpsc::Receiver<BytesMut>>,
    flight: std::sync::Mutex<Flight>,
}

/// The datagrams sent since the last one received: the flight now in force.
#[derive(Default)]
struct Flight {
    datagrams: Vec<Bytes>,
    /// A datagram arrived since the last send: the next send starts a new flight.
    answered: bool,
}

impl PeerConn {
    /// A transport for `peer` reading from `rx`.
    pub fn new(socket: Arc<UdpSocket>, peer: SocketAddr, rx: mpsc::Receiver<BytesMut>) -> Self {
        Self {
            socket,
            peer,
            rx: Mutex::new(rx),
            flight: std::sync::Mutex::default(),
        }
    }

    /// The shared socket.
    pub fn socket(&self) -> Arc<UdpSocket> {
        self.socket.clone()
    }

    /// The datagrams of the last flight sent (after the handshake: the server's
    /// ChangeCipherSpec and Finished).
    pub fn take_last_flight(&self) -> Vec<Bytes> {
        self.flight
            .lock()
            .map(|mut f| std::mem::take(&mut f.datagrams))
            .unwrap_or_default()
    }

    fn sent(&self, datagram: &[u8]) {
        if let Ok(mut f) = self.flight.lock() {
            if std::mem::take(&mut f.answered) {
                f.datagrams.clear();
            }
            // A flight is a few datagrams; timer retransmissions of it are not kept twice over.
            if f.datagrams.len() < MAX_FLIGHT {
                f.datagrams.push(Bytes::copy_from_slice(datagram));
            }
        }
    }
}

#[async_trait]
impl Conn for PeerConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other(
            "a demultiplexed peer is already connected".into(),
        ))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Some(datagram) => {
                if let Ok(mut f) = self.flight.lock() {
                    f.answered = true;
                }
                // As a UDP socket does: a datagram larger than the buffer is truncated.
                let n = datagram.len().min(buf.len());
                buf[..n].copy_from_slice(&datagram[..n]);
                Ok(n)
            }
            // The demultiplexer dropped this peer. DTLSConn's reader retries after most
            // errors, so wait here instead of spinning; the reader ends when the session
            // closes the DTLSConn.
            None => std::future::pending().await,
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        Ok((self.recv(buf).await?, self.peer))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        self.sent(buf);
        Ok(self.socket.send_to(buf, self.peer).await?)
    }

    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        // Only ever this peer: a session must not be able to send elsewhere.
        self.send(buf).await
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }
}
