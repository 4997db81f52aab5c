//! The single writer: every append goes through one task, which commits in groups.
//!
//! Why one writer: the hash chain is a strict sequence (each event hashes the previous one), so
//! appends must be ordered somewhere; doing it in one task removes every race on the head, the
//! stream versions and the id index, and lets one flush cover many appends (group commit).
//!
//! The loop: wait for one request, take every other request already queued (up to
//! [`MAX_GROUP`] events), apply them all in one sled transaction that reads each stream head
//! inside the transaction, flush once, then answer every caller. A caller is answered only after
//! the flush that made its events durable, and never for events that did not commit. A request
//! that conflicts is rejected on its own; the rest of its group commits.
//!
//! Checkpoints are signed every `checkpoint_every` events or `checkpoint_interval`, whichever
//! comes first, and written before the flush of the group that triggered them.
//!
//! Duplicates are compared by content. An offered event whose id is already stored (or earlier
//! in the same group or request) is a duplicate only if it says the same thing: the same
//! stream, type, schema version, payload, actor and causation. Otherwise the whole request is
//! refused with [`LedgerError::IdReused`] and nothing of it is written, so an id claimed in
//! advance (derived ids are predictable) can never swallow the real event: its appender hears
//! about it. Two fields are left out of the comparison on purpose, because an honest retry of
//! the same event recomputes them: `occurred_at` (a redelivered handler builds its result again
//! at a later time, two monitors racing for one slot stamp their own clocks) and
//! `correlation_id` (an event built with [`NewEvent::new`] and then given a derived id carries a
//! fresh correlation). Neither is what an event asserts. The payload comparison is exact: it
//! seals the offered event with the stored one's position, times and links and compares hashes,
//! so no JSON number is ever re-parsed.
//!
//! A storage error (a failed flush or transaction) puts the writer in a failed state for good:
//! the transaction may have applied in sled's memory without reaching the disk, so a retry would
//! find its ids "already stored" and be acknowledged for events that are not durable. From then
//! on every append is answered [`LedgerError::Failed`] (permanent), nothing more is written (no
//! checkpoint, no final flush), and [`crate::Ledger::failed`] resolves so `serve` stops. A restart
//! reopens the ledger from what is on disk.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use backstop_events::{Envelope, NewEvent, now_micros};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpoint::CheckpointSigner;
use crate::error::LedgerError;
use crate::store::{Head, KEY_HEAD, Store, read_u64, stream_version_key, u64_key};

/// At most this many events per group commit.
pub const MAX_GROUP: usize = 4096;
/// At most this many events per append request.
pub const MAX_BATCH: usize = 1000;

/// Flow control: the writer commits a group only once a healthy outbox would be at most this
/// many events behind with the group committed; otherwise it waits (up to
/// [`PUBLICATION_PATIENCE`]). It keeps the second copy in JetStream close behind the ledger:
/// an event's publication lag is about this backlog over the publication rate (256 events at
/// ~6,000 published/s on the 2-core bench machine is ~40 ms), whatever the number of appenders.
/// Counting the group itself matters: with 256 appenders a group alone is up to 256 events.
pub const MAX_UNPUBLISHED: u64 = 256;
/// How long the writer waits for publication to catch up before committing anyway: a stalled or
/// absent NATS never stops appends.
pub const PUBLICATION_PATIENCE: Duration = Duration::from_millis(250);

/// The version a stream must be at for an append to go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "expect", content = "version")]
pub enum ExpectedVersion {
    /// Append whatever the stream's version.
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must be at exactly this version.
    Exact(u64),
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream (version 0)"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// One committed (or already present) event.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Committed {
    pub id: uuid::Uuid,
    pub position: u64,
    pub version: u64,
    /// True when the id was already in the ledger and nothing was written.
    pub duplicate: bool,
}

/// The outcome of an append.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Appended {
    pub events: Vec<Committed>,
    /// The stream's version after the append.
    pub stream_version: u64,
}

impl Appended {
    pub fn last_position(&self) -> u64 {
        self.events.iter().map(|c| c.position).max().unwrap_or(0)
    }
}

pub(crate) struct AppendRequest {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub reply: oneshot::Sender<Result<Appended, LedgerError>>,
}

/// A fault-injection seam for the writer's durability step (tests only use it; production opens
/// the ledger with [`FlushFaults::none`]). Each armed fault makes one flush fail with an I/O
/// error before sled is asked to flush, the way a full or failing disk would.
#[derive(Clone, Default, Debug)]
pub struct FlushFaults {
    failing: Arc<AtomicU32>,
}

