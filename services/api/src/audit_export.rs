//! The audit export: a file an auditor verifies offline, with nothing but the file and the
//! ledger's public key obtained separately (`--pubkey`, or `ledger.public_key` in the config).
//!
//! Format `backstop-audit-export/2` (documented in `docs/FORMAT.md`, "Audit export"). JSON Lines:
//!
//! ```text
//! line 1        {"format":"backstop-audit-export/2", "first_position":S, "last_position":C,
//!                "range_first_position":F, "range_last_position":R, "events":N,
//!                "prev_hash":"<hash of event S-1, zeros when S = 1>", "public_key":"<hex>",
//!                "from":..., "to":..., "from_position":..., "to_position":...,
//!                "exported_at":..., "truncated": bool,
//!                "opening_checkpoint": {signed checkpoint at position S} | null (S = 1)}
//! lines 2..N+1  one envelope per line, positions S..=C in order, exactly as the ledger holds them
//! line N+2      {"checkpoint": {"position":C, "hash":..., "signed_at":..., "public_key":..., "signature":...}}
//! last line     {"statement": {format, header_sha3, first/last/range positions, events, from, to,
//!                 lines_sha3, closing_checkpoint}, "signature": "<ed25519, hex>"}
//! ```
//!
//! CSV has the same records, one per line: a `record` column (`header`, `event`, `checkpoint`,
//! `statement`), the envelope's fields for events (payload as canonical JSON), and the header,
//! checkpoint or statement as JSON in the `payload` column for the others.
//!
//! Why it proves the range complete:
//! - each event's hash is SHA3-256 of its canonical encoding, which covers the previous event's
//!   hash: a changed byte, or a removed, added or reordered line, breaks a hash or a link;
//! - the chain starts at a signed checkpoint (`opening_checkpoint`, the last one at or before
//!   the event just before the range) or at the ledger's first event, and ends at a signed
//!   checkpoint (the first at or after the event just after the range): cutting events from the
//!   start leaves a first line no signature covers;
//! - the file always holds the event just before the range and, when it exists, the one just
//!   after it, and `recorded_at` grows with the position, so the verifier sees with its own eyes
//!   that nothing recorded in `[from, to)` lies outside the file;
//! - the statement, signed by the ledger's checkpoint key (signed bytes: `BKSTP-ST1` + the
//!   statement's canonical JSON), fixes the header (its SHA3), the positions, the number of events
//!   and the SHA3 over their hashes: cutting the tail back to an earlier real checkpoint, or
//!   editing the header's range, contradicts it, and only the ledger's key can sign another.
//!
//! A forger could replace the whole file, keys included, with a self-made chain: that is why
//! `verify` takes the key from the auditor (`--pubkey`) and says so when it had to trust the file.
//!
//! When no checkpoint has been signed yet past the range, the export stops at the latest
//! checkpoint and says so (`truncated: true`).
//!
//! Format `backstop-audit-export/1` (an unsigned header, one closing checkpoint) is no longer
//! written by `export`, but still verified, with `coverage_signed: false` in the report: it proves
//! the events it holds were not altered, not that none were cut from either end. Its writer
//! ([`write_v1_from`]) stays so that the golden vectors keep pinning those bytes.

use std::io::{BufRead, Write};

use backstop_events::{Digest, Envelope, canonical};
use backstop_ledger::checkpoint::{verify_checkpoint, verify_statement};
use backstop_ledger::{Checkpoint, CheckpointSigner, LedgerError, Store};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha3::{Digest as _, Sha3_256};

/// The format `export` writes.
pub const FORMAT: &str = "backstop-audit-export/2";
/// The earlier format, still verified (without proof of coverage).
pub const FORMAT_V1: &str = "backstop-audit-export/1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Csv,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "jsonl" | "json" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            other => Err(format!("unknown format {other:?}: expected jsonl or csv")),
        }
    }
}

/// What to export: a time range on `recorded_at` (`[from, to)`), or positions.
#[derive(Clone, Debug, Default)]
pub struct ExportRange {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub from_position: Option<u64>,
    pub to_position: Option<u64>,
}

/// The first line of a `backstop-audit-export/2` file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Header {
    pub format: String,
    /// The first event in the file: the opening checkpoint's, or 1.
    pub first_position: u64,
    /// The last event in the file: the closing checkpoint's.
    pub last_position: u64,
    /// The events asked for (by time or position) are `range_first..=range_last`.
    pub range_first_position: u64,
    pub range_last_position: u64,
    pub events: u64,
    pub prev_hash: Digest,
    pub public_key: String,
    #[serde(default)]
    pub from: Option<DateTime<Utc>>,
    #[serde(default)]
    pub to: Option<DateTime<Utc>>,
    #[serde(default)]
    pub from_position: Option<u64>,
    #[serde(default)]
    pub to_position: Option<u64>,
    pub exported_at: DateTime<Utc>,
    pub truncated: bool,
    /// The signed checkpoint at `first_position`; `None` when the file starts at position 1.
    pub opening_checkpoint: Option<Checkpoint>,
}

