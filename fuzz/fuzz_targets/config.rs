//! The configuration parser: any text as the TOML file, no environment.
#![no_main]

use godoxy_agent::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match Config::from_toml(text, None, |_| None) {
            Ok((config, _)) => drop(format!("{config:?}")),
            // Errors name the key and the line: format them too.
            Err(errors) => errors.0.iter().for_each(|e| drop(e.to_string())),
        }
    }
});
