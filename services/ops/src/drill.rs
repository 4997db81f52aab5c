//! Disaster-recovery drills (R11): the newest verified backup of a source restored to a staging
//! server, timed phase by phase, checked (endpoints, row counts within the RPO) and reported.
//!
//! Events, on the stream `drill-<id>`:
//!
//! ```text
//! drill.started -> (the restore's own recovery.* events) -> drill.completed {passed, ...}
//! ```
//!
//! Invariants:
//! - Every drill that records `drill.started` records `drill.completed`, passed or not: a restore
//!   that fails (a damaged chunk, an unreachable staging server) is a failed drill with the
//!   reason, never a missing one. The alert monitor raises `drill_failed` on it.
//! - The restore is the restore use case ([`crate::restore::restore_logical`]), not a copy: a
//!   drill proves the path an operator would use, and records it as a recovery like any other.
//! - The staging database is scratch: it is dropped and created anew before each drill. A drill
//!   refuses a staging URL that is the source's own database.
//! - The method ([`DrillMethod`], in the plan) is chosen before `drill.started`, which names it:
//!   physical drills (base backup plus WAL replayed on a throwaway server) are in [`physical`].
//!
//! Phases (milliseconds, each measured with a monotonic clock):
//! - `fetch`: finding the newest verified backup and reading its manifest and dump report;
//! - `restore`: the logical restore into staging (the chunks are fetched, decrypted and `COPY`d
//!   as they stream, so fetching the data is inside this phase), or laying out the base backup;
//! - `replay`: WAL replay. Always 0 for a logical drill; for a physical one, from the staging
//!   server's start to the end of its recovery;
//! - `checks`: the endpoints and the row counts.
//!
//! The measured RTO is the sum of the phases. The row-count rule ([`compare_rows`]) is stated
//! where it is implemented.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use backstop_events::{Actor, DrillCompleted, DrillStarted, Event, NewEvent, streams};
use backstop_events::{BackupMethod, RecoveryScope};
use backstop_ledger::ExpectedVersion;
use backstop_repo::Manifest;
use backstop_sources::pg::logical::RestoreOptions;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Connection;
use uuid::Uuid;

use crate::catalog::{self, Selector};
use crate::context::{DataPath, SourceKind};
use crate::error::OpsError;
use crate::restore::{self, Recovery};

pub mod physical;
pub use physical::{DrillMethod, PhysicalStaging, compare_rows_physical};

/// What a drill does: which source, where it restores, and what it must meet.
#[derive(Clone, Debug)]
pub struct DrillPlan {
    pub source: String,
    /// `postgres://HOST[:PORT]/DATABASE` of the staging database (dropped and recreated).
    pub staging: String,
    /// The recovery time objective: a drill whose measured RTO is above it fails.
    pub rto_target: Duration,
    /// The recovery point objective: a drill whose backup is older than this fails.
    pub rpo: Duration,
    /// URLs that must answer 2xx to an HTTP GET once the restore is done.
    pub endpoints: Vec<String>,
    /// Parallel COPY connections of the restore.
    pub jobs: usize,
    pub operator: String,
    /// Which restore to rehearse (auto: physical where it can, see [`physical`]).
    pub method: DrillMethod,
    /// How a physical drill's staging server is made; `None`: no physical drills (auto drills
    /// logically, physical is refused).
    pub physical: Option<PhysicalStaging>,
}

impl DrillPlan {
    /// A logical drill of `source` onto `staging` with the default targets
    /// ([`DEFAULT_RTO_TARGET`], [`DEFAULT_RPO`]), no endpoints and 2 restore jobs.
    pub fn logical(source: &str, staging: &str, operator: &str) -> DrillPlan {
        DrillPlan {
            source: source.to_string(),
            staging: staging.to_string(),
            rto_target: DEFAULT_RTO_TARGET,
            rpo: DEFAULT_RPO,
            endpoints: Vec::new(),
            jobs: 2,
            operator: operator.to_string(),
            method: DrillMethod::Logical,
            physical: None,
        }
    }
}

