//! Garbage collection (`backstop prune`): two phases, no lock, bounded memory.
//!
//! # What is garbage
//! A chunk object (`chunks/<2 hex>/<64 hex>`) that no manifest present in the repository
//! references: left by a backup that was killed before its manifest, or referenced only by
//! backups whose manifests the retention use case deleted ([`Repository::forget_backup`]).
//! Besides chunks, the caller may name other objects it no longer needs (WAL segments outside the
//! window, old ledger segments): [`PruneOptions::extra_candidates`]. This module never decides
//! that a non-chunk object is garbage on its own, and never touches `config`, `keys/`,
//! `manifests/` or `gc/` through a candidate.
//!
//! # The two phases
//! Every [`Repository::prune`] run does both, on disjoint sets of objects:
//!
//! 1. **Mark.** List every chunk (one `chunks/<xx>/` prefix at a time), stream the references
//!    of every manifest into a set [`IdSet`] held on disk past a memory budget, and write the
//!    chunks that are neither referenced nor already listed into sealed *pending lists*
//!    (`gc/pending-<time>-<uuid>`, at most [`PruneOptions::list_entries`] entries each, format
//!    below) stamped with the run's `now`. The extra candidates that exist are listed the same
//!    way. Nothing is deleted in this phase.
//! 2. **Sweep.** For each pending list that was present when the run started and whose grace
//!    has elapsed (`marked_at + grace <= now`), in batches: list `manifests/` again and add the
//!    references of any manifest that appeared since the set was built, then delete each entry
//!    that is still garbage (a chunk no manifest references now; an extra key the caller still
//!    names in this run's candidates). An entry that became referenced (a backup reused the
//!    chunk by deduplication) is *spared*. A list is deleted once every entry is handled
//!    (deleted, already gone, or spared); entries whose delete failed or was refused because
//!    the object is locked ([`RepoError::Locked`]) stay: the list is rewritten with only them,
//!    keeping its `marked_at`, and a later run retries them.
//!
//! `now` is injected ([`PruneOptions::now`]): no decision reads a clock.
//!
//! # Re-encryption running during a prune
//! A re-encryption job (`crate::reencrypt`) writes re-sealed chunks at paths of their own
//! (`chunks/ab/<64 hex>.<key id>.<tag>`, judged by [`Hash32::resealed_ref_id`]) and then
//! rewrites manifests *in place*, which the refresh before each batch (new manifest ids only)
//! would not see. So while its state object `reencryption/state` exists, or if it existed when
//! the run started, the sweep is deferred ([`PruneReport::sweep_deferred_for_reencryption`]);
//! marking still runs. A job's paths carry its own tag, so nothing an earlier (abandoned) job
//! left, which a prune may have marked, is ever referenced by a later job.
//!
//! # Why nothing referenced is ever deleted
//! - A delete only ever targets an entry of a pending list that was durable (written with
//!   `put_blob`: fsynced or uploaded, then read back) in an earlier run, and only after the
//!   entry was checked against every manifest listed in this run, re-listed just before its
//!   batch. A list that does not authenticate is skipped (reported), never trusted.
//! - A manifest that cannot be read stops the whole run with its error: prune cannot know what
//!   an unreadable manifest references. (A manifest that vanished between the listing and the
//!   read was forgotten meanwhile; it no longer protects anything and is skipped.)
//! - Every step is idempotent: a run killed at any point (`kill -9`) leaves lists that were
//!   either fully written or not at all (puts are atomic), and objects that were either
//!   deleted (they were garbage) or not. The next run redoes the rest: deleting a missing
//!   object succeeds, re-marking skips what a list already holds.
//!
//! # Backups running during a prune
//! A backup writes its chunks first and its manifest last, and deduplicates against the chunks
//! it lists when it starts. Two cases matter for a chunk `X` marked at time `T`:
//! - A backup running at `T` (it uploaded `X`, or listed it and reuses it) finishes before
//!   `T + grace` when the grace is longer than any backup (default 24 h): by the time `X` is
//!   due, its manifest is present and spares `X`.
//! - A backup that started after `T` can still list `X` (it exists until it is swept) and
//!   reuse it; if it is still running when `X` is swept, its manifest is not there to spare
//!   `X`. Time alone cannot exclude that: the repository does not know about backups in
//!   progress. The caller does (the ledger has `backup.started` without a terminal event, and
//!   a lease): it passes them in [`PruneOptions::backups_in_progress`], and the sweep is
//!   deferred (reported in [`PruneReport::sweep_deferred_for`]) while any of them has no
//!   manifest yet. Marking still runs. Backups the caller cannot know about (a `backstop
//!   backup` started by hand on another machine) are covered by the grace only for the first
//!   case; run such backups and prune at different times, or record them in the ledger.
//!
//! # Memory
//! Bounded by the budget of the reference set (default 1 Mi ids, 32 MiB) plus one listing of
//! `chunks/<xx>/` (1/256 of the chunks), one pending list (at most `list_entries` entries,
//! 100,000 by default, about 12 MB decoded) and the manifests being read (4 at a time; a
//! manifest is decoded whole, as a restore does).
//!
//! The reference set ([`IdSet`]) partitions 32-byte ids by their first byte into 256 buckets.
//! Chunk ids are keyed SHA3 digests, so buckets are even. Ids are appended to in-memory buckets
//! until the budget is reached; then every bucket is sorted, deduplicated and appended to its
//! own file in a scratch directory (removed when the run ends). When all manifests are read,
//! each spilled bucket file is rewritten sorted and deduplicated. The mark walks the listing
//! prefix by prefix, which is also bucket by bucket, so each bucket is read once, and pending
//! list entries are sorted by key, so the sweep reads each bucket about once per list. This
//! was chosen over a k-way merge of sorted runs (the same I/O, but more code and every run file
//! open at once) and over an embedded database (a sled tree of 1 M keys costs far more time and
//! disk than 32 MB of sorted arrays). Measured with `examples/prune_bench.rs` (1 M chunks,
//! 1,000 manifests, 2 M references, half forgotten): the mark run takes 5.6 s and peaks at
//! 104 MB in memory, 6.7 s and 79 MB when forced to spill; figures in [`crate::gc_bench`].
//!
//! # Pending list format (`gc/pending-<YYYYmmddTHHMMSSZ>-<uuid>`)
//! A blob ([`Repository::put_blob`]: a sealed object of kind 3, brotli-compressed, sealed with
//! the current `database` key, its path bound into the AES-SIV associated data) whose plaintext
//! is this JSON document:
//!
//! ```json
//! {"format": "backstop-gc-pending", "format_version": 1,
//!  "repository_id": "<uuid>", "list_id": "<uuid>", "marked_at": "2026-05-01T02:00:00Z",
//!  "entries": [{"key": "chunks/ab/ab12...", "size": 250112}, {"key": "wal/...", "size": 1}]}
//! ```
//!
//! `entries` are sorted by key; `size` is the object's size when it was marked. The time in the
//! name is `marked_at`, for people listing the bucket; the document is authoritative.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;

