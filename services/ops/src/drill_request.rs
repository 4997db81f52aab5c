//! Requested DR drills: what the drill worker does with a `drill.requested` (serve's `[[drills]]`
//! schedules), and the report files every drill writes.
//!
//! The stream of a requested drill, `drill-<id>` (the id derived from the schedule and the
//! slot, [`crate::schedule::drill_id_for`]):
//!
//! ```text
//! v1 drill.requested -> v2 drill.started -> v3 drill.completed {passed, ...}
//! ```
//!
//! Invariants:
//! - A slot runs at most one drill: `drill.started` is appended at version 1 exactly, so a
//!   redelivered request (the worker restarted, or the consumer retried) meets a ledger conflict
//!   before it touches the staging server, and restores nothing.
//! - Every requested drill ends in `drill.completed`, passed or not. A request that cannot be run
//!   at all (no `[[drills]]` entry for its source here, a staging URL that is the source's own
//!   database) records `drill.started` and a failed `drill.completed` with the reason at once;
//!   a drill whose process stopped between its start and its end is completed as failed
//!   ("interrupted") by the redelivery that finds it so. Either raises `drill_failed`.
//! - A transient failure to record (the ledger busy, NATS down) is returned as such: the
//!   consumer retries, and the version checks above make the retry safe.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use backstop_events::{
    Actor, DrillCompleted, DrillRequested, DrillStarted, Event, NewEvent, streams,
};
use backstop_ledger::{ExpectedVersion, Ledger, LedgerError};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::context::DataPath;
use crate::drill::{self, DrillPlan, DrillReport, DrillStart};
use crate::error::OpsError;

/// The actor of the drills the worker runs.
pub const DRILL_ACTOR: &str = "drill";

/// Which backups passed verification, read when a drill starts (a drill restores the newest
/// verified backup).
#[async_trait]
pub trait VerifiedBackups: Send + Sync {
    async fn verified(&self) -> Result<HashSet<Uuid>, OpsError>;
}

#[async_trait]
impl VerifiedBackups for Ledger {
    async fn verified(&self) -> Result<HashSet<Uuid>, OpsError> {
        let ledger = self.clone();
        tokio::task::spawn_blocking(move || -> Result<HashSet<Uuid>, LedgerError> {
            let mut verified = HashSet::new();
            let mut from = 1;
            loop {
                let batch = ledger.read(from, 4096)?;
                let Some(last) = batch.last() else { break };
                from = last.position + 1;
                for env in &batch {
                    crate::catalog::note_verification(&mut verified, env);
                }
            }
            Ok(verified)
        })
        .await
        .map_err(|e| OpsError::Abandoned {
            what: "reading the ledger for verified backups".into(),
            why: e.to_string(),
        })?
        .map_err(OpsError::from)
    }
}

/// What happened to one `drill.requested`.
#[derive(Debug)]
pub enum RequestedOutcome {
    /// The drill ran (passed or failed: see the report).
    Ran(Box<DrillReport>),
    /// It could not run; a failed drill was recorded with this reason.
    Refused(String),
    /// It had started before (a redelivery): nothing was run. `interrupted` when it had never
    /// completed, and was now completed as failed.
    AlreadyStarted { interrupted: bool },
}

/// Runs the drill a `drill.requested` asks for with `plan` (None: the source has no
/// `[[drills]]` entry here), recording it on the request's stream as the module states.
pub async fn run_requested(
    dp: &DataPath,
    plan: Option<&DrillPlan>,
    verified: &dyn VerifiedBackups,
    request: &DrillRequested,
    requested_at: DateTime<Utc>,
) -> Result<RequestedOutcome, OpsError> {
    let Some(plan) = plan else {
        let reason = format!(
            "no [[drills]] entry for source `{}` in this configuration: add one (staging = ...) or remove the drill schedule",
            request.source
        );
        return refuse(dp, request, requested_at, reason).await;
    };
    let verified = verified.verified().await?;
    let start = DrillStart {
        drill_id: request.drill_id,
        after: 1,
        actor: Actor::worker(DRILL_ACTOR),
    };
    match drill::run_drill_as(dp, plan, Some(&verified), start).await {
        Ok(report) => Ok(RequestedOutcome::Ran(Box::new(report))),
        Err(OpsError::Ledger(LedgerError::Conflict { .. })) => {
            let interrupted = complete_interrupted(dp, request, requested_at).await?;
            Ok(RequestedOutcome::AlreadyStarted { interrupted })
        }
        Err(e @ (OpsError::Invalid(_) | OpsError::UnknownSource(_))) => {
            refuse(dp, request, requested_at, e.chain()).await
        }
        Err(e) => Err(e),
    }
}

