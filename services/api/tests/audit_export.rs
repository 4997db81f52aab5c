//! The audit export against a real ledger: an intact export verifies with nothing but the file
//! and the pinned key; a changed byte, a removed, added or reordered line, events cut from either
//! end (even with the header edited to match, or the tail replaced by an earlier real checkpoint),
//! a statement re-signed with another key, or a downgrade to the unsigned `/1` format, each fail
//! and the message names what is wrong.

use backstop_api::audit_export::{self, ExportRange, Format, verify};
use backstop_events::{Actor, Event, KeyAccessed, NewEvent, canonical, streams};
use backstop_ledger::{Appender, CheckpointSigner, ExpectedVersion, Ledger, LedgerConfig};
use serde_json::Value;

async fn ledger_with_events(dir: &std::path::Path, n: usize) -> (Ledger, CheckpointSigner) {
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
    let signer = CheckpointSigner::load_or_create(&cfg.signing_key).unwrap();
    (ledger, signer)
}

fn export(
    ledger: &Ledger,
    signer: &CheckpointSigner,
    range: &ExportRange,
    format: Format,
) -> String {
    let mut out = Vec::new();
    audit_export::export(ledger.store(), signer, range, format, &mut out).unwrap();
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

/// Edits a JSON Lines record.
fn edit(line: &str, f: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(line).unwrap();
    f(&mut v);
    serde_json::to_string(&v).unwrap()
}

#[tokio::test]
async fn intact_exports_verify_and_every_kind_of_tampering_is_named_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, signer) = ledger_with_events(dir.path(), 35).await;
    let key = ledger.public_key().to_string();
    // Positions 15..=23: the file starts at the checkpoint at 10 (the last at or before 14) and
    // ends at the one at 30 (the first at or after 24).
    let range = ExportRange {
        from_position: Some(15),
        to_position: Some(23),
        ..Default::default()
    };
    for format in [Format::Jsonl, Format::Csv] {
        let text = export(&ledger, &signer, &range, format);
        let ok = check(&text, Some(&key)).expect("an intact export verifies");
        assert_eq!((ok.first_position, ok.last_position), (10, 30));
        assert_eq!((ok.range_first_position, ok.range_last_position), (15, 23));
        assert_eq!(ok.opening_checkpoint_position, Some(10));
        assert_eq!(ok.checkpoint_position, 30);
        assert_eq!(ok.events, 21);
        assert!(ok.key_given && ok.coverage_signed && !ok.truncated);
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

        // Cut short: the statement, the checkpoint and one event gone.
        let cut = all[..all.len() - 3].to_vec();
        let e = check(&join(&cut), Some(&key)).unwrap_err();
        assert!(e.what.contains("no checkpoint"), "{e}");
        // Only the signed statement gone.
        let cut = all[..all.len() - 1].to_vec();
        let e = check(&join(&cut), Some(&key)).unwrap_err();
        assert!(e.what.contains("no signed statement"), "{e}");

        // Another ledger's key, given out of band.
        let other = tempfile::tempdir().unwrap();
        let (other_ledger, _) = ledger_with_events(other.path(), 1).await;
        let e = check(&text, Some(other_ledger.public_key())).unwrap_err();
        assert!(e.what.contains("not signed by your ledger"), "{e}");
        other_ledger.close().await;

        // The key in the file replaced: the signatures no longer hold.
        let mut rekeyed = all.clone();
        let header_idx = first_event - 2;
        rekeyed[header_idx] = rekeyed[header_idx].replace(&key, &"ab".repeat(32));
        let e = check(&join(&rekeyed), None).unwrap_err();
        assert!(e.what.contains("signature"), "{e}");
    }
    ledger.close().await;
}