use crate::backend::{ObjectMeta, validate_key};
use crate::chunk::Hash32;
use crate::config::CONFIG_KEY;
use crate::error::{RepoError, Result};
use crate::keys::KeyPurpose;
use crate::manifest::{MANIFEST_PREFIX, manifest_key};
use crate::repository::Repository;

pub const GC_PREFIX: &str = "gc/";
pub const PENDING_PREFIX: &str = "gc/pending-";
pub const PENDING_FORMAT: &str = "backstop-gc-pending";
pub const PENDING_VERSION: u32 = 1;

/// How a prune runs. There is no `Default`: `now` must come from the caller's clock.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// How long a marked object waits before it may be swept; longer than any backup.
    pub grace: chrono::Duration,
    /// The time of this run: stamped on new lists, compared with old ones.
    pub now: DateTime<Utc>,
    /// Objects besides chunks the caller no longer needs (WAL segments, ledger segments).
    /// Each is marked if it exists, and swept only if the run that sweeps it names it again.
    pub extra_candidates: Vec<String>,
    /// Backups the caller knows are running; the sweep waits while any has no manifest.
    pub backups_in_progress: Vec<Uuid>,
    /// Ids kept in memory before the reference set spills to disk.
    pub memory_ids: usize,
    /// Where spilled sets go (a fresh subdirectory, removed afterwards); the system temporary
    /// directory by default.
    pub scratch_dir: Option<PathBuf>,
    /// Entries per pending list object.
    pub list_entries: usize,
    /// Deletes per batch (the manifests are re-listed before each batch).
    pub delete_batch: usize,
}

