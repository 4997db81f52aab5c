//! Notifications: what Backstop tells people, through which channel, exactly once.
//!
//! [`Notifier::compose`] turns an event into a [`Message`]:
//! - `alert.raised`: the failure note (severity, the source, the alert's message, which holds
//!   the reason, the condition key and a link to the dashboard);
//! - `alert.resolved`: the recovery note;
//! - `backup.completed`: the success note of R17.1. `backup.completed` rather than
//!   `verification.passed` because it names the source (routing by source needs it), it is what
//!   a daily backup's success is, and it comes minutes earlier than a test restore; a failed
//!   verification raises its own alert;
//! - `report.generated`: the weekly summary (its title the subject, its text the body).
//!
//! [`Notifier::routes`] picks the channels: a channel gets a message when its `events` hold the
//! message's class, when an alert is at least its `min_severity` (recoveries, successes and
//! reports carry no severity of their own and pass), and when its `sources` are empty or hold the
//! message's source (a message about no source passes).
//!
//! [`Notifier::deliver`] sends to every routed channel concurrently, each with its own bounded
//! retry loop (`attempts`, `backoff_ms` doubled), and records every attempt on
//! `streams::notifications()`: `notification.sent` or `notification.failed` (with `transient`
//! and `last`). Invariants:
//! - one notification per (cause event, channel): `notification.sent` has the id
//!   [`sent_id`]`(cause, channel)`, and a channel whose id is already in the ledger
//!   ([`EventLookup`]) is skipped. A redelivered event (a worker killed after sending, before its
//!   acknowledgement) therefore sends nothing again. The remaining window is a crash between the
//!   SMTP server's acceptance and the append of `notification.sent`: then the message goes out
//!   twice, never zero times (at least once, with duplicates only inside that window);
//! - `notification.failed` ids are fresh: each is a distinct attempt, a redelivery's attempts
//!   are new facts;
//! - one channel's failure never stops another; a channel that fails on its last attempt stays
//!   failed in the ledger (and the alert stays open), and the event is done: retrying further is
//!   the operator's call (`backstop notify test`, then the alert is still on the dashboard).

pub mod channel;
pub mod config;

use async_trait::async_trait;
use backstop_events::{
    Actor, Envelope, Event, NewEvent, NotificationFailed, NotificationSent, Severity, streams,
    uuid_v7_derived,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerError};
use serde::Serialize;
use uuid::Uuid;

pub use channel::{Channel, EmailChannel, NotifyError, WebhookChannel};
pub use config::{ChannelConfig, ChannelKind, EventClass, NotifyConfig, Security};

/// What a message is about; decides routing by `events`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Alert,
    Recovery,
    Success,
    Report,
    /// `backstop notify test`: sent to every channel, whatever its routing.
    Test,
}

impl MessageKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            MessageKind::Alert => "alert",
            MessageKind::Recovery => "recovery",
            MessageKind::Success => "success",
            MessageKind::Report => "report",
            MessageKind::Test => "test",
        }
    }

    fn class(&self) -> Option<EventClass> {
        match self {
            MessageKind::Alert => Some(EventClass::Alerts),
            MessageKind::Recovery => Some(EventClass::Recoveries),
            MessageKind::Success => Some(EventClass::Successes),
            MessageKind::Report => Some(EventClass::Reports),
            MessageKind::Test => None,
        }
    }
}

/// One notification, whatever the channel.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Message {
    pub subject: String,
    pub text: String,
    pub severity: Severity,
    pub source: Option<String>,
    /// Where on the dashboard to look.
    pub link: Option<String>,
    pub kind: MessageKind,
    /// The alert's condition key (`backup_failed/orders`), for alerts and recoveries.
    pub key: Option<String>,
    /// The alert this is about, for `notification.sent`.
    pub alert_id: Option<Uuid>,
}

impl Message {
    /// The plain-text body of an email: the text, then the link.
    pub fn body(&self) -> String {
        match &self.link {
            Some(link) => format!("{}\n\nDashboard: {link}\n", self.text),
            None => format!("{}\n", self.text),
        }
    }
}

