//! The streaming backup writer.
//!
//! `Repository::start_backup` returns a [`BackupWriter`]; `add_stream` reads one source stream
//! (a pg_dump file, a WAL segment, a tar of a directory), and may run for several streams at
//! once (clone the writer into tasks); `finish` writes the manifest.
//!
//! # Pipeline, per stream
//! ```text
//! read + chunk (async, on the stream's task)
//!   -> per chunk, a task: chunk id (blocking pool)
//!        -> dedup index: already stored? -> reference it
//!        -> new: brotli + AES-SIV + SHA3 (blocking pool) -> upload (bounded) -> read back, SHA3
//!   -> chunk references, in stream order
//! ```
//! - CPU work (hashing, compression, sealing) runs on tokio's blocking pool, at most one job
//!   per core at a time (a semaphore), never on the async runtime.
//! - Memory is bounded whatever the stream size: each stream has at most
//!   `chunks_in_flight` chunks between reading and upload, uploads are bounded by
//!   `upload_concurrency`, and the read buffer holds `2 * max_size` bytes. A stream's peak is
//!   the buffer plus, per chunk in flight, its plaintext, its sealed form and the read-back copy
//!   (at most `2 * max + chunks_in_flight * 3 * max`; about 20 MiB with the default sizes and
//!   1 MiB-average chunks).
//! - Deduplication: the index starts with every chunk listed under `chunks/`, described (sealed
//!   SHA3 and key) from the most recent manifests; chunks added by this backup join it as they
//!   are stored. Two streams meeting the same new chunk upload it once (the second waits for the
//!   first). A chunk present but described by no loaded manifest (left by a killed backup, or
//!   only in old manifests) is read back once and compared with the plaintext in hand; if it is
//!   damaged it is replaced by a fresh copy.
//!
//! # Consistency
//! Chunks are uploaded and read back before `add_stream` returns; the manifest is written last,
//! with put-if-absent, and read back. A backup killed at any point leaves no manifest (so no
//! backup), only chunks, which the next backup reuses.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};
use uuid::Uuid;

use backstop_events::BackupKind;

use crate::chunk::{ChunkId, Chunker, Hash32, chunk_id};
use crate::error::{RepoError, Result};
use crate::keys::{DataKey, KeyPurpose};
use crate::manifest::{
    ChunkRef, MANIFEST_FORMAT, MANIFEST_PREFIX, MANIFEST_VERSION, Manifest, StreamManifest, Totals,
    manifest_key,
};
use crate::repository::{Repository, join_err};
use crate::seal::{self, ObjectKind};

/// What a backup is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMeta {
    /// The caller's id (from the `backup.requested` event); names the manifest.
    pub backup_id: Uuid,
    pub kind: BackupKind,
    pub parent: Option<Uuid>,
    pub source: String,
    /// The data key purpose that seals the chunks.
    pub purpose: KeyPurpose,
    /// Who runs it, for key-access records (`worker:backup@host`, `operator:alice`).
    pub actor: String,
}

impl BackupMeta {
    /// A database backup run by `system`, with no parent.
    pub fn new(backup_id: Uuid, kind: BackupKind, source: impl Into<String>) -> Self {
        BackupMeta {
            backup_id,
            kind,
            parent: None,
            source: source.into(),
            purpose: KeyPurpose::Database,
            actor: "system".into(),
        }
    }
}

/// Tuning of the writer.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Uploads in flight across all streams.
    pub upload_concurrency: usize,
    /// Chunks between reading and upload, per stream.
    pub chunks_in_flight: usize,
    /// CPU jobs (hash, compress, seal) at once; defaults to the number of cores.
    pub cpu_jobs: usize,
    /// Read each uploaded object back and compare its SHA3-256 (on by default).
    pub verify_uploads: bool,
    /// How many of the most recent manifests describe existing chunks at start.
    pub recent_manifests: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            upload_concurrency: 8,
            chunks_in_flight: 4,
            cpu_jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            verify_uploads: true,
            recent_manifests: 8,
        }
    }
}

/// What one `add_stream` stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSummary {
    pub name: String,
    pub raw_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    /// Sealed bytes uploaded for this stream.
    pub new_bytes: u64,
}

/// Counters for a progress display, readable at any time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes read from the sources so far.
    pub raw_bytes: u64,
    /// Bytes of those that were already in the repository.
    pub dedup_bytes: u64,
    /// Sealed bytes uploaded.
    pub new_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
}