impl PruneOptions {
    /// A real run at `now` with the default grace (24 h) and budgets.
    pub fn new(now: DateTime<Utc>) -> Self {
        PruneOptions {
            dry_run: false,
            grace: chrono::Duration::hours(24),
            now,
            extra_candidates: Vec::new(),
            backups_in_progress: Vec::new(),
            memory_ids: 1 << 20,
            scratch_dir: None,
            list_entries: 100_000,
            delete_batch: 1000,
        }
    }
}

/// What a prune did (or, in a dry run, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub now: Option<DateTime<Utc>>,
    pub grace_seconds: i64,
    /// Manifests whose references were read.
    pub manifests: u64,
    /// Objects considered: every chunk listed, and the extra candidates that exist.
    pub objects_listed: u64,
    pub bytes_listed: u64,
    /// Of those, referenced by a manifest.
    pub referenced: u64,
    pub referenced_bytes: u64,
    /// Unreferenced and already in a pending list.
    pub already_marked: u64,
    /// Unreferenced and written to a new pending list by this run.
    pub newly_marked: u64,
    pub newly_marked_bytes: u64,
    /// Pending lists present when the run started, and how many of them were due.
    pub lists_pending: u64,
    pub lists_due: u64,
    /// Pending lists that do not authenticate or decode (skipped, never trusted).
    pub lists_damaged: Vec<String>,
    pub lists_written: u64,
    pub lists_removed: u64,
    /// Entries of due lists that were deleted (or already gone).
    pub swept: u64,
    /// Bytes of those (as recorded when marked).
    pub bytes_reclaimed: u64,
    /// Entries of due lists found referenced again (or no longer named by the caller): kept.
    pub spared: u64,
    /// Deletes refused because the object is locked: kept in their list for a later run.
    pub locked: u64,
    /// Deletes that failed otherwise: kept in their list for a later run.
    pub failed: u64,
    pub first_failure: Option<String>,
    /// Entries of lists not swept by this run: not due yet, or the sweep was deferred.
    pub waiting: u64,
    /// Backups in progress (no manifest yet) that made this run skip the sweep.
    pub sweep_deferred_for: Vec<Uuid>,
    /// An unfinished re-encryption job (`reencryption/state`) made this run skip the sweep.
    #[serde(default)]
    pub sweep_deferred_for_reencryption: bool,
    /// Whether the reference set went to disk.
    pub spilled: bool,
    pub mark_ms: u64,
    pub sweep_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct PendingEntry {
    key: String,
    size: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct PendingList {
    format: String,
    format_version: u32,
    repository_id: Uuid,
    list_id: Uuid,
    marked_at: DateTime<Utc>,
    entries: Vec<PendingEntry>,
}

/// A scratch directory removed on drop (also when the run fails).
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(base: Option<&Path>) -> Result<Scratch> {
        let base = base
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("backstop-prune-{}", Uuid::new_v4()));
        fs::create_dir_all(&dir).map_err(|e| {
            RepoError::io(
                format!(
                    "cannot create the prune scratch directory {} (set another with the scratch directory option)",
                    dir.display()
                ),
                e,
            )
        })?;
        Ok(Scratch { dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            warn!(dir = %self.dir.display(), error = %e, "cannot remove the prune scratch directory");
        }
    }
}

type Id = [u8; 32];

/// A set of 32-byte ids in 256 buckets by first byte, spilled to per-bucket files past a budget.
/// Insert everything, [`finalize`](IdSet::finalize), then query bucket by bucket.
pub(crate) struct IdSet {
    buckets: Vec<Vec<Id>>,
    in_memory: usize,
    budget: usize,
    dir: PathBuf,
    name: &'static str,
    spilled: bool,
    finalized: bool,
}

impl IdSet {
    pub(crate) fn new(dir: &Path, name: &'static str, budget: usize) -> Self {
        IdSet {
            buckets: (0..256).map(|_| Vec::new()).collect(),
            in_memory: 0,
            budget: budget.max(256),
            dir: dir.to_path_buf(),
            name,
            spilled: false,
            finalized: false,
        }
    }

