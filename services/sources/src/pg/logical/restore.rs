//! Restoring a logical dump into a database: all of it, or chosen tables.
//!
//! Order: target checks, schema archive (spooled to a private temporary directory: it is small and
//! `pg_restore -L`/`-j` need a seekable file), `pre-data`, table data by parallel `COPY FROM
//! STDIN` streamed from the parts (never written to disk), large objects, sequence values, then
//! `post-data` (indexes, constraints, triggers) with `pg_restore -j`.
//!
//! Invariants:
//! - Nothing is written to the target before every check passed: the tables named exist in the
//!   dump, the target is reachable, and it is empty (or `force` was given and none of the tables
//!   to restore exists there).
//! - Each table is loaded in one transaction (`TRUNCATE`, `COPY ... FREEZE`, `COMMIT`) and the
//!   rows loaded must equal the rows the dump counted, or the restore fails naming the table.
//! - A dry run reads only the small schema archive and checks that every other part it would read
//!   is present; it writes nothing anywhere.
//! - A database the restore creates (`create_db`) never holds a half-restored copy under the
//!   target's name: it is created as `TARGET__restoring_XXXXXXXX` (the target's name cut to fit
//!   63 bytes, 8 random hex digits), filled, and renamed to the target only when everything is
//!   in (`ALTER DATABASE ... RENAME`, with every connection of the restore closed). A failure
//!   drops it; only a process killed mid-restore leaves one behind, under that name, for an
//!   operator to drop. A database that already existed is never dropped.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::task::JoinSet;

use super::catalog::{self, COPY_SESSION};
use super::dump::{resolve_error, setval_prefix};
use super::toc::{self, Selection, Toc};
use super::{
    DumpReport, DumpSource, LARGE_OBJECTS_PART, PartReader, SCHEMA_PART, SEQUENCES_PART, SinkError,
    TableDump, TableKind,
};
use crate::error::SourceError;
use crate::pg::conninfo::ConnInfo;
use crate::pg::names::{QualifiedName, quote_ident, quote_literal, resolve};
use crate::pg::tools::{self, Tool};

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Parallel `COPY` connections, and `pg_restore -j` for post-data. At least 1; default 2.
    pub jobs: usize,
    /// Restore only these tables (`schema.table` or a bare name unique in the dump; a partitioned
    /// table brings its partitions), with what belongs to them. `None`: everything.
    pub tables: Option<Vec<String>>,
    /// Create the target database (from `template0`, in the dump's encoding) when it is missing.
    pub create_db: bool,
    /// Check and plan only: read the schema archive, check every needed part is present, write
    /// nothing.
    pub dry_run: bool,
    /// Restore into a database that already holds objects. The tables restored must still not
    /// exist there; objects that do exist are left alone (pg_restore's "already exists" errors
    /// are reported as warnings), and every table restored is checked to exist afterwards.
    pub force: bool,
    /// Do not restore ownership and grants (`--no-owner --no-privileges`): for targets that lack
    /// the source's roles.
    pub no_owner: bool,
    /// Directory of `pg_restore`; default: `BACKSTOP_PG_BIN`, `PATH`, `/usr/lib/postgresql/*/bin`.
    pub pg_bin_dir: Option<PathBuf>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            jobs: 2,
            tables: None,
            create_db: false,
            dry_run: false,
            force: false,
            no_owner: false,
            pg_bin_dir: None,
        }
    }
}

/// One table restored (or, in a dry run, to be restored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRestored {
    pub table: QualifiedName,
    /// Rows loaded (dry run: rows the dump holds).
    pub rows: u64,
    /// Bytes of COPY text read.
    pub bytes: u64,
    pub duration_ms: u64,
}

