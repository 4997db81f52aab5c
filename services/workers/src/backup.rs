//! Backups and restores: the data path (sources -> repository) wrapped in events.
//!
//! [`run_backup`] is the one implementation of a logical PostgreSQL backup. The `backstop backup`
//! command calls it in the foreground (with a progress bar) and the [`BackupWorker`] calls it when
//! a `backup.requested` event arrives (from the API or a schedule). Events, all on the stream
//! `backup-<id>`:
//!
//! ```text
//! backup.requested -> backup.started -> upload.verified -> backup.completed
//!                                    \-> backup.failed (with the reason)
//! ```
//!
//! Invariants:
//! - `backup.completed` is appended only after the manifest is sealed, uploaded and read back
//!   intact (`BackupWriter::finish`), so no backup is marked good that is not. A process killed
//!   half-way leaves chunks but no manifest and no `backup.completed`; the next backup finds those
//!   chunks in the repository and does not upload them again.
//! - Event ids are derived from the backup id, so a retried handler appends nothing twice.
//! - The dump report (tables, row counts in the snapshot, sequences) is stored in the manifest:
//!   a restore needs nothing but the repository and the master key.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use backstop_events::{
    Actor, BackupCompleted, BackupFailed, BackupKind, BackupRequested, BackupStarted, Envelope,
    Event, NewEvent, RecoveryCompleted, RecoveryFailed, RecoveryScope, RecoveryStarted, TableRows,
    UploadVerified, streams,
};
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ledger::{Appender, ExpectedVersion};
use backstop_repo::{BackupMeta, Manifest, RepoError, Repository, WriterOptions};
use backstop_sources::pg::logical::{
    self, DumpOptions, DumpReport, DumpSink, DumpSource, PartReader, PartStored, RestoreOptions,
    RestoreReport, SinkError,
};
use tokio::io::AsyncRead;
use uuid::Uuid;

/// Where a named source's database is and how to dump it.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    pub name: String,
    pub conninfo: String,
    pub jobs: usize,
}

/// Everything a backup or restore needs.
#[derive(Clone)]
pub struct DataPath {
    pub repo: Repository,
    pub appender: Arc<dyn Appender>,
    pub sources: Vec<SourceSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("unknown source `{0}`; configure it under [[sources]] in the configuration file")]
    UnknownSource(String),
    #[error("backup of `{source_name}` failed: {reason}")]
    Failed { source_name: String, reason: String },
    #[error(transparent)]
    Ledger(#[from] backstop_ledger::LedgerError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("restore failed: {0}")]
    Restore(String),
}

/// The key of the dump report inside a manifest's `extra`.
const LOGICAL_KEY: &str = "logical";

/// Appends one event to a backup's stream, idempotently (ids derived from the backup id).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn record(
    appender: &dyn Appender,
    stream: &str,
    actor: &Actor,
    cause: Option<&Envelope>,
    at: chrono::DateTime<chrono::Utc>,
    label: &str,
    backup_id: Uuid,
    event: Event,
) -> Result<(), backstop_ledger::LedgerError> {
    let mut e = match cause {
        Some(c) => NewEvent::caused_by(c, stream, actor.clone(), &event),
        None => NewEvent::new(stream, actor.clone(), &event),
    };
    // The id must come out the same whoever records it and however often: derive it from the
    // backup (or recovery) id, the label and the request's time, never the time of this attempt.
    e.id = backstop_events::uuid_v7_derived(backup_id, at, label);
    appender
        .append(stream, ExpectedVersion::Any, vec![e])
        .await?;
    Ok(())
}

/// Adapts the repository's backup writer to the source's sink (logical and physical backups).
pub(crate) struct WriterSink(pub(crate) Arc<backstop_repo::BackupWriter>);

#[async_trait]
impl DumpSink for WriterSink {
    async fn put_part(&self, name: &str, reader: PartReader) -> Result<PartStored, SinkError> {
        let summary = self
            .0
            .add_stream(name, reader)
            .await
            .map_err(|e| SinkError::with_source(e.to_string(), e))?;
        Ok(PartStored {
            stored_bytes: summary.new_bytes,
            new_bytes: summary.new_bytes,
        })
    }
}

