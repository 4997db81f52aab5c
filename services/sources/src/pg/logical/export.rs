//! Table exports: chosen tables as JSON Lines, every table read in one snapshot.
//!
//! # Format of a table's part
//! One JSON object per row and per line (`\n`-terminated, UTF-8), as PostgreSQL's `row_to_json`
//! writes it: keys are the column names in column order, values keep their types' exact text:
//! - `numeric` is a JSON number with every digit the server stores (`123.4500`), never rounded
//!   through a float; `NaN` and infinities are strings;
//! - `timestamptz` is ISO 8601 with its offset, in UTC (`"2024-03-01T14:30:00.123456+00:00"`),
//!   `timestamp`, `date`, `time` ISO 8601 without a zone;
//! - `bytea` is a string in PostgreSQL's hex form (`"\\x00ff"`);
//! - arrays are JSON arrays (nested for more dimensions), `jsonb` and `json` values inline;
//! - `double precision`/`real` are the shortest text that reads back to the same value
//!   (`extra_float_digits = 3`), `interval` in the `postgres` style, anything else its text form.
//!
//! Loading a line back is `INSERT INTO t SELECT * FROM json_populate_record(NULL::t, $1::json)`,
//! which reads every one of these forms back into the column's type, with two known
//! differences: a `json` value's raw newlines (whitespace between tokens) come back as spaces,
//! and a JSON `null` held by a `json`/`jsonb` column comes back as SQL `NULL` (`row_to_json`
//! writes both as `null`).
//!
//! # Consistency
//! One `REPEATABLE READ READ ONLY` transaction lists the tables, locks them all
//! (`ACCESS SHARE`, so none can be dropped or rewritten meanwhile) and copies them one after the
//! other: every table is read in the same snapshot, so the export is one instant of the database.
//! Tables with a primary key are written in key order (the same data gives the same bytes).
//!
//! # COPY text
//! The rows come through `COPY (SELECT row_to_json(t) ...) TO STDOUT` (text format), which
//! escapes backslashes and control characters; [`CopyTextDecoder`] undoes that. A JSON text
//! holds no raw control characters except whitespace between tokens (a `json` column keeps the
//! whitespace it was written with), so an escaped newline or carriage return can only be such
//! whitespace: it becomes a space, which keeps one row per line and the JSON's meaning.
//!
//! Invariant: a failure (a query, the sink) ends the part in a read error for the sink, never in
//! a clean end of file, and abandons the whole export.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use super::catalog::{self, COPY_SESSION, NOTICE_DEAD_CLIENT};
use super::dump::{copy_out, resolve_tables};
use super::restore::exec;
use super::stream::part_stream;
use super::{DumpSink, PartStored, TableKind};
use crate::error::SourceError;
use crate::pg::conninfo::ConnInfo;
use crate::pg::names::{QualifiedName, quote_ident};

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// These tables (`schema.table`, or a bare name unique across schemas; a partitioned table
    /// stands for its partitions). `None`: every user table.
    pub tables: Option<Vec<String>>,
    /// Give up when a table lock cannot be had within this time. `None`: wait.
    pub lock_wait_timeout: Option<Duration>,
}

/// A column of an exported table: its name and type as `format_type` spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
}

/// One exported table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableExported {
    pub table: QualifiedName,
    /// The part holding its JSON Lines ([`export_part_name`]).
    pub part: String,
    pub columns: Vec<ExportColumn>,
    /// Rows (lines) in the snapshot.
    pub rows: u64,
    /// Bytes of JSON Lines.
    pub json_bytes: u64,
    pub stored: PartStored,
    pub duration_ms: u64,
}

/// What an export read, and from where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReport {
    pub database: String,
    pub server_version: String,
    pub server_version_num: u32,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// In the order they were exported (by name).
    pub tables: Vec<TableExported>,
}

/// Name of a table's JSON Lines part.
pub fn export_part_name(table: &QualifiedName) -> String {
    format!("jsonl/{table}")
}

