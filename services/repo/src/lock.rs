//! Object lock maintenance: [`Repository::extend_locks`] keeps what the repository still needs
//! locked (S3 object lock, compliance mode; `docs/FORMAT.md`, "Object lock").
//!
//! With `[repository] object_lock = "30d"` the S3 backend writes every object locked until its
//! upload time + 30 days (`backend/s3.rs`). Deduplication means a chunk written two years ago can
//! still be part of last night's backup, so the lock of an object must follow its use, not its
//! age: the daily maintenance job calls `extend_locks`, which moves the retain-until date of
//! every object the caller still needs to `now + period` when it would expire sooner.
//!
//! # What is kept locked
//! - `config` and every object under `keys/` (every key version: old versions open old data);
//! - the manifest of each kept backup ([`KeptBackups`]), and every chunk it references;
//! - the caller's extra objects ([`LockTargets::extra`]: WAL segments of the window, ledger
//!   segments), by key.
//!
//! Nothing else is touched: chunks no kept backup references, manifests of backups the caller
//! no longer keeps and `gc/` lists simply reach their date, after which garbage collection can
//! delete them (until then a prune counts them as locked and retries on a later run).
//!
//! Pass the kept backups explicitly once retention forgets backups. `forget_backup` of a backup
//! whose manifest is still locked fails with [`RepoError::Locked`], so the manifest stays present
//! until its date; with [`KeptBackups::All`] (every manifest present) it would be extended
//! again each day and never become deletable.
//!
//! # Invariants
//! - A lock is only ever extended, never shortened (compliance mode cannot be shortened, and an
//!   object already locked until `now + period` or later is counted as such and left alone).
//! - `now` comes from the caller; the new date is `now + period`, rounded up to the second.
//! - Idempotent: a run that stops half-way (the store unreachable, `kill -9`) leaves each object
//!   either extended or not; the next run does the rest.
//!
//! # Cost
//! One HeadObject per object (the current date) and one PutObjectRetention per object that
//! needs a later date, 16 objects at a time. Memory: the distinct chunk paths of the kept
//! backups (about 100 bytes each with the hash set's overhead, about 100 MB for a million
//! chunks), and one
//! manifest at a time per worker (4).

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;

use crate::backend::LockExtension;
use crate::config::CONFIG_KEY;
use crate::error::{RepoError, Result};
use crate::manifest::manifest_key;
use crate::repository::Repository;

/// Objects extended at a time.
const CONCURRENCY: usize = 16;
/// Manifests read at a time.
const MANIFEST_CONCURRENCY: usize = 4;

/// Which backups stay locked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeptBackups {
    /// Every backup with a manifest present. Only for repositories from which retention never
    /// forgets anything (see the module documentation).
    All,
    /// These backups (the retention decision's keep set). An id without a manifest is counted
    /// as missing.
    Only(BTreeSet<Uuid>),
}

/// What [`Repository::extend_locks`] keeps locked, besides `config` and `keys/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockTargets {
    pub backups: KeptBackups,
    /// Other objects still needed, by key (WAL segments, ledger segments). A key that does not
    /// exist is counted as missing.
    pub extra: Vec<String>,
}

impl LockTargets {
    /// Every backup present, and nothing else besides `config` and `keys/`.
    pub fn all_backups() -> LockTargets {
        LockTargets {
            backups: KeptBackups::All,
            extra: Vec::new(),
        }
    }

    /// These backups, and nothing else besides `config` and `keys/`.
    pub fn backups(ids: impl IntoIterator<Item = Uuid>) -> LockTargets {
        LockTargets {
            backups: KeptBackups::Only(ids.into_iter().collect()),
            extra: Vec::new(),
        }
    }

    /// Adds objects to keep locked by key.
    pub fn with_extra(mut self, keys: impl IntoIterator<Item = String>) -> LockTargets {
        self.extra.extend(keys);
        self
    }
}

/// What a run of [`Repository::extend_locks`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockReport {
    pub now: DateTime<Utc>,
    /// The date every object considered is now retained until, at least.
    pub retain_until: DateTime<Utc>,
    /// Manifests of kept backups read.
    pub manifests: u64,
    /// Distinct objects considered (config, keys, manifests, chunks, extra).
    pub objects: u64,
    /// Objects whose retain-until date was moved later (or set: written before object lock).
    pub extended: u64,
    /// Objects already retained until `retain_until` or later: left alone.
    pub already_locked: u64,
    /// Objects needed but absent (a kept backup without a manifest, a chunk a manifest
    /// references, an extra key): `backstop check` tells more.
    pub missing: u64,
    pub first_missing: Option<String>,
    /// Objects whose lock could not be read or extended (and manifests that could not be
    /// read, whose chunks are then not known): retried by the next run.
    pub failed: u64,
    pub first_failure: Option<String>,
}

impl LockReport {
    /// True when every object needed is locked until `retain_until` or later.
    pub fn is_complete(&self) -> bool {
        self.missing == 0 && self.failed == 0
    }