/// What a restore did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    pub database: String,
    pub dry_run: bool,
    /// The database was created (dry run: would be).
    pub created_database: bool,
    /// Tables with data, largest first.
    pub tables: Vec<TableRestored>,
    /// Tables created without rows (partitioned tables, tables whose data was not dumped).
    pub empty_tables: Vec<QualifiedName>,
    /// Sequences whose values were set.
    pub sequences: usize,
    /// Schema archive entries restored (all of them when no tables were chosen).
    pub schema_entries: usize,
    /// Large objects restored (only in whole-database restores).
    pub large_objects: u64,
    pub rows: u64,
    pub bytes: u64,
    pub pre_data_ms: u64,
    pub data_ms: u64,
    pub post_data_ms: u64,
    pub duration_ms: u64,
    /// Messages from pg_restore in `force` mode (objects that already existed, ...).
    pub warnings: Vec<String>,
}

/// The tables of the dump that a restore with `names` covers, partitions included.
fn choose(dump: &DumpReport, names: &[String]) -> Result<BTreeSet<QualifiedName>, SourceError> {
    let known: Vec<QualifiedName> = dump.tables.iter().map(|t| t.table.clone()).collect();
    let mut out = BTreeSet::new();
    for n in names {
        out.insert(resolve(n, &known).map_err(|e| resolve_error(e, &known))?);
    }
    loop {
        let before = out.len();
        for t in &dump.tables {
            if let Some(p) = &t.partition_of
                && out.contains(p)
            {
                out.insert(t.table.clone());
            }
        }
        if out.len() == before {
            break;
        }
    }
    Ok(out)
}

