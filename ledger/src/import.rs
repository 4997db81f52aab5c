//! Rebuilding a ledger from a copy of its events (`backstop ledger restore`): the envelopes and
//! signed checkpoints are written into a new, empty store exactly as the writer wrote them.
//!
//! Invariants the [`Importer`] checks before it writes anything of an envelope, so that what it
//! builds passes [`crate::verify::verify`] whenever its input was the ledger's own:
//! - positions follow on from the head with no gap, starting at 1;
//! - each envelope's `prev_hash` is the previous envelope's hash (zero for position 1);
//! - each envelope's hash is SHA3-256 of its canonical encoding (a changed byte is refused);
//! - stream versions are gapless per stream, and no event id appears twice;
//! - a checkpoint names a position already imported and that event's hash.
//!
//! The envelopes are stored in the same trees and encoding as the writer's (`store` module
//! docs), with `meta/head` moved in the same sled batch. [`Importer::finish`] also sets the
//! mirror cursor (everything imported came from the mirror, so it need not be uploaded again)
//! and the consumer floor (in-process workers start after the imported history instead of
//! handling it a second time), then flushes.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use backstop_events::{Digest, Envelope};

use crate::checkpoint::Checkpoint;
use crate::error::LedgerError;
use crate::store::{Head, KEY_HEAD, Store, stream_version_key, u64_key};

/// Writes a verified copy of a ledger into a new store (module docs).
pub struct Importer {
    store: Store,
    head: Head,
    versions: HashMap<String, u64>,
    ids: HashSet<uuid::Uuid>,
    hashes: HashMap<u64, Digest>,
}

impl Importer {
    /// Opens a new ledger at `path`, which must be absent or empty: an import never adds to an
    /// existing ledger.
    pub fn create(path: &Path) -> Result<Importer, LedgerError> {
        if let Ok(mut entries) = std::fs::read_dir(path)
            && entries.next().is_some()
        {
            return Err(LedgerError::NotALedger {
                path: path.to_path_buf(),
                why: "an import writes only into an empty directory, and this one is not empty"
                    .into(),
            });
        }
        let store = Store::open(path)?;
        Ok(Importer {
            store,
            head: Head::default(),
            versions: HashMap::new(),
            ids: HashSet::new(),
            hashes: HashMap::new(),
        })
    }

    /// The head so far (position 0 before the first envelope).
    pub fn head(&self) -> Head {
        self.head
    }

    /// Checks and writes `envelopes`, which must follow on from the head (module docs). Nothing
    /// of the batch is written when any envelope in it is refused.
    pub fn append(&mut self, envelopes: &[Envelope]) -> Result<(), LedgerError> {
        let corrupt = |position: u64, what: String| LedgerError::Corrupt { position, what };
        let mut head = self.head;
        let mut versions: HashMap<&str, u64> = HashMap::new();
        let mut ids = HashSet::new();
        for env in envelopes {
            let position = head.position + 1;
            if env.position != position {
                return Err(corrupt(
                    position,
                    format!(
                        "the copy jumps from position {} to {}: events are missing",
                        head.position, env.position
                    ),
                ));
            }
            if env.prev_hash != head.hash {
                return Err(corrupt(
                    position,
                    format!(
                        "previous-hash link broken: it names {} but the event before hashes to {}",
                        env.prev_hash, head.hash
                    ),
                ));
            }
            let computed = env.compute_hash();
            if computed != env.hash {
                return Err(corrupt(
                    position,
                    format!(
                        "content changed: its hash is recorded as {} but its content hashes to {computed}",
                        env.hash
                    ),
                ));
            }
            let last = versions
                .get(env.stream.as_str())
                .copied()
                .or_else(|| self.versions.get(&env.stream).copied())
                .unwrap_or(0);
            if env.version != last + 1 {
                return Err(corrupt(
                    position,
                    format!(
                        "stream `{}` jumps from version {last} to {}",
                        env.stream, env.version
                    ),
                ));
            }
            versions.insert(env.stream.as_str(), env.version);
            if self.ids.contains(&env.id) || !ids.insert(env.id) {
                return Err(corrupt(
                    position,
                    format!("event id {} appears twice", env.id),
                ));
            }
            head = Head {
                position,
                hash: env.hash,
            };
        }
        let mut events = sled::Batch::default();
        let mut id_index = sled::Batch::default();
        let mut stream_events = sled::Batch::default();
        for env in envelopes {
            let bytes = serde_json::to_vec(env).map_err(|e| LedgerError::Corrupt {
                position: env.position,
                what: format!("cannot encode the event: {e}"),
            })?;
            events.insert(&u64_key(env.position), bytes);
            id_index.insert(env.id.as_bytes(), &u64_key(env.position));
            stream_events.insert(
                stream_version_key(&env.stream, env.version),
                &u64_key(env.position),
            );
        }
        let mut streams = sled::Batch::default();
        for (stream, version) in &versions {
            streams.insert(stream.as_bytes(), &u64_key(*version));
        }
        // Not one transaction across trees (sled batches are per tree); the head moves last, so
        // an interrupted import is an incomplete store whose head names what it holds in full,
        // and the restore that runs it discards the whole directory on any error.
        self.store.events.apply_batch(events)?;
        self.store.ids.apply_batch(id_index)?;
        self.store.stream_events.apply_batch(stream_events)?;
        self.store.streams.apply_batch(streams)?;
        self.store.meta.insert(KEY_HEAD, &head.encode()[..])?;
        for env in envelopes {
            self.hashes.insert(env.position, env.hash);
            self.ids.insert(env.id);
        }
        for (stream, version) in versions {
            self.versions.insert(stream.to_string(), version);
        }
        self.head = head;
        Ok(())
    }

    /// Stores a signed checkpoint over an imported position. The signature is the caller's to
    /// check (it knows which key to expect); this checks that the checkpoint's hash is the
    /// imported event's.
    pub fn checkpoint(&mut self, cp: &Checkpoint) -> Result<(), LedgerError> {
        match self.hashes.get(&cp.position) {
            Some(h) if *h == cp.hash => {}
            Some(h) => {
                return Err(LedgerError::Corrupt {
                    position: cp.position,
                    what: format!(
                        "the signed checkpoint says the hash here is {} but the event hashes to {h}",
                        cp.hash
                    ),
                });
            }
            None => {
                return Err(LedgerError::Corrupt {
                    position: cp.position,
                    what: "a signed checkpoint covers this position but the event is not imported"
                        .into(),
                });
            }
        }
        let json = serde_json::to_vec(cp).map_err(|e| LedgerError::Corrupt {
            position: cp.position,
            what: format!("cannot encode the checkpoint: {e}"),
        })?;
        self.store.checkpoints.insert(u64_key(cp.position), json)?;
        Ok(())
    }

    /// Sets the mirror cursor and the consumer floor past the imported head, flushes, closes the
    /// store (waiting until sled releases it, so the caller may rename and open it at once), and
    /// returns the head.
    pub async fn finish(self) -> Result<Head, LedgerError> {
        let next = self.head.position + 1;
        self.store.set_mirror_cursor(next)?;
        self.store.set_consumer_floor(next)?;
        self.store.flush().await?;
        let head = self.head;
        self.store.close().await;
        Ok(head)
    }
}
