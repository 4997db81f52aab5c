//! Publication of committed events to NATS JetStream, exactly once, in order.
//!
//! Wire format: one JetStream message per event, subject `backstop.events.<type>` (for example
//! `backstop.events.backup.completed`), payload the envelope as JSON (the same bytes the ledger
//! stores), headers `Nats-Msg-Id: <the event's hash, hex>`, `Backstop-Position: <position>` and
//! `Backstop-Signature: <hex>`, the ledger's ed25519 signature (its checkpoint key) over
//! [`event_statement`], which consumers that pin the ledger's public key require.
//! The message id is the hash, not the event id, because event ids can be predicted (derived
//! ids) and a foreign message that took an event's id first would make JetStream drop the real
//! one as a duplicate; the hash covers the previous event's hash and the commit time, so nobody
//! can know it before the ledger publishes it.
//!
//! The stream (`BACKSTOP_EVENTS` by default) uses file storage, denies delete and purge, and
//! keeps messages without limit. The ledger's events enter it in position order with no gap:
//! the first publish after a (re)start carries `Nats-Expected-Last-Sequence` (the stream's last
//! sequence, just read) and every following one `Nats-Expected-Last-Msg-Id` (the previous
//! event's message id), so JetStream itself rejects a gap or a reordering, and a message anyone
//! else slips in between breaks the chain: the next publish fails, the outbox starts over.
//!
//! Where it resumes: the last *genuine* ledger event in the stream, found by walking back from
//! the stream's last message (a genuine message is byte for byte the ledger's envelope at its
//! position). Anything else on `backstop.events.>` (published by someone who could reach NATS)
//! is skipped with a warning, so a foreign message can never make the outbox skip a real event.
//! Without foreign messages the stream sequence equals the position; with them a genuine event
//! sits at a sequence above its position, never below (the consumers check that, see
//! [`crate::consumer`]). A well-formed envelope beyond the ledger's head is skipped too, with an
//! error: it is a forgery, or this ledger is older than the stream (restored from a backup). Not
//! stopping keeps a forger from halting publication; after a restore, the consumers refuse the
//! re-used positions as replays (they have seen higher ones), so nothing acts on two histories.
//!
//! The cursor in sled (`meta/publication`) records the next position to publish, for
//! `ledger stats` and for resuming without asking the server. Only features of nats-server 2.9
//! are used.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishAckFuture, stream};
use backstop_events::Envelope;
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};

use crate::Ledger;
use crate::error::LedgerError;

pub const DEFAULT_STREAM: &str = "BACKSTOP_EVENTS";
pub const SUBJECT_PREFIX: &str = "backstop.events";
pub const POSITION_HEADER: &str = "Backstop-Position";
/// The ledger's ed25519 signature over [`event_statement`], hex.
pub const SIGNATURE_HEADER: &str = "Backstop-Signature";

