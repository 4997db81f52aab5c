//! The restore use cases: a logical backup into a database, a physical one into a data
//! directory that PostgreSQL recovers to a point in time. Events, on the stream `recovery-<id>`:
//!
//! ```text
//! recovery.requested -> recovery.started -> recovery.completed | recovery.failed
//! ```
//!
//! with the operator and the scope (the target redacted of any password; the tables; the
//! recovery target). A foreground restore appends requested and started together, so no restore
//! worker takes it for one it should run; a worker claims a requested recovery by appending
//! started at stream version 1 ([`claim`]).
//!
//! While a restore runs, its process renews the recovery's lease (`lease.renewed`,
//! [`crate::lease`]); if it dies, serve's lease monitor records `recovery.failed` (abandoned).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use backstop_events::{
    Actor, Envelope, Event, LeasedJob, NewEvent, RecoveryCompleted, RecoveryFailed,
    RecoveryRequested, RecoveryScope, RecoveryStarted, TableRows, streams,
};
use backstop_ledger::{Appender, ExpectedVersion, LedgerError};
use backstop_repo::{Manifest, Repository};
use backstop_sources::pg::logical::{self, RestoreOptions, RestoreReport};
use backstop_sources::pg::physical::{
    self, BaseBackupReport, PhysicalRestoreOptions, PhysicalRestoreReport, RecoveryTarget,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::catalog::{self, PhysicalBackup, Selector};
use crate::context::DataPath;
use crate::error::OpsError;
use crate::lease::Heartbeat;
use crate::parts::ManifestSource;
use crate::record::record;

/// Who runs a recovery and what it covers.
/// Where restores requested through the ledger may go (`[restore] allowed_targets`).
///
/// The restore worker decrypts a whole backup into whatever target a `recovery.requested`
/// names, so the list is checked where the work happens, not only by the API: a forged request
/// (from anyone who can append) naming another server is refused and recorded. Entries are
/// `postgres://HOST[:PORT]/DATABASE`, or `postgres://HOST[:PORT]/*` for every database of a
/// server; users and passwords in entries are ignored, and a target carrying a password is
/// always refused (credentials come from the worker's environment or `~/.pgpass`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RestoreTargets {
    allowed: Vec<(String, u16, Option<String>)>,
}

impl RestoreTargets {
    /// Parses the configured entries; a malformed one is an error that names it.
    pub fn parse(entries: &[String]) -> Result<RestoreTargets, String> {
        let mut allowed = Vec::new();
        for entry in entries {
            let (url, any_db) = match entry.strip_suffix("/*") {
                Some(server) => (format!("{server}/postgres"), true),
                None => (entry.clone(), false),
            };
            let ci = backstop_sources::pg::ConnInfo::parse(&url).map_err(|e| {
                format!("restore.allowed_targets: {entry:?} is not a postgres:// URL: {e}")
            })?;
            if ci.has_password() {
                return Err(format!(
                    "restore.allowed_targets: {entry:?} carries a password; list the server and database only"
                ));
            }
            let (host, port, db) = ci.place();
            allowed.push((host, port, (!any_db).then_some(db)));
        }
        Ok(RestoreTargets { allowed })
    }

    /// Refuses a target not on the list (the reason is recorded in `recovery.failed`).
    pub fn check(&self, target: &str) -> Result<(), String> {
        let ci = backstop_sources::pg::ConnInfo::parse(target)
            .map_err(|e| format!("the restore target is not a PostgreSQL URL: {e}"))?;
        if ci.has_password() {
            return Err("the restore target carries a password; requests never do (the worker's environment or ~/.pgpass supplies it)".into());
        }
        let (host, port, db) = ci.place();
        let ok = self
            .allowed
            .iter()
            .any(|(h, p, d)| *h == host && *p == port && d.as_ref().is_none_or(|d| *d == db));
        if ok {
            return Ok(());
        }
        if self.allowed.is_empty() {
            return Err(format!(
                "restores through the ledger are off: no [restore] allowed_targets in the worker's configuration; add \"postgres://{host}:{port}/{db}\" (or \"postgres://{host}:{port}/*\") if this target is meant to receive restores"
            ));
        }
        Err(format!(
            "{} is not in [restore] allowed_targets; refused (a request naming any other server is refused and recorded)",
            ci.redacted()
        ))
    }
}

