//! Re-encryption: re-seal every backup of the repository with the newest data-key versions,
//! resumably, beside running backups, restores and prune; then retire the versions nothing is
//! sealed with any more.
//!
//! # What a job does
//! A job ([`Repository::begin_reencryption`], then [`Repository::run_reencryption`]) fixes its
//! *targets* when it starts: the current key of every purpose. For each manifest present
//! (oldest first, then again for manifests that appeared meanwhile, until a listing shows none
//! left), unless the manifest and all its chunks are already sealed with the targets:
//! 1. each chunk sealed with another key is read, checked (SHA3 of the sealed object, AES-SIV,
//!    plaintext against its keyed chunk id) and sealed again with the target key of the
//!    backup's purpose, to a path of its own, `chunks/ab/<64 hex>.<key id>.<tag>` (the `tag` is
//!    8 hex digits drawn once per job), then read back and its SHA3 checked. The original is
//!    not touched.
//! 2. The manifest is rewritten *in place* (`manifests/<backup id>`, an atomic put), sealed with
//!    the target `database` key: the same document with those chunks pointing at their
//!    re-sealed copies (`"resealed": <tag>`, their new `sealed_len`/`sealed_sha3`/`key`), `keys`
//!    recomputed, and a `revisions` entry naming the SHA3 of the form it replaced, so that a
//!    reader holding the SHA3 from `backup.completed` recognises its authenticated successor.
//! 3. The backup id is added to the job's state, `reencryption/state` (a blob sealed with the
//!    current `database` key), which is the checkpoint a resumed run starts from.
//!
//! The state object is written before anything else and deleted last: while it exists a job is
//! unfinished, and `begin_reencryption` resumes it (same job id, tag and targets) instead of
//! starting another.
//!
//! # Crash safety (`kill -9` at any point)
//! - Before step 2 completes, the manifest is the old one and every object it names is
//!   untouched: the backup restores as before. The re-sealed copies written so far are orphans
//!   until a resumed run references them (same tag, same path, same bytes: AES-SIV is
//!   deterministic, so writing them again is idempotent).
//! - After step 2, the new manifest names only copies that were written and read back before
//!   it. The originals stay until garbage collection (below), so a restore that loaded the old
//!   manifest before the switch still finds every object it names.
//! - Between steps 2 and 3, a resumed run finds the manifest already on the targets and only
//!   records it. So at every point every backup is restorable, and a resumed run loses nothing.
//!
//! # Beside backups, restores and prune
//! - **Backups** deduplicate against what they list when they start. A backup whose writer
//!   seals with a target key uses a re-sealed copy when one exists (`writer`'s index), and
//!   otherwise the original; a backup that finished during the job is picked up by its next
//!   listing, and one that finishes after the job ends leaves an old-key reference that the
//!   retirement scan sees (the old version is then not retired) and the next job re-seals.
//! - **Restores** read the manifest once and then the objects it names. Old versions are kept
//!   (they still unwrap), and originals are removed only by prune after its grace, so a restore
//!   running across a switch reads the old manifest's objects unchanged.
//! - **Prune** judges a re-sealed copy by its own id ([`Hash32::resealed_ref_id`]): an original
//!   no manifest references any more becomes garbage like any other chunk. Because manifests
//!   are rewritten in place, which prune's late-reference refresh (new manifest ids only) would
//!   not see, prune defers its sweep while `reencryption/state` exists or existed when the run
//!   started (`PruneReport::sweep_deferred_for_reencryption`). The job takes no lock; the
//!   state object is the lock-free signal prune honours. Each job's copies carry its own tag,
//!   so orphans an abandoned job left (which prune may have marked) are never referenced by a
//!   later job.
//! - **Retention** (`forget_backup`) deletes manifests. The job checks the manifest is still
//!   there just before rewriting it; a forget landing in the few milliseconds between that check
//!   and the put would bring the manifest back (the backup reappears in the repository, intact,
//!   and the next retention run forgets it again). Run retention and re-encryption from the
//!   same scheduler to avoid even that.
//!
//! # Object lock
//! With S3 object lock the bucket is versioned and an object version cannot be deleted or
//! overwritten before its retain-until date. Re-encryption never needs either: copies go to new
//! paths, and a manifest put creates a new version while the old-key version stays, locked, as a
//! noncurrent version until its date. Originals whose lock has not expired stay too (prune
//! counts them as locked and retries). Lock maintenance (`extend_locks`) follows what manifests
//! reference, so after the job nothing sealed with the old version is extended again: every
//! lock on it ends within one lock period of the job. Retirement therefore waits: a version is
//! retired only when no current object is sealed with it *and* a hold of one lock period has
//! passed since a scan first found it unused ([`RetireOptions::hold`]). Old-key ciphertext in
//! noncurrent versions stays until a bucket lifecycle rule (`NoncurrentVersionExpiration`)
//! removes it; the key object is never deleted by Backstop, so those versions stay readable.
//!
//! # Retirement
//! [`Repository::retire_keys`] scans what is sealed with what: the header of every manifest,
//! the key of every chunk reference, and the header of every other object (one ranged read of
//! 278 bytes each, skipping chunks a manifest already describes). A version that is not current
//! and seals nothing gets `unused_since`; once `now >= unused_since + hold` it gets
//! `retired_at`. A version found in use again loses `unused_since`. The scan covers WAL
//! segments, ledger segments and every other sealed blob too, which re-encryption does not
//! re-seal (they age out of their windows): their versions retire when the last such object is
//! gone. A retired version is never deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;

