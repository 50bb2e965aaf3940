//! Process-wide counters: what the shutdown summary reports, `/metrics` exports (through
//! `crate::prometheus`) and tests assert on. Everything here is an atomic or a
//! prometheus-client handle: nothing on the data path takes a lock.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use crate::prometheus::Recorders;
use crate::tls::TlsMaterial;

/// Monotonic counters and gauges, shared by every listener.
#[derive(Debug)]
pub struct Stats {
    /// When the daemon was bound (for the shutdown summary's uptime).
    pub started: Instant,
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
    /// Tunnels started (an authenticated connection asking for a tunnel), by transport.
    pub tunnels_opened: [AtomicU64; 2],
    /// Tunnels ended, by transport (`tunnels_opened - tunnels_closed` are open).
    pub tunnels_closed: [AtomicU64; 2],
    /// Payload bytes client -> destination, by transport (added by the relays as they go).
    pub up_bytes: [AtomicU64; 2],
    /// Payload bytes destination -> client, by transport (added by the relays as they go).
    pub down_bytes: [AtomicU64; 2],
    /// HTTP requests answered on the TLS port (any route).
    pub http_requests: AtomicU64,
    /// Unix time (s) after which the server certificate is no longer valid; 0 = unknown.
    pub server_cert_not_after: AtomicI64,
    /// Unix time (s) of the earliest `notAfter` among the CA certificates; 0 = unknown.
    pub ca_cert_not_after: AtomicI64,
    /// The labelled metric families (reasons, statuses, latencies).
    pub(crate) prom: Recorders,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            tls_handshakes: AtomicU64::default(),
            tls_handshake_failures: AtomicU64::default(),
            dials: AtomicU64::default(),
            tcp_tunnels: AtomicU64::default(),
            udp_table: AtomicU64::default(),
            udp_sessions: AtomicU64::default(),
            udp_handshakes: AtomicU64::default(),
            udp_handshake_failures: AtomicU64::default(),
            preauth_refused_tcp: AtomicU64::default(),
            preauth_refused_dtls: AtomicU64::default(),
            tcp_refused_connections: AtomicU64::default(),
            udp_cookies_sent: AtomicU64::default(),
            udp_bad_cookies: AtomicU64::default(),
            udp_refused_sessions: AtomicU64::default(),
            udp_unsolicited: AtomicU64::default(),
            udp_queue_drops: AtomicU64::default(),
            udp_oversize_drops: AtomicU64::default(),
            udp_preauth_drops: AtomicU64::default(),
            dtls_panics: AtomicU64::default(),
            preauth_tcp: AtomicU64::default(),
            preauth_dtls: AtomicU64::default(),
            shed_tcp: AtomicU64::default(),
            shed_dtls: AtomicU64::default(),
            tunnels_opened: Default::default(),
            tunnels_closed: Default::default(),
            up_bytes: Default::default(),
            down_bytes: Default::default(),
            http_requests: AtomicU64::default(),
            server_cert_not_after: AtomicI64::default(),
            ca_cert_not_after: AtomicI64::default(),
            prom: Recorders::default(),
        }
    }
}

/// Index of a transport in the per-transport arrays of [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TLS over TCP.
    Tcp = 0,
    /// DTLS over UDP.
    Udp = 1,
}

impl Transport {
    /// Both, in index order.
    pub const ALL: [Self; 2] = [Self::Tcp, Self::Udp];

    /// The label value and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    /// The index into a per-transport array.
    pub fn index(self) -> usize {
        self as usize
    }
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

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records when the server certificate (the leaf) and the first CA certificate to expire
    /// stop being valid, for `certificate_expiry_seconds`. Called at start (and again by
    /// whatever reloads the certificates).
    pub(crate) fn set_cert_expiry(&self, material: &TlsMaterial) {
        let server = material.chain.first().and_then(crate::tls::not_after);
        let ca = material.ca.iter().filter_map(crate::tls::not_after).min();
        self.server_cert_not_after
            .store(server.unwrap_or(0), Ordering::Relaxed);
        self.ca_cert_not_after
            .store(ca.unwrap_or(0), Ordering::Relaxed);
    }

    /// Sum of a per-transport array.
    pub fn total(counters: &[AtomicU64; 2]) -> u64 {
        counters.iter().map(Self::get).fold(0, u64::wrapping_add)
    }
}