/// Runs `sql` (statements built from quoted names), naming `doing` in the error.
pub(crate) async fn exec(
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

/// Restores `dump`, read from `source`, into the database `target` names.
pub async fn restore(
    target: &str,
    options: &RestoreOptions,
    source: Arc<dyn DumpSource>,
    dump: &DumpReport,
) -> Result<RestoreReport, SourceError> {
    let t0 = Instant::now();
    let ci = ConnInfo::parse(target)?;
    if dump.format != 1 {
        return Err(SourceError::BadReport {
            why: format!(
                "dump description format {} is not supported (1 is)",
                dump.format
            ),
        });
    }
    let jobs = options.jobs.max(1);
    let Some(database) = ci.database().map(str::to_string) else {
        return Err(SourceError::InvalidConninfo {
            why: "the restore target names no database".into(),
        });
    };

    // 1. What to restore (cheap checks first: nothing touched yet).
    let chosen: Option<BTreeSet<QualifiedName>> = match &options.tables {
        Some(names) => Some(choose(dump, names)?),
        None if dump.filtered => Some(dump.tables.iter().map(|t| t.table.clone()).collect()),
        None => None,
    };
    let in_scope = |t: &TableDump| chosen.as_ref().is_none_or(|c| c.contains(&t.table));
    let mut data_tables: Vec<&TableDump> = dump
        .tables
        .iter()
        .filter(|t| in_scope(t) && t.kind == TableKind::Table && t.part.is_some())
        .collect();
    data_tables.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.table.cmp(&b.table)));
    let empty_tables: Vec<QualifiedName> = dump
        .tables
        .iter()
        .filter(|t| in_scope(t) && !(t.kind == TableKind::Table && t.part.is_some()))
        .map(|t| t.table.clone())
        .collect();
    let scope: BTreeSet<QualifiedName> = dump
        .tables
        .iter()
        .filter(|t| in_scope(t))
        .map(|t| t.table.clone())
        .collect();
    let with_large_objects = chosen.is_none()
        && dump.large_objects > 0
        && dump.parts.iter().any(|p| p.name == LARGE_OBJECTS_PART);

    // 2. The schema archive and the entries to restore: a table that cannot be restored alone
    //    is refused before the target is touched.
    let spool = tempfile::Builder::new()
        .prefix("backstop-restore-")
        .tempdir()
        .map_err(|e| SourceError::io("creating a temporary directory for the schema archive", e))?;
    let schema_path = spool.path().join("schema.dump");
    spool_part(&*source, SCHEMA_PART, &schema_path).await?;
    let archive = tokio::fs::read(&schema_path)
        .await
        .map_err(|e| SourceError::io("reading the spooled schema archive", e))?;
    let toc: Toc = toc::parse(&archive)?;
    drop(archive);
    let selection: Option<Selection> = match &chosen {
        Some(c) => Some(toc::select(&toc, c)?),
        None => None,
    };
    let schema_entries = selection
        .as_ref()
        .map(|s| s.keep.len())
        .unwrap_or(toc.entries.len());
    let sequence_filter: Option<Vec<String>> = selection
        .as_ref()
        .map(|s| s.sequences.iter().map(setval_prefix).collect());
    let sequences_planned = match &selection {
        Some(s) => s.sequences.len(),
        None => dump.sequences.len(),
    };

    // 3. The target: reachable, present (or creatable), empty (or forced and no collisions).
    //    A database this restore creates is made under a staging name and renamed to the
    //    target's only once everything is in (step 9); a failure drops it.
    let mut created_database = false;
    let mut staging: Option<String> = None;
    let conn: Option<PgConnection> = match ci.connect().await {
        Ok(c) => Some(c),
        Err(SourceError::DatabaseMissing { .. }) if options.create_db => {
            created_database = true;
            if options.dry_run {
                None
            } else {
                let name = staging_name(&database);
                create_database(&ci, &name, &dump.encoding).await?;
                staging = Some(name.clone());
                match ci.with_database(&name).connect().await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        discard_staging(&ci, &name).await;
                        return Err(e);
                    }
                }
            }
        }
        Err(e) => return Err(e),
    };
    // Where the restore writes: the target itself, or the staging database.
    let work = match &staging {
        Some(name) => ci.with_database(name),
        None => ci.clone(),
    };
    let loaded: Result<RestoreReport, SourceError> = async {
        let mut conn = conn;
        if let Some(c) = conn.as_mut() {
            let (some, total) = catalog::existing_user_objects(c, 5)
                .await
                .map_err(|e| SourceError::query("checking that the target is empty", &work, e))?;
            if total > 0 && !options.force {
                return Err(SourceError::TargetNotEmpty {
                    database: database.clone(),
                    server: ci.server(),
                    what: format!("{total} object(s), e.g. {}", some.join(", ")),
                });
            }
            if total > 0 {
                let existing: BTreeSet<QualifiedName> = catalog::list_tables(c)
                    .await
                    .map_err(|e| SourceError::query("listing the target's tables", &work, e))?
                    .into_iter()
                    .map(|t| t.name)
                    .collect();
                let clash: Vec<String> = scope
                    .intersection(&existing)
                    .map(|t| t.to_string())
                    .collect();
                if !clash.is_empty() {
                    return Err(SourceError::TablesExist {
                        database: database.clone(),
                        tables: clash.join(", "),
                    });
                }
            }
        }

        let mut report = RestoreReport {
            database: database.clone(),
            dry_run: options.dry_run,
            created_database,
            tables: Vec::new(),
            empty_tables,
            sequences: 0,
            schema_entries,
            large_objects: 0,
            rows: 0,
            bytes: 0,
            pre_data_ms: 0,
            data_ms: 0,
            post_data_ms: 0,
            duration_ms: 0,
            warnings: Vec::new(),
        };

        // 4. A dry run stops here, after checking every part it would read.
        if options.dry_run {
            let mut needed: Vec<String> = vec![SEQUENCES_PART.to_string()];
            needed.extend(data_tables.iter().filter_map(|t| t.part.clone()));
            if with_large_objects {
                needed.push(LARGE_OBJECTS_PART.to_string());
            }
            let mut missing = Vec::new();
            for part in &needed {
                if let Err(e) = source.check_part(part).await {
                    missing.push(format!("{part} ({e})"));
                }
            }
            if !missing.is_empty() {
                return Err(SourceError::PartsMissing {
                    count: missing.len(),
                    list: missing.join("; "),
                });
            }
            report.tables = data_tables
                .iter()
                .map(|t| TableRestored {
                    table: t.table.clone(),
                    rows: t.rows,
                    bytes: t.bytes,
                    duration_ms: 0,
                })
                .collect();
            report.rows = report.tables.iter().map(|t| t.rows).sum();
            report.bytes = report.tables.iter().map(|t| t.bytes).sum();
            report.sequences = sequences_planned;
            report.large_objects = if with_large_objects {
                dump.large_objects
            } else {
                0
            };
            report.duration_ms = t0.elapsed().as_millis() as u64;
            return Ok(report);
        }
        let Some(mut conn) = conn.take() else {
            return Err(SourceError::Task("no connection to the target".into()));
        };

        let archive_major = tools_major(&toc.dump_version).max(tools_major(&dump.pg_dump_version));
        let pg_restore =
            tools::locate("pg_restore", options.pg_bin_dir.as_deref(), archive_major).await?;
        let list_path = match &selection {
            Some(sel) => {
                let p = spool.path().join("restore.list");
                tokio::fs::write(&p, sel.list_file(&toc))
                    .await
                    .map_err(|e| SourceError::io("writing the pg_restore list", e))?;
                Some(p)
            }
            None => None,
        };
        let run = PgRestore {
            tool: &pg_restore,
            ci: &work,
            archive: &schema_path,
            list: list_path.as_deref(),
            no_owner: options.no_owner,
            strict: !options.force,
        };

        // 5. pre-data.
        let t = Instant::now();
        let mut warnings = run.run("pre-data", &["--section=pre-data"], None).await?;
        report.pre_data_ms = t.elapsed().as_millis() as u64;
        if options.force {
            let existing: BTreeSet<QualifiedName> = catalog::list_tables(&mut conn)
                .await
                .map_err(|e| SourceError::query("listing the restored tables", &work, e))?
                .into_iter()
                .map(|t| t.name)
                .collect();
            let missing: Vec<String> = scope.difference(&existing).map(|t| t.to_string()).collect();
            if !missing.is_empty() {
                return Err(SourceError::ToolFailed {
                    tool: "pg_restore".into(),
                    doing: "restoring pre-data".into(),
                    status: "incomplete".into(),
                    stderr: format!(
                        "tables {} were not created: {}",
                        missing.join(", "),
                        warnings.join("; ")
                    ),
                });
            }
        }

        // 6. Data, in parallel, largest tables first.
        let t = Instant::now();
        report.tables = restore_data(&work, jobs, &data_tables, source.clone()).await?;
        report.rows = report.tables.iter().map(|t| t.rows).sum();
        report.bytes = report.tables.iter().map(|t| t.bytes).sum();
        if with_large_objects {
            let reader = source
                .open_part(LARGE_OBJECTS_PART)
                .await
                .map_err(|source| SourceError::Source {
                    part: LARGE_OBJECTS_PART.into(),
                    source,
                })?;
            let lo = PgRestore {
                archive: Path::new("-"),
                list: None,
                ..run
            };
            warnings.extend(
                lo.run(
                    "large objects",
                    &["--section=data"],
                    Some((LARGE_OBJECTS_PART, reader)),
                )
                .await?,
            );
            report.large_objects = dump.large_objects;
        }
        report.data_ms = t.elapsed().as_millis() as u64;

        // 7. Sequence values (after the data: nextval continues past the restored ids).
        report.sequences =
            set_sequences(&mut conn, &work, &*source, sequence_filter.as_deref()).await?;

        // 8. post-data: indexes, constraints, triggers, in parallel.
        let t = Instant::now();
        let jobs_arg = format!("--jobs={jobs}");
        warnings.extend(
            run.run("post-data", &["--section=post-data", &jobs_arg], None)
                .await?,
        );
        report.post_data_ms = t.elapsed().as_millis() as u64;
        let _ = conn.close().await;
        report.warnings = warnings;
        Ok(report)
    }
    .await;

    // 9. A staging database takes the target's name now that it is complete, or is dropped.
    let mut report = match (staging, loaded) {
        (None, loaded) => loaded?,
        (Some(name), Err(e)) => {
            discard_staging(&ci, &name).await;
            return Err(e);
        }
        (Some(name), Ok(report)) => {
            if let Err(e) = rename_database(&ci, &name, &database).await {
                discard_staging(&ci, &name).await;
                return Err(e);
            }
            report
        }
    };
    report.duration_ms = t0.elapsed().as_millis() as u64;
    tracing::info!(
        database = %report.database,
        tables = report.tables.len(),
        rows = report.rows,
        ms = report.duration_ms,
        "restore finished"
    );
    Ok(report)
}

