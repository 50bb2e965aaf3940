//! webrtc-dtls alone, with no check of ours in front: every datagram of the input reaches its
//! parsers and a real server, as a decrypted record of a peer that finished the key exchange
//! without a certificate still does. Nothing here may panic.
#![no_main]

use godoxy_agent_fuzz::{datagrams, parse_datagram, run_server};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let datagrams = datagrams(data);
    for datagram in &datagrams {
        parse_datagram(datagram);
    }
    run_server(datagrams);
});
