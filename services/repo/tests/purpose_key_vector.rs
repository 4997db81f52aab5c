//! Golden vector of the purpose-key file format (`backstop-purpose-key` version 1,
//! `tests/vectors/purpose-key-wal.json`, see docs/FORMAT.md "Purpose-key files"): a `wal` key
//! file with two versions, made from fixed keys, ids and times, so that it is the same bytes on
//! every run (the MAC is AES-SIV's S2V, deterministic). The test compares it byte for byte
//! (`BACKSTOP_WRITE_VECTORS=1` rewrites it instead), then loads the checked-in file: its MAC
//! verifies, the keys are the fixed ones, and a changed byte is refused.

#[path = "../../../tests/vectors/support.rs"]
mod support;

use backstop_repo::config::CompressionParams;
use backstop_repo::{DataKey, KeyInfo, KeyPurpose, PurposeKeyFile};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use support::golden;

// The repository id of the repository vector; test keys, public by design.
const REPOSITORY_ID: &str = "01941f29-7c00-7000-8000-00000000a001";

fn time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("a fixed time")
        .with_timezone(&Utc)
}

fn key(version: u32, key_id: &str, created: &str, first: u8) -> DataKey {
    DataKey::from_secret(
        KeyInfo {
            purpose: KeyPurpose::Wal,
            key_id: key_id.into(),
            version,
            created_at: time(created),
        },
        std::array::from_fn(|i| first.wrapping_add(i as u8)),
    )
}

fn build() -> PurposeKeyFile {
    PurposeKeyFile::from_parts(
        REPOSITORY_ID.parse::<Uuid>().expect("a fixed uuid"),
        time("2026-12-02T06:00:00Z"),
        CompressionParams {
            quality: 2,
            lgwin: 22,
        },
        vec![
            key(1, "wal-v1-00c0ffee", "2026-11-22T06:31:00Z", 0x10),
            key(2, "wal-v2-0badf00d", "2026-12-01T09:00:00Z", 0x60),
        ],
    )
    .expect("a valid key file")
}

#[test]
fn purpose_key_file() {
    let produced = build().to_bytes().expect("encodes");
    let file = golden("purpose-key-wal.json", &produced);

    let loaded =
        PurposeKeyFile::from_bytes("purpose-key-wal.json", &file).expect("the vector loads");
    assert_eq!(loaded.repository_id().to_string(), REPOSITORY_ID);
    assert_eq!(loaded.purpose(), KeyPurpose::Wal);
    assert_eq!(loaded.sealing_key().key_id, "wal-v2-0badf00d");
    let ids: Vec<String> = loaded.key_infos().into_iter().map(|k| k.key_id).collect();
    assert_eq!(ids, ["wal-v1-00c0ffee", "wal-v2-0badf00d"]);
    assert_eq!(loaded.exported_at(), time("2026-12-02T06:00:00Z"));

    // Any byte of the document changed (here the last digit of the repository id) is refused.
    let text = String::from_utf8(file).expect("JSON text");
    let changed = text.replace(REPOSITORY_ID, "01941f29-7c00-7000-8000-00000000a002");
    assert_ne!(changed, text);
    let e = PurposeKeyFile::from_bytes("changed", changed.as_bytes()).unwrap_err();
    assert!(e.to_string().contains("MAC does not match"), "{e}");
}
