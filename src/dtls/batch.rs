//! Batched UDP system calls (quinn-udp): `recvmmsg` for the DTLS socket and the destination
//! sockets, and one `sendmsg` with UDP GSO segments for a run of equal-sized datagrams to
//! one address. On a kernel without GSO each datagram goes out on its own.
//!
//! quinn-udp sets "don't fragment" on every socket it prepares (QUIC probes its path MTU);
//! a tunnel must carry what a plain UDP socket carries, so path MTU discovery goes back to
//! the kernel's default, which fragments a datagram larger than the path allows.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use rustix::net::sockopt;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams one `recv` call may return (quinn-udp reads at most 32 per call).
pub(crate) const BATCH: usize = 16;
/// Largest datagram sent as a GSO segment: one that fits a 1500-byte path over IPv6. A
/// segment larger than the path MTU fails the whole send (and quinn-udp then turns GSO off
/// for good), so larger datagrams go out one by one.
const GSO_SEGMENT_MAX: usize = 1452;
/// Bytes one GSO send carries at most (it is one UDP datagram until the kernel splits it).
const GSO_BYTES_MAX: usize = 65_000;

/// A socket's batching state.
pub(crate) struct Batched {
    state: UdpSocketState,
}

impl Batched {
    /// Prepares `socket`: GRO and the options quinn-udp reads back, fragmentation as a plain
    /// socket has it.
    pub(crate) fn new(socket: &UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(socket))?;
        let addr = socket.local_addr()?;
        // A dual-stack socket carries IPv4 too: both options, the IPv4 one best effort.
        if addr.is_ipv6() {
            sockopt::set_ipv6_mtu_discover(socket, sockopt::Ipv6PathMtuDiscovery::WANT)?;
            let _ = sockopt::set_ip_mtu_discover(socket, sockopt::Ipv4PathMtuDiscovery::WANT);
        } else {
            sockopt::set_ip_mtu_discover(socket, sockopt::Ipv4PathMtuDiscovery::WANT)?;
        }
        Ok(Self { state })
    }

    /// Waits for datagrams and reads as many as `bufs` holds in one call. A buffer may come
    /// back holding several datagrams of `meta.stride` bytes each (GRO): see [`datagrams`].
    pub(crate) async fn recv(
        &self,
        socket: &UdpSocket,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        loop {
            socket.readable().await?;
            match socket.try_io(Interest::READABLE, || {
                self.state.recv(UdpSockRef::from(socket), bufs, meta)
            }) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// Reads what is ready without waiting: `Ok(0)` when nothing is.
    pub(crate) fn try_recv(
        &self,
        socket: &UdpSocket,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        match socket.try_io(Interest::READABLE, || {
            self.state.recv(UdpSockRef::from(socket), bufs, meta)
        }) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(0),
            other => other,
        }
    }

    /// How many equal-sized datagrams one send may carry.
    pub(crate) fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends `contents` to `to` as datagrams of `segment` bytes (the last may be shorter),
    /// in one system call when the kernel has GSO. `WouldBlock` when the socket is full.
    pub(crate) fn try_send(
        &self,
        socket: &UdpSocket,
        to: SocketAddr,
        contents: &[u8],
        segment: usize,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: (segment < contents.len()).then_some(segment),
            src_ip: None,
        };
        socket.try_io(Interest::WRITABLE, || {
            self.state.try_send(UdpSockRef::from(socket), &transmit)
        })
    }

    /// Sends datagrams packed back to back in `buf`, of the lengths in `lens`, to `to`: each
    /// run of equal lengths (the last of a run may be shorter) in one GSO send. Returns how
    /// many were sent before the socket would block.
    pub(crate) fn try_send_packed(
        &self,
        socket: &UdpSocket,
        to: SocketAddr,
        buf: &[u8],
        lens: &[usize],
    ) -> io::Result<usize> {
        let max = self.max_segments();
        let (mut i, mut at) = (0, 0);
        while i < lens.len() {
            let segment = lens[i];
            let (mut j, mut total) = (i + 1, segment);
            // An empty datagram cannot be a segment: it goes alone.
            if (1..=GSO_SEGMENT_MAX).contains(&segment) {
                while j < lens.len()
                    && j - i < max
                    && (1..=segment).contains(&lens[j])
                    && total + lens[j] <= GSO_BYTES_MAX
                {
                    total += lens[j];
                    j += 1;
                    if lens[j - 1] < segment {
                        break; // only the last segment may be shorter
                    }
                }
            }
            match self.try_send(socket, to, &buf[at..at + total], segment) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(i),
                // GSO refused (a driver without it, a smaller path MTU): one by one.
                Err(_) if j - i > 1 => {
                    let mut from = at;
                    for (k, &len) in lens.iter().enumerate().take(j).skip(i) {
                        match self.try_send(socket, to, &buf[from..from + len], len) {
                            Ok(()) => from += len,
                            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(k),
                            Err(err) => return Err(err),
                        }
                    }
                }
                Err(err) => return Err(err),
            }
            at += total;
            i = j;
        }
        Ok(i)
    }

    /// As [`Batched::try_send_packed`], waiting while the socket is full.
    pub(crate) async fn send_packed(
        &self,
        socket: &UdpSocket,
        to: SocketAddr,
        mut buf: &[u8],
        mut lens: &[usize],
    ) -> io::Result<()> {
        while !lens.is_empty() {
            let sent = self.try_send_packed(socket, to, buf, lens)?;
            buf = &buf[lens[..sent].iter().sum::<usize>()..];
            lens = &lens[sent..];
            if !lens.is_empty() {
                socket.writable().await?;
            }
        }
        Ok(())
    }
}