/// Major version from a version string such as `15.18` (0 when unreadable).
fn tools_major(v: &str) -> u32 {
    v.split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A connection for statements about databases (create, rename, drop), to a database other than
/// the one they are about.
async fn admin_connection(ci: &ConnInfo) -> Result<(PgConnection, ConnInfo), SourceError> {
    let admin_ci = ci.with_database("postgres");
    match admin_ci.connect().await {
        Ok(c) => Ok((c, admin_ci)),
        // Some servers have no `postgres` database; template1 always exists.
        Err(SourceError::DatabaseMissing { .. }) => {
            let template = ci.with_database("template1");
            Ok((template.connect().await?, template))
        }
        Err(e) => Err(e),
    }
}

/// The name a restore that creates `target` works under until it is complete: recognisably the
/// target's (for anyone listing databases meanwhile), unique to this restore, and within
/// PostgreSQL's 63-byte limit on names.
fn staging_name(target: &str) -> String {
    use sha3::{Digest, Sha3_256};
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let seed = format!(
        "{target}/{}/{nanos}/{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    );
    let digest = Sha3_256::digest(seed.as_bytes());
    let suffix: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    let marker = format!("{STAGING_MARKER}{suffix}");
    let mut prefix = target;
    while prefix.len() + marker.len() > 63 {
        let mut cut = prefix.len() - 1;
        while !prefix.is_char_boundary(cut) {
            cut -= 1;
        }
        prefix = &prefix[..cut];
    }
    format!("{prefix}{marker}")
}

/// What separates the target's name from the random suffix in a staging database's name.
const STAGING_MARKER: &str = "__restoring_";

/// Gives the complete staging database the target's name. No session may be connected to it:
/// every connection of the restore is closed by now (PostgreSQL waits a few seconds for backends
/// that are still exiting).
async fn rename_database(ci: &ConnInfo, from: &str, to: &str) -> Result<(), SourceError> {
    let (mut admin, admin_ci) = admin_connection(ci).await?;
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {} RENAME TO {}",
        quote_ident(from),
        quote_ident(to)
    )))
    .execute(&mut admin)
    .await;
    let _ = admin.close().await;
    result.map(drop).map_err(|e| {
        SourceError::query(
            format!("renaming the restored database {from:?} to {to:?}"),
            &admin_ci,
            e,
        )
    })?;
    tracing::info!(
        database = to,
        staging = from,
        "the restored database took its name"
    );
    Ok(())
}