    fn file(&self, b: usize) -> PathBuf {
        self.dir.join(format!("{}-{b:02x}", self.name))
    }

    fn io_err(&self, e: io::Error) -> RepoError {
        RepoError::io(format!("prune scratch files in {}", self.dir.display()), e)
    }

    pub(crate) fn insert(&mut self, id: Id) -> Result<()> {
        debug_assert!(!self.finalized);
        self.buckets[id[0] as usize].push(id);
        self.in_memory += 1;
        if self.in_memory >= self.budget {
            self.spill()?;
        }
        Ok(())
    }

    /// Appends every bucket, sorted and deduplicated, to its file.
    fn spill(&mut self) -> Result<()> {
        for b in 0..256 {
            if self.buckets[b].is_empty() {
                continue;
            }
            let path = self.file(b);
            let v = &mut self.buckets[b];
            v.sort_unstable();
            v.dedup();
            let res = (|| {
                let f = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                let mut w = BufWriter::with_capacity(64 << 10, f);
                for id in v.iter() {
                    w.write_all(id)?;
                }
                w.flush()
            })();
            v.clear();
            res.map_err(|e| self.io_err(e))?;
        }
        self.in_memory = 0;
        self.spilled = true;
        Ok(())
    }

    fn read_file(&self, b: usize) -> Result<Vec<Id>> {
        let path = self.file(b);
        let f = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io_err(e)),
        };
        let len = f.metadata().map_err(|e| self.io_err(e))?.len() as usize;
        let mut out = Vec::with_capacity(len / 32);
        let mut r = BufReader::with_capacity(64 << 10, f);
        let mut id = [0u8; 32];
        loop {
            match r.read_exact(&mut id) {
                Ok(()) => out.push(id),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(self.io_err(e)),
            }
        }
        Ok(out)
    }

    /// Sorts and deduplicates every bucket (rewriting spilled ones). No insert after this.
    pub(crate) fn finalize(&mut self) -> Result<()> {
        if self.spilled {
            self.spill()?;
            // The in-memory buckets are empty now; give their capacity back.
            self.buckets = (0..256).map(|_| Vec::new()).collect();
            for b in 0..256 {
                let mut v = self.read_file(b)?;
                if v.is_empty() {
                    continue;
                }
                v.sort_unstable();
                v.dedup();
                let path = self.file(b);
                let tmp = self.dir.join(format!("{}-{b:02x}.sorted", self.name));
                let res = (|| {
                    let mut w = BufWriter::with_capacity(64 << 10, fs::File::create(&tmp)?);
                    for id in &v {
                        w.write_all(id)?;
                    }
                    w.flush()?;
                    drop(w);
                    fs::rename(&tmp, &path)
                })();
                res.map_err(|e| self.io_err(e))?;
            }
        } else {
            for v in &mut self.buckets {
                v.sort_unstable();
                v.dedup();
                v.shrink_to_fit();
            }
        }
        self.finalized = true;
        Ok(())
    }

    /// The sorted ids of bucket `b` (after `finalize`).
    pub(crate) fn bucket(&self, b: u8) -> Result<Cow<'_, [Id]>> {
        debug_assert!(self.finalized);
        if self.spilled {
            Ok(Cow::Owned(self.read_file(b as usize)?))
        } else {
            Ok(Cow::Borrowed(&self.buckets[b as usize]))
        }
    }

    pub(crate) fn spilled(&self) -> bool {
        self.spilled
    }
}

/// Membership queries in key order, keeping the last bucket read.
struct Lookup<'a> {
    set: &'a IdSet,
    current: Option<(u8, Cow<'a, [Id]>)>,
}

impl<'a> Lookup<'a> {
    fn new(set: &'a IdSet) -> Self {
        Lookup { set, current: None }
    }

    fn contains(&mut self, id: &Id) -> Result<bool> {
        let b = id[0];
        if self.current.as_ref().map(|(cb, _)| *cb) != Some(b) {
            self.current = Some((b, self.set.bucket(b)?));
        }
        let ids = &self.current.as_ref().map(|(_, v)| v).expect("set above");
        Ok(ids.binary_search(id).is_ok())
    }
}

/// References of manifests read after the main set was built (they appeared during the run).
#[derive(Default)]
struct LateRefs {
    seen: HashSet<Uuid>,
    ids: HashSet<Id>,
}

