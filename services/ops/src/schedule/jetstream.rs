//! A [`ScheduleLog`] for schedulers on machines without the ledger (`backstop worker`): what a
//! schedule stream holds, read from the JetStream copy of the ledger.
//!
//! The outbox publishes every committed event on `backstop.events.<type>`, so the `schedule.fired`
//! events are the messages on `backstop.events.schedule.fired`. [`JetStreamScheduleLog`] reads
//! them with an ephemeral ordered consumer (a feature of nats-server 2.9) from the start to the
//! end of the stream and keeps, per schedule stream, the newest one: its envelope's version is the
//! stream's version, since only `schedule.fired` events go into schedule streams.
//!
//! Why this is safe although JetStream lags the ledger by the publication delay: the view is
//! only a guess of the stream's version; the claim is an append with that expected version, and
//! the ledger refuses it with a conflict if anything was appended since. A stale view costs one
//! refused append, never a second firing. [`ScheduleLog::contains`] answers `false` (JetStream has
//! no index by id): the scheduler then re-appends a request whose id derives from the slot, which
//! the ledger stores once.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_trait::async_trait;
use backstop_events::{Envelope, Event};
use backstop_ledger::LedgerError;
use futures::StreamExt;
use uuid::Uuid;

use super::ScheduleError;
use super::scheduler::{RecordedFiring, ScheduleLog, StreamState};

/// The subject the outbox publishes `schedule.fired` on.
pub const FIRED_SUBJECT: &str = "backstop.events.schedule.fired";

/// Reads schedule streams from the ledger's JetStream stream (see the module docs).
pub struct JetStreamScheduleLog {
    js: jetstream::Context,
    stream: String,
    /// How long one read may take before it is a (transient) failure.
    deadline: Duration,
}

impl JetStreamScheduleLog {
    pub fn new(js: jetstream::Context, stream: impl Into<String>) -> JetStreamScheduleLog {
        JetStreamScheduleLog {
            js,
            stream: stream.into(),
            deadline: Duration::from_secs(30),
        }
    }

    async fn newest_in(&self, wanted: &str) -> Result<Option<Envelope>, ScheduleError> {
        let nats = |what: &str, e: &dyn std::fmt::Display| {
            ScheduleError::Ledger(LedgerError::Nats(format!("{what}: {e}")))
        };
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| nats(&format!("stream {}", self.stream), &e))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: FIRED_SUBJECT.to_string(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| nats("ordered consumer", &e))?;
        // Nothing on the subject yet: the first message would never come.
        if consumer.cached_info().num_pending == 0 {
            return Ok(None);
        }
        let mut newest: Option<Envelope> = None;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| nats("messages", &e))?;
        loop {
            let next = tokio::time::timeout(self.deadline, messages.next())
                .await
                .map_err(|_| nats("reading schedule.fired", &"no message within the deadline"))?;
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(nats("reading schedule.fired", &e)),
                None => break,
            };
            let pending = msg.info().map(|i| i.pending).unwrap_or(0);
            match serde_json::from_slice::<Envelope>(&msg.payload) {
                Ok(env) if env.stream == wanted => newest = Some(env),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, subject = %msg.subject, "undecodable message on the schedule subject; skipped");
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(newest)
    }
}

#[async_trait]
impl ScheduleLog for JetStreamScheduleLog {
    async fn last_firing(&self, stream: &str) -> Result<StreamState, ScheduleError> {
        let Some(env) = self.newest_in(stream).await? else {
            return Ok(StreamState {
                version: 0,
                last: None,
            });
        };
        match env.event() {
            Ok(Event::ScheduleFired(fired)) => Ok(StreamState {
                version: env.version,
                last: Some(RecordedFiring {
                    event_id: env.id,
                    occurred_at: env.occurred_at,
                    fired,
                }),
            }),
            Ok(_) => Err(ScheduleError::BadRecord {
                stream: stream.to_string(),
                version: env.version,
                why: "a message on the schedule.fired subject holds another type".into(),
            }),
            Err(e) => Err(ScheduleError::BadRecord {
                stream: stream.to_string(),
                version: env.version,
                why: e.to_string(),
            }),
        }
    }

    async fn contains(&self, _event_id: Uuid) -> Result<bool, ScheduleError> {
        Ok(false)
    }
}