/// Drops a staging database after a failed restore. A failure to drop is logged with the name
/// to drop by hand, and does not replace the restore's own error.
async fn discard_staging(ci: &ConnInfo, name: &str) {
    match drop_database(ci, name).await {
        Ok(()) => tracing::info!(database = name, "dropped the incomplete restore"),
        Err(e) => tracing::warn!(
            database = name,
            error = %e,
            "could not drop the incomplete restore; drop it by hand (DROP DATABASE)"
        ),
    }
}

async fn drop_database(ci: &ConnInfo, name: &str) -> Result<(), SourceError> {
    let (mut admin, admin_ci) = admin_connection(ci).await?;
    let result = async {
        let version: String = sqlx::query_scalar("SELECT current_setting('server_version_num')")
            .fetch_one(&mut admin)
            .await?;
        // A failed COPY's connection may not be gone yet: FORCE (PostgreSQL 13 and later) ends
        // the sessions still attached instead of failing on them.
        let force = if version.parse::<u32>().unwrap_or(0) >= 130_000 {
            " WITH (FORCE)"
        } else {
            ""
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {}{force}",
            quote_ident(name)
        )))
        .execute(&mut admin)
        .await
        .map(drop)
    }
    .await;
    let _ = admin.close().await;
    result.map_err(|e| SourceError::query(format!("dropping database {name:?}"), &admin_ci, e))
}