/// One `[[drills]]` entry of the configuration.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    pub source: String,
    /// `postgres://HOST[:PORT]/DATABASE` of the staging database (dropped and recreated).
    /// Needed by logical drills; a physical drill's staging is a data directory.
    #[serde(default)]
    pub staging: String,
    /// Cron expression of the drills `serve` runs (default [`DEFAULT_SCHEDULE`], monthly);
    /// `"off"`: none (`backstop drill` still runs one).
    pub schedule: Option<String>,
    /// The IANA zone of `schedule` (default the schedules' default, America/New_York).
    pub zone: Option<String>,
    /// URLs that must answer 2xx after the restore (default: the `[[health.endpoints]]` URLs).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Default 5m (seed 001's target for critical systems).
    pub rto_target: Option<crate::schedule::ConfigDuration>,
    /// Default 24h.
    pub rpo: Option<crate::schedule::ConfigDuration>,
    /// Parallel COPY connections of the restore (default 2).
    pub jobs: Option<usize>,
    /// `physical`, `logical` or `auto` (default: physical where the source archives WAL and
    /// has a verified base backup, logical otherwise).
    pub method: Option<DrillMethod>,
    /// The data directory of a physical drill's staging server (absent or empty; kept,
    /// stopped, afterwards). Default a temporary directory, removed afterwards.
    pub staging_dir: Option<std::path::PathBuf>,
    /// The loopback port of a physical drill's staging server (default a free one).
    pub staging_port: Option<u16>,
}

/// The default RTO target: 5 minutes (seed 001).
pub const DEFAULT_RTO_TARGET: Duration = Duration::from_secs(300);
/// The default RPO: 24 hours (a daily backup).
pub const DEFAULT_RPO: Duration = Duration::from_secs(86_400);
/// The default drill schedule: 03:00 on the first Sunday of each month (a weekend night).
pub const DEFAULT_SCHEDULE: &str = "0 3 * * SUN#1";

/// One phase's time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub ms: u64,
}

/// One endpoint's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointCheck {
    pub url: String,
    pub ok: bool,
    pub detail: String,
}

/// One table's counts: in the backup's snapshot, in staging after the restore, in production now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RowCheck {
    pub table: String,
    pub snapshot: u64,
    pub restored: Option<u64>,
    pub production: Option<u64>,
    pub ok: bool,
    pub detail: String,
}

/// A drill's report: what the JSON file holds and what `drill.completed` carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    pub format: u32,
    pub drill_id: Uuid,
    pub source: String,
    /// The staging target, without any password.
    pub staging: String,
    pub method: String,
    /// The backup restored; nil when none could be chosen.
    pub backup_id: Uuid,
    /// When the backup's snapshot was taken.
    pub snapshot_at: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub passed: bool,
    /// Why it failed (every failed check and error, joined), empty when it passed.
    pub reason: String,
    pub rto_ms: u64,
    pub rto_target_ms: u64,
    pub rpo_ms: u64,
    /// The backup's age at the start of the drill: how far behind production staging is.
    pub data_age_ms: Option<u64>,
    pub phases: Vec<Phase>,
    pub endpoints: Vec<EndpointCheck>,
    pub rows: Vec<RowCheck>,
    pub recommendations: Vec<String>,
}

