//! The streaming tar reader of physical restores (`backstop_sources::pg::physical::scan_tar`).
//! The first byte sets the size of the pieces the archive is fed in (1 to 256 bytes, or all at
//! once for 0), since a header or a padding split across two reads is a path of its own.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, archive)) = data.split_first() else {
        return;
    };
    let piece = if piece == 0 {
        archive.len().max(1)
    } else {
        piece as usize
    };
    let _ = backstop_sources::pg::physical::scan_tar(archive, piece);
});
