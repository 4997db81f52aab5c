//! Publication of committed events to NATS JetStream, exactly once, in order.
//!
//! Wire format: one JetStream message per event, subject `backstop.events.<type>` (for example
//! `backstop.events.backup.completed`), payload the envelope as JSON (the same bytes the ledger
//! stores), headers `Nats-Msg-Id: <event id>` and `Backstop-Position: <position>`.
//!
//! The stream (`BACKSTOP_EVENTS` by default) uses file storage, denies delete and purge, and
//! keeps messages without limit. Every publish carries `Nats-Expected-Last-Sequence: position-1`,
//! so the stream's sequence numbers equal ledger positions: JetStream itself rejects a gap or a
//! reordering. That makes the outbox restart-safe beyond the duplicate window: after a crash or
//! an outage it resumes at the stream's last sequence + 1, whatever its own cursor says, and a
//! message it re-sends within the window is dropped as a duplicate by `Nats-Msg-Id`.
//!
//! The cursor in sled (`meta/publication`) records the next position to publish, for
//! `ledger stats` and for resuming without asking the server. Only features of nats-server 2.9
//! are used.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use backstop_events::Envelope;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;

use crate::Ledger;
use crate::error::LedgerError;

pub const DEFAULT_STREAM: &str = "BACKSTOP_EVENTS";
pub const SUBJECT_PREFIX: &str = "backstop.events";
pub const POSITION_HEADER: &str = "Backstop-Position";

#[derive(Clone, Debug)]
pub struct OutboxConfig {
    pub stream: String,
    pub replicas: usize,
    /// Events per pipelined publish batch.
    pub batch: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            stream: DEFAULT_STREAM.to_string(),
            replicas: 1,
            batch: 512,
        }
    }
}

/// The subject an event is published on.
pub fn subject_for(event_type: &str) -> String {
    format!("{SUBJECT_PREFIX}.{event_type}")
}

/// Creates the events stream if it does not exist, with the configuration this module relies on.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &OutboxConfig,
) -> Result<stream::Stream, LedgerError> {
    js.get_or_create_stream(stream::Config {
        name: config.stream.clone(),
        subjects: vec![format!("{SUBJECT_PREFIX}.>")],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        deny_delete: true,
        deny_purge: true,
        num_replicas: config.replicas.max(1),
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .map_err(|e| {
        LedgerError::Nats(format!(
            "cannot create or open stream {}: {e} (is JetStream enabled on the server? start it with -js)",
            config.stream
        ))
    })
}

/// Observations of one publication, for the benchmark and metrics.
#[derive(Clone, Copy, Debug)]
pub struct Published {
    pub position: u64,
    /// Time from the ledger's commit (recorded-at) to JetStream's acknowledgement.
    pub lag: Duration,
}

/// Publishes committed events until `shutdown` fires. Survives NATS outages: it retries with
/// backoff and resumes at the right position.
pub async fn run(
    ledger: Ledger,
    js: jetstream::Context,
    config: OutboxConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    observe: Option<tokio::sync::mpsc::UnboundedSender<Published>>,
) -> Result<(), LedgerError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let result =
            publish_until_error(&ledger, &js, &config, &mut shutdown, observe.as_ref()).await;
        // Not publishing now: appends must not wait for us.
        ledger.report_published(None);
        match result {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "publication to NATS paused");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn publish_until_error(
    ledger: &Ledger,
    js: &jetstream::Context,
    config: &OutboxConfig,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    observe: Option<&tokio::sync::mpsc::UnboundedSender<Published>>,
) -> Result<(), LedgerError> {
    let mut stream = ensure_stream(js, config).await?;
    let info = stream
        .info()
        .await
        .map_err(|e| LedgerError::Nats(format!("stream info: {e}")))?;
    let published = info.state.last_sequence;
    let head = ledger.head().position;
    if published > head {
        return Err(LedgerError::Nats(format!(
            "stream {} holds {published} events but the ledger only {head}: this ledger is older than the stream (restored from a backup?); see docs/RUNBOOK.md",
            config.stream
        )));
    }
    let mut next = published + 1;
    ledger.store().set_publication_cursor(next)?;
    ledger.report_published(Some(published));
    let mut sub = ledger.subscribe(next);
    // Publishing is pipelined: new events go out while earlier acks are still on their way, up
    // to MAX_IN_FLIGHT. Acks are awaited in order, so the cursor only ever moves past a position
    // whose ack (and every earlier one) has arrived.
    let mut in_flight = FuturesOrdered::new();
    let mut acked = published;
    loop {
        tokio::select! {
            biased;
            Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                let (position, recorded_at): (u64, i64) = result?;
                acked = position;
                ledger.report_published(Some(acked));
                if let Some(tx) = observe {
                    let now = chrono::Utc::now().timestamp_micros();
                    let _ = tx.send(Published {
                        position,
                        lag: Duration::from_micros((now - recorded_at).max(0) as u64),
                    });
                }
                if in_flight.is_empty() || acked % 256 == 0 {
                    ledger.store().set_publication_cursor(acked + 1)?;
                }
            }
            batch = sub.next_batch(config.batch.min(512)), if in_flight.len() < MAX_IN_FLIGHT => {
                let batch = batch?;
                if batch.is_empty() {
                    return Ok(());
                }
                for env in &batch {
                    debug_assert_eq!(env.position, next);
                    in_flight.push_back(publish(js, env).await?);
                    next += 1;
                }
            }
            _ = shutdown.changed() => {
                // Let what is in flight land so the cursor is exact, then stop.
                while let Some(result) = in_flight.next().await {
                    acked = result?.0;
                }
                ledger.store().set_publication_cursor(acked + 1)?;
                return Ok(());
            }
        }
    }
}

/// Most publishes awaiting their ack at once. async-nats allows 5,000 pending acks per context
/// and makes `send_publish` wait for a free one; staying below that (with a batch of at most 512
/// on top) keeps this loop from waiting on itself.
const MAX_IN_FLIGHT: usize = 4096;

type AckFuture = std::pin::Pin<Box<dyn Future<Output = Result<(u64, i64), LedgerError>> + Send>>;

/// Sends one event and returns a future of its acknowledgement: (position, recorded-at µs).
async fn publish(js: &jetstream::Context, env: &Envelope) -> Result<AckFuture, LedgerError> {
    let payload = serde_json::to_vec(env).map_err(|e| LedgerError::Corrupt {
        position: env.position,
        what: e.to_string(),
    })?;
    let msg = jetstream::message::PublishMessage::build()
        .payload(Bytes::from(payload))
        .message_id(env.id.to_string())
        .expected_last_sequence(env.position - 1)
        .header(POSITION_HEADER, env.position.to_string().as_str());
    let position = env.position;
    let recorded_at = env.recorded_at.timestamp_micros();
    let ack: PublishAckFuture = js
        .send_publish(subject_for(&env.event_type), msg)
        .await
        .map_err(|e| LedgerError::Nats(format!("publish {position}: {e}")))?;
    Ok(Box::pin(async move {
        ack.await
            .map_err(|e| LedgerError::Nats(format!("ack of {position}: {e}")))?;
        Ok((position, recorded_at))
    }))
}

/// Waits until the stream holds every event up to `position` (for tests and tools).
pub async fn wait_published(
    js: &jetstream::Context,
    stream_name: &str,
    position: u64,
    timeout: Duration,
) -> Result<(), LedgerError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut s) = js.get_stream(stream_name).await
            && let Ok(info) = s.info().await
            && info.state.last_sequence >= position
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LedgerError::Nats(format!(
                "position {position} was not published within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
