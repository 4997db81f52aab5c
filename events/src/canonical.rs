//! The canonical encoding of an envelope: the exact bytes the hash chain is computed over.
//!
//! Format (envelope format 1), all integers big-endian, `str` = u32 length + UTF-8 bytes:
//!
//! ```text
//! magic            9 bytes   "BKSTP-EV1"
//! position         u64
//! id               16 bytes  (UUID, binary)
//! stream           str
//! version          u64
//! type             str
//! schema_version   u16
//! occurred_at      i64       microseconds since 1970-01-01T00:00:00Z
//! recorded_at      i64       microseconds since 1970-01-01T00:00:00Z
//! actor            str       "system" | "worker:NAME" | "operator:NAME"
//! correlation_id   16 bytes
//! causation_id     u8 0, or u8 1 + 16 bytes
//! payload          str       canonical JSON (below)
//! prev_hash        32 bytes
//! ```
//!
//! Canonical JSON: no whitespace; object keys sorted by their UTF-8 bytes; strings escaped as
//! `serde_json` escapes them (`"`, `\`, control characters as `\n`, `\t`, ... or `\u00XX`; all
//! other characters as themselves); numbers as `serde_json` prints them (integers in decimal,
//! floats in their shortest round-trip form).
//!
//! This is the only canonical JSON in the workspace: event payloads here, and the MAC input of
//! the repository `config` object (`backstop-repo`) both use [`json_bytes`], so existing ledgers
//! and repositories keep verifying only as long as these bytes never change. The golden vectors
//! in `tests/vectors/` (`canonical-json.*`, `ledger-excerpt.*`, `repository/config`) pin them.
//!
//! The hash of an envelope is SHA3-256 of these bytes. It covers the previous hash, so changing,
//! removing or reordering any event changes every hash after it.

use serde_json::Value;

use crate::envelope::Envelope;

pub const MAGIC: &[u8; 9] = b"BKSTP-EV1";

/// The canonical bytes of an envelope (without its own hash).
pub fn encode(e: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&e.position.to_be_bytes());
    out.extend_from_slice(e.id.as_bytes());
    put_str(&mut out, &e.stream);
    out.extend_from_slice(&e.version.to_be_bytes());
    put_str(&mut out, &e.event_type);
    out.extend_from_slice(&e.schema_version.to_be_bytes());
    out.extend_from_slice(&e.occurred_at.timestamp_micros().to_be_bytes());
    out.extend_from_slice(&e.recorded_at.timestamp_micros().to_be_bytes());
    put_str(&mut out, &e.actor.to_string());
    out.extend_from_slice(e.correlation_id.as_bytes());
    match e.causation_id {
        None => out.push(0),
        Some(c) => {
            out.push(1);
            out.extend_from_slice(c.as_bytes());
        }
    }
    let mut payload = Vec::with_capacity(128);
    write_json(&mut payload, &e.payload);
    put_bytes(&mut out, &payload);
    out.extend_from_slice(&e.prev_hash.0);
    out
}

/// The canonical JSON text of a value.
pub fn json(v: &Value) -> String {
    // Only valid UTF-8 is ever written: keys and strings come from `String`s.
    String::from_utf8(json_bytes(v)).unwrap_or_default()
}

/// The canonical JSON of a value, as bytes (UTF-8).
pub fn json_bytes(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_json(&mut out, v);
    out
}

/// The length in bytes of a value's canonical JSON.
pub fn json_len(v: &Value) -> usize {
    let mut out = Vec::new();
    write_json(&mut out, v);
    out.len()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn write_json(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Object(map) => {
            // Sort here rather than trust the map's order: another crate in the build could turn
            // on serde_json's `preserve_order` feature, which would otherwise change the bytes.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(out, &Value::String(k.clone()));
                out.push(b':');
                write_json(out, v);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(out, item);
            }
            out.push(b']');
        }
        scalar => write_scalar(out, scalar),
    }
}

fn write_scalar(out: &mut Vec<u8>, v: &Value) {
    // Serializing a scalar `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_sorted_and_whitespace_removed() {
        let v = json!({"b": 1, "a": {"z": [1, 2.5, "x\n"], "c": null}, "A": true});
        assert_eq!(
            json(&v),
            r#"{"A":true,"a":{"c":null,"z":[1,2.5,"x\n"]},"b":1}"#
        );
    }

    #[test]
    fn same_value_same_bytes_whatever_the_insertion_order() {
        let a: Value = serde_json::from_str(r#"{"x":1,"y":2}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{ "y" : 2, "x" : 1 }"#).unwrap();
        assert_eq!(json(&a), json(&b));
    }
}
