//! The event vocabulary of Backstop.
//!
//! Everything Backstop does is an immutable event: a backup requested, a chunk uploaded and
//! verified, a key unwrapped, a restore started by an operator. This crate is the bottom layer of
//! the workspace and depends on nothing of ours. It defines:
//!
//! - [`Envelope`]: a committed event as the ledger stores it (identity, position, stream
//!   version, hashes), and [`NewEvent`]: what an appender submits before the ledger assigns the
//!   position, version and hashes.
//! - [`Event`]: the typed payloads of the whole product, each with a stable type name such as
//!   `backup.completed` and a schema version.
//! - [`canonical`]: the byte encoding that the hash chain is computed over. It is documented in
//!   `docs/FORMAT.md` and must never change for a given envelope format version: an auditor
//!   recomputes it offline.
//!
//! Invariants:
//! - Timestamps are truncated to whole microseconds when an event is created, so that the
//!   canonical encoding (microseconds since the epoch) and the stored JSON agree exactly.
//! - Payloads are JSON objects. Their canonical form sorts object keys, whatever the order the
//!   serializer produced.

pub mod canonical;
mod envelope;
pub mod streams;
mod vocabulary;

pub use envelope::{
    Actor, Digest, Envelope, EventError, MAX_PAYLOAD_BYTES, NewEvent, now_micros, uuid_v7,
    uuid_v7_derived,
};
pub use vocabulary::*;
