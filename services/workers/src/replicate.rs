//! The replicate worker: on every `backup.completed`, the backup copied to each configured
//! replica by [`backstop_ops::replicate::replicate_backup`] (objects read back and compared),
//! then the replica's lag measured and recorded. A transient failure (a store unreachable) is
//! retried by the consumer; `replication.failed` is on record either way (once per backup and
//! replica). A permanent failure (a copy that does not read back, a chunk damaged on the
//! primary) is done: `backstop check --replica NAME --heal` or `backstop replicate` redo it.
//! After the backup, the WAL files the replica lacks (those `wal-push` could not write while it
//! was unreachable) are copied too ([`replicate::replicate_wal`]).

use async_trait::async_trait;
use backstop_events::{Actor, Envelope, Event};
use backstop_ledger::Appender;
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ops::DataPath;
use backstop_ops::replicate::{self, Recorder, Replica, ReplicateError};

pub const NAME: &str = "replicate";

pub struct ReplicateWorker {
    pub data_path: DataPath,
    pub replicas: Vec<Replica>,
}

fn handler_error(e: ReplicateError) -> HandlerError {
    let retryable = e.is_transient();
    HandlerError::from_error(e, retryable)
}

#[async_trait]
impl Handler for ReplicateWorker {
    fn name(&self) -> &str {
        NAME
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == "backup.completed"
    }

    async fn handle(&self, event: &Envelope, _appender: &dyn Appender) -> Result<(), HandlerError> {
        let Ok(Event::BackupCompleted(done)) = event.event() else {
            return Err(crate::unreadable(event, "backup.completed"));
        };
        let rec = Recorder {
            appender: self.data_path.appender.as_ref(),
            actor: Actor::worker(NAME),
            cause: Some(event),
        };
        let mut retry = None;
        for replica in &self.replicas {
            match replicate::replicate_backup(&rec, &self.data_path.repo, replica, done.backup_id)
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_transient() => retry = Some(e),
                // Recorded as replication.failed; retrying the same copy would not help.
                Err(_) => {}
            }
            match replicate::replicate_wal(&self.data_path.repo, replica).await {
                Ok(_) => {}
                Err(e) if e.is_transient() => retry = Some(e),
                Err(e) => {
                    tracing::warn!(replica = %replica.name, error = %e, "WAL not replicated")
                }
            }
            // The lag at the time of the completion, so that a redelivery records it once.
            match replicate::measure_lag(&self.data_path.repo, replica, event.occurred_at).await {
                Ok(lag) => replicate::record_lag(&rec, &replica.name, lag, event.occurred_at)
                    .await
                    .map_err(handler_error)?,
                Err(e) if e.is_transient() => retry = Some(e),
                Err(e) => tracing::warn!(replica = %replica.name, error = %e, "lag not measured"),
            }
        }
        match retry {
            Some(e) => Err(handler_error(e)),
            None => Ok(()),
        }
    }
}
