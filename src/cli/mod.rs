//! The command line's own modules (the binary's, not the library's): the client commands,
//! `doctor`, logging and signal handling.

pub mod client;
pub mod doctor;
pub mod logging;
pub mod signals;
