//! The backups a repository holds, read from their manifests: which method took each, its
//! parent, and which one `latest` means.
//!
//! A manifest's `extra` says how the backup was taken: `{"logical": DumpReport}` for a logical
//! backup, `{"physical": BaseBackupReport}` for a base backup ([`LOGICAL_KEY`], [`PHYSICAL_KEY`]),
//! `{"command": CommandReport}` for a command source, `{"redis": RedisReport}` for a Redis
//! snapshot ([`COMMAND_KEY`], [`REDIS_KEY`]), `{"files": FilesReport}` for a files source and
//! `{"git": GitReport}` for a git bundle ([`FILES_KEY`], [`GIT_KEY`]), `{"config": ConfigReport}`
//! for a configuration backup ([`CONFIG_KEY`]).
//! Nothing else in the manifest depends on the method.
//!
//! `latest` is the newest backup that passed verification (the ledger knows which: the caller
//! passes the set), unless the caller allows unverified ones; the choice comes back with the
//! reason, so an operator is told which backup was picked and why. A manifest that exists but
//! cannot be read is never silently skipped when it leaves nothing to choose: the error names it
//! as damaged.

use std::collections::HashSet;

use backstop_events::{BackupKind, BackupMethod, Event};
use backstop_ledger::{Ledger, LedgerError};
use backstop_repo::{Manifest, RepoError, Repository};
use backstop_sources::pg::logical::DumpReport;
use backstop_sources::pg::physical::BaseBackupReport;
use uuid::Uuid;

use crate::error::OpsError;

/// The key of the dump report inside a logical backup's manifest `extra`.
pub const LOGICAL_KEY: &str = "logical";
/// The key of the base backup report inside a physical backup's manifest `extra`.
pub const PHYSICAL_KEY: &str = "physical";

/// The key of a command backup's report ([`backstop_sources::command::CommandReport`]).
pub const COMMAND_KEY: &str = "command";
/// The key of a Redis snapshot's report ([`backstop_sources::redis::RedisReport`]).
pub const REDIS_KEY: &str = "redis";
/// The key of a files backup's tree ([`backstop_sources::files::FilesReport`]).
pub const FILES_KEY: &str = "files";
/// The key of a git bundle's report ([`backstop_sources::git::GitReport`]).
pub const GIT_KEY: &str = "git";
/// The key of a configuration backup's report ([`crate::config_backup::ConfigReport`]).
pub const CONFIG_KEY: &str = "config";

/// How the backup in `manifest` was taken.
pub fn method_of(manifest: &Manifest) -> BackupMethod {
    if manifest.extra.get(PHYSICAL_KEY).is_some() {
        BackupMethod::Physical
    } else if manifest.extra.get(COMMAND_KEY).is_some() {
        BackupMethod::Command
    } else if manifest.extra.get(REDIS_KEY).is_some() {
        BackupMethod::Redis
    } else if manifest.extra.get(FILES_KEY).is_some() {
        BackupMethod::Files
    } else if manifest.extra.get(GIT_KEY).is_some() {
        BackupMethod::Git
    } else if manifest.extra.get(CONFIG_KEY).is_some() {
        BackupMethod::Config
    } else {
        BackupMethod::Logical
    }
}

fn report_at<T: serde::de::DeserializeOwned>(
    manifest: &Manifest,
    key: &'static str,
    what: &'static str,
) -> Result<T, OpsError> {
    let value = manifest.extra.get(key).cloned().ok_or_else(|| {
        OpsError::Invalid(format!(
            "backup {} is a {} backup, not a {key} one",
            manifest.backup_id,
            method_of(manifest)
        ))
    })?;
    serde_json::from_value(value).map_err(|e| OpsError::BadManifest {
        backup: manifest.backup_id,
        what,
        why: e.to_string(),
    })
}

/// The report in a command backup's manifest.
pub fn command_report(
    manifest: &Manifest,
) -> Result<backstop_sources::command::CommandReport, OpsError> {
    report_at(manifest, COMMAND_KEY, "command backup")
}

/// The report in a Redis backup's manifest.
pub fn redis_report(manifest: &Manifest) -> Result<backstop_sources::redis::RedisReport, OpsError> {
    report_at(manifest, REDIS_KEY, "Redis snapshot")
}

