//! The integration tests: one binary (one link), one module per externally visible behaviour,
//! all against the real daemon, real clients and real peers on 127.0.0.1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

mod cli;
mod client_cli;
mod config;
mod docker;
mod doctor;
mod dtls;
mod exhaustion;
mod header;
mod health;
mod http_api;
mod identity;
mod mtls;
mod policy;
mod preauth;
mod prometheus;
mod proxy;
mod reload;
mod setup;
mod shutdown;
mod system_info;
mod tunnel;
