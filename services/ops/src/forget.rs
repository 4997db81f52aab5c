//! The retention use case (`backstop forget`, the retention worker, the daily maintenance job):
//! which backups and which WAL files the policies keep, the deletions they call for, and the
//! events that make every deletion part of the audit trail.
//!
//! # What a run does
//! 1. **Candidates** come from the repository's manifests: source, kind, method, time (the
//!    manifest's `finished_at`), parent, tags (a `tags` array of strings in the manifest's
//!    `extra`, when a backup carries one), and the backup's newest verification from the
//!    ledger ([`RetentionFacts`]).
//! 2. **Decisions**: per source, the policy in force for its backups
//!    ([`RetentionConfig::policy`], class `backups`), then [`retention::decide`] with its guard
//!    rails (newest verified kept, parents of kept backups kept, nothing removed while the newest
//!    verification failed).
//! 3. **Events and deletions**, in this order per backup, on the backup's stream:
//!    `retention.decided` {policy, keep, reason}; for a removal then
//!    [`Repository::forget_backup`] (the manifest goes; the chunks become garbage for the next
//!    prune) and `backup.deleted` {policy, reason}. `objects_removed` and `bytes_freed` are 0:
//!    deleting a manifest frees no chunk by itself, the prune reports what it reclaims.
//! 4. **WAL**: for each source with archived WAL and a WAL window, [`retention::wal_plan`] over
//!    its physical backups (kept = the decision) says which files are still needed; the others
//!    are *candidates* handed to the prune ([`prune_repository`]), never deleted here. The prune
//!    sweeps a WAL candidate only when the run that sweeps it names it again, so a file that a
//!    later decision needs again (a hold after a failed verification) is spared.
//!
//! A dry run does steps 1, 2 and 4 and returns the same decisions; it records nothing and
//! deletes nothing.
//!
//! # Invariants
//! - Event ids derive from (backup id, a label naming the event, the policy and the outcome,
//!   the decision's UTC day) ([`crate::record`]): running forget again the same day (a rerun,
//!   a redelivered `backup.completed`, two workers) records nothing twice; each day's decisions
//!   are recorded once.
//! - `retention.decided` (remove) is durable before the manifest is deleted, so a process killed
//!   between the delete and `backup.deleted` leaves a decision without its deletion; the next
//!   real run finds the manifest gone and records the `backup.deleted` it missed, with the same
//!   id it would have had ([`ForgetReport::healed`]). No deletion goes unrecorded.
//! - Nothing is decided for a source while one of the repository's manifests cannot be read:
//!   a real run with an unreadable manifest fails before any deletion (an unreadable manifest
//!   may be a backup another one needs, and prune refuses to run over it too).
//! - A manifest whose delete is refused because the object is locked (S3 object lock) stays;
//!   it is reported in [`ForgetReport::locked`] and tried again by a later run.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use backstop_events::{
    Actor, BackupDeleted, BackupKind, BackupMethod, Envelope, Event, RetentionDecided, streams,
};
use backstop_ledger::{Appender, Ledger, LedgerError};
use backstop_repo::{Manifest, PruneOptions, PruneReport, RepoError, Repository};
use chrono::{DateTime, NaiveTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::catalog::{method_of, physical_report};
use crate::error::OpsError;
use crate::record::{record, uuid_time};
use crate::retention::{
    BaseBackup, Candidate, Class, Decision, RetentionConfig, RetentionError, Verification, WalPlan,
    decide, wal_plan,
};
use crate::wal::{WAL_PREFIX, parse_wal_object_key};

/// The key of a backup's tags inside its manifest `extra` (an array of strings).
pub const TAGS_KEY: &str = "tags";

/// The default prune grace when `[retention] prune_grace` is not set: longer than any backup.
pub const DEFAULT_PRUNE_GRACE: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// What retention needs to know from the ledger: each backup's newest verification, the
/// backups still running, and the removals decided whose deletion is not recorded yet.
#[derive(Clone, Debug, Default)]
pub struct RetentionFacts {
    verification: HashMap<Uuid, Verification>,
    running: BTreeSet<Uuid>,
    removal_decided: HashMap<Uuid, DecidedRemoval>,
    deleted: HashSet<Uuid>,
}

#[derive(Clone, Debug)]
struct DecidedRemoval {
    policy: String,
    reason: String,
    day: DateTime<Utc>,
}

impl RetentionFacts {
    /// Folds one ledger event in (events must come in ledger order).
    pub fn observe(&mut self, env: &Envelope) {
        let t = env.event_type.as_str();
        let relevant = t.starts_with("verification.")
            || matches!(
                t,
                "backup.started"
                    | "backup.completed"
                    | "backup.failed"
                    | "retention.decided"
                    | "backup.deleted"
            );
        if !relevant {
            return;
        }
        match env.event() {
            Ok(Event::VerificationPassed(p)) => {
                self.verification.insert(
                    p.backup_id,
                    Verification::Passed {
                        at: env.occurred_at,
                    },
                );
            }
            Ok(Event::VerificationFailed(f)) => {
                self.verification.insert(
                    f.backup_id,
                    Verification::Failed {
                        at: env.occurred_at,
                    },
                );
            }
            Ok(Event::BackupStarted(s)) => {
                self.running.insert(s.backup_id);
            }
            Ok(Event::BackupCompleted(c)) => {
                self.running.remove(&c.backup_id);
            }
            Ok(Event::BackupFailed(f)) => {
                self.running.remove(&f.backup_id);
            }
            Ok(Event::RetentionDecided(d)) if !d.keep => {
                self.removal_decided.insert(
                    d.backup_id,
                    DecidedRemoval {
                        policy: d.policy,
                        reason: d.reason,
                        // The decision's day is in its id (see the module docs).
                        day: uuid_time(env.id),
                    },
                );
            }
            Ok(Event::BackupDeleted(d)) => {
                self.deleted.insert(d.backup_id);
            }
            _ => {}
        }
    }

    pub fn from_envelopes<'a>(envs: impl IntoIterator<Item = &'a Envelope>) -> RetentionFacts {
        let mut f = RetentionFacts::default();
        for e in envs {
            f.observe(e);
        }
        f
    }

    /// Reads the whole local ledger.
    pub fn from_ledger(ledger: &Ledger) -> Result<RetentionFacts, LedgerError> {
        let mut f = RetentionFacts::default();
        let mut from = 1;
        loop {
            let batch = ledger.read(from, 4096)?;
            let Some(last) = batch.last() else { break };
            from = last.position + 1;
            for env in &batch {
                f.observe(env);
            }
        }
        Ok(f)
    }

    /// The newest verification of `backup`.
    pub fn verification(&self, backup: Uuid) -> Verification {
        self.verification
            .get(&backup)
            .copied()
            .unwrap_or(Verification::Unverified)
    }

    /// Sets a backup's newest verification (for callers that learn it another way).
    pub fn set_verification(&mut self, backup: Uuid, v: Verification) {
        self.verification.insert(backup, v);
    }

    /// Backups started and not yet completed or failed: a prune defers its sweep for them.
    pub fn running(&self) -> Vec<Uuid> {
        self.running.iter().copied().collect()
    }
}