/// Redacts the password of a `postgres://user:password@host/db` URL.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `(server URL with database postgres, database name)` of a `postgres://.../DB[?...]` URL.
fn split_database(url: &str) -> Result<(String, String), OpsError> {
    let bad = || {
        OpsError::Invalid(format!(
            "staging target {:?} is not a postgres://HOST[:PORT]/DATABASE URL; name a database on the staging server",
            redact(url)
        ))
    };
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(bad)?;
    let (path_start, _) = rest
        .char_indices()
        .find(|(_, c)| *c == '/')
        .ok_or_else(bad)?;
    let after = &rest[path_start + 1..];
    let (db, query) = match after.split_once('?') {
        Some((d, q)) => (d, Some(q)),
        None => (after, None),
    };
    if db.is_empty() || db.contains('/') {
        return Err(bad());
    }
    let prefix = &url[..url.len() - rest.len() + path_start];
    let server = match query {
        Some(q) => format!("{prefix}/postgres?{q}"),
        None => format!("{prefix}/postgres"),
    };
    Ok((server, db.to_string()))
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Runs a drill: records `drill.started`, restores, checks, records `drill.completed` with the
/// report. `verified`: the backups that passed verification (`None`: any backup). Returns the report whether the drill passed or not; an error only when the drill's
/// own events cannot be recorded (or the plan is unusable before anything is recorded).
pub async fn run_drill(
    dp: &DataPath,
    plan: &DrillPlan,
    verified: Option<&HashSet<Uuid>>,
) -> Result<DrillReport, OpsError> {
    let start = DrillStart {
        drill_id: backstop_events::uuid_v7(),
        after: 0,
        actor: Actor::operator(&plan.operator),
    };
    run_drill_as(dp, plan, verified, start).await
}

/// Which drill [`run_drill_as`] runs: its id, how many events its stream already holds (1
/// after a `drill.requested`), and who records it.
#[derive(Clone, Debug)]
pub struct DrillStart {
    pub drill_id: Uuid,
    pub after: u64,
    pub actor: Actor,
}

/// [`run_drill`] with a given id, appending `drill.started` at version `after` of its stream
/// (so a second run of the same drill fails with a ledger conflict before it restores
/// anything) and `drill.completed` right after it.
pub async fn run_drill_as(
    dp: &DataPath,
    plan: &DrillPlan,
    verified: Option<&HashSet<Uuid>>,
    start: DrillStart,
) -> Result<DrillReport, OpsError> {
    let production = dp
        .sources
        .iter()
        .find(|s| s.name == plan.source)
        .ok_or_else(|| OpsError::UnknownSource(plan.source.clone()))?;
    let production = match &production.kind {
        SourceKind::Postgres(p) => p.conninfo.clone(),
        other => {
            return Err(OpsError::Invalid(format!(
                "source `{}` is a {} source; drills restore PostgreSQL sources only",
                plan.source,
                other.name()
            )));
        }
    };
    // The method, chosen before anything is recorded; a logical drill's staging URL and a
    // physical drill's staging directory are checked now.
    let clock = Instant::now();
    let fetched = match physical::choose(dp, plan, verified).await? {
        physical::Choice::Physical(backup) => {
            let staging = plan.physical.as_ref().ok_or_else(|| {
                OpsError::Invalid("a physical drill needs its staging settings".into())
            })?;
            Fetched::Physical(*backup, staging, physical::Layout::prepare(staging)?)
        }
        physical::Choice::Logical => {
            if plan.staging.is_empty() {
                return Err(OpsError::Invalid(format!(
                    "a logical drill of `{}` restores into a staging database: name one (postgres://HOST[:PORT]/DATABASE)",
                    plan.source
                )));
            }
            let (staging_server, staging_db) = split_database(&plan.staging)?;
            if same_database(&production, &plan.staging) {
                return Err(OpsError::Invalid(format!(
                    "the staging target {} is the source's own database; a drill drops and recreates its staging database, so name a database on another server (or another database)",
                    redact(&plan.staging)
                )));
            }
            // Fetch: the newest verified logical backup, its manifest and dump report.
            let chosen = catalog::resolve_backup(
                &dp.repo,
                "latest",
                &Selector {
                    source: Some(&plan.source),
                    method: Some(BackupMethod::Logical),
                    verified,
                },
            )
            .await
            .and_then(|r| {
                let dump = catalog::dump_report(&r.manifest)?;
                Ok((r.manifest, dump))
            });
            Fetched::Logical(chosen, staging_server, staging_db)
        }
    };
    let fetch_ms = ms(clock.elapsed());
    let drill_id = start.drill_id;
    let started_at = backstop_events::now_micros();
    let actor = start.actor;
    let stream = streams::drill(drill_id);
    let (method, target, backup_id) = match &fetched {
        Fetched::Logical(chosen, ..) => (
            "logical",
            redact(&plan.staging),
            chosen.as_ref().map(|(m, _)| m.backup_id),
        ),
        Fetched::Physical(chosen, _, layout) => (
            "physical",
            layout.describe(),
            chosen.as_ref().map(|b| b.manifest.backup_id),
        ),
    };
    let backup_id = backup_id.unwrap_or(Uuid::nil());
    let started = Event::DrillStarted(DrillStarted {
        drill_id,
        backup_id,
        target: target.clone(),
        source: plan.source.clone(),
        method: method.into(),
    });
    let mut n = NewEvent::new(&stream, actor.clone(), &started);
    n.id = backstop_events::uuid_v7_derived(drill_id, started_at, "started");
    let at = match start.after {
        0 => ExpectedVersion::NoStream,
        v => ExpectedVersion::Exact(v),
    };
    dp.appender.append(&stream, at, vec![n]).await?;
    tracing::info!(drill = %drill_id, source = %plan.source, backup = %backup_id, method, "drill started");

    let mut report = DrillReport {
        format: 1,
        drill_id,
        source: plan.source.clone(),
        staging: target,
        method: method.into(),
        backup_id,
        snapshot_at: None,
        started_at,
        finished_at: started_at,
        passed: false,
        reason: String::new(),
        rto_ms: 0,
        rto_target_ms: ms(plan.rto_target),
        rpo_ms: ms(plan.rpo),
        data_age_ms: None,
        phases: vec![Phase {
            name: "fetch".into(),
            ms: fetch_ms,
        }],
        endpoints: Vec::new(),
        rows: Vec::new(),
        recommendations: Vec::new(),
    };
    let mut failures: Vec<String> = Vec::new();

    match fetched {
        Fetched::Logical(Err(e), ..) | Fetched::Physical(Err(e), ..) => {
            failures.push(format!("no backup to restore: {}", e.chain()))
        }
        Fetched::Physical(Ok(backup), staging, layout) => {
            physical::execute(
                dp,
                plan,
                staging,
                &layout,
                backup,
                &production,
                &mut report,
                &mut failures,
            )
            .await
        }
        Fetched::Logical(Ok((manifest, dump)), staging_server, staging_db) => {
            report.snapshot_at = Some(dump.started_at);
            let age = (started_at - dump.started_at).num_milliseconds().max(0) as u64;
            report.data_age_ms = Some(age);
            let clock = Instant::now();
            let restored =
                restore_into_staging(dp, manifest, plan, &staging_server, &staging_db).await;
            report.phases.push(Phase {
                name: "restore".into(),
                ms: ms(clock.elapsed()),
            });
            report.phases.push(Phase {
                name: "replay".into(),
                ms: 0,
            });
            match restored {
                Err(e) => failures.push(format!("the staging restore failed: {}", e.chain())),
                Ok(restored) => {
                    let clock = Instant::now();
                    report.endpoints = check_endpoints(&plan.endpoints).await;
                    let snapshot: Vec<(String, u64)> = dump
                        .tables
                        .iter()
                        .filter(|t| t.part.is_some())
                        .map(|t| (format!("{}.{}", t.table.schema, t.table.name), t.rows))
                        .collect();
                    let production_counts = count_rows(&production, &snapshot).await;
                    report.rows = compare_rows(&snapshot, &restored, &production_counts);
                    judge_checks(&report, &mut failures);
                    report.phases.push(Phase {
                        name: "checks".into(),
                        ms: ms(clock.elapsed()),
                    });
                }
            }
        }
    }
    report.rto_ms = report.phases.iter().map(|p| p.ms).sum();
    if failures.is_empty() && report.rto_ms > report.rto_target_ms {
        failures.push(format!(
            "the recovery took {}, over the RTO target of {}",
            human_ms(report.rto_ms),
            human_ms(report.rto_target_ms)
        ));
    }
    report.passed = failures.is_empty();
    report.reason = failures.join("; ");
    report.recommendations = recommendations(&report);
    report.finished_at = backstop_events::now_micros();

    let completed = Event::DrillCompleted(DrillCompleted {
        drill_id,
        backup_id,
        passed: report.passed,
        recovery_ms: report.rto_ms,
        report: serde_json::to_value(&report).unwrap_or_default(),
        source: plan.source.clone(),
        rto_target_ms: report.rto_target_ms,
        reason: report.reason.clone(),
    });
    let mut n = NewEvent::new(&stream, actor, &completed);
    n.id = backstop_events::uuid_v7_derived(drill_id, started_at, "completed");
    dp.appender
        .append(&stream, ExpectedVersion::Exact(start.after + 1), vec![n])
        .await?;
    tracing::info!(drill = %drill_id, passed = report.passed, rto_ms = report.rto_ms, "drill completed");
    Ok(report)
}

/// What a drill found to restore, with where it restores it.
enum Fetched<'a> {
    /// The backup and its dump report; the staging server's URL and the database.
    Logical(
        Result<(Manifest, backstop_sources::pg::logical::DumpReport), OpsError>,
        String,
        String,
    ),
    Physical(
        Result<catalog::PhysicalBackup, OpsError>,
        &'a PhysicalStaging,
        physical::Layout,
    ),
}