async fn create_database(ci: &ConnInfo, name: &str, encoding: &str) -> Result<(), SourceError> {
    let (mut admin, admin_ci) = admin_connection(ci).await?;
    let base = format!(
        "CREATE DATABASE {} TEMPLATE template0 ENCODING {}",
        quote_ident(name),
        quote_literal(encoding)
    );
    let first = sqlx::raw_sql(sqlx::AssertSqlSafe(base.clone()))
        .execute(&mut admin)
        .await;
    // A database that already exists under this name (42P04) is an error: it is not ours to
    // fill, nor to drop should the restore fail.
    let result = match first {
        Ok(_) => Ok(()),
        // The server's default locale may not fit the dump's encoding: C fits every encoding.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("22023") => sqlx::raw_sql(
            sqlx::AssertSqlSafe(format!("{base} LC_COLLATE 'C' LC_CTYPE 'C'")),
        )
        .execute(&mut admin)
        .await
        .map(drop),
        Err(e) => Err(e),
    };
    let _ = admin.close().await;
    result.map_err(|e| SourceError::query(format!("creating database {name:?}"), &admin_ci, e))?;
    tracing::info!(
        database = name,
        "created the database to restore into (renamed to the target when complete)"
    );
    Ok(())
}

/// Copies a (small) part to a local file.
async fn spool_part(source: &dyn DumpSource, part: &str, path: &Path) -> Result<(), SourceError> {
    let mut reader = source
        .open_part(part)
        .await
        .map_err(|source| SourceError::Source {
            part: part.into(),
            source,
        })?;
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| SourceError::io(format!("creating {}", path.display()), e))?;
    tokio::io::copy(&mut reader, &mut file)
        .await
        .map_err(|e| SourceError::Source {
            part: part.into(),
            source: SinkError::from(e),
        })?;
    file.flush()
        .await
        .map_err(|e| SourceError::io(format!("writing {}", path.display()), e))?;
    Ok(())
}

/// One way of running pg_restore against the target.
#[derive(Clone, Copy)]
struct PgRestore<'a> {
    tool: &'a Tool,
    ci: &'a ConnInfo,
    /// The archive file, or `-` for standard input.
    archive: &'a Path,
    list: Option<&'a Path>,
    no_owner: bool,
    /// Stop at the first error (normal); otherwise collect errors as warnings (`force`).
    strict: bool,
}