/// What `finish` returns: everything a `backup.completed` and `upload.verified` event needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupResult {
    pub backup_id: Uuid,
    pub manifest_key: String,
    pub manifest_sha3: Hash32,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub new_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    /// Objects read back after upload and found intact (new chunks and the manifest).
    pub objects_verified: u64,
    pub bytes_verified: u64,
    pub streams: Vec<StreamSummary>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// Key ids that sealed the backup's chunks and manifest.
    pub keys: Vec<String>,
}

/// A chunk known to be in the repository.
#[derive(Clone, Debug)]
pub(crate) struct Known {
    pub sealed_len: u64,
    /// `None` until described by a manifest or read back.
    pub sha3: Option<Hash32>,
    pub key_id: Option<Arc<str>>,
    /// A copy re-sealed by re-encryption (its job tag; the key id is `key_id`), at its own path.
    pub resealed: Option<u32>,
}

#[derive(Clone, Debug)]
struct Described {
    sealed_len: u64,
    sha3: Hash32,
    key_id: Arc<str>,
    resealed: Option<u32>,
}

enum Entry {
    Known(Known),
    /// Being uploaded or checked by another task; the value arrives on the channel.
    Pending(watch::Receiver<Option<Described>>),
}

struct Stats {
    raw: AtomicU64,
    dedup: AtomicU64,
    new_bytes: AtomicU64,
    chunks: AtomicU64,
    new_chunks: AtomicU64,
    verified_objects: AtomicU64,
    verified_bytes: AtomicU64,
}

struct StreamRecord {
    name: String,
    raw_bytes: u64,
    new_chunks: u64,
    new_bytes: u64,
    chunks: Vec<(ChunkId, u32, Described)>,
}

struct WriterInner {
    repo: Repository,
    meta: BackupMeta,
    opts: WriterOptions,
    started_at: DateTime<Utc>,
    started: Instant,
    chunk_key: Arc<DataKey>,
    manifest_key: Arc<DataKey>,
    index: Mutex<HashMap<ChunkId, Entry>>,
    upload_sem: Semaphore,
    cpu_sem: Semaphore,
    cpu_pool: crate::cpu::CpuPool,
    stats: Stats,
    streams: Mutex<Vec<StreamRecord>>,
    names: Mutex<HashSet<String>>,
    active: AtomicUsize,
    failure: Mutex<Option<String>>,
}

/// A backup in progress. Clone it to run `add_stream` from several tasks.
#[derive(Clone)]
pub struct BackupWriter {
    inner: Arc<WriterInner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Aborts a spawned task when dropped (a cancelled `add_stream` stops its chunk tasks).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = std::result::Result<T, tokio::task::JoinError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

/// Removes a pending index entry if its task ends without storing the chunk, so that waiters
/// retry instead of waiting forever.
struct PendingGuard {
    inner: Arc<WriterInner>,
    id: ChunkId,
    tx: Option<watch::Sender<Option<Described>>>,
}

impl PendingGuard {
    fn complete(mut self, d: Described) {
        lock(&self.inner.index).insert(
            self.id,
            Entry::Known(Known {
                sealed_len: d.sealed_len,
                sha3: Some(d.sha3),
                key_id: Some(d.key_id.clone()),
                resealed: d.resealed,
            }),
        );
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(d));
        }
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let mut index = lock(&self.inner.index);
            if let Some(Entry::Pending(rx)) = index.get(&self.id)
                && rx.same_channel(&tx.subscribe())
            {
                index.remove(&self.id);
            }
            drop(index);
            drop(tx);
        }
    }
}

enum Claim {
    Done(Described),
    Wait(watch::Receiver<Option<Described>>),
    Upload(PendingGuard),
    /// Present but undescribed: read it back and compare. With the re-sealed copy's key id and
    /// tag when the entry is one.
    Describe(PendingGuard, Option<(Arc<str>, u32)>),
}

impl Repository {
    /// Starts a backup with default options. Unwraps (and reports) the chunk key of
    /// `meta.purpose` and the database key (manifests), and loads the dedup index.
    pub async fn start_backup(&self, meta: BackupMeta) -> Result<BackupWriter> {
        self.start_backup_with(meta, WriterOptions::default()).await
    }