/// The first line of a `backstop-audit-export/1` file (verified, no longer written by `export`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HeaderV1 {
    pub format: String,
    pub first_position: u64,
    pub last_position: u64,
    pub range_first_position: u64,
    pub range_last_position: u64,
    pub events: u64,
    pub prev_hash: Digest,
    pub public_key: String,
    #[serde(default)]
    pub from: Option<DateTime<Utc>>,
    #[serde(default)]
    pub to: Option<DateTime<Utc>>,
    pub exported_at: DateTime<Utc>,
    pub truncated: bool,
}

/// What the ledger's key signs at the end of a `/2` file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Statement {
    pub format: String,
    /// SHA3-256 of the header's canonical JSON.
    pub header_sha3: Digest,
    pub first_position: u64,
    pub last_position: u64,
    pub range_first_position: u64,
    pub range_last_position: u64,
    pub events: u64,
    #[serde(default)]
    pub from: Option<DateTime<Utc>>,
    #[serde(default)]
    pub to: Option<DateTime<Utc>>,
    /// SHA3-256 over the exported events' hashes (32 bytes each), in position order.
    pub lines_sha3: Digest,
    /// The position of the closing checkpoint.
    pub closing_checkpoint: u64,
}

impl Statement {
    fn signed_bytes(&self) -> Vec<u8> {
        canonical::json_bytes(&serde_json::to_value(self).unwrap_or_default())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct SignedStatement {
    statement: Statement,
    signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("reading the ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("no event was recorded in that range (the ledger's head is at position {head})")]
    Empty { head: u64 },
    #[error(
        "no signed checkpoint covers position {position} yet: the ledger signs one every N events or T seconds (ledger.checkpoint_every / ledger.checkpoint_seconds) and when `backstop serve` stops; try again in a few seconds"
    )]
    NoCheckpoint { position: u64 },
    #[error("{0}")]
    BadRange(String),
}

/// The plan of an export: which positions, which checkpoints.
#[derive(Clone, Debug)]
pub struct Plan {
    pub header: Header,
    pub checkpoint: Checkpoint,
}

/// The plan of a `/1` export (the golden vectors).
#[derive(Clone, Debug)]
pub struct PlanV1 {
    pub header: HeaderV1,
    pub checkpoint: Checkpoint,
}

fn recorded_at(store: &Store, position: u64) -> Result<DateTime<Utc>, LedgerError> {
    store
        .get(position)?
        .map(|e| e.recorded_at)
        .ok_or_else(|| LedgerError::Corrupt {
            position,
            what: "the event is missing".into(),
        })
}

/// The first position in `[lo, hi]` whose recorded_at is >= t (hi + 1 if none). The single writer
/// stamps recorded_at in position order, so this is a binary search; should the clock ever have
/// stepped back, the result is still one contiguous, verifiable range.
fn first_at_or_after(
    store: &Store,
    mut lo: u64,
    mut hi: u64,
    t: DateTime<Utc>,
) -> Result<u64, LedgerError> {
    let end = hi + 1;
    if lo > hi {
        return Ok(end);
    }
    hi += 1;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if mid >= end || recorded_at(store, mid)? >= t {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

/// Decides the positions and the checkpoints of an export.
pub fn plan(store: &Store, public_key: &str, range: &ExportRange) -> Result<Plan, ExportError> {
    let head = store.head()?.position;
    if head == 0 {
        return Err(ExportError::Empty { head });
    }
    let mut first = range.from_position.unwrap_or(1).max(1);
    let mut last = range.to_position.unwrap_or(head).min(head);
    if let Some(from) = range.from {
        first = first.max(first_at_or_after(store, 1, head, from)?);
    }
    if let Some(to) = range.to {
        let after = first_at_or_after(store, 1, head, to)?;
        last = last.min(after.saturating_sub(1));
    }
    if let (Some(f), Some(t)) = (range.from, range.to)
        && f >= t
    {
        return Err(ExportError::BadRange(format!(
            "`from` ({f}) must be before `to` ({t})"
        )));
    }
    if first > last {
        return Err(ExportError::Empty { head });
    }
    // The file starts at a signed checkpoint no later than the event just before the range (so
    // that event is in the file, and a signature covers the first line), or at position 1.
    let opening = if first > 1 {
        store.checkpoint_at_or_before(first - 1)?
    } else {
        None
    };
    let start = opening.as_ref().map(|c| c.position).unwrap_or(1);
    // It ends at a signed checkpoint no earlier than the event just after the range, when there
    // is one, so that the verifier sees where the range ends.
    let want = if last < head { last + 1 } else { last };
    let (checkpoint, truncated) = match store.checkpoint_at_or_after(want)? {
        Some(cp) => (cp, false),
        None => match store.last_checkpoint()? {
            Some(cp) if cp.position >= first => (cp.clone(), cp.position < last),
            _ => return Err(ExportError::NoCheckpoint { position: first }),
        },
    };
    let prev_hash = if start == 1 {
        Digest::ZERO
    } else {
        store
            .get(start - 1)?
            .map(|e| e.hash)
            .ok_or_else(|| LedgerError::Corrupt {
                position: start - 1,
                what: "the event is missing".into(),
            })?
    };
    Ok(Plan {
        header: Header {
            format: FORMAT.into(),
            first_position: start,
            last_position: checkpoint.position,
            range_first_position: first,
            range_last_position: last.min(checkpoint.position),
            events: checkpoint.position - start + 1,
            prev_hash,
            public_key: public_key.to_string(),
            from: range.from,
            to: range.to,
            from_position: range.from_position,
            to_position: range.to_position,
            exported_at: backstop_events::now_micros(),
            truncated,
            opening_checkpoint: opening,
        },
        checkpoint,
    })
}

/// Writes the export planned by [`plan`], signing its statement with `signer` (the ledger's
/// checkpoint key). Reads the ledger in chunks, so memory stays small whatever the range.
pub fn write(
    store: &Store,
    plan: &Plan,
    signer: &CheckpointSigner,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), ExportError> {
    write_from(plan, signer, format, out, |from, limit| {
        store.range(from, limit)
    })
}

/// Writes an export from any source of envelopes: `range(from, limit)` returns up to `limit`
/// envelopes from position `from` on, in position order, as [`Store::range`] does. [`write`]
/// passes the ledger; the golden vectors (`tests/vectors/`) pass a fixed excerpt, so they pin
/// the bytes this very code writes (ed25519 signatures are deterministic).
pub fn write_from(
    plan: &Plan,
    signer: &CheckpointSigner,
    format: Format,
    out: &mut dyn Write,
    range: impl FnMut(u64, usize) -> Result<Vec<Envelope>, LedgerError>,
) -> Result<(), ExportError> {
    let h = &plan.header;
    let header = serde_json::to_value(h).map_err(std::io::Error::other)?;
    write_record(out, format, "header", h, true)?;
    let mut lines = Sha3_256::new();
    write_events(h.first_position, h.last_position, format, out, range, |e| {
        lines.update(e.hash.0)
    })?;
    write_record(out, format, "checkpoint", &plan.checkpoint, false)?;
    let statement = Statement {
        format: h.format.clone(),
        header_sha3: Digest::of(&canonical::json_bytes(&header)),
        first_position: h.first_position,
        last_position: h.last_position,
        range_first_position: h.range_first_position,
        range_last_position: h.range_last_position,
        events: h.events,
        from: h.from,
        to: h.to,
        lines_sha3: Digest(lines.finalize().into()),
        closing_checkpoint: plan.checkpoint.position,
    };
    let signature = signer.sign_statement(&statement.signed_bytes());
    let signed = SignedStatement {
        statement,
        signature,
    };
    write_record(out, format, "statement", &signed, false)?;
    out.flush()?;
    Ok(())
}

/// One header, checkpoint or statement record. In JSON Lines, checkpoints and statements are
/// wrapped (`{"checkpoint": ...}`, `{"statement": ..., "signature": ...}` is already an object).
fn write_record(
    out: &mut dyn Write,
    format: Format,
    kind: &str,
    value: &impl Serialize,
    first: bool,
) -> Result<(), ExportError> {
    match format {
        Format::Jsonl => {
            if kind == "checkpoint" {
                let v = serde_json::json!({ "checkpoint": value });
                serde_json::to_writer(&mut *out, &v).map_err(std::io::Error::other)?;
            } else {
                serde_json::to_writer(&mut *out, value).map_err(std::io::Error::other)?;
            }
            out.write_all(b"\n")?;
        }
        Format::Csv => {
            if first {
                out.write_all(CSV_COLUMNS.join(",").as_bytes())?;
                out.write_all(b"\n")?;
            }
            let json = serde_json::to_string(value).map_err(std::io::Error::other)?;
            let mut row = [""; 15];
            row[0] = kind;
            row[12] = &json;
            write_csv_row(out, &row)?;
        }
    }
    Ok(())
}

fn write_events(
    first: u64,
    last: u64,
    format: Format,
    out: &mut dyn Write,
    mut range: impl FnMut(u64, usize) -> Result<Vec<Envelope>, LedgerError>,
    mut seen: impl FnMut(&Envelope),
) -> Result<(), ExportError> {
    let mut next = first;
    while next <= last {
        let chunk = range(next, 1024.min((last - next + 1) as usize))?;
        if chunk.is_empty() {
            return Err(LedgerError::Corrupt {
                position: next,
                what: "the event is missing".into(),
            }
            .into());
        }
        for e in &chunk {
            if e.position > last {
                break;
            }
            match format {
                Format::Jsonl => {
                    serde_json::to_writer(&mut *out, e).map_err(std::io::Error::other)?;
                    out.write_all(b"\n")?;
                }
                Format::Csv => write_csv_event(out, e)?,
            }
            seen(e);
            next = e.position + 1;
        }
    }
    Ok(())
}

/// Writes a `backstop-audit-export/1` file from any source of envelopes: `range(from, limit)`
/// returns up to `limit` envelopes from position `from` on, in position order, as
/// [`Store::range`] does. Kept for the golden vectors (`tests/vectors/`), which pin the bytes of
/// the format the verifier still reads.
pub fn write_v1_from(
    plan: &PlanV1,
    format: Format,
    out: &mut dyn Write,
    range: impl FnMut(u64, usize) -> Result<Vec<Envelope>, LedgerError>,
) -> Result<(), ExportError> {
    let h = &plan.header;
    write_record(out, format, "header", h, true)?;
    write_events(
        h.first_position,
        h.last_position,
        format,
        out,
        range,
        |_| {},
    )?;
    write_record(out, format, "checkpoint", &plan.checkpoint, false)?;
    out.flush()?;
    Ok(())
}

/// Plans and writes an export in one call.
pub fn export(
    store: &Store,
    signer: &CheckpointSigner,
    range: &ExportRange,
    format: Format,
    out: &mut dyn Write,
) -> Result<Header, ExportError> {
    let p = plan(store, &signer.public_key_hex(), range)?;
    write(store, &p, signer, format, out)?;
    Ok(p.header)
}

pub const CSV_COLUMNS: [&str; 15] = [
    "record",
    "position",
    "id",
    "stream",
    "version",
    "type",
    "schema_version",
    "occurred_at",
    "recorded_at",
    "actor",
    "correlation_id",
    "causation_id",
    "payload",
    "prev_hash",
    "hash",
];

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn write_csv_event(out: &mut dyn Write, e: &Envelope) -> std::io::Result<()> {
    write_csv_row(
        out,
        &[
            "event",
            &e.position.to_string(),
            &e.id.to_string(),
            &e.stream,
            &e.version.to_string(),
            &e.event_type,
            &e.schema_version.to_string(),
            &ts(&e.occurred_at),
            &ts(&e.recorded_at),
            &e.actor.to_string(),
            &e.correlation_id.to_string(),
            &e.causation_id.map(|c| c.to_string()).unwrap_or_default(),
            &canonical::json(&e.payload),
            &e.prev_hash.to_hex(),
            &e.hash.to_hex(),
        ],
    )
}

fn write_csv_row(out: &mut dyn Write, fields: &[&str]) -> std::io::Result<()> {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        if f.contains([',', '"', '\n', '\r']) {
            out.write_all(b"\"")?;
            out.write_all(f.replace('"', "\"\"").as_bytes())?;
            out.write_all(b"\"")?;
        } else {
            out.write_all(f.as_bytes())?;
        }
    }
    out.write_all(b"\n")
}

/// Splits one CSV line (no embedded newlines: canonical JSON escapes them).
fn parse_csv_line(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    cur.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                cur.push(c);
            }
        } else if c == '"' && at_start {
            quoted = true;
            at_start = false;
        } else if c == ',' {
            fields.push(std::mem::take(&mut cur));
            at_start = true;
        } else {
            cur.push(c);
            at_start = false;
        }
    }
    if quoted {
        return Err("an unterminated quoted field".into());
    }
    fields.push(cur);
    Ok(fields)
}

