//! The ledger: Backstop's append-only, hash-chained log of events, and the bus around it.
//!
//! ```text
//!  appenders ──► Ledger::append ──► writer task (group commit, sled) ──► flush ──► ack
//!                                        │ head watch
//!                    ┌───────────────────┼─────────────────────┐
//!                    ▼                   ▼                     ▼
//!           subscriptions (catch-up   outbox ──► NATS JetStream   checkpoints (ed25519)
//!           then live, in-process)    (cursor in sled)             
//! ```
//!
//! - [`Ledger`] is a cheap, cloneable handle: reads go straight to sled, appends go to the single
//!   writer ([`writer`]). Validation (type, schema, size) happens in the caller's task so the
//!   writer only orders and stores.
//! - [`Appender`] is what workers append through. [`Ledger`] implements it in-process and
//!   [`remote::RemoteLedger`] implements it over NATS request/reply, so the same handler code runs
//!   embedded and distributed. [`local::LocalLedger`] implements it over the serve's Unix control
//!   socket, so the CLI works beside a running serve; remote and local appends share one
//!   server-side path ([`requests`]).
//! - [`verify`] walks the chain and the checkpoints; [`outbox`] publishes every committed event
//!   to JetStream exactly once; [`consumer`] drives workers from either source; [`import`]
//!   rebuilds a ledger from a verified copy (the repository mirror, `backstop ledger restore`).

pub mod checkpoint;
pub mod consumer;
mod error;
pub mod identity;
pub mod import;
pub mod local;
pub mod lookup;
pub mod outbox;
pub mod remote;
pub mod requests;
pub mod store;
pub mod subscribe;
pub mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backstop_events::{Envelope, NewEvent};
use tokio::sync::{mpsc, oneshot, watch};

pub use checkpoint::{Checkpoint, CheckpointSigner};
pub use error::LedgerError;
pub use store::{Head, Store};
pub use writer::{Appended, Committed, ExpectedVersion, FlushFaults, MAX_BATCH};

/// Anything events can be appended through: the local ledger or a remote one.
#[async_trait]
pub trait Appender: Send + Sync {
    /// Appends `events` to `stream` atomically if the stream is at `expected`.
    ///
    /// Idempotent by event id: re-appending events that are already stored returns their
    /// positions with `duplicate: true` and writes nothing.
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, LedgerError>;
}

/// How to open a ledger.
#[derive(Clone, Debug)]
pub struct LedgerConfig {
    /// The sled directory.
    pub path: PathBuf,
    /// The checkpoint signing key file (kept outside `path`).
    pub signing_key: PathBuf,
    pub checkpoint_every: u64,
    pub checkpoint_interval: Duration,
}

impl LedgerConfig {
    /// The default layout under a data directory: `DIR/ledger` and `DIR/keys/ledger-signing.key`.
    pub fn in_data_dir(data_dir: &Path) -> LedgerConfig {
        LedgerConfig {
            path: data_dir.join("ledger"),
            signing_key: checkpoint::default_key_path(data_dir),
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
        }
    }
}

/// A handle on an open ledger. Clones share the same writer and store.
#[derive(Clone)]
pub struct Ledger {
    store: Store,
    tx: mpsc::Sender<writer::AppendRequest>,
    head: watch::Receiver<Head>,
    public_key: Arc<str>,
    /// Turns true when the writer has made its last flush and stopped.
    stopped: watch::Receiver<bool>,
    /// What the outbox reports as published (see `writer::MAX_UNPUBLISHED`).
    published: Arc<watch::Sender<Option<u64>>>,
    /// Set once the writer has met a storage error and refuses appends (see `writer`).
    failed: watch::Receiver<Option<String>>,
    /// The checkpoint key, shared with the writer; the outbox signs each published event.
    signer: Arc<CheckpointSigner>,
}

impl Ledger {
    /// Opens (or creates) the ledger and starts its writer task on the current runtime.
    ///
    /// The writer stops when every handle is dropped; call [`Ledger::close`] to wait for its
    /// last flush.
    pub fn open(config: &LedgerConfig) -> Result<Ledger, LedgerError> {
        Ledger::open_with_faults(config, FlushFaults::none())
    }

    /// [`Ledger::open`] with a fault-injection seam on the writer's flush, for tests of what
    /// happens when the disk fails.
    pub fn open_with_faults(
        config: &LedgerConfig,
        faults: FlushFaults,
    ) -> Result<Ledger, LedgerError> {
        let store = Store::open(&config.path)?;
        let signer = Arc::new(CheckpointSigner::load_or_create(&config.signing_key)?);
        let public_key: Arc<str> = signer.public_key_hex().into();
        let head = store.head()?;
        let (head_tx, head_rx) = watch::channel(head);
        let (tx, rx) = mpsc::channel(8192);
        let (published_tx, published_rx) = watch::channel(None);
        let (failed_tx, failed) = watch::channel(None);
        let w = writer::Writer::new(
            store.clone(),
            signer.clone(),
            writer::WriterConfig {
                checkpoint_every: config.checkpoint_every.max(1),
                checkpoint_interval: config.checkpoint_interval,
            },
            head_tx,
            published_rx,
            failed_tx,
            faults,
        );
        let (stopped_tx, stopped) = watch::channel(false);
        tokio::spawn(async move {
            w.run(rx).await;
            let _ = stopped_tx.send(true);
        });
        Ok(Ledger {
            store,
            tx,
            head: head_rx,
            public_key,
            stopped,
            published: Arc::new(published_tx),
            failed,
            signer,
        })
    }

