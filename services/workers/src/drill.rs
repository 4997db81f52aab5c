//! The drill worker: on every `drill.requested` (serve's `[[drills]]` schedules), the DR drill
//! of [`backstop_ops::drill_request::run_requested`]: once per request (a redelivery restores
//! nothing), recorded as `drill.started` and `drill.completed` on the request's stream, and its
//! report written to the report directory. A transient failure to record is retried by the
//! consumer; a drill that fails is a recorded result, not a handler failure.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use backstop_events::{Envelope, Event};
use backstop_ledger::Appender;
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ops::DataPath;
use backstop_ops::drill::DrillPlan;
use backstop_ops::drill_request::{
    RequestedOutcome, VerifiedBackups, run_requested, write_reports,
};

use crate::backup::handler_error;

pub const NAME: &str = "drill";

/// What the drill worker needs besides the data path.
#[derive(Clone)]
pub struct DrillSettings {
    /// One plan per `[[drills]]` entry (by source).
    pub plans: Vec<DrillPlan>,
    /// Which backups passed verification (a drill restores the newest verified one).
    pub verified: Arc<dyn VerifiedBackups>,
    /// Where each drill's JSON, Markdown and HTML reports go (`DATA_DIR/drills`).
    pub report_dir: PathBuf,
}

pub struct DrillWorker {
    pub data_path: DataPath,
    pub settings: DrillSettings,
}

#[async_trait]
impl Handler for DrillWorker {
    fn name(&self) -> &str {
        NAME
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == "drill.requested"
    }

    async fn handle(&self, event: &Envelope, _appender: &dyn Appender) -> Result<(), HandlerError> {
        let Ok(Event::DrillRequested(request)) = event.event() else {
            return Err(crate::unreadable(event, "drill.requested"));
        };
        let plan = self
            .settings
            .plans
            .iter()
            .find(|p| p.source == request.source);
        let outcome = run_requested(
            &self.data_path,
            plan,
            self.settings.verified.as_ref(),
            &request,
            event.occurred_at,
        )
        .await
        .map_err(handler_error)?;
        match outcome {
            RequestedOutcome::Ran(report) => {
                // The report is in the ledger already (drill.completed); the files are a copy
                // for people, so failing to write them is logged, not retried.
                match write_reports(&report, &self.settings.report_dir) {
                    Ok(base) => {
                        tracing::info!(drill = %report.drill_id, passed = report.passed, reports = %base.display(), "scheduled drill done")
                    }
                    Err(e) => {
                        tracing::error!(drill = %report.drill_id, error = %e.chain(), "cannot write the drill's report files")
                    }
                }
            }
            RequestedOutcome::Refused(_) | RequestedOutcome::AlreadyStarted { .. } => {}
        }
        Ok(())
    }
}
