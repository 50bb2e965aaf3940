//! The life of one HTTP connection: when it may be closed. hyper's own header-read timeout also
//! runs while a keep-alive connection sits idle between requests, which would close GoDoxy's
//! pooled connections after seconds; here idle time and header time are measured apart.
//!
//! - A request in flight (until its response body is finished or dropped) is never cut:
//!   Docker event streams and log follows run for days.
//! - A new connection, or bytes of a new request arriving while none is in flight, start the
//!   header clock.
//! - Otherwise the connection is idle, and is closed after the idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// No header clock running.
const NONE: u64 = u64::MAX;

/// Shared between the connection's IO, its requests and its watchdog.
pub(super) struct ConnClock {
    base: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `base` when the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds since `base` of the first byte of a request not yet dispatched, or NONE.
    head_started: AtomicU64,
}

/// What the watchdog should do now.
pub(super) enum Verdict {
    /// Nothing yet; look again at this instant.
    WaitUntil(Instant),
    /// Idle for the idle timeout: close gracefully.
    Idle,
    /// A request's headers took longer than the header timeout: drop the connection.
    HeaderTimeout,
}

impl ConnClock {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            // A new connection owes its first request: the header clock runs from the start.
            head_started: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == NONE
        {
            self.head_started.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// A request was dispatched; the guard ends it when dropped.
    pub(super) fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(NONE, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub(super) fn verdict(&self, header_timeout: Duration, idle_timeout: Duration) -> Verdict {
        let now = self.now_ms();
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE - 1);
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Verdict::WaitUntil(self.at(now.saturating_add(millis(idle_timeout))));
        }
        let head = self.head_started.load(Ordering::Relaxed);
        if head != NONE {
            let deadline = head.saturating_add(millis(header_timeout));
            return if now >= deadline {
                Verdict::HeaderTimeout
            } else {
                Verdict::WaitUntil(self.at(deadline))
            };
        }
        let deadline = self
            .idle_since
            .load(Ordering::Relaxed)
            .saturating_add(millis(idle_timeout));
        if now >= deadline {
            Verdict::Idle
        } else {
            Verdict::WaitUntil(self.at(deadline))
        }
    }
}

/// Held from dispatch until the response body is finished or dropped.
pub(super) struct InFlight(Arc<ConnClock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let clock = &self.0;
        clock.idle_since.store(clock.now_ms(), Ordering::Relaxed);
        clock.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight for as long as it streams.
pub(super) struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub(super) fn new(body: B, in_flight: InFlight) -> Self {
        Self {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's transport, telling the clock when request bytes arrive.
pub(super) struct Watched<S> {
    inner: S,
    clock: Arc<ConnClock>,
}

impl<S> Watched<S> {
    pub(super) fn new(inner: S, clock: Arc<ConnClock>) -> Self {
        Self { inner, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.bytes_read();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
