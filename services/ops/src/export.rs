//! Table exports (`backstop export`): chosen tables of a source as JSON Lines, from one
//! snapshot, sealed with the `export` data key, and read back as standard `.jsonl.gz` files.
//!
//! # Objects (see docs/FORMAT.md, "Table exports")
//! - `exports/<export id>/data/<table number, 4 digits>-<piece, 6 digits>`: sealed blobs
//!   (brotli, AES-256-SIV with the current `export` key), each holding up to [`PIECE_BYTES`] of a
//!   table's JSON Lines; a table's lines are its pieces' plaintexts concatenated in order. A
//!   piece may end mid-line.
//! - `exports/<export id>/index`: a sealed blob (same key) holding [`ExportIndex`] as JSON: the
//!   source, the database, and per table its columns, rows, bytes and pieces (key, sizes, the
//!   sealed object's SHA3-256).
//!
//! # Invariants
//! - The index is written last, after every piece was stored and read back intact: an export
//!   without an index does not exist (`list` and `get` ignore it). A failed export deletes the
//!   pieces it wrote (best effort; what is left is unreferenced and harmless).
//! - Exports are sealed with the `export` key only, never the `database` key: a host given only
//!   the database key cannot read them, and the reverse (R9.4).
//! - `get` checks every piece's SHA3-256 and size, and the table's row and byte counts, before it
//!   renames its `.partial` file into place: a damaged export never yields a file.
//! - The file `get` writes is gzip (RFC 1952) with one member per piece, which every gzip reader
//!   (`gzip -d`, `zcat`, Python's `gzip`, pandas, DuckDB) reads as one stream.
//!
//! Exports are not backups: they have no manifest, so `backstop list`, the backups' retention
//! and `prune` do not see them (prune sweeps only `chunks/`). Their events, schedules and
//! retention are [`crate::export_lifecycle`]'s.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use backstop_repo::{Hash32, KeyPurpose, Repository};
use backstop_sources::pg::logical::{
    DumpSink, ExportColumn, ExportOptions, PartReader, PartStored, QualifiedName, SinkError,
    export_tables,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

use crate::context::SourceSpec;
use crate::error::OpsError;

/// Plaintext bytes per piece: bounds memory (one piece in hand per table being exported or
/// read) and the size of each sealed object.
pub const PIECE_BYTES: usize = 4 << 20;

pub const INDEX_FORMAT: &str = "backstop-export";
pub const INDEX_VERSION: u32 = 1;
pub const EXPORTS_PREFIX: &str = "exports/";

/// Key of an export's index.
pub fn index_key(export_id: &Uuid) -> String {
    format!("{EXPORTS_PREFIX}{export_id}/index")
}

/// One sealed piece of a table's JSON Lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub key: String,
    /// Plaintext (JSON Lines) bytes.
    pub raw_bytes: u64,
    pub sealed_bytes: u64,
    /// SHA3-256 of the sealed object (hex in JSON).
    pub sealed_sha3: Hash32,
}

/// One table of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedTable {
    pub table: QualifiedName,
    pub columns: Vec<ExportColumn>,
    pub rows: u64,
    pub json_bytes: u64,
    pub pieces: Vec<Piece>,
}

/// An export's index (`exports/<id>/index`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportIndex {
    pub format: String,
    pub format_version: u32,
    pub repository_id: Uuid,
    pub export_id: Uuid,
    pub source: String,
    pub database: String,
    pub server_version: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The `export` key that sealed the pieces and this index.
    pub key_id: String,
    pub tables: Vec<ExportedTable>,
}