use crate::chunk::{Hash32, resealed_suffix};
use crate::config::CONFIG_KEY;
use crate::error::{RepoError, Result};
use crate::keys::{DataKey, KeyInfo, KeyPurpose};
use crate::manifest::{ChunkRef, MANIFEST_PREFIX, ManifestRevision, manifest_key};
use crate::reader::decode_chunk;
use crate::repository::{Repository, join_err};
use crate::seal::{self, ObjectKind};

/// Everything re-encryption keeps in the repository lives under this prefix.
pub const REENCRYPTION_PREFIX: &str = "reencryption/";
/// The state of the unfinished job, if any.
pub const REENCRYPTION_STATE: &str = "reencryption/state";
pub const STATE_FORMAT: &str = "backstop-reencryption";
pub const STATE_VERSION: u32 = 1;
/// Enough of an object to hold any envelope header (7 + 255 bytes of key id + the tag).
const HEADER_PROBE: u64 = 7 + 255 + 16;

/// The state of an unfinished job: its checkpoint (`reencryption/state`, a sealed blob).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReencryptionState {
    pub format: String,
    pub format_version: u32,
    pub repository_id: Uuid,
    pub job_id: Uuid,
    /// Names this job's re-sealed copies (`chunks/ab/<64 hex>.<key id>.<tag, 8 hex>`).
    pub tag: u32,
    pub started_at: DateTime<Utc>,
    /// The key id each purpose is re-sealed with (its current version when the job began).
    pub targets: BTreeMap<KeyPurpose, String>,
    /// Backups handled (re-sealed, already on the targets, or gone).
    pub done: BTreeSet<Uuid>,
    /// Manifests at the last listing.
    pub backups_total: u64,
    pub chunks_resealed: u64,
    pub bytes_resealed: u64,
    /// Backups that could not be re-sealed (damaged data): left as they are, reported.
    #[serde(default)]
    pub skipped: BTreeMap<Uuid, String>,
}

/// Where to stop as if killed, for tests of resumption (the job returns a
/// [`RepoError::Usage`] "simulated crash" there and leaves everything as a `kill -9` would).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the n-th (0-based, in this run) manifest's chunks were re-sealed, before its switch.
    BeforeSwitch(usize),
    /// After the n-th manifest was switched, before the checkpoint records it.
    AfterSwitch(usize),
}

