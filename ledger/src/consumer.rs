//! Drives workers: delivers events to a [`Handler`], in-process or from JetStream.
//!
//! The same handler runs in both modes:
//! - **embedded** ([`run_embedded`]): a catch-up subscription on the local ledger, with the
//!   consumer's next position kept in sled (`meta/consumer/NAME`);
//! - **distributed** ([`run_jetstream`]): a durable pull consumer on the events stream with
//!   explicit acks; results are appended through a [`crate::remote::RemoteLedger`]. Each pull
//!   asks for one message, and the next pull is made only once that one is finished, so a worker
//!   never holds events it is not working on: several processes running the same kind share its
//!   work event by event (a worker that prefetched a batch would keep the others idle, and its
//!   unstarted events would wait for it even after it died), and a pull lost with a NATS node
//!   costs at most [`PULL_EXPIRES`] + [`PULL_GRACE`] before the worker asks again.
//!
//! Delivery is at-least-once in both: a handler may see an event again after a crash, so every
//! handler must be idempotent; the usual way is to append results with ids derived from the
//! cause ([`backstop_events::NewEvent::with_derived_id`]), which the ledger stores once.
//!
//! Failures: a retryable error is retried with backoff up to `max_deliveries` attempts; after
//! that, or at once for a permanent error, the consumer appends a `worker.dead_lettered` event
//! naming the event and the error, and moves on. Nothing is dropped silently.
//!
//! Trust (distributed mode): anyone who can reach NATS can publish on `backstop.events.>`, so
//! before a handler sees a JetStream message (and before `wants` is asked) the consumer checks
//! it ([`check_message`]):
//! - the payload decodes as an envelope, and its `Backstop-Position` header names its position;
//! - its hash is SHA3-256 of its canonical encoding (the ledger's own check, see `verify`);
//! - its position is at most its stream sequence (the outbox publishes position p at sequence
//!   p, or above p once foreign messages took sequences, never below; see [`crate::outbox`]);
//! - when it is the position right after the highest one this consumer accepted, its
//!   `prev_hash` is the hash of that event.
//!
//! A message that passes but names a position this consumer already finished (acknowledged or
//! terminated) is acknowledged without acting, with a warning: it is a replay of a real envelope
//! or a redelivery whose ack was lost (after a NATS restart JetStream can even deliver it as
//! new), and acting again could only repeat work. A retried event (one the handler asked to see
//! again) is not finished, so its redelivery goes to the handler.
//!
//! - with the ledger's public key pinned ([`RetryPolicy::ledger_public_key`]), its
//!   `Backstop-Signature` is the ledger's signature over its position and hash
//!   ([`crate::outbox::event_statement`]). This is what stops a well-formed forgery that links to
//!   the chain and arrives before the real event; without a pinned key only the checks above
//!   hold, and keeping others from publishing (NATS permissions) must do the rest.
//!
//! A message that fails is never given to the handler: it is terminated (JetStream will not
//! deliver it again), logged as an error, and recorded as a `consumer.refused` event on the
//! workers stream with the reason. The event's id is derived from the stream and sequence, so the
//! many consumers that meet the same message record it once (the first one's report stands; the
//! others' `IdReused` means "already reported").

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use async_trait::async_trait;
use backstop_events::{
    Actor, ConsumerRefused, Digest, Envelope, Event, NewEvent, WorkerDeadLettered, streams,
    uuid_v7_derived,
};
use futures::StreamExt;

use crate::error::LedgerError;
use crate::outbox::{POSITION_HEADER, SIGNATURE_HEADER, SUBJECT_PREFIX};
use crate::{Appender, ExpectedVersion, Ledger};

