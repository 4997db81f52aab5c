//! Table exports in the ledger: each export is requested, then completed or failed, and deleted
//! once older than the retention. The data and its objects are [`crate::export`]'s; this module
//! records what happened to them, on the stream `export-<export id>`:
//!
//! ```text
//! export.requested -> export.completed    (the index is stored: the export exists)
//!                  \-> export.failed      (with the reason; nothing is left that `list` shows)
//! export.completed ... export.deleted     (past `[[retention]] class = "exports"`: 90 days)
//! ```
//!
//! Invariants:
//! - Event ids derive from the export id, the step and the request's time ([`crate::record`]):
//!   a redelivered request, or two workers running the same one, append each event once.
//! - An export whose index already exists is not run again: its completion is (re)recorded from
//!   the index, so a worker that stopped between storing the index and recording the event
//!   finishes the record, and never overwrites an export.
//! - `export.deleted` is appended *before* the index and the pieces are deleted. A pass cut short
//!   leaves an export that is still listed, and the next pass deletes it again and appends the
//!   same event (same id), so the ledger never lacks a deletion that happened. The index goes
//!   first: an export without an index does not exist, whatever pieces remain.
//! - Pieces without an index (a failed export whose clean-up failed, a deletion cut short) are
//!   removed once their export id (a UUIDv7) is older than [`ORPHAN_GRACE`], which no export in
//!   progress can be.

use backstop_events::{
    Actor, Envelope, Event, ExportCompleted, ExportDeleted, ExportFailed, ExportRequested, streams,
};
use backstop_ledger::Appender;
use backstop_repo::Repository;
use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::context::SourceSpec;
use crate::error::OpsError;
use crate::export::{EXPORTS_PREFIX, ExportIndex, index_key, load_index, run_export};
use crate::record::{record, uuid_time};
use crate::retention::{Class, RetentionConfig};

/// How old an export id must be before pieces without an index are removed: far longer than
/// any export runs.
pub const ORPHAN_GRACE: TimeDelta = TimeDelta::days(1);

/// Whether [`run_requested`] records a transient failure as `export.failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFailures {
    /// Every failure is recorded (a foreground export: the operator sees it end).
    RecordAll,
    /// A transient failure is returned unrecorded, for the worker to retry the same request.
    RetryTransient,
}

/// Runs the export `request` asks for (requested at `requested_at`, the time its event ids
/// derive from) and records its outcome. Returns the stored index.
#[allow(clippy::too_many_arguments)] // the same shape as `run_backup`'s request and recording
pub async fn run_requested(
    repo: &Repository,
    appender: &dyn Appender,
    source: &SourceSpec,
    request: &ExportRequested,
    requested_at: DateTime<Utc>,
    cause: Option<&Envelope>,
    actor: &Actor,
    failures: ExportFailures,
) -> Result<ExportIndex, OpsError> {
    let id = request.export_id;
    let stream = streams::export(id);
    if repo.backend().head(&index_key(&id)).await?.is_some() {
        let index = load_index(repo, id).await?;
        record_completed(appender, &stream, actor, cause, requested_at, &index).await?;
        tracing::info!(export = %id, "export already stored; its completion is recorded");
        return Ok(index);
    }
    let tables = (!request.tables.is_empty()).then(|| request.tables.clone());
    match run_export(repo, source, id, tables, &actor.to_string()).await {
        Ok(index) => {
            record_completed(appender, &stream, actor, cause, requested_at, &index).await?;
            Ok(index)
        }
        Err(e) if e.is_transient() && failures == ExportFailures::RetryTransient => Err(e),
        Err(e) => {
            record_failure(appender, request, requested_at, cause, actor, &e.chain()).await?;
            Err(e)
        }
    }
}

/// Records `export.failed` for `request` (also the worker's, when it gives up retrying).
pub async fn record_failure(
    appender: &dyn Appender,
    request: &ExportRequested,
    requested_at: DateTime<Utc>,
    cause: Option<&Envelope>,
    actor: &Actor,
    reason: &str,
) -> Result<(), OpsError> {
    let failed = Event::ExportFailed(ExportFailed {
        export_id: request.export_id,
        source: request.source.clone(),
        reason: reason.to_string(),
    });
    record(
        appender,
        &streams::export(request.export_id),
        actor,
        cause,
        requested_at,
        "export.failed",
        request.export_id,
        failed,
    )
    .await?;
    Ok(())
}

async fn record_completed(
    appender: &dyn Appender,
    stream: &str,
    actor: &Actor,
    cause: Option<&Envelope>,
    requested_at: DateTime<Utc>,
    index: &ExportIndex,
) -> Result<(), OpsError> {
    let duration = (index.finished_at - index.started_at)
        .num_milliseconds()
        .max(0) as u64;
    let done = Event::ExportCompleted(ExportCompleted {
        export_id: index.export_id,
        source: index.source.clone(),
        tables: index.tables.len() as u64,
        rows: index.rows(),
        sealed_bytes: index.sealed_bytes(),
        duration_ms: duration,
    });
    record(
        appender,
        stream,
        actor,
        cause,
        requested_at,
        "export.completed",
        index.export_id,
        done,
    )
    .await?;
    Ok(())
}