/// What the outbox signs for each event it publishes: `backstop-event/1`, a newline, the
/// position (u64 big-endian) and the hash (32 bytes). Signed through
/// `CheckpointSigner::sign_statement`, whose own prefix keeps it apart from checkpoints; the
/// audit export's statements are canonical JSON, which never starts with these bytes.
pub fn event_statement(position: u64, hash: &backstop_events::Digest) -> Vec<u8> {
    let mut b = b"backstop-event/1\n".to_vec();
    b.extend_from_slice(&position.to_be_bytes());
    b.extend_from_slice(&hash.0);
    b
}

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
        let before = ledger.store().publication_cursor()?;
        let result =
            publish_until_error(&ledger, &js, &config, &mut shutdown, observe.as_ref()).await;
        // Not publishing now: appends must not wait for us.
        ledger.report_published(None);
        if ledger.store().publication_cursor()? > before {
            // It made progress before this error (a foreign message broke the chain, say):
            // start over soon.
            backoff = Duration::from_millis(100);
        }
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
    let opened = tokio::time::timeout(RESUME_TIMEOUT, async {
        let mut stream = ensure_stream(js, config).await?;
        let last_sequence = stream
            .info()
            .await
            .map_err(|e| LedgerError::Nats(format!("stream info: {e}")))?
            .state
            .last_sequence;
        Ok::<_, LedgerError>((stream, last_sequence))
    })
    .await
    .map_err(|_| {
        LedgerError::Nats(format!(
            "stream {} did not answer within {RESUME_TIMEOUT:?} (is its leader being elected after a NATS node was lost?)",
            config.stream
        ))
    })?;
    let (stream, last_sequence) = opened?;
    let floor = ledger.store().publication_cursor()?.saturating_sub(1);
    let published = last_genuine(ledger, &stream, last_sequence, floor, &config.stream).await?;
    let mut next = published + 1;
    ledger.store().set_publication_cursor(next)?;
    ledger.report_published(Some(published));
    let mut sub = ledger.subscribe(next);
    // Publishing is pipelined: new events go out while earlier acks are still on their way, up
    // to MAX_IN_FLIGHT. Acks are awaited in order, so the cursor only ever moves past a position
    // whose ack (and every earlier one) has arrived.
    let mut in_flight = FuturesOrdered::new();
    let mut acked = published;
    // What the next publish expects to follow (module docs).
    let mut expect = Expect::Sequence(last_sequence);
    loop {
        tokio::select! {
            biased;
            Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                let mut ack = result?;
                loop {
                    let (position, recorded_at): (u64, i64) = ack;
                    acked = position;
                    if let Some(tx) = observe {
                        let now = chrono::Utc::now().timestamp_micros();
                        let _ = tx.send(Published {
                            position,
                            lag: Duration::from_micros((now - recorded_at).max(0) as u64),
                        });
                    }
                    // Acks that have already arrived are taken now, so one cursor write and one
                    // wake-up of the writer's flow control cover them all.
                    match in_flight.next().now_or_never() {
                        Some(Some(next)) => ack = next?,
                        _ => break,
                    }
                }
                ledger.report_published(Some(acked));
                // Every run of acks: the cursor bounds the walk back on the next start (module
                // docs).
                ledger.store().set_publication_cursor(acked + 1)?;
            }
            batch = sub.next_batch(config.batch.min(512)), if in_flight.len() < MAX_IN_FLIGHT => {
                let batch = batch?;
                if batch.is_empty() {
                    return Ok(());
                }
                for env in &batch {
                    debug_assert_eq!(env.position, next);
                    let signature = ledger.sign_event(env.position, &env.hash);
                    in_flight.push_back(publish(js, env, &expect, &signature).await?);
                    expect = Expect::MessageId(message_id(env));
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

/// How long a (re)start of publication waits for the stream's state. Shorter than the client's
/// request timeout on purpose: right after a NATS node is lost the stream has no leader until the
/// other nodes elect one (a few seconds), a request sent meanwhile is never answered, and asking
/// again soon (with the run loop's backoff) finds the new leader sooner than waiting out the
/// full timeout. Both requests are reads or a create-if-missing, so giving one up is harmless.
const RESUME_TIMEOUT: Duration = Duration::from_secs(2);

/// Most publishes awaiting their ack at once. async-nats allows 5,000 pending acks per context
/// and makes `send_publish` wait for a free one; staying below that (with a batch of at most 512
/// on top) keeps this loop from waiting on itself.
const MAX_IN_FLIGHT: usize = 4096;

type AckFuture = std::pin::Pin<Box<dyn Future<Output = Result<(u64, i64), LedgerError>> + Send>>;

/// Most foreign messages the outbox walks back over to find the last genuine event.
const MAX_FOREIGN: u64 = 100_000;

/// The highest position of a genuine ledger event in the stream, walking back from
/// `last_sequence` over foreign messages (module docs); 0 if there is none.
///
/// A genuine message can also be a replay (someone re-published a real envelope), so the first
/// genuine message met is not necessarily the last one published. `floor` is the last position
/// the outbox saw acknowledged (its cursor, which lags only by what a crash lost): the walk goes
/// on until it has seen a genuine position at or above the floor and then one at or below it.
/// Real publications have increasing positions in stream order, so nothing higher lies further
/// back. A genuine event at a sequence equal to its position ends the walk too (nothing but the
/// positions before it fits before it). A cursor above anything in the stream (a wiped stream)
/// walks to the start and counts for nothing.
async fn last_genuine(
    ledger: &Ledger,
    stream: &stream::Stream,
    last_sequence: u64,
    floor: u64,
    stream_name: &str,
) -> Result<u64, LedgerError> {
    let head = ledger.head().position;
    let mut sequence = last_sequence;
    let mut foreign = 0u64;
    let mut highest = 0u64;
    while sequence > 0 {
        if foreign >= MAX_FOREIGN {
            return Err(LedgerError::Nats(format!(
                "stream {stream_name} ends with more than {MAX_FOREIGN} messages the ledger did not publish; restrict who may publish on {SUBJECT_PREFIX}.> (deploy/nats/)"
            )));
        }
        let msg = stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| LedgerError::Nats(format!("read message {sequence}: {e}")))?;
        match classify(ledger, &msg.payload, head)? {
            Found::Genuine(position) => {
                highest = highest.max(position);
                // At sequence == position, sequences 1.. hold exactly positions 1.. (a real
                // event never sits below its position): nothing higher lies further back.
                if (highest >= floor && position <= floor) || position == sequence {
                    if foreign > 0 {
                        tracing::warn!(
                            stream = stream_name,
                            foreign,
                            position = highest,
                            "publication resumes after messages the ledger did not publish"
                        );
                    }
                    return Ok(highest);
                }
            }
            Found::Beyond(position) => {
                // Either a forgery or the event of a newer ledger (this one restored from a
                // backup). Stopping here would let anyone who can publish stop publication, so
                // it is skipped like any foreign message, loudly; consumers refuse whatever the
                // two histories make ambiguous (module docs).
                tracing::error!(
                    stream = stream_name,
                    sequence,
                    position,
                    head,
                    "the events stream holds a well-formed event beyond the ledger's head: a forgery, or this ledger is older than the stream (restored from a backup?); skipped"
                );
                foreign += 1;
            }
            Found::Foreign(why) => {
                tracing::warn!(stream = stream_name, sequence, subject = %msg.subject, why, "a message the ledger did not publish is on the events stream; skipped");
                foreign += 1;
            }
        }
        sequence -= 1;
    }
    Ok(highest)
}

enum Found {
    /// The ledger's own envelope at this position.
    Genuine(u64),
    /// A canonical envelope beyond the ledger's head.
    Beyond(u64),
    Foreign(&'static str),
}

fn classify(ledger: &Ledger, payload: &[u8], head: u64) -> Result<Found, LedgerError> {
    let Ok(env) = serde_json::from_slice::<Envelope>(payload) else {
        return Ok(Found::Foreign("it is not an envelope"));
    };
    if env.position > head {
        return Ok(if env.position > 0 && env.compute_hash() == env.hash {
            Found::Beyond(env.position)
        } else {
            Found::Foreign("its position is beyond the head and its hash is wrong")
        });
    }
    let genuine = match ledger.store().get(env.position)? {
        Some(stored) => serde_json::to_vec(&stored).ok().as_deref() == Some(payload),
        None => false,
    };
    Ok(if genuine {
        Found::Genuine(env.position)
    } else {
        Found::Foreign("it is not the ledger's event at its position")
    })
}

/// What the stream must end with for a publish to go in.
enum Expect {
    Sequence(u64),
    MessageId(String),
}

/// The `Nats-Msg-Id` of an event (module docs).
pub fn message_id(env: &Envelope) -> String {
    env.hash.to_hex()
}

/// Sends one event and returns a future of its acknowledgement: (position, recorded-at µs).
async fn publish(
    js: &jetstream::Context,
    env: &Envelope,
    expect: &Expect,
    signature: &str,
) -> Result<AckFuture, LedgerError> {
    let payload = serde_json::to_vec(env).map_err(|e| LedgerError::Corrupt {
        position: env.position,
        what: e.to_string(),
    })?;
    let msg = jetstream::message::PublishMessage::build()
        .payload(Bytes::from(payload))
        .message_id(message_id(env))
        .header(POSITION_HEADER, env.position.to_string().as_str())
        .header(SIGNATURE_HEADER, signature);
    let msg = match expect {
        Expect::Sequence(s) => msg.expected_last_sequence(*s),
        Expect::MessageId(id) => msg.expected_last_message_id(id),
    };
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