/// The datagrams of one received buffer: one (perhaps empty), or several of `stride` bytes
/// after GRO.
pub(crate) fn datagrams<'a>(buf: &'a [u8], meta: &RecvMeta) -> impl Iterator<Item = &'a [u8]> {
    let filled = &buf[..meta.len.min(buf.len())];
    let empty = filled.is_empty().then_some(filled);
    filled.chunks(meta.stride.max(1)).chain(empty)
}

/// Receive buffers for [`Batched::recv`]: `BATCH` slots of `size` bytes in one allocation,
/// made once. At 1 MiB it comes straight from the kernel as untouched pages: only the pages
/// datagrams are written to count in the agent's memory.
pub(crate) struct RecvBufs {
    buf: Vec<u8>,
    size: usize,
    /// What each slot received.
    pub(crate) meta: [RecvMeta; BATCH],
}

impl RecvBufs {
    /// `BATCH` slots of `size` bytes.
    pub(crate) fn new(size: usize) -> Self {
        Self {
            buf: vec![0u8; BATCH * size],
            size,
            meta: [RecvMeta::default(); BATCH],
        }
    }

    /// Receives into every slot (waiting for the first datagram): how many were filled.
    pub(crate) async fn recv(
        &mut self,
        batched: &Batched,
        socket: &UdpSocket,
    ) -> io::Result<usize> {
        let mut slots = self.buf.chunks_mut(self.size);
        let mut slices: [IoSliceMut<'_>; BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(slots.next().unwrap_or(&mut [])));
        batched.recv(socket, &mut slices, &mut self.meta).await
    }

    /// Slot `i` as received, with its metadata.
    pub(crate) fn get(&self, i: usize) -> (&[u8], &RecvMeta) {
        (&self.buf[i * self.size..(i + 1) * self.size], &self.meta[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_splits_at_its_stride_and_an_empty_datagram_counts() {
        let meta = |len: usize, stride: usize| {
            let mut m = RecvMeta::default();
            m.len = len;
            m.stride = stride;
            m
        };
        let buf = [1u8, 2, 3, 4, 5, 6, 7, 0, 0];
        let split: Vec<&[u8]> = datagrams(&buf, &meta(7, 3)).collect();
        assert_eq!(split, vec![&[1, 2, 3][..], &[4, 5, 6], &[7]]);
        assert_eq!(datagrams(&buf, &meta(7, 7)).count(), 1);
        let empty: Vec<&[u8]> = datagrams(&buf, &meta(0, 0)).collect();
        assert_eq!(empty, vec![&[0u8; 0][..]]);
    }
}