/// The checks' failures, once they ran: endpoints that did not answer, tables whose counts
/// break the row rule, a backup older than the RPO.
fn judge_checks(report: &DrillReport, failures: &mut Vec<String>) {
    for e in report.endpoints.iter().filter(|e| !e.ok) {
        failures.push(format!("endpoint {} {}", e.url, e.detail));
    }
    for r in report.rows.iter().filter(|r| !r.ok) {
        failures.push(format!("table {}: {}", r.table, r.detail));
    }
    if let Some(age) = report.data_age_ms
        && age > report.rpo_ms
    {
        failures.push(format!(
            "the newest verified backup is {} old, beyond the RPO of {}",
            human_ms(age),
            human_ms(report.rpo_ms)
        ));
    }
}

/// True when two postgres URLs name the same host, port and database (users ignored).
fn same_database(a: &str, b: &str) -> bool {
    fn key(u: &str) -> Option<String> {
        let rest = u
            .strip_prefix("postgres://")
            .or_else(|| u.strip_prefix("postgresql://"))?;
        let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
        let rest = rest.split('?').next()?;
        let (hostport, db) = rest.split_once('/')?;
        let hostport = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:5432")
        };
        Some(format!(
            "{}/{db}",
            hostport.replace("localhost", "127.0.0.1")
        ))
    }
    matches!((key(a), key(b)), (Some(x), Some(y)) if x == y)
}