    /// The ledger's signature (hex) over an event it publishes: its position and hash, signed
    /// with the checkpoint key (see [`outbox::event_statement`]). Consumers that pin the
    /// ledger's public key accept only events signed this way.
    pub fn sign_event(&self, position: u64, hash: &backstop_events::Digest) -> String {
        self.signer
            .sign_statement(&outbox::event_statement(position, hash))
    }

    /// The ledger's signature (hex) over a statement that is neither a checkpoint nor an
    /// event (`CheckpointSigner::sign_statement`; e.g. a mirrored segment's header), checked
    /// with [`checkpoint::verify_statement`] and the ledger's public key.
    pub fn sign_statement(&self, statement: &[u8]) -> String {
        self.signer.sign_statement(statement)
    }

    /// Why the writer refuses appends, once it has met a storage error (see `writer`).
    pub fn failure(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    /// Resolves with [`LedgerError::Failed`] when the writer meets a storage error, or with
    /// `Ok` at `shutdown` (or when the writer stops): `serve` runs it as a task so that a ledger
    /// that can no longer write stops the process instead of serving on.
    pub async fn failed(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), LedgerError> {
        let mut failed = self.failed.clone();
        tokio::select! {
            r = failed.wait_for(Option::is_some) => match r {
                Ok(reason) => Err(LedgerError::Failed {
                    reason: reason.clone().unwrap_or_default(),
                }),
                Err(_) => Ok(()),
            },
            _ = shutdown.wait_for(|s| *s) => Ok(()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The public key that verifies this ledger's checkpoints, hex.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The committed head (after the last flush).
    pub fn head(&self) -> Head {
        *self.head.borrow()
    }

    /// The outbox reports the last acknowledged position, or `None` when it is not publishing
    /// (stopped, or NATS unreachable); appends slow down only while it is publishing and behind.
    pub fn report_published(&self, position: Option<u64>) {
        self.published.send_replace(position);
    }

    /// A receiver that changes whenever a group commits.
    pub fn watch_head(&self) -> watch::Receiver<Head> {
        self.head.clone()
    }

    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<Envelope>, LedgerError> {
        self.store.range(from, limit)
    }

    pub fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
    ) -> Result<Vec<Envelope>, LedgerError> {
        self.store.stream(stream, from_version, usize::MAX)
    }

    /// Waits until the writer has flushed everything sent before this call.
    pub async fn sync(&self) {
        let target = self.store.head().map(|h| h.position).unwrap_or(0);
        let mut rx = self.head.clone();
        let mut failed = self.failed.clone();
        // After a storage error the head never reaches what sled holds in memory.
        tokio::select! {
            _ = rx.wait_for(|h| h.position >= target) => {}
            _ = failed.wait_for(Option::is_some) => {}
        }
    }

    /// Drops this handle and waits for the writer to finish its last flush, when this was the
    /// last handle. Other clones keep the writer alive.
    pub async fn close(self) {
        let mut stopped = self.stopped.clone();
        let path = self.store.path().to_path_buf();
        drop(self);
        let _ = stopped.wait_for(|s| *s).await;
        store::wait_for_release(&path).await;
    }

    async fn send(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, LedgerError> {
        if events.is_empty() || events.len() > MAX_BATCH {
            return Err(LedgerError::BadBatch {
                got: events.len(),
                max: MAX_BATCH,
            });
        }
        for e in &events {
            if e.stream != stream {
                return Err(LedgerError::Invalid(
                    backstop_events::EventError::BadStreamId(format!(
                        "event {} names stream {} but is appended to {stream}",
                        e.id, e.stream
                    )),
                ));
            }
            e.validate()?;
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(writer::AppendRequest {
                stream: stream.to_string(),
                expected,
                events,
                reply,
            })
            .await
            .map_err(|_| LedgerError::Closed)?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }
}

#[async_trait]
impl Appender for Ledger {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, LedgerError> {
        self.send(stream, expected, events).await
    }
}

/// Figures for `backstop ledger stats`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stats {
    pub head_position: u64,
    pub head_hash: String,
    pub streams: usize,
    pub checkpoints: usize,
    pub last_checkpoint: Option<u64>,
    /// The next position the NATS outbox will publish.
    pub publication_cursor: u64,
    /// Committed events not yet published.
    pub publication_lag: u64,
    /// The next position the repository mirror will upload (`backstop_ops::ledger_mirror`).
    pub mirror_cursor: u64,
    /// Committed events not yet mirrored into the repository.
    pub mirror_lag: u64,
    pub consumers: Vec<(String, u64)>,
    pub public_key: String,
}

impl Ledger {
    pub fn stats(&self) -> Result<Stats, LedgerError> {
        let head = self.store.head()?;
        let cursor = self.store.publication_cursor()?;
        let last_checkpoint = self
            .store
            .checkpoints
            .last()?
            .and_then(|(k, _)| store::read_u64(&k));
        Ok(Stats {
            head_position: head.position,
            head_hash: head.hash.to_hex(),
            streams: self.store.stream_count(),
            checkpoints: self.store.checkpoints.len(),
            last_checkpoint,
            publication_cursor: cursor,
            publication_lag: (head.position + 1).saturating_sub(cursor),
            mirror_cursor: self.store.mirror_cursor()?,
            mirror_lag: (head.position + 1).saturating_sub(self.store.mirror_cursor()?),
            consumers: self.store.consumer_cursors()?,
            public_key: self.public_key.to_string(),
        })
    }
}

#[cfg(test)]
mod tests;