/// The id a chunk object is judged by: for a chunk key in its canonical form
/// (`chunks/ab/ab12...`, lowercase) its chunk id; for a re-sealed chunk
/// (`chunks/ab/ab12....<key id>.<tag>`, `crate::reencrypt`) [`Hash32::resealed_ref_id`]. These
/// are the only forms a manifest's reference names ([`crate::Manifest::chunk_ref_id`]).
fn canonical_chunk_id(key: &str) -> Option<Hash32> {
    if let Some(id) = Hash32::from_chunk_key(key).filter(|id| id.chunk_key() == key) {
        return Some(id);
    }
    let (id, seal) = Hash32::from_resealed_chunk_key(key)?;
    Some(id.resealed_ref_id(seal))
}

/// A candidate key the caller may name: anything but the repository's own bookkeeping.
fn check_candidate(key: &str) -> Result<()> {
    validate_key(key)?;
    let reserved = key == CONFIG_KEY
        || key.starts_with("keys/")
        || key.starts_with(MANIFEST_PREFIX)
        || key.starts_with(GC_PREFIX)
        || key.starts_with(crate::reencrypt::REENCRYPTION_PREFIX);
    if reserved {
        return Err(RepoError::Usage(format!(
            "prune cannot take {key:?} as a candidate: config, keys/, manifests/ and gc/ objects are the repository's own (forget a backup to drop its manifest)"
        )));
    }
    Ok(())
}

struct ListWriter<'a> {
    repo: &'a Repository,
    opts: &'a PruneOptions,
    entries: Vec<PendingEntry>,
    written: u64,
}

impl ListWriter<'_> {
    async fn push(&mut self, e: PendingEntry) -> Result<()> {
        self.entries.push(e);
        if self.entries.len() >= self.opts.list_entries.max(1) {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let mut entries = std::mem::take(&mut self.entries);
        entries.sort();
        self.written += 1;
        if self.opts.dry_run {
            return Ok(());
        }
        let list = PendingList {
            format: PENDING_FORMAT.into(),
            format_version: PENDING_VERSION,
            repository_id: self.repo.id(),
            list_id: Uuid::new_v4(),
            marked_at: self.opts.now,
            entries,
        };
        let key = format!(
            "{PENDING_PREFIX}{}-{}",
            list.marked_at.format("%Y%m%dT%H%M%SZ"),
            list.list_id
        );
        write_list(self.repo, &key, &list).await?;
        info!(list = %key, entries = list.entries.len(), "garbage marked");
        Ok(())
    }
}

async fn write_list(repo: &Repository, key: &str, list: &PendingList) -> Result<()> {
    let json = serde_json::to_vec(list)
        .map_err(|e| RepoError::format(key, format!("cannot encode a pending list: {e}")))?;
    repo.put_blob(key, KeyPurpose::Database, Bytes::from(json))
        .await?;
    Ok(())
}

async fn read_list(repo: &Repository, key: &str) -> Result<PendingList> {
    let plain = repo.get_blob(key, None).await?;
    let list: PendingList = serde_json::from_slice(&plain)
        .map_err(|e| RepoError::format(key, format!("pending list JSON does not decode: {e}")))?;
    if list.format != PENDING_FORMAT || list.format_version != PENDING_VERSION {
        return Err(RepoError::format(
            key,
            format!(
                "pending list format {} v{}; this build reads {PENDING_FORMAT} v{PENDING_VERSION}",
                list.format, list.format_version
            ),
        ));
    }
    if list.repository_id != repo.id() {
        return Err(RepoError::damaged(
            key,
            "the pending list names another repository",
        ));
    }
    Ok(list)
}

/// A pending list present at the start of the run.
struct ListInfo {
    key: String,
    due: bool,
    entries: u64,
}

impl Repository {
    /// Deletes the manifest of `backup_id` (the backup no longer exists; its chunks become
    /// garbage for the next prune). `false` when there was no such manifest. The caller records
    /// `backup.deleted`.
    pub async fn forget_backup(&self, backup_id: Uuid) -> Result<bool> {
        let key = manifest_key(&backup_id);
        if self.backend().head(&key).await?.is_none() {
            return Ok(false);
        }
        self.backend().delete(&key).await?;
        info!(backup = %backup_id, "backup forgotten (manifest deleted)");
        Ok(true)
    }

