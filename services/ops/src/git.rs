//! The git sync use case (R3): a git source mirrored to its second remote, the hashes compared
//! on both sides ([`backstop_sources::git::mirror`]), the outcome recorded, and a bundle of the
//! repository backed up through the ordinary data path when its refs changed since the last
//! one. `backstop git sync NAME` runs it by hand; `backstop serve` polls each git source every
//! `poll_seconds` ([`poll`]).
//!
//! Events, on the stream `git-<source>`, one per sync, with ids derived from the sync id:
//! `git.mirrored` (every ref equal on both sides), `git.diverged` (refs left different: the
//! alert `git_mirror_diverged`), `git.mirror_failed` (the sync could not finish: the alert
//! `git_mirror_failed`). The bundle is a backup of method `git` with the usual
//! `backup.requested` .. `backup.completed` events (trigger `foreground`: it runs in the
//! process that synced, and workers leave it alone).
//!
//! Invariants:
//! - A diverged ref on the mirror is never overwritten unless the source says `force = true`,
//!   and a forced overwrite is listed in `git.mirrored`'s `forced`.
//! - A bundle is taken when the source's refs (their digest) differ from those of the newest
//!   bundle this data directory took (`backstop-bundled.json` in the working mirror), so a
//!   poll of an unchanged repository writes no backup and decrypts no manifest.
//! - The bundle is taken even when the mirror is unreachable or diverged: it is the second copy
//!   then.

use std::time::{Duration, Instant};

use backstop_events::{
    Actor, BackupKind, BackupMethod, BackupRequested, Event, GitDiverged, GitMirrorFailed,
    GitMirrored, GitRefChange, GitRefDivergence, Trigger, streams, uuid_v7,
};
use backstop_sources::git::{self, BundleNote, GitSource, MirrorReport, RefChange, RefDivergence};
use chrono::Utc;
use serde::Serialize;
use uuid::Uuid;

use crate::backup::{BackupDone, BackupOptions, run_backup};
use crate::context::{DataPath, SourceKind};
use crate::error::OpsError;
use crate::record::{record, uuid_time};
use crate::schedule::Clock;

/// Refs listed in an event at most (the totals count them all).
const LISTED: usize = 100;

/// What happened to the bundle in a sync.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "bundle", rename_all = "snake_case")]
pub enum BundleOutcome {
    /// A new backup of method `git`.
    Taken { backup_id: Uuid, raw_bytes: u64 },
    /// The refs are those of this earlier bundle: nothing taken.
    Unchanged { backup_id: String },
    /// The bundle's backup failed (recorded as `backup.failed`).
    Failed { reason: String },
}

/// What one sync did.
#[derive(Debug, Clone, Serialize)]
pub struct SyncOutcome {
    pub sync_id: Uuid,
    pub source: String,
    /// The mirror's URL (redacted), when one is configured.
    pub mirror: Option<String>,
    /// The mirror's report, when the sync got that far.
    pub report: Option<MirrorReport>,
    /// Why the mirror sync failed, when it did.
    pub failed: Option<String>,
    #[serde(flatten)]
    pub bundle: BundleOutcome,
}

impl SyncOutcome {
    /// The mirror (if any) equals the source and the bundle is in the repository.
    pub fn ok(&self) -> bool {
        self.failed.is_none()
            && self.report.as_ref().is_none_or(|r| r.in_sync())
            && !matches!(self.bundle, BundleOutcome::Failed { .. })
    }
}

/// The git side of a configured source.
pub fn git_source<'a>(dp: &'a DataPath, name: &str) -> Result<&'a GitSource, OpsError> {
    let spec = dp.source(name)?;
    match &spec.kind {
        SourceKind::Git(g) => Ok(g),
        other => Err(OpsError::Invalid(format!(
            "source `{name}` is a {} source, not a git repository (kind = \"git\")",
            other.name()
        ))),
    }
}

fn changes(list: &[RefChange]) -> Vec<GitRefChange> {
    list.iter()
        .take(LISTED)
        .map(|c| GitRefChange {
            name: c.name.clone(),
            from: c.from.clone(),
            to: c.to.clone(),
        })
        .collect()
}

fn divergences(list: &[RefDivergence]) -> Vec<GitRefDivergence> {
    list.iter()
        .take(LISTED)
        .map(|d| GitRefDivergence {
            name: d.name.clone(),
            source: d.source.clone(),
            mirror: d.mirror.clone(),
            why: d.why.clone(),
        })
        .collect()
}

