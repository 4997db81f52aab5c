//! The logical dump: one exported snapshot, schema by `pg_dump`, data by parallel `COPY`.
//!
//! Invariants (see the module above for the parts' formats):
//! - The coordinator's transaction stays open, holding the snapshot and an `ACCESS SHARE` lock on
//!   every table dumped, until every part is stored; every reader imports that snapshot.
//! - Tables are copied largest first by `jobs` workers, each on its own connection; the schema
//!   dump runs beside them. Memory is bounded per part (see `stream`).
//! - The first failure (a query, a tool, the sink) abandons the whole dump: the remaining tasks
//!   are aborted, their connections and children dropped, and the error returned. A part that
//!   failed mid-stream ends in a read error for the sink, never in a clean end-of-file.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use chrono::Utc;
use futures::StreamExt;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use super::catalog::{self, COPY_SESSION, CatalogTable, NOTICE_DEAD_CLIENT};
use super::export::CopyTextDecoder;
use super::stream::{BATCH, PartWriter, ReaderGone, count_newlines, part_stream};
use super::{
    DumpReport, DumpSink, LARGE_OBJECTS_PART, PartReport, SCHEMA_PART, SEQUENCES_PART,
    SequenceState, TableDump, TableKind, data_part_name,
};
use crate::error::SourceError;
use crate::pg::conninfo::ConnInfo;
use crate::pg::names::{QualifiedName, ResolveError, quote_literal, resolve};
use crate::pg::tools::{self, Tool};

/// How to dump.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// Parallel `COPY` workers (connections), at least 1. Default 2.
    pub jobs: usize,
    /// Dump only these tables (`schema.table`, or a bare name unique across schemas; a
    /// partitioned table brings its partitions). The schema archive stays whole, but a restore
    /// of this dump restores only these tables. `None`: every table.
    pub tables: Option<Vec<String>>,
    /// Tables whose definition is dumped but not their rows (restored empty).
    pub exclude_table_data: Vec<String>,
    /// Directory of `pg_dump`; default: `BACKSTOP_PG_BIN`, `PATH`, `/usr/lib/postgresql/*/bin`.
    pub pg_bin_dir: Option<PathBuf>,
    /// Give up when a table lock cannot be had within this time (a long `ALTER TABLE` holding
    /// it, say). `None`: wait.
    pub lock_wait_timeout: Option<Duration>,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            jobs: 2,
            tables: None,
            exclude_table_data: Vec::new(),
            pg_bin_dir: None,
            lock_wait_timeout: None,
        }
    }
}

/// One table to copy.
struct CopyJob {
    table: QualifiedName,
}

/// What a finished task produced.
enum Done {
    Part(PartReport),
    Table(PartReport, QualifiedName, u64, u64),
}

async fn exec(
    conn: &mut PgConnection,
    ci: &ConnInfo,
    doing: &str,
    sql: String,
) -> Result<(), SourceError> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
        .map(drop)
        .map_err(|e| SourceError::query(doing, ci, e))
}

pub(crate) fn resolve_tables(
    names: &[String],
    all: &[CatalogTable],
) -> Result<BTreeSet<QualifiedName>, SourceError> {
    let known: Vec<QualifiedName> = all.iter().map(|t| t.name.clone()).collect();
    let mut out = BTreeSet::new();
    for n in names {
        let t = resolve(n, &known).map_err(|e| resolve_error(e, &known))?;
        out.insert(t);
    }
    // A partitioned table stands for all of its partitions, at every level.
    loop {
        let before = out.len();
        for t in all {
            if let Some(p) = &t.partition_of
                && out.contains(p)
            {
                out.insert(t.name.clone());
            }
        }
        if out.len() == before {
            break;
        }
    }
    Ok(out)
}

pub(crate) fn resolve_error(e: ResolveError, known: &[QualifiedName]) -> SourceError {
    match e {
        ResolveError::NotFound(name) => {
            let sample: Vec<String> = known.iter().take(12).map(|t| t.to_string()).collect();
            let hint = if sample.is_empty() {
                " (it has no tables)".to_string()
            } else {
                format!(
                    "; its tables are: {}{}",
                    sample.join(", "),
                    if known.len() > sample.len() {
                        format!(" and {} more", known.len() - sample.len())
                    } else {
                        String::new()
                    }
                )
            };
            SourceError::UnknownTable { name, hint }
        }
        ResolveError::Ambiguous(name, found) => SourceError::AmbiguousTable {
            name,
            candidates: found
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        },
    }
}