/// Why a handler could not handle an event. The message carries the whole chain of causes (it
/// is what a dead letter records); `source` keeps the original error for callers that inspect
/// it by type.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
    /// Whether trying again later may succeed.
    pub retryable: bool,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl HandlerError {
    pub fn retryable(message: impl Into<String>) -> HandlerError {
        HandlerError {
            message: message.into(),
            retryable: true,
            source: None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> HandlerError {
        HandlerError {
            message: message.into(),
            retryable: false,
            source: None,
        }
    }
    /// Wraps `error`, keeping it as the source and its whole chain in the message. Whether to
    /// retry is the caller's decision, taken from the error's variant.
    pub fn from_error(
        error: impl std::error::Error + Send + Sync + 'static,
        retryable: bool,
    ) -> HandlerError {
        let mut message = error.to_string();
        let mut cause = error.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            cause = c.source();
        }
        HandlerError {
            message,
            retryable,
            source: Some(Box::new(error)),
        }
    }
}

impl From<LedgerError> for HandlerError {
    fn from(e: LedgerError) -> Self {
        let retryable = e.is_transient();
        HandlerError::from_error(e, retryable)
    }
}

/// A worker: reacts to some event types, appends its results through the appender.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The durable consumer name; stable across restarts.
    fn name(&self) -> &str;
    /// Whether this handler acts on events of this type (others are skipped and acknowledged).
    fn wants(&self, event_type: &str) -> bool;
    async fn handle(&self, event: &Envelope, appender: &dyn Appender) -> Result<(), HandlerError>;
    /// Called once when the consumer stops trying an event (its deliveries are exhausted, or the
    /// error was permanent), just before the `worker.dead_lettered` event: the handler records
    /// what it owes for the work it could not do (a backup retried on transient failures is
    /// recorded as failed here). The default records nothing.
    async fn give_up(
        &self,
        _event: &Envelope,
        _error: &HandlerError,
        _appender: &dyn Appender,
    ) -> Result<(), LedgerError> {
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts before an event is dead-lettered.
    pub max_deliveries: u32,
    /// Delay before the n-th retry (the last value repeats).
    pub backoff: Vec<Duration>,
    /// JetStream: how long the server waits for an ack before redelivering (a worker that died
    /// mid-event gets its event back after this).
    pub ack_wait: Duration,
    /// JetStream: the ledger's public key (hex, `[nats] ledger_public_key`). When set, a message
    /// is accepted only with a valid `Backstop-Signature` by that key (module docs).
    pub ledger_public_key: Option<String>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_deliveries: 5,
            backoff: vec![
                Duration::from_millis(200),
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            ack_wait: Duration::from_secs(60),
            ledger_public_key: None,
        }
    }
}

impl RetryPolicy {
    fn delay(&self, attempt: u32) -> Duration {
        let i = (attempt.saturating_sub(1) as usize).min(self.backoff.len().saturating_sub(1));
        self.backoff
            .get(i)
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

async fn dead_letter(
    appender: &dyn Appender,
    consumer: &str,
    event: &Envelope,
    deliveries: u32,
    error: &str,
) -> Result<(), LedgerError> {
    tracing::error!(consumer, position = event.position, event_type = %event.event_type, deliveries, error, "event dead-lettered");
    let dl = Event::WorkerDeadLettered(WorkerDeadLettered {
        consumer: consumer.to_string(),
        event_id: event.id,
        event_type: event.event_type.clone(),
        position: event.position,
        deliveries,
        error: error.to_string(),
    });
    let e = NewEvent::caused_by(event, streams::workers(), Actor::worker(consumer), &dl)
        .with_derived_id(event, &format!("dead-letter:{consumer}"));
    appender
        .append(&streams::workers(), ExpectedVersion::Any, vec![e])
        .await
        .map(|_| ())
}

/// Runs a handler on the local ledger until `shutdown` fires.
pub async fn run_embedded(
    ledger: Ledger,
    handler: Arc<dyn Handler>,
    policy: RetryPolicy,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), LedgerError> {
    let name = handler.name().to_string();
    let mut sub = ledger.subscribe(ledger.store().consumer_cursor(&name)?);
    loop {
        let batch = tokio::select! {
            b = sub.next_batch(256) => b?,
            _ = shutdown.changed() => return Ok(()),
        };
        if batch.is_empty() {
            return Ok(());
        }
        for event in batch {
            let handled = handler.wants(&event.event_type);
            if handled {
                let mut attempt = 1;
                loop {
                    match handler.handle(&event, &ledger).await {
                        Ok(()) => break,
                        Err(e) if e.retryable && attempt < policy.max_deliveries => {
                            tracing::warn!(consumer = %name, position = event.position, attempt, error = %e, "handler failed; retrying");
                            metrics::counter!("backstop_worker_redeliveries_total", "consumer" => name.clone()).increment(1);
                            tokio::select! {
                                _ = tokio::time::sleep(policy.delay(attempt)) => {}
                                _ = shutdown.changed() => return Ok(()),
                            }
                            attempt += 1;
                        }
                        Err(e) => {
                            handler.give_up(&event, &e, &ledger).await?;
                            dead_letter(&ledger, &name, &event, attempt, &e.message).await?;
                            break;
                        }
                    }
                }
            }
            ledger
                .store()
                .set_consumer_cursor(&name, event.position + 1)?;
            if handled {
                // Work was done for this event (maybe a long one, like a test restore): make its
                // cursor durable now so a crash does not repeat it. Skipped events ride on the
                // next flush.
                ledger.store().flush().await?;
            }
        }
    }
}

/// Creates (or opens) the durable pull consumer for a handler.
pub async fn durable_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    name: &str,
    policy: &RetryPolicy,
) -> Result<jetstream::consumer::Consumer<pull::Config>, LedgerError> {
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| LedgerError::Nats(format!("stream {stream_name} not found: {e} (start `backstop serve --nats` first; it creates the stream)")))?;
    stream
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_string()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: policy.ack_wait,
                // The server's limit sits above ours so that we, not the server, decide when an
                // event is dead-lettered (and record it) even if a worker died mid-delivery.
                max_deliver: i64::from(policy.max_deliveries) + 3,
                filter_subject: format!("{SUBJECT_PREFIX}.>"),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| LedgerError::Nats(format!("cannot create consumer {name}: {e}")))
}