/// What a successful verification found.
#[derive(Clone, Debug, Serialize)]
pub struct Verified {
    pub format: Format,
    /// The file's format (`backstop-audit-export/2`, or `/1`).
    pub version: String,
    pub events: u64,
    pub first_position: u64,
    pub last_position: u64,
    pub range_first_position: u64,
    pub range_last_position: u64,
    /// The signed checkpoint the file starts at (`None`: it starts at the ledger's first event).
    pub opening_checkpoint_position: Option<u64>,
    pub checkpoint_position: u64,
    pub checkpoint_signed_at: DateTime<Utc>,
    pub public_key: String,
    /// Whether the key was given by the auditor (`--pubkey`) rather than taken from the file.
    pub key_given: bool,
    pub truncated: bool,
    /// Whether the file proves that nothing was cut from either end of its range (`/2`: a signed
    /// statement and checkpoints at both ends). A `/1` file proves only its events are unaltered.
    pub coverage_signed: bool,
}

/// Why a file does not verify, and the line (1-based) where it was found.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[error("line {line}: {what}")]
pub struct VerifyError {
    pub line: usize,
    pub what: String,
}

fn fail<T>(line: usize, what: impl Into<String>) -> Result<T, VerifyError> {
    Err(VerifyError {
        line,
        what: what.into(),
    })
}