    /// Marks unreferenced objects and sweeps those marked at least `grace` ago (see the
    /// module documentation for the guarantees).
    pub async fn prune(&self, opts: &PruneOptions) -> Result<PruneReport> {
        if opts.grace < chrono::Duration::zero() {
            return Err(RepoError::Config(format!(
                "the prune grace period is negative ({}s); give a duration longer than any backup (24 h by default)",
                opts.grace.num_seconds()
            )));
        }
        let mut candidates = BTreeSet::new();
        for k in &opts.extra_candidates {
            check_candidate(k)?;
            // Chunks are judged by the manifests, whoever names them.
            if canonical_chunk_id(k).is_none() {
                candidates.insert(k.clone());
            }
        }
        let scratch = Scratch::new(opts.scratch_dir.as_deref())?;
        let mut report = PruneReport {
            dry_run: opts.dry_run,
            now: Some(opts.now),
            grace_seconds: opts.grace.num_seconds(),
            ..Default::default()
        };
        let mark_started = Instant::now();
        let reencryption_at_start = self.reencryption_state().await?.is_some();

        // Pending lists present now: the sweep's input, and what the mark must not list again.
        let mut pending = IdSet::new(&scratch.dir, "pending", opts.memory_ids);
        let mut pending_extra: BTreeSet<String> = BTreeSet::new();
        let mut lists = Vec::new();
        for o in self.backend().list(PENDING_PREFIX).await? {
            report.lists_pending += 1;
            let list = match read_list(self, &o.key).await {
                Ok(l) => l,
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    warn!(list = %o.key, error = %e, "damaged pending list skipped; its objects are marked again");
                    report.lists_damaged.push(o.key.clone());
                    continue;
                }
            };
            let due = list.marked_at + opts.grace <= opts.now;
            let entries = list.entries.len() as u64;
            if due {
                report.lists_due += 1;
            } else {
                report.waiting += entries;
            }
            for e in list.entries {
                match canonical_chunk_id(&e.key) {
                    Some(id) => pending.insert(id.0)?,
                    None => {
                        pending_extra.insert(e.key);
                    }
                }
            }
            lists.push(ListInfo {
                key: o.key,
                due,
                entries,
            });
        }
        pending.finalize()?;

        let mut late = LateRefs::default();
        let refs = self
            .collect_refs(&scratch.dir, opts, &mut late, &mut report)
            .await?;
        report.spilled = refs.spilled() || pending.spilled();

        self.mark(
            opts,
            &refs,
            &pending,
            &pending_extra,
            &candidates,
            &mut report,
        )
        .await?;
        drop(pending);
        report.mark_ms = mark_started.elapsed().as_millis() as u64;

