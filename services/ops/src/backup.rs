//! The backup use case: one source read through the data path into the repository, wrapped in
//! events. One function, [`run_backup`], takes every kind of backup alike (PostgreSQL logical and
//! physical, command sources, Redis snapshots; [`crate::context::SourceKind`]): the CLI calls
//! it in the foreground (with a progress bar), the backup worker when a `backup.requested` event
//! arrives (from the API, a schedule or a retry). Events, all on the stream `backup-<id>`:
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
//! - Event ids derive from the backup id, the step and the request's time ([`crate::record`]), so
//!   a retried or redelivered backup appends nothing twice; a request whose manifest exists only
//!   (re)records its completion ([`complete_from_manifest`]).
//! - The source's report (tables and row counts in the snapshot, or the base backup's label and
//!   WAL range) is stored in the manifest: a restore needs only the repository and the master key.
//! - A failure is recorded as `backup.failed` unless the caller asked to retry transient ones
//!   ([`FailureRecording::UnlessTransient`]: the worker, which retries the event and records the
//!   failure with [`record_failure`] when it gives up).
//! - While the source is read, the process renews the backup's lease (`lease.renewed`,
//!   [`crate::lease`]); if it dies, serve's lease monitor records `backup.failed` (abandoned).

use std::sync::Arc;
use std::time::{Duration, Instant};

use backstop_events::{
    Actor, BackupCompleted, BackupFailed, BackupMethod, BackupRequested, BackupStarted, Envelope,
    Event, LeasedJob, TableRows, UploadVerified, streams,
};
use backstop_ledger::Appender;
use backstop_repo::{BackupMeta, BackupResult, KeyPurpose, Manifest, Repository, WriterOptions};
use backstop_sources::command::{self, CommandReport};
use backstop_sources::pg::logical::{self, DumpOptions, DumpReport};
use backstop_sources::pg::physical::{self, BaseBackupOptions, BaseBackupReport};
use backstop_sources::redis::{self, RedisReport};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::catalog::{self, COMMAND_KEY, LOGICAL_KEY, PHYSICAL_KEY, REDIS_KEY};
use crate::context::{DataPath, SourceKind, SourceSpec, hostname};
use crate::error::OpsError;
use crate::lease::Heartbeat;
use crate::parts::WriterSink;
use crate::record::record;
use crate::throttle::{RateLimit, max_rate_arg};

/// Figures a caller can show while a backup runs.
pub type ProgressFn = Arc<dyn Fn(backstop_repo::Progress) + Send + Sync>;

/// Whether [`run_backup`] records a transient failure as `backup.failed`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureRecording {
    /// Every failure is recorded (a foreground backup: the operator sees it end).
    #[default]
    Always,
    /// A transient failure (storage or source briefly unreachable) is returned unrecorded, for
    /// the caller to retry the same backup.
    UnlessTransient,
}

/// How to take a backup, beyond what the request says.
#[derive(Clone, Default)]
pub struct BackupOptions {
    pub progress: Option<ProgressFn>,
    pub writer: Option<WriterOptions>,
    /// Physical: passed to `pg_basebackup --max-rate` to spare a busy primary's disks.
    pub max_rate: Option<String>,
    /// Physical: a spread checkpoint instead of an immediate one.
    pub spread_checkpoint: bool,
    /// Logical: parallel `COPY` streams instead of the source's configured number.
    pub jobs: Option<usize>,
    /// At most this many bytes per second read from the source (trading hours): logical
    /// streams share one token bucket; physical backups pass it to `pg_basebackup --max-rate`.
    pub bytes_per_second: Option<u64>,
    pub failures: FailureRecording,
    /// Tags recorded in the manifest (`extra.tags`), which retention's keep-by-tag rules read
    /// (`pre-deploy` kept 30 days by default).
    pub tags: Vec<String>,
    /// The backup set this backup is a component of, recorded in the manifest (`extra.set`,
    /// [`crate::sets::SET_KEY`]) so that `restore --set` needs only the repository.
    pub set: Option<crate::sets::SetRef>,
    /// The whole backup is stopped past this (its `pg_dump`/`pg_basebackup` children killed) and
    /// recorded as failed: nothing hangs forever on a stuck server or network.
    pub deadline: Option<Duration>,
    /// Logical: how long the dump waits for a table's lock (a migration holding an ACCESS
    /// EXCLUSIVE lock) before it fails with the table named, instead of waiting without end.
    pub lock_wait_timeout: Option<Duration>,
}

