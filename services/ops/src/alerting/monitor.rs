//! The alert monitor: reconciles the alerts the ledger records as open with the conditions
//! that hold, raising what began and resolving what cleared.
//!
//! Invariants:
//! - One condition is one alert: a key is raised only while it is not open, and resolved only
//!   while it is. A condition that holds on every evaluation raises nothing more.
//! - Ids are derived, never random: a raise from the key, the number of earlier raises of the key
//!   and the event that made the condition hold; a resolution from the alert it resolves. Two
//!   monitors (two `serve` processes), or one evaluating again before it has read back its own
//!   append, record each raise and resolution once (the ledger's idempotency by id).
//! - Nothing is judged before the monitor has read the ledger up to its head, so a backup
//!   completed while `serve` was down is seen before "no recent backup" is decided.
//! - An append that fails is logged and tried again at the next evaluation: the conditions are
//!   recomputed from the facts, so no raise or resolution is lost, only late.

use std::time::Duration;

use backstop_events::{
    Actor, AlertRaised, AlertResolved, Event, NewEvent, streams, uuid_v7_derived,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerError};
use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use tokio::sync::watch;

use super::facts::Facts;
use super::rules::{AlertThresholds, CostEstimator, conditions, next_change};
use crate::schedule::Clock;

/// The actor of the monitor's events.
pub const ACTOR: &str = "alert-monitor";

/// How often the monitor evaluates when nothing wakes it sooner.
pub const TICK: Duration = Duration::from_secs(60);

pub struct AlertMonitor {
    facts: Facts,
    thresholds: AlertThresholds,
    cost: Option<CostEstimator>,
}

impl AlertMonitor {
    pub fn new(thresholds: AlertThresholds, cost: Option<CostEstimator>) -> AlertMonitor {
        AlertMonitor {
            facts: Facts::default(),
            thresholds,
            cost,
        }
    }

    pub fn observe(&mut self, e: &backstop_events::Envelope) {
        self.facts.observe(e);
    }

    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    /// The events that bring the recorded alerts in line with the conditions at `now`.
    pub fn due(&self, now: DateTime<Utc>) -> Vec<NewEvent> {
        let holding = conditions(&self.facts, &self.thresholds, self.cost.as_ref(), now);
        let mut out = Vec::new();
        for c in &holding {
            if self.facts.open.contains_key(&c.key) {
                continue;
            }
            let n = self.facts.raised_count.get(&c.key).copied().unwrap_or(0);
            let id = uuid_v7_derived(
                c.cause.event_id,
                c.cause.at,
                &format!("alert:{}:{n}", c.key),
            );
            let raised = AlertRaised {
                alert_id: id,
                severity: c.severity,
                kind: c.kind.to_string(),
                subject: c.subject.clone(),
                message: c.message.clone(),
                key: c.key.clone(),
                source: c.source.clone(),
            };
            out.push(event(
                id,
                c.cause.event_id,
                now,
                &Event::AlertRaised(raised),
            ));
        }
        for (key, open) in &self.facts.open {
            if holding.iter().any(|c| &c.key == key) {
                continue;
            }
            let id = uuid_v7_derived(open.alert_id, open.raised.at, "resolved");
            let resolved = AlertResolved {
                alert_id: open.alert_id,
                kind: open.kind.clone(),
                subject: open.subject.clone(),
                message: format!("cleared: {}", cleared(&open.kind, &open.subject)),
                key: key.clone(),
                source: open.source.clone(),
            };
            out.push(event(
                id,
                open.alert_id,
                now,
                &Event::AlertResolved(resolved),
            ));
        }
        out
    }