enum Record {
    Header(serde_json::Value),
    Event(Box<Envelope>),
    Checkpoint(Checkpoint),
    Statement(Box<SignedStatement>),
}

fn parse_jsonl(line_no: usize, line: &str, first: bool) -> Result<Record, VerifyError> {
    let v: serde_json::Value = serde_json::from_str(line).or_else(|e| {
        fail(
            line_no,
            format!("not valid JSON ({e}): the line was changed or cut"),
        )
    })?;
    if first {
        return Ok(Record::Header(v));
    }
    if let Some(cp) = v.get("checkpoint") {
        return serde_json::from_value(cp.clone())
            .map(Record::Checkpoint)
            .or_else(|e| fail(line_no, format!("malformed checkpoint: {e}")));
    }
    if v.get("statement").is_some() {
        return serde_json::from_value(v)
            .map(|s| Record::Statement(Box::new(s)))
            .or_else(|e| fail(line_no, format!("malformed signed statement: {e}")));
    }
    serde_json::from_value(v)
        .map(|e| Record::Event(Box::new(e)))
        .or_else(|e| fail(line_no, format!("not an event envelope: {e}")))
}

fn parse_csv(line_no: usize, line: &str, first_record: bool) -> Result<Record, VerifyError> {
    let f = parse_csv_line(line).or_else(|e| fail(line_no, e))?;
    if f.len() != CSV_COLUMNS.len() {
        return fail(
            line_no,
            format!("expected {} columns, found {}", CSV_COLUMNS.len(), f.len()),
        );
    }
    let bad = |what: &str, e: String| VerifyError {
        line: line_no,
        what: format!("malformed {what}: {e}"),
    };
    match (f[0].as_str(), first_record) {
        ("header", true) => serde_json::from_str(&f[12])
            .map(Record::Header)
            .map_err(|e| bad("header", e.to_string())),
        (_, true) => fail(line_no, "the first record must be the header"),
        ("checkpoint", _) => serde_json::from_str(&f[12])
            .map(Record::Checkpoint)
            .map_err(|e| bad("checkpoint", e.to_string())),
        ("statement", _) => serde_json::from_str(&f[12])
            .map(|s| Record::Statement(Box::new(s)))
            .map_err(|e| bad("signed statement", e.to_string())),
        ("event", _) => {
            let time = |s: &str, what: &str| {
                DateTime::parse_from_rfc3339(s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| bad(what, e.to_string()))
            };
            let env = Envelope {
                position: f[1].parse().map_err(|_| bad("position", f[1].clone()))?,
                id: f[2].parse().map_err(|_| bad("id", f[2].clone()))?,
                stream: f[3].clone(),
                version: f[4].parse().map_err(|_| bad("version", f[4].clone()))?,
                event_type: f[5].clone(),
                schema_version: f[6]
                    .parse()
                    .map_err(|_| bad("schema_version", f[6].clone()))?,
                occurred_at: time(&f[7], "occurred_at")?,
                recorded_at: time(&f[8], "recorded_at")?,
                actor: f[9]
                    .parse()
                    .map_err(|e: backstop_events::EventError| bad("actor", e.to_string()))?,
                correlation_id: f[10]
                    .parse()
                    .map_err(|_| bad("correlation_id", f[10].clone()))?,
                causation_id: if f[11].is_empty() {
                    None
                } else {
                    Some(
                        f[11]
                            .parse()
                            .map_err(|_| bad("causation_id", f[11].clone()))?,
                    )
                },
                payload: serde_json::from_str(&f[12]).map_err(|e| bad("payload", e.to_string()))?,
                prev_hash: f[13]
                    .parse()
                    .map_err(|e: backstop_events::EventError| bad("prev_hash", e.to_string()))?,
                hash: f[14]
                    .parse()
                    .map_err(|e: backstop_events::EventError| bad("hash", e.to_string()))?,
            };
            Ok(Record::Event(Box::new(env)))
        }
        (other, _) => fail(line_no, format!("unknown record kind {other:?}")),
    }
}