#[derive(Clone, Debug)]
pub struct ReencryptOptions {
    /// The job's id when a new job starts (a resumed job keeps its own).
    pub job_id: Uuid,
    /// The time recorded in the state and the manifests' revisions.
    pub now: DateTime<Utc>,
    /// Chunks re-sealed at a time.
    pub concurrency: usize,
    #[doc(hidden)]
    pub crash_at: Option<CrashPoint>,
}

impl ReencryptOptions {
    pub fn new(job_id: Uuid, now: DateTime<Utc>) -> Self {
        ReencryptOptions {
            job_id,
            now,
            concurrency: 8,
            crash_at: None,
        }
    }
}

/// One backup handled, reported as it is checkpointed (the caller records
/// `reencryption.progressed`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReencryptStep {
    pub job_id: Uuid,
    pub backup_id: Uuid,
    /// Chunks of this backup re-sealed by this step (0: it was already on the targets, or the
    /// copies were made for an earlier backup sharing them).
    pub chunks_resealed: u64,
    pub bytes_resealed: u64,
    /// SHA3-256 of the manifest now stored, when it was rewritten.
    pub manifest_sha3: Option<Hash32>,
    pub backups_done: u64,
    pub backups_total: u64,
    /// Why the backup was left as it is, when it was.
    pub skipped: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReencryptReport {
    pub job_id: Uuid,
    pub targets: BTreeMap<KeyPurpose, String>,
    pub backups_total: u64,
    /// Manifests rewritten by this run.
    pub backups_reencrypted: u64,
    /// Manifests already on the targets.
    pub backups_current: u64,
    pub chunks_resealed: u64,
    pub bytes_resealed: u64,
    pub skipped: BTreeMap<Uuid, String>,
    /// Listings of `manifests/` (one, plus one per round of manifests that appeared meanwhile).
    pub passes: u32,
}

enum Outcome {
    Reencrypted {
        chunks: u64,
        bytes: u64,
        sha3: Hash32,
    },
    Current,
    Gone,
    Skipped(String),
}

/// A re-sealed copy: where and what.
#[derive(Clone, Copy)]
struct Copy {
    sealed_len: u32,
    sha3: Hash32,
}