/// What one retention pass over the exports did (or, dry, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExpiryReport {
    /// Exports past the retention: deleted (or to delete).
    pub deleted: Vec<ExpiredExport>,
    /// Exports kept.
    pub kept: usize,
    /// Exports whose index could not be read: left alone, with the reason (a damaged index
    /// is for an operator to look at, never a reason to delete).
    pub unreadable: Vec<(Uuid, String)>,
    /// Objects removed that belonged to no export (no index, id older than [`ORPHAN_GRACE`]).
    pub orphan_objects: usize,
    /// Objects that could not be deleted this pass (the next pass tries again).
    pub delete_failures: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExpiredExport {
    pub export_id: Uuid,
    pub source: String,
    pub finished_at: DateTime<Utc>,
}

/// Deletes every export its source's `exports` retention policy no longer keeps, recording each
/// as `export.deleted`, and removes orphaned pieces. With `dry_run` nothing is recorded or
/// deleted.
///
/// The policy is `[[retention]] class = "exports"` ([`Class::Exports`]): an export is kept while
/// younger than `keep_within` (90 days by default; measured from its finish) or while among its
/// source's newest `keep_last` exports. Its other rules (daily, weekly...) govern backups only.
pub async fn expire(
    repo: &Repository,
    appender: &dyn Appender,
    retention: &RetentionConfig,
    now: DateTime<Utc>,
    actor: &Actor,
    dry_run: bool,
) -> Result<ExpiryReport, OpsError> {
    let objects = repo.backend().list(EXPORTS_PREFIX).await?;
    // Every export id under exports/ (UUIDv7: sorted oldest first), its index and its pieces.
    let mut by_id: BTreeMap<Uuid, (bool, Vec<String>)> = BTreeMap::new();
    for o in objects {
        let Some(rest) = o.key.strip_prefix(EXPORTS_PREFIX) else {
            continue;
        };
        let Some(id) = rest.split('/').next().and_then(|s| s.parse::<Uuid>().ok()) else {
            continue;
        };
        let entry = by_id.entry(id).or_default();
        if rest.ends_with("/index") {
            entry.0 = true;
        } else {
            entry.1.push(o.key);
        }
    }
    let mut report = ExpiryReport::default();
    let mut exports: Vec<(ExportIndex, Vec<String>)> = Vec::new();
    for (id, (has_index, pieces)) in by_id {
        if !has_index {
            if now - uuid_time(id) > ORPHAN_GRACE {
                report.orphan_objects += pieces.len();
                if !dry_run {
                    report.delete_failures += delete_all(repo, &pieces).await;
                }
            }
            continue;
        }
        match load_index(repo, id).await {
            Ok(index) => exports.push((index, pieces)),
            Err(e) => {
                tracing::warn!(export = %id, error = %e.chain(), "export index unreadable; the export is kept");
                report.unreadable.push((id, e.chain()));
            }
        }
    }
    // Newest first, so that `keep_last` counts each source's newest exports.
    exports.sort_by_key(|(index, _)| std::cmp::Reverse(index.finished_at));
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for (index, pieces) in exports {
        let policy = retention.policy(&index.source, Class::Exports);
        let rank = seen.entry(index.source.clone()).or_default();
        *rank += 1;
        let within = match policy.keep_within {
            Some(d) => now - index.finished_at <= d.as_chrono(),
            // No age limit: kept for ever.
            None => true,
        };
        if within || *rank <= policy.keep_last {
            report.kept += 1;
            continue;
        }
        let id = index.export_id;
        report.deleted.push(ExpiredExport {
            export_id: id,
            source: index.source.clone(),
            finished_at: index.finished_at,
        });
        if dry_run {
            continue;
        }
        let deleted = Event::ExportDeleted(ExportDeleted {
            export_id: id,
            source: index.source.clone(),
            finished_at: index.finished_at,
            reason: format!("past the retention policy {}", policy.name),
        });
        record(
            appender,
            &streams::export(id),
            actor,
            None,
            index.finished_at,
            "export.deleted",
            id,
            deleted,
        )
        .await?;
        // The index alone first: once it is gone the export does not exist, whatever is left.
        if let Err(e) = repo.backend().delete(&index_key(&id)).await {
            tracing::warn!(export = %id, error = %e, "could not delete an expired export's index; the next pass tries again");
            report.delete_failures += 1;
            continue;
        }
        report.delete_failures += delete_all(repo, &pieces).await;
        tracing::info!(export = %id, source = %index.source, finished_at = %index.finished_at, policy = %policy.name, "export deleted (past its retention)");
    }
    Ok(report)
}

/// Deletes `keys` in order; returns how many could not be deleted (logged).
async fn delete_all(repo: &Repository, keys: &[String]) -> usize {
    let mut failed = 0;
    for (key, r) in keys.iter().zip(repo.backend().delete_many(keys).await) {
        if let Err(e) = r {
            tracing::warn!(%key, error = %e, "could not delete an expired export's object; the next pass tries again");
            failed += 1;
        }
    }
    failed
}
