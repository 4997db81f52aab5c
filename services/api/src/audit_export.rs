//! The audit export: a file an auditor verifies offline, with nothing but the file (and,
//! preferably, the ledger's public key obtained separately).
//!
//! Format `backstop-audit-export/1` (documented in `docs/FORMAT.md`, "Audit export"). JSON Lines:
//!
//! ```text
//! line 1        {"format":"backstop-audit-export/1", "first_position":F, "last_position":C,
//!                "range_first_position":F, "range_last_position":R, "events":N,
//!                "prev_hash":"<hash of event F-1, zeros when F = 1>", "public_key":"<hex>",
//!                "from":..., "to":..., "exported_at":..., "truncated": bool}
//! lines 2..N+1  one envelope per line, positions F..=C in order, exactly as the ledger holds them
//! last line     {"checkpoint": {"position":C, "hash":..., "signed_at":..., "public_key":..., "signature":...}}
//! ```
//!
//! CSV has the same records, one per line: a `record` column (`header`, `event`, `checkpoint`),
//! the envelope's fields for events (payload as canonical JSON), and the header or checkpoint as
//! JSON in the `payload` column for the other two.
//!
//! Why it proves something: each event's hash is SHA3-256 of its canonical encoding, which covers
//! the previous event's hash; the checkpoint is an ed25519 signature over (position, hash) of the
//! last line. So the signature covers every event back to the first line, and the first line's
//! `prev_hash` ties the export to the ledger before it. A changed byte in an event changes its
//! hash; a removed, added or reordered line breaks the positions and the links; a forged
//! signature needs the private key. A forger could replace the whole file, key included, with a
//! self-made chain: that is why `verify` takes the key from the auditor too (`--pubkey`).
//!
//! The events run from the first event recorded at or after `from` to the first signed checkpoint
//! at or after the last event recorded before `to`: the events after the requested range (at most
//! one checkpoint interval) are included so that the chain reaches the signature. When no
//! checkpoint has been signed yet past the range, the export stops at the latest checkpoint and
//! says so (`truncated: true`).

use std::io::{BufRead, Write};

