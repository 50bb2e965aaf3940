//! godoxy-agent: a GoDoxy agent speaking the agent stream protocol.
//!
//! ```text
//!               TLS :8890 (mTLS)                                        destination
//! GoDoxy ──┬── ALPN godoxy-agent-stream/1 ─> tunnel (tcp link) ──TCP──> host:port
//!          ├── http/1.1 or none ──────────> http (/godoxy/agent/*)
//!          └── DTLS :8890/udp ────────────> dtls ─> tunnel (udp link) ──UDP──> host:port
//! ```
//!
//! A tour, in the order a connection meets them:
//! - `config`: the TOML file and GoDoxy's environment variables -> a validated [`Config`];
//! - `daemon`: [`Daemon::bind`] binds every socket, [`Daemon::run`] serves until shutdown;
//! - `tcp_listener`: the TLS port's accept loop, handshake, routing by ALPN (`alpn`);
//! - `admission`: the strangers' pools (TCP connections in TLS handshake, DTLS handshakes):
//!   per-source cap, short deadline when busy, the oldest shed when full;
//! - `tls`: certificates and keys -> rustls and webrtc-dtls configurations, and the rules a
//!   client certificate must meet after every handshake; `certs` makes them; `credentials`
//!   holds the current set (swapped by SIGHUP) and warns before certificates expire;
//! - `protocol`: the 275-byte header and the names both ends agree on;
//! - `tunnel`: the one pipeline (header -> probe -> destination -> dial -> relay -> closing
//!   line), with `tunnel::tcp` and `tunnel::udp` as its two transports;
//! - `policy`: `[policy]`, which destinations may be dialed: resolve once, judge every
//!   address, dial only those (tunnels, `/proxy/http` and `/health` alike);
//! - `dtls`: the UDP side: demultiplexer, one session task per peer; webrtc-dtls runs the
//!   handshake, then the session seals and opens its records itself (`dtls::record`, ring's
//!   AES-GCM) with batched system calls (`dtls::batch`, quinn-udp: recvmmsg, GSO);
//! - `http`: the HTTP side: `http/mod.rs` routes, `http/conn.rs` decides when a connection may
//!   close (idle apart from header time), `http/info.rs` is `/godoxy/agent/info`,
//!   `http/docker.rs` relays the Docker Engine API under `docker.access`;
//! - `metrics`: the host sampler, its 5-period history and the history file, served by
//!   `http/system_info.rs` as `/godoxy/agent/system_info` (GoDoxy's dashboard);
//! - `stats`: counters and gauges; `prometheus` exports them as OpenMetrics (`/metrics`);
//!   `client` and `forward`: the other end, for the CLI, tests and benchmark; `diagnose`: why
//!   a certificate fails GoDoxy's checks, in words (for `doctor`).
//!
//! The binary (`main.rs`, `cli/`) adds the command line; the benchmark is the workspace member
//! `bench/`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admission;
mod alpn;
pub mod certs;
pub mod client;
pub mod config;
mod credentials;
mod daemon;
pub mod diagnose;
mod dtls;
pub mod forward;
mod http;
mod metrics;
mod policy;
mod prometheus;
pub mod protocol;
mod stats;
mod tcp_listener;
mod tls;
mod tunnel;