/// The time limits of a backup, from the configuration; [`JobLimits::apply`] puts them on a
/// backup's options.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct JobLimits {
    pub deadline: Option<Duration>,
    pub lock_wait_timeout: Option<Duration>,
}

impl JobLimits {
    pub fn apply(&self, opts: &mut BackupOptions) {
        opts.deadline = opts.deadline.or(self.deadline);
        opts.lock_wait_timeout = opts.lock_wait_timeout.or(self.lock_wait_timeout);
    }
}

/// What the source reported about a finished backup.
#[derive(Debug, Clone)]
pub enum SourceReport {
    Logical(DumpReport),
    Physical(BaseBackupReport),
    Command(CommandReport),
    Redis(RedisReport),
    Files(backstop_sources::files::FilesReport),
    Git(backstop_sources::git::GitReport),
    Config(crate::config_backup::ConfigReport),
}

/// A finished backup: its completion event and the source's report.
#[derive(Debug, Clone)]
pub struct BackupDone {
    pub completed: BackupCompleted,
    pub report: SourceReport,
}

/// Takes one backup of `request.source` by `request.method` and records it (see the module docs).
/// `backup.requested` is the caller's: the CLI appends it, or it is the event being handled.
pub async fn run_backup(
    dp: &DataPath,
    request: &BackupRequested,
    requested_at: DateTime<Utc>,
    actor: &Actor,
    cause: Option<&Envelope>,
    opts: &BackupOptions,
) -> Result<BackupDone, OpsError> {
    // A request that cannot run at all is still recorded: no backup is left "requested".
    let spec = match dp.source(&request.source) {
        Ok(s) => s,
        Err(e) => {
            record_failure(dp, request, requested_at, actor, cause, &e).await?;
            return Err(e);
        }
    };
    // The method this source's kind takes for the request (a schedule asks for the default).
    let method = match spec.kind.method_for(request.method) {
        Ok(m) => m,
        Err(why) => {
            let e = OpsError::Invalid(why);
            record_failure(dp, request, requested_at, actor, cause, &e).await?;
            return Err(e);
        }
    };
    let stream = streams::backup(request.backup_id);
    let appender = dp.appender.as_ref();
    let repo = dp.repo.with_access(
        actor.to_string(),
        format!(
            "{} backup {} of {}",
            method, request.backup_id, request.source
        ),
    );
    let listed = match repo.list_backups().await {
        Ok(l) => l,
        Err(e) => {
            let e = OpsError::from(e);
            if opts.failures == FailureRecording::Always || !e.is_transient() {
                record_failure(dp, request, requested_at, actor, cause, &e).await?;
            }
            return Err(e);
        }
    };
    let manifests: Vec<Manifest> = listed.into_iter().filter_map(|l| l.manifest.ok()).collect();
    // Each step's event, with its id derived from the backup, the step and the request time.
    let step = |label: &'static str, event: Event| {
        record(
            appender,
            &stream,
            actor,
            cause,
            requested_at,
            label,
            request.backup_id,
            event,
        )
    };
    let parent = catalog::choose_parent(&manifests, &request.source, method, request.kind);
    step(
        "started",
        Event::BackupStarted(BackupStarted {
            backup_id: request.backup_id,
            source: request.source.clone(),
            kind: request.kind,
            parent,
            method,
            host: hostname(),
        }),
    )
    .await?;
    let started = Instant::now();
    // The lease: renewed beside the work, so a process killed mid-backup is recorded as
    // abandoned by serve's lease monitor instead of staying "started" forever (crate::lease).
    let heartbeat = Heartbeat::new(appender, LeasedJob::Backup, request.backup_id, actor, cause);
    let work = take(&repo, spec, method, request, parent, actor, opts);
    let bounded = async {
        match opts.deadline {
            // Dropping the work at the deadline kills its children (kill_on_drop) and uploads
            // no manifest: what it uploaded is unreferenced and left to the prune.
            Some(limit) => tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
                Err(OpsError::DeadlineExceeded {
                    what: format!("backup {} of `{}`", request.backup_id, request.source),
                    limit_secs: limit.as_secs(),
                })
            }),
            None => work.await,
        }
    };
    let taken = heartbeat.beside(bounded).await;
    let (result, report) = match taken {
        Ok(done) => done,
        Err(e) => {
            if opts.failures == FailureRecording::UnlessTransient && e.is_transient() {
                tracing::warn!(backup = %request.backup_id, source = %request.source, error = %e.chain(), "backup interrupted by a transient failure; it will be retried");
                return Err(e);
            }
            record_failure(dp, request, requested_at, actor, cause, &e).await?;
            return Err(e);
        }
    };
    step(
        "upload-verified",
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
        method,
        manifest: result.manifest_key.clone(),
        manifest_sha3: result.manifest_sha3.to_hex(),
        raw_bytes: result.raw_bytes,
        stored_bytes: result.stored_bytes,
        new_bytes: result.new_bytes,
        chunks: result.chunks,
        new_chunks: result.new_chunks,
        duration_ms: started.elapsed().as_millis() as u64,
        attempt: request.attempt,
        tables: match &report {
            SourceReport::Logical(r) => table_rows(r),
            SourceReport::Physical(_)
            | SourceReport::Command(_)
            | SourceReport::Redis(_)
            | SourceReport::Files(_)
            | SourceReport::Git(_)
            | SourceReport::Config(_) => Vec::new(),
        },
    };
    step("completed", Event::BackupCompleted(completed.clone())).await?;
    Ok(BackupDone { completed, report })
}

