//! WAL in every repository: `wal-push` writes each file to the primary and to every replica as
//! it is archived, and `wal-fetch` reads from a replica when the primary is unreachable.
//!
//! # The durability rule (push)
//! A WAL file is acknowledged to PostgreSQL (`wal-push` exits 0) when, and only when, it is
//! durable in the **primary**: written, read back and its SHA3-256 compared
//! ([`RepoWalStore::store_sealed`]). Each replica gets the same sealed bytes (sealed once, so
//! the replica holds the primary's object byte for byte), **concurrently** with the primary's
//! upload, so a healthy replica adds no round trip to the hot path; a replica's upload may take
//! at most [`ReplicatedWalStore`]'s `timeout`. A replica that fails or times out does not fail
//! the push: it falls behind, the failure is reported ([`ReplicatedWalStore::outcomes`]), and
//! `backstop replicate` (by hand, or the replicate worker after each backup) copies the WAL it
//! lacks (`crate::replicate::replicate_wal`); `check --replica` names what is missing.
//!
//! Why not the opposite rule (acknowledge only when every repository has the file, as
//! pgBackRest's multi-repository `archive-push` does): PostgreSQL keeps every unacknowledged
//! segment in `pg_wal` and retries it, so a secondary region that is down for hours would fill
//! the production server's disk and stop the database: an outage of the *backup* copy would
//! become an outage of production. The price of this rule is that the secondary's recovery
//! point can trail the primary's while a replica is down; that gap is bounded by the catch-up,
//! visible in `check --replica`, and a restore from the secondary says where its archive ends.
//!
//! # Unreachable copies are rested
//! An unreachable S3 endpoint costs its retries (seconds) on every call. [`Rests`] keeps one
//! small file per copy in the caller's spool (`pg_wal/backstop/unreachable/<name>`, holding the
//! Unix time it was found unreachable): while it is younger than the rest period, `wal-push`
//! skips that replica (left to the catch-up) and `wal-fetch` goes straight to a replica instead
//! of the primary (`primary` is the primary's name there). A success clears it.
//!
//! # Fetch ([`FallbackWalStore`])
//! Reads go to the primary. When a call fails because the primary is unreachable, decided by
//! the error's variant ([`is_unreachable`]: a transient storage error, never a damaged object
//! or a wrong key, which a fallback would hide), that call and every later one are served by
//! the first replica that opens, and [`FallbackWalStore::served_by`] names it for the caller
//! to say so.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use backstop_repo::RepoError;
use backstop_sources::pg::wal::{StoredWal, WalEntry, WalFile, WalStore, WalStoreError};
use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Serialize;
use tokio::sync::OnceCell;

use crate::replicate::{PRIMARY, Replica};
use crate::wal::{RepoWalStore, store_err, wal_object_key};

/// How long a replica's upload of one WAL file may take by default.
pub const DEFAULT_REPLICA_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a copy found unreachable is skipped by default.
pub const DEFAULT_REST: Duration = Duration::from_secs(60);

/// True when `e` means the store could not be reached (a transient storage error, by variant),
/// as opposed to an object that is damaged or a key that does not open it.
pub fn is_unreachable(e: &WalStoreError) -> bool {
    match e {
        WalStoreError::Unavailable {
            source: Some(s), ..
        } => s
            .downcast_ref::<RepoError>()
            .is_some_and(RepoError::is_transient),
        _ => false,
    }
}

/// What one replica got during a push.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplicaOutcome {
    pub replica: String,
    /// Files written to it, read back and checked.
    pub stored: u64,
    /// Files it did not get, with the reason (the catch-up copies them).
    pub failed: Vec<(String, String)>,
    /// True when a failure was the replica being unreachable or too slow (rest it).
    pub unreachable: bool,
}

/// A [`WalStore`] that writes every file to the primary and to each replica (see the module
/// docs for the rule); reads, listings and checks go to the primary.
pub struct ReplicatedWalStore {
    primary: RepoWalStore,
    replicas: Vec<Replica>,
    timeout: Duration,
    outcomes: Mutex<Vec<ReplicaOutcome>>,
}

impl ReplicatedWalStore {
    /// `replicas`: the copies to write to (leave out the rested ones); `timeout`: the longest one
    /// replica's upload of one file may take.
    pub fn new(primary: RepoWalStore, replicas: Vec<Replica>, timeout: Duration) -> Self {
        let outcomes = replicas
            .iter()
            .map(|r| ReplicaOutcome {
                replica: r.name.clone(),
                ..Default::default()
            })
            .collect();
        ReplicatedWalStore {
            primary,
            replicas,
            timeout,
            outcomes: Mutex::new(outcomes),
        }
    }

