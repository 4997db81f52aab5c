//! The table of contents of a custom-format `pg_dump` archive, as a selective restore reads it
//! (`backstop_sources::pg::logical::parse_toc`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = backstop_sources::pg::logical::parse_toc(data);
});
