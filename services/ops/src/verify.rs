//! The verification use case: every completed backup proves itself by a real test restore.
//!
//! [`verify_completed`] is what the verify worker does on `backup.completed`, for both methods:
//! 1. records `verification.started`;
//! 2. loads the manifest and checks it against the SHA3-256 the completion event recorded;
//! 3. test-restores it ([`test_restore`]):
//!    - logical: into a temporary database on the scratch server (every object read and its
//!      SHA3, decryption and chunk id checked on the way), every table's rows counted and
//!      compared with the counts taken in the source's snapshot (within `tolerance_percent`),
//!      the database dropped whatever happened;
//!    - command: its restore command into a scratch `$BACKSTOP_TARGET`, then its verify command
//!      (or, without them, the raw stream's bytes and SHA3 against the manifest's);
//!    - Redis: the RDB loaded by a throwaway `redis-server`, keys per database (DBSIZE) and a
//!      sample of keys compared with what the source had (within `tolerance_percent`);
//!    - physical: into a temporary data directory, a private server started on it and recovered
//!      to consistency with archived WAL, `pg_amcheck`, rows counted, everything removed;
//! 4. records `verification.passed` (with the restore speed, for recovery-time estimates) or,
//!    when the data is at fault, `verification.failed`, quarantines the damaged chunks and asks
//!    for a new full backup (`backup.requested`, trigger `retry`) until the chain has had
//!    `max_retries` retries. The alert worker raises the critical alert from the failure.
//!
//! Failures are told apart by class ([`crate::error::FailureClass`]), never by message text: a
//! scratch server that is down (or dies mid-restore) is an environment failure, returned to the
//! caller for a later retry with nothing recorded against the backup. Event ids derive from the
//! completion event, so a redelivered completion verifies again but records nothing twice.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use backstop_events::BackupMethod;
use backstop_events::{
    Actor, BackupCompleted, BackupKind, BackupRequested, Envelope, Event, NewEvent, TableCheck,
    Trigger, VerificationFailed, VerificationPassed, VerificationStarted, VerifyTier, streams,
    uuid_v7_derived,
};
use backstop_ledger::{Appender, ExpectedVersion};
use backstop_repo::{Hash32, Manifest, Repository};
use backstop_sources::pg::ConnInfo;
use backstop_sources::pg::logical::{RestoreOptions, row_counts};
use backstop_sources::pg::physical::{
    self, PhysicalRestoreOptions, PhysicalRestoreReport, PhysicalVerifyOptions,
    PhysicalVerifyReport, RecoveryTarget,
};
use uuid::Uuid;

use crate::catalog::{self, PhysicalBackup};
use crate::context::DataPath;
use crate::error::{FailureClass, OpsError};
use crate::parts::ManifestSource;

/// Builds the `restore_command` a temporary cluster fetches a source's WAL with (a
/// `backstop wal-fetch` invocation that PostgreSQL's user can run).
pub type RestoreCommandFn = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// How physical backups are test-restored.
#[derive(Clone)]
pub struct PhysicalVerifySettings {
    pub restore_command: RestoreCommandFn,
    /// Where temporary data directories go (default: the system's temporary directory). It
    /// needs room for a whole cluster.
    pub work_dir: Option<PathBuf>,
    pub verify: PhysicalVerifyOptions,
}

impl std::fmt::Debug for PhysicalVerifySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhysicalVerifySettings")
            .field("work_dir", &self.work_dir)
            .field("verify", &self.verify)
            .finish_non_exhaustive()
    }
}

impl PhysicalVerifySettings {
    /// The options that lay out a base backup of `source` for a private server of these
    /// settings: its `restore_command` (`backstop wal-fetch`), recovery to `target`, the server
    /// programs and the account it runs as (when we are root).
    pub fn restore_options(
        &self,
        source: &str,
        target: RecoveryTarget,
    ) -> Result<PhysicalRestoreOptions, OpsError> {
        let restore_command = (self.restore_command)(source).map_err(|why| {
            OpsError::Invalid(format!(
                "cannot build the restore_command for the private server: {why}"
            ))
        })?;
        let mut opts = PhysicalRestoreOptions::new(restore_command);
        opts.target = target;
        opts.pg_bin_dir = self.verify.pg_bin_dir.clone();
        opts.owner = Some(
            self.verify
                .run_as
                .clone()
                .unwrap_or_else(|| "postgres".into()),
        );
        Ok(opts)
    }
}