/// Records `backup.failed` for `request` with the error's whole chain as the reason.
pub async fn record_failure(
    dp: &DataPath,
    request: &BackupRequested,
    requested_at: DateTime<Utc>,
    actor: &Actor,
    cause: Option<&Envelope>,
    error: &OpsError,
) -> Result<(), OpsError> {
    record_failure_to(
        dp.appender.as_ref(),
        request,
        requested_at,
        actor,
        cause,
        error,
    )
    .await
}

/// [`record_failure`] through any appender: what the lease monitor records for an abandoned
/// backup, with the same event id as the failure the backup's own process would have recorded.
pub async fn record_failure_to(
    appender: &dyn Appender,
    request: &BackupRequested,
    requested_at: DateTime<Utc>,
    actor: &Actor,
    cause: Option<&Envelope>,
    error: &OpsError,
) -> Result<(), OpsError> {
    let reason = error.chain();
    tracing::error!(backup = %request.backup_id, source = %request.source, class = error.class().as_str(), %reason, "backup failed");
    match record(
        appender,
        &streams::backup(request.backup_id),
        actor,
        cause,
        requested_at,
        "failed",
        request.backup_id,
        Event::BackupFailed(BackupFailed {
            backup_id: request.backup_id,
            source: request.source.clone(),
            reason,
            attempt: request.attempt,
        }),
    )
    .await
    {
        Ok(()) => Ok(()),
        // The failure's id is taken: the lease monitor recorded this run as abandoned while it
        // was only slow (or another process recorded the same failure). The backup is failed
        // either way; its reason is the first one recorded.
        Err(e) if e.is_id_reused() => {
            tracing::info!(backup = %request.backup_id, "the failure was already recorded (abandoned by the lease monitor?)");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn table_rows(report: &DumpReport) -> Vec<TableRows> {
    report
        .tables
        .iter()
        .filter(|t| t.part.is_some())
        .map(|t| TableRows {
            schema: t.table.schema.clone(),
            table: t.table.name.clone(),
            rows: t.rows,
        })
        .collect()
}

/// The data path proper: the source's parts through the writer, then the manifest.
async fn take(
    repo: &Repository,
    spec: &SourceSpec,
    method: BackupMethod,
    request: &BackupRequested,
    parent: Option<Uuid>,
    actor: &Actor,
    opts: &BackupOptions,
) -> Result<(BackupResult, SourceReport), OpsError> {
    let meta = BackupMeta {
        backup_id: request.backup_id,
        kind: request.kind,
        parent,
        source: request.source.clone(),
        // Files have a data key of their own (DESIGN "Keys"), and so does source code (a git
        // bundle is the application's files); everything else is database data.
        purpose: match spec.kind {
            SourceKind::Files(_) | SourceKind::Git(_) => KeyPurpose::Files,
            // Configuration holds secrets: its key opens nothing else, and nothing else opens it.
            SourceKind::Config(_) => KeyPurpose::Config,
            _ => KeyPurpose::Database,
        },
        actor: actor.to_string(),
    };
    let writer = Arc::new(
        repo.start_backup_with(meta, opts.writer.clone().unwrap_or_default())
            .await?,
    );
    let ticker = opts.progress.clone().map(|f| {
        let w = writer.clone();
        AbortOnDrop(Some(tokio::spawn(async move {
            loop {
                f(w.progress());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })))
    });
    let sink = Arc::new(WriterSink {
        writer: writer.clone(),
        limit: opts.bytes_per_second.map(RateLimit::new),
    });
    let report = match (&spec.kind, method) {
        (SourceKind::Postgres(pg), BackupMethod::Logical) => {
            let options = DumpOptions {
                jobs: opts.jobs.unwrap_or(pg.jobs).max(1),
                lock_wait_timeout: opts.lock_wait_timeout,
                ..Default::default()
            };
            logical::dump(&pg.conninfo, &options, sink.clone())
                .await
                .map(SourceReport::Logical)
                .map_err(OpsError::from)
        }
        (SourceKind::Postgres(pg), BackupMethod::Physical) => {
            let options = BaseBackupOptions {
                fast_checkpoint: !opts.spread_checkpoint,
                label: format!("backstop {}", request.backup_id),
                max_rate: opts
                    .max_rate
                    .clone()
                    .or(opts.bytes_per_second.map(max_rate_arg)),
                ..BaseBackupOptions::default()
            };
            physical::base_backup(&pg.conninfo, sink.as_ref(), &options)
                .await
                .map(SourceReport::Physical)
                .map_err(OpsError::from)
        }
        (SourceKind::Command(c), _) => command::backup(c, sink.as_ref())
            .await
            .map(SourceReport::Command)
            .map_err(OpsError::from),
        (SourceKind::Redis(r), _) => redis::snapshot(r, sink.as_ref())
            .await
            .map(SourceReport::Redis)
            .map_err(OpsError::from),
        (SourceKind::Files(f), _) => {
            backstop_sources::files::backup(f, sink.as_ref(), opts.jobs.unwrap_or(4))
                .await
                .map(SourceReport::Files)
                .map_err(OpsError::from)
        }
        (SourceKind::Git(g), _) => backstop_sources::git::backup(g, sink.as_ref())
            .await
            .map(SourceReport::Git)
            .map_err(OpsError::from),
        (SourceKind::Config(c), _) => crate::config_backup::backup(repo, c, sink.as_ref(), actor)
            .await
            .map(SourceReport::Config),
        (SourceKind::Postgres(_), other) => Err(OpsError::Invalid(format!(
            "a {other} backup was asked of the PostgreSQL source `{}`",
            spec.name
        ))),
    };
    if let Some(mut t) = ticker
        && let Some(t) = t.0.take()
    {
        t.abort();
        // The ticker holds a handle on the writer: wait until it is gone.
        let _ = t.await;
    }
    drop(sink);
    let report = report?;
    let writer = Arc::try_unwrap(writer).map_err(|_| OpsError::Abandoned {
        what: format!("backup {}", request.backup_id),
        why: "internal error: the backup writer is still shared after the source finished".into(),
    })?;
    let mut extra = match &report {
        SourceReport::Logical(r) => serde_json::json!({ LOGICAL_KEY: r }),
        SourceReport::Physical(r) => serde_json::json!({ PHYSICAL_KEY: r }),
        SourceReport::Command(r) => serde_json::json!({ COMMAND_KEY: r }),
        SourceReport::Redis(r) => serde_json::json!({ REDIS_KEY: r }),
        SourceReport::Files(r) => serde_json::json!({ crate::catalog::FILES_KEY: r }),
        SourceReport::Git(r) => serde_json::json!({ crate::catalog::GIT_KEY: r }),
        SourceReport::Config(r) => serde_json::json!({ crate::catalog::CONFIG_KEY: r }),
    };
    if !opts.tags.is_empty() {
        extra[crate::forget::TAGS_KEY] = serde_json::json!(opts.tags);
    }
    if let Some(set) = &opts.set {
        extra[crate::sets::SET_KEY] = serde_json::json!(set);
    }
    let result = writer.finish(extra).await?;
    Ok((result, report))
}

/// Aborts the progress ticker if the backup is dropped (at its deadline) before it ends.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

/// Records `backup.completed` for a backup whose manifest is in the repository, from the
/// manifest itself: a redelivered request whose backup finished (the completion may or may not
/// have been recorded before the process died) records it once and takes nothing again.
pub async fn complete_from_manifest(
    dp: &DataPath,
    request: &BackupRequested,
    manifest: &Manifest,
    actor: &Actor,
    cause: &Envelope,
) -> Result<(), OpsError> {
    let key = backstop_repo::manifest_key(&manifest.backup_id);
    let sealed = dp.repo.backend().get(&key).await?;
    let sha3 = hex::encode(<sha3::Sha3_256 as sha3::Digest>::digest(&sealed));
    let tables = match catalog::method_of(manifest) {
        BackupMethod::Logical => catalog::dump_report(manifest)
            .map(|r| table_rows(&r))
            .unwrap_or_default(),
        BackupMethod::Physical
        | BackupMethod::Command
        | BackupMethod::Redis
        | BackupMethod::Files
        | BackupMethod::Git
        | BackupMethod::Config => Vec::new(),
    };
    let completed = BackupCompleted {
        backup_id: manifest.backup_id,
        source: manifest.source.clone(),
        kind: manifest.kind,
        parent: manifest.parent,
        method: catalog::method_of(manifest),
        manifest: key,
        manifest_sha3: sha3,
        raw_bytes: manifest.totals.raw_bytes,
        stored_bytes: manifest.totals.stored_bytes,
        new_bytes: manifest.totals.new_bytes,
        chunks: manifest.totals.chunks,
        new_chunks: manifest.totals.new_chunks,
        duration_ms: manifest.duration().num_milliseconds().max(0) as u64,
        attempt: request.attempt,
        tables,
    };
    match record(
        dp.appender.as_ref(),
        &streams::backup(manifest.backup_id),
        actor,
        Some(cause),
        cause.occurred_at,
        "completed",
        manifest.backup_id,
        Event::BackupCompleted(completed),
    )
    .await
    {
        Ok(()) => Ok(()),
        // The run that wrote this manifest recorded its completion before it died: the ledger
        // refuses this copy because its duration is the manifest's, not the run's measure. The
        // completion stands; a taken id can only hide a completion, never fake one.
        Err(e) if e.is_id_reused() => {
            tracing::info!(backup = %manifest.backup_id, error = %e, "the completion was recorded by the run that wrote the manifest");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