/// Exports the chosen tables of the database at `conninfo` into `sink`, one part per table,
/// all read in one snapshot.
pub async fn export_tables(
    conninfo: &str,
    options: &ExportOptions,
    sink: Arc<dyn DumpSink>,
) -> Result<ExportReport, SourceError> {
    let started_at = Utc::now();
    let ci = ConnInfo::parse(conninfo)?;
    let mut conn = ci.connect_source().await?;
    exec(
        &mut conn,
        &ci,
        "asking the server to notice a client that went away",
        NOTICE_DEAD_CLIENT.to_string(),
    )
    .await?;
    let lock_timeout = options
        .lock_wait_timeout
        .map(|d| format!("SET lock_timeout = '{}ms'", d.as_millis().max(1)))
        .unwrap_or_else(|| "SET lock_timeout = 0".into());
    // COPY_SESSION fixes the text forms (DateStyle, floats, no row security); UTC makes every
    // timestamptz read the same whatever the server's zone.
    exec(
        &mut conn,
        &ci,
        "opening the export's snapshot transaction",
        format!(
            "{COPY_SESSION}; SET TimeZone = 'UTC'; {lock_timeout}; \
             BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        ),
    )
    .await?;
    let info = catalog::server_info(&mut conn)
        .await
        .map_err(|e| SourceError::query("reading the server version", &ci, e))?;
    let all = catalog::list_tables(&mut conn)
        .await
        .map_err(|e| SourceError::query("listing tables", &ci, e))?;
    let selected: BTreeSet<QualifiedName> = match &options.tables {
        Some(names) => resolve_tables(names, &all)?,
        None => all.iter().map(|t| t.name.clone()).collect(),
    };
    // Partitioned tables have no rows of their own: their partitions are exported.
    let tables: Vec<QualifiedName> = all
        .iter()
        .filter(|t| t.kind == TableKind::Table && selected.contains(&t.name))
        .map(|t| t.name.clone())
        .collect();
    let lockable: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    for chunk in lockable.chunks(500) {
        exec(
            &mut conn,
            &ci,
            "locking the tables to export (ACCESS SHARE)",
            format!("LOCK TABLE {} IN ACCESS SHARE MODE", chunk.join(", ")),
        )
        .await?;
    }
    tracing::info!(database = %info.database, tables = tables.len(), "export started");

    let mut out = Vec::with_capacity(tables.len());
    for table in &tables {
        out.push(export_table(&mut conn, &ci, table, &*sink).await?);
    }
    exec(
        &mut conn,
        &ci,
        "ending the export's transaction",
        "COMMIT".into(),
    )
    .await?;
    let _ = conn.close().await;
    let finished_at = Utc::now();
    tracing::info!(
        database = %info.database,
        tables = out.len(),
        rows = out.iter().map(|t| t.rows).sum::<u64>(),
        "export finished"
    );
    Ok(ExportReport {
        database: info.database,
        server_version: info.server_version,
        server_version_num: info.server_version_num,
        started_at,
        finished_at,
        tables: out,
    })
}

/// The columns (as `COPY` and `row_to_json` see them) and the primary key of a table.
async fn columns_and_key(
    conn: &mut PgConnection,
    table: &QualifiedName,
) -> Result<(Vec<ExportColumn>, Vec<String>), sqlx::Error> {
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod) \
         FROM pg_catalog.pg_attribute a \
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(table.quoted())
    .fetch_all(&mut *conn)
    .await?;
    let key: Vec<(String,)> = sqlx::query_as(
        "SELECT a.attname::text FROM pg_catalog.pg_index i \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
         WHERE i.indrelid = $1::regclass AND i.indisprimary \
         ORDER BY array_position(i.indkey::int2[], a.attnum)",
    )
    .bind(table.quoted())
    .fetch_all(&mut *conn)
    .await?;
    Ok((
        columns
            .into_iter()
            .map(|(name, type_name)| ExportColumn { name, type_name })
            .collect(),
        key.into_iter().map(|(k,)| k).collect(),
    ))
}

async fn export_table(
    conn: &mut PgConnection,
    ci: &ConnInfo,
    table: &QualifiedName,
    sink: &dyn DumpSink,
) -> Result<TableExported, SourceError> {
    let started = Instant::now();
    let (columns, key) = columns_and_key(conn, table)
        .await
        .map_err(|e| SourceError::query(format!("reading the columns of {table}"), ci, e))?;
    let order = if key.is_empty() {
        String::new()
    } else {
        format!(
            " ORDER BY {}",
            key.iter()
                .map(|k| format!("r.{}", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // `r.*`, not `r`: a column named `r` would win over the whole-row reference.
    let statement = format!(
        "COPY (SELECT pg_catalog.row_to_json(r.*) FROM ONLY {} r{order}) TO STDOUT",
        table.quoted()
    );
    let part = export_part_name(table);
    let (writer, reader) = part_stream();
    let doing = format!("exporting {table}");
    // The COPY runs beside the sink (the sink reads what COPY writes); both end before the next
    // table, so the one connection is free again.
    let (stored, produced) = tokio::join!(
        sink.put_part(&part, Box::pin(reader)),
        copy_out(
            conn,
            ci,
            &statement,
            writer,
            &doing,
            Some(CopyTextDecoder::default()),
        )
    );
    let (stored, (rows, json_bytes)) = match (stored, produced) {
        (Ok(s), Ok(p)) => (s, p),
        (Err(source), Ok(_)) | (Err(source), Err(SourceError::SinkStoppedEarly { .. })) => {
            return Err(SourceError::Sink { part, source });
        }
        (_, Err(e)) => return Err(e),
    };
    tracing::debug!(%table, rows, json_bytes, "table exported");
    Ok(TableExported {
        table: table.clone(),
        part,
        columns,
        rows,
        json_bytes,
        stored,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Undoes COPY's text-format escaping of a one-column output, chunk by chunk (an escape may be
/// split between chunks). See the module docs for why `\n` and `\r` become spaces.
#[derive(Debug, Default)]
pub struct CopyTextDecoder {
    backslash: bool,
}

impl CopyTextDecoder {
    /// Appends the decoded form of `input` to `out`; returns the rows (line ends) it held.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> u64 {
        let mut rows = 0;
        out.reserve(input.len());
        for &b in input {
            if self.backslash {
                self.backslash = false;
                out.push(match b {
                    b'n' | b'r' => b' ',
                    b't' => b'\t',
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'v' => 0x0b,
                    other => other,
                });
            } else if b == b'\\' {
                self.backslash = true;
            } else {
                if b == b'\n' {
                    rows += 1;
                }
                out.push(b);
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_split_across_chunks() {
        let mut d = CopyTextDecoder::default();
        let mut out = Vec::new();
        let mut rows = d.decode(br#"{"b":"\\\\x00ff","s":"a\\"#, &mut out);
        rows += d.decode(b"\"b\"}\n{\"j\":{\\n\"k\":1}}\n", &mut out);
        assert_eq!(rows, 2);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"b\":\"\\\\x00ff\",\"s\":\"a\\\"b\"}\n{\"j\":{ \"k\":1}}\n"
        );
    }
}
