//! Physical drills: the newest verified base backup of a source laid out into a staging data
//! directory, a throwaway PostgreSQL started on it (the verify worker's private server,
//! [`backstop_sources::pg::physical::PrivateServer`], here also on a loopback port) that replays
//! the archived WAL through `backstop wal-fetch` to the latest archived point and promotes, then
//! the drill's checks against it while it runs.
//!
//! Which method a drill uses ([`DrillMethod`]): `logical` restores the newest verified logical
//! backup into the staging database; `physical` the newest verified base backup plus WAL, and
//! fails (recorded, with the reason) when there is none or the source archives no WAL since it;
//! `auto` (the default) is physical when the plan can start a staging server and the source has
//! a verified base backup with WAL archived since its start, logical otherwise.
//!
//! Phases: `fetch` (choosing the base backup and checking the archive), `restore` (laying out
//! the base backup: its chunks fetched, decrypted and written as they stream, and the recovery
//! settings), `replay` (from the server's start to the end of recovery: WAL fetched and
//! replayed), `checks` (endpoints and row counts, the server running).
//!
//! Row counts ([`compare_rows_physical`]): a base backup records no per-table counts, and the
//! recovered cluster is the source as of its last archived commit, so staging's count is that
//! point's. Every table production has now must exist in staging (a table missing means WAL
//! since its creation is not archived, or was lost: the drill fails); production's difference
//! from staging is the change not yet archived, reported, not failed. The RPO is enforced on the
//! data's age: the drill's start minus the last replayed commit (the base backup's end when
//! recovery replayed no commit).
//!
//! Invariants: the staging directory is new (absent or empty: a drill never lays out over
//! data); the server is always stopped when the drill ends (the server guard stops it on drop);
//! a temporary staging directory is removed afterwards, a named one is kept, stopped, for
//! inspection.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use backstop_events::{Actor, BackupMethod};
use backstop_sources::pg::ConnInfo;
use backstop_sources::pg::logical::row_counts;
use backstop_sources::pg::physical::{PrivateServer, RecoveryTarget};
use backstop_sources::pg::wal::{WalError, WalFile, WalKind, WalStore};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{DrillPlan, DrillReport, Phase, RowCheck, check_endpoints, judge_checks, ms};
use crate::catalog::{PhysicalBackup, Selector};
use crate::context::DataPath;
use crate::error::OpsError;
use crate::restore;
use crate::verify::{PhysicalVerifySettings, scratch_dir};
use crate::wal::RepoWalStore;

/// Which restore a drill rehearses (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrillMethod {
    #[default]
    Auto,
    Logical,
    Physical,
}

impl std::str::FromStr for DrillMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<DrillMethod, String> {
        match s {
            "auto" => Ok(DrillMethod::Auto),
            "logical" => Ok(DrillMethod::Logical),
            "physical" => Ok(DrillMethod::Physical),
            other => Err(format!(
                "unknown drill method {other:?}: say physical, logical or auto"
            )),
        }
    }
}

impl std::fmt::Display for DrillMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DrillMethod::Auto => "auto",
            DrillMethod::Logical => "logical",
            DrillMethod::Physical => "physical",
        })
    }
}

/// How a physical drill's staging server is made.
#[derive(Clone, Debug)]
pub struct PhysicalStaging {
    /// The verify worker's settings: the `restore_command` (`backstop wal-fetch`), where
    /// temporary directories go, the server programs and the account the server runs as.
    pub settings: PhysicalVerifySettings,
    /// The staging data directory: absent or empty; kept (stopped) afterwards. `None`: a
    /// temporary directory under `settings.work_dir`, removed afterwards.
    pub dir: Option<PathBuf>,
    /// The loopback port the staging server listens on (default: a free one).
    pub port: Option<u16>,
}

/// What a drill restores, chosen before it starts.
pub(super) enum Choice {
    Logical,
    /// The base backup, or why there is none to replay (a failed drill).
    Physical(Box<Result<PhysicalBackup, OpsError>>),
}

/// Chooses the method (see the module docs). An error only for a plan that cannot drill
/// physically when told to.
pub(super) async fn choose(
    dp: &DataPath,
    plan: &DrillPlan,
    verified: Option<&HashSet<Uuid>>,
) -> Result<Choice, OpsError> {
    match plan.method {
        DrillMethod::Logical => Ok(Choice::Logical),
        DrillMethod::Physical if plan.physical.is_none() => Err(OpsError::Invalid(format!(
            "a physical drill of `{}` needs a staging server to start (the verify worker's settings: postgres binaries, restore_command); drill with --method logical, or run it through `backstop drill`",
            plan.source
        ))),
        DrillMethod::Physical => Ok(Choice::Physical(Box::new(
            replayable(dp, &plan.source, verified).await,
        ))),
        DrillMethod::Auto if plan.physical.is_none() => Ok(Choice::Logical),
        DrillMethod::Auto => match replayable(dp, &plan.source, verified).await {
            Ok(b) => Ok(Choice::Physical(Box::new(Ok(b)))),
            Err(e) => {
                tracing::info!(source = %plan.source, reason = %e.chain(), "drill: no physical restore possible, drilling the logical backup");
                Ok(Choice::Logical)
            }
        },
    }
}