    pub async fn start_backup_with(
        &self,
        meta: BackupMeta,
        opts: WriterOptions,
    ) -> Result<BackupWriter> {
        let repo = self.with_access(meta.actor.clone(), format!("backup {}", meta.backup_id));
        if repo
            .backend()
            .head(&manifest_key(&meta.backup_id))
            .await?
            .is_some()
        {
            return Err(RepoError::Usage(format!(
                "backup {} already has a manifest; use a new backup id",
                meta.backup_id
            )));
        }
        let chunk_key = repo.key_for(meta.purpose).await?;
        let manifest_key = repo.key_for(KeyPurpose::Database).await?;
        let index = load_index(&repo, &meta, opts.recent_manifests, chunk_key.key_id()).await?;
        info!(
            backup = %meta.backup_id,
            known_chunks = index.len(),
            location = %repo.location(),
            "backup started"
        );
        let index = index
            .into_iter()
            .map(|(k, v)| (k, Entry::Known(v)))
            .collect();
        Ok(BackupWriter {
            inner: Arc::new(WriterInner {
                upload_sem: Semaphore::new(opts.upload_concurrency.max(1)),
                cpu_sem: Semaphore::new(opts.cpu_jobs.max(1)),
                cpu_pool: crate::cpu::CpuPool::new(opts.cpu_jobs.max(1)),
                repo,
                meta,
                opts,
                started_at: crate::now(),
                started: Instant::now(),
                chunk_key,
                manifest_key,
                index: Mutex::new(index),
                stats: Stats {
                    raw: AtomicU64::new(0),
                    dedup: AtomicU64::new(0),
                    new_bytes: AtomicU64::new(0),
                    chunks: AtomicU64::new(0),
                    new_chunks: AtomicU64::new(0),
                    verified_objects: AtomicU64::new(0),
                    verified_bytes: AtomicU64::new(0),
                },
                streams: Mutex::new(Vec::new()),
                names: Mutex::new(HashSet::new()),
                active: AtomicUsize::new(0),
                failure: Mutex::new(None),
            }),
        })
    }
}

