//! The verify worker: on every `backup.completed`, logical or physical, the test restore of
//! [`backstop_ops::verify::verify_completed`]. A failure that says nothing about the backup (the
//! scratch server down, the storage unreachable) is retried by the consumer with nothing
//! recorded against the backup; a damaged backup is recorded as failed, its damage quarantined,
//! and a retry backup requested, by the use case.

use async_trait::async_trait;
use backstop_events::{Actor, Envelope, Event};
use backstop_ledger::Appender;
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ops::DataPath;
use backstop_ops::verify::{VerifySettings, verify_completed};

use crate::backup::handler_error;

pub const NAME: &str = "verify";

pub struct VerifyWorker {
    pub data_path: DataPath,
    pub settings: VerifySettings,
}

#[async_trait]
impl Handler for VerifyWorker {
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
        // Results go through the data path's appender: the process wires the same one into the
        // consumer (the local ledger, or the remote one over NATS).
        verify_completed(
            &self.data_path,
            &self.settings,
            event,
            &done,
            &Actor::worker(NAME),
        )
        .await
        .map(drop)
        .map_err(handler_error)
    }
}
