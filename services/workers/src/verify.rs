//! The verify worker: every completed backup proves itself by a real test restore.
//!
//! On `backup.completed` (logical backups) it:
//! 1. records `verification.started`;
//! 2. loads the manifest and checks it against the SHA3 the completion event recorded;
//! 3. restores the whole backup into a temporary database on the scratch server, which reads
//!    every object of the backup and checks each one's SHA3, decryption and chunk id on the way;
//! 4. counts the rows of every restored table and compares them with the counts taken in the
//!    source's snapshot (within `tolerance_percent`);
//! 5. drops the temporary database, whatever happened;
//! 6. records `verification.passed` (with the restore speed, for recovery-time estimates) or
//!    `verification.failed` with the reason and the figures.
//!
//! A failed verification is followed by a new `backup.requested` (trigger `retry`) until the
//! source has had `max_retries` retries for that chain; the alert worker raises the critical
//! alert from `verification.failed`. Event ids derive from the completion event, so a redelivered
//! completion verifies again but records nothing twice.

use std::time::Instant;

use async_trait::async_trait;
use backstop_events::{
    Actor, BackupCompleted, BackupRequested, Envelope, Event, NewEvent, TableCheck, Trigger,
    VerificationFailed, VerificationPassed, VerificationStarted, VerifyTier, streams,
    uuid_v7_derived,
};
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ledger::{Appender, ExpectedVersion};
use backstop_repo::{Hash32, Manifest};
use backstop_sources::pg::ConnInfo;
use backstop_sources::pg::logical::{RestoreOptions, row_counts};
use uuid::Uuid;

use crate::backup::{DataPath, ManifestSource, dump_report};

/// Where test restores go and how strict the comparison is.
#[derive(Clone, Debug)]
pub struct VerifySettings {
    /// A PostgreSQL URL on which the worker may create and drop databases.
    pub scratch: String,
    /// Allowed difference between restored and recorded row counts, in percent.
    pub tolerance_percent: f64,
    /// Backups retried after failed verifications, at most, per chain.
    pub max_retries: u32,
    pub jobs: usize,
}

pub const NAME: &str = "verify";

pub struct VerifyWorker {
    pub data_path: DataPath,
    pub settings: VerifySettings,
}

/// What a test restore found.
pub struct Outcome {
    pub tables: Vec<TableCheck>,
    pub objects: u64,
    pub bytes: u64,
    pub restore_ms: u64,
    pub raw_bytes: u64,
}

impl VerifyWorker {
    /// Restores `manifest` into a scratch database, compares row counts, drops the database.
    pub async fn test_restore(
        &self,
        manifest: Manifest,
    ) -> Result<Outcome, (String, Vec<TableCheck>)> {
        let fail = |reason: String| (reason, Vec::new());
        let report = dump_report(&manifest).map_err(|e| fail(e.to_string()))?;
        let scratch = ConnInfo::parse(&self.settings.scratch).map_err(|e| fail(e.to_string()))?;
        let db = format!("backstop_verify_{}", manifest.backup_id.simple());
        let target = scratch.with_database(&db).url();
        drop_database(&scratch, &db).await.map_err(fail)?;
        let raw_bytes = manifest.totals.raw_bytes;
        let objects = manifest.distinct_chunks().len() as u64 + 1;
        let bytes = manifest.totals.stored_bytes;
        let repo = self.data_path.repo.with_access(
            Actor::worker(NAME).to_string(),
            format!("test restore of backup {}", manifest.backup_id),
        );
        let source = std::sync::Arc::new(ManifestSource {
            repo,
            manifest: std::sync::Arc::new(manifest),
        });
        let options = RestoreOptions {
            jobs: self.settings.jobs.max(1),
            create_db: true,
            ..Default::default()
        };
        let started = Instant::now();
        let restored =
            backstop_sources::pg::logical::restore(&target, &options, source, &report).await;
        let restore_ms = started.elapsed().as_millis() as u64;
        let counted = match &restored {
            Ok(_) => row_counts(&target).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        // Drop the scratch database whatever happened; a failure to drop is logged, not hidden.
        if let Err(e) = drop_database(&scratch, &db).await {
            tracing::warn!(database = %db, error = %e, "could not drop the scratch database");
        }
        let counted = counted.map_err(fail)?;
        let mut tables = Vec::new();
        let mut mismatches = Vec::new();
        for t in report.tables.iter().filter(|t| t.part.is_some()) {
            let restored = counted.get(&t.table).copied().unwrap_or(0);
            let diff = (restored as f64 - t.rows as f64).abs();
            let allowed = t.rows as f64 * self.settings.tolerance_percent / 100.0;
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
            return Err((
                format!(
                    "row counts differ beyond {}%: {}",
                    self.settings.tolerance_percent,
                    mismatches.join("; ")
                ),
                tables,
            ));
        }
        Ok(Outcome {
            tables,
            objects,
            bytes,
            restore_ms,
            raw_bytes,
        })
    }
}

async fn drop_database(scratch: &ConnInfo, db: &str) -> Result<(), String> {
    use sqlx::Connection;
    let admin = scratch.with_database("postgres").url();
    let mut conn = sqlx::PgConnection::connect(&admin).await.map_err(|e| {
        format!(
            "cannot reach the scratch server {}: {e}",
            scratch.redacted()
        )
    })?;
    let sql = format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        backstop_sources::pg::names::quote_ident(db)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .map_err(|e| format!("cannot drop scratch database {db}: {e}"))?;
    let _ = conn.close().await;
    Ok(())
}

async fn append(
    appender: &dyn Appender,
    cause: &Envelope,
    stream: &str,
    label: &str,
    event: Event,
) -> Result<(), HandlerError> {
    let e = NewEvent::caused_by(cause, stream, Actor::worker(NAME), &event)
        .with_derived_id(cause, label);
    appender
        .append(stream, ExpectedVersion::Any, vec![e])
        .await?;
    Ok(())
}

#[async_trait]
impl Handler for VerifyWorker {
    fn name(&self) -> &str {
        NAME
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == "backup.completed"
    }