impl FlushFaults {
    pub fn none() -> FlushFaults {
        FlushFaults::default()
    }

    /// Makes the next `n` flushes fail.
    pub fn fail_next(&self, n: u32) {
        self.failing.store(n, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), sled::Error> {
        let armed = self
            .failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match armed {
            Ok(_) => Err(sled::Error::Io(std::io::Error::other(
                "injected flush failure",
            ))),
            Err(_) => Ok(()),
        }
    }
}

pub(crate) struct WriterConfig {
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
}

pub(crate) struct Writer {
    store: Store,
    signer: Arc<CheckpointSigner>,
    config: WriterConfig,
    head_tx: watch::Sender<Head>,
    /// The last position the outbox has seen acknowledged; `None` without a healthy outbox.
    published: watch::Receiver<Option<u64>>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// Set by the first storage error; the writer then refuses every append (module docs).
    failed: Option<String>,
    failed_tx: watch::Sender<Option<String>>,
    faults: FlushFaults,
}

impl Writer {
    pub fn new(
        store: Store,
        signer: Arc<CheckpointSigner>,
        config: WriterConfig,
        head_tx: watch::Sender<Head>,
        published: watch::Receiver<Option<u64>>,
        failed_tx: watch::Sender<Option<String>>,
        faults: FlushFaults,
    ) -> Writer {
        Writer {
            store,
            signer,
            config,
            head_tx,
            published,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            failed: None,
            failed_tx,
            faults,
        }
    }

    /// Flushes through the fault seam.
    async fn flush(&self) -> Result<(), sled::Error> {
        self.faults.check()?;
        self.store.db.flush_async().await.map(drop)
    }

    /// Enters the failed state (module docs); the first reason is kept.
    fn fail(&mut self, reason: String) {
        if self.failed.is_none() {
            tracing::error!(%reason, "the ledger writer stops accepting appends until the process is restarted");
            self.failed = Some(reason.clone());
            self.failed_tx.send_replace(Some(reason));
        }
    }

    /// Runs until every sender is dropped, then signs a final checkpoint and flushes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<AppendRequest>) {
        let mut tick = tokio::time::interval(self.config.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                req = rx.recv() => match req {
                    Some(r) => r,
                    None => break,
                },
                _ = tick.tick() => {
                    if self.failed.is_none()
                        && self.since_checkpoint > 0
                        && self.last_checkpoint.elapsed() >= self.config.checkpoint_interval
                    {
                        let written = match self.checkpoint_now() {
                            Ok(()) => self.flush().await.map_err(LedgerError::from),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = written {
                            tracing::error!(error = %e, "could not write a timed checkpoint");
                            self.fail(format!("timed checkpoint: {e}"));
                        }
                    }
                    continue;
                }
            };
            if let Some(reason) = &self.failed {
                let reason = reason.clone();
                let _ = first.reply.send(Err(LedgerError::Failed {
                    reason: reason.clone(),
                }));
                while let Ok(r) = rx.try_recv() {
                    let _ = r.reply.send(Err(LedgerError::Failed {
                        reason: reason.clone(),
                    }));
                }
                continue;
            }
            let mut group = vec![first];
            let mut n = group[0].events.len();
            while n < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => {
                        n += r.events.len();
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.await_publication(n as u64).await;
            self.commit_group(group).await;
        }
        if self.failed.is_some() {
            // Nothing more is written after a storage error (module docs).
            return;
        }
        if self.since_checkpoint > 0
            && let Err(e) = self.checkpoint_now()
        {
            tracing::error!(error = %e, "could not write the final checkpoint");
        }
        if let Err(e) = self.flush().await {
            tracing::error!(error = %e, "final ledger flush failed");
        }
    }

    /// Waits until committing `incoming` more events keeps the backlog within
    /// [`MAX_UNPUBLISHED`] (a group larger than that waits for an empty backlog), or until
    /// [`PUBLICATION_PATIENCE`] has passed.
    async fn await_publication(&mut self, incoming: u64) {
        let head = self.head_tx.borrow().position;
        let deadline = tokio::time::Instant::now() + PUBLICATION_PATIENCE;
        loop {
            let published = *self.published.borrow_and_update();
            match published {
                Some(p) if p < head && (head - p).saturating_add(incoming) > MAX_UNPUBLISHED => {
                    match tokio::time::timeout_at(deadline, self.published.changed()).await {
                        Ok(Ok(())) => continue,
                        // Publication stalled (or the outbox is gone): commit anyway.
                        _ => return,
                    }
                }
                _ => return,
            }
        }
    }

