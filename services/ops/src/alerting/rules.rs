//! The alert rules: which conditions hold, given the [`Facts`] and the time.
//!
//! A rule is a pure function of the facts and `now`; it names each condition by a stable key
//! (`kind/subject`). Thresholds come from the `[alerts]` section of the config, with the seeds'
//! values as defaults:
//!
//! | kind | key subject | severity | holds while | default |
//! |---|---|---|---|---|
//! | `backup_failed` | source | critical | the source's newest backup ending is a failure | |
//! | `verification_failed` | source | critical | the newest verdict on the source's backups is a failure | |
//! | `no_recent_backup` | source | critical | no completed backup for `stale_after` | 25 h (seed 002) |
//! | `backup_size_changed` | source/method/kind | warning | the newest backup's raw size differs from the previous comparable one by more than `size_change_percent` | 20 % (seed 003) |
//! | `backup_running_long` | backup id | warning | a backup started `running_warn_after` ago has not ended | 300 s (seed 001) |
//! | `storage_unreachable` | backend | critical | the newest connectivity check failed | |
//! | `storage_quota` | repository | warning | used bytes over `quota_percent` of `storage_quota_gib` | 85 % |
//! | `wal_archiving_failing` | source | critical | the source's `pg_stat_archiver` says its newest archive attempt failed (`crate::archiver`) | |
//! | `wal_stalled` | `wal` | critical | WAL was archived before, but none for `wal_stall_after` | 1 h |
//! | `cost_over_budget` | repository | warning | the monthly estimate from the newest samples is over `[cost] budget_usd` | $15 (seed 000 R12.3) |
//! | `endpoint_down` | endpoint | critical | the health monitor judges it down (2 failed checks) | |
//! | `endpoint_slow` | endpoint | warning | the health monitor judges it degraded (3 slow answers) | |
//! | `git_mirror_diverged` | source | critical | the git source's newest sync left refs whose hashes differ on the mirror (`git.diverged`) | |
//! | `git_mirror_failed` | source | warning | the git source's newest sync could not finish (`git.mirror_failed`) | |
//! | `replication_lagging` | replica | critical | the newest `replication.lag_measured` of the replica says it lacks a backup that is now more than 2 h old (R14.4; fixed) | 2 h |
//! | `event_dead_lettered` | consumer/event | warning | a worker gave up on an event, until an operator resolves the alert | |
//!
//! `wal_stalled` needs WAL to keep coming: set `archive_timeout` on the source (pgBackRest and
//! WAL-G advise the same) below `wal_stall_after`, or an idle database looks stalled.

use std::sync::Arc;

use backstop_events::{HealthState, Severity};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;

use super::facts::{Cause, Facts, GitTrouble, Outcome};
use crate::schedule::ConfigDuration;

/// Monthly cost in USD of `bytes` in a storage class and region (the price table of
/// `crate::cost`, passed in so the rules need not know where prices come from).
pub type CostEstimator = Arc<dyn Fn(&str, &str, u64) -> f64 + Send + Sync>;

/// The `[alerts]` section.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AlertThresholds {
    pub stale_after: ConfigDuration,
    pub size_change_percent: f64,
    pub running_warn_after: ConfigDuration,
    pub wal_stall_after: ConfigDuration,
    pub storage_quota_gib: Option<f64>,
    pub quota_percent: f64,
    /// From `[cost] budget_usd`, not `[alerts]`: one budget for the cost page and the alert.
    #[serde(skip)]
    pub budget_usd: f64,
}

impl Default for AlertThresholds {
    fn default() -> Self {
        AlertThresholds {
            stale_after: ConfigDuration::from_hours(25),
            size_change_percent: 20.0,
            running_warn_after: ConfigDuration::from_secs(300),
            wal_stall_after: ConfigDuration::from_hours(1),
            storage_quota_gib: None,
            quota_percent: 85.0,
            budget_usd: 15.0,
        }
    }
}