fn rank(s: Severity) -> u8 {
    match s {
        Severity::Info => 0,
        Severity::Warning => 1,
        Severity::Critical => 2,
    }
}

fn severity_word(s: Severity) -> &'static str {
    match s {
        Severity::Info => "INFO",
        Severity::Warning => "WARNING",
        Severity::Critical => "CRITICAL",
    }
}

/// The id of the `notification.sent` for `cause` on `channel`.
pub fn sent_id(cause: &Envelope, channel: &str) -> Uuid {
    uuid_v7_derived(
        cause.id,
        cause.occurred_at,
        &format!("notification.sent/{channel}"),
    )
}

/// Whether an event id is in the ledger: the local [`Ledger`] in `serve`, the ledger asked over
/// NATS for `backstop worker` ([`backstop_ledger::lookup::RemoteLookup`]). Always the ledger
/// itself, never JetStream's copy, which lags it (see `backstop_ledger::lookup`).
#[async_trait]
pub trait EventLookup: Send + Sync {
    async fn contains(&self, event_id: Uuid) -> Result<bool, LedgerError>;
}

#[async_trait]
impl EventLookup for Ledger {
    async fn contains(&self, event_id: Uuid) -> Result<bool, LedgerError> {
        Ok(self.store().position_of(event_id)?.is_some())
    }
}

#[async_trait]
impl EventLookup for backstop_ledger::lookup::RemoteLookup {
    async fn contains(&self, event_id: Uuid) -> Result<bool, LedgerError> {
        backstop_ledger::lookup::RemoteLookup::contains(self, event_id).await
    }
}

/// What happened on one channel.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Sent {
        attempt: u32,
    },
    /// A `notification.sent` for this cause and channel was already in the ledger.
    AlreadySent,
    Failed {
        attempts: u32,
        reason: String,
        transient: bool,
    },
}

/// The configured channels, built.
pub struct Notifier {
    config: NotifyConfig,
    channels: Vec<(ChannelConfig, Box<dyn Channel>)>,
}

impl Notifier {
    pub fn new(config: NotifyConfig) -> Result<Notifier, NotifyError> {
        config.check().map_err(NotifyError::Config)?;
        let timeout = config.timeout();
        let channels = config
            .channels
            .iter()
            .map(|c| Ok((c.clone(), channel::build(c, timeout)?)))
            .collect::<Result<Vec<_>, NotifyError>>()?;
        Ok(Notifier { config, channels })
    }

    pub fn config(&self) -> &NotifyConfig {
        &self.config
    }

    fn link(&self, path: &str) -> Option<String> {
        self.config
            .dashboard_url
            .as_ref()
            .map(|u| format!("{}{path}", u.trim_end_matches('/')))
    }