/// Where a long-running process reads [`RetentionFacts`] from.
#[async_trait]
pub trait FactsSource: Send + Sync {
    async fn facts(&self) -> Result<RetentionFacts, OpsError>;
}

#[async_trait]
impl FactsSource for Ledger {
    async fn facts(&self) -> Result<RetentionFacts, OpsError> {
        let ledger = self.clone();
        tokio::task::spawn_blocking(move || RetentionFacts::from_ledger(&ledger))
            .await
            .map_err(|e| OpsError::Abandoned {
                what: "reading the ledger for retention".into(),
                why: e.to_string(),
            })?
            .map_err(OpsError::from)
    }
}

/// How a forget runs.
#[derive(Clone, Debug)]
pub struct ForgetOptions {
    /// Only this source; every source with backups (or WAL) when `None`.
    pub source: Option<String>,
    pub dry_run: bool,
    /// The time decisions are made at (from the caller's clock).
    pub now: DateTime<Utc>,
}

/// One backup's decision, as `backstop forget` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackupDecision {
    pub backup_id: Uuid,
    pub source: String,
    pub kind: BackupKind,
    pub method: BackupMethod,
    pub time: DateTime<Utc>,
    pub parent: Option<Uuid>,
    pub verification: Verification,
    pub policy: String,
    pub keep: bool,
    /// Every rule that keeps it ("no rule keeps it" for a removal).
    pub reason: String,
    pub reasons: Vec<String>,
    /// The manifest was deleted by this run (never in a dry run).
    pub forgotten: bool,
}

