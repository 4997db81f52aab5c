//! What `backstop serve` and `backstop worker` wire from the configuration: the data path
//! their workers run on (repository, appender, sources), the verification settings (a scratch
//! server for logical test restores; this binary's `wal-fetch` for physical ones), and the
//! storage probe of the dashboard.

use std::path::Path;
use std::sync::Arc;

use backstop_ledger::Appender;
use backstop_ops::DataPath;
use backstop_ops::schedule::Schedule;
use backstop_ops::verify::VerifySettings;
use backstop_repo::{KeyAccess, Location, Repository};
use backstop_workers::WorkerContext;
use tokio::sync::mpsc::unbounded_channel;

use crate::config::Config;
use crate::wiring::{
    RepoArgs, location, master_key, physical_verify_settings, s3_settings, source_specs,
};

struct RepoProbe {
    backend: Arc<dyn backstop_repo::Backend>,
}

#[async_trait::async_trait]
impl backstop_api::StorageProbe for RepoProbe {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    async fn probe(&self) -> Result<std::time::Duration, String> {
        let started = std::time::Instant::now();
        match self.backend.head("config").await {
            Ok(Some(_)) => Ok(started.elapsed()),
            Ok(None) => Err("reachable, but the repository config object is missing".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What a long-running process needs for the data-path workers and the storage probe. Missing
/// pieces (no repository yet, no master key) leave those workers off with a log line, so that
/// `serve` still runs the ledger, the alerts and the API.
pub async fn worker_context(
    config: &Config,
    data_dir: &Path,
    appender: Arc<dyn Appender>,
    schedules: &[Schedule],
) -> (WorkerContext, Option<Arc<dyn backstop_api::StorageProbe>>) {
    let schedules = schedules.to_vec();
    let none = || WorkerContext {
        data_path: None,
        verify: None,
        schedules: schedules.clone(),
        retention: None,
        notify: None,
        job_limits: config.job_limits(),
        restore_targets: config.restore_targets(),
        replicas: Vec::new(),
        drills: None,
    };
    let loc = match location(config, data_dir, &RepoArgs::default()) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "repository location unusable; data-path workers off");
            return (none(), None);
        }
    };
    if let Location::Local(path) = &loc
        && !path.join("config").exists()
    {
        tracing::info!(repository = %loc, "no repository yet (`backstop init`); data-path workers off");
        return (none(), None);
    }
    let backend = match loc.open(Some(s3_settings(config))).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot reach the repository; data-path workers off");
            return (none(), None);
        }
    };
    let probe: Arc<dyn backstop_api::StorageProbe> = Arc::new(RepoProbe {
        backend: backend.clone(),
    });
    let master = match master_key(config, &RepoArgs::default()) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "no master key; backup and verify workers off");
            return (none(), Some(probe));
        }
    };
    let (tx, rx) = unbounded_channel::<KeyAccess>();
    let repo = match Repository::open(backend, &master, Arc::new(tx)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the repository; backup and verify workers off");
            return (none(), Some(probe));
        }
    };
    tokio::spawn(backstop_ops::keys::record_key_accesses(
        rx,
        appender.clone(),
    ));
    // Command and Redis backups are test-restored without a scratch PostgreSQL.
    let other_kinds = config
        .sources
        .iter()
        .any(|s| !matches!(s.kind, crate::config::SourceKindSection::Postgres(_)));
    let verify = (config.verify.scratch.is_some() || other_kinds)
        .then_some(config.verify.scratch.as_ref())
        .map(|scratch| VerifySettings {
            scratch: scratch.cloned(),
            tolerance_percent: config.verify.tolerance_percent.unwrap_or(1.0),
            max_retries: config.verify.max_retries.unwrap_or(2),
            jobs: config.verify.jobs.unwrap_or(2),
            allow_superuser: config.verify.allow_superuser.unwrap_or(false),
            physical: Some(physical_verify_settings(
                config,
                data_dir,
                &RepoArgs::default(),
            )),
        });
    (
        WorkerContext {
            schedules: schedules.clone(),
            data_path: Some(DataPath {
                repo,
                appender,
                sources: source_specs(config),
            }),
            verify,
            retention: None,
            notify: None,
            job_limits: config.job_limits(),
            restore_targets: config.restore_targets(),
            replicas: crate::replica_cmd::open_replicas(config).await,
            drills: None,
        },
        Some(probe),
    )
}

