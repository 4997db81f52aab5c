//! Retention without an operator: the retention worker and the daily maintenance job.
//!
//! - [`RetentionWorker`]: after every `backup.completed`, the retention policies of that
//!   backup's source are applied ([`backstop_ops::forget::forget`], a real run): the new backup
//!   may make an older one unneeded. Decisions and deletions are recorded with ids derived from
//!   the backup, the policy and the day, so a redelivered event records nothing twice.
//! - [`run_maintenance`]: once a day at a fixed UTC time, on an injected [`Clock`]: forget for
//!   every source, then the prune ([`backstop_ops::forget::maintain`]), then the lock extension
//!   step ([`LockExtension`]) when the repository has object lock, then the retirement of key
//!   versions nothing is sealed with any more ([`backstop_ops::rotation::retire`], only while
//!   a rotated-out version is not yet retired: its scan reads every object's header), and the
//!   deletion of table exports past their retention
//!   ([`backstop_ops::export_lifecycle::expire`]). A failed
//!   pass is logged and
//!   retried the next day; it never stops the process (retention is never urgent, and a
//!   failure to delete is the safe failure).
//!
//! Both read the ledger's facts (verifications, running backups) through a
//! [`FactsSource`]: without it the guard rails cannot hold, so neither runs without one.

use std::sync::Arc;

use async_trait::async_trait;
use backstop_events::{Actor, Envelope, Event};
use backstop_ledger::Appender;
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ops::forget::{FactsSource, ForgetOptions, MaintenanceReport, PruneRun, forget};
use backstop_ops::retention::RetentionConfig;
use backstop_ops::schedule::Clock;
use backstop_ops::{DataPath, OpsError};
use backstop_repo::{LockTargets, Repository};
use chrono::{DateTime, NaiveTime, TimeDelta, Utc};
use tokio::sync::watch;

use crate::backup::handler_error;

pub const NAME: &str = "retention";

/// What retention needs besides the data path.
#[derive(Clone)]
pub struct RetentionSettings {
    pub config: RetentionConfig,
    pub facts: Arc<dyn FactsSource>,
    pub clock: Arc<dyn Clock>,
}

pub struct RetentionWorker {
    pub data_path: DataPath,
    pub settings: RetentionSettings,
}

#[async_trait]
impl Handler for RetentionWorker {
    fn name(&self) -> &str {
        NAME
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == "backup.completed"
    }

    async fn handle(&self, event: &Envelope, _appender: &dyn Appender) -> Result<(), HandlerError> {
        let Ok(Event::BackupCompleted(done)) = event.event() else {
            return Err(crate::unreadable(event, "backup.completed"));
        };
        let facts = self.settings.facts.facts().await.map_err(handler_error)?;
        let opts = ForgetOptions {
            source: Some(done.source.clone()),
            dry_run: false,
            now: self.settings.clock.now(),
        };
        let report = forget(
            &self.data_path.repo,
            self.data_path.appender.as_ref(),
            &self.settings.config,
            &facts,
            &opts,
            &Actor::worker(NAME),
        )
        .await
        .map_err(handler_error)?;
        tracing::info!(
            source = %done.source,
            after = %done.backup_id,
            removed = report.removed().filter(|d| d.forgotten).count(),
            kept = report.decisions.iter().filter(|d| d.keep).count(),
            "retention applied"
        );
        Ok(())
    }
}

/// The lock-extension step of the daily job, after the prune: extends the object lock of what
/// the kept backups still need (`Repository::extend_locks`). A hook so that the job runs the
/// same with and without object lock: `serve` passes one only for a repository with object
/// lock configured.
#[async_trait]
pub trait LockExtension: Send + Sync {
    /// Returns a one-line summary for the log.
    async fn extend(
        &self,
        repo: &Repository,
        now: DateTime<Utc>,
        pass: &MaintenanceReport,
    ) -> Result<String, OpsError>;
}