/// The tree in a files backup's manifest.
pub fn files_report(manifest: &Manifest) -> Result<backstop_sources::files::FilesReport, OpsError> {
    report_at(manifest, FILES_KEY, "files backup")
}

/// The report in a configuration backup's manifest.
pub fn config_report(manifest: &Manifest) -> Result<crate::config_backup::ConfigReport, OpsError> {
    report_at(manifest, CONFIG_KEY, "configuration report")
}

/// The report in a git bundle's manifest.
pub fn git_report(manifest: &Manifest) -> Result<backstop_sources::git::GitReport, OpsError> {
    report_at(manifest, GIT_KEY, "git bundle")
}

/// The dump report stored in a logical backup's manifest.
pub fn dump_report(manifest: &Manifest) -> Result<DumpReport, OpsError> {
    let value = manifest.extra.get(LOGICAL_KEY).cloned().ok_or_else(|| {
        OpsError::Invalid(format!(
            "backup {} has no logical dump report in its manifest (it is a {} backup)",
            manifest.backup_id,
            method_of(manifest)
        ))
    })?;
    serde_json::from_value(value).map_err(|e| OpsError::BadManifest {
        backup: manifest.backup_id,
        what: "logical dump",
        why: e.to_string(),
    })
}

/// The base backup report in a physical backup's manifest.
pub fn physical_report(manifest: &Manifest) -> Option<BaseBackupReport> {
    let v = manifest.extra.get(PHYSICAL_KEY)?;
    serde_json::from_value(v.clone()).ok()
}

/// A physical backup as the repository holds it.
#[derive(Debug, Clone)]
pub struct PhysicalBackup {
    pub manifest: Manifest,
    pub report: BaseBackupReport,
}

impl PhysicalBackup {
    pub fn from_manifest(manifest: Manifest) -> Result<PhysicalBackup, OpsError> {
        match physical_report(&manifest) {
            Some(report) => Ok(PhysicalBackup { manifest, report }),
            None if method_of(&manifest) == BackupMethod::Physical => Err(OpsError::BadManifest {
                backup: manifest.backup_id,
                what: "base backup",
                why: "its base backup report does not decode".into(),
            }),
            None => Err(OpsError::Invalid(format!(
                "backup {} is a logical backup, not a physical one; restore it without --physical",
                manifest.backup_id
            ))),
        }
    }
}

/// Every readable physical backup in the repository (of `source`, when given), oldest first.
pub async fn physical_backups(
    repo: &Repository,
    source: Option<&str>,
) -> Result<Vec<PhysicalBackup>, RepoError> {
    let mut out = Vec::new();
    for listed in repo.list_backups().await? {
        let Ok(manifest) = listed.manifest else {
            continue;
        };
        if source.is_some_and(|s| s != manifest.source) {
            continue;
        }
        if let Some(report) = physical_report(&manifest) {
            out.push(PhysicalBackup { manifest, report });
        }
    }
    out.sort_by_key(|b| (b.report.finished_at, b.report.stop_lsn));
    Ok(out)
}

/// The parent a new backup records: the newest backup of the same source and method
/// (incremental), the newest full one (differential), none for a full backup. A backup of one
/// method is never the parent of the other's.
pub fn choose_parent<'a>(
    manifests: impl IntoIterator<Item = &'a Manifest>,
    source: &str,
    method: BackupMethod,
    kind: BackupKind,
) -> Option<Uuid> {
    if kind == BackupKind::Full {
        return None;
    }
    manifests
        .into_iter()
        .filter(|m| m.source == source && method_of(m) == method)
        .filter(|m| kind != BackupKind::Differential || m.kind == BackupKind::Full)
        .max_by_key(|m| m.finished_at)
        .map(|m| m.backup_id)
}

/// Which backups `latest` may mean.
#[derive(Clone, Debug, Default)]
pub struct Selector<'a> {
    pub source: Option<&'a str>,
    pub method: Option<BackupMethod>,
    /// Backups that passed verification; `None` allows unverified backups.
    pub verified: Option<&'a HashSet<Uuid>>,
}

/// A backup chosen, and why.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub manifest: Manifest,
    pub why: String,
}