/// One source's policy and WAL plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SourceRetention {
    pub source: String,
    pub policy: String,
    pub rules: String,
    pub backups: usize,
    pub removed: usize,
    /// The WAL window's plan, when the source has archived WAL and a window.
    pub wal: Option<WalPlan>,
    pub wal_files: usize,
    /// Archived WAL files no kept backup needs: handed to the prune.
    pub wal_candidates: Vec<String>,
}

/// What a forget decided (and, unless a dry run, did).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    pub now: DateTime<Utc>,
    pub sources: Vec<SourceRetention>,
    /// Oldest first within each source; sources in name order.
    pub decisions: Vec<BackupDecision>,
    /// Backups whose manifest delete was refused (object lock): tried again later.
    pub locked: Vec<Uuid>,
    /// Removals decided by an earlier run whose `backup.deleted` this run recorded.
    pub healed: Vec<Uuid>,
    /// Manifests that cannot be read (a dry run lists them; a real run fails on them).
    pub unreadable: Vec<(Uuid, String)>,
}

impl ForgetReport {
    pub fn removed(&self) -> impl Iterator<Item = &BackupDecision> {
        self.decisions.iter().filter(|d| !d.keep)
    }

    /// Every WAL file the prune may delete.
    pub fn wal_candidates(&self) -> Vec<String> {
        self.sources
            .iter()
            .flat_map(|s| s.wal_candidates.iter().cloned())
            .collect()
    }
}

fn tags_of(m: &Manifest) -> Vec<String> {
    m.extra
        .get(TAGS_KEY)
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn day_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.date_naive().and_time(NaiveTime::MIN).and_utc()
}

fn decided_label(policy: &str, keep: bool) -> String {
    format!(
        "retention.decided {policy} {}",
        if keep { "keep" } else { "remove" }
    )
}

fn deleted_label(policy: &str) -> String {
    format!("backup.deleted {policy}")
}

fn retention_error(e: RetentionError) -> OpsError {
    match e {
        RetentionError::BadSegment { backup, name } => OpsError::BadManifest {
            backup,
            what: "base backup with a WAL range",
            why: format!("{name:?} is not a WAL segment name"),
        },
        other => OpsError::Invalid(other.to_string()),
    }
}

/// The decisions (steps 1, 2 and 4 of the module docs), without recording or deleting.
struct Plan {
    sources: Vec<SourceRetention>,
    decisions: Vec<BackupDecision>,
    unreadable: Vec<(Uuid, String)>,
    present: HashSet<Uuid>,
}

