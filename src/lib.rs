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
//! - `tls`: certificates and keys -> rustls and webrtc-dtls configurations; `certs` makes them;
//! - `protocol`: the 275-byte header and the names both ends agree on;
//! - `tunnel`: the one pipeline (header -> probe -> destination -> dial -> relay -> closing
//!   line), with `tunnel::tcp` and `tunnel::udp` as its two transports;
//! - `policy`: `[policy]`, which destinations may be dialed: resolve once, judge every
//!   address, dial only those (tunnels, `/proxy/http` and `/health` alike);
//! - `dtls`: the UDP side: demultiplexer, one session task per peer;
//! - `http`: the HTTP side: `http/mod.rs` routes, `http/conn.rs` decides when a connection may
//!   close (idle apart from header time), `http/info.rs` is `/godoxy/agent/info`,
//!   `http/docker.rs` relays the Docker Engine API under `docker.access`;
//! - `metrics`: the host sampler, its 5-period history and the history file, served by
//!   `http/system_info.rs` as `/godoxy/agent/system_info` (GoDoxy's dashboard);
//! - `stats`: counters; `client` and `forward`: the other end, for the CLI, tests and benchmark.
//!
//! The binary (`main.rs`, `cli/`) adds the command line; the benchmark is the workspace member
//! `bench/`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod alpn;
pub mod certs;
pub mod client;
pub mod config;
mod daemon;
mod dtls;
pub mod forward;
mod http;
mod metrics;
mod policy;
pub mod protocol;
mod stats;
mod tcp_listener;
mod tls;
mod tunnel;

pub use config::Config;
pub use daemon::Daemon;
pub use stats::Stats;