/// Adapts a stored backup to the source's restore input.
pub struct ManifestSource {
    pub repo: Repository,
    pub manifest: Arc<Manifest>,
}

#[async_trait]
impl DumpSource for ManifestSource {
    async fn open_part(&self, name: &str) -> Result<PartReader, SinkError> {
        let stream = self
            .repo
            .open_stream(&self.manifest, name)
            .await
            .map_err(|e| SinkError::new(e.to_string()))?;
        let reader: Pin<Box<dyn AsyncRead + Send>> = Box::pin(stream);
        Ok(reader)
    }

    async fn check_part(&self, name: &str) -> Result<(), SinkError> {
        let report = self
            .repo
            .dry_run_restore(&self.manifest, Some(&[name.to_string()]))
            .await
            .map_err(|e| SinkError::new(e.to_string()))?;
        match report.missing.first() {
            None => Ok(()),
            Some(m) => Err(SinkError::new(format!(
                "object {} is missing ({} objects missing in all)",
                m.key,
                report.missing.len()
            ))),
        }
    }
}

/// The parent a new backup of `source` records: the last completed backup (incremental) or the
/// last full one (differential), read from the repository's manifests.
pub async fn choose_parent(
    repo: &Repository,
    source: &str,
    kind: BackupKind,
) -> Result<Option<Uuid>, RepoError> {
    if kind == BackupKind::Full {
        return Ok(None);
    }
    let mut best: Option<(chrono::DateTime<chrono::Utc>, Uuid)> = None;
    for listed in repo.list_backups().await? {
        let Ok(m) = listed.manifest else { continue };
        // A physical backup is never a logical one's parent.
        if m.source != source
            || m.extra.get("physical").is_some()
            || (kind == BackupKind::Differential && m.kind != BackupKind::Full)
        {
            continue;
        }
        if best.is_none_or(|(t, _)| m.finished_at > t) {
            best = Some((m.finished_at, m.backup_id));
        }
    }
    Ok(best.map(|(_, id)| id))
}

/// Figures a caller can show while a backup runs.
pub type ProgressFn = Arc<dyn Fn(backstop_repo::Progress) + Send + Sync>;

