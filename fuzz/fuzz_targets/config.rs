//! The configuration file, `backstop.toml`: `Config::parse` of services/cli/src/config.rs (the
//! binary crate cannot be a dependency, so that very file is compiled here as a module), on
//! arbitrary UTF-8. Decoding and every check `backstop` makes at start-up.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../services/cli/src/config.rs"]
mod config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = config::Config::parse(text, std::path::Path::new("fuzz.toml"));
});
