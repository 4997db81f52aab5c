//! Golden vectors of the event formats: canonical JSON, the envelope's canonical encoding, the
//! SHA3-256 hash chain and the envelope's stored JSON (`tests/vectors/README.md`).
//!
//! Each test builds its vector from fixed inputs, compares it byte for byte with the checked-in
//! file (`BACKSTOP_WRITE_VECTORS=1` rewrites the files instead), then decodes and verifies the
//! file's bytes. The layout parser below restates `docs/FORMAT.md` independently of
//! `backstop_events::canonical`, so a reordered field fails here even if the encoder and the
//! vectors were changed together.
//!
//! Only `repository.initialized`, `key.accessed` and `alert.raised` are used: their payloads are
//! stable, and the vectors must not move when other event types evolve.

#[path = "../../tests/vectors/support.rs"]
mod support;

use backstop_events::{
    Actor, AlertRaised, Digest, Envelope, Event, KeyAccessed, NewEvent, RepositoryInitialized,
    Severity, canonical,
};
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use support::{golden, hex, unhex};

fn uuid(s: &str) -> Uuid {
    s.parse().expect("a fixed uuid")
}

fn time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("a fixed time")
        .with_timezone(&Utc)
}

const REPOSITORY_ID: &str = "01941f29-7c00-7000-8000-00000000a001";
const EVENT_1: &str = "01941f29-7c00-7000-8000-000000000001";
const EVENT_2: &str = "01941f29-7c40-7000-8000-000000000002";
const EVENT_3: &str = "01941f29-7c80-7000-8000-000000000003";
const ALERT_ID: &str = "01941f29-7c80-7000-8000-00000000c003";

/// The three events of the excerpt, with everything an appender and the ledger would choose
/// fixed: ids, streams, actors, times, causation.
fn excerpt_events() -> Vec<(NewEvent, u64, DateTime<Utc>)> {
    let first = uuid(EVENT_1);
    let initialized = Event::RepositoryInitialized(RepositoryInitialized {
        repository_id: uuid(REPOSITORY_ID),
        location: "s3://backstop-golden/prod".into(),
        format_version: 1,
    });
    let accessed = Event::KeyAccessed(KeyAccessed {
        purpose: "database".into(),
        key_id: "database-v1-00c0ffee".into(),
        // Quotes, a newline, non-ASCII: the payload exercises canonical JSON's escaping.
        reason: "backup of source \"main\"\nSicherung für «main»".into(),
    });
    let raised = Event::AlertRaised(AlertRaised {
        alert_id: uuid(ALERT_ID),
        severity: Severity::Critical,
        kind: "verification.failed".into(),
        subject: "backup-01941f29-7c00-7000-8000-00000000b001".into(),
        message: "row counts differ: public.trades 1000 ≠ 999".into(),
        key: String::new(),
        source: None,
    });
    let mut e1 = NewEvent::new("repository", Actor::operator("alice"), &initialized).with_id(first);
    e1.correlation_id = first;
    e1.occurred_at = time("2026-01-02T03:04:05.123456Z");
    let mut e2 =
        NewEvent::new("keys-database", Actor::worker("backup"), &accessed).with_id(uuid(EVENT_2));
    e2.correlation_id = first;
    e2.causation_id = Some(first);
    e2.occurred_at = time("2026-01-02T03:04:06.000001Z");
    let mut e3 = NewEvent::new("alerts", Actor::System, &raised).with_id(uuid(EVENT_3));
    e3.correlation_id = uuid(EVENT_3);
    e3.occurred_at = time("2026-01-02T03:04:07.5Z");
    vec![
        (e1, 1, time("2026-01-02T03:04:05.234567Z")),
        (e2, 1, time("2026-01-02T03:04:06.000002Z")),
        (e3, 1, time("2026-01-02T03:04:07.500001Z")),
    ]
}

/// Seals the excerpt at positions 1..=3 as the ledger's writer does: each envelope's
/// `prev_hash` is the hash of the one before, zero for position 1.
fn excerpt() -> Vec<Envelope> {
    let mut prev = Digest::ZERO;
    let mut out = Vec::new();
    for (position, (event, version, recorded_at)) in (1u64..).zip(excerpt_events()) {
        let env = Envelope::seal(event, position, version, recorded_at, prev);
        prev = env.hash;
        out.push(env);
    }
    out
}

