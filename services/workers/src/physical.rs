//! Physical backups, continuous WAL archiving and point-in-time restores: the physical data path
//! of `backstop-sources` (`pg::physical`, `pg::wal`) on the repository, wrapped in events.
//!
//! # Repository layout
//! - A base backup is a repository backup like a logical one (chunked, deduplicated, sealed with
//!   the `database` key) with one stream, `base/base.tar`, and the source's
//!   [`BaseBackupReport`] in its manifest's `extra` under [`PHYSICAL_KEY`] (`"physical"`). A
//!   restore needs nothing else from the manifest.
//! - WAL files are sealed blobs (the `wal` data key) at `wal/<source>/<timeline>/<file>`, e.g.
//!   `wal/main/00000001/000000010000000000000003`, each in the stored form of
//!   [`backstop_sources::pg::wal::encode_stored`] (the SHA3-256 recorded at push time travels
//!   with the bytes). One prefix per source: two clusters never share an archive.
//!
//! # Events
//! - Base backups: `backup.requested -> backup.started -> upload.verified -> backup.completed`
//!   (or `backup.failed`), all with `physical: true`, on the stream `backup-<id>`, exactly as
//!   logical backups. The parent is the newest physical backup of the same source.
//! - Archived WAL: one `wal.archived` per file, on the stream `wal-<timeline>`. Its id is derived
//!   from the file's object key and content alone ([`wal_event_id`]), so whoever records it
//!   (`wal-push` itself, or a later catch-up with [`record_archived_wal`]) produces the same
//!   event and the ledger keeps one. The id has UUIDv7's layout with its time field at the Unix
//!   epoch: nothing about the content says when it was pushed, and an id that changed with the
//!   time of recording would record the file twice. The envelope's `occurred_at` is the real time.
//! - Restores: `recovery.requested -> recovery.started -> recovery.completed | recovery.failed`,
//!   with the operator and a scope whose `target` is the directory and `point_in_time` the
//!   recovery target.
//!
//! Invariants:
//! - `backup.completed` is appended only once the manifest is sealed, uploaded and read back
//!   (the writer's `finish`), and only after `pg_basebackup` returned, i.e. after the server
//!   archived the WAL the backup needs.
//! - Recording WAL events never blocks archiving: a segment is safe once it is in the repository,
//!   and the catch-up records whatever `wal-push` could not.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backstop_events::{
    Actor, BackupCompleted, BackupFailed, BackupRequested, BackupStarted, Envelope, Event,
    NewEvent, RecoveryCompleted, RecoveryFailed, RecoveryRequested, RecoveryScope, RecoveryStarted,
    UploadVerified, WalArchived, streams,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerError};