    /// Appends what [`AlertMonitor::due`] says; returns how many events were new.
    ///
    /// One append per event: a raise this monitor (or another) already recorded comes back as a
    /// duplicate on its own, where in one batch with new events the ledger would refuse the
    /// batch as reusing an id.
    pub async fn record(&self, appender: &dyn Appender, now: DateTime<Utc>) -> usize {
        let mut new = 0;
        for e in self.due(now) {
            let id = e.id;
            match appender
                .append(&streams::alerts(), ExpectedVersion::Any, vec![e])
                .await
            {
                Ok(done) => new += done.events.iter().filter(|c| !c.duplicate).count(),
                // Another monitor (or this one, before reading back its append) recorded this
                // raise or resolution first, with its own wording of the moment: it stands.
                Err(err) if err.is_id_reused() => {
                    tracing::debug!(event = %id, "alert event already recorded by another monitor");
                }
                Err(err) => {
                    tracing::warn!(error = %err, event = %id, transient = err.is_transient(), "alert monitor: cannot record an alert event; trying again at the next evaluation");
                }
            }
        }
        new
    }

    /// When the monitor should look again, at the latest.
    pub fn wake(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let tick = now + TimeDelta::from_std(TICK).unwrap_or(TimeDelta::seconds(60));
        match next_change(&self.facts, &self.thresholds, now) {
            Some(at) => at.min(tick),
            None => tick,
        }
    }
}

fn event(id: uuid::Uuid, cause: uuid::Uuid, now: DateTime<Utc>, e: &Event) -> NewEvent {
    let mut n = NewEvent::new(streams::alerts(), Actor::worker(ACTOR), e).with_id(id);
    n.correlation_id = cause;
    n.causation_id = Some(cause);
    n.occurred_at = now.trunc_subsecs(6);
    n
}

/// What the recovery note says cleared the alert.
fn cleared(kind: &str, subject: &str) -> String {
    match kind {
        "backup_failed" => format!("a backup of `{subject}` completed"),
        "verification_failed" => format!("a backup of `{subject}` passed verification"),
        "no_recent_backup" => format!("a backup of `{subject}` completed"),
        "backup_size_changed" => {
            format!("the newest backup of {subject} is back within the threshold")
        }
        "backup_running_long" => format!("backup {subject} ended"),
        "storage_unreachable" => format!("storage `{subject}` answers again"),
        "storage_quota" => format!("repository `{subject}` is back under its quota threshold"),
        "cost_over_budget" => format!("repository `{subject}` is back within budget"),
        "wal_stalled" => "WAL is being archived again".to_string(),
        "wal_archiving_failing" => format!("PostgreSQL of `{subject}` archives WAL again"),
        "endpoint_down" | "endpoint_slow" => format!("endpoint {subject} recovered"),
        "event_dead_lettered" => format!("an operator resolved the dead letter of `{subject}`"),
        _ => format!("{kind} for {subject} no longer holds"),
    }
}

/// `serve`'s alert monitor (see [`run_monitor_with`]).
pub async fn run_monitor(
    ledger: Ledger,
    thresholds: AlertThresholds,
    cost: Option<CostEstimator>,
    clock: &dyn Clock,
    shutdown: watch::Receiver<bool>,
) -> Result<(), LedgerError> {
    let appender = ledger.clone();
    run_monitor_with(
        ledger,
        &appender,
        AlertMonitor::new(thresholds, cost),
        clock,
        shutdown,
    )
    .await
}

/// Follows `ledger` from its first event; whenever it has read up to the head, records the due
/// raises and resolutions through `appender` at `clock`'s time. Wakes on every new batch of
/// events, at the next time-based change and at least every [`TICK`]. Returns when `shutdown`
/// fires or the ledger closes; an error reading the ledger is returned.
pub async fn run_monitor_with(
    ledger: Ledger,
    appender: &dyn Appender,
    mut monitor: AlertMonitor,
    clock: &dyn Clock,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LedgerError> {
    let mut sub = ledger.subscribe(1);
    tracing::info!("alert monitor running");
    loop {
        let caught_up = sub.position() > ledger.head().position;
        let now = clock.now();
        if caught_up {
            monitor.record(appender, now).await;
        }
        let wake = monitor.wake(now);
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            batch = sub.next_batch(1024) => {
                let batch = batch?;
                if batch.is_empty() {
                    return Ok(());
                }
                for e in &batch {
                    monitor.observe(e);
                }
            }
            _ = clock.sleep_until(wake) => {}
        }
    }
}
