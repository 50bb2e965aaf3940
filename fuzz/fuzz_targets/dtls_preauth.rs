//! The DTLS pre-authentication path exactly as the agent feeds it: one peer's datagrams
//! through the demultiplexer's check (the first must be a well-formed ClientHello, the rest
//! must pass), then what passes through webrtc-dtls's record and handshake parsers and a real
//! webrtc-dtls server with the agent's configuration. Nothing here may panic.
#![no_main]

use godoxy_agent_fuzz::{datagrams, parse_datagram, run_server};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (admitted, _refused) = godoxy_agent::fuzzing::dtls_preauth(&datagrams(data));
    for datagram in &admitted {
        parse_datagram(datagram);
    }
    run_server(admitted);
});