pub struct Recovery {
    pub recovery_id: Uuid,
    pub requested_at: DateTime<Utc>,
    pub operator: String,
    pub scope: RecoveryScope,
    /// Who records the recovery's events: the operator for a foreground restore, the worker for
    /// a requested one (whose events are signed by the worker's identity, which may not append
    /// as an operator; the operator who asked stays in every payload).
    pub actor: Actor,
}

impl Recovery {
    /// A new recovery, requested now.
    pub fn new(operator: &str, scope: RecoveryScope) -> Recovery {
        Recovery {
            recovery_id: backstop_events::uuid_v7(),
            requested_at: backstop_events::now_micros(),
            operator: operator.to_string(),
            scope,
            actor: Actor::operator(operator),
        }
    }

    fn stream(&self) -> String {
        streams::recovery(self.recovery_id)
    }

    fn event(&self, label: &str, event: Event) -> NewEvent {
        let mut n = NewEvent::new(self.stream(), self.actor.clone(), &event);
        n.id = backstop_events::uuid_v7_derived(self.recovery_id, self.requested_at, label);
        n
    }

    /// Records `recovery.requested` and `recovery.started` in one append (a foreground restore).
    pub async fn begin(&self, appender: &dyn Appender, backup_id: Uuid) -> Result<(), OpsError> {
        let mut requested = self.event(
            "requested",
            Event::RecoveryRequested(RecoveryRequested {
                recovery_id: self.recovery_id,
                backup_id,
                operator: self.operator.clone(),
                scope: self.scope.clone(),
            }),
        );
        // The request's recorded time is `requested_at`, which the ids of this recovery's
        // events derive from: so the lease monitor derives the same `recovery.failed` id.
        requested.occurred_at = self.requested_at;
        let started = self.event(
            "started",
            Event::RecoveryStarted(RecoveryStarted {
                recovery_id: self.recovery_id,
                backup_id,
                operator: self.operator.clone(),
                scope: self.scope.clone(),
            }),
        );
        appender
            .append(
                &self.stream(),
                ExpectedVersion::NoStream,
                vec![requested, started],
            )
            .await?;
        Ok(())
    }