/// A failed report for a drill that restored nothing.
fn failed_report(request: &DrillRequested, at: DateTime<Utc>, reason: &str) -> DrillReport {
    let mut r = DrillReport {
        format: 1,
        drill_id: request.drill_id,
        source: request.source.clone(),
        staging: String::new(),
        method: "logical".into(),
        backup_id: Uuid::nil(),
        snapshot_at: None,
        started_at: at,
        finished_at: at,
        passed: false,
        reason: reason.to_string(),
        rto_ms: 0,
        rto_target_ms: 0,
        rpo_ms: 0,
        data_age_ms: None,
        phases: Vec::new(),
        endpoints: Vec::new(),
        rows: Vec::new(),
        recommendations: Vec::new(),
    };
    r.recommendations = drill::recommendations(&r);
    r
}

fn completed_event(request: &DrillRequested, report: &DrillReport, step: &str) -> NewEvent {
    let completed = Event::DrillCompleted(DrillCompleted {
        drill_id: request.drill_id,
        backup_id: Uuid::nil(),
        passed: false,
        recovery_ms: 0,
        report: serde_json::to_value(report).unwrap_or_default(),
        source: request.source.clone(),
        rto_target_ms: 0,
        reason: report.reason.clone(),
    });
    let mut n = NewEvent::new(
        streams::drill(request.drill_id),
        Actor::worker(DRILL_ACTOR),
        &completed,
    );
    n.id = backstop_events::uuid_v7_derived(request.drill_id, report.started_at, step);
    n.occurred_at = report.finished_at;
    n
}

/// Records a drill that could not run: `drill.started` (nil backup) and a failed
/// `drill.completed`, in one append at version 1 (a redelivery stores nothing twice).
async fn refuse(
    dp: &DataPath,
    request: &DrillRequested,
    requested_at: DateTime<Utc>,
    reason: String,
) -> Result<RequestedOutcome, OpsError> {
    tracing::error!(drill = %request.drill_id, source = %request.source, %reason, "requested drill cannot run");
    let report = failed_report(request, requested_at, &reason);
    let stream = streams::drill(request.drill_id);
    let started = Event::DrillStarted(DrillStarted {
        drill_id: request.drill_id,
        backup_id: Uuid::nil(),
        target: String::new(),
        source: request.source.clone(),
        method: "logical".into(),
    });
    let mut s = NewEvent::new(&stream, Actor::worker(DRILL_ACTOR), &started);
    s.id = backstop_events::uuid_v7_derived(request.drill_id, requested_at, "refused-started");
    s.occurred_at = requested_at;
    let c = completed_event(request, &report, "refused-completed");
    match dp
        .appender
        .append(&stream, ExpectedVersion::Exact(1), vec![s, c])
        .await
    {
        Ok(_) => Ok(RequestedOutcome::Refused(reason)),
        // It had started (or been refused) before: nothing more to record.
        Err(LedgerError::Conflict { .. }) => {
            Ok(RequestedOutcome::AlreadyStarted { interrupted: false })
        }
        Err(e) => Err(e.into()),
    }
}

/// A redelivered request whose drill started: completes it as failed if it never completed
/// (its process stopped). The consumer does not deliver an event again while its handler is
/// alive (it signals progress), so a started drill found here is not running. True when it
/// recorded the failure.
async fn complete_interrupted(
    dp: &DataPath,
    request: &DrillRequested,
    requested_at: DateTime<Utc>,
) -> Result<bool, OpsError> {
    let reason = "the drill was interrupted: the process running it stopped before it finished; run `backstop drill` or wait for the next scheduled one";
    let report = failed_report(request, requested_at, reason);
    let c = completed_event(request, &report, "interrupted");
    match dp
        .appender
        .append(
            &streams::drill(request.drill_id),
            ExpectedVersion::Exact(2),
            vec![c],
        )
        .await
    {
        Ok(a) => {
            let recorded = a.events.iter().any(|x| !x.duplicate);
            if recorded {
                tracing::warn!(drill = %request.drill_id, "a requested drill found started and never completed: recorded as interrupted");
            }
            Ok(recorded)
        }
        Err(LedgerError::Conflict { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Writes a drill's report as `DIR/drill-<id>.json`, `.md` and `.html`; returns the path
/// without its extension.
pub fn write_reports(report: &DrillReport, dir: &Path) -> Result<PathBuf, OpsError> {
    let io = |path: &Path, e: std::io::Error| OpsError::Io {
        doing: format!("writing the drill report {}", path.display()),
        source: e,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let base = dir.join(format!("drill-{}", report.drill_id));
    let json = serde_json::to_string_pretty(report).unwrap_or_default();
    for (ext, body) in [
        ("json", json),
        ("md", report.markdown()),
        ("html", report.html()),
    ] {
        let path = base.with_extension(ext);
        std::fs::write(&path, body).map_err(|e| io(&path, e))?;
    }
    Ok(base)
}