#[tokio::test]
async fn cutting_either_end_or_re_signing_fails_even_with_the_header_edited_to_match() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, signer) = ledger_with_events(dir.path(), 35).await;
    let key = ledger.public_key().to_string();
    let range = ExportRange {
        from_position: Some(15),
        to_position: Some(23),
        ..Default::default()
    };
    let all = lines(&export(&ledger, &signer, &range, Format::Jsonl));
    // Lines: 0 header, 1..=21 events 10..=30, 22 checkpoint, 23 statement.
    assert_eq!(all.len(), 24);
    let (header, events, cp, statement) = (&all[0], &all[1..22], &all[22], &all[23]);

    // Cut from the start: events 10..=12 gone, the header claiming the file starts at 13.
    let mut cut: Vec<String> = vec![edit(header, |h| {
        h["first_position"] = 13.into();
        h["events"] = 18.into();
        h["prev_hash"] = ledger
            .store()
            .get(12)
            .unwrap()
            .unwrap()
            .hash
            .to_hex()
            .into();
    })];
    cut.extend(events[3..].iter().cloned());
    cut.push(cp.clone());
    cut.push(statement.clone());
    let e = check(&join(&cut), Some(&key)).unwrap_err();
    assert!(e.what.contains("cut from the start"), "{e}");
    // ... and with the opening checkpoint dropped too.
    cut[0] = edit(&cut[0], |h| h["opening_checkpoint"] = Value::Null);
    let e = check(&join(&cut), Some(&key)).unwrap_err();
    assert!(e.what.contains("no signed checkpoint there"), "{e}");
    // ... and started at the next real checkpoint (20), cutting 15..=19 from the range.
    let cp20 = ledger.store().checkpoint_at_or_after(20).unwrap().unwrap();
    assert_eq!(cp20.position, 20);
    let mut cut: Vec<String> = vec![edit(header, |h| {
        h["first_position"] = 20.into();
        h["range_first_position"] = 20.into();
        h["events"] = 11.into();
        h["prev_hash"] = ledger
            .store()
            .get(19)
            .unwrap()
            .unwrap()
            .hash
            .to_hex()
            .into();
        h["opening_checkpoint"] = serde_json::to_value(&cp20).unwrap();
    })];
    cut.extend(events[10..].iter().cloned());
    cut.push(cp.clone());
    cut.push(statement.clone());
    let e = check(&join(&cut), Some(&key)).unwrap_err();
    assert_eq!(e.line, cut.len(), "named on the statement's line: {e}");
    assert!(
        e.what.contains("does not match the signed statement"),
        "{e}"
    );
    assert!(e.what.contains("header was altered"), "{e}");

    // The tail cut back to an earlier real checkpoint (20), the header edited to match.
    let mut cut: Vec<String> = vec![edit(header, |h| {
        h["last_position"] = 20.into();
        h["range_last_position"] = 20.into();
        h["events"] = 11.into();
    })];
    cut.extend(events[..11].iter().cloned());
    cut.push(serde_json::to_string(&serde_json::json!({ "checkpoint": cp20 })).unwrap());
    cut.push(statement.clone());
    let e = check(&join(&cut), Some(&key)).unwrap_err();
    assert!(
        e.what
            .contains("tail was cut back to an earlier checkpoint"),
        "{e}"
    );
    // ... without the statement.
    cut.pop();
    let e = check(&join(&cut), Some(&key)).unwrap_err();
    assert!(e.what.contains("no signed statement"), "{e}");

    // The statement (over the cut file) re-signed with another key.
    let other = tempfile::tempdir().unwrap();
    let (other_ledger, other_signer) = ledger_with_events(other.path(), 1).await;
    let mut forged = cut.clone();
    let header_value: Value = serde_json::from_str(&forged[0]).unwrap();
    let resigned = edit(statement, |s| {
        let st = &mut s["statement"];
        st["header_sha3"] = backstop_events::Digest::of(&canonical::json_bytes(&header_value))
            .to_hex()
            .into();
        st["last_position"] = 20.into();
        st["range_last_position"] = 20.into();
        st["events"] = 11.into();
        st["closing_checkpoint"] = 20.into();
        let mut h = sha3_of_hashes(&forged[1..12]);
        st["lines_sha3"] = std::mem::take(&mut h).into();
        let sig = other_signer.sign_statement(&canonical::json_bytes(st));
        s["signature"] = sig.into();
    });
    forged.push(resigned);
    let e = check(&join(&forged), Some(&key)).unwrap_err();
    assert_eq!(e.line, forged.len(), "{e}");
    assert!(e.what.contains("signed by another key"), "{e}");
    other_ledger.close().await;

    // Downgraded to the unsigned /1 format: refused unless asked for, and then it says the
    // coverage is not proved.
    let mut v1: Vec<String> = vec![edit(&cut[0], |h| {
        h["format"] = audit_export::FORMAT_V1.into();
        h["first_position"] = 15.into();
        h["range_first_position"] = 15.into();
        h["events"] = 6.into();
        h["prev_hash"] = ledger
            .store()
            .get(14)
            .unwrap()
            .unwrap()
            .hash
            .to_hex()
            .into();
        let o = h.as_object_mut().unwrap();
        o.remove("opening_checkpoint");
        o.remove("from_position");
        o.remove("to_position");
    })];
    v1.extend(events[5..11].iter().cloned());
    v1.push(cut[cut.len() - 1].clone());
    let e = check(&join(&v1), Some(&key)).unwrap_err();
    assert!(e.what.contains("--accept-v1"), "{e}");
    let old = audit_export::verify_with(std::io::Cursor::new(join(&v1)), Some(&key), true)
        .expect("a /1 file still verifies when asked for");
    assert!(!old.coverage_signed);
    ledger.close().await;
}