/// Runs one logical backup of a source and records it. Returns the completed event.
pub async fn run_backup(
    dp: &DataPath,
    request: &BackupRequested,
    requested_at: chrono::DateTime<chrono::Utc>,
    actor: &Actor,
    cause: Option<&Envelope>,
    progress: Option<ProgressFn>,
) -> Result<BackupCompleted, BackupError> {
    let spec = dp
        .sources
        .iter()
        .find(|s| s.name == request.source)
        .ok_or_else(|| BackupError::UnknownSource(request.source.clone()))?;
    let stream = streams::backup(request.backup_id);
    let appender = dp.appender.as_ref();
    let host = hostname();
    let repo = dp.repo.with_access(
        actor.to_string(),
        format!("backup {} of {}", request.backup_id, request.source),
    );
    let parent = choose_parent(&repo, &request.source, request.kind).await?;
    record(
        appender,
        &stream,
        actor,
        cause,
        requested_at,
        "started",
        request.backup_id,
        Event::BackupStarted(BackupStarted {
            backup_id: request.backup_id,
            source: request.source.clone(),
            kind: request.kind,
            parent,
            physical: false,
            host,
        }),
    )
    .await?;
    let started = Instant::now();
    let outcome = dump_into_repository(&repo, spec, request, parent, actor, progress).await;
    match outcome {
        Ok((result, report)) => {
            record(
                appender,
                &stream,
                actor,
                cause,
                requested_at,
                "upload-verified",
                request.backup_id,
                Event::UploadVerified(UploadVerified {
                    backup_id: request.backup_id,
                    objects: result.objects_verified,
                    bytes: result.bytes_verified,
                }),
            )
            .await?;
            let completed = BackupCompleted {
                backup_id: request.backup_id,
                source: request.source.clone(),
                kind: request.kind,
                parent,
                physical: false,
                manifest: result.manifest_key.clone(),
                manifest_sha3: result.manifest_sha3.to_hex(),
                raw_bytes: result.raw_bytes,
                stored_bytes: result.stored_bytes,
                new_bytes: result.new_bytes,
                chunks: result.chunks,
                new_chunks: result.new_chunks,
                duration_ms: started.elapsed().as_millis() as u64,
                attempt: request.attempt,
                tables: report
                    .tables
                    .iter()
                    .filter(|t| t.part.is_some())
                    .map(|t| TableRows {
                        schema: t.table.schema.clone(),
                        table: t.table.name.clone(),
                        rows: t.rows,
                    })
                    .collect(),
            };
            record(
                appender,
                &stream,
                actor,
                cause,
                requested_at,
                "completed",
                request.backup_id,
                Event::BackupCompleted(completed.clone()),
            )
            .await?;
            Ok(completed)
        }
        Err(reason) => {
            tracing::error!(backup = %request.backup_id, source = %request.source, %reason, "backup failed");
            record(
                appender,
                &stream,
                actor,
                cause,
                requested_at,
                "failed",
                request.backup_id,
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

async fn dump_into_repository(
    repo: &Repository,
    spec: &SourceSpec,
    request: &BackupRequested,
    parent: Option<Uuid>,
    actor: &Actor,
    progress: Option<ProgressFn>,
) -> Result<(backstop_repo::BackupResult, DumpReport), String> {
    let meta = BackupMeta {
        backup_id: request.backup_id,
        kind: request.kind,
        parent,
        source: request.source.clone(),
        purpose: backstop_repo::KeyPurpose::Database,
        actor: actor.to_string(),
    };
    let writer = Arc::new(
        repo.start_backup_with(meta, WriterOptions::default())
            .await
            .map_err(|e| e.to_string())?,
    );
    let ticker = progress.map(|f| {
        let w = writer.clone();
        tokio::spawn(async move {
            loop {
                f(w.progress());
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
    });
    let options = DumpOptions {
        jobs: spec.jobs.max(1),
        ..Default::default()
    };
    let dumped = logical::dump(
        &spec.conninfo,
        &options,
        Arc::new(WriterSink(writer.clone())),
    )
    .await;
    if let Some(t) = ticker {
        t.abort();
        // Wait for the ticker to be gone: it holds a handle on the writer.
        let _ = t.await;
    }
    let report = dumped.map_err(|e| e.to_string())?;
    let writer = Arc::try_unwrap(writer).map_err(|_| {
        "internal error: the backup writer is still shared after the dump".to_string()
    })?;
    let extra = serde_json::json!({ LOGICAL_KEY: report });
    let result = writer.finish(extra).await.map_err(|e| e.to_string())?;
    Ok((result, report))
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The dump report stored in a logical backup's manifest.
pub fn dump_report(manifest: &Manifest) -> Result<DumpReport, BackupError> {
    let value = manifest.extra.get(LOGICAL_KEY).cloned().ok_or_else(|| {
        BackupError::Restore(format!(
            "backup {} has no logical dump report in its manifest (is it a physical backup?)",
            manifest.backup_id
        ))
    })?;
    serde_json::from_value(value).map_err(|e| {
        BackupError::Restore(format!(
            "the dump report in backup {}'s manifest does not decode: {e}",
            manifest.backup_id
        ))
    })
}

/// Resolves `latest` (optionally of one source) or a backup id to a loaded manifest.
pub async fn resolve_backup(
    repo: &Repository,
    which: &str,
    source: Option<&str>,
) -> Result<Manifest, BackupError> {
    if which != "latest" {
        let id: Uuid = which.parse().map_err(|_| {
            BackupError::Restore(format!("{which:?} is neither a backup id nor `latest`"))
        })?;
        return Ok(repo.load_manifest(id).await?);
    }
    let mut best: Option<Manifest> = None;
    for listed in repo.list_backups().await? {
        let Ok(m) = listed.manifest else { continue };
        if source.is_some_and(|s| s != m.source) {
            continue;
        }
        if best.as_ref().is_none_or(|b| m.finished_at > b.finished_at) {
            best = Some(m);
        }
    }
    best.ok_or_else(|| BackupError::Restore("the repository holds no backup yet".into()))
}

/// Restores a logical backup into `target`, recording the recovery events with the operator.
/// Who runs a recovery and what it covers: the identity of the recovery and its scope.
pub struct Recovery {
    pub recovery_id: Uuid,
    pub requested_at: chrono::DateTime<chrono::Utc>,
    pub operator: String,
    pub scope: RecoveryScope,
}

/// Restores a logical backup into `target` in the foreground (`backstop restore`), recording the
/// recovery with the operator. `recovery.requested` and `recovery.started` go in one append, so a
/// restore worker never takes this recovery for one it should run.
pub async fn run_restore(
    dp: &DataPath,
    manifest: Manifest,
    target_redacted: &str,
    target: &str,
    options: RestoreOptions,
    operator: &str,
) -> Result<RestoreReport, BackupError> {
    let recovery = Recovery {
        recovery_id: backstop_events::uuid_v7(),
        requested_at: backstop_events::now_micros(),
        operator: operator.to_string(),
        scope: RecoveryScope {
            target: target_redacted.to_string(),
            tables: options.tables.clone().unwrap_or_default(),
            point_in_time: None,
            dry_run: options.dry_run,
        },
    };
    let stream = streams::recovery(recovery.recovery_id);
    let actor = Actor::operator(operator);
    let backup_id = manifest.backup_id;
    let event = |label: &str, e: Event| {
        let mut n = NewEvent::new(&stream, actor.clone(), &e);
        n.id = backstop_events::uuid_v7_derived(recovery.recovery_id, recovery.requested_at, label);
        n
    };
    let requested = event(
        "requested",
        Event::RecoveryRequested(backstop_events::RecoveryRequested {
            recovery_id: recovery.recovery_id,
            backup_id,
            operator: operator.to_string(),
            scope: recovery.scope.clone(),
        }),
    );
    let started = event(
        "started",
        Event::RecoveryStarted(RecoveryStarted {
            recovery_id: recovery.recovery_id,
            backup_id,
            operator: operator.to_string(),
            scope: recovery.scope.clone(),
        }),
    );
    dp.appender
        .append(&stream, ExpectedVersion::NoStream, vec![requested, started])
        .await?;
    execute_restore(dp, manifest, &recovery, target, options, None).await
}

/// Runs a recovery that is recorded as started, then records its end (completed or failed).
pub async fn execute_restore(
    dp: &DataPath,
    manifest: Manifest,
    recovery: &Recovery,
    target: &str,
    options: RestoreOptions,
    cause: Option<&Envelope>,
) -> Result<RestoreReport, BackupError> {
    let stream = streams::recovery(recovery.recovery_id);
    let actor = Actor::operator(&recovery.operator);
    let backup_id = manifest.backup_id;
    let started = Instant::now();
    let repo = dp
        .repo
        .with_access(actor.to_string(), format!("restore of backup {backup_id}"));
    let outcome = async {
        let report = dump_report(&manifest)?;
        let source = Arc::new(ManifestSource {
            repo,
            manifest: Arc::new(manifest),
        });
        logical::restore(target, &options, source, &report)
            .await
            .map_err(|e| BackupError::Restore(e.to_string()))
    }
    .await;
    let (label, event) = match &outcome {
        Ok(report) => (
            "completed",
            Event::RecoveryCompleted(RecoveryCompleted {
                recovery_id: recovery.recovery_id,
                backup_id,
                operator: recovery.operator.clone(),
                scope: recovery.scope.clone(),
                duration_ms: started.elapsed().as_millis() as u64,
                bytes: report.bytes,
                tables: report
                    .tables
                    .iter()
                    .map(|t| TableRows {
                        schema: t.table.schema.clone(),
                        table: t.table.name.clone(),
                        rows: t.rows,
                    })
                    .collect(),
            }),
        ),
        Err(e) => (
            "failed",
            Event::RecoveryFailed(RecoveryFailed {
                recovery_id: recovery.recovery_id,
                backup_id,
                operator: recovery.operator.clone(),
                scope: recovery.scope.clone(),
                reason: e.to_string(),
            }),
        ),
    };
    record(
        dp.appender.as_ref(),
        &stream,
        &actor,
        cause,
        recovery.requested_at,
        label,
        recovery.recovery_id,
        event,
    )
    .await?;
    outcome
}

/// Records `backup.completed` for a backup whose manifest exists, from the manifest itself.
async fn record_completion_from_manifest(
    dp: &DataPath,
    request: &BackupRequested,
    m: &Manifest,
    cause: &Envelope,
) -> Result<(), backstop_ledger::LedgerError> {
    let sealed = dp
        .repo
        .backend()
        .get(&backstop_repo::manifest_key(&m.backup_id))
        .await
        .map(|b| hex::encode(<sha3::Sha3_256 as sha3::Digest>::digest(&b)))
        .unwrap_or_default();
    let tables = dump_report(m)
        .map(|r| {
            r.tables
                .iter()
                .filter(|t| t.part.is_some())
                .map(|t| TableRows {
                    schema: t.table.schema.clone(),
                    table: t.table.name.clone(),
                    rows: t.rows,
                })
                .collect()
        })
        .unwrap_or_default();
    let completed = BackupCompleted {
        backup_id: m.backup_id,
        source: m.source.clone(),
        kind: m.kind,
        parent: m.parent,
        physical: request.physical,
        manifest: backstop_repo::manifest_key(&m.backup_id),
        manifest_sha3: sealed,
        raw_bytes: m.totals.raw_bytes,
        stored_bytes: m.totals.stored_bytes,
        new_bytes: m.totals.new_bytes,
        chunks: m.totals.chunks,
        new_chunks: m.totals.new_chunks,
        duration_ms: m.duration().num_milliseconds().max(0) as u64,
        attempt: request.attempt,
        tables,
    };
    record(
        dp.appender.as_ref(),
        &streams::backup(m.backup_id),
        &Actor::worker(NAME),
        Some(cause),
        cause.occurred_at,
        "completed",
        m.backup_id,
        Event::BackupCompleted(completed),
    )
    .await
}

/// Runs backups requested through the ledger (by the API or a schedule).
pub struct BackupWorker {
    pub data_path: DataPath,
}

pub const NAME: &str = "backup";

#[async_trait]
impl Handler for BackupWorker {
    fn name(&self) -> &str {
        NAME
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == "backup.requested"
    }

    async fn handle(&self, event: &Envelope, _appender: &dyn Appender) -> Result<(), HandlerError> {
        let Ok(Event::BackupRequested(request)) = event.event() else {
            return Err(HandlerError::permanent(format!(
                "event {} is not a readable backup.requested",
                event.position
            )));
        };
        if let backstop_events::Trigger::Foreground { .. } = request.trigger {
            // The operator's command is running this backup itself.
            return Ok(());
        }
        if request.physical {
            return Err(HandlerError::permanent(
                "physical backups are taken with `backstop backup --physical`; this worker runs logical ones",
            ));
        }
        // A redelivered request whose backup already finished: its manifest is in the
        // repository. Record the completion again (a duplicate id if it was recorded; the
        // missing event if the process died between the manifest and the event) and stop.
        match self.data_path.repo.load_manifest(request.backup_id).await {
            Ok(m) => {
                return record_completion_from_manifest(&self.data_path, &request, &m, event)
                    .await
                    .map_err(HandlerError::from);
            }
            Err(RepoError::NotFound { .. }) => {}
            Err(e) if e.is_transient() => return Err(HandlerError::retryable(e.to_string())),
            Err(e) => {
                return Err(HandlerError::permanent(format!(
                    "backup {} has an unreadable manifest: {e}",
                    request.backup_id
                )));
            }
        }
        match run_backup(
            &self.data_path,
            &request,
            event.occurred_at,
            &Actor::worker(NAME),
            Some(event),
            None,
        )
        .await
        {
            Ok(_) => Ok(()),
            // The failure is recorded as backup.failed; the alert worker raises the alert.
            Err(BackupError::Failed { .. }) => Ok(()),
            Err(BackupError::UnknownSource(s)) => {
                Err(HandlerError::permanent(format!("unknown source `{s}`")))
            }
            Err(e) => Err(HandlerError::retryable(e.to_string())),
        }
    }
}
