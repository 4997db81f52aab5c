//! Continuous WAL archiving in the repository: the archive's layout, its store for
//! `backstop-sources`' push and fetch, and the `wal.archived` events.
//!
//! # Repository layout
//! WAL files are sealed blobs (the `wal` data key) at `wal/<source>/<timeline>/<file>`, e.g.
//! `wal/main/00000001/000000010000000000000003`, each in the stored form of
//! [`backstop_sources::pg::wal::encode_stored`] (the SHA3-256 recorded at push time travels
//! with the bytes). One prefix per source: two clusters never share an archive.
//!
//! # Events
//! One `wal.archived` per file, on the stream `wal-<timeline>`. Its id is derived from the
//! file's object key and content alone ([`wal_event_id`]), so whoever records it (`wal-push`
//! itself, or a later catch-up with [`record_archived_wal`]) produces the same event and the
//! ledger keeps one. The id has UUIDv7's layout with its time field at the Unix epoch: nothing
//! about the content says when it was pushed, and an id that changed with the time of recording
//! would record the file twice. The envelope's `occurred_at` is the real time.
//!
//! Invariant: recording WAL events never blocks archiving: a segment is safe once it is in the
//! repository, and the catch-up records whatever `wal-push` could not.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backstop_events::{Actor, Event, NewEvent, WalArchived, streams};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerError};
use backstop_repo::{Backend, KeyPurpose, PurposeRepository, RepoError, Repository, SealedBlob};
use backstop_sources::pg::wal::{
    ArchivedWal, PushReport, StoredWal, WalEntry, WalFile, WalKind, WalStore, WalStoreError,
    decode_stored, encode_stored,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Prefix of every WAL object in the repository.
pub const WAL_PREFIX: &str = "wal/";

/// `wal/<source>/`: where one source's WAL files are.
pub fn wal_prefix(source: &str) -> String {
    format!("{WAL_PREFIX}{source}/")
}

/// `wal/<source>/<timeline>/<file>`: where a WAL file is stored. The timeline directory is the
/// first eight characters of the name (every WAL file name starts with its timeline).
pub fn wal_object_key(source: &str, name: &str) -> String {
    format!(
        "{}{}/{name}",
        wal_prefix(source),
        &name[..8.min(name.len())]
    )
}

/// Splits `wal/<source>/<timeline>/<file>` into the source and the file name, if the key has
/// that shape and the file name is a WAL file name.
pub fn parse_wal_object_key(key: &str) -> Option<(String, WalFile)> {
    let rest = key.strip_prefix(WAL_PREFIX)?;
    let mut parts = rest.split('/');
    let (source, tli, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || source.is_empty() {
        return None;
    }
    let file = WalFile::parse(name)?;
    if !name.starts_with(tli) || tli.len() != 8 {
        return None;
    }
    Some((source.to_string(), file))
}

pub(crate) fn store_err(e: RepoError) -> WalStoreError {
    if matches!(e, RepoError::Corrupt { .. } | RepoError::Damaged { .. }) {
        WalStoreError::Corrupt {
            object: e.object_key().unwrap_or("?").to_string(),
            why: e.to_string(),
        }
    } else {
        WalStoreError::unavailable_with(e.to_string(), e)
    }
}

/// What a [`RepoWalStore`] seals and opens with: the repository (master key), or a `wal`
/// key file's handle (a database host's `wal-push` / `wal-fetch`), which opens WAL only.
#[derive(Clone)]
enum Archive {
    Repository(Repository),
    KeyFile(PurposeRepository),
}

impl Archive {
    async fn seal_blob(&self, key: &str, data: Bytes) -> Result<SealedBlob, RepoError> {
        match self {
            Archive::Repository(r) => r.seal_blob(key, KeyPurpose::Wal, data).await,
            Archive::KeyFile(r) => r.seal_blob(key, KeyPurpose::Wal, data).await,
        }
    }

    async fn get_blob(&self, key: &str) -> Result<Bytes, RepoError> {
        match self {
            Archive::Repository(r) => r.get_blob(key, None).await,
            Archive::KeyFile(r) => r.get_blob(key, None).await,
        }
    }

    fn backend(&self) -> &Arc<dyn Backend> {
        match self {
            Archive::Repository(r) => r.backend(),
            Archive::KeyFile(r) => r.backend(),
        }
    }
}

/// One source's WAL archive in the repository (see the module docs for the layout).
#[derive(Clone)]
pub struct RepoWalStore {
    repo: Archive,
    source: String,
}

impl RepoWalStore {
    /// The archive of `source`. Key unwraps are reported with `repo`'s actor and reason (give it
    /// one with [`Repository::with_access`]).
    pub fn new(repo: Repository, source: impl Into<String>) -> RepoWalStore {
        RepoWalStore {
            repo: Archive::Repository(repo),
            source: source.into(),
        }
    }

    /// The archive of `source`, sealed and opened with a `wal` key file instead of the master
    /// key (give the handle its actor and reason with [`PurposeRepository::with_access`]).
    pub fn with_key_file(repo: PurposeRepository, source: impl Into<String>) -> RepoWalStore {
        RepoWalStore {
            repo: Archive::KeyFile(repo),
            source: source.into(),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Seals a WAL file in its stored form for its object key, without storing it: the same
    /// sealed bytes go to the repository ([`store_sealed`](Self::store_sealed)) and to every
    /// replica (`crate::wal_replicas`), sealed once.
    pub async fn seal_segment(
        &self,
        file: &WalFile,
        data: &[u8],
        sha3: &str,
    ) -> Result<SealedBlob, WalStoreError> {
        self.repo
            .seal_blob(&self.object_key(file), encode_stored(sha3, data))
            .await
            .map_err(store_err)
    }

    /// Writes a sealed WAL file to this store's repository, reads it back and checks its
    /// SHA3-256: the file is durably stored when this returns.
    pub async fn store_sealed(&self, blob: &SealedBlob) -> Result<(), WalStoreError> {
        backstop_repo::store_sealed(self.repo.backend().as_ref(), blob)
            .await
            .map(|_| ())
            .map_err(store_err)
    }

    /// The repository, when the store was opened with the master key.
    pub fn repository(&self) -> Option<&Repository> {
        match &self.repo {
            Archive::Repository(r) => Some(r),
            Archive::KeyFile(_) => None,
        }
    }
}

#[async_trait]
impl WalStore for RepoWalStore {
    fn object_key(&self, file: &WalFile) -> String {
        wal_object_key(&self.source, &file.name)
    }

    async fn put_segment(
        &self,
        file: &WalFile,
        data: Bytes,
        sha3: &str,
    ) -> Result<String, WalStoreError> {
        // store_sealed reads the object back and checks its SHA3-256 before returning: the file
        // is durably stored when this returns.
        let blob = self.seal_segment(file, &data, sha3).await?;
        self.store_sealed(&blob).await?;
        Ok(blob.path)
    }

    async fn get_segment(&self, name: &str) -> Result<Option<StoredWal>, WalStoreError> {
        match self
            .repo
            .get_blob(&wal_object_key(&self.source, name))
            .await
        {
            Ok(b) => Ok(Some(decode_stored(name, b)?)),
            Err(RepoError::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(e)),
        }
    }

    async fn list(&self) -> Result<Vec<WalEntry>, WalStoreError> {
        let objects = self
            .repo
            .backend()
            .list(&wal_prefix(&self.source))
            .await
            .map_err(store_err)?;
        Ok(objects
            .into_iter()
            .filter_map(|o| {
                let (source, file) = parse_wal_object_key(&o.key)?;
                (source == self.source).then_some(WalEntry {
                    name: file.name,
                    bytes: o.size,
                })
            })
            .collect())
    }

    async fn has_later_segment(&self, file: &WalFile) -> Result<bool, WalStoreError> {
        // Only this timeline's directory: a timeline's segment names sort in WAL order.
        let prefix = format!("{}{:08X}/", wal_prefix(&self.source), file.timeline);
        let objects = self.repo.backend().list(&prefix).await.map_err(store_err)?;
        Ok(objects.iter().any(|o| {
            parse_wal_object_key(&o.key).is_some_and(|(_, f)| {
                f.kind == WalKind::Segment && f.timeline == file.timeline && f.name > file.name
            })
        }))
    }
}

/// The id of the `wal.archived` event of the file stored at `object` with checksum `sha3`
/// (see the module docs: the same file always gets the same id).
pub fn wal_event_id(object: &str, archived: &ArchivedWal) -> Uuid {
    backstop_events::uuid_v7_derived(
        Uuid::nil(),
        DateTime::<Utc>::UNIX_EPOCH,
        &format!("{}@{object}", archived.event_key()),
    )
}

/// The `wal.archived` event of one archived file.
pub fn wal_archived_event(archived: &ArchivedWal, actor: &Actor) -> NewEvent {
    let event = Event::WalArchived(WalArchived {
        timeline: archived.timeline,
        segment: archived.name.clone(),
        sha3: archived.sha3.clone(),
        bytes: archived.bytes,
        object: archived.object.clone(),
    });
    NewEvent::new(streams::wal(archived.timeline), actor.clone(), &event)
        .with_id(wal_event_id(&archived.object, archived))
}

/// Appends the events a `wal-push` call owes ([`PushReport::to_announce`]). Returns how many
/// were new (the others were recorded already).
pub async fn announce_push(
    appender: &dyn Appender,
    report: &PushReport,
    actor: &Actor,
) -> Result<usize, LedgerError> {
    let mut new = 0;
    for a in report.to_announce() {
        let e = wal_archived_event(a, actor);
        let stream = e.stream.clone();
        let appended = appender
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await?;
        new += appended.events.iter().filter(|c| !c.duplicate).count();
    }
    Ok(new)
}

/// Object keys of the WAL files the local ledger already has a `wal.archived` event for, on the
/// given timelines.
pub fn recorded_wal_objects(
    ledger: &Ledger,
    timelines: impl IntoIterator<Item = u32>,
) -> Result<HashSet<String>, LedgerError> {
    let mut out = HashSet::new();
    for tli in timelines {
        for env in ledger.read_stream(&streams::wal(tli), 1)? {
            if let Ok(Event::WalArchived(w)) = env.event() {
                out.insert(w.object);
            }
        }
    }
    Ok(out)
}

/// What a catch-up did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CatchUpReport {
    /// WAL files in the repository.
    pub files: u64,
    /// Files skipped because the ledger already had their event.
    pub known: u64,
    /// Events appended now.
    pub recorded: u64,
    /// Files read whose event turned out to be there already.
    pub duplicates: u64,
    /// Files that could not be read or failed their checksum (not recorded; `wal verify` names
    /// them).
    pub unreadable: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error("cannot list the WAL archive: {0}")]
    Store(#[from] WalStoreError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Records a `wal.archived` event for every WAL file in the repository (all sources) that has
/// none yet. Files whose object key is in `known` are skipped without being read; the others are
/// read to learn their checksum (checked against the bytes), and their event appended with its
/// derived id, so one already recorded is a duplicate and nothing is recorded twice. Pass the
/// keys from [`recorded_wal_objects`] when the ledger is at hand; adds what it recorded to it.
pub async fn record_archived_wal(
    repo: &Repository,
    appender: &dyn Appender,
    known: &mut HashSet<String>,
    actor: &Actor,
) -> Result<CatchUpReport, CatchUpError> {
    let objects = repo.backend().list(WAL_PREFIX).await.map_err(store_err)?;
    let mut report = CatchUpReport::default();
    for o in objects {
        let Some((source, file)) = parse_wal_object_key(&o.key) else {
            continue;
        };
        report.files += 1;
        if known.contains(&o.key) {
            report.known += 1;
            continue;
        }
        let store = RepoWalStore::new(repo.clone(), source);
        let stored = match store.get_segment(&file.name).await {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(object = %o.key, error = %e, "WAL file unreadable; not recorded");
                report.unreadable.push(o.key.clone());
                continue;
            }
        };
        if let Err(e) = stored.verify(&file.name).await {
            tracing::warn!(object = %o.key, error = %e, "WAL file damaged; not recorded");
            report.unreadable.push(o.key.clone());
            continue;
        }
        let archived = ArchivedWal {
            name: file.name.clone(),
            kind: file.kind,
            timeline: file.timeline,
            sha3: stored.sha3.clone(),
            bytes: stored.data.len() as u64,
            object: o.key.clone(),
            newly_stored: false,
        };
        let e = wal_archived_event(&archived, actor);
        let stream = e.stream.clone();
        let appended = appender
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await?;
        if appended.events.iter().all(|c| c.duplicate) {
            report.duplicates += 1;
        } else {
            report.recorded += 1;
        }
        known.insert(o.key);
    }
    if report.recorded > 0 {
        tracing::info!(
            recorded = report.recorded,
            files = report.files,
            "recorded archived WAL files"
        );
    }
    Ok(report)
}

/// The timelines with WAL in the repository (all sources), for [`recorded_wal_objects`].
pub async fn archived_timelines(repo: &Repository) -> Result<BTreeSet<u32>, CatchUpError> {
    let objects = repo.backend().list(WAL_PREFIX).await.map_err(store_err)?;
    Ok(objects
        .iter()
        .filter_map(|o| parse_wal_object_key(&o.key).map(|(_, f)| f.timeline))
        .collect())
}

/// One catch-up with the local ledger: skips what it already records.
pub async fn catch_up_with_ledger(
    repo: &Repository,
    ledger: &Ledger,
    actor: &Actor,
) -> Result<CatchUpReport, CatchUpError> {
    let timelines = archived_timelines(repo).await?;
    let mut known = recorded_wal_objects(ledger, timelines)?;
    record_archived_wal(repo, ledger, &mut known, actor).await
}

/// For `backstop serve`: records archived WAL every `every` until shutdown. The set of recorded
/// files is read from the ledger once and then kept in memory, so each round reads only new
/// files. Errors are logged and retried next round; this task never stops the process.
pub async fn wal_catch_up_loop(
    repo: Repository,
    ledger: Ledger,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), LedgerError> {
    let actor = Actor::worker("wal-catch-up");
    let repo = repo.with_access(actor.to_string(), "recording archived WAL files");
    let mut known: Option<HashSet<String>> = None;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let round = async {
            let known = match &mut known {
                Some(k) => k,
                None => {
                    let timelines = archived_timelines(&repo).await?;
                    known.insert(recorded_wal_objects(&ledger, timelines)?)
                }
            };
            record_archived_wal(&repo, &ledger, known, &actor).await
        };
        if let Err(e) = round.await {
            tracing::warn!(error = %e, "recording archived WAL failed; retrying next round");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_round_trip() {
        let k = wal_object_key("main", "000000020000000100000003");
        assert_eq!(k, "wal/main/00000002/000000020000000100000003");
        let (s, f) = parse_wal_object_key(&k).unwrap();
        assert_eq!((s.as_str(), f.timeline), ("main", 2));
        let h = wal_object_key("main", "00000002.history");
        assert_eq!(h, "wal/main/00000002/00000002.history");
        assert!(parse_wal_object_key(&h).is_some());
        for bad in [
            "wal/000000010000000000000001",
            "wal/main/00000001/junk",
            "wal/main/00000002/000000010000000000000001",
            "wal//00000001/000000010000000000000001",
            "chunks/ab/cd",
        ] {
            assert!(parse_wal_object_key(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn wal_event_ids_depend_on_the_content_only() {
        let a = ArchivedWal {
            name: "000000010000000000000003".into(),
            kind: WalKind::Segment,
            timeline: 1,
            sha3: "ab".repeat(32),
            bytes: 16 << 20,
            object: "wal/main/00000001/000000010000000000000003".into(),
            newly_stored: true,
        };
        let mut again = a.clone();
        again.newly_stored = false;
        let actor = Actor::worker("wal-push");
        let e1 = wal_archived_event(&a, &actor);
        let e2 = wal_archived_event(&again, &Actor::worker("wal-catch-up"));
        assert_eq!(e1.id, e2.id);
        assert_eq!(e1.stream, "wal-00000001");
        let mut other = a.clone();
        other.sha3 = "cd".repeat(32);
        assert_ne!(wal_archived_event(&other, &actor).id, e1.id);
        e1.validate().unwrap();
    }
}