/// Creates `BASE/PREFIX-<uuid>` (BASE: the system's temporary directory by default) with mode
/// 0711, for a data directory inside it: PostgreSQL's user (when we are root) must traverse it
/// to reach the data directory, which the restore gives to that user with mode 0700.
pub fn scratch_dir(base: Option<&std::path::Path>, prefix: &str) -> Result<PathBuf, OpsError> {
    use std::os::unix::fs::DirBuilderExt;
    let base = base.map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let work = base.join(format!("{prefix}-{}", Uuid::now_v7()));
    std::fs::DirBuilder::new()
        .mode(0o711)
        .recursive(true)
        .create(&work)
        .map_err(|e| OpsError::io(format!("creating the directory {}", work.display()), e))?;
    Ok(work)
}

/// Where test restores go and how strict the comparison is.
#[derive(Clone)]
pub struct VerifySettings {
    /// A PostgreSQL URL on which logical test restores may create and drop databases.
    pub scratch: Option<String>,
    /// Allowed difference between restored and recorded row counts, in percent.
    pub tolerance_percent: f64,
    /// Backups retried after failed verifications, at most, per chain.
    pub max_retries: u32,
    pub jobs: usize,
    /// Physical test restores; `None` leaves physical backups unverified (with a warning).
    pub physical: Option<PhysicalVerifySettings>,
    /// Run logical test restores even when the scratch role is a superuser (refused by default:
    /// a restore evaluates code the source's owners wrote, with the restoring role's rights).
    pub allow_superuser: bool,
}

/// What a test restore found.
#[derive(Debug)]
pub struct Verified {
    pub tables: Vec<TableCheck>,
    pub objects: u64,
    pub bytes: u64,
    pub restore_ms: u64,
    /// Source bytes restored per second, for recovery-time estimates.
    pub bytes_per_sec: f64,
    /// Physical backups: the restore and the checks of the recovered cluster.
    pub physical: Option<(PhysicalRestoreReport, PhysicalVerifyReport)>,
}

/// Why a test restore failed, with the table counts it got that far.
#[derive(Debug)]
pub struct VerifyFailure {
    pub error: OpsError,
    pub tables: Vec<TableCheck>,
}

impl From<OpsError> for VerifyFailure {
    fn from(error: OpsError) -> VerifyFailure {
        VerifyFailure {
            error,
            tables: Vec::new(),
        }
    }
}

/// Test-restores `manifest` by its method (see the module docs). Records nothing.
pub async fn test_restore(
    repo: &Repository,
    settings: &VerifySettings,
    manifest: Manifest,
    actor: &Actor,
) -> Result<Verified, VerifyFailure> {
    match catalog::method_of(&manifest) {
        BackupMethod::Logical => {
            let scratch = settings.scratch.as_deref().ok_or_else(|| {
                OpsError::Invalid(
                    "logical test restores need a scratch PostgreSQL: set [verify] scratch (or pass --scratch)".into(),
                )
            })?;
            test_restore_logical(repo, settings, scratch, manifest, actor).await
        }
        BackupMethod::Physical => {
            let physical = settings.physical.as_ref().ok_or_else(|| {
                OpsError::Invalid(
                    "physical test restores need a restore_command for the temporary cluster"
                        .into(),
                )
            })?;
            let backup = PhysicalBackup::from_manifest(manifest)?;
            test_restore_physical(repo, physical, &backup, actor)
                .await
                .map_err(VerifyFailure::from)
        }
        BackupMethod::Command | BackupMethod::Redis | BackupMethod::Git => {
            test_restore_stream(repo, settings, manifest, actor)
                .await
                .map_err(VerifyFailure::from)
        }
        BackupMethod::Config => crate::config_backup::test_restore(repo, manifest, actor)
            .await
            .map_err(VerifyFailure::from),
        BackupMethod::Files => {
            let work_dir = settings.physical.as_ref().and_then(|p| p.work_dir.clone());
            crate::files::test_restore_files(repo, manifest, work_dir.as_deref(), actor)
                .await
                .map_err(VerifyFailure::from)
        }
    }
}

