//! The on-disk layout of the ledger in sled, and every read.
//!
//! Trees (all integers big-endian, so sled's byte order is numeric order):
//!
//! | tree            | key                                 | value                                  |
//! |-----------------|-------------------------------------|----------------------------------------|
//! | `events`        | position u64                        | the envelope as JSON (`docs/FORMAT.md`) |
//! | `ids`           | event id, 16 bytes                  | position u64                           |
//! | `streams`       | stream id, UTF-8                    | head version u64                       |
//! | `stream_events` | stream id, 0x00, version u64        | position u64                           |
//! | `meta`          | `format`                            | `backstop-ledger/1`                    |
//! |                 | `head`                              | position u64 + hash 32 bytes           |
//! |                 | `publication`                       | next position to publish u64           |
//! |                 | `mirror`                            | next position to mirror u64            |
//! |                 | `consumer_floor`                    | first position for a new consumer u64  |
//! |                 | `consumer/NAME`                     | next position for that consumer u64    |
//! | `checkpoints`   | position u64                        | a signed checkpoint as JSON            |
//!
//! Invariants, kept by the single writer (see `writer`): positions are gapless from 1; each
//! envelope's `prev_hash` is the hash of the one before (zero for position 1); `meta/head`,
//! `ids`, `streams` and `stream_events` change in the same sled transaction as `events`.
//!
//! Durability: an append is acknowledged after `Db::flush_async`. On Linux sled's flush uses
//! `sync_file_range`, which does not flush the disk's write cache or file metadata the way
//! `fsync` does; a power loss can lose the most recent acknowledged appends. That is why every
//! event is also published to JetStream (file storage) and ledger segments are mirrored to the
//! repository: the ledger is never the only copy for long.
//!
//! Crash recovery: sled 0.34.7 writes a snapshot (a fuzzy index of where each page is in its
//! log) to `snap.<lsn>.generating`, fsyncs it and renames it to `snap.<lsn>`; the log is the
//! authority and a snapshot only shortens the replay. But its open reads the
//! lexicographically last `snap.*` file, `.generating` ones included, so a process killed
//! while writing a snapshot leaves a ledger sled then refuses as corrupt (sled issues 1527,
//! 1533). [`Store::open`] therefore removes unfinished snapshots first, only while it holds
//! sled's lock on `db` (a live process may be writing one), and sled replays the log from the
//! previous complete snapshot, or from the start when there is none.

use std::path::{Path, PathBuf};

use backstop_events::{Digest, Envelope};
use uuid::Uuid;

use crate::error::LedgerError;

pub const FORMAT: &[u8] = b"backstop-ledger/1";
pub(crate) const KEY_FORMAT: &[u8] = b"format";
pub(crate) const KEY_HEAD: &[u8] = b"head";
pub(crate) const KEY_PUBLICATION: &[u8] = b"publication";
pub(crate) const KEY_MIRROR: &[u8] = b"mirror";
pub(crate) const KEY_CONSUMER_FLOOR: &[u8] = b"consumer_floor";

/// The sled database and its trees.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: sled::Db,
    pub(crate) events: sled::Tree,
    pub(crate) ids: sled::Tree,
    pub(crate) streams: sled::Tree,
    pub(crate) stream_events: sled::Tree,
    pub(crate) meta: sled::Tree,
    pub(crate) checkpoints: sled::Tree,
    pub(crate) path: PathBuf,
}

/// The head of the chain: the last position and its hash (0 and zero for an empty ledger).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Head {
    pub position: u64,
    pub hash: Digest,
}

impl Head {
    pub(crate) fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[..8].copy_from_slice(&self.position.to_be_bytes());
        out[8..].copy_from_slice(&self.hash.0);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Head> {
        if bytes.len() != 40 {
            return None;
        }
        let position = u64::from_be_bytes(bytes[..8].try_into().ok()?);
        let hash = Digest(bytes[8..].try_into().ok()?);
        Some(Head { position, hash })
    }
}