/// SHA3-256 over the hashes of the given event lines, hex (what the statement signs).
fn sha3_of_hashes(event_lines: &[String]) -> String {
    use sha3::Digest as _;
    let mut h = sha3::Sha3_256::new();
    for l in event_lines {
        let e: backstop_events::Envelope = serde_json::from_str(l).unwrap();
        h.update(e.hash.0);
    }
    hex::encode(h.finalize())
}

#[tokio::test]
async fn ranges_by_time_hold_the_events_either_side_and_the_uncheckpointed_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, signer) = ledger_with_events(dir.path(), 12).await;
    // Checkpoint at 10 only (every 10 events); 11 and 12 are not covered yet.
    let text = export(&ledger, &signer, &ExportRange::default(), Format::Jsonl);
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
    let err = audit_export::export(ledger.store(), &signer, &future, Format::Jsonl, &mut out)
        .unwrap_err();
    assert!(err.to_string().contains("no event"), "{err}");

    // A range from before the first event to now covers everything checkpointed.
    let all = ExportRange {
        from: Some(chrono::Utc::now() - chrono::Duration::days(1)),
        to: Some(chrono::Utc::now() + chrono::Duration::seconds(1)),
        ..Default::default()
    };
    let text = export(&ledger, &signer, &all, Format::Csv);
    assert_eq!(check(&text, None).unwrap().events, 10);

    // A range from event 5's time to event 8's: the file holds event 4 (before `from`) and 8
    // (at `to`), so the verifier sees the range's edges itself.
    let at = |p: u64| ledger.store().get(p).unwrap().unwrap().recorded_at;
    let mid = ExportRange {
        from: Some(at(5)),
        to: Some(at(8)),
        ..Default::default()
    };
    let text = export(&ledger, &signer, &mid, Format::Jsonl);
    let v = check(&text, Some(ledger.public_key())).unwrap();
    assert!(
        v.range_first_position <= 5 && v.range_last_position <= 7,
        "{v:?}"
    );
    assert!(v.first_position < v.range_first_position);
    assert!(v.last_position > v.range_last_position);
    // The header's `from` moved later, to hide the range's first events: the signed statement
    // no longer matches.
    let mut l = lines(&text);
    l[0] = edit(&l[0], |h| {
        h["from"] = serde_json::to_value(at(7)).unwrap();
        h["range_first_position"] = 7.into();
    });
    let e = check(&join(&l), Some(ledger.public_key())).unwrap_err();
    assert!(
        e.what.contains("signed statement") || e.what.contains("range"),
        "{e}"
    );
    ledger.close().await;
}