    fn missing(&mut self, what: String) {
        self.missing += 1;
        if self.first_missing.is_none() {
            self.first_missing = Some(what);
        }
    }

    fn failed(&mut self, what: String) {
        self.failed += 1;
        if self.first_failure.is_none() {
            self.first_failure = Some(what);
        }
    }
}

impl Repository {
    /// Extends the object lock of everything `targets` still needs to at least `now + period`
    /// (see the module documentation). Fails at once with
    /// [`RepoError::ObjectLockUnavailable`] when the repository was opened without object lock,
    /// and stops with the error when the store cannot be reached (the next run redoes the
    /// rest); other per-object failures are counted in the report.
    pub async fn extend_locks(
        &self,
        now: DateTime<Utc>,
        period: chrono::Duration,
        targets: &LockTargets,
    ) -> Result<LockReport> {
        if self.backend().object_lock().is_none() {
            return Err(RepoError::ObjectLockUnavailable {
                location: self.location(),
                detail: "the repository was opened without object lock".into(),
            });
        }
        if period <= chrono::Duration::zero() {
            return Err(RepoError::Config(format!(
                "the object-lock period must be positive, not {}s; give the configured \
                 `object_lock` (e.g. 30d)",
                period.num_seconds()
            )));
        }
        let retain_until = now.checked_add_signed(period).ok_or_else(|| {
            RepoError::Config(format!(
                "the object-lock period {}s is out of range",
                period.num_seconds()
            ))
        })?;
        let mut report = LockReport {
            now,
            retain_until,
            manifests: 0,
            objects: 0,
            extended: 0,
            already_locked: 0,
            missing: 0,
            first_missing: None,
            failed: 0,
            first_failure: None,
        };

        let present: BTreeSet<Uuid> = self.backup_ids().await?.into_iter().collect();
        let kept: Vec<Uuid> = match &targets.backups {
            KeptBackups::All => present.iter().copied().collect(),
            KeptBackups::Only(ids) => {
                for id in ids.difference(&present) {
                    report.missing(format!("the manifest of kept backup {id}"));
                }
                ids.intersection(&present).copied().collect()
            }
        };

        // Chunks before the manifests that reference them, as a backup writes them.
        // Object paths, not ids: a re-sealed chunk (`crate::reencrypt`) has a path of its own.
        let mut chunks: HashSet<String> = HashSet::new();
        let mut manifests = Vec::with_capacity(kept.len());
        let mut loaded = futures::stream::iter(kept)
            .map(|id| async move { (id, self.load_manifest(id).await) })
            .buffer_unordered(MANIFEST_CONCURRENCY);
        while let Some((id, m)) = loaded.next().await {
            match m {
                Ok(m) => {
                    report.manifests += 1;
                    chunks.extend(
                        m.streams
                            .iter()
                            .flat_map(|s| s.chunks.iter())
                            .map(|c| m.chunk_path(c)),
                    );
                    manifests.push(manifest_key(&id));
                }
                Err(e) if e.is_transient() => return Err(e),
                // Forgotten between the listing and the read.
                Err(RepoError::NotFound { .. }) => {
                    report.missing(format!("the manifest of kept backup {id}"));
                }
                Err(e) => {
                    // Its chunks are unknown this time; the manifest object itself is still
                    // kept locked so that it can be examined.
                    warn!(backup = %id, error = %e, "manifest unreadable; its chunks' locks are not extended");
                    report.failed(e.to_string());
                    manifests.push(manifest_key(&id));
                }
            }
        }
        drop(loaded);

        let mut fixed = vec![CONFIG_KEY.to_string()];
        fixed.extend(
            self.backend()
                .list("keys/")
                .await?
                .into_iter()
                .map(|o| o.key),
        );
        let extra: BTreeSet<&String> = targets.extra.iter().collect();
        let keys = chunks
            .into_iter()
            .chain(manifests)
            .chain(fixed)
            .chain(extra.into_iter().cloned());

        let backend = self.backend().clone();
        let mut results = futures::stream::iter(keys)
            .map(|key| {
                let backend = backend.clone();
                async move {
                    let r = backend.extend_lock(&key, retain_until).await;
                    (key, r)
                }
            })
            .buffer_unordered(CONCURRENCY);
        while let Some((key, r)) = results.next().await {
            report.objects += 1;
            match r {
                Ok(LockExtension::Extended { .. }) => report.extended += 1,
                Ok(LockExtension::AlreadyUntil(_)) => report.already_locked += 1,
                Err(RepoError::NotFound { .. }) => report.missing(key),
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => report.failed(e.to_string()),
            }
        }
        info!(
            objects = report.objects,
            extended = report.extended,
            already_locked = report.already_locked,
            missing = report.missing,
            failed = report.failed,
            retain_until = %report.retain_until,
            "object locks extended"
        );
        Ok(report)
    }
}
