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
    /// Gauge: peers in the DTLS demultiplexer's table (handshaking or in session).
    pub udp_table: AtomicU64,
    /// Gauge: UDP sessions past the handshake.
    pub udp_sessions: AtomicU64,
    /// DTLS handshakes completed.
    pub udp_handshakes: AtomicU64,
    /// DTLS handshakes that failed or timed out.
    pub udp_handshake_failures: AtomicU64,
    /// Gauge: TCP connections whose TLS handshake is in progress (strangers, until it ends).
    pub preauth_tcp: AtomicU64,
    /// Gauge: DTLS handshakes in progress.
    pub preauth_dtls: AtomicU64,
    /// TCP connections in TLS handshake abandoned to make room (`max_tls_handshakes` full).
    pub shed_tcp: AtomicU64,
    /// DTLS handshakes abandoned to make room (`max_udp_handshakes` full).
    pub shed_dtls: AtomicU64,
    /// TCP connections closed at once: their source had `max_handshakes_per_source` open.
    pub preauth_refused_tcp: AtomicU64,
    /// ClientHellos dropped: their source had `max_handshakes_per_source` handshakes open.
    pub preauth_refused_dtls: AtomicU64,
    /// Authenticated TLS connections closed because `max_connections` were open.
    pub tcp_refused_connections: AtomicU64,
    /// ClientHellos answered with a HelloVerifyRequest (no state kept).
    pub udp_cookies_sent: AtomicU64,
    /// ClientHellos whose cookie was not one this agent issued (recently, to that address).
    pub udp_bad_cookies: AtomicU64,
    /// ClientHellos refused because max_udp_sessions were open.
    pub udp_refused_sessions: AtomicU64,
    /// Datagrams from unknown peers that were not a ClientHello.
    pub udp_unsolicited: AtomicU64,
    /// Datagrams dropped because a peer's queue was full.
    pub udp_queue_drops: AtomicU64,
    /// Datagrams from destinations too large for one DTLS record (> 8155 bytes), dropped.
    pub udp_oversize_drops: AtomicU64,
    /// Datagrams from peers not yet authenticated that failed the pre-authentication check
    /// (or exceeded its cap on encrypted records), dropped before webrtc-dtls saw them.
    pub udp_preauth_drops: AtomicU64,
    /// Gauge: panics inside webrtc-dtls caught in this process (updated every 10 s).
    pub dtls_panics: AtomicU64,
}

impl Stats {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
