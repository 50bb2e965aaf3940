//! The record layer an authenticated DTLS peer's datagrams go through (`dtls::record`): record
//! splitting, the replay window and AES-GCM opening on arbitrary bytes, and a seal/open round
//! trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = godoxy_agent::fuzzing::dtls_records(data);
});