    /// The message an event calls for, if any (see the module docs).
    pub fn compose(&self, event: &Envelope) -> Option<Message> {
        let decoded = event.event().ok()?;
        let at = event.occurred_at.format("%Y-%m-%d %H:%M:%S UTC");
        Some(match decoded {
            Event::AlertRaised(a) => {
                let source = a.source.clone();
                let mut text = format!("{}\n\n", a.message);
                if let Some(s) = &source {
                    text.push_str(&format!("Source: {s}\n"));
                }
                text.push_str(&format!(
                    "Severity: {}\nCondition: {}\nRaised: {at}\nAlert: {}\n",
                    severity_word(a.severity).to_lowercase(),
                    if a.key.is_empty() { &a.kind } else { &a.key },
                    a.alert_id
                ));
                Message {
                    subject: format!(
                        "[Backstop] {}: {} {}",
                        severity_word(a.severity),
                        a.kind,
                        a.subject
                    ),
                    text,
                    severity: a.severity,
                    source,
                    link: self.link("/"),
                    kind: MessageKind::Alert,
                    key: Some(a.key).filter(|k| !k.is_empty()),
                    alert_id: Some(a.alert_id),
                }
            }
            Event::AlertResolved(r) => {
                let mut text = format!("{}\n\n", r.message);
                if let Some(s) = &r.source {
                    text.push_str(&format!("Source: {s}\n"));
                }
                text.push_str(&format!(
                    "Condition: {}\nResolved: {at}\nAlert: {}\n",
                    if r.key.is_empty() { &r.kind } else { &r.key },
                    r.alert_id
                ));
                Message {
                    subject: format!("[Backstop] RESOLVED: {} {}", r.kind, r.subject),
                    text,
                    severity: Severity::Info,
                    source: r.source,
                    link: self.link("/"),
                    kind: MessageKind::Recovery,
                    key: Some(r.key).filter(|k| !k.is_empty()),
                    alert_id: Some(r.alert_id),
                }
            }
            Event::BackupCompleted(b) => Message {
                subject: format!("[Backstop] backup of {} succeeded", b.source),
                text: format!(
                    "The {} {} backup {} of `{}` completed at {at}.\n\nSource: {}\nRead: {} bytes\nStored: {} bytes ({} new)\nDuration: {:.1} s\n",
                    b.method.as_str(),
                    b.kind.as_str(),
                    b.backup_id,
                    b.source,
                    b.source,
                    b.raw_bytes,
                    b.stored_bytes,
                    b.new_bytes,
                    b.duration_ms as f64 / 1000.0
                ),
                severity: Severity::Info,
                source: Some(b.source),
                link: self.link(&format!("/backups/{}", b.backup_id)),
                kind: MessageKind::Success,
                key: None,
                alert_id: None,
            },
            Event::ReportGenerated(r) => Message {
                subject: r.title,
                text: r.text,
                severity: Severity::Info,
                source: None,
                link: self.link("/"),
                kind: MessageKind::Report,
                key: None,
                alert_id: None,
            },
            _ => return None,
        })
    }

    /// The channels `message` goes to (see the module docs).
    pub fn routes(&self, message: &Message) -> Vec<&ChannelConfig> {
        self.config
            .channels
            .iter()
            .filter(|c| route(c, message))
            .collect()
    }

