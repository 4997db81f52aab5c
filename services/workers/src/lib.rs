//! Workers: one thin handler per concern, each reacting to events and calling the use case in
//! `backstop-ops` that does the work.
//!
//! Every handler implements [`backstop_ledger::consumer::Handler`] and runs unchanged in both
//! modes: embedded (subscribed to the local ledger) and distributed (a JetStream durable consumer,
//! appending through NATS). A handler decodes its event, calls the use case, and maps the use
//! case's typed failure to the consumer's decision (retry when `is_transient()`, otherwise done or
//! dead-lettered). Handlers are idempotent: the events they append carry ids derived from the
//! event that caused them, so a redelivery stores nothing twice.
//!
//! Alerts are not a handler: they are level-triggered conditions recomputed from the ledger by
//! `backstop_ops::alerting`'s monitor in `backstop serve`; the notify handler delivers them.

pub mod backup;
pub mod drill;
pub mod export;
pub mod fault;
pub mod notify;
pub mod replicate;
pub mod restore;
pub mod retention;
pub mod verify;

use std::sync::Arc;

use backstop_events::Envelope;
use backstop_ledger::consumer::{Handler, HandlerError};

/// The permanent failure of a handler given an event it cannot read as the `expected` type
/// (a redelivery will not make it readable).
pub(crate) fn unreadable(event: &Envelope, expected: &str) -> HandlerError {
    HandlerError::permanent(format!(
        "event {} is not a readable {expected}",
        event.position
    ))
}

/// The scheduler's name for `--only`: it runs beside the handlers, not as one.
pub const SCHEDULER: &str = "scheduler";

/// The names of the workers `backstop worker --only` accepts (and [`SCHEDULER`]).
pub const KINDS: &[&str] = &[
    backup::NAME,
    export::NAME,
    verify::NAME,
    restore::NAME,
    retention::NAME,
    notify::NAME,
    replicate::NAME,
    drill::NAME,
];

/// What the data-path workers need; without it only the alert worker runs.
pub struct WorkerContext {
    pub data_path: Option<backstop_ops::DataPath>,
    pub verify: Option<backstop_ops::verify::VerifySettings>,
    /// The configured schedules: a scheduled backup runs under its schedule's trading-hours
    /// limits.
    pub schedules: Vec<backstop_ops::schedule::Schedule>,
    /// Every backup's deadline and lock wait (`[workers] job_deadline`, `lock_wait_timeout`).
    pub job_limits: backstop_ops::backup::JobLimits,
    /// Where requested restores may go (`[restore] allowed_targets`).
    pub restore_targets: backstop_ops::restore::RestoreTargets,
    /// The retention policies and the ledger's facts; without them no retention worker.
    pub retention: Option<retention::RetentionSettings>,
    /// The `[notify]` channels; without them no notifier.
    pub notify: Option<notify::NotifySettings>,
    /// The opened `[[repository.replicas]]`; without them no replicate worker.
    pub replicas: Vec<backstop_ops::replicate::Replica>,
    /// The `[[drills]]` plans and the verified backups; without them no drill worker.
    pub drills: Option<drill::DrillSettings>,
}

/// The handlers to run, all of them or the named ones. A worker named explicitly whose
/// prerequisites are missing is an error; one left out of "all" for that reason is logged.
pub fn handlers(only: &[String], ctx: WorkerContext) -> Result<Vec<Arc<dyn Handler>>, String> {
    for name in only {
        // The scheduler is not an event handler, but `--only` may name it (see `backstop worker`).
        if !KINDS.contains(&name.as_str()) && name != SCHEDULER {
            return Err(format!(
                "unknown worker `{name}`; known workers: {}, {SCHEDULER}",
                KINDS.join(", ")
            ));
        }
    }
    let wanted = |n: &str| only.is_empty() || only.iter().any(|o| o == n);
    let mut all: Vec<Arc<dyn Handler>> = Vec::new();
    match (&ctx.data_path, wanted(backup::NAME)) {
        (Some(dp), true) => all.push(Arc::new(backup::BackupWorker {
            data_path: dp.clone(),
            schedules: ctx.schedules.clone(),
            limits: ctx.job_limits,
        })),
        (None, true) if !only.is_empty() => {
            return Err("the backup worker needs a repository and its master key (see [repository] in the configuration reference)".into());
        }
        (None, true) => tracing::warn!("backup worker not started: no repository or master key"),
        _ => {}
    }
    match (&ctx.data_path, wanted(export::NAME)) {
        (Some(dp), true) => all.push(Arc::new(export::ExportWorker {
            data_path: dp.clone(),
        })),
        (None, true) if !only.is_empty() => {
            return Err("the export worker needs a repository and its master key".into());
        }
        _ => {}
    }
    match (&ctx.data_path, wanted(restore::NAME)) {
        (Some(dp), true) => all.push(Arc::new(restore::RestoreWorker {
            data_path: dp.clone(),
            allowed_targets: ctx.restore_targets.clone(),
        })),
        (None, true) if !only.is_empty() => {
            return Err("the restore worker needs a repository and its master key".into());
        }
        _ => {}
    }
    match (&ctx.data_path, &ctx.verify, wanted(verify::NAME)) {
        (Some(dp), Some(settings), true) => all.push(Arc::new(verify::VerifyWorker {
            data_path: dp.clone(),
            settings: settings.clone(),
        })),
        (_, _, true) if !only.is_empty() => {
            return Err("the verify worker needs a repository, its master key and [verify] scratch (a PostgreSQL URL for test restores)".into());
        }
        (_, _, true) => tracing::warn!(
            "verify worker not started: it needs a repository, its master key and [verify] scratch"
        ),
        _ => {}
    }
    match (&ctx.data_path, &ctx.retention, wanted(retention::NAME)) {
        (Some(dp), Some(settings), true) => all.push(Arc::new(retention::RetentionWorker {
            data_path: dp.clone(),
            settings: settings.clone(),
        })),
        (_, _, true) if !only.is_empty() => {
            return Err("the retention worker needs a repository, its master key and the ledger (it runs in `serve`)".into());
        }
        _ => {}
    }
    match (&ctx.notify, wanted(notify::NAME)) {
        (Some(settings), true) => all.push(Arc::new(notify::NotifyWorker {
            settings: settings.clone(),
        })),
        (None, true) if !only.is_empty() => {
            return Err("the notify worker needs [notify] channels in the configuration".into());
        }
        _ => {}
    }
    match (
        &ctx.data_path,
        ctx.replicas.is_empty(),
        wanted(replicate::NAME),
    ) {
        (Some(dp), false, true) => all.push(Arc::new(replicate::ReplicateWorker {
            data_path: dp.clone(),
            replicas: ctx.replicas.clone(),
        })),
        (_, _, true) if !only.is_empty() => {
            return Err("the replicate worker needs a repository, its master key and [[repository.replicas]]".into());
        }
        _ => {}
    }
    match (&ctx.data_path, &ctx.drills, wanted(drill::NAME)) {
        (Some(dp), Some(settings), true) => all.push(Arc::new(drill::DrillWorker {
            data_path: dp.clone(),
            settings: settings.clone(),
        })),
        (_, _, true) if !only.is_empty() => {
            return Err("the drill worker needs a repository, its master key, [[drills]] and the ledger (it runs in `serve`)".into());
        }
        _ => {}
    }
    Ok(all)
}