        let sweep_started = Instant::now();
        // A re-encryption job rewrites manifests in place, which the late-reference refresh
        // (new manifest ids only) cannot see: no sweep while one is unfinished, nor when one
        // was unfinished as this run started (its rewrites may postdate the reference set).
        report.sweep_deferred_for_reencryption =
            reencryption_at_start || self.reencryption_state().await?.is_some();
        for id in &opts.backups_in_progress {
            if self.backend().head(&manifest_key(id)).await?.is_none() {
                report.sweep_deferred_for.push(*id);
            }
        }
        if report.sweep_deferred_for.is_empty() && !report.sweep_deferred_for_reencryption {
            for l in lists.iter().filter(|l| l.due) {
                self.sweep_list(opts, &l.key, &refs, &mut late, &candidates, &mut report)
                    .await?;
            }
        } else {
            report.waiting += lists
                .iter()
                .filter(|l| l.due)
                .map(|l| l.entries)
                .sum::<u64>();
            info!(
                backups = ?report.sweep_deferred_for,
                reencryption = report.sweep_deferred_for_reencryption,
                "sweep deferred: backups or a re-encryption in progress"
            );
        }
        report.sweep_ms = sweep_started.elapsed().as_millis() as u64;
        info!(
            dry_run = opts.dry_run,
            listed = report.objects_listed,
            referenced = report.referenced,
            newly_marked = report.newly_marked,
            swept = report.swept,
            spared = report.spared,
            locked = report.locked,
            failed = report.failed,
            reclaimed = report.bytes_reclaimed,
            "prune finished"
        );
        Ok(report)
    }

    /// Every chunk id referenced by a manifest present now, as a finalized set.
    async fn collect_refs(
        &self,
        dir: &Path,
        opts: &PruneOptions,
        late: &mut LateRefs,
        report: &mut PruneReport,
    ) -> Result<IdSet> {
        let mut refs = IdSet::new(dir, "refs", opts.memory_ids);
        let ids = self.backup_ids().await?;
        let mut loaded = futures::stream::iter(ids)
            .map(|id| {
                let repo = self.clone();
                async move { (id, repo.load_manifest(id).await) }
            })
            .buffer_unordered(4);
        while let Some((id, m)) = loaded.next().await {
            late.seen.insert(id);
            match m {
                Ok(m) => {
                    report.manifests += 1;
                    for c in m.streams.iter().flat_map(|s| s.chunks.iter()) {
                        refs.insert(m.chunk_ref_id(c).0)?;
                    }
                }
                // Forgotten since the listing: it protects nothing any more.
                Err(RepoError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        refs.finalize()?;
        Ok(refs)
    }

    /// Adds the references of manifests that appeared since `late.seen` was filled.
    async fn refresh_refs(&self, late: &mut LateRefs, report: &mut PruneReport) -> Result<()> {
        for id in self.backup_ids().await? {
            if late.seen.contains(&id) {
                continue;
            }
            match self.load_manifest(id).await {
                Ok(m) => {
                    report.manifests += 1;
                    late.ids.extend(
                        m.streams
                            .iter()
                            .flat_map(|s| s.chunks.iter())
                            .map(|c| m.chunk_ref_id(c).0),
                    );
                }
                Err(RepoError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            late.seen.insert(id);
        }
        Ok(())
    }

    async fn mark(
        &self,
        opts: &PruneOptions,
        refs: &IdSet,
        pending: &IdSet,
        pending_extra: &BTreeSet<String>,
        candidates: &BTreeSet<String>,
        report: &mut PruneReport,
    ) -> Result<()> {
        let mut writer = ListWriter {
            repo: self,
            opts,
            entries: Vec::new(),
            written: 0,
        };
        let prefixes: Vec<String> = (0..=255u8).map(|b| format!("chunks/{b:02x}/")).collect();
        let backend = self.backend().clone();
        let mut listings = futures::stream::iter(prefixes)
            .map(|p| {
                let backend = backend.clone();
                async move { backend.list(&p).await }
            })
            .buffered(4);
        while let Some(listing) = listings.next().await {
            let listing: Vec<ObjectMeta> = listing?;
            let Some(first) = listing.iter().find_map(|o| canonical_chunk_id(&o.key)) else {
                continue;
            };
            let b = first.0[0];
            let referenced = refs.bucket(b)?;
            let marked = pending.bucket(b)?;
            for o in listing {
                // Only well-formed chunk keys: anything else under chunks/ is not ours to judge.
                let Some(id) = canonical_chunk_id(&o.key) else {
                    continue;
                };
                report.objects_listed += 1;
                report.bytes_listed += o.size;
                if referenced.binary_search(&id.0).is_ok() {
                    report.referenced += 1;
                    report.referenced_bytes += o.size;
                } else if marked.binary_search(&id.0).is_ok() {
                    report.already_marked += 1;
                } else {
                    report.newly_marked += 1;
                    report.newly_marked_bytes += o.size;
                    writer
                        .push(PendingEntry {
                            key: o.key,
                            size: o.size,
                        })
                        .await?;
                }
            }
        }
        for key in candidates {
            let Some(size) = self.backend().head(key).await? else {
                continue;
            };
            report.objects_listed += 1;
            report.bytes_listed += size;
            if pending_extra.contains(key) {
                report.already_marked += 1;
            } else {
                report.newly_marked += 1;
                report.newly_marked_bytes += size;
                writer
                    .push(PendingEntry {
                        key: key.clone(),
                        size,
                    })
                    .await?;
            }
        }
        writer.flush().await?;
        report.lists_written = writer.written;
        Ok(())
    }

    async fn sweep_list(
        &self,
        opts: &PruneOptions,
        key: &str,
        refs: &IdSet,
        late: &mut LateRefs,
        candidates: &BTreeSet<String>,
        report: &mut PruneReport,
    ) -> Result<()> {
        let mut list = match read_list(self, key).await {
            Ok(l) => l,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                // It read at the start of the run; something replaced it since.
                warn!(list = key, error = %e, "pending list unreadable at sweep; skipped");
                report.lists_damaged.push(key.to_string());
                return Ok(());
            }
        };
        let entries = std::mem::take(&mut list.entries);
        let mut keep = Vec::new();
        let mut lookup = Lookup::new(refs);
        for batch in entries.chunks(opts.delete_batch.max(1)) {
            // Manifests written since the set was built protect their chunks too.
            self.refresh_refs(late, report).await?;
            let mut doomed: Vec<&PendingEntry> = Vec::with_capacity(batch.len());
            for e in batch {
                let still_garbage = match canonical_chunk_id(&e.key) {
                    Some(id) => !lookup.contains(&id.0)? && !late.ids.contains(&id.0),
                    None => candidates.contains(&e.key) && check_candidate(&e.key).is_ok(),
                };
                if still_garbage {
                    doomed.push(e);
                } else {
                    report.spared += 1;
                }
            }
            if opts.dry_run {
                report.swept += doomed.len() as u64;
                report.bytes_reclaimed += doomed.iter().map(|e| e.size).sum::<u64>();
                continue;
            }
            let keys: Vec<String> = doomed.iter().map(|e| e.key.clone()).collect();
            let results = self.backend().delete_many(&keys).await;
            for (e, r) in doomed.into_iter().zip(results) {
                match r {
                    Ok(()) => {
                        report.swept += 1;
                        report.bytes_reclaimed += e.size;
                    }
                    Err(RepoError::Locked { .. }) => {
                        report.locked += 1;
                        keep.push(e.clone());
                    }
                    Err(err) => {
                        report.failed += 1;
                        if report.first_failure.is_none() {
                            report.first_failure = Some(err.to_string());
                        }
                        keep.push(e.clone());
                    }
                }
            }
        }
        if opts.dry_run {
            report.lists_removed += 1;
            return Ok(());
        }
        if keep.is_empty() {
            self.backend().delete(key).await?;
            report.lists_removed += 1;
            info!(list = key, "pending list swept and removed");
        } else {
            // Same name, same marked_at: an atomic replace, so a crash leaves the old list
            // (whose deleted entries are simply gone) or the new one.
            list.entries = keep;
            write_list(self, key, &list).await?;
            info!(
                list = key,
                left = list.entries.len(),
                "pending list kept for entries not deleted yet"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u32) -> Id {
        let mut v = [0u8; 32];
        // Spread over buckets the way digests are.
        v[0] = (i.wrapping_mul(2_654_435_761) >> 24) as u8;
        v[28..].copy_from_slice(&i.to_be_bytes());
        v
    }

    fn members(set: &IdSet) -> Vec<Id> {
        (0..=255u8)
            .flat_map(|b| set.bucket(b).unwrap().into_owned())
            .collect()
    }

    #[test]
    fn spilled_and_in_memory_sets_agree() {
        let dir = tempfile::tempdir().unwrap();
        let mut small = IdSet::new(dir.path(), "small", 300);
        let mut big = IdSet::new(dir.path(), "big", 1 << 20);
        // Every id twice, far apart, so duplicates span spills.
        for round in 0..2 {
            for i in 0..5000u32 {
                let x = if round == 0 { i } else { 4999 - i };
                small.insert(id(x)).unwrap();
                big.insert(id(x)).unwrap();
            }
        }
        small.finalize().unwrap();
        big.finalize().unwrap();
        assert!(small.spilled());
        assert!(!big.spilled());
        let a = members(&small);
        assert_eq!(a.len(), 5000, "duplicates removed");
        assert_eq!(a, members(&big));
        assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted");
        let mut l = Lookup::new(&small);
        assert!(l.contains(&id(17)).unwrap());
        assert!(!l.contains(&id(5001)).unwrap());
    }

    #[test]
    fn reserved_keys_are_not_candidates() {
        for k in [
            "config",
            "keys/database/x",
            "manifests/x",
            "gc/pending-x",
            "../x",
        ] {
            assert!(check_candidate(k).is_err(), "{k} accepted");
        }
        check_candidate("wal/main/000000010000000000000001").unwrap();
    }
}