    async fn commit_group(&mut self, group: Vec<AppendRequest>) {
        let outcome = self.apply(&group);
        let results = match outcome {
            Ok((results, head, written)) => {
                self.since_checkpoint += written;
                let mut flushed = Ok(());
                if written > 0 {
                    if (self.since_checkpoint >= self.config.checkpoint_every
                        || self.last_checkpoint.elapsed() >= self.config.checkpoint_interval)
                        && let Err(e) = self.checkpoint_now()
                    {
                        tracing::error!(error = %e, "could not write a checkpoint");
                    }
                    flushed = self.flush().await;
                }
                match flushed {
                    Ok(()) => {
                        self.head_tx.send_replace(head);
                        results
                    }
                    Err(e) => {
                        // The transaction applied in memory but may not be durable; the
                        // callers must not be told it is, now or on a retry (module docs).
                        tracing::error!(error = %e, "ledger flush failed");
                        self.fail(format!("flush failed: {e}"));
                        group
                            .iter()
                            .map(|_| Err(LedgerError::Storage(e.clone())))
                            .collect()
                    }
                }
            }
            Err(e) => {
                let msg = match e {
                    TransactionError::Storage(e) => e.to_string(),
                    TransactionError::Abort(()) => "transaction aborted".to_string(),
                };
                tracing::error!(error = %msg, "ledger transaction failed");
                self.fail(format!("transaction failed: {msg}"));
                group
                    .iter()
                    .map(|_| Err(LedgerError::Storage(sled::Error::Unsupported(msg.clone()))))
                    .collect()
            }
        };
        for (req, result) in group.into_iter().zip(results) {
            // A caller that went away no longer wants the answer; its events are committed.
            let _ = req.reply.send(result);
        }
    }

