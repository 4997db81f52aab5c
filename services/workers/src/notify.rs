//! The notifier: sends `alert.raised`, `alert.resolved`, `backup.completed` and
//! `report.generated` to the configured email and webhook channels
//! ([`backstop_ops::notify`] composes, routes, sends and records).
//!
//! Retries happen inside the handler, per channel, bounded by `notify.attempts` with a doubling
//! backoff, rather than through the consumer's redelivery: each channel retries on its own (a
//! dead SMTP server does not hold back the webhook, nor make it send again), every attempt is
//! recorded with its number, and after the last attempt the event is acknowledged with the
//! failure recorded. A redelivery would gain nothing but a `worker.dead_lettered` alert, which
//! this worker would in turn fail to send. Only the ledger's own trouble (an append or lookup
//! that fails transiently) goes back to the consumer as a transient error.
//!
//! Exactly once per (event, channel): `notification.sent` has an id derived from both, and a
//! channel whose `notification.sent` is already in the ledger is skipped, so an event redelivered
//! after the worker was killed between sending and acknowledging sends nothing twice.

use std::sync::Arc;

use async_trait::async_trait;
use backstop_events::{Actor, Envelope};
use backstop_ledger::Appender;
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ops::notify::{EventLookup, Notifier};

pub const NAME: &str = "notify";

/// What the notifier needs: the built channels and a way to ask the ledger whether a
/// notification was already sent (the local ledger in `serve`, JetStream in `backstop worker`).
#[derive(Clone)]
pub struct NotifySettings {
    pub notifier: Arc<Notifier>,
    pub lookup: Arc<dyn EventLookup>,
}

pub struct NotifyWorker {
    pub settings: NotifySettings,
}

#[async_trait]
impl Handler for NotifyWorker {
    fn name(&self) -> &str {
        NAME
    }

    fn wants(&self, event_type: &str) -> bool {
        matches!(
            event_type,
            "alert.raised" | "alert.resolved" | "backup.completed" | "report.generated"
        )
    }

    async fn handle(&self, event: &Envelope, appender: &dyn Appender) -> Result<(), HandlerError> {
        if event.event().is_err() {
            return Err(crate::unreadable(event, &event.event_type));
        }
        let outcomes = self
            .settings
            .notifier
            .deliver(
                event,
                &Actor::worker(NAME),
                appender,
                self.settings.lookup.as_ref(),
            )
            .await
            .map_err(|e| {
                let transient = e.is_transient();
                HandlerError::from_error(e, transient)
            })?;
        for (channel, outcome) in &outcomes {
            tracing::debug!(%channel, ?outcome, position = event.position, "notification outcome");
        }
        // The crash tests' moment: after the notifications are sent and recorded, before the
        // ack (only when something was sent, so that events routed nowhere pass straight on).
        if !outcomes.is_empty() {
            crate::fault::pause_before_ack().await;
        }
        Ok(())
    }
}