/// The lock extension of a repository with object lock: every kept backup (the pass's keep
/// decisions), with `config`, `keys/` and the archived WAL the pass did not hand to the prune,
/// locked until now + the repository's lock period.
pub struct RepositoryLocks;

#[async_trait]
impl LockExtension for RepositoryLocks {
    async fn extend(
        &self,
        repo: &Repository,
        now: DateTime<Utc>,
        pass: &MaintenanceReport,
    ) -> Result<String, OpsError> {
        let Some(period) = repo.backend().object_lock() else {
            return Ok("the repository has no object lock: nothing to extend".into());
        };
        let period = TimeDelta::from_std(period).map_err(|_| {
            OpsError::Invalid(format!(
                "the object-lock period {period:?} is out of range; configure a shorter [repository] object_lock"
            ))
        })?;
        let kept = pass
            .forget
            .decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.backup_id);
        let unneeded: std::collections::HashSet<String> =
            pass.forget.wal_candidates().into_iter().collect();
        let wal: Vec<String> = repo
            .backend()
            .list(backstop_ops::wal::WAL_PREFIX)
            .await?
            .into_iter()
            .map(|o| o.key)
            .filter(|k| !unneeded.contains(k))
            .collect();
        let targets = LockTargets::backups(kept).with_extra(wal);
        // `extend_locks`'s future cannot be proven `Send` (a closure over borrowed ids inside
        // it), which an async-trait method requires: it runs on a blocking thread instead.
        let (repo, handle) = (repo.clone(), tokio::runtime::Handle::current());
        let r = tokio::task::spawn_blocking(move || {
            handle.block_on(repo.extend_locks(now, period, &targets))
        })
        .await
        .map_err(|e| OpsError::Abandoned {
            what: "the object-lock extension".into(),
            why: e.to_string(),
        })??;
        if !r.is_complete() {
            tracing::warn!(
                missing = r.missing,
                first_missing = ?r.first_missing,
                failed = r.failed,
                first_failure = ?r.first_failure,
                "object locks not all extended; the next pass retries"
            );
        }
        Ok(format!(
            "{} objects locked until {}: {} extended, {} already locked, {} missing, {} failed",
            r.objects, r.retain_until, r.extended, r.already_locked, r.missing, r.failed
        ))
    }
}

/// The daily job's settings.
pub struct Maintenance {
    pub data_path: DataPath,
    pub settings: RetentionSettings,
    /// The UTC time of day it runs at.
    pub daily_at: NaiveTime,
    pub grace: TimeDelta,
    pub scratch_dir: Option<std::path::PathBuf>,
    pub locks: Option<Arc<dyn LockExtension>>,
    /// How long a key version must have been found unused before it is retired: the object-lock
    /// period with object lock (every lock on what it sealed has ended by then), else zero.
    pub retire_hold: TimeDelta,
}

/// The first `daily_at` strictly after `now`.
pub fn next_run(now: DateTime<Utc>, daily_at: NaiveTime) -> DateTime<Utc> {
    let today = now.date_naive().and_time(daily_at).and_utc();
    if today > now {
        today
    } else {
        today + TimeDelta::days(1)
    }
}

/// One maintenance pass at `now` (see the module documentation).
pub async fn maintain_once(
    m: &Maintenance,
    now: DateTime<Utc>,
) -> Result<MaintenanceReport, OpsError> {
    let run = PruneRun {
        dry_run: false,
        grace: m.grace,
        now,
        scratch_dir: m.scratch_dir.clone(),
    };
    let pass = backstop_ops::forget::maintain(
        &m.data_path.repo,
        m.data_path.appender.as_ref(),
        &m.settings.config,
        m.settings.facts.as_ref(),
        &run,
        &Actor::worker(NAME),
    )
    .await?;
    let r = &pass.prune.report;
    tracing::info!(
        removed = pass.forget.removed().filter(|d| d.forgotten).count(),
        marked = r.newly_marked,
        swept = r.swept,
        reclaimed_bytes = r.bytes_reclaimed,
        spared = r.spared,
        "daily maintenance: retention and prune done"
    );
    if let Some(locks) = &m.locks {
        let summary = locks.extend(&m.data_path.repo, now, &pass).await?;
        tracing::info!(%summary, "daily maintenance: object locks extended");
    }
    expire_exports(m, now).await;
    retire_unused_keys(m, now).await;
    Ok(pass)
}