    /// What each replica got so far, in the order given.
    pub fn outcomes(&self) -> Vec<ReplicaOutcome> {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn note(&self, i: usize, name: &str, result: Result<(), (String, bool)>) {
        let mut all = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        let o = &mut all[i];
        match result {
            Ok(()) => o.stored += 1,
            Err((why, unreachable)) => {
                o.failed.push((name.to_string(), why));
                o.unreachable |= unreachable;
            }
        }
    }
}

#[async_trait]
impl WalStore for ReplicatedWalStore {
    fn object_key(&self, file: &WalFile) -> String {
        self.primary.object_key(file)
    }

    async fn put_segment(
        &self,
        file: &WalFile,
        data: Bytes,
        sha3: &str,
    ) -> Result<String, WalStoreError> {
        let blob = self.primary.seal_segment(file, &data, sha3).await?;
        let to_primary = self.primary.store_sealed(&blob);
        let to_replicas = futures::future::join_all(self.replicas.iter().map(|r| {
            let blob = &blob;
            async move {
                match tokio::time::timeout(
                    self.timeout,
                    backstop_repo::store_sealed(r.backend.as_ref(), blob),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err((e.to_string(), e.is_transient())),
                    Err(_) => Err((
                        format!("no answer within {} s", self.timeout.as_secs()),
                        true,
                    )),
                }
            }
        }));
        let (primary, replicas) = tokio::join!(to_primary, to_replicas);
        for (i, (r, result)) in self.replicas.iter().zip(replicas).enumerate() {
            if let Err((why, _)) = &result {
                tracing::warn!(replica = %r.name, file = %file.name, error = %why,
                    "WAL file not written to the replica; it falls behind until `backstop replicate` copies it");
            }
            self.note(i, &file.name, result);
        }
        primary?;
        Ok(blob.path)
    }

    async fn get_segment(&self, name: &str) -> Result<Option<StoredWal>, WalStoreError> {
        self.primary.get_segment(name).await
    }

    async fn head(&self, name: &str) -> Result<Option<String>, WalStoreError> {
        self.primary.head(name).await
    }

    async fn list(&self) -> Result<Vec<WalEntry>, WalStoreError> {
        self.primary.list().await
    }

    async fn has_later_segment(&self, file: &WalFile) -> Result<bool, WalStoreError> {
        self.primary.has_later_segment(file).await
    }
}

/// Opens one replica's WAL archive on demand (the caller knows the keys and the settings).
#[async_trait]
pub trait OpenCopy: Send + Sync {
    fn name(&self) -> &str;
    async fn open(&self) -> Result<RepoWalStore, WalStoreError>;
}

/// A [`WalStore`] that reads from the primary and, once the primary is found unreachable, from
/// the first replica that opens (see the module docs).
pub struct FallbackWalStore {
    source: String,
    primary: Option<RepoWalStore>,
    primary_down: AtomicBool,
    why: Mutex<Option<String>>,
    replicas: Vec<Box<dyn OpenCopy>>,
    opened: OnceCell<(String, RepoWalStore)>,
}

impl FallbackWalStore {
    /// `primary`: `None` when it could not be opened (unreachable) or is rested; `why` says so.
    pub fn new(
        source: impl Into<String>,
        primary: Option<RepoWalStore>,
        why: Option<String>,
        replicas: Vec<Box<dyn OpenCopy>>,
    ) -> Self {
        FallbackWalStore {
            source: source.into(),
            primary_down: AtomicBool::new(primary.is_none()),
            primary,
            why: Mutex::new(why),
            replicas,
            opened: OnceCell::new(),
        }
    }

    /// The replica that served reads, if one did.
    pub fn served_by(&self) -> Option<&str> {
        self.opened.get().map(|(n, _)| n.as_str())
    }

