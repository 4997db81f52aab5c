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

use std::collections::{HashMap, HashSet};
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

/// Flow control: while a healthy outbox is more than this many events behind, the writer waits
/// (up to [`PUBLICATION_PATIENCE`]) before committing more. It keeps the second copy in JetStream
/// close behind the ledger instead of letting a burst build a backlog of seconds.
pub const MAX_UNPUBLISHED: u64 = 1024;
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

pub(crate) struct WriterConfig {
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
}

pub(crate) struct Writer {
    store: Store,
    signer: CheckpointSigner,
    config: WriterConfig,
    head_tx: watch::Sender<Head>,
    /// The last position the outbox has seen acknowledged; `None` without a healthy outbox.
    published: watch::Receiver<Option<u64>>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
}

impl Writer {
    pub fn new(
        store: Store,
        signer: CheckpointSigner,
        config: WriterConfig,
        head_tx: watch::Sender<Head>,
        published: watch::Receiver<Option<u64>>,
    ) -> Writer {
        Writer {
            store,
            signer,
            config,
            head_tx,
            published,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
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
                    if self.since_checkpoint > 0
                        && self.last_checkpoint.elapsed() >= self.config.checkpoint_interval
                        && let Err(e) = self
                            .checkpoint_now()
                            .and_then(|_| self.store.db.flush().map_err(Into::into))
                    {
                        tracing::error!(error = %e, "could not write a timed checkpoint");
                    }
                    continue;
                }
            };
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
            self.await_publication().await;
            self.commit_group(group).await;
        }
        if self.since_checkpoint > 0
            && let Err(e) = self.checkpoint_now()
        {
            tracing::error!(error = %e, "could not write the final checkpoint");
        }
        if let Err(e) = self.store.db.flush_async().await {
            tracing::error!(error = %e, "final ledger flush failed");
        }
    }

    async fn await_publication(&mut self) {
        let head = self.head_tx.borrow().position;
        let deadline = tokio::time::Instant::now() + PUBLICATION_PATIENCE;
        loop {
            let published = *self.published.borrow_and_update();
            match published {
                Some(p) if head.saturating_sub(p) > MAX_UNPUBLISHED => {
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
                    flushed = self.store.db.flush_async().await.map(|_| ());
                }
                match flushed {
                    Ok(()) => {
                        self.head_tx.send_replace(head);
                        results
                    }
                    Err(e) => {
                        // The transaction applied in memory but may not be durable; the
                        // callers must not be told it is. They retry with the same ids.
                        tracing::error!(error = %e, "ledger flush failed");
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
                let mut new_ids: HashMap<uuid::Uuid, Committed> = HashMap::new();
                let mut results = Vec::with_capacity(group.len());
                let mut written = 0u64;
                let recorded_at = now_micros();
                for req in group {
                    // Idempotency: ids already stored (or stored earlier in this group).
                    let mut existing = Vec::new();
                    for e in &req.events {
                        if let Some(c) = new_ids.get(&e.id) {
                            existing.push(Some(c.clone()));
                        } else if let Some(p) = ids.get(e.id.as_bytes())? {
                            let position = read_u64(&p).unwrap_or(0);
                            let version = match events.get(u64_key(position))? {
                                Some(b) => serde_json::from_slice::<Envelope>(&b)
                                    .map(|env| env.version)
                                    .unwrap_or(0),
                                None => 0,
                            };
                            existing.push(Some(Committed {
                                id: e.id,
                                position,
                                version,
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
                    let mut seen_in_request = HashSet::new();
                    for e in &req.events {
                        if !seen_in_request.insert(e.id) {
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
                        new_ids.insert(e.id, c.clone());
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