use backstop_repo::{
    BackupMeta, BackupResult, KeyPurpose, Manifest, RepoError, Repository, WriterOptions,
};
use backstop_sources::pg::physical::{
    self, BaseBackupOptions, BaseBackupReport, PhysicalRestoreOptions, PhysicalRestoreReport,
    PhysicalVerifyOptions, PhysicalVerifyReport, RecoveryTarget,
};
use backstop_sources::pg::wal::{
    ArchivedWal, PushReport, StoredWal, WalEntry, WalFile, WalKind, WalStore, WalStoreError,
    decode_stored, encode_stored,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::backup::{BackupError, DataPath, ManifestSource, ProgressFn, SourceSpec, WriterSink};

/// The key of the base backup report inside a physical backup's manifest `extra`.
pub const PHYSICAL_KEY: &str = "physical";

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

fn store_err(e: RepoError) -> WalStoreError {
    if matches!(e, RepoError::Corrupt { .. } | RepoError::Damaged { .. }) {
        WalStoreError::Corrupt {
            object: e.object_key().unwrap_or("?").to_string(),
            why: e.to_string(),
        }
    } else {
        WalStoreError::unavailable_with(e.to_string(), e)
    }
}

/// One source's WAL archive in the repository (see the module docs for the layout).
#[derive(Clone)]
pub struct RepoWalStore {
    repo: Repository,
    source: String,
}

impl RepoWalStore {
    /// The archive of `source`. Key unwraps are reported with `repo`'s actor and reason (give it
    /// one with [`Repository::with_access`]).
    pub fn new(repo: Repository, source: impl Into<String>) -> RepoWalStore {
        RepoWalStore {
            repo,
            source: source.into(),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
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
        let key = self.object_key(file);
        // put_blob reads the object back and checks its SHA3-256 before returning: the file is
        // durably stored when this returns.
        self.repo
            .put_blob(&key, KeyPurpose::Wal, encode_stored(sha3, &data))
            .await
            .map_err(store_err)?;
        Ok(key)
    }

    async fn get_segment(&self, name: &str) -> Result<Option<StoredWal>, WalStoreError> {
        match self
            .repo
            .get_blob(&wal_object_key(&self.source, name), None)
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

/// A physical backup as the repository holds it.
#[derive(Debug, Clone)]
pub struct PhysicalBackup {
    pub manifest: Manifest,
    pub report: BaseBackupReport,
}

/// The base backup report in a manifest, if it is a physical backup.
pub fn physical_report(manifest: &Manifest) -> Option<BaseBackupReport> {
    let v = manifest.extra.get(PHYSICAL_KEY)?;
    serde_json::from_value(v.clone()).ok()
}

/// Every readable physical backup in the repository (of `source`, when given), oldest first.
pub async fn physical_backups(
    repo: &Repository,
    source: Option<&str>,
) -> Result<Vec<PhysicalBackup>, RepoError> {
    let mut out = Vec::new();
    for listed in repo.list_backups().await? {
        let Ok(manifest) = listed.manifest else {
            continue;
        };
        if source.is_some_and(|s| s != manifest.source) {
            continue;
        }
        if let Some(report) = physical_report(&manifest) {
            out.push(PhysicalBackup { manifest, report });
        }
    }
    out.sort_by_key(|b| (b.report.finished_at, b.report.stop_lsn));
    Ok(out)
}

/// The parent a new physical backup of `source` records: the newest physical backup of that
/// source (incremental), the newest full one (differential), none for a full backup.
pub fn choose_physical_parent(
    backups: &[PhysicalBackup],
    source: &str,
    kind: backstop_events::BackupKind,
) -> Option<Uuid> {
    use backstop_events::BackupKind;
    if kind == BackupKind::Full {
        return None;
    }
    backups
        .iter()
        .filter(|b| b.manifest.source == source)
        .filter(|b| kind != BackupKind::Differential || b.manifest.kind == BackupKind::Full)
        .max_by_key(|b| b.manifest.finished_at)
        .map(|b| b.manifest.backup_id)
}

/// The time inside a UUIDv7 (the backup id's request time), for ids derived from it.
fn uuid_time(id: Uuid) -> DateTime<Utc> {
    id.get_timestamp()
        .and_then(|ts| {
            let (secs, nanos) = ts.to_unix();
            DateTime::<Utc>::from_timestamp(secs as i64, nanos)
        })
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// Appends one event to a stream with an id derived from `id` and `label`: stable for the same
/// backup or recovery, so a retried step appends nothing twice.
async fn record(
    appender: &dyn Appender,
    stream: &str,
    actor: &Actor,
    cause: Option<&Envelope>,
    id: Uuid,
    label: &str,
    event: Event,
) -> Result<(), LedgerError> {
    crate::backup::record(
        appender,
        stream,
        actor,
        cause,
        uuid_time(id),
        label,
        id,
        event,
    )
    .await
}

/// What a physical backup produced.
#[derive(Debug, Clone)]
pub struct PhysicalBackupDone {
    pub completed: BackupCompleted,
    pub report: BaseBackupReport,
}

/// Options of [`run_physical_backup`].
#[derive(Clone, Default)]
pub struct PhysicalBackupOptions {
    /// Passed to `pg_basebackup` (`--max-rate`), to spare a busy primary's disks.
    pub max_rate: Option<String>,
    /// Spread checkpoint instead of an immediate one (default false: immediate).
    pub spread_checkpoint: bool,
    pub writer: Option<WriterOptions>,
    pub progress: Option<ProgressFn>,
}

/// Takes one base backup of `request.source` into the repository and records it (see the module
/// docs). `backup.requested` is the caller's (the CLI appends it, or it is the event handled).
pub async fn run_physical_backup(
    dp: &DataPath,
    request: &BackupRequested,
    actor: &Actor,
    cause: Option<&Envelope>,
    opts: PhysicalBackupOptions,
) -> Result<PhysicalBackupDone, BackupError> {
    let spec = dp
        .sources
        .iter()
        .find(|s| s.name == request.source)
        .ok_or_else(|| BackupError::UnknownSource(request.source.clone()))?;
    let stream = streams::backup(request.backup_id);
    let appender = dp.appender.as_ref();
    let repo = dp.repo.with_access(
        actor.to_string(),
        format!(
            "physical backup {} of {}",
            request.backup_id, request.source
        ),
    );
    let existing = physical_backups(&repo, Some(&request.source)).await?;
    let parent = choose_physical_parent(&existing, &request.source, request.kind);
    record(
        appender,
        &stream,
        actor,
        cause,
        request.backup_id,
        "started",
        Event::BackupStarted(BackupStarted {
            backup_id: request.backup_id,
            source: request.source.clone(),
            kind: request.kind,
            parent,
            physical: true,
            host: hostname(),
        }),
    )
    .await?;
    let started = Instant::now();
    match base_backup_into(&repo, spec, request, parent, actor, &opts).await {
        Ok((result, report)) => {
            record(
                appender,
                &stream,
                actor,
                cause,
                request.backup_id,
                "upload-verified",
                Event::UploadVerified(UploadVerified {
                    backup_id: request.backup_id,
                    objects: result.objects_verified,
                    bytes: result.bytes_verified,
                }),
            )
            .await?;
            let completed = match completed_event(request, parent, &result, started) {
                Ok(c) => c,
                Err(reason) => {
                    return Err(BackupError::Failed {
                        source_name: request.source.clone(),
                        reason,
                    });
                }
            };
            record(
                appender,
                &stream,
                actor,
                cause,
                request.backup_id,
                "completed",
                Event::BackupCompleted(completed.clone()),
            )
            .await?;
            Ok(PhysicalBackupDone { completed, report })
        }
        Err(reason) => {
            tracing::error!(backup = %request.backup_id, source = %request.source, %reason, "physical backup failed");
            record(
                appender,
                &stream,
                actor,
                cause,
                request.backup_id,
                "failed",
                Event::BackupFailed(BackupFailed {
                    backup_id: request.backup_id,
                    source: request.source.clone(),
                    reason: reason.clone(),
                    attempt: request.attempt,
                }),
            )
            .await?;
            Err(BackupError::Failed {
                source_name: request.source.clone(),
                reason,
            })
        }
    }
}

fn completed_event(
    request: &BackupRequested,
    parent: Option<Uuid>,
    result: &BackupResult,
    started: Instant,
) -> Result<BackupCompleted, String> {
    // Built from JSON so that fields added to the vocabulary later take their defaults here.
    let v = serde_json::json!({
        "backup_id": request.backup_id,
        "source": request.source,
        "kind": request.kind,
        "parent": parent,
        "physical": true,
        "manifest": result.manifest_key,
        "manifest_sha3": result.manifest_sha3.to_hex(),
        "raw_bytes": result.raw_bytes,
        "stored_bytes": result.stored_bytes,
        "new_bytes": result.new_bytes,
        "chunks": result.chunks,
        "new_chunks": result.new_chunks,
        "duration_ms": started.elapsed().as_millis() as u64,
        "attempt": request.attempt,
        "tables": [],
    });
    serde_json::from_value(v).map_err(|e| {
        format!("internal error: backup.completed does not decode from its fields: {e}")
    })
}

async fn base_backup_into(
    repo: &Repository,
    spec: &SourceSpec,
    request: &BackupRequested,
    parent: Option<Uuid>,
    actor: &Actor,
    opts: &PhysicalBackupOptions,
) -> Result<(BackupResult, BaseBackupReport), String> {
    let meta = BackupMeta {
        backup_id: request.backup_id,
        kind: request.kind,
        parent,
        source: request.source.clone(),
        purpose: KeyPurpose::Database,
        actor: actor.to_string(),
    };
    let writer = Arc::new(
        repo.start_backup_with(meta, opts.writer.clone().unwrap_or_default())
            .await
            .map_err(|e| e.to_string())?,
    );
    let ticker = opts.progress.clone().map(|f| {
        let w = writer.clone();
        tokio::spawn(async move {
            loop {
                f(w.progress());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let options = BaseBackupOptions {
        fast_checkpoint: !opts.spread_checkpoint,
        label: format!("backstop {}", request.backup_id),
        max_rate: opts.max_rate.clone(),
        ..BaseBackupOptions::default()
    };
    let taken = physical::base_backup(&spec.conninfo, &WriterSink(writer.clone()), &options).await;
    if let Some(t) = ticker {
        t.abort();
        // The ticker holds a handle on the writer: wait until it is gone.
        let _ = t.await;
    }
    let report = taken.map_err(|e| e.to_string())?;
    let writer = Arc::try_unwrap(writer).map_err(|_| {
        "internal error: the backup writer is still shared after the base backup".to_string()
    })?;
    let result = writer
        .finish(serde_json::json!({ PHYSICAL_KEY: report }))
        .await
        .map_err(|e| e.to_string())?;
    Ok((result, report))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

// ---------------------------------------------------------------------------------------------
// WAL events

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

// ---------------------------------------------------------------------------------------------
// Restore

/// Picks the base backup to restore: `which` is a backup id or `latest` (the newest one that can
/// reach `target`, see [`physical::choose_base_backup`]).
pub async fn select_base_backup(
    repo: &Repository,
    which: &str,
    source: Option<&str>,
    target: &RecoveryTarget,
) -> Result<PhysicalBackup, BackupError> {
    if which != "latest" {
        let id: Uuid = which.parse().map_err(|_| {
            BackupError::Restore(format!("{which:?} is neither a backup id nor `latest`"))
        })?;
        let manifest = repo.load_manifest(id).await?;
        let report = physical_report(&manifest).ok_or_else(|| {
            BackupError::Restore(format!(
                "backup {id} is not a physical backup (no base backup report in its manifest); restore it without --physical"
            ))
        })?;
        return Ok(PhysicalBackup { manifest, report });
    }
    let backups = physical_backups(repo, source).await?;
    if backups.is_empty() {
        return Err(BackupError::Restore(match source {
            Some(s) => format!(
                "the repository holds no physical backup of `{s}`; take one with `backstop backup --source {s} --physical`"
            ),
            None => "the repository holds no physical backup; take one with `backstop backup --physical`".into(),
        }));
    }
    let reports: Vec<BaseBackupReport> = backups.iter().map(|b| b.report.clone()).collect();
    let Some(chosen) = physical::choose_base_backup(&reports, target) else {
        let earliest = &backups[0].report;
        return Err(BackupError::Restore(format!(
            "no base backup can reach {target}: the earliest restorable moment is {} (LSN {}); choose a later target",
            earliest.finished_at.to_rfc3339(),
            earliest.stop_lsn
        )));
    };
    let index = reports
        .iter()
        .position(|r| r == chosen)
        .unwrap_or(backups.len() - 1);
    Ok(backups[index].clone())
}

/// Restores `backup` into `dir` so that PostgreSQL started on it recovers to `opts.target`,
/// recording the recovery with `operator`.
pub async fn run_physical_restore(
    repo: &Repository,
    appender: &dyn Appender,
    backup: &PhysicalBackup,
    dir: &Path,
    opts: &PhysicalRestoreOptions,
    operator: &str,
) -> Result<PhysicalRestoreReport, BackupError> {
    let recovery_id = backstop_events::uuid_v7();
    let stream = streams::recovery(recovery_id);
    let actor = Actor::operator(operator);
    let backup_id = backup.manifest.backup_id;
    let scope = RecoveryScope {
        target: dir.display().to_string(),
        tables: Vec::new(),
        point_in_time: Some(opts.target.to_string()),
        dry_run: false,
    };
    record(
        appender,
        &stream,
        &actor,
        None,
        recovery_id,
        "requested",
        Event::RecoveryRequested(RecoveryRequested {
            recovery_id,
            backup_id,
            operator: operator.to_string(),
            scope: scope.clone(),
        }),
    )
    .await?;
    record(
        appender,
        &stream,
        &actor,
        None,
        recovery_id,
        "started",
        Event::RecoveryStarted(RecoveryStarted {
            recovery_id,
            backup_id,
            operator: operator.to_string(),
            scope: scope.clone(),
        }),
    )
    .await?;
    let started = Instant::now();
    let source = ManifestSource {
        repo: repo.with_access(
            actor.to_string(),
            format!(
                "physical restore of backup {backup_id} into {}",
                dir.display()
            ),
        ),
        manifest: Arc::new(backup.manifest.clone()),
    };
    let outcome = physical::restore_physical(&source, &backup.report, dir, opts).await;
    match outcome {
        Ok(report) => {
            record(
                appender,
                &stream,
                &actor,
                None,
                recovery_id,
                "completed",
                Event::RecoveryCompleted(RecoveryCompleted {
                    recovery_id,
                    backup_id,
                    operator: operator.to_string(),
                    scope,
                    duration_ms: started.elapsed().as_millis() as u64,
                    bytes: report.bytes,
                    tables: Vec::new(),
                }),
            )
            .await?;
            Ok(report)
        }
        Err(e) => {
            record(
                appender,
                &stream,
                &actor,
                None,
                recovery_id,
                "failed",
                Event::RecoveryFailed(RecoveryFailed {
                    recovery_id,
                    backup_id,
                    operator: operator.to_string(),
                    scope,
                    reason: e.to_string(),
                }),
            )
            .await?;
            Err(BackupError::Restore(e.to_string()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verification

/// How [`verify_physical`] restores and checks.
#[derive(Debug, Clone)]
pub struct VerifyPhysicalOptions {
    /// The `restore_command` the temporary cluster fetches WAL with (a `backstop wal-fetch`
    /// invocation that the server's user can run: binary, configuration, master key and
    /// repository readable by it).
    pub restore_command: String,
    /// Where the temporary data directory goes (default: the system's temporary directory).
    /// It needs room for the whole cluster.
    pub work_dir: Option<PathBuf>,
    /// Recovery target: [`RecoveryTarget::Immediate`] (the backup alone, the default) or
    /// [`RecoveryTarget::Latest`] (the backup and all WAL archived since).
    pub target: RecoveryTarget,
    pub verify: PhysicalVerifyOptions,
}

impl VerifyPhysicalOptions {
    pub fn new(restore_command: impl Into<String>) -> VerifyPhysicalOptions {
        VerifyPhysicalOptions {
            restore_command: restore_command.into(),
            work_dir: None,
            target: RecoveryTarget::Immediate,
            verify: PhysicalVerifyOptions::default(),
        }
    }
}

/// What a physical verification measured.
#[derive(Debug, Clone)]
pub struct PhysicalVerification {
    pub restore: PhysicalRestoreReport,
    pub verify: PhysicalVerifyReport,
}

/// Verifies a physical backup for real: restores it into a temporary directory (recovery target
/// immediate by default), starts a private server on it, waits for recovery to reach
/// consistency, runs `pg_amcheck`, counts every table's rows, stops the server and removes the
/// directory (whatever the outcome). Records nothing: the verify worker records the verdict.
pub async fn verify_physical(
    repo: &Repository,
    backup: &PhysicalBackup,
    opts: &VerifyPhysicalOptions,
) -> Result<PhysicalVerification, BackupError> {
    let base = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = base.join(format!("backstop-verify-{}", Uuid::now_v7()));
    {
        use std::os::unix::fs::DirBuilderExt;
        // 0711: PostgreSQL's user (when we are root) must traverse it to reach the data
        // directory, which restore gives to that user with mode 0700.
        std::fs::DirBuilder::new()
            .mode(0o711)
            .recursive(true)
            .create(&work)
            .map_err(|e| {
                BackupError::Restore(format!(
                    "cannot create the verification directory {}: {e}",
                    work.display()
                ))
            })?;
    }
    let dir = work.join("data");
    let mut restore_opts = PhysicalRestoreOptions::new(opts.restore_command.clone());
    restore_opts.target = opts.target.clone();
    restore_opts.pg_bin_dir = opts.verify.pg_bin_dir.clone();
    restore_opts.owner = Some(
        opts.verify
            .run_as
            .clone()
            .unwrap_or_else(|| "postgres".into()),
    );
    let source = ManifestSource {
        repo: repo.with_access(
            "worker:verify",
            format!(
                "verification of physical backup {}",
                backup.manifest.backup_id
            ),
        ),
        manifest: Arc::new(backup.manifest.clone()),
    };
    let result = async {
        let restore = physical::restore_physical(&source, &backup.report, &dir, &restore_opts)
            .await
            .map_err(|e| BackupError::Restore(e.to_string()))?;
        let verify = physical::verify_restored(&dir, &opts.verify)
            .await
            .map_err(|e| BackupError::Restore(e.to_string()))?;
        Ok(PhysicalVerification { restore, verify })
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&work).await;
    result
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