    /// Why the primary was left (its error), once it was.
    pub fn primary_failure(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True when the primary was found unreachable during this store's life.
    pub fn primary_unreachable(&self) -> bool {
        self.primary_down.load(Ordering::Relaxed)
    }

    async fn replica(&self) -> Result<&RepoWalStore, WalStoreError> {
        let (_, store) = self
            .opened
            .get_or_try_init(|| async {
                let mut errors = Vec::new();
                for r in &self.replicas {
                    match r.open().await {
                        Ok(s) => {
                            tracing::warn!(replica = %r.name(), "primary unreachable: WAL served by a replica");
                            return Ok((r.name().to_string(), s));
                        }
                        Err(e) => {
                            tracing::warn!(replica = %r.name(), error = %e, "replica cannot be opened either");
                            errors.push(format!("replica `{}`: {e}", r.name()));
                        }
                    }
                }
                Err(WalStoreError::unavailable(format!(
                    "the primary repository is unreachable ({}) and no replica could be opened{}",
                    self.primary_failure().unwrap_or_else(|| "no detail".into()),
                    if errors.is_empty() {
                        " (none is configured)".to_string()
                    } else {
                        format!(": {}", errors.join("; "))
                    }
                )))
            })
            .await?;
        Ok(store)
    }

    async fn route<'s, T: Send>(
        &'s self,
        op: impl Fn(&'s RepoWalStore) -> BoxFuture<'s, Result<T, WalStoreError>> + Send,
    ) -> Result<T, WalStoreError> {
        if !self.primary_down.load(Ordering::Relaxed)
            && let Some(p) = &self.primary
        {
            match op(p).await {
                Err(e) if is_unreachable(&e) && !self.replicas.is_empty() => {
                    tracing::warn!(error = %e, "the primary repository is unreachable; trying the replicas");
                    *self.why.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    self.primary_down.store(true, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        op(self.replica().await?).await
    }
}

#[async_trait]
impl WalStore for FallbackWalStore {
    fn object_key(&self, file: &WalFile) -> String {
        wal_object_key(&self.source, &file.name)
    }

    async fn put_segment(
        &self,
        file: &WalFile,
        _data: Bytes,
        _sha3: &str,
    ) -> Result<String, WalStoreError> {
        // Only fetches read through a fallback: writing to a replica alone would make it hold
        // WAL the primary lacks.
        Err(store_err(RepoError::Usage(format!(
            "{}: the fallback store only reads; wal-push writes to the primary and its replicas",
            file.name
        ))))
    }

    async fn get_segment(&self, name: &str) -> Result<Option<StoredWal>, WalStoreError> {
        self.route(|s| Box::pin(s.get_segment(name))).await
    }

    async fn head(&self, name: &str) -> Result<Option<String>, WalStoreError> {
        self.route(|s| Box::pin(s.head(name))).await
    }

    async fn list(&self) -> Result<Vec<WalEntry>, WalStoreError> {
        self.route(|s| Box::pin(s.list())).await
    }

    async fn has_later_segment(&self, file: &WalFile) -> Result<bool, WalStoreError> {
        self.route(|s| Box::pin(s.has_later_segment(file))).await
    }
}

/// The rest markers of unreachable copies (see the module docs), in `dir`. Every operation is
/// best effort: a marker that cannot be read or written only costs a retry of that copy.
#[derive(Debug, Clone)]
pub struct Rests {
    dir: PathBuf,
    rest: Duration,
}

impl Rests {
    /// Markers in `dir` (e.g. `pg_wal/backstop/unreachable`), each valid for `rest`.
    pub fn new(dir: impl Into<PathBuf>, rest: Duration) -> Rests {
        Rests {
            dir: dir.into(),
            rest,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        // Names are configuration names; keep them one path component.
        self.dir.join(name.replace(['/', '\\'], "_"))
    }

    fn secs(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }

    /// True when `name` was found unreachable less than the rest period before `now`.
    pub fn resting(&self, name: &str, now: SystemTime) -> bool {
        let Ok(text) = std::fs::read_to_string(self.path(name)) else {
            return false;
        };
        let Ok(since) = text.trim().parse::<u64>() else {
            return false;
        };
        let now = Self::secs(now);
        since <= now && now - since < self.rest.as_secs()
    }

    /// Records that `name` was found unreachable at `now`.
    pub fn mark(&self, name: &str, now: SystemTime) {
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let tmp = self.dir.join(format!(
                ".{}.{}",
                name.replace('/', "_"),
                std::process::id()
            ));
            std::fs::write(&tmp, format!("{}\n", Self::secs(now)))?;
            std::fs::rename(&tmp, self.path(name))
        };
        if let Err(e) = write() {
            tracing::debug!(copy = %name, error = %e, "could not write the unreachable marker");
        }
    }

    /// Forgets that `name` was unreachable.
    pub fn clear(&self, name: &str) {
        let _ = std::fs::remove_file(self.path(name));
    }

    /// Marks or clears each replica after a push, from what it got.
    pub fn after_push(&self, outcomes: &[ReplicaOutcome], now: SystemTime) {
        for o in outcomes {
            if o.unreachable {
                self.mark(&o.replica, now);
            } else if o.failed.is_empty() {
                self.clear(&o.replica);
            }
        }
    }

    /// The primary's marker name.
    pub fn primary() -> &'static str {
        PRIMARY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_by_variant() {
        let down = store_err(RepoError::Unreachable {
            what: "s3".into(),
            detail: "connection refused".into(),
            check: "c".into(),
        });
        assert!(is_unreachable(&down));
        let damaged = WalStoreError::Corrupt {
            object: "wal/x".into(),
            why: "bad".into(),
        };
        assert!(!is_unreachable(&damaged));
        // The same words without the variant are not a reason to fall back.
        assert!(!is_unreachable(&WalStoreError::unavailable(
            "unreachable: connection refused"
        )));
    }

    #[test]
    fn rests_expire() {
        let dir = tempfile::tempdir().unwrap();
        let rests = Rests::new(dir.path().join("unreachable"), Duration::from_secs(60));
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(!rests.resting("eu", t0));
        rests.mark("eu", t0);
        assert!(rests.resting("eu", t0 + Duration::from_secs(59)));
        assert!(!rests.resting("eu", t0 + Duration::from_secs(60)));
        assert!(!rests.resting("us", t0));
        rests.clear("eu");
        assert!(!rests.resting("eu", t0));
    }
}