/// The header of either format, with the fields the chain checks need.
struct Common {
    version: String,
    first_position: u64,
    last_position: u64,
    range_first_position: u64,
    range_last_position: u64,
    events: u64,
    prev_hash: Digest,
    public_key: String,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    truncated: bool,
    opening: Option<Checkpoint>,
}

fn common(line: usize, v: &serde_json::Value) -> Result<Common, VerifyError> {
    let format = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
    if format == FORMAT {
        let h: Header = serde_json::from_value(v.clone())
            .or_else(|e| fail(line, format!("not an audit export header: {e}")))?;
        Ok(Common {
            version: h.format,
            first_position: h.first_position,
            last_position: h.last_position,
            range_first_position: h.range_first_position,
            range_last_position: h.range_last_position,
            events: h.events,
            prev_hash: h.prev_hash,
            public_key: h.public_key,
            from: h.from,
            to: h.to,
            truncated: h.truncated,
            opening: h.opening_checkpoint,
        })
    } else if format == FORMAT_V1 {
        let h: HeaderV1 = serde_json::from_value(v.clone())
            .or_else(|e| fail(line, format!("not an audit export header: {e}")))?;
        Ok(Common {
            version: h.format,
            first_position: h.first_position,
            last_position: h.last_position,
            range_first_position: h.range_first_position,
            range_last_position: h.range_last_position,
            events: h.events,
            prev_hash: h.prev_hash,
            public_key: h.public_key,
            from: h.from,
            to: h.to,
            truncated: h.truncated,
            opening: None,
        })
    } else {
        fail(
            line,
            format!("format {format:?}: this build reads {FORMAT:?} and {FORMAT_V1:?}"),
        )
    }
}