/// Every chunk in the repository, described from the most recent manifests (and the parent).
///
/// Where re-encryption left a copy re-sealed with `key_id` (the key this backup seals with), the
/// index holds that copy instead of the original: the backup then references it, and the
/// original, sealed with an older key, can go.
async fn load_index(
    repo: &Repository,
    meta: &BackupMeta,
    recent: usize,
    key_id: &str,
) -> Result<HashMap<ChunkId, Known>> {
    let (chunks, manifests) = tokio::try_join!(
        repo.backend().list("chunks/"),
        repo.backend().list(MANIFEST_PREFIX)
    )?;
    let current: Arc<str> = Arc::from(key_id);
    let mut index: HashMap<ChunkId, Known> = HashMap::with_capacity(chunks.len());
    let mut resealed: Vec<(ChunkId, u64, u32)> = Vec::new();
    for o in chunks {
        if let Some(id) = Hash32::from_chunk_key(&o.key).filter(|id| id.chunk_key() == o.key) {
            index.entry(id).or_insert(Known {
                sealed_len: o.size,
                sha3: None,
                key_id: None,
                resealed: None,
            });
        } else if let Some((id, seal)) = Hash32::from_resealed_chunk_key(&o.key)
            && let Some((k, tag)) = seal.rsplit_once('.')
            && k == key_id
            && let Ok(tag) = u32::from_str_radix(tag, 16)
        {
            resealed.push((id, o.size, tag));
        }
    }
    for (id, size, tag) in resealed {
        index.insert(
            id,
            Known {
                sealed_len: size,
                sha3: None,
                key_id: Some(current.clone()),
                resealed: Some(tag),
            },
        );
    }
    // Manifest keys end with a UUIDv7, whose text sorts by time: the last ones are the newest.
    let mut ids: Vec<Uuid> = manifests
        .iter()
        .filter_map(|o| o.key.strip_prefix(MANIFEST_PREFIX)?.parse().ok())
        .collect();
    ids.sort();
    let mut chosen: Vec<Uuid> = ids.iter().rev().take(recent).copied().collect();
    if let Some(p) = meta.parent
        && !chosen.contains(&p)
        && ids.contains(&p)
    {
        chosen.push(p);
    }
    let loaded = futures::stream::iter(chosen)
        .map(|id| {
            let repo = repo.clone();
            async move { (id, repo.load_manifest(id).await) }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    for (id, m) in loaded {
        let m = match m {
            Ok(m) => m,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                warn!(backup = %id, error = %e, "a recent manifest is unreadable; its chunks will be checked when reused");
                continue;
            }
        };
        let keys: Vec<Arc<str>> = m.keys.iter().map(|k| Arc::from(k.as_str())).collect();
        for c in m.streams.iter().flat_map(|s| s.chunks.iter()) {
            // The reference must name the very object indexed: the same path (a re-sealed copy
            // can have the original's length).
            if let Some(k) = index.get_mut(&c.id)
                && k.sha3.is_none()
                && k.resealed == c.resealed
                && k.sealed_len == c.sealed_len as u64
                && let Some(key_id) = keys.get(c.key as usize)
                && k.key_id.as_ref().is_none_or(|have| have == key_id)
            {
                k.sha3 = Some(c.sealed_sha3);
                k.key_id = Some(key_id.clone());
            }
        }
    }
    Ok(index)
}

impl BackupWriter {
    pub fn backup_id(&self) -> Uuid {
        self.inner.meta.backup_id
    }

    pub fn meta(&self) -> &BackupMeta {
        &self.inner.meta
    }

    /// Counters so far, for a progress bar.
    pub fn progress(&self) -> Progress {
        let s = &self.inner.stats;
        Progress {
            raw_bytes: s.raw.load(Ordering::Relaxed),
            dedup_bytes: s.dedup.load(Ordering::Relaxed),
            new_bytes: s.new_bytes.load(Ordering::Relaxed),
            chunks: s.chunks.load(Ordering::Relaxed),
            new_chunks: s.new_chunks.load(Ordering::Relaxed),
        }
    }

    /// Reads `reader` to its end, chunking, deduplicating, sealing and uploading as it goes.
    /// Returns once every chunk of the stream is stored and verified. Stream names are unique
    /// within a backup.
    pub async fn add_stream<R>(&self, name: &str, reader: R) -> Result<StreamSummary>
    where
        R: AsyncRead + Send + Unpin,
    {
        if !lock(&self.inner.names).insert(name.to_string()) {
            return Err(RepoError::Usage(format!(
                "backup {}: stream {name:?} was already added",
                self.backup_id()
            )));
        }
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        let res = self.run_stream(name, reader).await;
        self.inner.active.fetch_sub(1, Ordering::SeqCst);
        if let Err(e) = &res {
            lock(&self.inner.failure).get_or_insert_with(|| format!("stream {name}: {e}"));
        }
        res
    }

    async fn run_stream<R>(&self, name: &str, reader: R) -> Result<StreamSummary>
    where
        R: AsyncRead + Send + Unpin,
    {
        let inner = &self.inner;
        let params = inner.repo.config().chunker.sizes;
        let mut chunker = Chunker::new(reader, &params);
        let mut in_flight = FuturesOrdered::new();
        let mut refs: Vec<(ChunkId, u32, Described)> = Vec::new();
        let mut new_chunks = 0u64;
        let mut new_bytes = 0u64;
        let limit = inner.opts.chunks_in_flight.max(1);
        let mut collect = |res: std::result::Result<Result<Processed>, tokio::task::JoinError>,
                           refs: &mut Vec<(ChunkId, u32, Described)>|
         -> Result<()> {
            let p = res.map_err(join_err)??;
            if p.new {
                new_chunks += 1;
                new_bytes += p.described.sealed_len;
            }
            refs.push((p.id, p.len, p.described));
            Ok(())
        };
        let mut failed: Option<RepoError> = None;
        loop {
            if in_flight.len() >= limit {
                if let Some(res) = in_flight.next().await
                    && let Err(e) = collect(res, &mut refs)
                {
                    failed = Some(e);
                    break;
                }
                continue;
            }
            let chunk = match chunker.next_chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    failed = Some(RepoError::io(
                        format!("backup {}: reading stream {name}", self.backup_id()),
                        e,
                    ));
                    break;
                }
            };
            inner
                .stats
                .raw
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let task = tokio::spawn(process_chunk(inner.clone(), chunk));
            in_flight.push_back(AbortOnDrop(task));
        }
        // Settle every chunk task, even after a failure, so that nothing of this stream is still
        // running (and writing) once `add_stream` returns.
        while let Some(res) = in_flight.next().await {
            if let Err(e) = collect(res, &mut refs)
                && failed.is_none()
            {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let raw_bytes = chunker.offset();
        let summary = StreamSummary {
            name: name.to_string(),
            raw_bytes,
            chunks: refs.len() as u64,
            new_chunks,
            new_bytes,
        };
        debug!(backup = %self.backup_id(), stream = name, raw_bytes, chunks = refs.len(), new_chunks, "stream stored");
        lock(&inner.streams).push(StreamRecord {
            name: name.to_string(),
            raw_bytes,
            new_chunks,
            new_bytes,
            chunks: refs,
        });
        Ok(summary)
    }

    /// Writes the manifest (with `extra`: tables, row counts, anything the source recorded),
    /// reads it back, and returns the figures. Fails if a stream failed or is still running.
    pub async fn finish(self, extra: serde_json::Value) -> Result<BackupResult> {
        let inner = &self.inner;
        let id = inner.meta.backup_id;
        if inner.active.load(Ordering::SeqCst) != 0 {
            return Err(RepoError::Usage(format!(
                "backup {id}: finish called while streams are still being added"
            )));
        }
        if let Some(f) = lock(&inner.failure).clone() {
            return Err(RepoError::Usage(format!(
                "backup {id} cannot be finished: {f}"
            )));
        }
        let records = std::mem::take(&mut *lock(&inner.streams));
        let mut key_ids: Vec<String> = Vec::new();
        let mut key_index: HashMap<Arc<str>, u16> = HashMap::new();
        let mut seen = HashSet::new();
        let mut stored_bytes = 0u64;
        let mut streams = Vec::with_capacity(records.len());
        let mut summaries = Vec::with_capacity(records.len());
        let mut chunk_total = 0u64;
        for rec in records {
            let mut chunks = Vec::with_capacity(rec.chunks.len());
            for (cid, len, d) in rec.chunks {
                let next = key_index.len();
                let k = *key_index.entry(d.key_id.clone()).or_insert_with(|| {
                    key_ids.push(d.key_id.to_string());
                    next as u16
                });
                if seen.insert(cid) {
                    stored_bytes += d.sealed_len;
                }
                chunks.push(ChunkRef {
                    id: cid,
                    len,
                    sealed_len: d.sealed_len as u32,
                    sealed_sha3: d.sha3,
                    key: k,
                    resealed: d.resealed,
                });
            }
            chunk_total += chunks.len() as u64;
            summaries.push(StreamSummary {
                name: rec.name.clone(),
                raw_bytes: rec.raw_bytes,
                chunks: chunks.len() as u64,
                new_chunks: rec.new_chunks,
                new_bytes: rec.new_bytes,
            });
            streams.push(StreamManifest {
                name: rec.name,
                raw_bytes: rec.raw_bytes,
                chunks,
            });
        }
        let stats = &inner.stats;
        let raw_bytes: u64 = streams.iter().map(|s| s.raw_bytes).sum();
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            format_version: MANIFEST_VERSION,
            repository_id: inner.repo.id(),
            backup_id: id,
            kind: inner.meta.kind,
            parent: inner.meta.parent,
            source: inner.meta.source.clone(),
            purpose: inner.meta.purpose,
            started_at: inner.started_at,
            finished_at: crate::now(),
            keys: key_ids,
            totals: Totals {
                raw_bytes,
                stored_bytes,
                new_bytes: stats.new_bytes.load(Ordering::Relaxed),
                chunks: chunk_total,
                new_chunks: stats.new_chunks.load(Ordering::Relaxed),
            },
            streams,
            extra,
            revisions: Vec::new(),
        };
        let chunk_keys = manifest.keys.clone();
        let path = manifest_key(&id);
        let repo_id = inner.repo.id();
        let mkey = inner.manifest_key.clone();
        let brotli = inner.repo.brotli();
        // The manifest's own size is part of what this backup adds; it is not known until it is
        // sealed, so `totals.new_bytes` counts chunks only and the result adds the manifest.
        let p = path.clone();
        let (sealed, sha) =
            tokio::task::spawn_blocking(move || manifest.seal(&repo_id, &p, &mkey, brotli))
                .await
                .map_err(join_err)??;
        let manifest_size = sealed.len() as u64;
        if !inner.repo.backend().put_if_absent(&path, sealed).await? {
            return Err(RepoError::Usage(format!(
                "backup {id} already has a manifest; it was not replaced"
            )));
        }
        inner
            .repo
            .verify_upload(&path, sha)
            .await
            .map_err(|e| e.in_backup(id))?;
        stats.verified_objects.fetch_add(1, Ordering::Relaxed);
        stats
            .verified_bytes
            .fetch_add(manifest_size, Ordering::Relaxed);

        let finished_at = crate::now();
        let mut keys = chunk_keys;
        let mk = inner.manifest_key.key_id().to_string();
        if !keys.contains(&mk) {
            keys.push(mk);
        }
        let result = BackupResult {
            backup_id: id,
            manifest_key: path,
            manifest_sha3: sha,
            raw_bytes,
            stored_bytes,
            new_bytes: stats.new_bytes.load(Ordering::Relaxed) + manifest_size,
            chunks: chunk_total,
            new_chunks: stats.new_chunks.load(Ordering::Relaxed),
            objects_verified: stats.verified_objects.load(Ordering::Relaxed),
            bytes_verified: stats.verified_bytes.load(Ordering::Relaxed),
            streams: summaries,
            started_at: inner.started_at,
            finished_at,
            duration_ms: inner.started.elapsed().as_millis() as u64,
            keys,
        };
        info!(
            backup = %id,
            raw = result.raw_bytes,
            stored = result.stored_bytes,
            new = result.new_bytes,
            chunks = result.chunks,
            new_chunks = result.new_chunks,
            ms = result.duration_ms,
            "backup completed"
        );
        Ok(result)
    }
}