impl PgRestore<'_> {
    /// Runs one step. `stdin`, when given, is streamed into pg_restore's standard input.
    /// Returns warnings (non-strict mode). No `--single-transaction`: one transaction over a
    /// large schema runs out of lock table space (`max_locks_per_transaction`), and a failed
    /// restore's target is to be dropped anyway.
    async fn run(
        &self,
        step: &str,
        args: &[&str],
        stdin: Option<(&str, PartReader)>,
    ) -> Result<Vec<String>, SourceError> {
        let mut cmd = self.tool.command();
        cmd.args(args);
        if self.strict {
            cmd.arg("--exit-on-error");
        }
        if self.no_owner {
            cmd.args(["--no-owner", "--no-privileges"]);
        }
        if let Some(list) = self.list {
            cmd.arg(format!("--use-list={}", list.display()));
        }
        self.ci.apply_to_tool(&mut cmd);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        } else {
            cmd.arg(self.archive);
        }
        let mut child = self.tool.spawn(&mut cmd)?;
        let doing = format!("restoring {step}");
        let feeding = match (stdin, child.stdin.take()) {
            (Some((part, mut reader)), Some(mut pipe)) => {
                let part = part.to_string();
                Some(tokio::spawn(async move {
                    let r = tokio::io::copy(&mut reader, &mut pipe).await;
                    drop(pipe);
                    r.map(drop).map_err(|e| SourceError::Source {
                        part,
                        source: SinkError::from(e),
                    })
                }))
            }
            _ => None,
        };
        let stderr = tools::collect_stderr(child.stderr.take()).await;
        let status = child
            .wait()
            .await
            .map_err(|e| SourceError::io("waiting for pg_restore", e))?;
        if let Some(f) = feeding {
            // A failed read of the part explains pg_restore's failure better than its own message.
            match f.await {
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(SourceError::Task(e.to_string())),
                Ok(Ok(())) => {}
            }
        }
        if status.success() {
            return Ok(Vec::new());
        }
        if self.strict {
            return Err(tools::tool_failed(self.tool, &doing, status, stderr));
        }
        tracing::warn!(step, %stderr, "pg_restore reported errors (force mode)");
        Ok(stderr
            .lines()
            .filter(|l| l.contains("error"))
            .map(|l| format!("{step}: {}", l.trim()))
            .collect())
    }
}

/// A part reader that remembers its first error, to tell a damaged part from a failed COPY.
struct Watched {
    inner: PartReader,
    /// The part's own read error, kept whole (a repository error inside stays recoverable, so
    /// callers can tell damage from an outage by its variant); COPY gets a copy of its text.
    error: Arc<Mutex<Option<std::io::Error>>>,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match self.inner.as_mut().poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                self.bytes
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                let copy = std::io::Error::new(e.kind(), e.to_string());
                if let Ok(mut slot) = self.error.lock()
                    && slot.is_none()
                {
                    *slot = Some(e);
                }
                Poll::Ready(Err(copy))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

async fn restore_data(
    ci: &ConnInfo,
    jobs: usize,
    tables: &[&TableDump],
    source: Arc<dyn DumpSource>,
) -> Result<Vec<TableRestored>, SourceError> {
    let queue: Arc<Mutex<VecDeque<TableDump>>> =
        Arc::new(Mutex::new(tables.iter().map(|t| (*t).clone()).collect()));
    let workers = jobs.min(tables.len());
    let mut set: JoinSet<Result<Vec<TableRestored>, SourceError>> = JoinSet::new();
    for _ in 0..workers {
        let (ci, queue, source) = (ci.clone(), queue.clone(), source.clone());
        set.spawn(async move { copy_in_worker(ci, queue, source).await });
    }
    let mut done: BTreeMap<QualifiedName, TableRestored> = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let result = joined
            .map_err(|e| SourceError::Task(e.to_string()))
            .and_then(|r| r);
        match result {
            Ok(list) => {
                for t in list {
                    done.insert(t.table.clone(), t);
                }
            }
            Err(e) => {
                set.abort_all();
                return Err(e);
            }
        }
    }
    Ok(tables
        .iter()
        .filter_map(|t| done.remove(&t.table))
        .collect())
}

async fn copy_in_worker(
    ci: ConnInfo,
    queue: Arc<Mutex<VecDeque<TableDump>>>,
    source: Arc<dyn DumpSource>,
) -> Result<Vec<TableRestored>, SourceError> {
    let mut conn = ci.connect().await?;
    // A lost commit only means redoing the restore, so durability per table is not worth waiting
    // for.
    exec(
        &mut conn,
        &ci,
        "preparing a COPY session",
        format!("{COPY_SESSION}; SET synchronous_commit = off"),
    )
    .await?;
    let mut out = Vec::new();
    loop {
        let job = match queue.lock() {
            Ok(mut q) => q.pop_front(),
            Err(p) => p.into_inner().pop_front(),
        };
        let Some(job) = job else { break };
        out.push(copy_in_table(&mut conn, &ci, &job, &*source).await?);
    }
    let _ = conn.close().await;
    Ok(out)
}