    /// Records the end of the recovery: completed with its figures, or failed with the reason.
    pub(crate) async fn end(
        &self,
        appender: &dyn Appender,
        backup_id: Uuid,
        cause: Option<&Envelope>,
        outcome: Result<(u64, u64, Vec<TableRows>), &OpsError>,
    ) -> Result<(), OpsError> {
        let (label, event) = match outcome {
            Ok((duration_ms, bytes, tables)) => (
                "completed",
                Event::RecoveryCompleted(RecoveryCompleted {
                    recovery_id: self.recovery_id,
                    backup_id,
                    operator: self.operator.clone(),
                    scope: self.scope.clone(),
                    duration_ms,
                    bytes,
                    tables,
                }),
            ),
            Err(e) => (
                "failed",
                Event::RecoveryFailed(RecoveryFailed {
                    recovery_id: self.recovery_id,
                    backup_id,
                    operator: self.operator.clone(),
                    scope: self.scope.clone(),
                    reason: e.chain(),
                }),
            ),
        };
        match record(
            appender,
            &self.stream(),
            &self.actor,
            cause,
            self.requested_at,
            label,
            self.recovery_id,
            event,
        )
        .await
        {
            Ok(()) => Ok(()),
            // A failure whose id is taken was recorded already: by the lease monitor, which
            // judged this slow run abandoned, under the id this run would give it.
            Err(e) if label == "failed" && e.is_id_reused() => {
                tracing::info!(recovery = %self.recovery_id, "the failure was already recorded (abandoned by the lease monitor?)");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// How a worker's claim of a requested recovery went.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// This worker runs it.
    Won,
    /// Someone else started it (another worker, or a foreground restore).
    Lost,
    /// This worker claimed it before and stopped: whether the restore got anywhere is unknown,
    /// and running it again over a half-restored target would fail or mislead.
    ClaimedBefore,
}

/// Claims a `recovery.requested` by appending `recovery.started` at stream version 1: exactly
/// one claimant wins.
pub async fn claim(
    appender: &dyn Appender,
    event: &Envelope,
    request: &RecoveryRequested,
    actor: &Actor,
) -> Result<Claim, OpsError> {
    let stream = streams::recovery(request.recovery_id);
    let started = NewEvent::caused_by(
        event,
        &stream,
        actor.clone(),
        &Event::RecoveryStarted(RecoveryStarted {
            recovery_id: request.recovery_id,
            backup_id: request.backup_id,
            operator: request.operator.clone(),
            scope: request.scope.clone(),
        }),
    )
    .with_derived_id(event, "restore-claim");
    match appender
        .append(&stream, ExpectedVersion::Exact(1), vec![started])
        .await
    {
        Ok(a) if a.events.iter().all(|c| c.duplicate) => Ok(Claim::ClaimedBefore),
        Ok(_) => Ok(Claim::Won),
        Err(LedgerError::Conflict { .. }) => Ok(Claim::Lost),
        Err(e) => Err(e.into()),
    }
}

/// Restores a logical backup into `target` in the foreground (`backstop restore`), recording
/// the recovery with the operator.
pub async fn restore_logical(
    dp: &DataPath,
    manifest: Manifest,
    recovery: &Recovery,
    target: &str,
    options: RestoreOptions,
) -> Result<RestoreReport, OpsError> {
    recovery
        .begin(dp.appender.as_ref(), manifest.backup_id)
        .await?;
    execute_logical(dp, manifest, recovery, target, options, None).await
}

/// Runs a logical recovery that is recorded as started, then records its end.
pub async fn execute_logical(
    dp: &DataPath,
    manifest: Manifest,
    recovery: &Recovery,
    target: &str,
    options: RestoreOptions,
    cause: Option<&Envelope>,
) -> Result<RestoreReport, OpsError> {
    let backup_id = manifest.backup_id;
    let started = Instant::now();
    let repo = dp.repo.with_access(
        recovery.actor.to_string(),
        // The location names the copy that serves the restore (the primary or a replica).
        format!(
            "restore of backup {backup_id} requested by {}, read from {}",
            recovery.operator,
            dp.repo.location()
        ),
    );
    let restore = async {
        let report = catalog::dump_report(&manifest)?;
        let source = Arc::new(ManifestSource {
            repo,
            manifest: Arc::new(manifest),
        });
        Ok::<_, OpsError>(logical::restore(target, &options, source, &report).await?)
    };
    // The lease, renewed while the restore runs (crate::lease).
    let actor = recovery.actor.clone();
    let heartbeat = Heartbeat::new(
        dp.appender.as_ref(),
        LeasedJob::Recovery,
        recovery.recovery_id,
        &actor,
        cause,
    );
    let outcome = heartbeat.beside(restore).await;
    let figures = outcome.as_ref().map(|r| {
        (
            started.elapsed().as_millis() as u64,
            r.bytes,
            r.tables
                .iter()
                .map(|t| TableRows {
                    schema: t.table.schema.clone(),
                    table: t.table.name.clone(),
                    rows: t.rows,
                })
                .collect(),
        )
    });
    recovery
        .end(dp.appender.as_ref(), backup_id, cause, figures)
        .await?;
    outcome
}

/// Picks the base backup to restore: `which` is a backup id or `latest` (the newest one that can
/// reach `target`, among those `selector` allows).
pub async fn select_base_backup(
    repo: &Repository,
    which: &str,
    selector: &Selector<'_>,
    target: &RecoveryTarget,
) -> Result<PhysicalBackup, OpsError> {
    if which != "latest" {
        let resolved = catalog::resolve_backup(repo, which, selector).await?;
        return PhysicalBackup::from_manifest(resolved.manifest);
    }
    let backups: Vec<PhysicalBackup> = catalog::physical_backups(repo, selector.source)
        .await?
        .into_iter()
        .filter(|b| {
            selector
                .verified
                .is_none_or(|v| v.contains(&b.manifest.backup_id))
        })
        .collect();
    if backups.is_empty() {
        let what = if selector.verified.is_some() {
            "verified physical backup"
        } else {
            "physical backup"
        };
        return Err(OpsError::NoBackup(match selector.source {
            Some(s) => format!(
                "the repository holds no {what} of `{s}`; take one with `backstop backup --source {s} --physical`{}",
                if selector.verified.is_some() {
                    " (or pass --allow-unverified)"
                } else {
                    ""
                }
            ),
            None => format!(
                "the repository holds no {what}; take one with `backstop backup --physical`{}",
                if selector.verified.is_some() {
                    " (or pass --allow-unverified)"
                } else {
                    ""
                }
            ),
        }));
    }
    let reports: Vec<BaseBackupReport> = backups.iter().map(|b| b.report.clone()).collect();
    let Some(chosen) = physical::choose_base_backup(&reports, target) else {
        let earliest = &backups[0].report;
        return Err(OpsError::Invalid(format!(
            "no base backup can reach {target}: the earliest restorable moment is {} (LSN {}); choose a later target",
            earliest.finished_at.to_rfc3339(),
            earliest.stop_lsn
        )));
    };
    let index = reports
        .iter()
        .position(|r| r == chosen)
        .unwrap_or(backups.len() - 1);
    Ok(backups[index].clone())
}

/// Restores `backup` into `dir` so that PostgreSQL started on it recovers to `opts.target`,
/// recording the recovery with `operator`.
pub async fn restore_physical(
    repo: &Repository,
    appender: &dyn Appender,
    backup: &PhysicalBackup,
    dir: &Path,
    opts: &PhysicalRestoreOptions,
    operator: &str,
) -> Result<PhysicalRestoreReport, OpsError> {
    let recovery = Recovery::new(
        operator,
        RecoveryScope {
            target: dir.display().to_string(),
            tables: Vec::new(),
            point_in_time: Some(opts.target.to_string()),
            dry_run: false,
        },
    );
    let backup_id = backup.manifest.backup_id;
    recovery.begin(appender, backup_id).await?;
    let started = Instant::now();
    let source = ManifestSource {
        repo: repo.with_access(
            Actor::operator(operator).to_string(),
            format!(
                "physical restore of backup {backup_id} into {}, read from {}",
                dir.display(),
                repo.location()
            ),
        ),
        manifest: Arc::new(backup.manifest.clone()),
    };
    // The lease, renewed while the restore runs (crate::lease).
    let actor = Actor::operator(operator);
    let heartbeat = Heartbeat::new(
        appender,
        LeasedJob::Recovery,
        recovery.recovery_id,
        &actor,
        None,
    );
    let outcome = heartbeat
        .beside(physical::restore_physical(
            &source,
            &backup.report,
            dir,
            opts,
        ))
        .await
        .map_err(OpsError::from);
    let figures = outcome
        .as_ref()
        .map(|r| (started.elapsed().as_millis() as u64, r.bytes, Vec::new()));
    recovery.end(appender, backup_id, None, figures).await?;
    outcome
}

/// Where a command backup or Redis snapshot is restored to.
#[derive(Clone, Debug)]
pub enum StreamTarget {
    /// The raw stream written to this file (a Redis `dump.rdb` for a stopped server; a command
    /// backup's output, or its directory's tar archive), through `FILE.partial`.
    File(std::path::PathBuf),
    /// A command backup's restore command run with `$BACKSTOP_TARGET` set to this (its standard
    /// input the backup, or `$BACKSTOP_DIR` the extracted directory). `command` overrides the
    /// restore command recorded in the backup.
    Command {
        target: String,
        command: Option<String>,
    },
}

/// Restores a command backup or a Redis snapshot in the foreground (`backstop restore ID
/// --out FILE`, or a command backup's restore command), recording the recovery with the
/// operator like every restore. The raw stream's bytes and SHA3 are checked against the
/// manifest's, and every chunk on the way.
pub async fn restore_stream(
    dp: &DataPath,
    manifest: Manifest,
    recovery: &Recovery,
    target: &StreamTarget,
) -> Result<u64, OpsError> {
    let backup_id = manifest.backup_id;
    let (part, bytes, sha3, command) = match catalog::method_of(&manifest) {
        backstop_events::BackupMethod::Command => {
            let r = catalog::command_report(&manifest)?;
            (r.part.clone(), r.bytes, r.sha3.clone(), Some(r))
        }
        backstop_events::BackupMethod::Git => {
            // The bundle itself: `git clone FILE.bundle` restores the repository.
            let r = catalog::git_report(&manifest)?;
            (r.part.clone(), r.bytes, r.sha3.clone(), None)
        }
        backstop_events::BackupMethod::Redis => {
            let r = catalog::redis_report(&manifest)?;
            (
                backstop_sources::redis::RDB_PART.to_string(),
                r.bytes,
                r.sha3,
                None,
            )
        }
        other => {
            return Err(OpsError::Invalid(format!(
                "backup {backup_id} is a {other} PostgreSQL backup: restore it with --to postgres://... (or --physical --to-dir)"
            )));
        }
    };
    recovery
        .begin(dp.appender.as_ref(), manifest.backup_id)
        .await?;
    let started = Instant::now();
    let repo = dp.repo.with_access(
        recovery.actor.to_string(),
        // The location names the copy that serves the restore (the primary or a replica).
        format!(
            "restore of backup {backup_id} requested by {}, read from {}",
            recovery.operator,
            dp.repo.location()
        ),
    );
    let work = async {
        let input = Box::pin(repo.open_stream(&manifest, &part).await?);
        match target {
            StreamTarget::File(out) => {
                backstop_sources::command::write_raw(input, (bytes, &sha3), out).await?
            }
            StreamTarget::Command {
                target,
                command: cmd,
            } => {
                let Some(report) = &command else {
                    return Err(OpsError::Invalid(match catalog::method_of(&manifest) {
                        backstop_events::BackupMethod::Git => format!(
                            "backup {backup_id} is a git bundle: write it with --out FILE.bundle, then `git clone FILE.bundle`"
                        ),
                        _ => format!(
                            "backup {backup_id} is a Redis snapshot: write its dump.rdb with --out FILE"
                        ),
                    }));
                };
                let restore_cmd = cmd.clone().or(report.restore_command.clone()).ok_or_else(|| {
                    OpsError::Invalid(format!(
                        "backup {backup_id} records no restore command (the source had no `restore`): pass --restore-with CMD, or write the raw stream with --out FILE"
                    ))
                })?;
                backstop_sources::command::restore(report, &restore_cmd, target, input, None)
                    .await?
            }
        }
        Ok::<u64, OpsError>(bytes)
    };
    let actor = recovery.actor.clone();
    let heartbeat = Heartbeat::new(
        dp.appender.as_ref(),
        LeasedJob::Recovery,
        recovery.recovery_id,
        &actor,
        None,
    );
    let outcome = heartbeat.beside(work).await;
    let figures = outcome
        .as_ref()
        .map(|b| (started.elapsed().as_millis() as u64, *b, Vec::new()));
    recovery
        .end(dp.appender.as_ref(), backup_id, None, figures)
        .await?;
    outcome
}