/// Test-restores a command backup (its restore and verify commands against a scratch target,
/// or its stream's bytes and SHA3 when it has none), a git bundle (cloned, refs compared,
/// `git fsck`) or a Redis snapshot (loaded by a throwaway
/// `redis-server`, keys per database and a sample compared; each database is reported as a
/// table `redis.dbN`). Every chunk read is checked (SHA3, decryption) on the way.
async fn test_restore_stream(
    repo: &Repository,
    settings: &VerifySettings,
    manifest: Manifest,
    actor: &Actor,
) -> Result<Verified, OpsError> {
    let objects = manifest.distinct_chunks().len() as u64 + 1;
    let bytes = manifest.totals.stored_bytes;
    let raw_bytes = manifest.totals.raw_bytes;
    let work_dir = settings.physical.as_ref().and_then(|p| p.work_dir.clone());
    let repo = repo.with_access(
        actor.to_string(),
        format!("test restore of backup {}", manifest.backup_id),
    );
    let started = Instant::now();
    let tables = match catalog::method_of(&manifest) {
        BackupMethod::Command => {
            let report = catalog::command_report(&manifest)?;
            let input = Box::pin(repo.open_stream(&manifest, &report.part).await?);
            backstop_sources::command::test_restore(&report, input, work_dir.as_deref()).await?;
            Vec::new()
        }
        BackupMethod::Git => {
            // Cloned from the bundle, every ref compared with the report's, `git fsck` on it.
            let report = catalog::git_report(&manifest)?;
            let input = Box::pin(repo.open_stream(&manifest, &report.part).await?);
            backstop_sources::git::test_restore(&report, input, work_dir.as_deref()).await?;
            Vec::new()
        }
        _ => {
            let report = catalog::redis_report(&manifest)?;
            let input = Box::pin(
                repo.open_stream(&manifest, backstop_sources::redis::RDB_PART)
                    .await?,
            );
            let checked = backstop_sources::redis::test_restore(
                &report,
                input,
                work_dir.as_deref(),
                settings.tolerance_percent,
            )
            .await?;
            checked
                .databases
                .iter()
                .map(|d| TableCheck {
                    schema: "redis".into(),
                    table: format!("db{}", d.db),
                    expected: d.expected,
                    restored: d.restored,
                })
                .collect()
        }
    };
    let restore_ms = started.elapsed().as_millis() as u64;
    let secs = (restore_ms as f64 / 1000.0).max(0.001);
    Ok(Verified {
        tables,
        objects,
        bytes,
        restore_ms,
        bytes_per_sec: raw_bytes as f64 / secs,
        physical: None,
    })
}

