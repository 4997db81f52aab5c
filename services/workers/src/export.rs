//! The export worker: on every `export.requested` that is not a foreground one (a schedule with
//! `job = "export"`, or a request through the ledger), the table export of
//! [`backstop_ops::export_lifecycle::run_requested`], recorded as `export.completed` or
//! `export.failed`. A transient failure (the source or the storage briefly unreachable) is
//! retried by the consumer with nothing recorded; when the consumer gives up, the export is
//! recorded as failed.

use async_trait::async_trait;
use backstop_events::{Actor, Envelope, Event, ExportRequested, Trigger};
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ledger::{Appender, LedgerError};
use backstop_ops::DataPath;
use backstop_ops::export_lifecycle::{ExportFailures, record_failure, run_requested};

use crate::backup::{abandoned_recorded, done_unless_retryable, handler_error};

pub const NAME: &str = "export";

pub struct ExportWorker {
    pub data_path: DataPath,
}

fn request_of(event: &Envelope) -> Result<ExportRequested, HandlerError> {
    match event.event() {
        Ok(Event::ExportRequested(r)) => Ok(r),
        _ => Err(crate::unreadable(event, "export.requested")),
    }
}

#[async_trait]
impl Handler for ExportWorker {
    fn name(&self) -> &str {
        NAME
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == "export.requested"
    }

    async fn handle(&self, event: &Envelope, _appender: &dyn Appender) -> Result<(), HandlerError> {
        let request = request_of(event)?;
        if let Trigger::Foreground { .. } = request.trigger {
            return Ok(());
        }
        let dp = &self.data_path;
        let source = match dp.source(&request.source) {
            Ok(s) => s,
            Err(e) => {
                // A schedule naming a source that is not configured here: say so in the ledger.
                record_failure(
                    dp.appender.as_ref(),
                    &request,
                    event.occurred_at,
                    Some(event),
                    &Actor::worker(NAME),
                    &e.chain(),
                )
                .await
                .map_err(handler_error)?;
                return Ok(());
            }
        };
        // A permanent failure is recorded as export.failed by run_requested.
        done_unless_retryable(
            run_requested(
                &dp.repo,
                dp.appender.as_ref(),
                source,
                &request,
                event.occurred_at,
                Some(event),
                &Actor::worker(NAME),
                ExportFailures::RetryTransient,
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
        let reason = format!("gave up after repeated failures: {}", error.message);
        let recorded = record_failure(
            self.data_path.appender.as_ref(),
            &request,
            event.occurred_at,
            Some(event),
            &Actor::worker(NAME),
            &reason,
        )
        .await;
        abandoned_recorded(recorded, "export")
    }
}