/// Runs a handler from a JetStream durable consumer until `shutdown` fires, reconnecting after
/// NATS outages.
pub async fn run_jetstream(
    js: jetstream::Context,
    stream_name: String,
    appender: Arc<dyn Appender>,
    handler: Arc<dyn Handler>,
    policy: RetryPolicy,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), LedgerError> {
    let name = handler.name().to_string();
    let mut pause = Duration::from_millis(200);
    // What this consumer accepted and finished, kept across reconnects.
    let mut seen = Tracker::default();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let result = consume_until_error(
            &js,
            &stream_name,
            appender.as_ref(),
            handler.as_ref(),
            &policy,
            &mut shutdown,
            &mut seen,
        )
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(consumer = %name, error = %e, retry_in = ?pause, "consumer interrupted");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn consume_until_error(
    js: &jetstream::Context,
    stream_name: &str,
    appender: &dyn Appender,
    handler: &dyn Handler,
    policy: &RetryPolicy,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    seen: &mut Tracker,
) -> Result<(), LedgerError> {
    let name = handler.name();
    let consumer = durable_consumer(js, stream_name, name, policy).await?;
    loop {
        // One message per pull, asked for only when the last one is finished (module docs).
        let pulled = async {
            let mut batch = consumer
                .batch()
                .max_messages(1)
                .expires(PULL_EXPIRES)
                .messages()
                .await
                .map_err(|e| LedgerError::Nats(format!("pull from {name}: {e}")))?;
            match tokio::time::timeout(PULL_EXPIRES + PULL_GRACE, batch.next()).await {
                Ok(Some(Ok(m))) => Ok(Some(m)),
                Ok(Some(Err(e))) => Err(LedgerError::Nats(format!("pull from {name}: {e}"))),
                // The pull expired with nothing to deliver, or its node was lost with it (no
                // answer at all): ask again, through whichever node the client is on now.
                Ok(None) | Err(_) => Ok(None),
            }
        };
        let msg = tokio::select! {
            m = pulled => match m? {
                Some(m) => m,
                None => continue,
            },
            _ = shutdown.changed() => return Ok(()),
        };
        let delivered = msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
        let stream_sequence = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        if delivered > 1 {
            metrics::counter!("backstop_worker_redeliveries_total", "consumer" => name.to_string())
                .increment(1);
        }
        let ack_err = |e: async_nats::Error| LedgerError::Nats(format!("ack: {e}"));
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        let headers = MessageHeaders {
            position: header(POSITION_HEADER),
            signature: header(SIGNATURE_HEADER),
        };
        let event = match check_message(
            &msg.payload,
            &headers,
            stream_sequence,
            seen.last.as_ref(),
            policy.ledger_public_key.as_deref(),
        ) {
            Ok(event) => event,
            Err(refusal) => {
                // Never acted on; not ours to fix by retrying (the ledger keeps the original of
                // any real event).
                refuse(
                    appender,
                    name,
                    stream_name,
                    &msg.subject,
                    stream_sequence,
                    &refusal,
                )
                .await?;
                msg.ack_with(AckKind::Term).await.map_err(ack_err)?;
                continue;
            }
        };
        if seen.finished(event.position) {
            // Done here already: a replay of a real envelope, or a redelivery whose ack was lost
            // (a NATS restart can even deliver it as new). Acting again could only repeat work.
            tracing::warn!(consumer = %name, position = event.position, stream_sequence, delivered, "event already finished by this consumer (a replay, or a redelivery after a lost ack); skipped");
            metrics::counter!("backstop_consumer_replays_skipped_total", "consumer" => name.to_string())
                .increment(1);
            msg.ack().await.map_err(ack_err)?;
            continue;
        }
        if seen.last.is_none_or(|s| event.position > s.position) {
            seen.last = Some(Seen {
                position: event.position,
                hash: event.hash,
            });
        }
        if !handler.wants(&event.event_type) {
            msg.ack().await.map_err(ack_err)?;
            seen.finish(event.position);
            continue;
        }
        // Keep the server from redelivering while a long handler (a test restore) is working.
        let progress = {
            let msg_ack = msg.clone();
            let every = policy.ack_wait / 2;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if msg_ack.ack_with(AckKind::Progress).await.is_err() {
                        return;
                    }
                }
            })
        };
        let outcome = handler.handle(&event, appender).await;
        progress.abort();
        match outcome {
            Ok(()) => {
                msg.double_ack().await.map_err(ack_err)?;
                seen.finish(event.position);
                if delivered > 1 {
                    tracing::info!(consumer = %name, position = event.position, delivered, "redelivered event handled");
                }
            }
            Err(e) if e.retryable && delivered < policy.max_deliveries => {
                tracing::warn!(consumer = %name, position = event.position, delivered, error = %e, "handler failed; redelivery scheduled");
                msg.ack_with(AckKind::Nak(Some(policy.delay(delivered))))
                    .await
                    .map_err(ack_err)?;
            }
            Err(e) => {
                handler.give_up(&event, &e, appender).await?;
                dead_letter(appender, name, &event, delivered, &e.message).await?;
                msg.ack_with(AckKind::Term).await.map_err(ack_err)?;
                seen.finish(event.position);
            }
        }
    }
}

