//! Logical PostgreSQL backups: one consistent snapshot, streamed as named parts; restores of the
//! whole database or of chosen tables.
//!
//! # Parts of a dump
//! A dump is a set of named parts, each an uncompressed byte stream handed to a [`DumpSink`] as
//! it is produced (never compressed here: the repository chunks, deduplicates and compresses).
//! Part names are opaque UTF-8 strings, unique within a dump; the [`DumpReport`] lists them all.
//! - `schema`: `pg_dump --section=pre-data --section=post-data -Fc -Z0` (custom format), taken
//!   in the dump's snapshot. Custom format keeps a table of contents with dependencies, which is
//!   what lets a restore pick tables and everything that belongs to them.
//! - `data/<schema>.<table>` (the table's [`QualifiedName`] display form): `COPY ... TO STDOUT`
//!   in text format, one row per line (embedded newlines are escaped by COPY), taken in the
//!   snapshot. Partitioned tables have no data of their own: their partitions have parts.
//! - `sequences`: one `SELECT pg_catalog.setval('"schema"."seq"', value, is_called);` line per
//!   sequence.
//! - `large-objects` (only when the database has large objects and the dump is not filtered):
//!   `pg_dump --section=data --exclude-table-data='*.*' -Fc -Z0`, i.e. the large objects' data
//!   (their metadata is in `schema`).
//!
//! # Consistency
//! A coordinator transaction (`REPEATABLE READ READ ONLY`) exports its snapshot and holds an
//! `ACCESS SHARE` lock on every table dumped until the end, so no table can be dropped or
//! rewritten mid-dump; `pg_dump --snapshot` and every `COPY` worker (`SET TRANSACTION SNAPSHOT`)
//! read that same snapshot, so per-table row counts (counted as the rows stream past) are those of
//! one instant. Sequence values are the exception, as in `pg_dump`: sequences are not
//! transactional, so their values are read at dump time, never lower than the snapshot needs.
//!
//! # Restore
//! Schema before data, constraints and indexes after: `pg_restore --section=pre-data`, parallel
//! `COPY ... FROM STDIN` (`jobs` at once, each table truncated and loaded with `FREEZE` in one
//! transaction), large objects, sequences, then `pg_restore --section=post-data -j jobs`. With
//! chosen tables, a `pg_restore -L` list keeps exactly those tables, the sequences they own or
//! use, their defaults, constraints, indexes, triggers, rules, policies, comments and grants, and
//! every non-relation object (schemas, types, functions, extensions) that does not depend on a
//! table left out; foreign keys only when both ends are restored.

mod catalog;
mod digest;
mod dump;
mod export;
mod restore;
mod stream;
mod toc;

use std::pin::Pin;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

pub use crate::error::SourceError;
pub use crate::pg::names::QualifiedName;
pub use digest::{TableDigest, row_counts, table_digests};
pub use dump::{DumpOptions, dump};
pub use export::{
    CopyTextDecoder, ExportColumn, ExportOptions, ExportReport, TableExported, export_part_name,
    export_tables,
};
pub use restore::{RestoreOptions, RestoreReport, TableRestored, restore};

/// Parses the header and table of contents of a custom-format `pg_dump` archive, as a restore
/// does, and returns the number of entries. It exists for fuzzing (the `pg_toc` target in
/// fuzz/): the parser itself stays private to this module.
pub fn parse_toc(data: &[u8]) -> Result<usize, SourceError> {
    let toc = toc::parse(data)?;
    Ok(toc.entries.len())
}

/// A part's byte stream.
pub type PartReader = Pin<Box<dyn AsyncRead + Send>>;

/// Name of the schema part (custom-format `pg_dump` archive, pre-data and post-data).
pub const SCHEMA_PART: &str = "schema";
/// Name of the sequences part (`setval` lines).
pub const SEQUENCES_PART: &str = "sequences";
/// Name of the large-objects part (custom-format `pg_dump` archive of large-object data).
pub const LARGE_OBJECTS_PART: &str = "large-objects";

/// Name of a table's data part.
pub fn data_part_name(table: &QualifiedName) -> String {
    format!("data/{table}")
}