/// Drops and recreates the staging database, then restores into it through the restore use
/// case. Returns each restored table's rows.
async fn restore_into_staging(
    dp: &DataPath,
    manifest: Manifest,
    plan: &DrillPlan,
    server: &str,
    db: &str,
) -> Result<BTreeMap<String, u64>, OpsError> {
    let scratch = |source| OpsError::Scratch {
        server: redact(server),
        source,
    };
    let mut conn = sqlx::PgConnection::connect(server).await.map_err(scratch)?;
    let quoted = format!("\"{}\"", db.replace('"', "\"\""));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .map_err(scratch)?;
    let _ = conn.close().await;
    let recovery = Recovery::new(
        &plan.operator,
        RecoveryScope {
            target: redact(&plan.staging),
            tables: Vec::new(),
            point_in_time: None,
            dry_run: false,
        },
    );
    let options = RestoreOptions {
        jobs: plan.jobs.max(1),
        create_db: true,
        no_owner: true,
        ..RestoreOptions::default()
    };
    let report = restore::restore_logical(dp, manifest, &recovery, &plan.staging, options).await?;
    let mut rows: BTreeMap<String, u64> = report
        .tables
        .iter()
        .map(|t| (format!("{}.{}", t.table.schema, t.table.name), t.rows))
        .collect();
    for t in &report.empty_tables {
        rows.entry(format!("{}.{}", t.schema, t.name)).or_insert(0);
    }
    Ok(rows)
}

/// GETs each endpoint (10 s each); a 2xx answer passes.
async fn check_endpoints(urls: &[String]) -> Vec<EndpointCheck> {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            return urls
                .iter()
                .map(|u| EndpointCheck {
                    url: u.clone(),
                    ok: false,
                    detail: format!("no HTTP client: {e}"),
                })
                .collect();
        }
    };
    let mut out = Vec::new();
    for url in urls {
        let clock = Instant::now();
        let (ok, detail) = match client.get(url).send().await {
            Ok(r) if r.status().is_success() => (
                true,
                format!("answered {} in {} ms", r.status(), ms(clock.elapsed())),
            ),
            Ok(r) => (false, format!("answered {}", r.status())),
            Err(e) => (false, format!("did not answer: {e}")),
        };
        out.push(EndpointCheck {
            url: url.clone(),
            ok,
            detail,
        });
    }
    out
}

/// Production's row counts now, per table (`None` where it cannot be counted).
async fn count_rows(conninfo: &str, tables: &[(String, u64)]) -> BTreeMap<String, Option<u64>> {
    let mut out = BTreeMap::new();
    let mut conn = match sqlx::PgConnection::connect(conninfo).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "drill: cannot count production's rows");
            None
        }
    };
    for (table, _) in tables {
        let count = match conn.as_mut() {
            None => None,
            Some(c) => {
                let (schema, name) = table.split_once('.').unwrap_or(("public", table));
                let sql = format!(
                    "SELECT count(*) FROM \"{}\".\"{}\"",
                    schema.replace('"', "\"\""),
                    name.replace('"', "\"\"")
                );
                sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
                    .fetch_one(&mut *c)
                    .await
                    .ok()
                    .map(|n| n.max(0) as u64)
            }
        };
        out.insert(table.clone(), count);
    }
    out
}