/// One sync of the git source `name` (see the module docs).
pub async fn sync(
    dp: &DataPath,
    name: &str,
    actor: &Actor,
    opts: &BackupOptions,
) -> Result<SyncOutcome, OpsError> {
    let src = git_source(dp, name)?.clone();
    let sync_id = uuid_v7();
    let at = uuid_time(sync_id);
    let stream = streams::git(name);
    let started = Instant::now();
    let mirror_shown = src.mirror.as_deref().map(git::redact_url);
    let mut report = None;
    let mut failed = None;
    if let (Some(url), Some(shown)) = (&src.mirror, &mirror_shown) {
        let outcome = git::mirror(&src, url).await.map_err(OpsError::from);
        let duration_ms = started.elapsed().as_millis() as u64;
        let event = match &outcome {
            Ok(r) if r.in_sync() => Event::GitMirrored(GitMirrored {
                sync_id,
                source: name.to_string(),
                mirror: shown.clone(),
                refs: r.refs.len() as u64,
                head_ref: r.head_ref.clone(),
                head: r.head.clone(),
                refs_sha3: r.refs_sha3.clone(),
                updated: changes(&r.updated),
                updated_total: r.updated.len() as u64,
                forced: divergences(&r.forced),
                duration_ms,
            }),
            Ok(r) => Event::GitDiverged(GitDiverged {
                sync_id,
                source: name.to_string(),
                mirror: shown.clone(),
                refs: r.refs.len() as u64,
                head_ref: r.head_ref.clone(),
                head: r.head.clone(),
                refs_sha3: r.refs_sha3.clone(),
                updated: changes(&r.updated),
                updated_total: r.updated.len() as u64,
                diverged: divergences(&r.diverged),
                duration_ms,
            }),
            Err(e) => Event::GitMirrorFailed(GitMirrorFailed {
                sync_id,
                source: name.to_string(),
                mirror: shown.clone(),
                reason: e.chain(),
                transient: e.is_transient(),
            }),
        };
        let label = match &event {
            Event::GitMirrored(_) => "mirrored",
            Event::GitDiverged(_) => "diverged",
            _ => "mirror-failed",
        };
        record(
            dp.appender.as_ref(),
            &stream,
            actor,
            None,
            at,
            label,
            sync_id,
            event,
        )
        .await?;
        match outcome {
            Ok(r) => {
                if !r.in_sync() {
                    tracing::error!(
                        source = name,
                        diverged = r.diverged.len(),
                        "git mirror diverged; the diverged refs were left alone"
                    );
                }
                report = Some(r);
            }
            Err(e) => {
                tracing::error!(source = name, error = %e.chain(), "git mirror sync failed");
                failed = Some(e.chain());
            }
        }
    }
    let bundle = bundle(dp, name, &src, report.as_ref(), actor, opts).await?;
    Ok(SyncOutcome {
        sync_id,
        source: name.to_string(),
        mirror: mirror_shown,
        report,
        failed,
        bundle,
    })
}

/// Backs up a bundle of `src` unless its refs are those of the newest bundle.
async fn bundle(
    dp: &DataPath,
    name: &str,
    src: &GitSource,
    mirrored: Option<&MirrorReport>,
    actor: &Actor,
    opts: &BackupOptions,
) -> Result<BundleOutcome, OpsError> {
    let refs_sha3 = match mirrored {
        Some(r) => Some(r.refs_sha3.clone()),
        // No mirror (or it failed): ask the source; if that fails too, the backup says why.
        None => git::current_refs(src)
            .await
            .ok()
            .map(|refs| git::refs_sha3(&refs)),
    };
    if let (Some(last), Some(now)) = (git::last_bundle(&src.work_dir), &refs_sha3)
        && &last.refs_sha3 == now
    {
        return Ok(BundleOutcome::Unchanged {
            backup_id: last.backup_id,
        });
    }
    let request = BackupRequested {
        backup_id: uuid_v7(),
        source: name.to_string(),
        kind: BackupKind::Full,
        method: BackupMethod::Git,
        trigger: Trigger::Foreground {
            host: crate::context::hostname(),
        },
        attempt: 1,
    };
    let requested_at = Utc::now();
    record(
        dp.appender.as_ref(),
        &streams::backup(request.backup_id),
        actor,
        None,
        requested_at,
        "requested",
        request.backup_id,
        Event::BackupRequested(request.clone()),
    )
    .await?;
    match run_backup(dp, &request, requested_at, actor, None, opts).await {
        Ok(BackupDone { completed, report }) => {
            if let crate::backup::SourceReport::Git(r) = &report {
                let note = BundleNote {
                    backup_id: completed.backup_id.to_string(),
                    refs_sha3: r.refs_sha3.clone(),
                };
                // Only an optimisation: without the note the next sync bundles again.
                if let Err(e) = git::note_bundle(&src.work_dir, &note) {
                    tracing::warn!(source = name, error = %e, "could not note the bundle taken; the next sync takes another");
                }
            }
            Ok(BundleOutcome::Taken {
                backup_id: completed.backup_id,
                raw_bytes: completed.raw_bytes,
            })
        }
        // Recorded as backup.failed by run_backup; the ledger's trouble is the caller's.
        Err(OpsError::Ledger(e)) => Err(OpsError::Ledger(e)),
        Err(e) => Ok(BundleOutcome::Failed { reason: e.chain() }),
    }
}

/// Polls every git source in `dp` every `poll` of its own (`(name, seconds)` pairs) on the
/// injected clock, until `stop` turns true. The first sync of each runs at once. A failed
/// sync is recorded by [`sync`] and the poll goes on.
pub async fn poll(
    dp: DataPath,
    sources: Vec<(String, Duration)>,
    clock: std::sync::Arc<dyn Clock>,
    actor: Actor,
    opts: BackupOptions,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), backstop_ledger::LedgerError> {
    if sources.is_empty() {
        return Ok(());
    }
    let mut due: Vec<chrono::DateTime<Utc>> = vec![clock.now(); sources.len()];
    loop {
        let now = clock.now();
        for (i, (name, every)) in sources.iter().enumerate() {
            if due[i] > now {
                continue;
            }
            match sync(&dp, name, &actor, &opts).await {
                Ok(o) if o.ok() => tracing::debug!(source = %name, "git sync done"),
                Ok(o) => {
                    tracing::warn!(source = %name, failed = ?o.failed, "git sync ended with a divergence or failure (recorded)")
                }
                // The ledger refusing is the process's trouble, not this source's: stop.
                Err(OpsError::Ledger(e)) => return Err(e),
                Err(e) => tracing::error!(source = %name, error = %e.chain(), "git sync failed"),
            }
            let step = chrono::Duration::from_std(*every).unwrap_or(chrono::Duration::seconds(60));
            due[i] = now + step;
        }
        let next = due.iter().min().copied().unwrap_or(now);
        tokio::select! {
            _ = clock.sleep_until(next) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return Ok(());
        }
    }
}