impl Repository {
    /// The unfinished job's state, if a job is unfinished.
    pub async fn reencryption_state(&self) -> Result<Option<ReencryptionState>> {
        let bytes = match self.get_blob(REENCRYPTION_STATE, None).await {
            Ok(b) => b,
            Err(RepoError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let st: ReencryptionState = serde_json::from_slice(&bytes)
            .map_err(|e| RepoError::format(REENCRYPTION_STATE, format!("does not decode: {e}")))?;
        if st.format != STATE_FORMAT || st.format_version != STATE_VERSION {
            return Err(RepoError::format(
                REENCRYPTION_STATE,
                format!(
                    "{} v{}; this build reads {STATE_FORMAT} v{STATE_VERSION}",
                    st.format, st.format_version
                ),
            ));
        }
        if st.repository_id != self.id() {
            return Err(RepoError::damaged(
                REENCRYPTION_STATE,
                "the state names another repository",
            ));
        }
        Ok(Some(st))
    }

    async fn write_state(&self, st: &ReencryptionState) -> Result<()> {
        let json = serde_json::to_vec(st)
            .map_err(|e| RepoError::format(REENCRYPTION_STATE, e.to_string()))?;
        self.put_blob(REENCRYPTION_STATE, KeyPurpose::Database, Bytes::from(json))
            .await?;
        Ok(())
    }

    /// Starts a job (targets: the current key of every purpose), or returns the unfinished one.
    /// The flag is true when an unfinished job was found (its id, tag and targets stand).
    pub async fn begin_reencryption(
        &self,
        opts: &ReencryptOptions,
    ) -> Result<(ReencryptionState, bool)> {
        if let Some(st) = self.reencryption_state().await? {
            info!(job = %st.job_id, done = st.done.len(), "resuming the unfinished re-encryption");
            return Ok((st, true));
        }
        self.reload_keys().await?;
        let mut targets = BTreeMap::new();
        for purpose in KeyPurpose::ALL {
            if let Ok(k) = self.current_key(purpose) {
                targets.insert(purpose, k.key_id);
            }
        }
        if !targets.contains_key(&KeyPurpose::Database) {
            return Err(RepoError::NoKey {
                what: "for purpose database".into(),
                hint: "manifests are sealed with the database key; restore keys/ first".into(),
            });
        }
        let st = ReencryptionState {
            format: STATE_FORMAT.into(),
            format_version: STATE_VERSION,
            repository_id: self.id(),
            job_id: opts.job_id,
            tag: rand::rngs::OsRng.next_u32(),
            started_at: opts.now,
            targets,
            done: BTreeSet::new(),
            backups_total: self.backup_ids().await?.len() as u64,
            chunks_resealed: 0,
            bytes_resealed: 0,
            skipped: BTreeMap::new(),
        };
        self.write_state(&st).await?;
        info!(job = %st.job_id, targets = ?st.targets, "re-encryption started");
        Ok((st, false))
    }

    /// Runs (or resumes) the job of `state` to its end: every manifest present is on the
    /// targets, then the state is deleted. `on_step` is called after each backup's checkpoint.
    pub async fn run_reencryption(
        &self,
        mut state: ReencryptionState,
        opts: &ReencryptOptions,
        mut on_step: impl FnMut(&ReencryptStep),
    ) -> Result<ReencryptReport> {
        let mut keys: HashMap<KeyPurpose, Arc<DataKey>> = HashMap::new();
        for (p, id) in &state.targets {
            keys.insert(*p, self.key_by_id(id).await?);
        }
        let mut report = ReencryptReport {
            job_id: state.job_id,
            targets: state.targets.clone(),
            ..Default::default()
        };
        let mut copies: HashMap<String, Copy> = HashMap::new();
        let mut switched = 0usize;
        loop {
            let ids = self.backup_ids().await?;
            report.passes += 1;
            state.backups_total = ids.len() as u64;
            let todo: Vec<Uuid> = ids
                .into_iter()
                .filter(|id| !state.done.contains(id))
                .collect();
            if todo.is_empty() || report.passes > 100 {
                break;
            }
            for id in todo {
                let outcome = self
                    .reencrypt_one(id, &state, &keys, opts, &mut copies, switched)
                    .await?;
                let mut step = ReencryptStep {
                    job_id: state.job_id,
                    backup_id: id,
                    chunks_resealed: 0,
                    bytes_resealed: 0,
                    manifest_sha3: None,
                    backups_done: 0,
                    backups_total: state.backups_total,
                    skipped: None,
                };
                match outcome {
                    Outcome::Reencrypted {
                        chunks,
                        bytes,
                        sha3,
                    } => {
                        if opts.crash_at == Some(CrashPoint::AfterSwitch(switched)) {
                            return Err(RepoError::Usage(format!(
                                "simulated crash after switching the manifest of {id}"
                            )));
                        }
                        switched += 1;
                        report.backups_reencrypted += 1;
                        report.chunks_resealed += chunks;
                        report.bytes_resealed += bytes;
                        state.chunks_resealed += chunks;
                        state.bytes_resealed += bytes;
                        step.chunks_resealed = chunks;
                        step.bytes_resealed = bytes;
                        step.manifest_sha3 = Some(sha3);
                    }
                    Outcome::Current => report.backups_current += 1,
                    Outcome::Gone => {}
                    Outcome::Skipped(why) => {
                        warn!(backup = %id, reason = %why, "backup not re-encrypted");
                        state.skipped.insert(id, why.clone());
                        step.skipped = Some(why);
                    }
                }
                state.done.insert(id);
                self.write_state(&state).await?;
                step.backups_done = state.done.len() as u64;
                on_step(&step);
            }
        }
        report.backups_total = state.backups_total;
        report.skipped = state.skipped.clone();
        self.backend().delete(REENCRYPTION_STATE).await?;
        info!(
            job = %state.job_id,
            reencrypted = report.backups_reencrypted,
            chunks = report.chunks_resealed,
            bytes = report.bytes_resealed,
            "re-encryption finished"
        );
        Ok(report)
    }

    async fn reencrypt_one(
        &self,
        id: Uuid,
        state: &ReencryptionState,
        keys: &HashMap<KeyPurpose, Arc<DataKey>>,
        opts: &ReencryptOptions,
        copies: &mut HashMap<String, Copy>,
        switched: usize,
    ) -> Result<Outcome> {
        let path = manifest_key(&id);
        let raw = match self.backend().get(&path).await {
            Ok(b) => b,
            Err(RepoError::NotFound { .. }) => return Ok(Outcome::Gone),
            Err(e) => return Err(e),
        };
        let old_sha = Hash32(seal::sha3(&raw));
        let header = match seal::parse_header(&path, &raw) {
            Ok(h) => h,
            Err(e) => return Ok(Outcome::Skipped(e.to_string())),
        };
        let m = match self.decode_manifest(id, raw, None).await {
            Ok(m) => m,
            Err(RepoError::NotFound { .. }) => return Ok(Outcome::Gone),
            Err(e) if e.is_integrity() || matches!(e, RepoError::Format { .. }) => {
                return Ok(Outcome::Skipped(e.to_string()));
            }
            Err(e) => return Err(e),
        };
        let db_key = &keys[&KeyPurpose::Database];
        let Some(chunk_key) = keys.get(&m.purpose) else {
            return Ok(Outcome::Skipped(format!(
                "no target key for purpose {}",
                m.purpose
            )));
        };
        let target = chunk_key.key_id();
        let stale = |c: &ChunkRef| m.chunk_key_id(c) != Some(target);
        let all_chunks = || m.streams.iter().flat_map(|s| s.chunks.iter());
        if header.key_id == db_key.key_id() && !all_chunks().any(stale) {
            return Ok(Outcome::Current);
        }

        // 1. Re-seal every stale chunk to its own path (the originals are left alone).
        let seal_suffix = resealed_suffix(target, state.tag);
        let mut work: Vec<(ChunkRef, String, String)> = Vec::new();
        let mut seen = BTreeSet::new();
        for c in all_chunks().filter(|c| stale(c)) {
            let new_path = c.id.resealed_chunk_key(&seal_suffix);
            if copies.contains_key(&new_path) || !seen.insert(new_path.clone()) {
                continue;
            }
            let old_key = m.chunk_key_id(c).unwrap_or_default().to_string();
            work.push((*c, m.chunk_path(c), old_key));
        }
        let mut chunks = 0u64;
        let mut bytes = 0u64;
        let results: Vec<Result<(String, Copy)>> = futures::stream::iter(work)
            .map(|(c, old_path, old_key)| {
                let seal_suffix = &seal_suffix;
                async move {
                    let new_path = c.id.resealed_chunk_key(seal_suffix);
                    let copy = self
                        .reseal_chunk(&c, &old_path, &old_key, &new_path, chunk_key)
                        .await
                        .map_err(|e| e.in_backup(id))?;
                    Ok((new_path, copy))
                }
            })
            .buffer_unordered(opts.concurrency.max(1))
            .collect()
            .await;
        for r in results {
            match r {
                Ok((p, copy)) => {
                    chunks += 1;
                    bytes += copy.sealed_len as u64;
                    copies.insert(p, copy);
                }
                Err(e) if e.is_integrity() => return Ok(Outcome::Skipped(e.to_string())),
                Err(e) => return Err(e),
            }
        }
        if opts.crash_at == Some(CrashPoint::BeforeSwitch(switched)) {
            return Err(RepoError::Usage(format!(
                "simulated crash before switching the manifest of {id}"
            )));
        }

        // 2. The same manifest, naming the copies, sealed with the target database key.
        let mut next = m.clone();
        let mut key_ids: Vec<String> = Vec::new();
        let index = |k: &str, key_ids: &mut Vec<String>| -> u16 {
            match key_ids.iter().position(|x| x == k) {
                Some(i) => i as u16,
                None => {
                    key_ids.push(k.to_string());
                    (key_ids.len() - 1) as u16
                }
            }
        };
        for s in &mut next.streams {
            for c in &mut s.chunks {
                let old = m.chunk_key_id(c).unwrap_or_default().to_string();
                if old == target {
                    c.key = index(&old, &mut key_ids);
                    continue;
                }
                let new_path = c.id.resealed_chunk_key(&seal_suffix);
                let copy = copies.get(&new_path).copied().ok_or_else(|| {
                    RepoError::Usage(format!("re-sealed copy {new_path} missing from the job"))
                })?;
                c.sealed_len = copy.sealed_len;
                c.sealed_sha3 = copy.sha3;
                c.resealed = Some(state.tag);
                c.key = index(target, &mut key_ids);
            }
        }
        let mut replaced_keys = m.keys.clone();
        if !replaced_keys.contains(&header.key_id) {
            replaced_keys.push(header.key_id.clone());
        }
        next.keys = key_ids;
        next.revisions.push(ManifestRevision {
            replaced_sha3: old_sha,
            replaced_keys,
            reencrypted_at: opts.now,
        });
        let repo_id = self.id();
        let brotli = self.brotli();
        let mkey = db_key.clone();
        let p = path.clone();
        let (sealed, sha) =
            tokio::task::spawn_blocking(move || next.seal(&repo_id, &p, &mkey, brotli))
                .await
                .map_err(join_err)??;
        // Forgotten while its chunks were re-sealed: do not bring it back.
        if self.backend().head(&path).await?.is_none() {
            return Ok(Outcome::Gone);
        }
        self.backend().put(&path, sealed).await?;
        self.verify_upload(&path, sha)
            .await
            .map_err(|e| e.in_backup(id))?;
        Ok(Outcome::Reencrypted {
            chunks,
            bytes,
            sha3: sha,
        })
    }

    /// Reads chunk `c` at `old_path`, checks it, seals it with `key` at `new_path`, and reads
    /// the copy back.
    async fn reseal_chunk(
        &self,
        c: &ChunkRef,
        old_path: &str,
        old_key: &str,
        new_path: &str,
        key: &Arc<DataKey>,
    ) -> Result<Copy> {
        let obj = self.backend().get(old_path).await?;
        let old = self.key_by_id(old_key).await?;
        let repo_id = self.id();
        let cid_key = *self.inner.chunk_id_key;
        let brotli = self.brotli();
        let (cref, op, np, key) = (*c, old_path.to_string(), new_path.to_string(), key.clone());
        let (sealed, sha) = tokio::task::spawn_blocking(move || -> Result<(Bytes, Hash32)> {
            let plain = decode_chunk(&repo_id, &cid_key, &old, &cref, &op, &obj, true)?;
            let sealed =
                seal::seal_object(&repo_id, &np, &key, ObjectKind::Chunk, Some(brotli), &plain);
            let sha = Hash32(seal::sha3(&sealed));
            Ok((Bytes::from(sealed), sha))
        })
        .await
        .map_err(join_err)??;
        let sealed_len = sealed.len() as u32;
        self.backend().put(new_path, sealed).await?;
        self.verify_upload(new_path, sha).await?;
        Ok(Copy {
            sealed_len,
            sha3: sha,
        })
    }

    /// How many objects each key id seals: the header of every manifest, every chunk a manifest
    /// references (by its key), and the header of every other sealed object. `config` and
    /// `keys/` are not sealed objects.
    pub async fn key_usage(&self) -> Result<BTreeMap<String, u64>> {
        let mut usage: BTreeMap<String, u64> = BTreeMap::new();
        let mut described: BTreeSet<String> = BTreeSet::new();
        for id in self.backup_ids().await? {
            let path = manifest_key(&id);
            let raw = match self.backend().get(&path).await {
                Ok(b) => b,
                Err(RepoError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            if let Ok(h) = seal::parse_header(&path, &raw) {
                *usage.entry(h.key_id).or_default() += 1;
            }
            // A manifest that does not open is counted by its header only; `check` reports it.
            let Ok(m) = self.decode_manifest(id, raw, None).await else {
                continue;
            };
            for c in m.streams.iter().flat_map(|s| s.chunks.iter()) {
                let p = m.chunk_path(c);
                if described.insert(p) {
                    let k = m.chunk_key_id(c).unwrap_or("?").to_string();
                    *usage.entry(k).or_default() += 1;
                }
            }
        }
        let objects = self.backend().list("").await?;
        let backend = self.backend().clone();
        let probes: Vec<Option<String>> = futures::stream::iter(objects.into_iter().filter(|o| {
            o.key != CONFIG_KEY
                && !o.key.starts_with("keys/")
                && !o.key.starts_with(MANIFEST_PREFIX)
                && !described.contains(&o.key)
        }))
        .map(|o| {
            let backend = backend.clone();
            async move {
                match backend.get_range(&o.key, 0, HEADER_PROBE).await {
                    Ok(head) => Ok(seal::parse_header(&o.key, &head).ok().map(|h| h.key_id)),
                    Err(RepoError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<Result<Option<String>>>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
        for k in probes.into_iter().flatten() {
            *usage.entry(k).or_default() += 1;
        }
        Ok(usage)
    }

    /// Every key version with its retirement fields.
    pub fn key_states(&self) -> Vec<KeyState> {
        let mut v: Vec<KeyState> = self
            .stored_keys()
            .into_iter()
            .map(|sk| KeyState {
                info: sk.info(),
                unused_since: sk.unused_since,
                retired_at: sk.retired_at,
            })
            .collect();
        v.sort_by_key(|k| (k.info.purpose, k.info.version));
        v
    }

    /// Retires the key versions nothing is sealed with (see the module documentation). The
    /// current version of a purpose is never retired.
    pub async fn retire_keys(&self, opts: &RetireOptions) -> Result<RetireReport> {
        self.reload_keys().await?;
        let usage = self.key_usage().await?;
        let mut report = RetireReport::default();
        for stored in self.stored_keys() {
            let mut sk = stored.clone();
            let info = sk.info();
            let current = self.current_key(info.purpose)?;
            if current.key_id == info.key_id || sk.retired_at.is_some() {
                continue;
            }
            if let Some(&n) = usage.get(&info.key_id) {
                report.in_use.push((info, n));
                if sk.unused_since.is_some() {
                    sk.unused_since = None;
                    self.replace_stored_key(sk).await?;
                }
                continue;
            }
            let since = *sk.unused_since.get_or_insert(opts.now);
            if opts.now >= since + opts.hold {
                sk.retired_at = Some(opts.now);
                info!(key = %info.key_id, "key version retired: nothing is sealed with it");
                report.retired.push(info);
                self.replace_stored_key(sk).await?;
            } else {
                report.waiting.push((info.clone(), since + opts.hold));
                if stored.unused_since.is_none() {
                    self.replace_stored_key(sk).await?;
                }
            }
        }
        Ok(report)
    }
}

/// A key version and its retirement fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    pub info: KeyInfo,
    pub unused_since: Option<DateTime<Utc>>,
    pub retired_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug)]
pub struct RetireOptions {
    pub now: DateTime<Utc>,
    /// How long a version must have been found unused before it is retired: the object-lock
    /// period with object lock (every lock on what it sealed has ended by then), zero without.
    pub hold: chrono::Duration,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetireReport {
    /// Retired by this run.
    pub retired: Vec<KeyInfo>,
    /// Unused, retired once the hold has passed (at the given time).
    pub waiting: Vec<(KeyInfo, DateTime<Utc>)>,
    /// Still sealing this many objects.
    pub in_use: Vec<(KeyInfo, u64)>,
}
