//! WAL file names (`backstop_sources::pg::wal::WalFile::parse`) and what follows a parsed name:
//! its segment number, the name rebuilt from it, the segment header check and the decoding of
//! a stored WAL file. Input: a name, a newline, then the file's bytes.
#![no_main]

use backstop_sources::pg::wal::{self, WalFile};
use libfuzzer_sys::fuzz_target;

/// The name before the first newline (lossy UTF-8) and the bytes after it.
fn split(data: &[u8]) -> (String, &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (
            String::from_utf8_lossy(&data[..i]).into_owned(),
            &data[i + 1..],
        ),
        None => (String::from_utf8_lossy(data).into_owned(), &[]),
    }
}

/// The sizes PostgreSQL allows (`--wal-segsize`, 1 MiB to 1 GiB, powers of two).
const SEGMENT_SIZES: [u64; 3] = [1 << 20, 16 << 20, 1 << 30];

fuzz_target!(|data: &[u8]| {
    let (name, body) = split(data);
    let Some(file) = WalFile::parse(&name) else {
        return;
    };
    for size in SEGMENT_SIZES {
        let segno = file.segno(size);
        if file.is_segment() {
            let _ = wal::segment_name(file.timeline, segno, size);
        }
    }
    let _ = wal::check_segment_header(&file, body);
    let _ = wal::decode_stored(&name, bytes::Bytes::copy_from_slice(body));
});