/// Verifies an export read from `input`. `pubkey`: the ledger's public key (hex) as the auditor
/// obtained it; `None` trusts the key in the file (and the report says so). Only `/2` files are
/// accepted: a `/1` file proves no coverage, and anyone can turn a cut `/2` file into one.
pub fn verify(input: impl BufRead, pubkey: Option<&str>) -> Result<Verified, VerifyError> {
    verify_with(input, pubkey, false)
}

/// [`verify`], also accepting `/1` files when `accept_v1` (`backstop audit verify --accept-v1`,
/// for files exported before `/2`): their events are checked, their coverage is not proved.
pub fn verify_with(
    input: impl BufRead,
    pubkey: Option<&str>,
    accept_v1: bool,
) -> Result<Verified, VerifyError> {
    let mut lines = input.lines().enumerate().map(|(i, l)| (i + 1, l));
    let Some((n, first)) = lines.next() else {
        return fail(1, "the file is empty");
    };
    let first = first.or_else(|e| fail(n, format!("unreadable: {e}")))?;
    let format = if first.starts_with('{') {
        Format::Jsonl
    } else if first.trim_end() == CSV_COLUMNS.join(",") {
        Format::Csv
    } else {
        return fail(1, "neither a JSON Lines nor a CSV audit export (no header)");
    };
    let parse = |line_no: usize, text: &str, first_record: bool| match format {
        Format::Jsonl => parse_jsonl(line_no, text, first_record),
        Format::Csv => parse_csv(line_no, text, first_record),
    };
    let header_line;
    let header_text = if format == Format::Jsonl {
        header_line = 1;
        first
    } else {
        match lines.next() {
            Some((n, l)) => {
                header_line = n;
                l.or_else(|e| fail(n, format!("unreadable: {e}")))?
            }
            None => return fail(2, "no header record"),
        }
    };
    let Record::Header(header_value) = parse(header_line, &header_text, true)? else {
        return fail(header_line, "the first record must be the header");
    };
    let header = common(header_line, &header_value)?;
    let v2 = header.version == FORMAT;
    if !v2 && !accept_v1 {
        return fail(
            header_line,
            format!(
                "a {FORMAT_V1} file: it proves its events unaltered but not that none were cut from either end (a cut {FORMAT} file can be rewritten as one); export again, or pass --accept-v1 for a file exported before {FORMAT}"
            ),
        );
    }
    let key = match pubkey {
        Some(k) => {
            let k = k.trim().to_lowercase();
            if k != header.public_key {
                return fail(
                    header_line,
                    format!(
                        "the file names public key {} but the key you gave is {k}: the file was not signed by your ledger, or was re-signed by someone else",
                        header.public_key
                    ),
                );
            }
            k
        }
        None => header.public_key.clone(),
    };

    let mut expected_position = header.first_position;
    let mut prev = header.prev_hash;
    let mut events = 0u64;
    let mut lines_sha3 = Sha3_256::new();
    let mut first_hash: Option<Digest> = None;
    let mut before_range: Option<(usize, DateTime<Utc>)> = None;
    let mut after_range: Option<(usize, DateTime<Utc>)> = None;
    let mut checkpoint: Option<(usize, Checkpoint)> = None;
    let mut statement: Option<(usize, SignedStatement)> = None;
    for (n, line) in lines {
        let line = line.or_else(|e| fail(n, format!("unreadable: {e}")))?;
        if line.trim().is_empty() {
            return fail(
                n,
                "an empty line: a line was removed or the file was altered",
            );
        }
        if let Some((st_line, _)) = &statement {
            return fail(
                n,
                format!(
                    "a record after the signed statement on line {st_line}: lines were added or moved"
                ),
            );
        }
        if let Some((cp_line, _)) = &checkpoint
            && !v2
        {
            return fail(
                n,
                format!(
                    "a record after the checkpoint on line {cp_line}: lines were added or moved"
                ),
            );
        }
        match parse(n, &line, false)? {
            Record::Header(_) => return fail(n, "a second header"),
            Record::Checkpoint(cp) => {
                if let Some((cp_line, _)) = &checkpoint {
                    return fail(
                        n,
                        format!("a second checkpoint after the one on line {cp_line}"),
                    );
                }
                checkpoint = Some((n, cp))
            }
            Record::Statement(st) if v2 => {
                if checkpoint.is_none() {
                    return fail(
                        n,
                        "the signed statement comes before the closing checkpoint: lines were removed or moved",
                    );
                }
                statement = Some((n, *st))
            }
            Record::Statement(_) => return fail(n, "a signed statement in a /1 file"),
            Record::Event(e) => {
                if let Some((cp_line, _)) = &checkpoint {
                    return fail(
                        n,
                        format!(
                            "an event after the checkpoint on line {cp_line}: lines were added or moved"
                        ),
                    );
                }
                if e.position != expected_position {
                    return fail(
                        n,
                        format!(
                            "event at position {} where position {expected_position} was expected: a line was removed, added or reordered",
                            e.position
                        ),
                    );
                }
                if e.prev_hash != prev {
                    return fail(
                        n,
                        format!(
                            "broken link: this event names previous hash {} but the line before hashes to {prev}",
                            e.prev_hash
                        ),
                    );
                }
                let computed = e.compute_hash();
                if computed != e.hash {
                    return fail(
                        n,
                        format!(
                            "content changed: the event at position {} records hash {} but its content hashes to {computed}",
                            e.position, e.hash
                        ),
                    );
                }
                if v2 {
                    let p = e.position;
                    if p + 1 == header.range_first_position {
                        before_range = Some((n, e.recorded_at));
                    } else if p == header.range_last_position + 1 {
                        after_range = Some((n, e.recorded_at));
                    } else if p >= header.range_first_position && p <= header.range_last_position {
                        let early = header.from.is_some_and(|f| e.recorded_at < f);
                        let late = header.to.is_some_and(|t| e.recorded_at >= t);
                        if early || late {
                            return fail(
                                n,
                                format!(
                                    "the event at position {p} was recorded at {}, outside the range the header announces",
                                    e.recorded_at
                                ),
                            );
                        }
                    }
                }
                first_hash.get_or_insert(e.hash);
                lines_sha3.update(e.hash.0);
                prev = e.hash;
                expected_position += 1;
                events += 1;
            }
        }
    }
    let last_line = header_line + events as usize + 1;
    let Some((cp_line, cp)) = checkpoint else {
        return fail(
            last_line,
            "no checkpoint record at the end: the file was cut short",
        );
    };
    let last = expected_position - 1;
    if events != header.events || last != header.last_position {
        return fail(
            header_line,
            format!(
                "the header announces {} events up to position {}, the file holds {events} up to {last}",
                header.events, header.last_position
            ),
        );
    }
    let range_ok = if v2 {
        header.range_first_position >= header.first_position
            && header.range_last_position <= header.last_position
            && header.range_first_position <= header.range_last_position
    } else {
        header.range_first_position == header.first_position
            && header.range_last_position <= header.last_position
            && header.range_last_position + 1 >= header.range_first_position
    };
    if !range_ok {
        return fail(
            header_line,
            "the header's range is inconsistent with its positions",
        );
    }
    if let Err(why) = verify_checkpoint(&cp, &key) {
        return fail(cp_line, format!("checkpoint signature invalid: {why}"));
    }
    if cp.position != last || cp.hash != prev {
        return fail(
            cp_line,
            format!(
                "the signed checkpoint covers position {} with hash {}, but the chain in the file ends at position {last} with hash {prev}",
                cp.position, cp.hash
            ),
        );
    }
    if v2 {
        verify_coverage(
            &header,
            &header_value,
            header_line,
            &key,
            first_hash,
            Digest(lines_sha3.finalize().into()),
            before_range,
            after_range,
            &cp,
            statement,
            last_line + 1,
        )?;
    }
    Ok(Verified {
        format,
        version: header.version.clone(),
        events,
        first_position: header.first_position,
        last_position: last,
        range_first_position: header.range_first_position,
        range_last_position: header.range_last_position,
        opening_checkpoint_position: header.opening.as_ref().map(|c| c.position),
        checkpoint_position: cp.position,
        checkpoint_signed_at: cp.signed_at,
        public_key: key,
        key_given: pubkey.is_some(),
        truncated: header.truncated,
        coverage_signed: v2,
    })
}