    fn checkpoint_now(&mut self) -> Result<(), LedgerError> {
        let head = self.store.head()?;
        if head.position == 0 {
            return Ok(());
        }
        let cp = self.signer.sign(head.position, head.hash);
        let json = serde_json::to_vec(&cp).map_err(|e| LedgerError::Corrupt {
            position: head.position,
            what: format!("cannot encode checkpoint: {e}"),
        })?;
        self.store
            .checkpoints
            .insert(u64_key(head.position), json)?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Applies a group in one transaction. Returns each request's result, the new head and the
    /// number of events written.
    #[allow(clippy::type_complexity)]
    fn apply(
        &self,
        group: &[AppendRequest],
    ) -> Result<(Vec<Result<Appended, LedgerError>>, Head, u64), TransactionError<()>> {
        let s = &self.store;
        (&s.events, &s.ids, &s.streams, &s.stream_events, &s.meta).transaction(
            |(events, ids, streams, stream_events, meta)| {
                // sled may run this closure more than once: all state starts here.
                let mut head = match meta.get(KEY_HEAD)? {
                    Some(b) => Head::decode(&b).unwrap_or_default(),
                    None => Head::default(),
                };
                let mut versions: HashMap<&str, u64> = HashMap::new();
                let mut new_ids: HashMap<uuid::Uuid, (Committed, &NewEvent)> = HashMap::new();
                let mut results = Vec::with_capacity(group.len());
                let mut written = 0u64;
                let recorded_at = now_micros();
                'requests: for req in group {
                    // An id twice in one request must name the same event both times.
                    let mut in_request: HashMap<uuid::Uuid, &NewEvent> = HashMap::new();
                    for e in &req.events {
                        if let Some(first) = in_request.insert(e.id, e)
                            && !same_event(first, e)
                        {
                            results.push(Err(LedgerError::IdReused { id: e.id }));
                            continue 'requests;
                        }
                    }
                    // Idempotency: ids already stored (or stored earlier in this group) are
                    // duplicates only with the same content (module docs).
                    let mut existing = Vec::new();
                    for e in &req.events {
                        if let Some((c, stored)) = new_ids.get(&e.id) {
                            if !same_event(stored, e) {
                                results.push(Err(LedgerError::IdReused { id: e.id }));
                                continue 'requests;
                            }
                            existing.push(Some(c.clone()));
                        } else if let Some(p) = ids.get(e.id.as_bytes())? {
                            let position = read_u64(&p).unwrap_or(0);
                            let stored = match events.get(u64_key(position))? {
                                Some(b) => serde_json::from_slice::<Envelope>(&b).ok(),
                                None => None,
                            };
                            // An entry that cannot be read back cannot be shown to match.
                            let Some(stored) = stored.filter(|s| same_content(s, e)) else {
                                results.push(Err(LedgerError::IdReused { id: e.id }));
                                continue 'requests;
                            };
                            existing.push(Some(Committed {
                                id: e.id,
                                position,
                                version: stored.version,
                                duplicate: true,
                            }));
                        } else {
                            existing.push(None);
                        }
                    }
                    let current = match versions.get(req.stream.as_str()) {
                        Some(v) => *v,
                        None => streams
                            .get(req.stream.as_bytes())?
                            .and_then(|v| read_u64(&v))
                            .unwrap_or(0),
                    };
                    if existing.iter().all(Option::is_some) {
                        let events = existing
                            .into_iter()
                            .flatten()
                            .map(|mut c| {
                                c.duplicate = true;
                                c
                            })
                            .collect();
                        results.push(Ok(Appended {
                            events,
                            stream_version: current,
                        }));
                        continue;
                    }
                    if let Some(Some(c)) = existing.iter().find(|e| e.is_some()) {
                        results.push(Err(LedgerError::IdReused { id: c.id }));
                        continue;
                    }
                    let ok = match req.expected {
                        ExpectedVersion::Any => true,
                        ExpectedVersion::NoStream => current == 0,
                        ExpectedVersion::Exact(v) => current == v,
                    };
                    if !ok {
                        results.push(Err(LedgerError::Conflict {
                            stream: req.stream.clone(),
                            expected: req.expected.to_string(),
                            actual: current,
                        }));
                        continue;
                    }
                    let mut version = current;
                    let mut committed = Vec::with_capacity(req.events.len());
                    for e in &req.events {
                        if new_ids.contains_key(&e.id) {
                            // The same event twice in one request (checked equal above).
                            continue;
                        }
                        version += 1;
                        let position = head.position + 1;
                        let env =
                            Envelope::seal(e.clone(), position, version, recorded_at, head.hash);
                        let bytes = serde_json::to_vec(&env).unwrap_or_default();
                        events.insert(&u64_key(position), bytes)?;
                        ids.insert(e.id.as_bytes(), &u64_key(position))?;
                        stream_events
                            .insert(stream_version_key(&req.stream, version), &u64_key(position))?;
                        head = Head {
                            position,
                            hash: env.hash,
                        };
                        let c = Committed {
                            id: e.id,
                            position,
                            version,
                            duplicate: false,
                        };
                        new_ids.insert(e.id, (c.clone(), e));
                        committed.push(c);
                        written += 1;
                    }
                    streams.insert(req.stream.as_bytes(), &u64_key(version))?;
                    versions.insert(req.stream.as_str(), version);
                    results.push(Ok(Appended {
                        events: committed,
                        stream_version: version,
                    }));
                }
                if written > 0 {
                    meta.insert(KEY_HEAD, &head.encode()[..])?;
                }
                Ok::<_, ConflictableTransactionError<()>>((results, head, written))
            },
        )
    }
}

/// Whether two offered events say the same thing (module docs: `occurred_at` and
/// `correlation_id` are left out).
fn same_event(a: &NewEvent, b: &NewEvent) -> bool {
    a.stream == b.stream
        && a.event_type == b.event_type
        && a.schema_version == b.schema_version
        && a.actor == b.actor
        && a.causation_id == b.causation_id
        && a.payload == b.payload
}

/// Whether `offered` is the event already stored as `stored`: sealed in `stored`'s place (its
/// position, version, times, correlation and link), it must hash the same. Comparing hashes of
/// the in-memory values avoids any re-parsing of JSON numbers.
fn same_content(stored: &Envelope, offered: &NewEvent) -> bool {
    if stored.stream != offered.stream || stored.event_type != offered.event_type {
        return false;
    }
    let mut e = offered.clone();
    e.occurred_at = stored.occurred_at;
    e.correlation_id = stored.correlation_id;
    let resealed = Envelope::seal(
        e,
        stored.position,
        stored.version,
        stored.recorded_at,
        stored.prev_hash,
    );
    resealed.hash == stored.hash
}