struct Processed {
    id: ChunkId,
    len: u32,
    described: Described,
    new: bool,
}

async fn cpu<T: Send + 'static>(
    inner: &WriterInner,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let _permit = inner
        .cpu_sem
        .acquire()
        .await
        .map_err(|_| RepoError::Usage("writer closed".into()))?;
    inner
        .cpu_pool
        .run(f)
        .await
        .map_err(|_| RepoError::Usage("a CPU job of the backup writer failed (panicked)".into()))
}

fn claim(inner: &Arc<WriterInner>, id: ChunkId) -> Claim {
    let mut index = lock(&inner.index);
    let pending = |index: &mut HashMap<ChunkId, Entry>| {
        let (tx, rx) = watch::channel(None);
        index.insert(id, Entry::Pending(rx));
        PendingGuard {
            inner: inner.clone(),
            id,
            tx: Some(tx),
        }
    };
    match index.get(&id) {
        None => Claim::Upload(pending(&mut index)),
        Some(Entry::Known(Known {
            sealed_len,
            sha3: Some(sha3),
            key_id: Some(key_id),
            resealed,
        })) => Claim::Done(Described {
            sealed_len: *sealed_len,
            sha3: *sha3,
            key_id: key_id.clone(),
            resealed: *resealed,
        }),
        Some(Entry::Known(k)) => {
            let copy = k.key_id.clone().zip(k.resealed);
            Claim::Describe(pending(&mut index), copy)
        }
        Some(Entry::Pending(rx)) => Claim::Wait(rx.clone()),
    }
}

