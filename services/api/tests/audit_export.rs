//! The audit export against a real ledger: an intact export verifies with nothing but the file;
//! a changed byte, a removed, added or reordered line, a cut file, or another key fails and names
//! the line.

use backstop_api::audit_export::{self, ExportRange, Format, verify};
use backstop_events::{Actor, Event, KeyAccessed, NewEvent, streams};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};

async fn ledger_with_events(dir: &std::path::Path, n: usize) -> Ledger {
    let mut cfg = LedgerConfig::in_data_dir(dir);
    cfg.checkpoint_every = 10;
    let ledger = Ledger::open(&cfg).unwrap();
    for i in 0..n {
        let e = NewEvent::new(
            streams::keys("database"),
            Actor::worker("backup"),
            &Event::KeyAccessed(KeyAccessed {
                purpose: "database".into(),
                key_id: "database-v1".into(),
                reason: format!("backup {i}, with \"quotes\", commas and a\nnewline"),
            }),
        );
        ledger
            .append(&streams::keys("database"), ExpectedVersion::Any, vec![e])
            .await
            .unwrap();
    }
    ledger
}

fn export(ledger: &Ledger, range: &ExportRange, format: Format) -> String {
    let mut out = Vec::new();
    audit_export::export(ledger.store(), ledger.public_key(), range, format, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn check(
    text: &str,
    key: Option<&str>,
) -> Result<audit_export::Verified, audit_export::VerifyError> {
    verify(std::io::Cursor::new(text.as_bytes()), key)
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_string).collect()
}

fn join(lines: &[String]) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

#[tokio::test]
async fn intact_exports_verify_and_every_kind_of_tampering_is_named_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = ledger_with_events(dir.path(), 35).await;
    let key = ledger.public_key().to_string();
    // Positions 5..=23: the export must reach the checkpoint at 30 and start from event 4's hash.
    let range = ExportRange {
        from_position: Some(5),
        to_position: Some(23),
        ..Default::default()
    };
    for format in [Format::Jsonl, Format::Csv] {
        let text = export(&ledger, &range, format);
        let ok = check(&text, Some(&key)).expect("an intact export verifies");
        assert_eq!(ok.first_position, 5);
        assert_eq!(ok.range_last_position, 23);
        assert_eq!(
            ok.checkpoint_position, 30,
            "the first checkpoint at or after 23"
        );
        assert_eq!(ok.events, 26);
        assert!(ok.key_given);
        assert!(check(&text, None).is_ok(), "and with the key in the file");

        let all = lines(&text);
        let first_event = if format == Format::Jsonl { 2 } else { 3 };

        // One byte changed inside an event (a digit of its payload's text).
        let mut changed = all.clone();
        let idx = first_event - 1 + 6;
        changed[idx] = changed[idx].replacen("backup 1", "backup 7", 1);
        assert_ne!(changed[idx], all[idx]);
        let e = check(&join(&changed), Some(&key)).unwrap_err();
        assert_eq!(e.line, idx + 1, "{e}");
        assert!(e.what.contains("content changed"), "{e}");

        // A line removed.
        let mut removed = all.clone();
        removed.remove(first_event - 1 + 3);
        let e = check(&join(&removed), Some(&key)).unwrap_err();
        assert_eq!(e.line, first_event + 3, "{e}");
        assert!(e.what.contains("was expected"), "{e}");

        // Two lines swapped.
        let mut swapped = all.clone();
        swapped.swap(first_event - 1 + 2, first_event - 1 + 3);
        let e = check(&join(&swapped), Some(&key)).unwrap_err();
        assert_eq!(e.line, first_event + 2, "{e}");

        // A line duplicated.
        let mut added = all.clone();
        added.insert(first_event - 1 + 4, all[first_event - 1 + 4].clone());
        let e = check(&join(&added), Some(&key)).unwrap_err();
        assert_eq!(e.line, first_event + 5, "{e}");

        // Cut short: the checkpoint line and one event gone.
        let cut = all[..all.len() - 2].to_vec();
        let e = check(&join(&cut), Some(&key)).unwrap_err();
        assert!(e.what.contains("no checkpoint"), "{e}");

        // Another ledger's key, given out of band.
        let other = tempfile::tempdir().unwrap();
        let other_ledger = ledger_with_events(other.path(), 1).await;
        let e = check(&text, Some(other_ledger.public_key())).unwrap_err();
        assert!(e.what.contains("not signed by your ledger"), "{e}");
        other_ledger.close().await;

        // The key in the file replaced: the signature no longer holds.
        let fake_key = other.path().join("x");
        let _ = fake_key;
        let mut rekeyed = all.clone();
        let header_idx = first_event - 2;
        rekeyed[header_idx] = rekeyed[header_idx].replace(&key, &"ab".repeat(32));
        let e = check(&join(&rekeyed), None).unwrap_err();
        assert!(e.what.contains("signature"), "{e}");

        // The first event's link to the ledger before the export.
        let mut relinked = all.clone();
        let zero = "0".repeat(64);
        let prev = ledger.store().get(4).unwrap().unwrap().hash.to_hex();
        relinked[header_idx] = relinked[header_idx].replace(&prev, &zero);
        let e = check(&join(&relinked), Some(&key)).unwrap_err();
        assert_eq!(e.line, first_event, "{e}");
        assert!(e.what.contains("broken link"), "{e}");
    }
    ledger.close().await;
}

#[tokio::test]
async fn ranges_by_time_and_the_uncheckpointed_tail() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = ledger_with_events(dir.path(), 12).await;
    // Checkpoint at 10 only (every 10 events); 11 and 12 are not covered yet.
    let text = export(&ledger, &ExportRange::default(), Format::Jsonl);
    let v = check(&text, Some(ledger.public_key())).unwrap();
    assert_eq!(v.first_position, 1);
    assert_eq!(v.last_position, 10);
    assert!(
        v.truncated,
        "the export says it stops at the latest checkpoint"
    );

    // A time range entirely in the future has no event.
    let future = ExportRange {
        from: Some(chrono::Utc::now() + chrono::Duration::days(1)),
        ..Default::default()
    };
    let mut out = Vec::new();
    let err = audit_export::export(
        ledger.store(),
        ledger.public_key(),
        &future,
        Format::Jsonl,
        &mut out,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no event"), "{err}");

    // A range from before the first event to now covers everything checkpointed.
    let all = ExportRange {
        from: Some(chrono::Utc::now() - chrono::Duration::days(1)),
        to: Some(chrono::Utc::now() + chrono::Duration::seconds(1)),
        ..Default::default()
    };
    let text = export(&ledger, &all, Format::Csv);
    assert_eq!(check(&text, None).unwrap().events, 10);
    ledger.close().await;
}