async fn test_restore_logical(
    repo: &Repository,
    settings: &VerifySettings,
    scratch: &str,
    manifest: Manifest,
    actor: &Actor,
) -> Result<Verified, VerifyFailure> {
    let report = catalog::dump_report(&manifest)?;
    let scratch = ConnInfo::parse(scratch).map_err(OpsError::from)?;
    let db = format!("backstop_verify_{}", manifest.backup_id.simple());
    let target = scratch.with_database(&db).url();
    let superuser = scratch_is_superuser(&scratch).await?;
    if superuser && !settings.allow_superuser {
        return Err(OpsError::Invalid(format!(
            "the scratch role of {} is a superuser, and a test restore evaluates code the source's owners wrote (CHECK constraints, generated columns, the functions they call) with the restoring role's rights. Give test restores a role that may create databases and nothing more (CREATE ROLE backstop_verify LOGIN CREATEDB; [verify] scratch = \"postgres://backstop_verify@HOST/postgres\"), or accept the risk with [verify] allow_superuser = true",
            scratch.redacted()
        ))
        .into());
    }
    drop_database(&scratch, &db).await?;
    let raw_bytes = manifest.totals.raw_bytes;
    let objects = manifest.distinct_chunks().len() as u64 + 1;
    let bytes = manifest.totals.stored_bytes;
    let repo = repo.with_access(
        actor.to_string(),
        format!("test restore of backup {}", manifest.backup_id),
    );
    let source = Arc::new(ManifestSource {
        repo,
        manifest: Arc::new(manifest),
    });
    let options = RestoreOptions {
        jobs: settings.jobs.max(1),
        create_db: true,
        // A role that is not a superuser cannot give objects to the source's owners; the row
        // counts do not depend on who owns the tables.
        no_owner: !superuser,
        ..Default::default()
    };
    let started = Instant::now();
    let restored = backstop_sources::pg::logical::restore(&target, &options, source, &report).await;
    let restore_ms = started.elapsed().as_millis() as u64;
    let counted = match restored {
        Ok(_) => row_counts(&target).await.map_err(OpsError::from),
        Err(e) => Err(OpsError::from(e)),
    };
    // Drop the scratch database whatever happened; a failure to drop is logged, not hidden.
    if let Err(e) = drop_database(&scratch, &db).await {
        tracing::warn!(database = %db, error = %e.chain(), "could not drop the scratch database");
    }
    let counted = match counted {
        Ok(c) => c,
        // The scratch server went away mid-restore: that says nothing about the backup.
        Err(e) if e.class() == FailureClass::Environment => {
            if let Err(probe) = probe_scratch(&scratch).await {
                return Err(probe.into());
            }
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let mut tables = Vec::new();
    let mut mismatches = Vec::new();
    for t in report.tables.iter().filter(|t| t.part.is_some()) {
        let restored = counted.get(&t.table).copied().unwrap_or(0);
        let diff = (restored as f64 - t.rows as f64).abs();
        let allowed = t.rows as f64 * settings.tolerance_percent / 100.0;
        if diff > allowed {
            mismatches.push(format!(
                "{}: {} rows restored, {} recorded",
                t.table, restored, t.rows
            ));
        }
        tables.push(TableCheck {
            schema: t.table.schema.clone(),
            table: t.table.name.clone(),
            expected: t.rows,
            restored,
        });
    }
    if !mismatches.is_empty() {
        return Err(VerifyFailure {
            error: OpsError::RowCounts {
                tolerance_percent: settings.tolerance_percent,
                mismatches: mismatches.join("; "),
            },
            tables,
        });
    }
    let secs = (restore_ms as f64 / 1000.0).max(0.001);
    Ok(Verified {
        tables,
        objects,
        bytes,
        restore_ms,
        bytes_per_sec: raw_bytes as f64 / secs,
        physical: None,
    })
}

/// Whether the scratch role is a superuser (connecting to the maintenance database).
async fn scratch_is_superuser(scratch: &ConnInfo) -> Result<bool, OpsError> {
    use sqlx::Connection;
    let admin = scratch.with_database("postgres").url();
    let scratch_error = |source| OpsError::Scratch {
        server: scratch.redacted(),
        source,
    };
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .map_err(scratch_error)?;
    let superuser: bool =
        sqlx::query_scalar("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user")
            .fetch_one(&mut conn)
            .await
            .map_err(scratch_error)?;
    let _ = conn.close().await;
    Ok(superuser)
}

/// Connects to the scratch server's maintenance database, or says why it cannot.
async fn probe_scratch(scratch: &ConnInfo) -> Result<(), OpsError> {
    use sqlx::Connection;
    let admin = scratch.with_database("postgres").url();
    let conn = sqlx::PgConnection::connect(&admin)
        .await
        .map_err(|source| OpsError::Scratch {
            server: scratch.redacted(),
            source,
        })?;
    let _ = conn.close().await;
    Ok(())
}

async fn drop_database(scratch: &ConnInfo, db: &str) -> Result<(), OpsError> {
    use sqlx::Connection;
    let admin = scratch.with_database("postgres").url();
    let scratch_error = |source| OpsError::Scratch {
        server: scratch.redacted(),
        source,
    };
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .map_err(scratch_error)?;
    let sql = format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        backstop_sources::pg::names::quote_ident(db)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .map_err(scratch_error)?;
    let _ = conn.close().await;
    Ok(())
}

/// Verifies a physical backup for real: restores it into a temporary directory (recovery target
/// immediate), starts a private server on it, waits for recovery to reach consistency, runs
/// `pg_amcheck`, counts every table's rows, stops the server and removes the directory (whatever
/// the outcome). Records nothing.
pub async fn test_restore_physical(
    repo: &Repository,
    settings: &PhysicalVerifySettings,
    backup: &PhysicalBackup,
    actor: &Actor,
) -> Result<Verified, OpsError> {
    let work = scratch_dir(settings.work_dir.as_deref(), "backstop-verify")?;
    let dir = work.join("data");
    let restore_opts =
        settings.restore_options(&backup.manifest.source, RecoveryTarget::Immediate)?;
    let source = ManifestSource {
        repo: repo.with_access(
            actor.to_string(),
            format!(
                "verification of physical backup {}",
                backup.manifest.backup_id
            ),
        ),
        manifest: Arc::new(backup.manifest.clone()),
    };
    let started = Instant::now();
    let result = async {
        let restore =
            physical::restore_physical(&source, &backup.report, &dir, &restore_opts).await?;
        let verify = physical::verify_restored(&dir, &settings.verify).await?;
        Ok::<_, OpsError>((restore, verify))
    }
    .await;
    let restore_ms = started.elapsed().as_millis() as u64;
    if let Err(e) = tokio::fs::remove_dir_all(&work).await {
        tracing::warn!(dir = %work.display(), error = %e, "could not remove the verification directory");
    }
    let (restore, verify) = result?;
    let secs = (restore_ms as f64 / 1000.0).max(0.001);
    Ok(Verified {
        tables: Vec::new(),
        objects: restore.files,
        bytes: restore.bytes,
        restore_ms,
        bytes_per_sec: restore.bytes as f64 / secs,
        physical: Some((restore, verify)),
    })
}

/// How [`verify_completed`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum VerifyOutcome {
    Passed,
    /// Recorded as failed; a retry backup was requested when the chain had retries left.
    Failed {
        retried: bool,
    },
    /// Physical backups are not verified by this process (no settings); logged.
    Skipped,
}

fn append_event(
    cause: &Envelope,
    stream: &str,
    actor: &Actor,
    label: &str,
    event: Event,
) -> NewEvent {
    NewEvent::caused_by(cause, stream, actor.clone(), &event).with_derived_id(cause, label)
}

/// The whole verification of a completed backup, as the verify worker runs it (see the module
/// docs). An `Err` is a failure that says nothing about the backup (environment, configuration,
/// ledger): nothing is recorded against the backup, and the caller decides by
/// [`OpsError::is_transient`] whether to try again.
pub async fn verify_completed(
    dp: &DataPath,
    settings: &VerifySettings,
    cause: &Envelope,
    done: &BackupCompleted,
    actor: &Actor,
) -> Result<VerifyOutcome, OpsError> {
    if done.method == BackupMethod::Physical && settings.physical.is_none() {
        tracing::warn!(backup = %done.backup_id, "physical backup not test-restored: this process has no physical verification settings");
        return Ok(VerifyOutcome::Skipped);
    }
    let appender = dp.appender.as_ref();
    let verification_id = uuid_v7_derived(cause.id, cause.occurred_at, "verification");
    if done.method == BackupMethod::Logical && settings.scratch.is_none() {
        tracing::warn!(backup = %done.backup_id, "logical backup not test-restored: no [verify] scratch PostgreSQL is configured");
        return Ok(VerifyOutcome::Skipped);
    }
    let stream = streams::backup(done.backup_id);
    let append = |label: &'static str, event: Event| {
        let e = append_event(cause, &stream, actor, label, event);
        let stream = stream.clone();
        async move {
            appender
                .append(&stream, ExpectedVersion::Any, vec![e])
                .await
                .map(|_| ())
        }
    };
    append(
        "verification-started",
        Event::VerificationStarted(VerificationStarted {
            verification_id,
            backup_id: done.backup_id,
            tier: VerifyTier::Restore,
        }),
    )
    .await?;
    let expected_sha3 = parse_hash(&done.manifest_sha3);
    let outcome = match dp
        .repo
        .load_manifest_checked(done.backup_id, expected_sha3)
        .await
    {
        Ok(m) => {
            let checked = m.clone();
            match test_restore(&dp.repo, settings, m, actor).await {
                Ok(v) => Ok(v),
                Err(f) if f.error.is_data() => {
                    let reason =
                        quarantine_damage(&dp.repo, &checked, f.error.chain(), actor).await;
                    Err((reason, f.tables))
                }
                Err(f) => return Err(f.error),
            }
        }
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => Err((OpsError::from(e).chain(), Vec::new())),
    };
    match outcome {
        Ok(v) => {
            let passed = append(
                "verification-passed",
                Event::VerificationPassed(VerificationPassed {
                    verification_id,
                    backup_id: done.backup_id,
                    tier: VerifyTier::Restore,
                    objects_checked: v.objects,
                    bytes_checked: v.bytes,
                    restore_ms: Some(v.restore_ms),
                    restore_bytes_per_sec: Some(v.bytes_per_sec),
                    tables: v.tables,
                }),
            )
            .await;
            match passed {
                Ok(()) => {}
                // The pass was recorded before, by an earlier delivery of this backup.completed
                // that ended before its ack: its timings differ from this run's, so the ledger
                // refuses this copy. Accepting that cannot make a bad backup look good (this run
                // passed too); a taken id on a *failure* stays an error, so no failure is ever
                // swallowed.
                Err(e) if e.is_id_reused() => {
                    tracing::warn!(backup = %done.backup_id, error = %e, "this verification's pass was already recorded (a redelivery); this run's result is not recorded again");
                    return Ok(VerifyOutcome::Passed);
                }
                Err(e) => return Err(e.into()),
            }
            tracing::info!(backup = %done.backup_id, method = %done.method, restore_ms = v.restore_ms, "backup verified");
            Ok(VerifyOutcome::Passed)
        }
        Err((reason, tables)) => {
            tracing::error!(backup = %done.backup_id, %reason, "verification failed");
            append(
                "verification-failed",
                Event::VerificationFailed(VerificationFailed {
                    verification_id,
                    backup_id: done.backup_id,
                    tier: VerifyTier::Restore,
                    reason: reason.clone(),
                    tables,
                }),
            )
            .await?;
            let retried = request_retry(
                appender,
                settings,
                cause,
                done,
                verification_id,
                &reason,
                actor,
            )
            .await?;
            Ok(VerifyOutcome::Failed { retried })
        }
    }
}

