//! The backup worker: runs the backups requested through the ledger (by the API, a schedule or
//! a retry after a failed verification), logical and physical alike, with
//! [`backstop_ops::backup::run_backup`].
//!
//! - A foreground request (`trigger: foreground`, `backstop backup`) is the operator's command's
//!   own: skipped.
//! - A redelivered request whose manifest is already in the repository only (re)records its
//!   completion: nothing is taken twice.
//! - A scheduled or API request of a configuration source unchanged since its newest backup is
//!   closed as `backup.skipped` (`config_backup::skip_unchanged`): nothing is taken or retried.
//! - A transient failure (storage or source briefly unreachable) is retried with the consumer's
//!   backoff, unrecorded; when the consumer gives up, [`Handler::give_up`] records
//!   `backup.failed` with the last reason, so no backup is left "started". Any other failure is
//!   recorded at once and the event is done (the alert worker raises the alert).

use async_trait::async_trait;
use backstop_events::{Actor, BackupMethod, BackupRequested, Envelope, Event, Trigger};
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ledger::{Appender, LedgerError};
use backstop_ops::backup::{self, BackupOptions, FailureRecording};
use backstop_ops::schedule::Schedule;
use backstop_ops::{DataPath, FailureClass, OpsError, catalog};
use chrono::{DateTime, Utc};

pub const NAME: &str = "backup";

pub struct BackupWorker {
    pub data_path: DataPath,
    /// A scheduled backup that starts inside its schedule's trading hours runs with fewer jobs
    /// and a bandwidth cap ([`Schedule::limits_at`]).
    pub schedules: Vec<Schedule>,
    /// Every backup's deadline and lock wait.
    pub limits: backstop_ops::backup::JobLimits,
}

impl BackupWorker {
    /// The options a request runs with: the schedule's trading-hours limits when it is inside
    /// them now.
    pub fn options_for(&self, request: &BackupRequested, now: DateTime<Utc>) -> BackupOptions {
        let mut opts = BackupOptions {
            failures: FailureRecording::UnlessTransient,
            ..Default::default()
        };
        self.limits.apply(&mut opts);
        let Trigger::Schedule { schedule } = &request.trigger else {
            return opts;
        };
        let Some(limits) = self
            .schedules
            .iter()
            .find(|s| s.name() == schedule)
            .and_then(|s| s.limits_at(now))
        else {
            return opts;
        };
        tracing::info!(backup = %request.backup_id, %schedule, jobs = ?limits.jobs, bytes_per_second = ?limits.bytes_per_second, "inside trading hours: backup limited");
        if let (Some(jobs), Ok(spec)) = (limits.jobs, self.data_path.source(&request.source))
            && let backstop_ops::SourceKind::Postgres(pg) = &spec.kind
        {
            opts.jobs = Some(pg.jobs.min(jobs as usize).max(1));
        }
        opts.bytes_per_second = limits.bytes_per_second;
        opts
    }
}

fn actor() -> Actor {
    Actor::worker(NAME)
}

fn request_of(event: &Envelope) -> Result<BackupRequested, HandlerError> {
    match event.event() {
        Ok(Event::BackupRequested(r)) => Ok(r),
        _ => Err(crate::unreadable(event, "backup.requested")),
    }
}

/// Maps a use case's failure to the consumer's retry decision, by class.
pub(crate) fn handler_error(e: OpsError) -> HandlerError {
    let retryable = e.is_transient();
    HandlerError::from_error(e, retryable)
}

/// The consumer's decision after a use case that records its own permanent failures (as
/// `backup.failed`, `export.failed`): such a failure is done; a transient one, or one of the
/// ledger (the failure may not be recorded), is retried.
pub(crate) fn done_unless_retryable<T>(result: Result<T, OpsError>) -> Result<(), HandlerError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if !e.is_transient() && e.class() != FailureClass::Ledger => Ok(()),
        Err(e) => Err(handler_error(e)),
    }
}

/// What a consumer's `give_up` returns once it tried to record the abandoned job: a ledger
/// failure is the consumer's to retry; any other is logged (nothing else can be done with it).
pub(crate) fn abandoned_recorded(
    result: Result<(), OpsError>,
    what: &str,
) -> Result<(), LedgerError> {
    match result {
        Ok(()) => Ok(()),
        Err(OpsError::Ledger(e)) => Err(e),
        Err(e) => {
            tracing::error!(error = %e.chain(), "could not record the abandoned {what}");
            Ok(())
        }
    }
}

#[async_trait]
impl Handler for BackupWorker {
    fn name(&self) -> &str {
        NAME
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == "backup.requested"
    }

    async fn handle(&self, event: &Envelope, _appender: &dyn Appender) -> Result<(), HandlerError> {
        let request = request_of(event)?;
        if let Trigger::Foreground { .. } = request.trigger {
            return Ok(());
        }
        // Every method this worker takes; a new one must be added here before the API accepts
        // it (the match is exhaustive on purpose).
        match request.method {
            BackupMethod::Logical
            | BackupMethod::Physical
            | BackupMethod::Command
            | BackupMethod::Redis
            | BackupMethod::Files
            | BackupMethod::Git
            | BackupMethod::Config => {}
        }
        let dp = &self.data_path;
        match catalog::load_manifest(&dp.repo, request.backup_id).await {
            Ok(m) => {
                return backup::complete_from_manifest(dp, &request, &m, &actor(), event)
                    .await
                    .map_err(handler_error);
            }
            Err(OpsError::NoBackup(_)) => {}
            Err(e) => return Err(handler_error(e)),
        }
        // A configuration source unchanged since its newest backup: recorded as backup.skipped
        // and done (a ledger failure is retried; the skip's id derives from the request).
        if backstop_ops::config_backup::skip_unchanged(
            dp,
            &request,
            event.occurred_at,
            &actor(),
            Some(event),
        )
        .await
        .map_err(handler_error)?
        .is_some()
        {
            return Ok(());
        }
        let opts = self.options_for(&request, chrono::Utc::now());
        // A permanent failure is recorded as backup.failed by run_backup.
        done_unless_retryable(
            backup::run_backup(
                dp,
                &request,
                event.occurred_at,
                &actor(),
                Some(event),
                &opts,
            )
            .await,
        )
    }

    async fn give_up(
        &self,
        event: &Envelope,
        error: &HandlerError,
        _appender: &dyn Appender,
    ) -> Result<(), LedgerError> {
        let Ok(request) = request_of(event) else {
            return Ok(());
        };
        if let Trigger::Foreground { .. } = request.trigger {
            return Ok(());
        }
        let gave_up = OpsError::Abandoned {
            what: format!("backup {}", request.backup_id),
            why: format!("gave up after repeated failures: {}", error.message),
        };
        let recorded = backup::record_failure(
            &self.data_path,
            &request,
            event.occurred_at,
            &actor(),
            Some(event),
            &gave_up,
        )
        .await;
        abandoned_recorded(recorded, "backup")
    }
}