/// Resolves a backup id or `latest` (see [`Selector`]) to a loaded manifest.
pub async fn resolve_backup(
    repo: &Repository,
    which: &str,
    selector: &Selector<'_>,
) -> Result<Resolved, OpsError> {
    if which != "latest" {
        let id: Uuid = which.parse().map_err(|_| {
            OpsError::Invalid(format!("{which:?} is neither a backup id nor `latest`"))
        })?;
        let manifest = load_manifest(repo, id).await?;
        return Ok(Resolved {
            manifest,
            why: "named by its id".into(),
        });
    }
    let mut newest: Option<Manifest> = None;
    let mut newest_unverified: Option<Manifest> = None;
    let mut damaged = Vec::new();
    for listed in repo.list_backups().await? {
        let m = match listed.manifest {
            Ok(m) => m,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                damaged.push((listed.backup_id, e));
                continue;
            }
        };
        if selector.source.is_some_and(|s| s != m.source)
            || selector.method.is_some_and(|k| k != method_of(&m))
        {
            continue;
        }
        let verified = selector.verified.is_none_or(|v| v.contains(&m.backup_id));
        let slot = if verified {
            &mut newest
        } else {
            &mut newest_unverified
        };
        if slot.as_ref().is_none_or(|b| m.finished_at > b.finished_at) {
            *slot = Some(m);
        }
    }
    let scope = describe(selector);
    match (newest, newest_unverified) {
        (Some(m), skipped) => {
            let why = match (selector.verified, skipped) {
                (None, _) => format!("the newest {scope}"),
                (Some(_), Some(s)) if s.finished_at > m.finished_at => format!(
                    "the newest {scope} that passed verification (newer {} is not verified; pass --allow-unverified to restore it)",
                    s.backup_id
                ),
                (Some(_), _) => format!("the newest {scope}, verified"),
            };
            Ok(Resolved { manifest: m, why })
        }
        (None, Some(s)) => Err(OpsError::NoBackup(format!(
            "no {scope} has passed verification yet (the newest, {}, is unverified); verify it with `backstop verify {}` or pass --allow-unverified",
            s.backup_id, s.backup_id
        ))),
        (None, None) => match damaged.into_iter().next() {
            Some((backup, source)) => Err(OpsError::DamagedManifest { backup, source }),
            None => Err(OpsError::NoBackup(format!(
                "the repository holds no {scope} yet"
            ))),
        },
    }
}

fn describe(selector: &Selector<'_>) -> String {
    let method = selector.method.map(|m| format!("{m} ")).unwrap_or_default();
    match selector.source {
        Some(s) => format!("{method}backup of `{s}`"),
        None => format!("{method}backup"),
    }
}

/// Loads one manifest, telling a damaged manifest from a missing one.
pub async fn load_manifest(repo: &Repository, id: Uuid) -> Result<Manifest, OpsError> {
    match repo.load_manifest(id).await {
        Ok(m) => Ok(m),
        Err(e @ RepoError::NotFound { .. }) => Err(OpsError::NoBackup(format!(
            "backup {id} is not in the repository ({e})"
        ))),
        Err(e) if e.is_transient() => Err(e.into()),
        Err(source @ (RepoError::Corrupt { .. } | RepoError::Damaged { .. })) => {
            Err(OpsError::DamagedManifest { backup: id, source })
        }
        Err(e) => Err(e.into()),
    }
}

/// The backups whose latest verification in the local ledger passed.
pub fn verified_backups(ledger: &Ledger) -> Result<HashSet<Uuid>, LedgerError> {
    let mut verified = HashSet::new();
    let mut from = 1;
    loop {
        let batch = ledger.read(from, 4096)?;
        let Some(last) = batch.last() else { break };
        from = last.position + 1;
        for env in &batch {
            note_verification(&mut verified, env);
        }
    }
    Ok(verified)
}

/// Folds one event into the set of backups whose latest verification passed (for callers that
/// read the ledger another way, such as through a running serve's control socket).
pub fn note_verification(verified: &mut HashSet<Uuid>, env: &backstop_events::Envelope) {
    if !env.event_type.starts_with("verification.") {
        return;
    }
    match env.event() {
        Ok(Event::VerificationPassed(p)) => {
            verified.insert(p.backup_id);
        }
        Ok(Event::VerificationFailed(f)) => {
            verified.remove(&f.backup_id);
        }
        _ => {}
    }
}