/// The `/2` checks that prove nothing was cut: the opening checkpoint, the range's boundaries and
/// the signed statement.
#[allow(clippy::too_many_arguments)]
fn verify_coverage(
    header: &Common,
    header_value: &serde_json::Value,
    header_line: usize,
    key: &str,
    first_hash: Option<Digest>,
    lines_sha3: Digest,
    before_range: Option<(usize, DateTime<Utc>)>,
    after_range: Option<(usize, DateTime<Utc>)>,
    closing: &Checkpoint,
    statement: Option<(usize, SignedStatement)>,
    statement_line: usize,
) -> Result<(), VerifyError> {
    match &header.opening {
        None if header.first_position != 1 || header.prev_hash != Digest::ZERO => {
            return fail(
                header_line,
                format!(
                    "the file starts at position {} with no signed checkpoint there: events before it were cut, or the header was altered",
                    header.first_position
                ),
            );
        }
        None => {}
        Some(op) => {
            if let Err(why) = verify_checkpoint(op, key) {
                return fail(
                    header_line,
                    format!("the opening checkpoint's signature is invalid: {why}"),
                );
            }
            if op.position != header.first_position || Some(op.hash) != first_hash {
                return fail(
                    header_line,
                    format!(
                        "the opening checkpoint covers position {} with hash {}, but the file starts at position {}{}: events were cut from the start",
                        op.position,
                        op.hash,
                        header.first_position,
                        first_hash
                            .map(|h| format!(" with hash {h}"))
                            .unwrap_or_default()
                    ),
                );
            }
        }
    }
    if let Some(from) = header.from
        && header.range_first_position > 1
    {
        match before_range {
            Some((_, at)) if at < from => {}
            Some((n, at)) => {
                return fail(
                    n,
                    format!(
                        "the event just before the range was recorded at {at}, not before `from` ({from}): events of the range were left out at the start"
                    ),
                );
            }
            None => {
                return fail(
                    header_line,
                    "the event just before the range is not in the file, so nothing proves the range starts where the header says",
                );
            }
        }
    }
    if let (Some(to), Some((n, at))) = (header.to, after_range)
        && at < to
    {
        return fail(
            n,
            format!(
                "the event just after the range was recorded at {at}, before `to` ({to}): events of the range were left out at the end"
            ),
        );
    }
    let Some((st_line, signed)) = statement else {
        return fail(
            statement_line,
            "no signed statement at the end: the file was cut short, or its end replaced by an earlier checkpoint",
        );
    };
    if let Err(why) = verify_statement(&signed.statement.signed_bytes(), &signed.signature, key) {
        return fail(
            st_line,
            format!(
                "the statement's signature is invalid ({why}): the statement was altered or signed by another key"
            ),
        );
    }
    let st = &signed.statement;
    let header_sha3 = Digest::of(&canonical::json_bytes(header_value));
    let mut wrong = Vec::new();
    if st.header_sha3 != header_sha3 {
        wrong.push("the header was altered".to_string());
    }
    if st.format != header.version {
        wrong.push(format!("format {}", st.format));
    }
    if (st.first_position, st.last_position) != (header.first_position, header.last_position) {
        wrong.push(format!(
            "positions {}..={} signed, {}..={} in the file",
            st.first_position, st.last_position, header.first_position, header.last_position
        ));
    }
    if (st.range_first_position, st.range_last_position)
        != (header.range_first_position, header.range_last_position)
        || (st.from, st.to) != (header.from, header.to)
    {
        wrong.push("the range differs from the signed one".to_string());
    }
    if st.events != header.events {
        wrong.push(format!(
            "{} events signed, {} in the file",
            st.events, header.events
        ));
    }
    if st.lines_sha3 != lines_sha3 {
        wrong.push("the events differ from the signed ones".to_string());
    }
    if st.closing_checkpoint != closing.position {
        wrong.push(format!(
            "the closing checkpoint was signed at position {}, the file ends at {}: the tail was cut back to an earlier checkpoint",
            st.closing_checkpoint, closing.position
        ));
    }
    if !wrong.is_empty() {
        return fail(
            st_line,
            format!(
                "the file does not match the signed statement: {}",
                wrong.join("; ")
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_round_trip_quotes_and_commas() {
        let mut out = Vec::new();
        write_csv_row(&mut out, &["a", "b,c", "say \"hi\"", ""]).unwrap();
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            parse_csv_line(line.trim_end()).unwrap(),
            vec!["a", "b,c", "say \"hi\"", ""]
        );
        assert!(parse_csv_line("\"open").is_err());
    }
}
