//! The restore worker: runs the restores a recovery lead requests through the API.
//!
//! `POST /api/restores` (recovery-lead role) records `recovery.requested` with the lead's
//! identity and the scope. This worker claims the recovery ([`backstop_ops::restore::claim`]:
//! `recovery.started` at stream version 1, so exactly one claimant wins), then restores the
//! backup into the target and records `recovery.completed` or `recovery.failed`.
//!
//! Credentials for the target never travel in events: the API refuses a target with a password,
//! and the worker's environment supplies it (`PGPASSWORD`, `PGPASSFILE` or `~/.pgpass`).
//! Targets come from an allow-list (`[restore] allowed_targets`, checked here, where the backup
//! is decrypted): a request naming any other server, forged or mistaken, is recorded as failed
//! and nothing is restored.
//! Physical (point-in-time) restores lay out a data directory on the machine that will run it,
//! with `backstop restore --physical`; this worker records such a request as failed with that
//! instruction.

use async_trait::async_trait;
use backstop_events::{Actor, BackupMethod, Envelope, Event, RecoveryFailed, streams};
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ledger::{Appender, ExpectedVersion};
use backstop_ops::restore::{Claim, Recovery, claim, execute_logical};
use backstop_ops::{DataPath, catalog};
use backstop_sources::pg::logical::RestoreOptions;

use crate::backup::handler_error;

pub const NAME: &str = "restore";

pub struct RestoreWorker {
    pub data_path: DataPath,
    /// Where requested restores may go; anything else is refused and recorded.
    pub allowed_targets: backstop_ops::restore::RestoreTargets,
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
            return Err(crate::unreadable(event, "recovery.requested"));
        };
        let actor = Actor::worker(NAME);
        match claim(appender, event, &r, &actor)
            .await
            .map_err(handler_error)?
        {
            Claim::Won => {}
            Claim::Lost => return Ok(()),
            Claim::ClaimedBefore => {
                tracing::warn!(recovery = %r.recovery_id, "recovery was claimed before and not finished; not running it twice");
                return Ok(());
            }
        }
        let refuse = |reason: String| {
            let stream = streams::recovery(r.recovery_id);
            let failed = backstop_events::NewEvent::caused_by(
                event,
                &stream,
                actor.clone(),
                &Event::RecoveryFailed(RecoveryFailed {
                    recovery_id: r.recovery_id,
                    backup_id: r.backup_id,
                    operator: r.operator.clone(),
                    scope: r.scope.clone(),
                    reason,
                }),
            )
            .with_derived_id(event, "restore-refused");
            async move {
                appender
                    .append(&stream, ExpectedVersion::Any, vec![failed])
                    .await
                    .map(drop)
            }
        };
        let manifest = match catalog::load_manifest(&self.data_path.repo, r.backup_id).await {
            Ok(m) => m,
            Err(e) if e.is_transient() => return Err(handler_error(e)),
            Err(e) => {
                refuse(e.chain()).await?;
                return Ok(());
            }
        };
        let directory_target =
            r.scope.point_in_time.is_some() || !r.scope.target.starts_with("postgres");
        if !directory_target && let Err(why) = self.allowed_targets.check(&r.scope.target) {
            tracing::warn!(recovery = %r.recovery_id, target = %r.scope.target, operator = %r.operator, actor = %event.actor, "restore refused: {why}");
            refuse(why).await?;
            return Ok(());
        }
        match (catalog::method_of(&manifest), directory_target) {
            (BackupMethod::Logical, false) => {}
            (BackupMethod::Logical, true) | (BackupMethod::Physical, _) => {
                refuse("point-in-time and directory restores run on the target machine: `backstop restore --physical --to-dir DIR --target-time T`".into()).await?;
                return Ok(());
            }
            (BackupMethod::Files, _) => {
                refuse("files backups are restored on the target machine: `backstop restore ID --to-dir DIR [--paths P,...]`".into()).await?;
                return Ok(());
            }
            (BackupMethod::Command | BackupMethod::Redis, _) => {
                refuse("command and Redis backups are restored on the target machine: `backstop restore ID --out FILE` (or, for a command backup, --to TARGET to run its restore command)".into()).await?;
                return Ok(());
            }
            (BackupMethod::Config, _) => {
                refuse("configuration backups are imported on the target machine: `backstop config import ID --out FILE [--format env|json]`".into()).await?;
                return Ok(());
            }
            (BackupMethod::Git, _) => {
                refuse("git backups are restored on the target machine: `backstop restore ID --out FILE.bundle`, then `git clone FILE.bundle`".into()).await?;
                return Ok(());
            }
        }
        let recovery = Recovery {
            recovery_id: r.recovery_id,
            requested_at: event.occurred_at,
            operator: r.operator.clone(),
            scope: r.scope.clone(),
            actor: actor.clone(),
        };
        let options = RestoreOptions {
            tables: (!r.scope.tables.is_empty()).then(|| r.scope.tables.clone()),
            create_db: true,
            dry_run: r.scope.dry_run,
            ..Default::default()
        };
        // The outcome is recorded either way; a failed restore is not a failed handler.
        let _ = execute_logical(
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
