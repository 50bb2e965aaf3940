//! Bidirectional copy whose buffers exist only while bytes are in flight.
//!
//! `tokio::io::copy_bidirectional` gives every tunnel two buffers for its whole life; most
//! tunnels sit idle most of the time, so here each direction borrows a buffer from a small
//! per-thread pool when a read may return data, and gives it back as soon as the data is
//! written or the read would block. An idle tunnel holds no copy buffer at all, and a busy
//! one reuses the same few buffers: nothing is allocated per chunk. Half-close is carried
//! across: EOF on one side shuts down the other side's write half.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// 64 KiB: reads from the plain side fill four TLS records that go out in one writev, and a
/// read from the TLS side can take several records at once.
pub const BUF_SIZE: usize = 64 * 1024;
/// Buffers kept per thread for reuse; more than this are freed when returned.
const POOL_MAX: usize = 8;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    POOL.with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_back(buf: Box<[u8]>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_MAX {
            pool.push(buf);
        }
    });
}

/// One direction's state.
#[derive(Default)]
struct Half {
    /// Holds bytes read but not yet written; `None` whenever nothing is pending.
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    /// Bytes read from the source (and, once written, delivered).
    bytes: u64,
    read_done: bool,
    need_flush: bool,
    done: bool,
}

impl Half {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        live: Option<&AtomicU64>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if let Some(buf) = &self.buf {
                if self.pos < self.cap {
                    let n = ready!(writer.as_mut().poll_write(cx, &buf[self.pos..self.cap]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.pos += n;
                    self.need_flush = true;
                    continue;
                }
                if let Some(buf) = self.buf.take() {
                    give_back(buf);
                }
            }
            if self.read_done {
                if self.need_flush {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.need_flush = false;
                }
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let mut buf = take_buffer();
            let mut read = ReadBuf::new(&mut buf);
            match reader.as_mut().poll_read(cx, &mut read) {
                Poll::Pending => {
                    give_back(buf);
                    // Nothing more to write for now: push out what the writer buffered.
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(err)) => {
                    give_back(buf);
                    return Poll::Ready(Err(err));
                }
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        give_back(buf);
                        self.read_done = true;
                    } else {
                        self.bytes += n as u64;
                        if let Some(live) = live {
                            live.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        self.buf = Some(buf);
                        self.pos = 0;
                        self.cap = n;
                    }
                }
            }
        }
    }
}

/// Byte counts of a relay, readable after it ended however it ended.
#[derive(Default)]
pub struct Relay {
    a_to_b: Half,
    b_to_a: Half,
}

impl Relay {
    /// A relay with nothing copied yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes read from `a` (and written to `b`, unless the relay failed).
    pub fn a_to_b(&self) -> u64 {
        self.a_to_b.bytes
    }

    /// Bytes read from `b`.
    pub fn b_to_a(&self) -> u64 {
        self.b_to_a.bytes
    }

    /// Copies both ways until both directions reached EOF (each EOF shuts down the other
    /// side's writing half), or an error. `live` counters (a to b, b to a), when given, are
    /// added to as each chunk is read: what `/metrics` shows of a tunnel still open.
    pub async fn run<A, B>(
        &mut self,
        a: &mut A,
        b: &mut B,
        live: Option<&[&AtomicU64; 2]>,
    ) -> io::Result<()>
    where
        A: AsyncRead + AsyncWrite + Unpin + ?Sized,
        B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        poll_fn(|cx| self.poll_both(cx, a, b, live)).await
    }

    /// As [`Relay::run`], but ends with `Ok(false)` once no byte has been read either way for
    /// `idle` (`Ok(true)` when both directions reached EOF).
    pub async fn run_until_idle<A, B>(
        &mut self,
        a: &mut A,
        b: &mut B,
        live: Option<&[&AtomicU64; 2]>,
        idle: Duration,
    ) -> io::Result<bool>
    where
        A: AsyncRead + AsyncWrite + Unpin + ?Sized,
        B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let mut timer = std::pin::pin!(tokio::time::sleep(idle));
        let mut seen = 0;
        poll_fn(|cx| {
            if let Poll::Ready(result) = self.poll_both(cx, a, b, live) {
                return Poll::Ready(result.map(|()| true));
            }
            let total = self.a_to_b.bytes + self.b_to_a.bytes;
            if total != seen {
                seen = total;
                timer.as_mut().reset(Instant::now() + idle);
            }
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Ok(false)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    fn poll_both<A, B>(
        &mut self,
        cx: &mut Context<'_>,
        a: &mut A,
        b: &mut B,
        live: Option<&[&AtomicU64; 2]>,
    ) -> Poll<io::Result<()>>
    where
        A: AsyncRead + AsyncWrite + Unpin + ?Sized,
        B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        {
            let forward = if self.a_to_b.done {
                Poll::Ready(Ok(()))
            } else {
                self.a_to_b
                    .poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b), live.map(|l| l[0]))
            };
            if let Poll::Ready(Err(err)) = forward {
                return Poll::Ready(Err(err));
            }
            let backward = if self.b_to_a.done {
                Poll::Ready(Ok(()))
            } else {
                self.b_to_a
                    .poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a), live.map(|l| l[1]))
            };
            if let Poll::Ready(Err(err)) = backward {
                return Poll::Ready(Err(err));
            }
            if self.a_to_b.done && self.b_to_a.done {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for half in [&mut self.a_to_b, &mut self.b_to_a] {
            if let Some(buf) = half.buf.take() {
                give_back(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Tiny duplex buffers force partial reads and writes on every chunk.
    #[tokio::test]
    async fn copies_both_ways_through_tiny_pipes_and_half_closes() {
        let (mut client, mut a) = tokio::io::duplex(7);
        let (mut b, mut server) = tokio::io::duplex(5);
        let relay = tokio::spawn(async move {
            let mut relay = Relay::new();
            relay.run(&mut a, &mut b, None).await.unwrap();
            (relay.a_to_b(), relay.b_to_a())
        });
        let up: Vec<u8> = (0..100_000u32)
            .map(|i| i.wrapping_mul(7).to_le_bytes()[0])
            .collect();
        let down: Vec<u8> = (0..70_000u32)
            .map(|i| i.wrapping_mul(13).to_le_bytes()[0])
            .collect();
        let (up2, down2) = (up.clone(), down.clone());
        let server_side = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap(); // ends only if EOF was carried
            server.write_all(&down2).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        client.write_all(&up2).await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(server_side.await.unwrap(), up);
        assert_eq!(back, down);
        assert_eq!(relay.await.unwrap(), (100_000, 70_000));
    }

    #[test]
    fn pool_is_bounded() {
        let bufs: Vec<_> = (0..POOL_MAX + 10).map(|_| take_buffer()).collect();
        for b in bufs {
            give_back(b);
        }
        assert_eq!(POOL.with(|p| p.borrow().len()), POOL_MAX);
    }
}