/// The row-count rule, per table with data in the backup:
///
/// 1. staging must hold exactly the snapshot's count (the manifest's, counted as the rows
///    streamed out of the source's snapshot): any difference means the restore lost or invented
///    rows, and fails;
/// 2. production now must hold at least... nothing is required of production's count: it moves
///    (inserts and deletes since the snapshot). Its difference from the snapshot is the RPO
///    window's growth, reported per table; the RPO itself is enforced on the backup's age (a
///    backup older than the RPO fails the drill), because the age, not a count, is what bounds
///    the data a recovery would lose. A table production no longer has is reported, not failed.
pub fn compare_rows(
    snapshot: &[(String, u64)],
    restored: &BTreeMap<String, u64>,
    production: &BTreeMap<String, Option<u64>>,
) -> Vec<RowCheck> {
    snapshot
        .iter()
        .map(|(table, snap)| {
            let got = restored.get(table).copied();
            let prod = production.get(table).copied().flatten();
            let growth = match prod {
                Some(p) => format!(
                    "; production now {p} ({:+} since the snapshot)",
                    p as i64 - *snap as i64
                ),
                None => "; production's count unavailable".into(),
            };
            let (ok, detail) = match got {
                None => (false, format!("missing in staging (snapshot {snap})")),
                Some(g) if g != *snap => (
                    false,
                    format!("staging holds {g} rows, the snapshot {snap}{growth}"),
                ),
                Some(g) => (true, format!("staging {g} = snapshot{growth}")),
            };
            RowCheck {
                table: table.clone(),
                snapshot: *snap,
                restored: got,
                production: prod,
                ok,
                detail,
            }
        })
        .collect()
}

/// Recommendations drawn from the figures.
pub fn recommendations(r: &DrillReport) -> Vec<String> {
    let mut out = Vec::new();
    let phase = |n: &str| {
        r.phases
            .iter()
            .find(|p| p.name == n)
            .map(|p| p.ms)
            .unwrap_or(0)
    };
    let share = |n: &str| {
        if r.rto_ms == 0 {
            0.0
        } else {
            phase(n) as f64 * 100.0 / r.rto_ms as f64
        }
    };
    let physical = r.method == "physical";
    if r.rto_target_ms > 0 && r.rto_ms > r.rto_target_ms {
        out.push(format!(
            "the recovery took {} against a target of {}: {}, or revisit the target",
            human_ms(r.rto_ms),
            human_ms(r.rto_target_ms),
            if physical {
                "take base backups more often (less WAL to replay), keep the repository near the staging server"
            } else {
                "restore a physical backup (no rebuild of indexes), raise the restore's jobs"
            }
        ));
    } else if r.rto_target_ms > 0 && r.rto_ms * 10 > r.rto_target_ms * 8 {
        out.push(format!(
            "the recovery used {:.0}% of the RTO target: little margin is left as the data grows",
            r.rto_ms as f64 * 100.0 / r.rto_target_ms as f64
        ));
    }
    if share("replay") >= 50.0 {
        out.push(format!(
            "replay took {:.0}% of the RTO: take base backups more often",
            share("replay")
        ));
    }
    if share("restore") >= 70.0 && r.rto_ms > 60_000 {
        out.push(if physical {
            format!(
                "laying out the base backup took {:.0}% of the RTO: the repository's read speed from here bounds it (keep a replica near the staging server)",
                share("restore")
            )
        } else {
            format!(
                "the restore took {:.0}% of the RTO: more restore jobs, or a physical backup, shortens it",
                share("restore")
            )
        });
    }
    if share("fetch") >= 30.0 && r.rto_ms > 10_000 {
        out.push(format!(
            "finding the backup took {:.0}% of the RTO: the repository answers slowly from here",
            share("fetch")
        ));
    }
    if share("checks") >= 30.0 && r.rto_ms > 10_000 {
        out.push(format!(
            "the checks took {:.0}% of the RTO: count fewer or smaller tables, or check endpoints with a shorter timeout",
            share("checks")
        ));
    }
    if let Some(age) = r.data_age_ms
        && r.rpo_ms > 0
        && age * 10 > r.rpo_ms * 8
    {
        out.push(format!(
            "the backup was {} old against an RPO of {}: back up (or archive WAL) more often",
            human_ms(age),
            human_ms(r.rpo_ms)
        ));
    }
    if r.rows.iter().any(|x| !x.ok) {
        out.push(
            "row counts differ from the snapshot: run `backstop verify` on the backup and `backstop check --read-data`".into(),
        );
    }
    if r.endpoints.iter().any(|e| !e.ok) {
        out.push("an endpoint did not answer after the restore: check the application is pointed at staging and starts from restored data alone".into());
    }
    if r.backup_id.is_nil() {
        out.push("no backup could be restored: take a backup of the source and verify it (`backstop verify`), then drill again".into());
    }
    if r.reason.contains("staging restore failed") {
        out.push("the restore failed: run `backstop check --read-data`, and drill the previous backup to know what can be restored".into());
    }
    if out.is_empty() && r.passed {
        out.push("nothing to change: the recovery met its targets".into());
    }
    out
}