async fn plan(
    repo: &Repository,
    retention: &RetentionConfig,
    facts: &RetentionFacts,
    source: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Plan, OpsError> {
    let mut by_source: BTreeMap<String, Vec<Manifest>> = BTreeMap::new();
    let mut unreadable = Vec::new();
    let mut present = HashSet::new();
    for listed in repo.list_backups().await? {
        present.insert(listed.backup_id);
        match listed.manifest {
            Ok(m) => {
                if source.is_none_or(|s| s == m.source) {
                    by_source.entry(m.source.clone()).or_default().push(m);
                }
            }
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => unreadable.push((listed.backup_id, e.to_string())),
        }
    }
    let mut wal_by_source: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for o in repo.backend().list(WAL_PREFIX).await? {
        if let Some((s, _)) = parse_wal_object_key(&o.key)
            && source.is_none_or(|want| want == s)
        {
            let name = o.key.rsplit('/').next().unwrap_or_default().to_string();
            wal_by_source.entry(s).or_default().push((o.key, name));
        }
    }
    let names: BTreeSet<String> = by_source
        .keys()
        .chain(wal_by_source.keys())
        .cloned()
        .collect();

    let mut sources = Vec::new();
    let mut decisions = Vec::new();
    for name in names {
        let manifests = by_source.remove(&name).unwrap_or_default();
        // A configuration source's backups are the configuration class (180 days by default).
        let class = if manifests
            .iter()
            .any(|m| method_of(m) == backstop_events::BackupMethod::Config)
        {
            Class::Configuration
        } else {
            Class::Backups
        };
        let policy = retention.policy(&name, class);
        let candidates: Vec<Candidate> = manifests
            .iter()
            .map(|m| Candidate {
                id: m.backup_id,
                source: m.source.clone(),
                kind: m.kind,
                method: method_of(m),
                time: m.finished_at,
                parent: m.parent,
                tags: tags_of(m),
                verification: facts.verification(m.backup_id),
            })
            .collect();
        let decided: Vec<Decision> = decide(&candidates, &policy, now);
        let keep: HashMap<Uuid, bool> = decided.iter().map(|d| (d.id, d.keep)).collect();

        let wal_files = wal_by_source.remove(&name).unwrap_or_default();
        let (wal, wal_candidates) = match policy.wal_window {
            Some(window) if !wal_files.is_empty() => {
                let mut bases = Vec::new();
                for m in &manifests {
                    if let Some(r) = physical_report(m) {
                        bases.push(BaseBackup {
                            id: m.backup_id,
                            time: m.finished_at,
                            start_segment: r.start_segment,
                            end_segment: Some(r.stop_segment),
                            kept: keep.get(&m.backup_id).copied().unwrap_or(true),
                        });
                    }
                }
                let p = wal_plan(&bases, window, now).map_err(retention_error)?;
                let unneeded = wal_files
                    .iter()
                    .filter(|(_, file)| !p.keeps(file))
                    .map(|(key, _)| key.clone())
                    .collect();
                (Some(p), unneeded)
            }
            _ => (None, Vec::new()),
        };

        let mut rows: Vec<BackupDecision> = candidates
            .iter()
            .zip(decided)
            .map(|(c, d)| BackupDecision {
                backup_id: c.id,
                source: c.source.clone(),
                kind: c.kind,
                method: c.method,
                time: c.time,
                parent: c.parent,
                verification: c.verification,
                policy: policy.name.clone(),
                keep: d.keep,
                reason: d.reason(),
                reasons: d.reasons.iter().map(ToString::to_string).collect(),
                forgotten: false,
            })
            .collect();
        rows.sort_by_key(|r| (r.time, r.backup_id));
        sources.push(SourceRetention {
            source: name,
            policy: policy.name.clone(),
            rules: policy.describe(),
            backups: rows.len(),
            removed: rows.iter().filter(|r| !r.keep).count(),
            wal,
            wal_files: wal_files.len(),
            wal_candidates,
        });
        decisions.extend(rows);
    }
    Ok(Plan {
        sources,
        decisions,
        unreadable,
        present,
    })
}

/// Decides, records and deletes (see the module documentation). `facts` is the ledger as of
/// now; `actor` names who runs it (the operator, or the retention worker).
pub async fn forget(
    repo: &Repository,
    appender: &dyn Appender,
    retention: &RetentionConfig,
    facts: &RetentionFacts,
    opts: &ForgetOptions,
    actor: &Actor,
) -> Result<ForgetReport, OpsError> {
    let Plan {
        sources,
        mut decisions,
        unreadable,
        present,
    } = plan(repo, retention, facts, opts.source.as_deref(), opts.now).await?;
    let mut report = ForgetReport {
        dry_run: opts.dry_run,
        now: opts.now,
        sources,
        decisions: Vec::new(),
        locked: Vec::new(),
        healed: Vec::new(),
        unreadable,
    };
    if opts.dry_run {
        report.decisions = decisions;
        return Ok(report);
    }
    if let Some((backup, why)) = report.unreadable.first() {
        return Err(OpsError::Invalid(format!(
            "retention stopped before deleting anything: the manifest of backup {backup} cannot be read ({why}); an unreadable backup may be one another backup needs. Run `backstop check --read-data`, restore or remove the damaged manifest, then run forget again"
        )));
    }

    // Removals decided earlier whose deletion was not recorded (a process killed in between).
    let mut heal: Vec<(&Uuid, &DecidedRemoval)> = facts
        .removal_decided
        .iter()
        .filter(|(id, _)| !facts.deleted.contains(id) && !present.contains(id))
        .collect();
    heal.sort_by_key(|(id, _)| **id);
    for (id, d) in heal {
        // Healing is about the audit trail, not the source filter: recorded whatever the
        // filter says.
        record(
            appender,
            &streams::backup(*id),
            actor,
            None,
            d.day,
            &deleted_label(&d.policy),
            *id,
            Event::BackupDeleted(BackupDeleted {
                backup_id: *id,
                policy: d.policy.clone(),
                reason: d.reason.clone(),
                objects_removed: 0,
                bytes_freed: 0,
            }),
        )
        .await?;
        report.healed.push(*id);
    }

    let day = day_of(opts.now);
    for d in decisions.iter_mut() {
        let stream = streams::backup(d.backup_id);
        record(
            appender,
            &stream,
            actor,
            None,
            day,
            &decided_label(&d.policy, d.keep),
            d.backup_id,
            Event::RetentionDecided(RetentionDecided {
                backup_id: d.backup_id,
                policy: d.policy.clone(),
                keep: d.keep,
                reason: d.reason.clone(),
            }),
        )
        .await?;
        if d.keep {
            continue;
        }
        match repo.forget_backup(d.backup_id).await {
            // `false`: already gone (another run deleted it); its deletion is recorded below.
            Ok(_) => {}
            Err(RepoError::Locked { .. }) => {
                tracing::warn!(backup = %d.backup_id, "manifest is locked (object lock); it is forgotten once its lock expires");
                report.locked.push(d.backup_id);
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        d.forgotten = true;
        tracing::info!(backup = %d.backup_id, source = %d.source, policy = %d.policy, "backup deleted by retention");
        record(
            appender,
            &stream,
            actor,
            None,
            day,
            &deleted_label(&d.policy),
            d.backup_id,
            Event::BackupDeleted(BackupDeleted {
                backup_id: d.backup_id,
                policy: d.policy.clone(),
                reason: d.reason.clone(),
                objects_removed: 0,
                bytes_freed: 0,
            }),
        )
        .await?;
    }
    report.decisions = decisions;
    Ok(report)
}

/// How a prune runs.
#[derive(Clone, Debug)]
pub struct PruneRun {
    pub dry_run: bool,
    pub grace: chrono::TimeDelta,
    pub now: DateTime<Utc>,
    /// Where the reference set spills (the system temporary directory by default).
    pub scratch_dir: Option<std::path::PathBuf>,
}

/// What a prune did, with the WAL files retention handed to it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PruneOutcome {
    pub report: PruneReport,
    /// WAL files no kept backup needs, named to the prune as candidates.
    pub wal_candidates: usize,
    pub backups_running: Vec<Uuid>,
}

/// Garbage collection: the repository's two-phase prune, with the WAL files the retention
/// policies no longer need as extra candidates and the running backups (from the ledger) as
/// backups in progress, so the sweep waits for them.
pub async fn prune_repository(
    repo: &Repository,
    retention: &RetentionConfig,
    facts: &RetentionFacts,
    run: &PruneRun,
) -> Result<PruneOutcome, OpsError> {
    let plan = plan(repo, retention, facts, None, run.now).await?;
    let wal: Vec<String> = plan
        .sources
        .iter()
        .flat_map(|s| s.wal_candidates.iter().cloned())
        .collect();
    let mut opts = PruneOptions::new(run.now);
    opts.dry_run = run.dry_run;
    opts.grace = run.grace;
    opts.scratch_dir = run.scratch_dir.clone();
    opts.extra_candidates = wal.clone();
    opts.backups_in_progress = facts.running();
    let report = repo.prune(&opts).await?;
    Ok(PruneOutcome {
        report,
        wal_candidates: wal.len(),
        backups_running: facts.running(),
    })
}

/// What one daily maintenance pass did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MaintenanceReport {
    pub forget: ForgetReport,
    pub prune: PruneOutcome,
}

/// The daily job's retention and garbage collection: forget for every source, then prune
/// with the facts read again (so the prune sees this pass's decisions). Lock extension is the
/// caller's next step (`Repository::extend_locks`, when the repository has object lock).
pub async fn maintain(
    repo: &Repository,
    appender: &dyn Appender,
    retention: &RetentionConfig,
    facts: &dyn FactsSource,
    run: &PruneRun,
    actor: &Actor,
) -> Result<MaintenanceReport, OpsError> {
    let before = facts.facts().await?;
    let forget = forget(
        repo,
        appender,
        retention,
        &before,
        &ForgetOptions {
            source: None,
            dry_run: run.dry_run,
            now: run.now,
        },
        actor,
    )
    .await?;
    let after = facts.facts().await?;
    let prune = prune_repository(repo, retention, &after, run).await?;
    Ok(MaintenanceReport { forget, prune })
}