/// The newest (verified) base backup of `source` that the WAL archive continues: some segment
/// at or after its start segment is archived.
async fn replayable(
    dp: &DataPath,
    source: &str,
    verified: Option<&HashSet<Uuid>>,
) -> Result<PhysicalBackup, OpsError> {
    let backup = restore::select_base_backup(
        &dp.repo,
        "latest",
        &Selector {
            source: Some(source),
            method: Some(BackupMethod::Physical),
            verified,
        },
        &RecoveryTarget::Latest,
    )
    .await?;
    let store = RepoWalStore::new(
        dp.repo.with_access(
            Actor::worker("drill").to_string(),
            format!("drill: listing the archived WAL of {source}"),
        ),
        source,
    );
    let entries = store.list().await.map_err(WalError::from)?;
    let start = &backup.report.start_segment;
    let archives = entries
        .iter()
        .filter_map(|e| WalFile::parse(&e.name))
        .any(|f| f.kind == WalKind::Segment && f.name >= *start);
    if !archives {
        return Err(OpsError::NoBackup(format!(
            "`{source}` archives no WAL since its newest base backup {} (which starts at segment {start}): a physical drill replays WAL to the latest archived point; set the source's archive_command to `backstop wal-push`, or drill with --method logical",
            backup.manifest.backup_id
        )));
    }
    Ok(backup)
}

/// Where a physical drill's staging server lives, prepared before the drill is recorded.
pub(super) struct Layout {
    /// The temporary directory to remove afterwards (`None`: a named directory, kept).
    temp: Option<PathBuf>,
    pub(super) dir: PathBuf,
    pub(super) port: u16,
}

impl Layout {
    pub(super) fn prepare(staging: &PhysicalStaging) -> Result<Layout, OpsError> {
        let port = match staging.port {
            Some(p) => p,
            None => std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| {
                    OpsError::io("finding a free loopback port for the staging server", e)
                })?,
        };
        match &staging.dir {
            Some(dir) => {
                let empty = match std::fs::read_dir(dir) {
                    Ok(mut entries) => entries.next().is_none(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                    Err(e) => {
                        return Err(OpsError::io(
                            format!("reading the staging directory {}", dir.display()),
                            e,
                        ));
                    }
                };
                if !empty {
                    return Err(OpsError::Invalid(format!(
                        "the staging directory {} is not empty; a drill lays a base backup out into a new directory: name an absent or empty one, or leave --staging-dir out for a temporary one",
                        dir.display()
                    )));
                }
                Ok(Layout {
                    temp: None,
                    dir: dir.clone(),
                    port,
                })
            }
            None => {
                let work = scratch_dir(staging.settings.work_dir.as_deref(), "backstop-drill")?;
                Ok(Layout {
                    dir: work.join("data"),
                    temp: Some(work),
                    port,
                })
            }
        }
    }

    /// The staging target as reports and `drill.started` name it.
    pub(super) fn describe(&self) -> String {
        format!(
            "127.0.0.1:{} (data directory {}{})",
            self.port,
            self.dir.display(),
            if self.temp.is_some() {
                ", temporary"
            } else {
                ""
            }
        )
    }

    async fn clean_up(&self) {
        if let Some(work) = &self.temp
            && let Err(e) = tokio::fs::remove_dir_all(work).await
        {
            tracing::warn!(dir = %work.display(), error = %e, "could not remove the drill's staging directory");
        }
    }
}

/// Lays out, replays and checks (see the module docs), pushing each phase that ran into
/// `report` and each failure into `failures`; the caller judges the checks and records.
#[allow(clippy::too_many_arguments)]
pub(super) async fn execute(
    dp: &DataPath,
    plan: &DrillPlan,
    staging: &PhysicalStaging,
    layout: &Layout,
    backup: PhysicalBackup,
    production: &str,
    report: &mut DrillReport,
    failures: &mut Vec<String>,
) {
    run_phases(
        dp, plan, staging, layout, &backup, production, report, failures,
    )
    .await;
    layout.clean_up().await;
}