pub use config::Config;
pub use credentials::Reloader;
pub use daemon::Daemon;
pub use stats::{Stats, Transport};

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, enabled by nothing else):
/// the parsers that read what a peer sends, and the DTLS server configuration the agent uses.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject as _;

    /// The agent's DTLS server configuration with a fresh certificate set, as `run` builds it
    /// (client certificates required).
    pub fn dtls_server_config() -> anyhow::Result<webrtc_dtls::config::Config> {
        let set = crate::certs::CertSet::generate()?;
        let material = crate::tls::TlsMaterial {
            ca: crate::tls::parse_certs(set.ca_cert.as_bytes())?,
            chain: crate::tls::parse_certs(set.server_cert.as_bytes())?,
            key: PrivateKeyDer::from_pem_slice(set.server_key.as_bytes())
                .map_err(|e| anyhow::anyhow!("server key: {e}"))?,
        };
        crate::dtls::server_config(&material, true)
    }

    /// The datagrams of one peer that the demultiplexer hands to webrtc-dtls before the
    /// handshake has completed, in order: the first must open a session (a well-formed
    /// ClientHello answering a HelloVerifyRequest: a cookie, message 1), the rest must pass the pre-authentication check and its cap on encrypted
    /// records. Returns the admitted datagrams and the refusal names of the others.
    pub fn dtls_preauth(datagrams: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<&'static str>) {
        let mut admitted = Vec::new();
        let mut refused = Vec::new();
        let mut ciphertext = 0;
        for datagram in datagrams {
            let mut count = ciphertext;
            match crate::dtls::admit(datagram, &mut count) {
                Ok(a) if admitted.is_empty() && !a.client_hello => refused.push("unsolicited"),
                // The demultiplexer opens a handshake only for a ClientHello that returns a
                // cookie it made; a fuzzer cannot forge one, so the cookie's shape stands in.
                Ok(_)
                    if admitted.is_empty()
                        && !crate::dtls::cookie::answers_a_challenge(datagram) =>
                {
                    refused.push("no_cookie");
                }
                Ok(_) => {
                    ciphertext = count;
                    admitted.push(datagram.clone());
                }
                Err(reason) => refused.push(reason.name()),
            }
        }
        (admitted, refused)
    }

    /// The record layer of an established DTLS session (what every datagram of an
    /// authenticated peer goes through): each record of `datagram` opened with fixed keys,
    /// also when sealed by the same keys first (so that the fields behind the tag are
    /// reached); panics if a sealed payload does not open to itself. Returns the records
    /// that opened.
    pub fn dtls_records(datagram: &[u8]) -> usize {
        use crate::dtls::record::{self, content};
        let keys = record::fixed_keys(1);
        let Ok((sealer, mut opener)) = record::split(&keys) else {
            return 0;
        };
        let mut raw = datagram.to_vec();
        let mut opened = record::records(&mut raw)
            .filter_map(|r| opener.open(r).ok())
            .count();
        let payload = &datagram[..datagram.len().min(crate::protocol::MAX_PAYLOAD)];
        let kind = datagram
            .first()
            .copied()
            .unwrap_or(content::APPLICATION_DATA);
        // A fresh replay window: the records above must not decide the round trip.
        let Ok((_, mut opener)) = record::split(&keys) else {
            return opened;
        };
        if let Ok(mut sealed) = sealer.seal(kind, payload) {
            sealed.extend_from_slice(datagram);
            let mut first = true;
            for r in record::records(&mut sealed) {
                let result = opener.open(r);
                if first {
                    assert_eq!(
                        result.ok(),
                        Some((kind, payload)),
                        "a sealed record must open"
                    );
                    first = false;
                    opened += 1;
                }
            }
        }
        opened
    }

    /// `/godoxy/agent/proxy/http`'s target from request headers given as raw name and value
    /// bytes (pairs that are not valid HTTP header names or values are left out, as hyper
    /// would never deliver them): the target's Debug form, or the 400 body.
    pub fn http_proxy_target(headers: &[(&[u8], &[u8])]) -> Result<String, String> {
        let mut map = hyper::HeaderMap::new();
        for (name, value) in headers {
            if let (Ok(name), Ok(value)) = (
                hyper::header::HeaderName::from_bytes(name),
                hyper::header::HeaderValue::from_bytes(value),
            ) {
                map.append(name, value);
            }
        }
        crate::http::fuzzing::proxy_target(&map)
    }

    /// Whether `docker.access` (0 off, 1 godoxy, 2 read-only, else full) lets `method path`
    /// through to the Docker socket.
    pub fn http_docker_allows(access: u8, method: &str, path: &str) -> bool {
        use crate::config::DockerAccess;
        let access = match access % 4 {
            0 => DockerAccess::Off,
            1 => DockerAccess::Godoxy,
            2 => DockerAccess::ReadOnly,
            _ => DockerAccess::Full,
        };
        hyper::Method::from_bytes(method.as_bytes())
            .is_ok_and(|method| crate::http::fuzzing::docker_allows(access, &method, path))
    }

    /// `/godoxy/agent/health`'s query string, parsed: the timeout it asks for.
    pub fn http_health_timeout(query: &str) -> std::time::Duration {
        crate::http::fuzzing::health_timeout(query)
    }
}