/// After a failed test restore: reads every object of the backup to find the damaged ones and
/// moves them to `quarantine/`. The retried backup then finds them missing and uploads them
/// again from the source, which also heals every older backup that shares those chunks (a
/// chunk's id is a keyed hash of its content). Returns the reason, extended with what was found.
pub async fn quarantine_damage(
    repo: &Repository,
    manifest: &Manifest,
    reason: String,
    actor: &Actor,
) -> String {
    let repo = repo.with_access(
        actor.to_string(),
        format!("damage check of backup {}", manifest.backup_id),
    );
    let report = match repo.check_backup(manifest, Some(100.0)).await {
        Ok(r) => r,
        Err(e) => return format!("{reason}; the damage check failed too: {e}"),
    };
    let damaged: Vec<String> = report
        .problems
        .iter()
        .filter(|p| {
            matches!(
                p.kind,
                backstop_repo::ProblemKind::Corrupt | backstop_repo::ProblemKind::Damaged
            ) && p.key.starts_with("chunks/")
        })
        .map(|p| p.key.clone())
        .collect();
    let mut moved = Vec::new();
    for key in &damaged {
        let backend = repo.backend();
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
        let result = async {
            let bytes = backend.get(key).await?;
            backend
                .put(&format!("quarantine/{key}.{stamp}"), bytes)
                .await?;
            backend.delete(key).await
        }
        .await;
        match result {
            Ok(()) => moved.push(key.clone()),
            Err(e) => {
                tracing::error!(object = %key, error = %e, "could not quarantine a damaged object")
            }
        }
    }
    if damaged.is_empty() {
        reason
    } else {
        format!(
            "{reason}; damaged objects moved to quarantine/ so the retry uploads them again: {}",
            moved.join(", ")
        )
    }
}