/// How long one pull waits on the server for a message; an idle worker asks again after it.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How long past [`PULL_EXPIRES`] a pull with no answer at all is given up: the server answers
/// an expired pull at once, so silence means the pull was lost (its node died, or it reached a
/// consumer whose leader was still being elected), and the worker asks again. A message that
/// raced with giving up is not lost: it was never acknowledged, so it is redelivered after the
/// ack wait.
const PULL_GRACE: Duration = Duration::from_secs(1);

/// Most finished positions a consumer remembers one by one; below the lowest it forgets, every
/// position counts as finished.
const MAX_FINISHED: usize = 65_536;

/// What a JetStream consumer has accepted and finished (acknowledged or terminated), so that a
/// second delivery of a finished event is skipped, never acted on again.
#[derive(Default, Debug)]
pub struct Tracker {
    /// The highest position accepted, for the link check.
    pub last: Option<Seen>,
    finished: std::collections::BTreeSet<u64>,
    /// Every position below this is treated as finished (the set's forgotten part).
    below: u64,
}

impl Tracker {
    pub fn finished(&self, position: u64) -> bool {
        position < self.below || self.finished.contains(&position)
    }

    pub fn finish(&mut self, position: u64) {
        self.finished.insert(position);
        while self.finished.len() > MAX_FINISHED {
            if let Some(p) = self.finished.pop_first() {
                self.below = self.below.max(p + 1);
            }
        }
    }
}

/// The last event a consumer accepted.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub position: u64,
    pub hash: Digest,
}

/// Why a message was refused, with what it claims when it decodes that far.
#[derive(Debug)]
pub struct Refusal {
    pub reason: String,
    pub claimed: Option<Box<Envelope>>,
}

