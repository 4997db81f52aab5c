//! The restore worker: runs the restores a recovery lead requests through the API.
//!
//! `POST /api/restores` (recovery-lead role) records `recovery.requested` with the lead's
//! identity and the scope. This worker claims the recovery by appending `recovery.started` at
//! stream version 1: exactly one claimant wins (a second worker, or a foreground
//! `backstop restore`, which appends requested and started together, gets a conflict and leaves
//! it). It then restores the logical backup into the target and records `recovery.completed` or
//! `recovery.failed`.
//!
//! Credentials for the target never travel in events: the API refuses a target with a password,
//! and the worker's environment supplies it (`PGPASSWORD`, `PGPASSFILE` or `~/.pgpass`).
//! Point-in-time (physical) restores lay out a data directory on a machine and are run there with
//! `backstop restore --physical`; this worker records them as failed with that instruction.

use async_trait::async_trait;
use backstop_events::{Actor, Envelope, Event, NewEvent, RecoveryFailed, RecoveryStarted, streams};
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ledger::{Appender, ExpectedVersion, LedgerError};
use backstop_sources::pg::logical::RestoreOptions;

use crate::backup::{DataPath, Recovery, execute_restore};

pub const NAME: &str = "restore";

pub struct RestoreWorker {
    pub data_path: DataPath,
}

#[async_trait]
impl Handler for RestoreWorker {
    fn name(&self) -> &str {
        NAME
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == "recovery.requested"
    }

    async fn handle(&self, event: &Envelope, appender: &dyn Appender) -> Result<(), HandlerError> {
        let Ok(Event::RecoveryRequested(r)) = event.event() else {
            return Err(HandlerError::permanent(format!(
                "event {} is not a readable recovery.requested",
                event.position
            )));
        };
        let stream = streams::recovery(r.recovery_id);
        let actor = Actor::worker(NAME);
        let started = NewEvent::caused_by(
            event,
            &stream,
            actor.clone(),
            &Event::RecoveryStarted(RecoveryStarted {
                recovery_id: r.recovery_id,
                backup_id: r.backup_id,
                operator: r.operator.clone(),
                scope: r.scope.clone(),
            }),
        )
        .with_derived_id(event, "restore-claim");
        match appender
            .append(&stream, ExpectedVersion::Exact(1), vec![started])
            .await
        {
            Ok(a) if a.events.iter().all(|c| c.duplicate) => {
                // Claimed before by this worker, which then stopped: whether the restore got
                // anywhere is unknown, and running it again over a half-restored target would
                // fail or mislead. Leave it to the recovery lead (the stream shows it started).
                tracing::warn!(recovery = %r.recovery_id, "recovery was claimed before and not finished; not running it twice");
                return Ok(());
            }
            Ok(_) => {}
            Err(LedgerError::Conflict { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let recovery = Recovery {
            recovery_id: r.recovery_id,
            requested_at: event.occurred_at,
            operator: r.operator.clone(),
            scope: r.scope.clone(),
        };
        if r.scope.point_in_time.is_some() || !r.scope.target.starts_with("postgres") {
            let reason = "point-in-time and directory restores run on the target machine: `backstop restore --physical --to-dir DIR --target-time T`".to_string();
            let failed = NewEvent::caused_by(
                event,
                &stream,
                actor,
                &Event::RecoveryFailed(RecoveryFailed {
                    recovery_id: r.recovery_id,
                    backup_id: r.backup_id,
                    operator: r.operator.clone(),
                    scope: r.scope.clone(),
                    reason,
                }),
            )
            .with_derived_id(event, "restore-refused");
            appender
                .append(&stream, ExpectedVersion::Any, vec![failed])
                .await?;
            return Ok(());
        }
        let manifest = match self.data_path.repo.load_manifest(r.backup_id).await {
            Ok(m) => m,
            Err(e) if e.is_transient() => return Err(HandlerError::retryable(e.to_string())),
            Err(e) => {
                return Err(HandlerError::permanent(format!(
                    "backup {} cannot be read: {e}",
                    r.backup_id
                )));
            }
        };
        let options = RestoreOptions {
            tables: (!r.scope.tables.is_empty()).then(|| r.scope.tables.clone()),
            create_db: true,
            dry_run: r.scope.dry_run,
            ..Default::default()
        };
        // The outcome is recorded either way; a failed restore is not a failed handler.
        let _ = execute_restore(
            &self.data_path,
            manifest,
            &recovery,
            &r.scope.target,
            options,
            Some(event),
        )
        .await;
        Ok(())
    }
}