async fn process_chunk(inner: Arc<WriterInner>, plaintext: Bytes) -> Result<Processed> {
    let len = plaintext.len() as u32;
    let id = {
        let key = *inner.repo.inner.chunk_id_key;
        let pt = plaintext.clone();
        cpu(&inner, move || chunk_id(&key, &pt)).await?
    };
    inner.stats.chunks.fetch_add(1, Ordering::Relaxed);
    loop {
        match claim(&inner, id) {
            Claim::Done(d) => {
                inner.stats.dedup.fetch_add(len as u64, Ordering::Relaxed);
                return Ok(Processed {
                    id,
                    len,
                    described: d,
                    new: false,
                });
            }
            Claim::Wait(mut rx) => {
                let got = loop {
                    if let Some(d) = rx.borrow_and_update().clone() {
                        break Some(d);
                    }
                    if rx.changed().await.is_err() {
                        break rx.borrow().clone();
                    }
                };
                if let Some(d) = got {
                    inner.stats.dedup.fetch_add(len as u64, Ordering::Relaxed);
                    return Ok(Processed {
                        id,
                        len,
                        described: d,
                        new: false,
                    });
                }
                // The other task gave up (failed or cancelled): try again ourselves.
            }
            Claim::Upload(guard) => {
                let d = upload_chunk(&inner, id, plaintext).await?;
                guard.complete(d.clone());
                return Ok(Processed {
                    id,
                    len,
                    described: d,
                    new: true,
                });
            }
            Claim::Describe(guard, copy) => {
                let (d, new) = match describe_existing(&inner, id, copy, &plaintext).await? {
                    Some(d) => (d, false),
                    None => (upload_chunk(&inner, id, plaintext).await?, true),
                };
                guard.complete(d.clone());
                if !new {
                    inner.stats.dedup.fetch_add(len as u64, Ordering::Relaxed);
                }
                return Ok(Processed {
                    id,
                    len,
                    described: d,
                    new,
                });
            }
        }
    }
}