impl ExportIndex {
    pub fn rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows).sum()
    }

    pub fn sealed_bytes(&self) -> u64 {
        self.tables
            .iter()
            .flat_map(|t| t.pieces.iter())
            .map(|p| p.sealed_bytes)
            .sum()
    }

    /// The table named `name`: `schema.table` as listed, or a bare name unique in the export.
    pub fn table(&self, name: &str) -> Result<&ExportedTable, OpsError> {
        if let Some(t) = self.tables.iter().find(|t| t.table.to_string() == name) {
            return Ok(t);
        }
        let bare: Vec<&ExportedTable> = self
            .tables
            .iter()
            .filter(|t| t.table.name == name)
            .collect();
        match bare.as_slice() {
            [one] => Ok(one),
            [] => Err(OpsError::Invalid(format!(
                "export {} has no table {name:?}; it has: {}",
                self.export_id,
                self.tables
                    .iter()
                    .map(|t| t.table.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            many => Err(OpsError::Invalid(format!(
                "table name {name:?} is ambiguous in export {}: {}; qualify it with its schema",
                self.export_id,
                many.iter()
                    .map(|t| t.table.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

/// Stores each part as sealed pieces and remembers them.
struct PieceSink {
    repo: Repository,
    export_id: Uuid,
    next_table: AtomicU32,
    pieces: Mutex<HashMap<String, Vec<Piece>>>,
    written: Mutex<Vec<String>>,
}

impl PieceSink {
    fn remember_written(&self, key: &str) {
        if let Ok(mut w) = self.written.lock() {
            w.push(key.to_string());
        }
    }
}

#[async_trait]
impl DumpSink for PieceSink {
    async fn put_part(&self, name: &str, mut reader: PartReader) -> Result<PartStored, SinkError> {
        let n = self.next_table.fetch_add(1, Ordering::Relaxed);
        let mut pieces = Vec::new();
        let mut stored = PartStored::default();
        loop {
            let mut buf = Vec::with_capacity(PIECE_BYTES);
            // Fill a whole piece (a read returns what is at hand, often much less).
            while buf.len() < PIECE_BYTES {
                let mut limited = (&mut reader).take((PIECE_BYTES - buf.len()) as u64);
                let got = limited.read_to_end(&mut buf).await?;
                if got == 0 {
                    break;
                }
            }
            if buf.is_empty() {
                break;
            }
            let full = buf.len() == PIECE_BYTES;
            let key = format!(
                "{EXPORTS_PREFIX}{}/data/{n:04}-{:06}",
                self.export_id,
                pieces.len()
            );
            let raw_bytes = buf.len() as u64;
            self.remember_written(&key);
            let obj = self
                .repo
                .put_blob(&key, KeyPurpose::Export, Bytes::from(buf))
                .await
                .map_err(|e| SinkError::with_source(format!("storing {key}"), e))?;
            stored.stored_bytes += obj.size;
            stored.new_bytes += obj.size;
            pieces.push(Piece {
                key,
                raw_bytes,
                sealed_bytes: obj.size,
                sealed_sha3: obj.sha3,
            });
            if !full {
                break;
            }
        }
        match self.pieces.lock() {
            Ok(mut p) => p.insert(name.to_string(), pieces),
            Err(e) => e.into_inner().insert(name.to_string(), pieces),
        };
        Ok(stored)
    }
}

/// Exports `tables` (all when `None`) of `source` into `repo` as export `export_id`; key
/// unwraps are reported as done by `actor` (`operator:alice`, `system`).
pub async fn run_export(
    repo: &Repository,
    source: &SourceSpec,
    export_id: Uuid,
    tables: Option<Vec<String>>,
    actor: &str,
) -> Result<ExportIndex, OpsError> {
    let repo = repo.with_access(actor, format!("export {export_id}"));
    if repo.backend().head(&index_key(&export_id)).await?.is_some() {
        return Err(OpsError::Invalid(format!(
            "export {export_id} already exists; use a new id"
        )));
    }
    // A repository without an export key fails here, before anything is read.
    let key_id = repo.current_key(KeyPurpose::Export)?.key_id;
    let sink = Arc::new(PieceSink {
        repo: repo.clone(),
        export_id,
        next_table: AtomicU32::new(0),
        pieces: Mutex::new(HashMap::new()),
        written: Mutex::new(Vec::new()),
    });
    let options = ExportOptions {
        tables,
        lock_wait_timeout: None,
    };
    let conninfo = &source.pg()?.conninfo;
    let result = export_tables(conninfo, &options, sink.clone()).await;
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            discard(&repo, &sink).await;
            tracing::warn!(export = %export_id, source = %source.name, error = %e, "export failed");
            return Err(e.into());
        }
    };
    let mut pieces = match sink.pieces.lock() {
        Ok(mut p) => std::mem::take(&mut *p),
        Err(e) => std::mem::take(&mut *e.into_inner()),
    };
    let index = ExportIndex {
        format: INDEX_FORMAT.into(),
        format_version: INDEX_VERSION,
        repository_id: repo.id(),
        export_id,
        source: source.name.clone(),
        database: report.database,
        server_version: report.server_version,
        started_at: report.started_at,
        finished_at: report.finished_at,
        key_id,
        tables: report
            .tables
            .into_iter()
            .map(|t| ExportedTable {
                pieces: pieces.remove(&t.part).unwrap_or_default(),
                table: t.table,
                columns: t.columns,
                rows: t.rows,
                json_bytes: t.json_bytes,
            })
            .collect(),
    };
    let body = serde_json::to_vec(&index).map_err(|e| OpsError::Io {
        doing: "encoding the export's index".into(),
        source: std::io::Error::other(e),
    })?;
    if let Err(e) = repo
        .put_blob(
            &index_key(&export_id),
            KeyPurpose::Export,
            Bytes::from(body),
        )
        .await
    {
        discard(&repo, &sink).await;
        return Err(e.into());
    }
    tracing::info!(
        export = %export_id,
        source = %source.name,
        tables = index.tables.len(),
        rows = index.rows(),
        "export stored"
    );
    Ok(index)
}

/// Deletes what a failed export wrote; failures only leave unreferenced objects behind.
async fn discard(repo: &Repository, sink: &PieceSink) {
    let keys = match sink.written.lock() {
        Ok(w) => w.clone(),
        Err(e) => e.into_inner().clone(),
    };
    for r in repo.backend().delete_many(&keys).await {
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not delete a piece of a failed export");
        }
    }
}

/// Reads an export's index.
pub async fn load_index(repo: &Repository, export_id: Uuid) -> Result<ExportIndex, OpsError> {
    let key = index_key(&export_id);
    if repo.backend().head(&key).await?.is_none() {
        return Err(OpsError::NoBackup(format!(
            "no export {export_id} in the repository (`backstop export list` shows them)"
        )));
    }
    let plain = repo.get_blob(&key, None).await?;
    let index: ExportIndex = serde_json::from_slice(&plain).map_err(|e| {
        OpsError::Invalid(format!(
            "the index of export {export_id} is not readable: {e}"
        ))
    })?;
    if index.format != INDEX_FORMAT
        || index.format_version != INDEX_VERSION
        || index.export_id != export_id
        || index.repository_id != repo.id()
    {
        return Err(OpsError::Invalid(format!(
            "{key} is not the index of export {export_id} in this repository (format {} v{}, export {}, repository {})",
            index.format, index.format_version, index.export_id, index.repository_id
        )));
    }
    Ok(index)
}

/// Every export in the repository, oldest first (export ids are UUIDv7).
pub async fn list_exports(repo: &Repository) -> Result<Vec<ExportIndex>, OpsError> {
    let mut ids: Vec<Uuid> = repo
        .backend()
        .list(EXPORTS_PREFIX)
        .await?
        .into_iter()
        .filter_map(|o| {
            o.key
                .strip_prefix(EXPORTS_PREFIX)?
                .strip_suffix("/index")?
                .parse()
                .ok()
        })
        .collect();
    ids.sort();
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(load_index(repo, id).await?);
    }
    Ok(out)
}

/// What `get` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableWritten {
    pub table: QualifiedName,
    pub path: PathBuf,
    pub rows: u64,
    pub json_bytes: u64,
    pub gzip_bytes: u64,
}

/// Writes one table of an export to `out` as `.jsonl.gz`, checked, via `<out>.partial`.
pub async fn export_get(
    repo: &Repository,
    export_id: Uuid,
    table: &str,
    out: &Path,
    actor: &str,
) -> Result<TableWritten, OpsError> {
    let repo = repo.with_access(actor, format!("export get {export_id}"));
    let index = load_index(&repo, export_id).await?;
    let t = index.table(table)?.clone();
    let partial = {
        let mut s = out.as_os_str().to_owned();
        s.push(".partial");
        PathBuf::from(s)
    };
    let result = write_table(&repo, &t, &partial).await;
    match result {
        Ok(gzip_bytes) => {
            tokio::fs::rename(&partial, out)
                .await
                .map_err(|e| io(format!("renaming {} into place", partial.display()), e))?;
            Ok(TableWritten {
                table: t.table,
                path: out.to_path_buf(),
                rows: t.rows,
                json_bytes: t.json_bytes,
                gzip_bytes,
            })
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            Err(e)
        }
    }
}

fn io(doing: String, source: std::io::Error) -> OpsError {
    OpsError::Io { doing, source }
}

async fn write_table(repo: &Repository, t: &ExportedTable, path: &Path) -> Result<u64, OpsError> {
    let mut file =
        std::fs::File::create(path).map_err(|e| io(format!("creating {}", path.display()), e))?;
    let (mut rows, mut bytes, mut written) = (0u64, 0u64, 0u64);
    let mut members = 0usize;
    for p in &t.pieces {
        let plain = repo.get_blob(&p.key, Some(p.sealed_sha3)).await?;
        if plain.len() as u64 != p.raw_bytes {
            return Err(OpsError::Invalid(format!(
                "{} holds {} bytes, the export's index says {}",
                p.key,
                plain.len(),
                p.raw_bytes
            )));
        }
        rows += plain.iter().filter(|&&b| b == b'\n').count() as u64;
        bytes += plain.len() as u64;
        let member = tokio::task::spawn_blocking(move || gzip_member(&plain))
            .await
            .map_err(|e| io("compressing".into(), std::io::Error::other(e)))?;
        file.write_all(&member)
            .map_err(|e| io(format!("writing {}", path.display()), e))?;
        written += member.len() as u64;
        members += 1;
    }
    if members == 0 {
        // An empty table is still a valid (empty) gzip stream.
        let member = gzip_member(&[]);
        file.write_all(&member)
            .map_err(|e| io(format!("writing {}", path.display()), e))?;
        written += member.len() as u64;
    }
    if rows != t.rows || bytes != t.json_bytes {
        return Err(OpsError::RowCounts {
            tolerance_percent: 0.0,
            mismatches: format!(
                "{}: read {rows} rows / {bytes} bytes, the export recorded {} rows / {} bytes",
                t.table, t.rows, t.json_bytes
            ),
        });
    }
    file.sync_all()
        .map_err(|e| io(format!("syncing {}", path.display()), e))?;
    Ok(written)
}

/// One gzip member (RFC 1952): header without name or time, raw deflate, CRC-32, size mod 2^32.
pub fn gzip_member(data: &[u8]) -> Vec<u8> {
    let deflated = miniz_oxide::deflate::compress_to_vec(data, 6);
    let mut out = Vec::with_capacity(deflated.len() + 18);
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    out.extend_from_slice(&deflated);
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}
