//! Restores and test restores of files backups (`[[sources]] kind = "files"`): the tree in the
//! manifest ([`catalog::files_report`]) written under a directory by
//! [`backstop_sources::files::write`], each file's bytes read from its stream in the repository.
//!
//! Invariants (besides the writer's: no write outside the target, no overwrite, each file
//! renamed into place only once its size and SHA3-256 match the tree):
//! - A restore is a recovery like any other: `recovery.requested`/`started`, then
//!   `recovery.completed` with the bytes written, or `recovery.failed` with the reason.
//! - A dry run checks the selection against the tree and the target, and that every object the
//!   selected files need is in the repository; it writes and records nothing.
//! - The test restore (the verify worker's) writes the whole tree into a temporary directory,
//!   which is removed afterwards whatever happened.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use backstop_events::{Actor, LeasedJob, TableCheck};
use backstop_repo::{Manifest, Repository};
use backstop_sources::files::{self, EntryKind, FromParts, RestorePlan};
use serde::Serialize;

use crate::catalog;
use crate::context::DataPath;
use crate::error::OpsError;
use crate::lease::Heartbeat;
use crate::parts::ManifestSource;
use crate::restore::Recovery;
use crate::verify::Verified;

/// What to restore from a files backup, and where.
#[derive(Clone, Debug)]
pub struct FilesRestore {
    pub to_dir: PathBuf,
    /// Path prefixes to restore (as the tree stores them: `srv/app/models`); empty: all.
    pub paths: Vec<String>,
    pub dry_run: bool,
}

/// What a files restore did (or, dry, would do).
#[derive(Clone, Debug, Serialize)]
pub struct FilesRestored {
    pub backup_id: uuid::Uuid,
    pub to_dir: PathBuf,
    pub dry_run: bool,
    #[serde(flatten)]
    pub plan: RestorePlan,
}

/// Restores `manifest`'s selected paths under `req.to_dir` in the foreground, recorded as a
/// recovery (see the module docs).
pub async fn restore_files(
    dp: &DataPath,
    manifest: Manifest,
    recovery: &Recovery,
    req: &FilesRestore,
) -> Result<FilesRestored, OpsError> {
    let backup_id = manifest.backup_id;
    let report = catalog::files_report(&manifest)?;
    let selected = files::select(&report.entries, &req.paths)?;
    let plan = files::plan(&selected, &req.to_dir)?;
    if req.dry_run {
        let streams: Vec<String> = selected
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| e.stream_name())
            .collect();
        let check = dp.repo.dry_run_restore(&manifest, Some(&streams)).await?;
        if let Some(m) = check.missing.first() {
            return Err(OpsError::Invalid(format!(
                "backup {backup_id} cannot be restored: object {} is missing ({} objects missing in all); `backstop check --read-data` says more",
                m.key,
                check.missing.len()
            )));
        }
        return Ok(FilesRestored {
            backup_id,
            to_dir: req.to_dir.clone(),
            dry_run: true,
            plan,
        });
    }
    recovery.begin(dp.appender.as_ref(), backup_id).await?;
    let started = Instant::now();
    let repo = dp.repo.with_access(
        recovery.actor.to_string(),
        format!(
            "restore of files backup {backup_id} requested by {}",
            recovery.operator
        ),
    );
    let source = ManifestSource {
        repo,
        manifest: Arc::new(manifest),
    };
    let work = async {
        files::write(&selected, &req.to_dir, &FromParts(&source))
            .await
            .map_err(OpsError::from)
    };
    let heartbeat = Heartbeat::new(
        dp.appender.as_ref(),
        LeasedJob::Recovery,
        recovery.recovery_id,
        &recovery.actor,
        None,
    );
    let outcome = heartbeat.beside(work).await;
    let figures = outcome
        .as_ref()
        .map(|p| (started.elapsed().as_millis() as u64, p.bytes, Vec::new()));
    recovery
        .end(dp.appender.as_ref(), backup_id, None, figures)
        .await?;
    let plan = outcome?;
    Ok(FilesRestored {
        backup_id,
        to_dir: req.to_dir.clone(),
        dry_run: false,
        plan,
    })
}

/// The verify worker's test restore of a files backup: the whole tree into a temporary
/// directory under `work_dir` (or the system's), every file checked, then removed.
pub async fn test_restore_files(
    repo: &Repository,
    manifest: Manifest,
    work_dir: Option<&Path>,
    actor: &Actor,
) -> Result<Verified, OpsError> {
    let objects = manifest.distinct_chunks().len() as u64 + 1;
    let bytes = manifest.totals.stored_bytes;
    let report = catalog::files_report(&manifest)?;
    let scratch = match work_dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .map_err(|e| OpsError::io("creating the files test restore's directory", e))?;
    let repo = repo.with_access(
        actor.to_string(),
        format!("test restore of backup {}", manifest.backup_id),
    );
    let source = ManifestSource {
        repo,
        manifest: Arc::new(manifest),
    };
    let started = Instant::now();
    let all: Vec<&files::TreeEntry> = report.entries.iter().collect();
    let plan = files::write(&all, scratch.path(), &FromParts(&source)).await?;
    let restore_ms = started.elapsed().as_millis() as u64;
    let secs = (restore_ms as f64 / 1000.0).max(0.001);
    Ok(Verified {
        // Each kind of entry as a "table": the counts in the tree against what was written.
        tables: vec![
            TableCheck {
                schema: "files".into(),
                table: "files".into(),
                expected: report.files,
                restored: plan.files,
            },
            TableCheck {
                schema: "files".into(),
                table: "bytes".into(),
                expected: report.bytes,
                restored: plan.bytes,
            },
        ],
        objects,
        bytes,
        restore_ms,
        bytes_per_sec: plan.bytes as f64 / secs,
        physical: None,
    })
}