    async fn handle(&self, event: &Envelope, appender: &dyn Appender) -> Result<(), HandlerError> {
        let Ok(Event::BackupCompleted(done)) = event.event() else {
            return Err(HandlerError::permanent(format!(
                "event {} is not a readable backup.completed",
                event.position
            )));
        };
        if done.physical {
            // Physical backups are verified by `backstop verify --physical`.
            return Ok(());
        }
        let verification_id = uuid_v7_derived(event.id, event.occurred_at, "verification");
        let stream = streams::backup(done.backup_id);
        append(
            appender,
            event,
            &stream,
            "verification-started",
            Event::VerificationStarted(VerificationStarted {
                verification_id,
                backup_id: done.backup_id,
                tier: VerifyTier::Restore,
            }),
        )
        .await?;
        let expected_sha3 = parse_hash(&done.manifest_sha3);
        let manifest = self
            .data_path
            .repo
            .load_manifest_checked(done.backup_id, expected_sha3)
            .await;
        let outcome = match manifest {
            Ok(m) => {
                let checked = m.clone();
                match self.test_restore(m).await {
                    Ok(o) => Ok(o),
                    Err((reason, tables)) if !is_environmental(&reason) => {
                        Err((self.quarantine_damage(&checked, reason).await, tables))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) if e.is_transient() => return Err(HandlerError::retryable(e.to_string())),
            Err(e) => Err((e.to_string(), Vec::new())),
        };
        match outcome {
            Ok(o) => {
                let secs = (o.restore_ms as f64 / 1000.0).max(0.001);
                append(
                    appender,
                    event,
                    &stream,
                    "verification-passed",
                    Event::VerificationPassed(VerificationPassed {
                        verification_id,
                        backup_id: done.backup_id,
                        tier: VerifyTier::Restore,
                        objects_checked: o.objects,
                        bytes_checked: o.bytes,
                        restore_ms: Some(o.restore_ms),
                        restore_bytes_per_sec: Some(o.raw_bytes as f64 / secs),
                        tables: o.tables,
                    }),
                )
                .await?;
                tracing::info!(backup = %done.backup_id, restore_ms = o.restore_ms, "backup verified");
            }
            Err((reason, tables)) if is_environmental(&reason) => {
                // The scratch server being down says nothing about the backup: try again later.
                drop(tables);
                return Err(HandlerError::retryable(reason));
            }
            Err((reason, tables)) => {
                tracing::error!(backup = %done.backup_id, %reason, "verification failed");
                append(
                    appender,
                    event,
                    &stream,
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
                self.retry_backup(event, &done, verification_id, &reason, appender)
                    .await?;
            }
        }
        Ok(())
    }
}

impl VerifyWorker {
    /// After a failed test restore: reads every object of the backup to find the damaged ones and
    /// moves them to `quarantine/`. The retried backup then finds them missing and uploads them
    /// again from the source, which also heals every older backup that shares those chunks (a
    /// chunk's id is a keyed hash of its content). Returns the reason, extended with what was
    /// found.
    async fn quarantine_damage(&self, manifest: &Manifest, reason: String) -> String {
        let repo = self.data_path.repo.with_access(
            Actor::worker(NAME).to_string(),
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

    async fn retry_backup(
        &self,
        cause: &Envelope,
        done: &BackupCompleted,
        verification_id: Uuid,
        reason: &str,
        appender: &dyn Appender,
    ) -> Result<(), HandlerError> {
        let attempt = done.attempt;
        if attempt > self.settings.max_retries {
            tracing::error!(backup = %done.backup_id, attempt, "no more retries after failed verification");
            return Ok(());
        }
        let backup_id = uuid_v7_derived(verification_id, cause.occurred_at, "retry");
        let stream = streams::backup(backup_id);
        append(
            appender,
            cause,
            &stream,
            "retry-requested",
            Event::BackupRequested(BackupRequested {
                backup_id,
                source: done.source.clone(),
                kind: backstop_events::BackupKind::Full,
                physical: false,
                trigger: Trigger::Retry {
                    of: done.backup_id,
                    reason: format!("verification failed: {reason}"),
                },
                attempt: attempt + 1,
            }),
        )
        .await
    }
}

fn is_environmental(reason: &str) -> bool {
    reason.contains("cannot reach the scratch server")
}

fn parse_hash(hex_text: &str) -> Option<Hash32> {
    let bytes = hex::decode(hex_text).ok()?;
    Some(Hash32(bytes.try_into().ok()?))
}