#[test]
fn canonical_json_of_tricky_values() {
    let input: Value = serde_json::from_slice(&support::read("canonical-json.input.json"))
        .expect("canonical-json.input.json is JSON");
    let items = input.as_array().expect("the input is an array of cases");
    let mut produced = Vec::new();
    for item in items {
        produced.extend_from_slice(&canonical::json_bytes(item));
        produced.push(b'\n');
    }
    let stored = golden("canonical-json.expected.txt", &produced);

    let text = std::str::from_utf8(&stored).expect("canonical JSON is UTF-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        items.len(),
        "one canonical line per input case"
    );
    for (line, item) in lines.iter().zip(items) {
        let back: Value = serde_json::from_str(line).expect("each line is JSON");
        assert_eq!(&back, item, "the canonical form decodes to the same value");
        assert_eq!(
            canonical::json(&back),
            *line,
            "canonical JSON is a fixed point: encoding its own decoding gives the same text"
        );
        assert!(
            !line.contains(": ") && !line.contains(", "),
            "no whitespace between tokens: {line}"
        );
    }
    // Keys sorted by UTF-8 bytes: uppercase before `_` before lowercase, multi-byte after ASCII.
    assert!(lines[1].starts_with(r#"{"\u0000":10,"Alpha":3,"_":4,"a":5,"a b":7,"aa":6"#));
    assert!(lines[1].ends_with(r#""z":9,"zeta":1,"é":8,"€":11}"#));
}

#[test]
fn ledger_excerpt_of_three_events() {
    let envelopes = excerpt();

    let mut jsonl = Vec::new();
    let mut canonical_hex = String::new();
    let mut chain = String::new();
    for env in &envelopes {
        // Exactly the bytes the ledger stores in its `events` tree and publishes to JetStream.
        jsonl.extend_from_slice(&serde_json::to_vec(env).expect("an envelope encodes"));
        jsonl.push(b'\n');
        canonical_hex.push_str(&hex(&canonical::encode(env)));
        canonical_hex.push('\n');
        chain.push_str(&format!(
            "{} {} -> {}\n",
            env.position, env.prev_hash, env.hash
        ));
    }
    let jsonl = golden("ledger-excerpt.jsonl", &jsonl);
    let canonical_hex = golden("ledger-excerpt.canonical.hex", canonical_hex.as_bytes());
    let chain = golden("ledger-excerpt.chain.txt", chain.as_bytes());

    // Decode what is on disk and verify the chain from it alone.
    let stored: Vec<Envelope> = std::str::from_utf8(&jsonl)
        .expect("UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is an envelope"))
        .collect();
    let encodings: Vec<Vec<u8>> = std::str::from_utf8(&canonical_hex)
        .expect("UTF-8")
        .lines()
        .map(unhex)
        .collect();
    let links: Vec<(u64, Digest, Digest)> = std::str::from_utf8(&chain)
        .expect("UTF-8")
        .lines()
        .map(|l| {
            let (position, rest) = l.split_once(' ').expect("position, then the link");
            let (prev, hash) = rest.split_once(" -> ").expect("prev -> hash");
            (
                position.parse().expect("a position"),
                prev.parse().expect("a digest"),
                hash.parse().expect("a digest"),
            )
        })
        .collect();
    assert_eq!(stored.len(), 3);
    assert_eq!(encodings.len(), 3);
    assert_eq!(links.len(), 3);

    let mut prev = Digest::ZERO;
    for (i, env) in stored.iter().enumerate() {
        assert_eq!(env.position, i as u64 + 1, "positions are gapless from 1");
        assert_eq!(
            env.prev_hash,
            prev,
            "position {}: the link to the one before",
            i + 1
        );
        assert_eq!(
            canonical::encode(env),
            encodings[i],
            "position {}: the stored envelope re-encodes to the stored canonical bytes",
            i + 1
        );
        assert_eq!(
            Digest::of(&encodings[i]),
            env.hash,
            "position {}: its hash is SHA3-256 of its canonical bytes",
            i + 1
        );
        assert_eq!(env.compute_hash(), env.hash);
        assert_eq!(links[i], (env.position, env.prev_hash, env.hash));
        assert_layout(&encodings[i], env);
        env.event()
            .unwrap_or_else(|e| panic!("position {}: the payload decodes: {e}", i + 1));
        prev = env.hash;
    }
    assert_eq!(
        stored, envelopes,
        "the file decodes to the envelopes it was made from"
    );
    let types: Vec<&str> = stored.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["repository.initialized", "key.accessed", "alert.raised"]
    );

    // A change anywhere in an event breaks its hash, and the link of every event after it.
    let mut edited = stored.clone();
    edited[0].payload["location"] = "s3://elsewhere/prod".into();
    assert_ne!(edited[0].compute_hash(), stored[0].hash);
    assert_eq!(stored[1].prev_hash, stored[0].hash);
}

/// Walks the canonical encoding as `docs/FORMAT.md` lays it out and checks each field against
/// the envelope: a field moved, resized or re-encoded fails here.
fn assert_layout(bytes: &[u8], env: &Envelope) {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> &'a [u8] {
            assert!(self.0.len() >= n, "the encoding ends early");
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            head
        }
        fn u64(&mut self) -> u64 {
            u64::from_be_bytes(self.take(8).try_into().expect("8 bytes"))
        }
        fn i64(&mut self) -> i64 {
            i64::from_be_bytes(self.take(8).try_into().expect("8 bytes"))
        }
        fn u16(&mut self) -> u16 {
            u16::from_be_bytes(self.take(2).try_into().expect("2 bytes"))
        }
        fn uuid(&mut self) -> Uuid {
            Uuid::from_slice(self.take(16)).expect("16 bytes")
        }
        fn str(&mut self) -> &'a str {
            let len = u32::from_be_bytes(self.take(4).try_into().expect("4 bytes"));
            std::str::from_utf8(self.take(len as usize)).expect("UTF-8")
        }
    }
    let mut r = Reader(bytes);
    assert_eq!(r.take(9), b"BKSTP-EV1");
    assert_eq!(r.u64(), env.position);
    assert_eq!(r.uuid(), env.id);
    assert_eq!(r.str(), env.stream);
    assert_eq!(r.u64(), env.version);
    assert_eq!(r.str(), env.event_type);
    assert_eq!(r.u16(), env.schema_version);
    assert_eq!(r.i64(), env.occurred_at.timestamp_micros());
    assert_eq!(r.i64(), env.recorded_at.timestamp_micros());
    assert_eq!(r.str(), env.actor.to_string());
    assert_eq!(r.uuid(), env.correlation_id);
    match r.take(1)[0] {
        0 => assert_eq!(env.causation_id, None),
        1 => assert_eq!(Some(r.uuid()), env.causation_id),
        other => panic!("causation flag {other}"),
    }
    let payload = r.str();
    assert_eq!(payload, canonical::json(&env.payload));
    let decoded: Value = serde_json::from_str(payload).expect("the payload is JSON");
    assert_eq!(decoded, env.payload);
    assert_eq!(r.take(32), env.prev_hash.0);
    assert!(r.0.is_empty(), "nothing after the previous hash");
}