/// `1 h 02 min`, `3 min 05 s`, `4.2 s`, `350 ms`.
pub fn human_ms(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {:02} s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{} h {:02} min", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

impl DrillReport {
    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        s.push_str(&format!(
            "# Drill {} of `{}`: {verdict}\n\n",
            self.drill_id, self.source
        ));
        s.push_str(&format!(
            "- backup: {} ({}), snapshot {}\n- staging: {}\n- started {}, finished {}\n- RTO: **{}** against a target of {}\n- RPO: {}; data age {}\n",
            self.backup_id,
            self.method,
            self.snapshot_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into()),
            self.staging,
            self.started_at.to_rfc3339(),
            self.finished_at.to_rfc3339(),
            human_ms(self.rto_ms),
            human_ms(self.rto_target_ms),
            human_ms(self.rpo_ms),
            self.data_age_ms.map(human_ms).unwrap_or_else(|| "-".into()),
        ));
        if !self.passed {
            s.push_str(&format!("- reason: {}\n", self.reason));
        }
        s.push_str("\n## Phases\n\n| phase | time | share |\n| --- | ---: | ---: |\n");
        for p in &self.phases {
            s.push_str(&format!(
                "| {} | {} | {:.0}% |\n",
                p.name,
                human_ms(p.ms),
                if self.rto_ms == 0 {
                    0.0
                } else {
                    p.ms as f64 * 100.0 / self.rto_ms as f64
                }
            ));
        }
        if !self.endpoints.is_empty() {
            s.push_str("\n## Endpoints\n\n| endpoint | ok | detail |\n| --- | --- | --- |\n");
            for e in &self.endpoints {
                s.push_str(&format!(
                    "| {} | {} | {} |\n",
                    e.url,
                    if e.ok { "yes" } else { "NO" },
                    e.detail
                ));
            }
        }
        if !self.rows.is_empty() {
            s.push_str("\n## Row counts\n\n| table | snapshot | staging | production | ok |\n| --- | ---: | ---: | ---: | --- |\n");
            let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            for r in &self.rows {
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    r.table,
                    r.snapshot,
                    opt(r.restored),
                    opt(r.production),
                    if r.ok { "yes" } else { "NO" }
                ));
            }
        }
        s.push_str("\n## Recommendations\n\n");
        for r in &self.recommendations {
            s.push_str(&format!("- {r}\n"));
        }
        s
    }

    /// The report as a self-contained HTML page (every value escaped).
    pub fn html(&self) -> String {
        let e = escape;
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        let mut s = format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Drill {id}</title>\
             <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
             td,th{{border:1px solid #ccc;padding:4px 8px}}.pass{{color:#070}}.fail{{color:#b00}}</style>\
             </head><body><h1>Drill of <code>{src}</code>: <span class=\"{cls}\">{verdict}</span></h1>\
             <p>Backup {backup} ({method}) to {staging}.<br>RTO <b>{rto}</b> against a target of {target}; \
             RPO {rpo}, data age {age}.</p>",
            id = self.drill_id,
            src = e(&self.source),
            cls = if self.passed { "pass" } else { "fail" },
            backup = self.backup_id,
            method = e(&self.method),
            staging = e(&self.staging),
            rto = human_ms(self.rto_ms),
            target = human_ms(self.rto_target_ms),
            rpo = human_ms(self.rpo_ms),
            age = self.data_age_ms.map(human_ms).unwrap_or_else(|| "-".into()),
        );
        if !self.passed {
            s.push_str(&format!(
                "<p class=\"fail\">Reason: {}</p>",
                e(&self.reason)
            ));
        }
        s.push_str("<h2>Phases</h2><table><tr><th>phase</th><th>time</th></tr>");
        for p in &self.phases {
            s.push_str(&format!(
                "<tr><td>{}</td><td>{}</td></tr>",
                e(&p.name),
                human_ms(p.ms)
            ));
        }
        s.push_str("</table>");
        if !self.endpoints.is_empty() {
            s.push_str(
                "<h2>Endpoints</h2><table><tr><th>endpoint</th><th>ok</th><th>detail</th></tr>",
            );
            for x in &self.endpoints {
                s.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                    e(&x.url),
                    if x.ok { "yes" } else { "NO" },
                    e(&x.detail)
                ));
            }
            s.push_str("</table>");
        }
        if !self.rows.is_empty() {
            s.push_str("<h2>Row counts</h2><table><tr><th>table</th><th>snapshot</th><th>staging</th><th>production</th><th>ok</th></tr>");
            let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            for r in &self.rows {
                s.push_str(&format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    e(&r.table),
                    r.snapshot,
                    opt(r.restored),
                    opt(r.production),
                    if r.ok { "yes" } else { "NO" }
                ));
            }
            s.push_str("</table>");
        }
        s.push_str("<h2>Recommendations</h2><ul>");
        for r in &self.recommendations {
            s.push_str(&format!("<li>{}</li>", e(r)));
        }
        s.push_str("</ul></body></html>\n");
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_urls_split_and_redact() {
        assert_eq!(
            split_database("postgres://u:pw@h:5433/stage?sslmode=disable").unwrap(),
            (
                "postgres://u:pw@h:5433/postgres?sslmode=disable".to_string(),
                "stage".to_string()
            )
        );
        assert!(split_database("postgres://h:5433").is_err());
        assert_eq!(redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert!(same_database(
            "postgres://a@localhost/app",
            "postgres://127.0.0.1:5432/app"
        ));
        assert!(!same_database("postgres://h:1/app", "postgres://h:1/stage"));
    }

    #[test]
    fn rows_must_equal_the_snapshot_and_production_may_move() {
        let snap = vec![("public.a".to_string(), 10), ("public.b".to_string(), 5)];
        let restored = BTreeMap::from([("public.a".to_string(), 10), ("public.b".to_string(), 4)]);
        let prod = BTreeMap::from([
            ("public.a".to_string(), Some(12)),
            ("public.b".to_string(), None),
        ]);
        let rows = compare_rows(&snap, &restored, &prod);
        assert!(rows[0].ok, "{rows:?}");
        assert!(rows[0].detail.contains("+2"), "{rows:?}");
        assert!(!rows[1].ok);
    }

    #[test]
    fn replay_heavy_drills_recommend_more_base_backups() {
        let mut r = DrillReport {
            format: 1,
            drill_id: Uuid::nil(),
            source: "s".into(),
            staging: "x".into(),
            method: "physical".into(),
            backup_id: Uuid::nil(),
            snapshot_at: None,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            passed: true,
            reason: String::new(),
            rto_ms: 100_000,
            rto_target_ms: 300_000,
            rpo_ms: 0,
            data_age_ms: None,
            phases: vec![
                Phase {
                    name: "fetch".into(),
                    ms: 10_000,
                },
                Phase {
                    name: "restore".into(),
                    ms: 20_000,
                },
                Phase {
                    name: "replay".into(),
                    ms: 70_000,
                },
            ],
            endpoints: vec![],
            rows: vec![],
            recommendations: vec![],
        };
        let recs = recommendations(&r);
        assert!(
            recs.iter()
                .any(|x| x.contains("replay took 70% of the RTO: take base backups more often")),
            "{recs:?}"
        );
        r.rto_ms = 400_000;
        assert!(
            recommendations(&r)
                .iter()
                .any(|x| x.contains("against a target"))
        );
        assert!(r.html().contains("replay") && r.markdown().contains("| replay |"));
    }
}
