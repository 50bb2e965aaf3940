//! godoxy-agent: a GoDoxy agent speaking the agent stream protocol.
//!
//! ```text
//!               TLS :8890 (mTLS)                                 destination
//! GoDoxy ──┬── ALPN godoxy-agent-stream/1 ─> tunnel::serve ──TCP──> host:port
//!          ├── http/1.1 or none ──────────> http_api (/godoxy/agent/*)
//!          └── DTLS :8890/udp ────────────> dtls (one session per peer) ──UDP──> host:port
//! ```
//!
//! `config` merges the TOML file and GoDoxy's environment variables; `daemon` binds and runs
//! the listeners; `tunnel::header` is the 275-byte wire header; `client` is the other side.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod alpn;
pub mod certs;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dtls;
pub mod forward;
pub mod http_api;
pub mod stats;
pub mod tcp_listener;
pub mod tls;
pub mod tunnel;

pub use config::Config;
pub use daemon::Daemon;