/// Asks for a new full backup of the same source and method after a failed verification, unless
/// the chain has had `max_retries` retries. Returns whether it asked.
async fn request_retry(
    appender: &dyn Appender,
    settings: &VerifySettings,
    cause: &Envelope,
    done: &BackupCompleted,
    verification_id: Uuid,
    reason: &str,
    actor: &Actor,
) -> Result<bool, OpsError> {
    let attempt = done.attempt;
    if attempt > settings.max_retries {
        tracing::error!(backup = %done.backup_id, attempt, "no more retries after failed verification");
        return Ok(false);
    }
    let backup_id = uuid_v7_derived(verification_id, cause.occurred_at, "retry");
    let stream = streams::backup(backup_id);
    let e = append_event(
        cause,
        &stream,
        actor,
        "retry-requested",
        Event::BackupRequested(BackupRequested {
            backup_id,
            source: done.source.clone(),
            kind: BackupKind::Full,
            method: done.method,
            trigger: Trigger::Retry {
                of: done.backup_id,
                reason: format!("verification failed: {reason}"),
            },
            attempt: attempt + 1,
        }),
    );
    appender
        .append(&stream, ExpectedVersion::Any, vec![e])
        .await?;
    Ok(true)
}

fn parse_hash(hex_text: &str) -> Option<Hash32> {
    let bytes = hex::decode(hex_text).ok()?;
    Some(Hash32(bytes.try_into().ok()?))
}