/// Dumps the database at `conninfo` into `sink`, consistently, in parallel.
pub async fn dump(
    conninfo: &str,
    options: &DumpOptions,
    sink: Arc<dyn DumpSink>,
) -> Result<DumpReport, SourceError> {
    let started_at = Utc::now();
    let t0 = Instant::now();
    let ci = ConnInfo::parse(conninfo)?;
    let jobs = options.jobs.max(1);

    // 1. The coordinator: snapshot, catalog, locks.
    let mut coord = ci.connect_source().await?;
    // Its own statement: a query before BEGIN in one batch would open the transaction.
    exec(
        &mut coord,
        &ci,
        "asking the server to notice a client that went away",
        NOTICE_DEAD_CLIENT.to_string(),
    )
    .await?;
    let lock_timeout = options
        .lock_wait_timeout
        .map(|d| format!("SET lock_timeout = '{}ms'", d.as_millis().max(1)))
        .unwrap_or_else(|| "SET lock_timeout = 0".into());
    exec(
        &mut coord,
        &ci,
        "opening the snapshot transaction",
        format!(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; {lock_timeout}; \
             BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        ),
    )
    .await?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_catalog.pg_export_snapshot()")
        .fetch_one(&mut coord)
        .await
        .map_err(|e| SourceError::query("exporting the snapshot", &ci, e))?;
    let info = catalog::server_info(&mut coord)
        .await
        .map_err(|e| SourceError::query("reading the server version", &ci, e))?;
    let all_tables = catalog::list_tables(&mut coord)
        .await
        .map_err(|e| SourceError::query("listing tables", &ci, e))?;

    let selected: BTreeSet<QualifiedName> = match &options.tables {
        Some(names) => resolve_tables(names, &all_tables)?,
        None => all_tables.iter().map(|t| t.name.clone()).collect(),
    };
    let no_data = resolve_tables(&options.exclude_table_data, &all_tables)?;
    let filtered = options.tables.is_some();
    let mut tables: Vec<CatalogTable> = all_tables
        .into_iter()
        .filter(|t| selected.contains(&t.name))
        .collect();
    // Largest first: the long copies start first, so the workers finish together.
    tables.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.name.cmp(&b.name)));

    // Hold every table still until the end, as pg_dump does: no DROP or rewrite mid-dump.
    let lockable: Vec<String> = tables.iter().map(|t| t.name.quoted()).collect();
    for chunk in lockable.chunks(500) {
        exec(
            &mut coord,
            &ci,
            "locking the tables to dump (ACCESS SHARE)",
            format!("LOCK TABLE {} IN ACCESS SHARE MODE", chunk.join(", ")),
        )
        .await?;
    }

    let sequences = read_sequences(&mut coord, &ci).await?;
    let large_objects: i64 = if filtered {
        0
    } else {
        sqlx::query_scalar("SELECT count(*) FROM pg_catalog.pg_largeobject_metadata")
            .fetch_one(&mut coord)
            .await
            .map_err(|e| SourceError::query("counting large objects", &ci, e))?
    };
    let pg_dump = tools::locate(
        "pg_dump",
        options.pg_bin_dir.as_deref(),
        info.server_version_num / 10_000,
    )
    .await?;
    tracing::info!(
        database = %info.database,
        %snapshot,
        tables = tables.len(),
        sequences = sequences.len(),
        large_objects,
        jobs,
        "dump started"
    );

    // 2. The tasks: schema (and large objects), sequences, and the COPY workers.
    let mut set: JoinSet<Result<Vec<Done>, SourceError>> = JoinSet::new();
    {
        let (tool, ci, sink, snapshot) =
            (pg_dump.clone(), ci.clone(), sink.clone(), snapshot.clone());
        let lock_wait = options.lock_wait_timeout;
        let server_version_num = info.server_version_num;
        set.spawn(async move {
            let mut done = Vec::new();
            let mut cmd = tool.command();
            cmd.args([
                "--format=custom",
                "--compress=0",
                "--section=pre-data",
                "--section=post-data",
                &format!("--snapshot={snapshot}"),
            ]);
            if let Some(d) = lock_wait {
                cmd.arg(format!("--lock-wait-timeout={}", d.as_millis().max(1)));
            }
            ci.apply_to_tool(&mut cmd);
            if let Some(o) = catalog::notice_dead_client_options(server_version_num) {
                cmd.env("PGOPTIONS", o);
            }
            done.push(Done::Part(
                tool_part(&tool, cmd, SCHEMA_PART, &*sink).await?,
            ));
            if large_objects > 0 {
                let mut cmd = tool.command();
                cmd.args([
                    "--format=custom",
                    "--compress=0",
                    "--section=data",
                    "--exclude-table-data=*.*",
                    &format!("--snapshot={snapshot}"),
                ]);
                ci.apply_to_tool(&mut cmd);
                if let Some(o) = catalog::notice_dead_client_options(server_version_num) {
                    cmd.env("PGOPTIONS", o);
                }
                done.push(Done::Part(
                    tool_part(&tool, cmd, LARGE_OBJECTS_PART, &*sink).await?,
                ));
            }
            Ok(done)
        });
    }
    {
        let text: String = sequences
            .iter()
            .map(|s| setval_line(&s.sequence, s.last_value, s.is_called))
            .collect();
        let sink = sink.clone();
        set.spawn(async move {
            let started = Instant::now();
            let (mut w, r) = part_stream();
            let raw_bytes = text.len() as u64;
            let writer = async move {
                w.write_bytes(Bytes::from(text)).await?;
                w.finish().await
            };
            let (stored, written) =
                tokio::join!(sink.put_part(SEQUENCES_PART, Box::pin(r)), writer);
            let stored = stored.map_err(|source| SourceError::Sink {
                part: SEQUENCES_PART.into(),
                source,
            })?;
            written.map_err(|ReaderGone| SourceError::SinkStoppedEarly {
                part: SEQUENCES_PART.into(),
            })?;
            Ok(vec![Done::Part(PartReport {
                name: SEQUENCES_PART.into(),
                raw_bytes,
                stored,
                duration_ms: started.elapsed().as_millis() as u64,
            })])
        });
    }
    let queue: Arc<Mutex<VecDeque<CopyJob>>> = Arc::new(Mutex::new(
        tables
            .iter()
            .filter(|t| t.kind == TableKind::Table && !no_data.contains(&t.name))
            .map(|t| CopyJob {
                table: t.name.clone(),
            })
            .collect(),
    ));
    let workers = jobs.min(queue.lock().map(|q| q.len()).unwrap_or(0));
    for _ in 0..workers {
        let (ci, sink, snapshot, queue) =
            (ci.clone(), sink.clone(), snapshot.clone(), queue.clone());
        set.spawn(async move { copy_worker(ci, snapshot, queue, sink).await });
    }

    // 3. Gather; the first error aborts everything still running.
    let mut parts: Vec<PartReport> = Vec::new();
    let mut counted: BTreeMap<QualifiedName, (u64, u64, u64)> = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let result = match joined {
            Ok(r) => r,
            Err(e) => Err(SourceError::Task(e.to_string())),
        };
        match result {
            Ok(done) => {
                for d in done {
                    match d {
                        Done::Part(p) => parts.push(p),
                        Done::Table(p, table, rows, bytes) => {
                            counted.insert(table, (rows, bytes, p.duration_ms));
                            parts.push(p);
                        }
                    }
                }
            }
            Err(e) => {
                set.abort_all();
                tracing::warn!(error = %e, "dump failed");
                return Err(e);
            }
        }
    }
    exec(
        &mut coord,
        &ci,
        "ending the snapshot transaction",
        "COMMIT".into(),
    )
    .await?;
    let _ = coord.close().await;

    let table_reports: Vec<TableDump> = tables
        .iter()
        .map(|t| {
            let (rows, bytes, duration_ms) = counted.get(&t.name).copied().unwrap_or((0, 0, 0));
            TableDump {
                table: t.name.clone(),
                kind: t.kind,
                partition_of: t.partition_of.clone(),
                part: counted
                    .contains_key(&t.name)
                    .then(|| data_part_name(&t.name)),
                rows,
                bytes,
                duration_ms,
            }
        })
        .collect();
    let raw_bytes = parts.iter().map(|p| p.raw_bytes).sum();
    let total_rows = table_reports.iter().map(|t| t.rows).sum();
    let finished_at = Utc::now();
    let report = DumpReport {
        format: 1,
        database: info.database,
        server_version: info.server_version,
        server_version_num: info.server_version_num,
        pg_dump_version: pg_dump.version.clone(),
        encoding: info.encoding,
        snapshot,
        started_at,
        finished_at,
        duration_ms: t0.elapsed().as_millis() as u64,
        filtered,
        tables: table_reports,
        sequences,
        large_objects: large_objects.max(0) as u64,
        parts,
        raw_bytes,
        total_rows,
    };
    tracing::info!(
        database = %report.database,
        raw_bytes = report.raw_bytes,
        rows = report.total_rows,
        ms = report.duration_ms,
        "dump finished"
    );
    Ok(report)
}

