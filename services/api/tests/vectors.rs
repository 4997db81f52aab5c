//! Golden vectors of the audit export's earlier format (`backstop-audit-export/1`, JSON Lines and
//! CSV, still verified with `--accept-v1`; `/2` adds a signed statement over live data): the
//! three-event ledger excerpt and its signed checkpoint (pinned by `events/tests/vectors.rs` and
//! `ledger/tests/vectors.rs`) written by the export's own writer with a fixed header, compared
//! byte for byte, then checked by the offline verifier an auditor runs (`backstop audit verify`).
//! `BACKSTOP_WRITE_VECTORS=1` rewrites the files instead of comparing (`tests/vectors/README.md`).

#[path = "../../../tests/vectors/support.rs"]
mod support;

use backstop_api::audit_export::{self, Format, HeaderV1, PlanV1, VerifyError};
use backstop_events::{Digest, Envelope};
use backstop_ledger::Checkpoint;
use chrono::{DateTime, Utc};

use support::golden;

fn time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("a fixed time")
        .with_timezone(&Utc)
}

fn excerpt() -> Vec<Envelope> {
    String::from_utf8(support::read("ledger-excerpt.jsonl"))
        .expect("UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("an envelope"))
        .collect()
}

fn checkpoint() -> Checkpoint {
    serde_json::from_slice(&support::read("checkpoint.json")).expect("a checkpoint")
}

/// The plan `audit_export::plan` makes for `--from 03:04:05Z --to 03:04:07Z` on a ledger that
/// holds the excerpt and signed at its head: events 1 and 2 are in the range, event 3 follows
/// so that the chain reaches the signature.
fn plan(checkpoint: Checkpoint) -> PlanV1 {
    PlanV1 {
        header: HeaderV1 {
            format: audit_export::FORMAT_V1.into(),
            first_position: 1,
            last_position: 3,
            range_first_position: 1,
            range_last_position: 2,
            events: 3,
            prev_hash: Digest::ZERO,
            public_key: checkpoint.public_key.clone(),
            from: Some(time("2026-01-02T03:04:05Z")),
            to: Some(time("2026-01-02T03:04:07Z")),
            exported_at: time("2026-01-02T03:05:00Z"),
            truncated: false,
        },
        checkpoint,
    }
}

fn export(format: Format) -> Vec<u8> {
    let events = excerpt();
    let mut out = Vec::new();
    audit_export::write_v1_from(&plan(checkpoint()), format, &mut out, |from, limit| {
        Ok(events
            .iter()
            .filter(|e| e.position >= from)
            .take(limit)
            .cloned()
            .collect())
    })
    .expect("the export writes");
    out
}

fn verify(bytes: &[u8], key: &str) -> Result<audit_export::Verified, VerifyError> {
    // `/1` is no longer written by `export`, and accepted only when asked for.
    audit_export::verify_with(bytes, Some(key), true)
}

fn check_export(name: &str, format: Format) -> Vec<u8> {
    let stored = golden(name, &export(format));
    let key = checkpoint().public_key;
    let v = verify(&stored, &key).unwrap_or_else(|e| panic!("{name} does not verify: {e}"));
    assert_eq!(v.format, format);
    assert_eq!(
        (v.events, v.first_position, v.last_position),
        (3, 1, 3),
        "{name}: the three events of the excerpt"
    );
    assert_eq!((v.range_first_position, v.range_last_position), (1, 2));
    assert_eq!(v.checkpoint_position, 3);
    assert_eq!(v.checkpoint_signed_at, checkpoint().signed_at);
    assert!(v.key_given && !v.truncated);

    // The auditor's key must be the one that signed.
    let other = "ab".repeat(32);
    assert!(verify(&stored, &other).is_err());
    // Any one line removed, or two swapped, is found.
    let text = String::from_utf8(stored.clone()).expect("UTF-8");
    let lines: Vec<&str> = text.lines().collect();
    for skip in 0..lines.len() {
        let cut: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        assert!(
            verify(cut.as_bytes(), &key).is_err(),
            "{name} without line {}",
            skip + 1
        );
    }
    let n = lines.len();
    let mut swapped: Vec<&str> = lines.clone();
    swapped.swap(n - 3, n - 2);
    assert!(verify(swapped.join("\n").as_bytes(), &key).is_err());
    stored
}

#[test]
fn audit_export_jsonl_with_a_signed_checkpoint() {
    let stored = check_export("audit-export.jsonl", Format::Jsonl);
    // A changed character in an event's payload breaks its hash.
    let text = String::from_utf8(stored).expect("UTF-8");
    let edited = text.replacen("operator:alice", "operator:alicf", 1);
    assert_ne!(edited, text);
    let err = verify(edited.as_bytes(), &checkpoint().public_key).expect_err("tampered");
    assert_eq!(err.line, 2, "the first event, on line 2: {err}");
}

#[test]
fn audit_export_csv_with_a_signed_checkpoint() {
    let stored = check_export("audit-export.csv", Format::Csv);
    let text = String::from_utf8(stored).expect("UTF-8");
    let edited = text.replacen("s3://backstop-golden/prod", "s3://backstop-golden/prof", 1);
    assert_ne!(edited, text);
    assert!(verify(edited.as_bytes(), &checkpoint().public_key).is_err());
}

/// The test checkpoint key (`checkpoint-signing.seed`), loaded as the ledger loads its key file.
fn signer() -> (tempfile::TempDir, backstop_ledger::CheckpointSigner) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("ledger-signing.key");
    std::fs::write(&path, support::read("checkpoint-signing.seed")).expect("the seed is copied");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("the key file is private");
    }
    let signer = backstop_ledger::CheckpointSigner::load_or_create(&path).expect("the test key");
    (dir, signer)
}