/// Deletes the table exports past their retention (recorded as `export.deleted`). A failure is
/// logged only, as for key retirement: the next pass tries again.
async fn expire_exports(m: &Maintenance, now: DateTime<Utc>) {
    match backstop_ops::export_lifecycle::expire(
        &m.data_path.repo,
        m.data_path.appender.as_ref(),
        &m.settings.config,
        now,
        &Actor::worker(NAME),
        false,
    )
    .await
    {
        Ok(r) => {
            if !r.deleted.is_empty() || r.orphan_objects > 0 || r.delete_failures > 0 {
                tracing::info!(
                    deleted = r.deleted.len(),
                    kept = r.kept,
                    orphan_objects = r.orphan_objects,
                    delete_failures = r.delete_failures,
                    "daily maintenance: exports past their retention deleted"
                );
            }
        }
        Err(e) => tracing::error!(
            error = %e.chain(),
            "daily maintenance: the exports' retention failed; the next pass tries again (or run `backstop export expire`)"
        ),
    }
}

/// After a rotation and its re-encryption, prune removes the originals; this then retires the
/// old versions (recorded as `key.retired`). A failure is logged only: the forget and prune of
/// the pass are done, and the next pass tries again.
async fn retire_unused_keys(m: &Maintenance, now: DateTime<Utc>) {
    let repo = &m.data_path.repo;
    if let Err(e) = repo.reload_keys().await {
        tracing::warn!(error = %e, "daily maintenance: cannot reload the keys; key retirement waits for the next pass");
        return;
    }
    let keys = repo.key_states();
    let rotated_out = keys.iter().any(|k| {
        k.retired_at.is_none()
            && keys.iter().any(|newer| {
                newer.info.purpose == k.info.purpose && newer.info.version > k.info.version
            })
    });
    if !rotated_out {
        return;
    }
    let opts = backstop_repo::RetireOptions {
        now,
        hold: m.retire_hold,
    };
    match backstop_ops::rotation::retire(
        repo,
        m.data_path.appender.as_ref(),
        &Actor::worker(NAME),
        &opts,
    )
    .await
    {
        Ok(r) => {
            for k in &r.retired {
                tracing::info!(key = %k.key_id, "daily maintenance: key version retired (nothing is sealed with it)");
            }
        }
        Err(e) => tracing::error!(
            error = %e.chain(),
            "daily maintenance: key retirement failed; the next pass tries again (or run `backstop key retire`)"
        ),
    }
}

/// Runs [`maintain_once`] every day at `daily_at` (UTC) on `clock` until `shutdown` flips.
/// Returns how many passes ran (and the last one's outcome is in the log).
pub async fn run_maintenance(
    m: &Maintenance,
    clock: &dyn Clock,
    mut shutdown: watch::Receiver<bool>,
) -> u64 {
    let mut passes = 0;
    loop {
        let due = next_run(clock.now(), m.daily_at);
        while clock.now() < due {
            tokio::select! {
                _ = clock.sleep_until(due) => {}
                _ = shutdown.changed() => return passes,
            }
        }
        if *shutdown.borrow() {
            return passes;
        }
        match maintain_once(m, clock.now()).await {
            Ok(_) => {}
            Err(e) => tracing::error!(
                error = %e.chain(),
                class = e.class().as_str(),
                "daily maintenance failed; it runs again tomorrow (or run `backstop forget` and `backstop prune`)"
            ),
        }
        passes += 1;
    }
}
