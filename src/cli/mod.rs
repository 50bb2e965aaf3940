//! The command line's own modules (the binary's, not the library's): the client commands and
//! signal handling, logging.

pub mod client;
pub mod logging;
pub mod signals;