use backstop_events::{Digest, Envelope, canonical};
use backstop_ledger::checkpoint::verify_checkpoint;
use backstop_ledger::{Checkpoint, LedgerError, Store};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "backstop-audit-export/1";

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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Header {
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

/// The plan of an export: which positions, which checkpoint.
#[derive(Clone, Debug)]
pub struct Plan {
    pub header: Header,
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

/// Decides the positions and the checkpoint of an export.
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
    let (checkpoint, truncated) = match store.checkpoint_at_or_after(last)? {
        Some(cp) => (cp, false),
        None => match store.last_checkpoint()? {
            Some(cp) if cp.position >= first => (cp, true),
            _ => return Err(ExportError::NoCheckpoint { position: first }),
        },
    };
    let prev_hash = if first == 1 {
        Digest::ZERO
    } else {
        store
            .get(first - 1)?
            .map(|e| e.hash)
            .ok_or_else(|| LedgerError::Corrupt {
                position: first - 1,
                what: "the event is missing".into(),
            })?
    };
    Ok(Plan {
        header: Header {
            format: FORMAT.into(),
            first_position: first,
            last_position: checkpoint.position,
            range_first_position: first,
            range_last_position: last.min(checkpoint.position),
            events: checkpoint.position - first + 1,
            prev_hash,
            public_key: public_key.to_string(),
            from: range.from,
            to: range.to,
            exported_at: backstop_events::now_micros(),
            truncated,
        },
        checkpoint,
    })
}

/// Writes the export planned by [`plan`]. Reads the ledger in chunks, so memory stays small
/// whatever the range.
pub fn write(
    store: &Store,
    plan: &Plan,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), ExportError> {
    write_from(plan, format, out, |from, limit| store.range(from, limit))
}

/// Writes an export from any source of envelopes: `range(from, limit)` returns up to `limit`
/// envelopes from position `from` on, in position order, as [`Store::range`] does. [`write`]
/// passes the ledger; the golden vectors (`tests/vectors/`) pass a fixed excerpt, so they pin
/// the bytes this very code writes.
pub fn write_from(
    plan: &Plan,
    format: Format,
    out: &mut dyn Write,
    mut range: impl FnMut(u64, usize) -> Result<Vec<Envelope>, LedgerError>,
) -> Result<(), ExportError> {
    let h = &plan.header;
    match format {
        Format::Jsonl => {
            serde_json::to_writer(&mut *out, h).map_err(std::io::Error::other)?;
            out.write_all(b"\n")?;
        }
        Format::Csv => {
            out.write_all(CSV_COLUMNS.join(",").as_bytes())?;
            out.write_all(b"\n")?;
            let json = serde_json::to_string(h).map_err(std::io::Error::other)?;
            write_csv_row(
                out,
                &[
                    "header", "", "", "", "", "", "", "", "", "", "", "", &json, "", "",
                ],
            )?;
        }
    }
    let mut next = h.first_position;
    while next <= h.last_position {
        let chunk = range(next, 1024.min((h.last_position - next + 1) as usize))?;
        if chunk.is_empty() {
            return Err(LedgerError::Corrupt {
                position: next,
                what: "the event is missing".into(),
            }
            .into());
        }
        for e in &chunk {
            if e.position > h.last_position {
                break;
            }
            match format {
                Format::Jsonl => {
                    serde_json::to_writer(&mut *out, e).map_err(std::io::Error::other)?;
                    out.write_all(b"\n")?;
                }
                Format::Csv => write_csv_event(out, e)?,
            }
            next = e.position + 1;
        }
    }
    let cp = serde_json::json!({ "checkpoint": plan.checkpoint });
    match format {
        Format::Jsonl => {
            serde_json::to_writer(&mut *out, &cp).map_err(std::io::Error::other)?;
            out.write_all(b"\n")?;
        }
        Format::Csv => {
            let json = serde_json::to_string(&plan.checkpoint).map_err(std::io::Error::other)?;
            write_csv_row(
                out,
                &[
                    "checkpoint",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    &json,
                    "",
                    "",
                ],
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Plans and writes an export in one call.
pub fn export(
    store: &Store,
    public_key: &str,
    range: &ExportRange,
    format: Format,
    out: &mut dyn Write,
) -> Result<Header, ExportError> {
    let p = plan(store, public_key, range)?;
    write(store, &p, format, out)?;
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
    pub events: u64,
    pub first_position: u64,
    pub last_position: u64,
    pub range_first_position: u64,
    pub range_last_position: u64,
    pub checkpoint_position: u64,
    pub checkpoint_signed_at: DateTime<Utc>,
    pub public_key: String,
    /// Whether the key was given by the auditor (`--pubkey`) rather than taken from the file.
    pub key_given: bool,
    pub truncated: bool,
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
    Header(Box<Header>),
    Event(Box<Envelope>),
    Checkpoint(Checkpoint),
}

fn parse_jsonl(line_no: usize, line: &str, first: bool) -> Result<Record, VerifyError> {
    let v: serde_json::Value = serde_json::from_str(line).or_else(|e| {
        fail(
            line_no,
            format!("not valid JSON ({e}): the line was changed or cut"),
        )
    })?;
    if first {
        return serde_json::from_value(v)
            .map(|h| Record::Header(Box::new(h)))
            .or_else(|e| fail(line_no, format!("not an audit export header: {e}")));
    }
    if let Some(cp) = v.get("checkpoint") {
        return serde_json::from_value(cp.clone())
            .map(Record::Checkpoint)
            .or_else(|e| fail(line_no, format!("malformed checkpoint: {e}")));
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
            .map(|h| Record::Header(Box::new(h)))
            .map_err(|e| bad("header", e.to_string())),
        (_, true) => fail(line_no, "the first record must be the header"),
        ("checkpoint", _) => serde_json::from_str(&f[12])
            .map(Record::Checkpoint)
            .map_err(|e| bad("checkpoint", e.to_string())),
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

/// Verifies an export read from `input`. `pubkey`: the ledger's public key (hex) as the auditor
/// obtained it; `None` trusts the key in the file (and the report says so).
pub fn verify(input: impl BufRead, pubkey: Option<&str>) -> Result<Verified, VerifyError> {
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
    let Record::Header(header) = parse(header_line, &header_text, true)? else {
        return fail(header_line, "the first record must be the header");
    };
    if header.format != FORMAT {
        return fail(
            header_line,
            format!("format {:?}, this build reads {FORMAT:?}", header.format),
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
    let mut checkpoint: Option<(usize, Checkpoint)> = None;
    for (n, line) in lines {
        let line = line.or_else(|e| fail(n, format!("unreadable: {e}")))?;
        if line.trim().is_empty() {
            return fail(
                n,
                "an empty line: a line was removed or the file was altered",
            );
        }
        if let Some((cp_line, _)) = &checkpoint {
            return fail(
                n,
                format!(
                    "a record after the checkpoint on line {cp_line}: lines were added or moved"
                ),
            );
        }
        match parse(n, &line, false)? {
            Record::Header(_) => return fail(n, "a second header"),
            Record::Checkpoint(cp) => checkpoint = Some((n, cp)),
            Record::Event(e) => {
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
    if header.range_first_position != header.first_position
        || header.range_last_position > header.last_position
        || header.range_last_position + 1 < header.range_first_position
    {
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
    Ok(Verified {
        format,
        events,
        first_position: header.first_position,
        last_position: last,
        range_first_position: header.range_first_position,
        range_last_position: header.range_last_position,
        checkpoint_position: cp.position,
        checkpoint_signed_at: cp.signed_at,
        public_key: key,
        key_given: pubkey.is_some(),
        truncated: header.truncated,
    })
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