/// The plan `audit_export::plan` makes (format `/2`) for the same range: the file starts at
/// position 1 (no checkpoint before the range), ends at the checkpoint at 3 (event 3 is the one
/// just after the range), and the statement is signed with the test key.
fn plan_v2(checkpoint: Checkpoint) -> audit_export::Plan {
    audit_export::Plan {
        header: audit_export::Header {
            format: audit_export::FORMAT.into(),
            first_position: 1,
            last_position: 3,
            range_first_position: 1,
            range_last_position: 2,
            events: 3,
            prev_hash: Digest::ZERO,
            public_key: checkpoint.public_key.clone(),
            from: Some(time("2026-01-02T03:04:05Z")),
            to: Some(time("2026-01-02T03:04:07Z")),
            from_position: None,
            to_position: None,
            exported_at: time("2026-01-02T03:05:00Z"),
            truncated: false,
            opening_checkpoint: None,
        },
        checkpoint,
    }
}

fn check_export_v2(name: &str, format: Format) {
    let events = excerpt();
    let (_dir, signer) = signer();
    assert_eq!(signer.public_key_hex(), checkpoint().public_key);
    let mut made = Vec::new();
    audit_export::write_from(
        &plan_v2(checkpoint()),
        &signer,
        format,
        &mut made,
        |from, limit| {
            Ok(events
                .iter()
                .filter(|e| e.position >= from)
                .take(limit)
                .cloned()
                .collect())
        },
    )
    .expect("the export writes");
    let stored = golden(name, &made);
    let key = checkpoint().public_key;
    let v = audit_export::verify(&stored[..], Some(&key))
        .unwrap_or_else(|e| panic!("{name} does not verify: {e}"));
    assert!(v.coverage_signed && v.key_given && !v.truncated);
    assert_eq!((v.first_position, v.last_position), (1, 3));
    assert_eq!((v.range_first_position, v.range_last_position), (1, 2));
    assert_eq!(v.opening_checkpoint_position, None);
    // Any one line removed is found.
    let text = String::from_utf8(stored).expect("UTF-8");
    let lines: Vec<&str> = text.lines().collect();
    for skip in 0..lines.len() {
        let cut: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        assert!(
            audit_export::verify(cut.as_bytes(), Some(&key)).is_err(),
            "{name} without line {}",
            skip + 1
        );
    }
}

#[test]
fn audit_export_v2_jsonl_with_a_signed_statement() {
    check_export_v2("audit-export-v2.jsonl", Format::Jsonl);
}

#[test]
fn audit_export_v2_csv_with_a_signed_statement() {
    check_export_v2("audit-export-v2.csv", Format::Csv);
}