/// The drill worker's settings: the `[[drills]]` plans, the verified backups read from
/// `ledger`, reports to DATA_DIR/drills. None without `[[drills]]` entries.
pub fn drills(
    config: &Config,
    data_dir: &Path,
    ledger: &backstop_ledger::Ledger,
) -> anyhow::Result<Option<backstop_workers::drill::DrillSettings>> {
    if config.drills.is_empty() {
        return Ok(None);
    }
    Ok(Some(backstop_workers::drill::DrillSettings {
        plans: crate::drill_cmd::configured_plans(config, data_dir)?,
        verified: Arc::new(ledger.clone()),
        report_dir: data_dir.join("drills"),
    }))
}

/// The notifier's settings from `[notify]`, with `lookup` the way this process asks whether a
/// notification was already sent (the ledger in `serve`, JetStream in `backstop worker`).
/// None without `[notify]` channels; an error for channels that cannot be built.
pub fn notify(
    config: &Config,
    lookup: Arc<dyn backstop_ops::notify::EventLookup>,
) -> anyhow::Result<Option<backstop_workers::notify::NotifySettings>> {
    let Some(n) = config.notify.as_ref().filter(|n| !n.channels.is_empty()) else {
        return Ok(None);
    };
    let notifier = backstop_ops::notify::Notifier::new(n.clone())
        .map_err(|e| anyhow::anyhow!("[notify]: {e}"))?;
    tracing::info!(channels = n.channels.len(), "notifier configured");
    Ok(Some(backstop_workers::notify::NotifySettings {
        notifier: Arc::new(notifier),
        lookup,
    }))
}

/// The schedules as the dashboard shows them: each source's next run.
pub struct NextRuns(pub Vec<Schedule>);

impl backstop_api::ScheduleView for NextRuns {
    fn next_runs(&self, now: chrono::DateTime<chrono::Utc>) -> Vec<backstop_api::NextRun> {
        let mut runs: Vec<backstop_api::NextRun> = self
            .0
            .iter()
            .filter_map(|s| s.next_firings(1, now).ok()?.into_iter().next())
            .map(|f| backstop_api::NextRun {
                local: format!("{} {}", f.local.format("%Y-%m-%d %H:%M %:z"), f.zone),
                source: f.source,
                schedule: f.schedule,
                at: f.utc,
                kind: f.kind.as_str().to_string(),
                method: f.method.as_str().to_string(),
            })
            .collect();
        runs.sort_by_key(|r| r.at);
        runs
    }
}

/// Automatic retention (the retention worker and the daily maintenance job), for a process
/// that has the ledger: on only when the configuration has `[[retention]]` entries (an empty
/// entry means the defaults), so that nothing is ever deleted unattended unless asked for.
/// `backstop forget` and `backstop prune` work either way.
pub fn retention(
    config: &Config,
    ledger: &backstop_ledger::Ledger,
    context: &mut WorkerContext,
) -> anyhow::Result<Option<backstop_workers::retention::Maintenance>> {
    let policies = config.retention_config()?;
    let daily_at = config.maintenance_time()?;
    let Some(dp) = context.data_path.clone() else {
        return Ok(None);
    };
    if config.retention.is_empty() {
        tracing::info!(
            "no [[retention]] in the configuration: nothing is deleted unattended (run `backstop forget` by hand)"
        );
        return Ok(None);
    }
    let settings = backstop_workers::retention::RetentionSettings {
        config: policies,
        facts: Arc::new(ledger.clone()),
        clock: Arc::new(backstop_ops::schedule::SystemClock),
    };
    context.retention = Some(settings.clone());
    if config.prune.daily == Some(false) {
        return Ok(None);
    }
    Ok(Some(backstop_workers::retention::Maintenance {
        data_path: dp.clone(),
        settings,
        daily_at,
        grace: config.prune_grace(),
        scratch_dir: config.prune.scratch_dir.clone(),
        // Object lock: the daily pass extends the locks of what kept backups still need.
        locks: dp.repo.backend().object_lock().map(|_| {
            Arc::new(backstop_workers::retention::RepositoryLocks)
                as Arc<dyn backstop_workers::retention::LockExtension>
        }),
        retire_hold: config
            .repository
            .object_lock
            .map(|d| chrono::TimeDelta::seconds(d.as_secs() as i64))
            .unwrap_or_else(chrono::TimeDelta::zero),
    }))
}