impl AlertThresholds {
    /// Checks values a rule could not use; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let pct = |v: f64, key: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("alerts.{key} must be a positive number, not {v}"))
            }
        };
        pct(self.size_change_percent, "size_change_percent")?;
        pct(self.quota_percent, "quota_percent")?;
        if let Some(q) = self.storage_quota_gib {
            pct(q, "storage_quota_gib")?;
        }
        if self.stale_after.as_secs() == 0 {
            return Err("alerts.stale_after must be longer than 0s".into());
        }
        Ok(())
    }
}

/// A condition that holds now.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub key: String,
    pub kind: &'static str,
    pub subject: String,
    pub severity: Severity,
    pub source: Option<String>,
    pub message: String,
    /// The event that made it hold (its id and time seed the alert's id).
    pub cause: Cause,
}

fn delta(d: ConfigDuration) -> TimeDelta {
    TimeDelta::seconds(i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 1_000))
}

fn cond(
    kind: &'static str,
    subject: String,
    severity: Severity,
    source: Option<String>,
    message: String,
    cause: Cause,
) -> Condition {
    Condition {
        key: format!("{kind}/{subject}"),
        kind,
        subject,
        severity,
        source,
        message,
        cause,
    }
}

/// Every condition that holds at `now`, ordered by key.
pub fn conditions(
    facts: &Facts,
    t: &AlertThresholds,
    cost: Option<&CostEstimator>,
    now: DateTime<Utc>,
) -> Vec<Condition> {
    let mut out = Vec::new();
    for (name, s) in &facts.sources {
        let src = Some(name.clone());
        if let Some((Outcome::Failed { backup_id, reason }, cause)) = &s.last_outcome {
            out.push(cond(
                "backup_failed",
                name.clone(),
                Severity::Critical,
                src.clone(),
                format!("the last backup of `{name}` ({backup_id}) failed: {reason}"),
                *cause,
            ));
        }
        if let Some(v) = s.verdict.as_ref().filter(|v| !v.passed) {
            out.push(cond(
                "verification_failed",
                name.clone(),
                Severity::Critical,
                src.clone(),
                format!(
                    "verification of backup {} of `{name}` failed: {}",
                    v.backup_id, v.reason
                ),
                v.cause,
            ));
        }
        let since = s.last_completed.or(s.first_seen);
        if let Some(since) = since
            && now - since.at >= delta(t.stale_after)
        {
            let what = if s.last_completed.is_some() {
                format!("the last one completed at {}", since.at.to_rfc3339())
            } else {
                format!(
                    "none has completed since the source was first seen at {}",
                    since.at.to_rfc3339()
                )
            };
            out.push(cond(
                "no_recent_backup",
                name.clone(),
                Severity::Critical,
                src.clone(),
                format!(
                    "no successful backup of `{name}` in {}: {what}",
                    t.stale_after
                ),
                since,
            ));
        }
        for ((method, kind), (prev, newest)) in &s.sizes {
            let Some(prev) = prev else { continue };
            if prev.raw_bytes == 0 {
                continue;
            }
            let change =
                (newest.raw_bytes as f64 - prev.raw_bytes as f64) / prev.raw_bytes as f64 * 100.0;
            if change.abs() > t.size_change_percent {
                out.push(cond(
                    "backup_size_changed",
                    format!("{name}/{method}/{kind}"),
                    Severity::Warning,
                    src.clone(),
                    format!(
                        "the {kind} {method} backup {} of `{name}` read {} bytes, {change:+.1}% from the previous one ({} bytes, backup {}); over the {}% threshold",
                        newest.backup_id,
                        newest.raw_bytes,
                        prev.raw_bytes,
                        prev.backup_id,
                        t.size_change_percent
                    ),
                    newest.cause,
                ));
            }
        }
    }
    for (id, r) in &facts.running {
        let running = now - r.started.at;
        if running >= delta(t.running_warn_after) {
            out.push(cond(
                "backup_running_long",
                id.to_string(),
                Severity::Warning,
                Some(r.source.clone()),
                // Said from the start time, not the elapsed time, so that every evaluation
                // (and every monitor) words it the same: the ledger compares a re-offered
                // event's content with the stored one.
                format!(
                    "backup {id} of `{}` has been running since {} (more than {})",
                    r.source,
                    r.started.at.to_rfc3339(),
                    t.running_warn_after
                ),
                r.started,
            ));
        }
    }
    for (backend, b) in &facts.backends {
        if !b.ok {
            out.push(cond(
                "storage_unreachable",
                backend.clone(),
                Severity::Critical,
                None,
                format!(
                    "storage `{backend}` is unreachable: {}",
                    b.error.as_deref().unwrap_or("the check failed")
                ),
                b.cause,
            ));
        }
    }
    for (repo, series) in &facts.usage {
        let Some(newest) = series.values().map(|u| u.cause).max_by_key(|c| c.at) else {
            continue;
        };
        let used: u64 = series.values().map(|u| u.bytes).sum();
        if let Some(quota) = t.storage_quota_gib {
            let quota_bytes = quota * 1024.0 * 1024.0 * 1024.0;
            let pct = used as f64 / quota_bytes * 100.0;
            if pct > t.quota_percent {
                out.push(cond(
                    "storage_quota",
                    repo.clone(),
                    Severity::Warning,
                    None,
                    format!(
                        "repository `{repo}` uses {pct:.1}% of its {quota} GiB quota ({used} bytes; threshold {}%)",
                        t.quota_percent
                    ),
                    newest,
                ));
            }
        }
        if let Some(cost) = cost {
            let monthly: f64 = series
                .values()
                .map(|u| cost(&u.storage_class, &u.region, u.bytes))
                .sum();
            if monthly > t.budget_usd {
                out.push(cond(
                    "cost_over_budget",
                    repo.clone(),
                    Severity::Warning,
                    None,
                    format!(
                        "repository `{repo}` is estimated at ${monthly:.2} a month, over the ${:.2} budget",
                        t.budget_usd
                    ),
                    newest,
                ));
            }
        }
    }
    if let Some(last) = facts.last_wal
        && now - last.at >= delta(t.wal_stall_after)
    {
        out.push(cond(
            "wal_stalled",
            "wal".into(),
            Severity::Critical,
            None,
            format!(
                "no WAL segment archived since {} ({} without one): point-in-time recovery's RPO is at risk; check `pg_stat_archiver` and the archive_command's log",
                last.at.to_rfc3339(),
                t.wal_stall_after
            ),
            last,
        ));
    }
    for (source, (c, cause)) in &facts.archivers {
        if c.failing {
            out.push(cond(
                "wal_archiving_failing",
                source.clone(),
                Severity::Critical,
                Some(source.clone()),
                format!(
                    "PostgreSQL of `{source}` cannot archive WAL: {} failures, the newest {} at {}; the last segment archived was {} at {}. Point-in-time recovery stops at the last archived segment: read the server's log for the archive_command's error",
                    c.failed_count,
                    c.last_failed_wal.as_deref().unwrap_or("?"),
                    c.last_failed_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "?".into()),
                    c.last_archived_wal.as_deref().unwrap_or("none"),
                    c.last_archived_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into()),
                ),
                *cause,
            ));
        }
    }
    for (endpoint, h) in &facts.endpoints {
        let (kind, severity, what) = match h.state {
            HealthState::Up => continue,
            HealthState::Down => ("endpoint_down", Severity::Critical, "is down"),
            HealthState::Degraded => ("endpoint_slow", Severity::Warning, "answers slowly"),
        };
        let detail = match &h.error {
            Some(e) => format!(": {e}"),
            None => format!(" (last answer in {} ms)", h.latency_ms),
        };
        out.push(cond(
            kind,
            endpoint.clone(),
            severity,
            None,
            format!("endpoint {endpoint} {what}{detail}"),
            h.cause,
        ));
    }
    for (source, (export_id, reason, cause)) in &facts.failed_exports {
        out.push(cond(
            "export_failed",
            source.clone(),
            Severity::Warning,
            Some(source.clone()),
            format!(
                "the last table export of `{source}` ({export_id}) failed: {reason}. Run `backstop export --source {source}` once the cause is fixed; the alert resolves when an export completes"
            ),
            *cause,
        ));
    }
    for (source, (drill_id, reason, cause)) in &facts.failed_drills {
        out.push(cond(
            "drill_failed",
            source.clone(),
            Severity::Critical,
            Some(source.clone()),
            format!(
                "the last DR drill of `{source}` ({drill_id}) failed: {reason}. Read its report (`backstop drill --source {source}` writes one), fix the cause and drill again; the alert resolves when a drill passes"
            ),
            *cause,
        ));
    }
    for (source, (trouble, cause)) in &facts.git_mirrors {
        let (kind, severity, message) = match trouble {
            GitTrouble::Diverged { mirror, refs } => (
                "git_mirror_diverged",
                Severity::Critical,
                format!(
                    "the mirror {mirror} of git source `{source}` has diverged: {} ref(s) differ from the source ({}); they were left alone. Find who pushed to the mirror, reconcile by hand (or set force = true to let the source win), then `backstop git sync {source}`; the alert resolves when a sync ends mirrored",
                    refs.len(),
                    refs.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                ),
            ),
            GitTrouble::Failed { mirror, reason } => (
                "git_mirror_failed",
                Severity::Warning,
                format!(
                    "the last sync of git source `{source}` to {mirror} failed: {reason}. The alert resolves when a sync ends mirrored"
                ),
            ),
        };
        out.push(cond(
            kind,
            source.clone(),
            severity,
            Some(source.clone()),
            message,
            *cause,
        ));
    }
    for (region, (lag, cause)) in &facts.replication_lag {
        if let Some(since) = replica_behind_since(*lag, cause)
            && now - since >= REPLICATION_LAG_AFTER
        {
            out.push(cond(
                "replication_lagging",
                region.clone(),
                Severity::Critical,
                None,
                // From the measurement, not `now`, so every evaluation words it the same.
                format!(
                    "replica `{region}` lacks a backup taken at {} ({lag} s behind when measured at {}); over the 2 h limit. Run `backstop replicate --to {region} --catch-up`; the alert resolves when a measurement says it is up to date",
                    since.to_rfc3339(),
                    cause.at.to_rfc3339()
                ),
                *cause,
            ));
        }
    }
    for (key, d) in &facts.dead_letters {
        out.push(Condition {
            key: key.clone(),
            kind: "event_dead_lettered",
            subject: d.consumer.clone(),
            severity: Severity::Warning,
            source: None,
            message: format!(
                "worker `{}` gave up on event {} ({}) after {} deliveries: {}. Resolve this alert (`backstop alerts resolve {key}`) once it is dealt with",
                d.consumer, d.position, d.event_type, d.deliveries, d.error
            ),
            cause: d.cause,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// How far behind a replica may fall (R14.4).
pub const REPLICATION_LAG_AFTER: TimeDelta = TimeDelta::hours(2);

/// When the oldest backup a replica lacks was taken, from a lag measurement (none when the
/// replica was up to date).
fn replica_behind_since(lag_seconds: u64, measured: &Cause) -> Option<DateTime<Utc>> {
    (lag_seconds > 0).then(|| measured.at - TimeDelta::seconds(lag_seconds as i64))
}

/// The next instant after `now` at which a time-based condition starts to hold, if any: the
/// monitor wakes then rather than waiting for its next tick.
pub fn next_change(
    facts: &Facts,
    t: &AlertThresholds,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let stale = facts
        .sources
        .values()
        .filter_map(|s| s.last_completed.or(s.first_seen))
        .map(|c| c.at + delta(t.stale_after));
    let running = facts
        .running
        .values()
        .map(|r| r.started.at + delta(t.running_warn_after));
    let wal = facts.last_wal.map(|c| c.at + delta(t.wal_stall_after));
    let lag = facts
        .replication_lag
        .values()
        .filter_map(|(lag, c)| replica_behind_since(*lag, c))
        .map(|since| since + REPLICATION_LAG_AFTER);
    stale
        .chain(running)
        .chain(wal)
        .chain(lag)
        .filter(|at| *at > now)
        .min()
}