    /// Sends the message `cause` calls for to its channels and records each attempt (see the
    /// module docs). Fails only when the ledger cannot be read or written; a channel's failure
    /// is an [`Outcome::Failed`] beside the others' outcomes.
    pub async fn deliver(
        &self,
        cause: &Envelope,
        actor: &Actor,
        appender: &dyn Appender,
        lookup: &dyn EventLookup,
    ) -> Result<Vec<(String, Outcome)>, LedgerError> {
        let Some(message) = self.compose(cause) else {
            return Ok(Vec::new());
        };
        let runs = self
            .channels
            .iter()
            .filter(|(c, _)| route(c, &message))
            .map(|(c, ch)| async {
                let outcome = self
                    .deliver_one(
                        Some(cause),
                        c,
                        ch.as_ref(),
                        &message,
                        actor,
                        appender,
                        lookup,
                    )
                    .await;
                (c.name.clone(), outcome)
            });
        let mut out = Vec::new();
        let mut ledger_error = None;
        for (name, r) in futures::future::join_all(runs).await {
            match r {
                Ok(o) => out.push((name, o)),
                Err(e) => ledger_error = Some(e),
            }
        }
        match ledger_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// `backstop notify test`: one test message to every channel, whatever its routing, each
    /// attempt recorded.
    pub async fn test_all(
        &self,
        actor: &Actor,
        appender: &dyn Appender,
    ) -> Vec<(String, Result<Outcome, LedgerError>)> {
        let message = Message {
            subject: "[Backstop] test notification".into(),
            text: format!(
                "This is a test message from Backstop (`backstop notify test`), sent by {}.\nIf you read this, the channel works.\n",
                actor
            ),
            severity: Severity::Info,
            source: None,
            link: self.link("/"),
            kind: MessageKind::Test,
            key: None,
            alert_id: None,
        };
        let runs = self.channels.iter().map(|(c, ch)| {
            let message = &message;
            async move {
                let r = self
                    .deliver_one(None, c, ch.as_ref(), message, actor, appender, &NoLookup)
                    .await;
                (c.name.clone(), r)
            }
        });
        futures::future::join_all(runs).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn deliver_one(
        &self,
        cause: Option<&Envelope>,
        config: &ChannelConfig,
        channel: &dyn Channel,
        message: &Message,
        actor: &Actor,
        appender: &dyn Appender,
        lookup: &dyn EventLookup,
    ) -> Result<Outcome, LedgerError> {
        let id = cause.map(|c| sent_id(c, &config.name));
        if let Some(id) = id
            && lookup.contains(id).await?
        {
            tracing::info!(channel = %config.name, %id, "already notified; not sent again");
            return Ok(Outcome::AlreadySent);
        }
        let stream = streams::notifications();
        let attempts = self.config.attempts();
        let new_event = |event: &Event| match cause {
            Some(c) => NewEvent::caused_by(c, &stream, actor.clone(), event),
            None => NewEvent::new(&stream, actor.clone(), event),
        };
        let mut attempt = 1;
        loop {
            match channel.send(message).await {
                Ok(()) => {
                    let sent = Event::NotificationSent(NotificationSent {
                        alert_id: message.alert_id,
                        channel: config.name.clone(),
                        recipient: config.recipient(),
                        subject: message.subject.clone(),
                        cause: cause.map(|c| c.id),
                        attempt,
                        key: message.key.clone().unwrap_or_default(),
                        kind: message.kind.as_str().to_string(),
                    });
                    let mut e = new_event(&sent);
                    if let Some(id) = id {
                        e = e.with_id(id);
                    }
                    match appender
                        .append(&stream, ExpectedVersion::Any, vec![e])
                        .await
                    {
                        Ok(_) => {}
                        // Another worker handled the same event at the same time (a redelivery
                        // while this one was slow) and recorded its send first, with other
                        // content (its own time and attempt): the notification is recorded.
                        Err(e) if e.is_id_reused() => {
                            tracing::warn!(channel = %config.name, "sent concurrently by another worker; its notification.sent stands");
                        }
                        Err(e) => return Err(e),
                    }
                    tracing::info!(channel = %config.name, subject = %message.subject, attempt, "notification sent");
                    return Ok(Outcome::Sent { attempt });
                }
                Err(err) => {
                    let transient = err.is_transient();
                    let last = !transient || attempt >= attempts;
                    let failed = Event::NotificationFailed(NotificationFailed {
                        alert_id: message.alert_id,
                        channel: config.name.clone(),
                        recipient: config.recipient(),
                        reason: err.to_string(),
                        cause: cause.map(|c| c.id),
                        attempt,
                        key: message.key.clone().unwrap_or_default(),
                        kind: message.kind.as_str().to_string(),
                        transient,
                        last,
                    });
                    appender
                        .append(&stream, ExpectedVersion::Any, vec![new_event(&failed)])
                        .await?;
                    tracing::warn!(channel = %config.name, error = %err, attempt, transient, last, "notification failed");
                    if last {
                        return Ok(Outcome::Failed {
                            attempts: attempt,
                            reason: err.to_string(),
                            transient,
                        });
                    }
                    tokio::time::sleep(self.config.backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }
}

struct NoLookup;

#[async_trait]
impl EventLookup for NoLookup {
    async fn contains(&self, _event_id: Uuid) -> Result<bool, LedgerError> {
        Ok(false)
    }
}

fn route(c: &ChannelConfig, m: &Message) -> bool {
    let Some(class) = m.kind.class() else {
        return true;
    };
    if !c.classes().contains(&class) {
        return false;
    }
    if m.kind == MessageKind::Alert && rank(m.severity) < rank(c.min_severity) {
        return false;
    }
    match &m.source {
        Some(s) if !c.sources.is_empty() => c.sources.iter().any(|x| x == s),
        _ => true,
    }
}

#[cfg(test)]
mod tests;
