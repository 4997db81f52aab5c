//! The alert worker: turns failures recorded in the ledger into `alert.raised` events.
//!
//! It reacts to `backup.failed` and `verification.failed` (critical: the data may not be
//! recoverable) and `worker.dead_lettered` (warning: an event needs an operator). The alert id is
//! derived from the cause, so a redelivered failure raises its alert once. Notification (email,
//! webhook) is a separate worker reacting to `alert.raised`.

use async_trait::async_trait;
use backstop_events::{
    Actor, AlertRaised, Envelope, Event, NewEvent, Severity, streams, uuid_v7_derived,
};
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ledger::{Appender, ExpectedVersion};

pub struct AlertWorker;

pub const NAME: &str = "alerts";

impl AlertWorker {
    /// The alert an event calls for, if any.
    pub fn alert_for(event: &Envelope) -> Result<Option<AlertRaised>, HandlerError> {
        let decoded = event.event().map_err(|e| {
            HandlerError::permanent(format!("cannot decode event {}: {e}", event.position))
        })?;
        let alert_id = uuid_v7_derived(event.id, event.occurred_at, "alert");
        Ok(match decoded {
            Event::BackupFailed(f) => Some(AlertRaised {
                alert_id,
                severity: Severity::Critical,
                kind: "backup_failed".into(),
                subject: f.source.clone(),
                message: format!(
                    "backup {} of `{}` failed (attempt {}): {}",
                    f.backup_id, f.source, f.attempt, f.reason
                ),
                key: format!("backup_failed/{}", f.source),
                source: Some(f.source.clone()),
            }),
            Event::VerificationFailed(f) => Some(AlertRaised {
                alert_id,
                severity: Severity::Critical,
                kind: "verification_failed".into(),
                subject: f.backup_id.to_string(),
                message: format!(
                    "verification of backup {} failed: {}",
                    f.backup_id, f.reason
                ),
                key: format!("verification_failed/{}", f.backup_id),
                source: None,
            }),
            Event::WorkerDeadLettered(d) => Some(AlertRaised {
                alert_id,
                severity: Severity::Warning,
                kind: "event_dead_lettered".into(),
                subject: d.consumer.clone(),
                message: format!(
                    "worker `{}` gave up on event {} ({}) after {} deliveries: {}",
                    d.consumer, d.position, d.event_type, d.deliveries, d.error
                ),
                key: format!("event_dead_lettered/{}/{}", d.consumer, d.event_id),
                source: None,
            }),
            _ => None,
        })
    }
}

#[async_trait]
impl Handler for AlertWorker {
    fn name(&self) -> &str {
        NAME
    }

    fn wants(&self, event_type: &str) -> bool {
        matches!(
            event_type,
            "backup.failed" | "verification.failed" | "worker.dead_lettered"
        )
    }

    async fn handle(&self, event: &Envelope, appender: &dyn Appender) -> Result<(), HandlerError> {
        let Some(alert) = Self::alert_for(event)? else {
            return Ok(());
        };
        let stream = streams::alerts();
        let e = NewEvent::caused_by(
            event,
            &stream,
            Actor::worker(NAME),
            &Event::AlertRaised(alert),
        )
        .with_derived_id(event, "alert");
        appender
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await?;
        crate::fault::pause_before_ack().await;
        Ok(())
    }
}