#[allow(clippy::too_many_arguments)]
async fn run_phases(
    dp: &DataPath,
    plan: &DrillPlan,
    staging: &PhysicalStaging,
    layout: &Layout,
    backup: &PhysicalBackup,
    production: &str,
    report: &mut DrillReport,
    failures: &mut Vec<String>,
) {
    report.snapshot_at = Some(backup.report.finished_at);
    let settings = &staging.settings;
    let clock = Instant::now();
    let laid = match settings.restore_options(&backup.manifest.source, RecoveryTarget::Latest) {
        Ok(opts) => {
            restore::restore_physical(
                &dp.repo,
                dp.appender.as_ref(),
                backup,
                &layout.dir,
                &opts,
                &plan.operator,
            )
            .await
        }
        Err(e) => Err(e),
    };
    report.phases.push(Phase {
        name: "restore".into(),
        ms: ms(clock.elapsed()),
    });
    if let Err(e) = laid {
        failures.push(format!("the staging restore failed: {}", e.chain()));
        return;
    }

    let clock = Instant::now();
    let su = settings.verify.superuser.clone();
    let started = async {
        let mut server =
            PrivateServer::start(&layout.dir, &settings.verify, Some(layout.port)).await?;
        let end = server.wait_recovered(&su, settings.verify.timeout).await?;
        Ok::<_, OpsError>((server, end))
    }
    .await;
    report.phases.push(Phase {
        name: "replay".into(),
        ms: ms(clock.elapsed()),
    });
    let (mut server, end) = match started {
        Ok(s) => s,
        Err(e) => {
            failures.push(format!(
                "WAL replay on the staging server failed: {}",
                e.chain()
            ));
            return;
        }
    };

    let clock = Instant::now();
    let point = end.last_commit.unwrap_or(backup.report.finished_at);
    report.snapshot_at = Some(point);
    report.data_age_ms = Some((report.started_at - point).num_milliseconds().max(0) as u64);
    report.endpoints = check_endpoints(&plan.endpoints).await;
    let database = ConnInfo::parse(production)
        .ok()
        .and_then(|c| c.database().map(str::to_string))
        .unwrap_or_else(|| "postgres".into());
    let keyed = |m: BTreeMap<backstop_sources::pg::QualifiedName, u64>| {
        m.into_iter()
            .map(|(t, n)| (format!("{}.{}", t.schema, t.name), n))
            .collect::<BTreeMap<String, u64>>()
    };
    match row_counts(&server.conninfo(&su, &database)).await {
        Err(e) => failures.push(format!("counting staging's rows in {database} failed: {e}")),
        Ok(restored) => {
            let production = match row_counts(production).await {
                Ok(p) => Some(keyed(p)),
                Err(e) => {
                    tracing::warn!(error = %e, "drill: cannot count production's rows");
                    None
                }
            };
            report.rows = compare_rows_physical(&keyed(restored), production.as_ref());
        }
    }
    judge_checks(report, failures);
    server.stop();
    report.phases.push(Phase {
        name: "checks".into(),
        ms: ms(clock.elapsed()),
    });
}

/// The physical row-count rule (see the module docs): every table production has must be in
/// staging; staging's count is the recovery point's, production's difference is reported.
/// `production`: `None` when production cannot be counted (then staging's tables are listed,
/// all passing).
pub fn compare_rows_physical(
    restored: &BTreeMap<String, u64>,
    production: Option<&BTreeMap<String, u64>>,
) -> Vec<RowCheck> {
    let mut tables: Vec<&String> = restored.keys().collect();
    if let Some(p) = production {
        tables.extend(p.keys().filter(|t| !restored.contains_key(*t)));
        tables.sort();
    }
    tables
        .into_iter()
        .map(|table| {
            let got = restored.get(table).copied();
            let prod = production.and_then(|p| p.get(table).copied());
            let (ok, detail) = match (got, prod) {
                (None, Some(p)) => (
                    false,
                    format!(
                        "missing in staging, production has {p} rows: the WAL since its creation is not archived, or was lost"
                    ),
                ),
                (Some(g), Some(p)) => (
                    true,
                    format!(
                        "staging {g} at the recovery point; production now {p} ({:+} not yet archived or since)",
                        p as i64 - g as i64
                    ),
                ),
                (Some(g), None) if production.is_some() => (
                    true,
                    format!("staging {g}; production no longer has it"),
                ),
                (Some(g), None) => (
                    true,
                    format!("staging {g}; production's count unavailable"),
                ),
                (None, None) => (false, "counted nowhere".into()),
            };
            RowCheck {
                table: table.clone(),
                snapshot: got.unwrap_or(0),
                restored: got,
                production: prod,
                ok,
                detail,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_and_print() {
        for m in ["auto", "logical", "physical"] {
            assert_eq!(m.parse::<DrillMethod>().unwrap().to_string(), m);
        }
        assert!("pitr".parse::<DrillMethod>().is_err());
    }

    #[test]
    fn a_table_production_has_and_staging_lacks_fails() {
        let restored = BTreeMap::from([("public.a".to_string(), 10)]);
        let prod = BTreeMap::from([("public.a".to_string(), 12), ("public.b".to_string(), 3)]);
        let rows = compare_rows_physical(&restored, Some(&prod));
        assert_eq!(rows.len(), 2);
        assert!(rows[0].ok && rows[0].detail.contains("+2"), "{rows:?}");
        assert_eq!(rows[0].snapshot, 10);
        assert!(!rows[1].ok && rows[1].restored.is_none(), "{rows:?}");
        assert!(compare_rows_physical(&restored, None)[0].ok);
    }
}
