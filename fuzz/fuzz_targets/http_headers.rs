//! The HTTP side's parsing of what a client sends: `/proxy/http`'s X-Proxy-* headers (base64
//! JSON included), `/health`'s query string, and the `docker.access` rule on a method and path.
//!
//! Input: one byte choosing the access level and which headers are present, then text lines:
//! the Docker method, the Docker path, the health query, then one value per X-Proxy-* header
//! in [`HEADERS`] order; any further `name: value` lines are other headers.
#![no_main]

use libfuzzer_sys::fuzz_target;

const HEADERS: [&str; 6] = [
    "x-proxy-host",
    "x-proxy-scheme",
    "x-proxy-config",
    "x-proxy-https",
    "x-proxy-skip-tls-verify",
    "x-proxy-response-header-timeout",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mut lines = rest.split(|&b| b == b'\n');
    let mut text = || lines.next().map(String::from_utf8_lossy);
    let method = text().unwrap_or_default();
    let path = text().unwrap_or_default();
    let _ = godoxy_agent::fuzzing::http_docker_allows(selector, &method, &path);
    let query = text().unwrap_or_default();
    let _ = godoxy_agent::fuzzing::http_health_timeout(&query);

    let mut values = Vec::new();
    for name in HEADERS {
        values.push((name, text().map(|v| v.into_owned())));
    }
    let extra: Vec<String> = std::iter::from_fn(text).map(|l| l.into_owned()).collect();
    let mut headers: Vec<(&[u8], &[u8])> = Vec::new();
    // Bits 2..8 of the selector say which X-Proxy-* headers are sent (a header can be absent
    // or empty, and GoDoxy's parser tells them apart).
    for (i, (name, value)) in values.iter().enumerate() {
        if selector & (4 << i) != 0 {
            if let Some(value) = value {
                headers.push((name.as_bytes(), value.as_bytes()));
            }
        }
    }
    for line in &extra {
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().as_bytes(), value.trim().as_bytes()));
        }
    }
    let _ = godoxy_agent::fuzzing::http_proxy_target(&headers);
});