/// The headers of a message that the checks read.
#[derive(Clone, Debug, Default)]
pub struct MessageHeaders {
    /// `Backstop-Position`.
    pub position: Option<String>,
    /// `Backstop-Signature`.
    pub signature: Option<String>,
}

/// The checks a JetStream message passes before any handler sees it (module docs).
/// `stream_sequence` is its sequence in the stream, `seen` the highest event this consumer
/// accepted, `ledger_key` the pinned public key of the ledger (hex), if any.
pub fn check_message(
    payload: &[u8],
    headers: &MessageHeaders,
    stream_sequence: u64,
    seen: Option<&Seen>,
    ledger_key: Option<&str>,
) -> Result<Envelope, Refusal> {
    let header = headers.position.as_deref();
    let env: Envelope = serde_json::from_slice(payload).map_err(|e| Refusal {
        reason: format!("the message is not an event envelope: {e}"),
        claimed: None,
    })?;
    let refuse = |reason: String| Refusal {
        reason,
        claimed: Some(Box::new(env.clone())),
    };
    if header != Some(env.position.to_string().as_str()) {
        return Err(refuse(format!(
            "its {POSITION_HEADER} header ({}) does not name its position {}",
            header.unwrap_or("absent"),
            env.position
        )));
    }
    if env.compute_hash() != env.hash {
        return Err(refuse(format!(
            "its hash {} is not the hash of its content ({})",
            env.hash.to_hex(),
            env.compute_hash().to_hex()
        )));
    }
    if let Some(key) = ledger_key {
        let statement = crate::outbox::event_statement(env.position, &env.hash);
        let signature = headers.signature.as_deref().unwrap_or("");
        if let Err(why) = crate::checkpoint::verify_statement(&statement, signature, key) {
            return Err(refuse(format!(
                "it is not signed by the ledger's pinned key ({}): {why}",
                if signature.is_empty() {
                    "no Backstop-Signature header"
                } else {
                    "Backstop-Signature present"
                }
            )));
        }
    }
    if env.position == 0 || env.position > stream_sequence {
        return Err(refuse(format!(
            "position {} cannot sit at stream sequence {stream_sequence}: the ledger publishes each position at a sequence at or above it",
            env.position
        )));
    }
    if let Some(seen) = seen
        && env.position == seen.position + 1
        && env.prev_hash != seen.hash
    {
        return Err(refuse(format!(
            "its prev_hash {} is not the hash {} of position {}",
            env.prev_hash.to_hex(),
            seen.hash.to_hex(),
            seen.position
        )));
    }
    Ok(env)
}

/// Reports a refused message: an error log and a `consumer.refused` event (module docs).
async fn refuse(
    appender: &dyn Appender,
    consumer: &str,
    stream_name: &str,
    subject: &str,
    stream_sequence: u64,
    refusal: &Refusal,
) -> Result<(), LedgerError> {
    let claimed = refusal.claimed.as_ref();
    tracing::error!(consumer, stream_sequence, subject, reason = %refusal.reason, "message on the events stream refused; no handler saw it");
    metrics::counter!("backstop_consumer_refused_total", "consumer" => consumer.to_string())
        .increment(1);
    let event = Event::ConsumerRefused(ConsumerRefused {
        consumer: consumer.to_string(),
        subject: subject.to_string(),
        stream_sequence,
        position: claimed.map(|e| e.position),
        event_id: claimed.map(|e| e.id),
        event_type: claimed.map(|e| e.event_type.clone()),
        reason: refusal.reason.clone(),
    });
    let id = uuid_v7_derived(
        uuid::Uuid::nil(),
        chrono::DateTime::UNIX_EPOCH,
        &format!("refused:{stream_name}:{stream_sequence}"),
    );
    let e = NewEvent::new(streams::workers(), Actor::worker(consumer), &event).with_id(id);
    match appender
        .append(&streams::workers(), ExpectedVersion::Any, vec![e])
        .await
    {
        Ok(_) => Ok(()),
        // Another consumer reported the same message first.
        Err(LedgerError::IdReused { .. }) => Ok(()),
        Err(LedgerError::Refused { kind, .. }) if kind == "id_reused" => Ok(()),
        Err(e) => Err(e),
    }
}