/// Seals, uploads and verifies a new chunk.
async fn upload_chunk(inner: &WriterInner, id: ChunkId, plaintext: Bytes) -> Result<Described> {
    let path = id.chunk_key();
    let repo_id = inner.repo.id();
    let key = inner.chunk_key.clone();
    let brotli = inner.repo.brotli();
    let p = path.clone();
    let (sealed, sha) = cpu(inner, move || {
        let sealed = seal::seal_object(
            &repo_id,
            &p,
            &key,
            ObjectKind::Chunk,
            Some(brotli),
            &plaintext,
        );
        let sha = Hash32(seal::sha3(&sealed));
        (Bytes::from(sealed), sha)
    })
    .await?;
    let sealed_len = sealed.len() as u64;
    let backup = inner.meta.backup_id;
    {
        let _permit = inner
            .upload_sem
            .acquire()
            .await
            .map_err(|_| RepoError::Usage("writer closed".into()))?;
        inner
            .repo
            .backend()
            .put(&path, sealed)
            .await
            .map_err(|e| e.in_backup(backup))?;
        if inner.opts.verify_uploads {
            let n = inner
                .repo
                .verify_upload(&path, sha)
                .await
                .map_err(|e| e.in_backup(backup))?;
            inner.stats.verified_objects.fetch_add(1, Ordering::Relaxed);
            inner.stats.verified_bytes.fetch_add(n, Ordering::Relaxed);
        }
    }
    inner.stats.new_chunks.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .new_bytes
        .fetch_add(sealed_len, Ordering::Relaxed);
    Ok(Described {
        sealed_len,
        sha3: sha,
        key_id: Arc::from(inner.chunk_key.key_id()),
        resealed: None,
    })
}

/// Reads back a chunk that exists but is not described by a loaded manifest, and checks it
/// against the plaintext in hand. `None` when it is damaged (the caller replaces it).
async fn describe_existing(
    inner: &WriterInner,
    id: ChunkId,
    copy: Option<(Arc<str>, u32)>,
    plaintext: &Bytes,
) -> Result<Option<Described>> {
    let path = match &copy {
        Some((key_id, tag)) => id.resealed_chunk_key(&crate::chunk::resealed_suffix(key_id, *tag)),
        None => id.chunk_key(),
    };
    let obj = match inner.repo.backend().get(&path).await {
        Ok(o) => o,
        Err(RepoError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let header = match seal::parse_header(&path, &obj) {
        Ok(h) => h,
        Err(e) => {
            warn!(object = %path, error = %e, "existing chunk is damaged; replacing it");
            return Ok(None);
        }
    };
    let key = match inner.repo.key_by_id(&header.key_id).await {
        Ok(k) => k,
        Err(e @ RepoError::Unreachable { .. }) => return Err(e),
        Err(e) => {
            warn!(object = %path, error = %e, "existing chunk's key is unavailable; replacing it");
            return Ok(None);
        }
    };
    let repo_id = inner.repo.id();
    let pt = plaintext.clone();
    let p = path.clone();
    let checked = cpu(inner, move || {
        let sha = Hash32(seal::sha3(&obj));
        let ok = matches!(
            seal::open_object(&repo_id, &p, &key, &obj, Some(pt.len())),
            Ok((_, back)) if back == pt[..]
        );
        (ok, sha, obj.len() as u64)
    })
    .await?;
    let (ok, sha, sealed_len) = checked;
    if !ok {
        warn!(object = %path, "existing chunk does not match its content; replacing it");
        return Ok(None);
    }
    Ok(Some(Described {
        sealed_len,
        sha3: sha,
        key_id: Arc::from(header.key_id.as_str()),
        resealed: copy.map(|(_, tag)| tag),
    }))
}
