//! Process-wide counters: what the shutdown log reports and what tests assert on.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters, shared by every listener.
#[derive(Debug, Default)]
pub struct Stats {
    /// TLS handshakes completed on the TCP port.
    pub tls_handshakes: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: AtomicU64,
    /// Connection attempts to tunnel destinations (TCP and UDP).
    pub dials: AtomicU64,
    /// TCP tunnels that reached the relay.
    pub tcp_tunnels: AtomicU64,
}

impl Stats {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