/// A failure of the caller's storage, as the sink or source reports it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl SinkError {
    pub fn new(message: impl Into<String>) -> SinkError {
        SinkError {
            message: message.into(),
            source: None,
        }
    }

    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> SinkError {
        SinkError {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

impl From<std::io::Error> for SinkError {
    fn from(e: std::io::Error) -> SinkError {
        SinkError::with_source(e.to_string(), e)
    }
}

/// What the sink did with one part; whatever it reports is copied into the [`DumpReport`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartStored {
    /// Bytes after compression and sealing that this part occupies in the repository.
    pub stored_bytes: u64,
    /// Of those, bytes that were new (not deduplicated against chunks already stored).
    pub new_bytes: u64,
}

/// Where a dump's parts go (implemented by the repository glue).
///
/// `put_part` is called concurrently, up to `jobs + 1` parts at a time, each on its own task.
/// It must read the reader to its end and return only once the part is durably stored; a read
/// error means the part is incomplete and must not be recorded as good. A part is never stored
/// twice within one dump.
#[async_trait]
pub trait DumpSink: Send + Sync {
    /// Consumes one named part as it is produced (streamed: never a full local copy).
    async fn put_part(&self, name: &str, reader: PartReader) -> Result<PartStored, SinkError>;
}

/// Where a restore reads a dump's parts from (implemented by the repository glue).
///
/// `open_part` is called concurrently, up to `jobs` parts at a time. The reader must fail (not
/// end early) if the stored part is damaged.
#[async_trait]
pub trait DumpSource: Send + Sync {
    /// Opens one named part for reading.
    async fn open_part(&self, name: &str) -> Result<PartReader, SinkError>;

    /// Opens a part whose every byte the caller checks end to end once it is written out (a
    /// base backup that `pg_verifybackup` checks against its manifest). A source may then skip
    /// a check of its own that only repeats that one (the repository's recomputed chunk ids),
    /// never one that nothing else makes (authentication, sizes, completeness). The default is
    /// [`DumpSource::open_part`].
    async fn open_part_checked_downstream(&self, name: &str) -> Result<PartReader, SinkError> {
        self.open_part(name).await
    }

    /// Checks that a part is present and readable without reading it (used by dry runs).
    /// The default opens the part and drops the reader; a repository can check its objects'
    /// presence more cheaply.
    async fn check_part(&self, name: &str) -> Result<(), SinkError> {
        self.open_part(name).await.map(drop)
    }
}

/// The kind of a table in the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    /// An ordinary table (possibly a partition): has rows and a data part.
    Table,
    /// A partitioned table: no rows of its own; its partitions are listed separately.
    Partitioned,
}

/// One table of a dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDump {
    pub table: QualifiedName,
    pub kind: TableKind,
    /// The partitioned table this table is a partition of, if any.
    pub partition_of: Option<QualifiedName>,
    /// The data part, or `None` for partitioned tables and tables whose data was excluded.
    pub part: Option<String>,
    /// Rows in the snapshot (counted as they streamed past).
    pub rows: u64,
    /// Bytes of COPY text.
    pub bytes: u64,
    pub duration_ms: u64,
}

/// A sequence's state at dump time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceState {
    pub sequence: QualifiedName,
    pub last_value: i64,
    pub is_called: bool,
}

/// One part as produced and stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartReport {
    pub name: String,
    /// Uncompressed bytes streamed into the sink.
    pub raw_bytes: u64,
    pub stored: PartStored,
    pub duration_ms: u64,
}

/// Everything a restore needs besides the parts themselves, and what an operator wants to see of
/// a dump. Serializable: the repository keeps it in the backup's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpReport {
    /// Version of this description (1).
    pub format: u32,
    pub database: String,
    /// `server_version` of the source, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub server_version: String,
    pub server_version_num: u32,
    pub pg_dump_version: String,
    /// The source database's encoding (`UTF8`, ...); COPY text is always in UTF8 client encoding.
    pub encoding: String,
    /// The exported snapshot id all parts were read in.
    pub snapshot: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// True when the dump was limited to chosen tables ([`DumpOptions::tables`]): a restore then
    /// restores only those tables.
    pub filtered: bool,
    /// Tables, largest first.
    pub tables: Vec<TableDump>,
    pub sequences: Vec<SequenceState>,
    /// Number of large objects (their data is in the `large-objects` part when non-zero).
    pub large_objects: u64,
    /// Every part, in the order they finished.
    pub parts: Vec<PartReport>,
    /// Sum of the parts' raw bytes.
    pub raw_bytes: u64,
    /// Sum of rows over all tables.
    pub total_rows: u64,
}

impl DumpReport {
    /// Rows per table as recorded in the snapshot.
    pub fn row_counts(&self) -> std::collections::BTreeMap<QualifiedName, u64> {
        self.tables
            .iter()
            .filter(|t| t.kind == TableKind::Table)
            .map(|t| (t.table.clone(), t.rows))
            .collect()
    }

    /// Names of every part, in the order they were stored.
    pub fn part_names(&self) -> Vec<String> {
        self.parts.iter().map(|p| p.name.clone()).collect()
    }

    /// Bytes the repository stored for this dump, and how many of them were new.
    pub fn stored_bytes(&self) -> (u64, u64) {
        self.parts.iter().fold((0, 0), |(s, n), p| {
            (s + p.stored.stored_bytes, n + p.stored.new_bytes)
        })
    }
}
