//! Manifest plaintext (an opened `manifests/<backup id>` object): decoding and the checks the
//! reader makes before trusting it (`backstop_repo::manifest::parse_manifest`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

/// The ids of the golden repository (tests/vectors/repository), which the seeds name.
const REPOSITORY_ID: Uuid = Uuid::from_u128(0x01941f29_7c00_7000_8000_00000000a001);
const BACKUP_ID: Uuid = Uuid::from_u128(0x01941f29_7c00_7000_8000_00000000b001);

fuzz_target!(|data: &[u8]| {
    let path = backstop_repo::manifest_key(&BACKUP_ID);
    if let Ok(m) = backstop_repo::manifest::parse_manifest(&path, data, BACKUP_ID, REPOSITORY_ID) {
        // What a restore and `check` do next with a trusted manifest.
        let _ = m.distinct_chunks();
        let _ = m.stream_names();
        let _ = m.duration();
        for chunk in m.streams.iter().flat_map(|s| s.chunks.iter()) {
            let _ = chunk.object_key();
        }
    }
});