async fn copy_in_table(
    conn: &mut PgConnection,
    ci: &ConnInfo,
    job: &TableDump,
    source: &dyn DumpSource,
) -> Result<TableRestored, SourceError> {
    let started = Instant::now();
    let Some(part) = job.part.clone() else {
        return Err(SourceError::BadReport {
            why: format!("table {} has no data part", job.table),
        });
    };
    let reader = source
        .open_part(&part)
        .await
        .map_err(|source| SourceError::Source {
            part: part.clone(),
            source,
        })?;
    let error = Arc::new(Mutex::new(None));
    let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watched = Watched {
        inner: reader,
        error: error.clone(),
        bytes: bytes.clone(),
    };
    let doing = format!("loading {}", job.table);
    // Truncating in the same transaction lets COPY write frozen rows (no later hint-bit or
    // anti-wraparound rewrite of the whole table), and skip WAL on wal_level=minimal servers.
    exec(
        conn,
        ci,
        &doing,
        format!("BEGIN; TRUNCATE ONLY {}", job.table.quoted()),
    )
    .await?;
    let statement = format!("COPY {} FROM STDIN WITH (FREEZE)", job.table.quoted());
    let mut copy = conn
        .copy_in_raw(&statement)
        .await
        .map_err(|e| SourceError::query(&doing, ci, e))?;
    let sent = copy.read_from(watched).await.map(drop);
    let rows = match sent {
        Ok(()) => copy.finish().await,
        Err(e) => {
            let _ = copy.abort("backstop: reading the part failed").await;
            Err(e)
        }
    };
    let rows = match rows {
        Ok(r) => r,
        Err(e) => {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            let part_error = error.lock().ok().and_then(|mut s| s.take());
            return Err(match part_error {
                Some(e) => SourceError::Source {
                    part,
                    source: SinkError::from(e),
                },
                None => SourceError::query(&doing, ci, e),
            });
        }
    };
    if rows != job.rows {
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
        return Err(SourceError::RowCountMismatch {
            table: job.table.to_string(),
            expected: job.rows,
            got: rows,
            doing: "loaded",
        });
    }
    exec(conn, ci, &doing, "COMMIT".into()).await?;
    let read = bytes.load(std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(table = %job.table, rows, bytes = read, "table restored");
    Ok(TableRestored {
        table: job.table.clone(),
        rows,
        bytes: read,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Applies the sequences part: every line, or only the lines of `only` (setval prefixes).
async fn set_sequences(
    conn: &mut PgConnection,
    ci: &ConnInfo,
    source: &dyn DumpSource,
    only: Option<&[String]>,
) -> Result<usize, SourceError> {
    let mut reader =
        source
            .open_part(SEQUENCES_PART)
            .await
            .map_err(|source| SourceError::Source {
                part: SEQUENCES_PART.into(),
                source,
            })?;
    let mut text = String::new();
    reader
        .read_to_string(&mut text)
        .await
        .map_err(|e| SourceError::Source {
            part: SEQUENCES_PART.into(),
            source: SinkError::from(e),
        })?;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("SELECT pg_catalog.setval("))
        .filter(|l| only.is_none_or(|prefixes| prefixes.iter().any(|p| l.starts_with(p.as_str()))))
        .collect();
    if lines.is_empty() {
        return Ok(0);
    }
    for chunk in lines.chunks(500) {
        exec(conn, ci, "setting sequence values", chunk.join("\n")).await?;
    }
    Ok(lines.len())
}