/// `SELECT pg_catalog.setval('"s"."q"', v, b);` and a newline.
pub(crate) fn setval_line(seq: &QualifiedName, value: i64, is_called: bool) -> String {
    format!("{}{value}, {is_called});\n", setval_prefix(seq))
}

/// The start of a sequence's setval line, identifying it.
pub(crate) fn setval_prefix(seq: &QualifiedName) -> String {
    format!(
        "SELECT pg_catalog.setval({}, ",
        quote_literal(&seq.quoted())
    )
}

async fn read_sequences(
    conn: &mut PgConnection,
    ci: &ConnInfo,
) -> Result<Vec<SequenceState>, SourceError> {
    let names = catalog::list_sequences(conn)
        .await
        .map_err(|e| SourceError::query("listing sequences", ci, e))?;
    let mut out = Vec::with_capacity(names.len());
    for chunk in names.chunks(200) {
        let sql = chunk
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!(
                    "SELECT {i}::int4 AS i, last_value::int8, is_called FROM {}",
                    s.quoted()
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let mut rows: Vec<(i32, i64, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| SourceError::query("reading sequence values", ci, e))?;
        rows.sort_by_key(|r| r.0);
        for (i, last_value, is_called) in rows {
            if let Some(seq) = usize::try_from(i).ok().and_then(|i| chunk.get(i)) {
                out.push(SequenceState {
                    sequence: seq.clone(),
                    last_value,
                    is_called,
                });
            }
        }
    }
    Ok(out)
}

/// Runs `cmd` (a configured `pg_dump`) and streams its standard output into the sink as `part`.
async fn tool_part(
    tool: &Tool,
    mut cmd: tokio::process::Command,
    part: &str,
    sink: &dyn DumpSink,
) -> Result<PartReport, SourceError> {
    let started = Instant::now();
    cmd.stdout(Stdio::piped());
    let mut child = tool.spawn(&mut cmd)?;
    let stdout = child.stdout.take();
    let (writer, reader) = part_stream();
    let producer = {
        let tool = tool.clone();
        let doing = format!("dumping the {part} part");
        tokio::spawn(async move {
            let stderr = tokio::spawn(tools::collect_stderr(child.stderr.take()));
            let Some(mut stdout) = stdout else {
                writer.fail("no standard output from the tool".into()).await;
                return Err(SourceError::Task(
                    "tool started without a stdout pipe".into(),
                ));
            };
            let mut writer = writer;
            let mut buf = BytesMut::with_capacity(BATCH);
            loop {
                if buf.capacity() - buf.len() < 8192 {
                    buf.reserve(BATCH);
                }
                match stdout.read_buf(&mut buf).await {
                    Ok(0) => break,
                    Ok(_) => {
                        if buf.len() >= BATCH {
                            let full = std::mem::replace(&mut buf, BytesMut::with_capacity(BATCH));
                            if writer.write_bytes(full.freeze()).await.is_err() {
                                // kill_on_drop ends the child.
                                return Err(SourceError::SinkStoppedEarly { part: doing });
                            }
                        }
                    }
                    Err(e) => {
                        writer.fail(format!("reading {}: {e}", tool.name)).await;
                        return Err(SourceError::io(
                            format!("reading {}'s output", tool.name),
                            e,
                        ));
                    }
                }
            }
            if !buf.is_empty() && writer.write_bytes(buf.freeze()).await.is_err() {
                return Err(SourceError::SinkStoppedEarly { part: doing });
            }
            let status = child
                .wait()
                .await
                .map_err(|e| SourceError::io(format!("waiting for {}", tool.name), e))?;
            let stderr = stderr.await.unwrap_or_default();
            if !status.success() {
                let err = tools::tool_failed(&tool, &doing, status, stderr);
                writer.fail(err.to_string()).await;
                return Err(err);
            }
            writer
                .finish()
                .await
                .map_err(|ReaderGone| SourceError::SinkStoppedEarly { part: doing })
        })
    };
    let stored = sink.put_part(part, Box::pin(reader)).await;
    let produced = producer
        .await
        .map_err(|e| SourceError::Task(e.to_string()))?;
    let (stored, raw_bytes) = settle(part, stored, produced)?;
    Ok(PartReport {
        name: part.to_string(),
        raw_bytes,
        stored,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Decides which error of a producer/sink pair to report: the producer's own failure explains
/// more than the sink's resulting read error; a sink failure explains the producer's
/// "reader gone".
fn settle<S, P>(
    part: &str,
    stored: Result<S, super::SinkError>,
    produced: Result<P, SourceError>,
) -> Result<(S, P), SourceError> {
    match (stored, produced) {
        (Ok(s), Ok(p)) => Ok((s, p)),
        (Err(source), Ok(_)) | (Err(source), Err(SourceError::SinkStoppedEarly { .. })) => {
            Err(SourceError::Sink {
                part: part.to_string(),
                source,
            })
        }
        (_, Err(e)) => Err(e),
    }
}

/// One COPY worker: its own connection in the snapshot, tables from the shared queue.
async fn copy_worker(
    ci: ConnInfo,
    snapshot: String,
    queue: Arc<Mutex<VecDeque<CopyJob>>>,
    sink: Arc<dyn DumpSink>,
) -> Result<Vec<Done>, SourceError> {
    let mut conn = ci.connect_source().await?;
    exec(
        &mut conn,
        &ci,
        "asking the server to notice a client that went away",
        NOTICE_DEAD_CLIENT.to_string(),
    )
    .await?;
    exec(
        &mut conn,
        &ci,
        "joining the dump's snapshot",
        format!(
            "{COPY_SESSION}; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET TRANSACTION SNAPSHOT {}",
            quote_literal(&snapshot)
        ),
    )
    .await?;
    let mut done = Vec::new();
    loop {
        let job = match queue.lock() {
            Ok(mut q) => q.pop_front(),
            Err(p) => p.into_inner().pop_front(),
        };
        let Some(job) = job else { break };
        let (back, result) = copy_table(conn, &ci, &job.table, &*sink).await;
        let (report, rows, bytes) = result?;
        done.push(Done::Table(report, job.table, rows, bytes));
        match back {
            Some(c) => conn = c,
            None => return Err(SourceError::Task("COPY worker lost its connection".into())),
        }
    }
    exec(
        &mut conn,
        &ci,
        "ending a COPY worker's transaction",
        "COMMIT".into(),
    )
    .await?;
    let _ = conn.close().await;
    Ok(done)
}

type CopyResult = Result<(PartReport, u64, u64), SourceError>;

/// `SELECT <the columns COPY would write> FROM t ORDER BY <primary key>`, for tables with a
/// primary key.
///
/// Why: a plain `COPY t TO STDOUT` writes rows in physical order, and PostgreSQL puts new rows
/// wherever a page has room, so a day's thousand inserts can land in every page and change every
/// chunk of the table. In key order, appended rows (rising ids) land at the end and an updated
/// row stays where it was: the next backup's chunks stay the same except where data really
/// changed. Restores are unaffected: `COPY FROM` takes rows in any order.
/// The column list is what `COPY t TO` writes (no dropped or generated columns), in order.
async fn ordered_select(
    conn: &mut PgConnection,
    table: &QualifiedName,
) -> Result<Option<String>, sqlx::Error> {
    let columns: Vec<(String,)> = sqlx::query_as(
        "SELECT a.attname::text FROM pg_catalog.pg_attribute a \
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped \
           AND a.attgenerated = '' ORDER BY a.attnum",
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
    if key.is_empty() || columns.is_empty() {
        return Ok(None);
    }
    let list = |cols: &[(String,)]| {
        cols.iter()
            .map(|(c,)| crate::pg::names::quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(Some(format!(
        "SELECT {} FROM ONLY {} ORDER BY {}",
        list(&columns),
        table.quoted(),
        list(&key)
    )))
}

/// Streams one table's COPY output into the sink; gives the connection back when it is reusable.
async fn copy_table(
    mut conn: PgConnection,
    ci: &ConnInfo,
    table: &QualifiedName,
    sink: &dyn DumpSink,
) -> (Option<PgConnection>, CopyResult) {
    let started = Instant::now();
    // The coordinator holds ACCESS SHARE already; a worker asking for it behind a queued
    // exclusive request would wait forever (the coordinator never lets go), so never wait.
    let lock = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {} IN ACCESS SHARE MODE NOWAIT",
        table.quoted()
    )))
    .execute(&mut conn)
    .await;
    match lock {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
            return (
                None,
                Err(SourceError::LockConflict {
                    table: table.to_string(),
                }),
            );
        }
        Err(e) => {
            return (
                None,
                Err(SourceError::query(format!("locking {table}"), ci, e)),
            );
        }
    }
    let part = data_part_name(table);
    let statement = match ordered_select(&mut conn, table).await {
        Ok(Some(select)) => format!("COPY ({select}) TO STDOUT"),
        Ok(None) => format!("COPY {} TO STDOUT", table.quoted()),
        Err(e) => {
            return (
                None,
                Err(SourceError::query(
                    format!("reading the columns of {table}"),
                    ci,
                    e,
                )),
            );
        }
    };
    let (writer, reader) = part_stream();
    let ci2 = ci.clone();
    let doing = format!("copying {table}");
    let producer = tokio::spawn(async move {
        let r = copy_out(&mut conn, &ci2, &statement, writer, &doing, None).await;
        (conn, r)
    });
    let stored = sink.put_part(&part, Box::pin(reader)).await;
    let (conn, produced) = match producer.await {
        Ok(x) => x,
        Err(e) => return (None, Err(SourceError::Task(e.to_string()))),
    };
    let (stored, (rows, bytes)) = match settle(&part, stored, produced) {
        Ok(x) => x,
        // A connection left mid-COPY is not reusable.
        Err(e) => return (None, Err(e)),
    };
    tracing::debug!(%table, rows, bytes, "table copied");
    (
        Some(conn),
        Ok((
            PartReport {
                name: part,
                raw_bytes: bytes,
                stored,
                duration_ms: started.elapsed().as_millis() as u64,
            },
            rows,
            bytes,
        )),
    )
}

/// Reads `COPY ... TO STDOUT` into the part writer, counting rows and bytes. With `decoder`,
/// COPY's text escapes are undone on the way (the JSON export of one-column rows); without one
/// the bytes pass as they come (the dump).
pub(crate) async fn copy_out(
    conn: &mut PgConnection,
    ci: &ConnInfo,
    statement: &str,
    mut writer: PartWriter,
    doing: &str,
    mut decoder: Option<CopyTextDecoder>,
) -> Result<(u64, u64), SourceError> {
    let mut stream = match conn.copy_out_raw(statement).await {
        Ok(s) => s,
        Err(e) => {
            let err = SourceError::query(doing, ci, e);
            writer.fail(err.to_string()).await;
            return Err(err);
        }
    };
    let mut rows = 0u64;
    let mut decoded = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                let data: &[u8] = match decoder.as_mut() {
                    Some(d) => {
                        decoded.clear();
                        rows += d.decode(&chunk, &mut decoded);
                        &decoded
                    }
                    None => {
                        rows += count_newlines(&chunk);
                        &chunk
                    }
                };
                if writer.write(data).await.is_err() {
                    return Err(SourceError::SinkStoppedEarly {
                        part: doing.to_string(),
                    });
                }
            }
            Err(e) => {
                let err = SourceError::query(doing, ci, e);
                writer.fail(err.to_string()).await;
                return Err(err);
            }
        }
    }
    drop(stream);
    let bytes = writer
        .finish()
        .await
        .map_err(|ReaderGone| SourceError::SinkStoppedEarly {
            part: doing.to_string(),
        })?;
    Ok((rows, bytes))
}