pub(crate) fn u64_key(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub(crate) fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

pub(crate) fn stream_version_key(stream: &str, version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 9);
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

impl Store {
    /// Opens the ledger at `path`, creating it if the directory is empty or absent.
    ///
    /// Refuses a directory that holds something other than a ledger, so that a wrong path
    /// never turns into a fresh, empty ledger beside someone's files.
    pub fn open(path: &Path) -> Result<Store, LedgerError> {
        check_directory(path)?;
        discard_unfinished_snapshots(path)?;
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(64 * 1024 * 1024)
            .open()
            .map_err(|e| match &e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    LedgerError::Locked {
                        path: path.to_path_buf(),
                    }
                }
                sled::Error::Corruption { .. } => LedgerError::Damaged {
                    path: path.to_path_buf(),
                    why: format!("sled: {e}"),
                },
                _ => LedgerError::NotALedger {
                    path: path.to_path_buf(),
                    why: format!("sled could not open it: {e}"),
                },
            })?;
        let store = Store {
            events: db.open_tree("events")?,
            ids: db.open_tree("ids")?,
            streams: db.open_tree("streams")?,
            stream_events: db.open_tree("stream_events")?,
            meta: db.open_tree("meta")?,
            checkpoints: db.open_tree("checkpoints")?,
            db,
            path: path.to_path_buf(),
        };
        match store.meta.get(KEY_FORMAT)? {
            Some(f) if f.as_ref() == FORMAT => {}
            Some(f) => {
                return Err(LedgerError::NotALedger {
                    path: path.to_path_buf(),
                    why: format!(
                        "its format is {:?}, this build reads {:?}",
                        String::from_utf8_lossy(&f),
                        String::from_utf8_lossy(FORMAT)
                    ),
                });
            }
            None if store.events.is_empty() => {
                store.meta.insert(KEY_FORMAT, FORMAT)?;
                store.db.flush()?;
            }
            None => {
                return Err(LedgerError::NotALedger {
                    path: path.to_path_buf(),
                    why: "it holds events but no format marker".into(),
                });
            }
        }
        Ok(store)
    }

    /// Drops this handle and waits until sled has let go of the directory, so that the same
    /// process can open it again at once (see [`wait_for_release`]). Other clones of the store
    /// keep it open; close the last one.
    pub async fn close(self) {
        let path = self.path.clone();
        drop(self);
        wait_for_release(&path).await;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn head(&self) -> Result<Head, LedgerError> {
        match self.meta.get(KEY_HEAD)? {
            None => Ok(Head::default()),
            Some(b) => Head::decode(&b).ok_or_else(|| LedgerError::Corrupt {
                position: 0,
                what: "the head record is malformed".into(),
            }),
        }
    }

    /// The envelope at a position, if any.
    pub fn get(&self, position: u64) -> Result<Option<Envelope>, LedgerError> {
        match self.events.get(u64_key(position))? {
            None => Ok(None),
            Some(bytes) => decode_envelope(position, &bytes).map(Some),
        }
    }

    /// Up to `limit` envelopes from `from` (inclusive), in position order.
    pub fn range(&self, from: u64, limit: usize) -> Result<Vec<Envelope>, LedgerError> {
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in self.events.range(u64_key(from.max(1))..).take(limit) {
            let (k, v) = item?;
            let position = read_u64(&k).unwrap_or(0);
            out.push(decode_envelope(position, &v)?);
        }
        Ok(out)
    }

    /// The events of one stream from a version (inclusive), in version order.
    pub fn stream(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<Envelope>, LedgerError> {
        let start = stream_version_key(stream, from_version.max(1));
        let end = stream_version_key(stream, u64::MAX);
        let mut out = Vec::new();
        for item in self.stream_events.range(start..=end).take(limit) {
            let (_, v) = item?;
            let position = read_u64(&v).ok_or_else(|| LedgerError::Corrupt {
                position: 0,
                what: format!("stream index of `{stream}` holds a malformed position"),
            })?;
            match self.get(position)? {
                Some(e) => out.push(e),
                None => {
                    return Err(LedgerError::Corrupt {
                        position,
                        what: format!("stream `{stream}` points at a missing event"),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The current version of a stream (0 if it has no events).
    pub fn stream_version(&self, stream: &str) -> Result<u64, LedgerError> {
        Ok(self
            .streams
            .get(stream.as_bytes())?
            .and_then(|v| read_u64(&v))
            .unwrap_or(0))
    }

    pub fn position_of(&self, id: Uuid) -> Result<Option<u64>, LedgerError> {
        Ok(self.ids.get(id.as_bytes())?.and_then(|v| read_u64(&v)))
    }

    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    pub fn publication_cursor(&self) -> Result<u64, LedgerError> {
        Ok(self
            .meta
            .get(KEY_PUBLICATION)?
            .and_then(|v| read_u64(&v))
            .unwrap_or(1))
    }

    /// Sets the next position to publish. The outbox reconciles it with the stream on start, so
    /// resetting it never republishes what JetStream already holds.
    pub fn set_publication_cursor(&self, next: u64) -> Result<(), LedgerError> {
        self.meta.insert(KEY_PUBLICATION, &u64_key(next))?;
        Ok(())
    }

    /// The next position the repository mirror will upload (1 when nothing was mirrored).
    pub fn mirror_cursor(&self) -> Result<u64, LedgerError> {
        Ok(self
            .meta
            .get(KEY_MIRROR)?
            .and_then(|v| read_u64(&v))
            .unwrap_or(1))
    }

    /// Sets the next position to mirror, and flushes: the mirror calls it only after the
    /// segment up to `next - 1` is durable in the repository, so the cursor never runs ahead of
    /// the bucket.
    pub async fn set_mirror_cursor_durable(&self, next: u64) -> Result<(), LedgerError> {
        self.set_mirror_cursor(next)?;
        self.flush().await
    }

    pub(crate) fn set_mirror_cursor(&self, next: u64) -> Result<(), LedgerError> {
        self.meta.insert(KEY_MIRROR, &u64_key(next))?;
        Ok(())
    }

    /// Where a consumer with no cursor starts: 1, or after the history a restored ledger was
    /// rebuilt with (handled on the machine that was lost; see `import`).
    pub fn consumer_floor(&self) -> Result<u64, LedgerError> {
        Ok(self
            .meta
            .get(KEY_CONSUMER_FLOOR)?
            .and_then(|v| read_u64(&v))
            .unwrap_or(1))
    }

    pub(crate) fn set_consumer_floor(&self, next: u64) -> Result<(), LedgerError> {
        self.meta.insert(KEY_CONSUMER_FLOOR, &u64_key(next))?;
        Ok(())
    }

    /// The next position a named in-process consumer will handle.
    pub fn consumer_cursor(&self, name: &str) -> Result<u64, LedgerError> {
        match self
            .meta
            .get(format!("consumer/{name}"))?
            .and_then(|v| read_u64(&v))
        {
            Some(next) => Ok(next),
            None => self.consumer_floor(),
        }
    }

    pub(crate) fn set_consumer_cursor(&self, name: &str, next: u64) -> Result<(), LedgerError> {
        self.meta
            .insert(format!("consumer/{name}"), &u64_key(next))?;
        Ok(())
    }

    /// The first signed checkpoint at or after `position`, or `None` if none has been signed
    /// there yet. The audit export uses it to cover the events it exports.
    pub fn checkpoint_at_or_after(
        &self,
        position: u64,
    ) -> Result<Option<crate::Checkpoint>, LedgerError> {
        match self.checkpoints.range(u64_key(position)..).next() {
            None => Ok(None),
            Some(item) => decode_checkpoint(item?),
        }
    }

    /// The last signed checkpoint at or before `position`, if any. The audit export starts
    /// from it, so that the first exported event is one a signature covers.
    pub fn checkpoint_at_or_before(
        &self,
        position: u64,
    ) -> Result<Option<crate::Checkpoint>, LedgerError> {
        match self.checkpoints.range(..=u64_key(position)).next_back() {
            None => Ok(None),
            Some(item) => decode_checkpoint(item?),
        }
    }

    /// The latest signed checkpoint, if any.
    pub fn last_checkpoint(&self) -> Result<Option<crate::Checkpoint>, LedgerError> {
        match self.checkpoints.last()? {
            None => Ok(None),
            Some(item) => decode_checkpoint(item),
        }
    }

    /// Flushes everything written so far (cursors included) to disk.
    pub async fn flush(&self) -> Result<(), LedgerError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Every consumer cursor, by name.
    pub fn consumer_cursors(&self) -> Result<Vec<(String, u64)>, LedgerError> {
        let mut out = Vec::new();
        for item in self.meta.scan_prefix(b"consumer/") {
            let (k, v) = item?;
            let name = String::from_utf8_lossy(&k["consumer/".len()..]).into_owned();
            out.push((name, read_u64(&v).unwrap_or(0)));
        }
        Ok(out)
    }
}

pub(crate) fn decode_envelope(position: u64, bytes: &[u8]) -> Result<Envelope, LedgerError> {
    serde_json::from_slice(bytes).map_err(|e| LedgerError::Corrupt {
        position,
        what: format!("the stored event does not decode: {e}"),
    })
}

/// Removes the `snap.*.generating` files a process killed mid-snapshot left (module doc,
/// "Crash recovery"), if no process holds the ledger; a held ledger is left alone, and sled's
/// own open then reports it locked.
fn discard_unfinished_snapshots(path: &Path) -> Result<(), LedgerError> {
    let io = |source| LedgerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let db = match take_lock_if_free(path) {
        Ok(Some(db)) => db,
        Ok(None) => return Ok(()),
        // A new ledger, or not a ledger: sled's open decides.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    for entry in std::fs::read_dir(path).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(
                ledger = %path.display(),
                file = %name,
                "removing an unfinished sled snapshot left by a process killed while writing it; the log is replayed from the previous snapshot"
            );
            std::fs::remove_file(entry.path()).map_err(io)?;
        }
    }
    // The lock is released when `db` closes here, before sled takes its own.
    drop(db);
    Ok(())
}

/// sled's exclusive lock on `<path>/db`, taken if no handle holds it: `Ok(None)` when one
/// does, an error (`NotFound` when there is no `db`) when the file cannot be opened. The lock
/// is released when the file is dropped.
fn take_lock_if_free(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    let db = std::fs::File::open(path.join("db"))?;
    Ok(db.try_lock().is_ok().then_some(db))
}

fn check_directory(path: &Path) -> Result<(), LedgerError> {
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(LedgerError::NotALedger {
                path: path.to_path_buf(),
                why: "it is a file, not a directory".into(),
            });
        }
        Err(source) => {
            return Err(LedgerError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() || names.iter().any(|n| n == "db") {
        return Ok(());
    }
    Err(LedgerError::NotALedger {
        path: path.to_path_buf(),
        why: format!(
            "it is not empty and has no sled `db` file (found {})",
            names.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ),
    })
}

fn decode_checkpoint(
    (k, v): (sled::IVec, sled::IVec),
) -> Result<Option<crate::Checkpoint>, LedgerError> {
    let position = read_u64(&k).unwrap_or(0);
    serde_json::from_slice(&v)
        .map(Some)
        .map_err(|e| LedgerError::Corrupt {
            position,
            what: format!("the checkpoint stored here does not decode: {e}"),
        })
}

/// How long [`wait_for_release`] waits for sled to let go of its file lock.
const RELEASE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until sled's exclusive lock on `<path>/db` is free, for at most [`RELEASE_PATIENCE`].
///
/// sled's last handle can drop while its own flush threads still hold the database open; they
/// release the lock moments later. A caller that closes and at once reopens the ledger in the
/// same process (a test, a command that restarts its ledger, a restore that renames its staged
/// copy into place and opens it) would otherwise meet [`LedgerError::Locked`]. sled locks with
/// `flock`, which conflicts between two open files of one process too, so taking (and dropping)
/// the lock here proves it is free. The lock follows the inode, so a rename does not shed it.
pub(crate) async fn wait_for_release(path: &Path) {
    let deadline = tokio::time::Instant::now() + RELEASE_PATIENCE;
    loop {
        let free = match take_lock_if_free(path) {
            Ok(held) => held.is_some(),
            // Nothing to wait for: the file is gone or was never there.
            Err(_) => true,
        };
        if free || tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
