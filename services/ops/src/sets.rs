//! Backup sets (`[[sets]]`): several sources backed up together, one backup (and one manifest)
//! per component, grouped by a set id, and restored together or in part.
//!
//! Formats and invariants:
//! - Each component's manifest carries `extra.set = {"id": UUID, "name": "nightly"}`
//!   ([`SET_KEY`], [`SetRef`]) beside its source report and its tags, so a set is found and
//!   restored from the repository alone (the ledger may be what is being recovered).
//! - The ledger records the set on the stream `set-<id>`: `set.started` (every component's
//!   source and backup id, the tags) before the first component, `set.completed` (which
//!   completed, which failed and why) after the last. Each component is an ordinary backup
//!   (`backup.requested` .. `backup.completed | backup.failed` on its own stream).
//! - Components are taken one after another, in the configured order: a failed component fails
//!   the set but does not stop the others, and the backups that completed are kept and
//!   restorable (a set restore names what the set lacks).
//! - A set restore runs in role order ([`Role`]): configuration first (the services that come
//!   back read it), then databases (the system of record), then Redis (a cache or queue derived
//!   from or pointing into the database, so it must not be ahead of it), then files (models and
//!   assets the application loads once it runs), then everything else. Within a role, by source
//!   name.
//! - The role of a component derives from its backup's method, by name, so a kind added later
//!   (git, configuration) needs no change here to take part; it is "other" until named below.
//! - A dry run reads the manifests and checks that every object each step needs is present; it
//!   writes nothing to any target and records no recovery.

use std::collections::{BTreeMap, HashMap};

use backstop_events::{
    Actor, BackupKind, BackupMethod, BackupRequested, Event, NewEvent, RecoveryScope, SetCompleted,
    SetComponent, SetComponentFailed, SetStarted, Trigger, streams, uuid_v7,
};
use backstop_ledger::ExpectedVersion;
use backstop_repo::{Manifest, Repository};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::backup::{BackupDone, BackupOptions, run_backup};
use crate::catalog;
use crate::context::DataPath;
use crate::error::OpsError;
use crate::restore::{self, Recovery, StreamTarget};

/// The key of the set reference in a component's manifest `extra`.
pub const SET_KEY: &str = "set";

/// Which set a backup belongs to (manifest `extra.set`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRef {
    pub id: Uuid,
    pub name: String,
}

/// The set `manifest` is a component of, if any.
pub fn set_of(manifest: &Manifest) -> Option<SetRef> {
    serde_json::from_value(manifest.extra.get(SET_KEY)?.clone()).ok()
}

/// What a component is to the platform; the order of the variants is the restore order (see
/// the module docs for why).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Configuration,
    Database,
    Redis,
    Files,
    Other,
}

impl Role {
    /// The role of a backup taken by `method`. By the method's name, with a fallback, so that
    /// methods added by other kinds fall into `Other` until they are given a role here.
    pub fn of(method: BackupMethod) -> Role {
        match method.as_str() {
            "logical" | "physical" => Role::Database,
            "redis" => Role::Redis,
            "files" => Role::Files,
            "config" | "configuration" => Role::Configuration,
            _ => Role::Other,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Configuration => "configuration",
            Role::Database => "database",
            Role::Redis => "redis",
            Role::Files => "files",
            Role::Other => "other",
        }
    }

    /// A role named on the command line (`--only database,redis`); `config`, `db` and `file`
    /// are accepted as the short forms people type.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "configuration" | "config" => Role::Configuration,
            "database" | "databases" | "db" => Role::Database,
            "redis" => Role::Redis,
            "files" | "file" => Role::Files,
            "other" => Role::Other,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backup set as the repository holds it: the components' manifests, by source.
#[derive(Clone, Debug)]
pub struct StoredSet {
    pub set: SetRef,
    /// When the first component finished.
    pub started_at: DateTime<Utc>,
    /// The tags of its components (the same for all: `backup --set --tag`).
    pub tags: Vec<String>,
    /// One manifest per component that completed, in restore order.
    pub components: Vec<Manifest>,
}

impl StoredSet {
    /// When the last component finished.
    pub fn finished_at(&self) -> DateTime<Utc> {
        self.components
            .iter()
            .map(|m| m.finished_at)
            .max()
            .unwrap_or(self.started_at)
    }
}

fn order_key(m: &Manifest) -> (Role, String) {
    (Role::of(catalog::method_of(m)), m.source.clone())
}

/// Every set in the repository, oldest first. A manifest that cannot be read is skipped here
/// (`backstop check` names it); a transient listing error is returned.
pub async fn list_sets(repo: &Repository) -> Result<Vec<StoredSet>, OpsError> {
    let mut by_id: BTreeMap<Uuid, StoredSet> = BTreeMap::new();
    for listed in repo.list_backups().await? {
        let m = match listed.manifest {
            Ok(m) => m,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(_) => continue,
        };
        let Some(set) = set_of(&m) else { continue };
        let tags: Vec<String> = m
            .extra
            .get(crate::forget::TAGS_KEY)
            .and_then(|t| serde_json::from_value(t.clone()).ok())
            .unwrap_or_default();
        let entry = by_id.entry(set.id).or_insert_with(|| StoredSet {
            set,
            started_at: m.finished_at,
            tags,
            components: Vec::new(),
        });
        entry.started_at = entry.started_at.min(m.finished_at);
        entry.components.push(m);
    }
    let mut sets: Vec<StoredSet> = by_id.into_values().collect();
    for s in &mut sets {
        s.components.sort_by_key(order_key);
    }
    sets.sort_by_key(|s| s.started_at);
    Ok(sets)
}

/// The set `which` names: a set id, `latest` (the newest set), or a set's name (its newest
/// set); with `tag`, only sets carrying it count.
pub async fn resolve_set(
    repo: &Repository,
    which: &str,
    tag: Option<&str>,
) -> Result<StoredSet, OpsError> {
    let sets = list_sets(repo).await?;
    let tagged = |s: &StoredSet| tag.is_none_or(|t| s.tags.iter().any(|x| x == t));
    let found = if let Ok(id) = which.parse::<Uuid>() {
        sets.into_iter().find(|s| s.set.id == id)
    } else if which == "latest" {
        sets.into_iter().rev().find(|s| tagged(s))
    } else {
        sets.into_iter()
            .rev()
            .find(|s| s.set.name == which && tagged(s))
    };
    found.ok_or_else(|| {
        let tag = tag.map(|t| format!(" tagged `{t}`")).unwrap_or_default();
        OpsError::NoBackup(format!(
            "the repository holds no backup set {which:?}{tag} (a set id, `latest` or a set's name; `backstop set list` shows them)"
        ))
    })
}

/// One step of a set restore: a component, its backup and where it goes.
#[derive(Clone, Debug)]
pub struct Step {
    pub role: Role,
    pub source: String,
    pub method: BackupMethod,
    pub manifest: Manifest,
    /// A postgres:// URL (databases), a file for the RDB (Redis), a directory (files), a new
    /// env or `.json` file (configuration), the restore command's `$BACKSTOP_TARGET` (command
    /// sources).
    pub target: String,
}

/// The steps of restoring `set`: the components `only` names (source names or roles; empty:
/// all), in restore order, each with its target from `targets` (by source name).
pub fn plan(
    set: &StoredSet,
    only: &[String],
    targets: &HashMap<String, String>,
) -> Result<Vec<Step>, OpsError> {
    let present: Vec<String> = set
        .components
        .iter()
        .map(|m| format!("{} ({})", m.source, Role::of(catalog::method_of(m))))
        .collect();
    let mut roles = Vec::new();
    let mut names = Vec::new();
    for o in only {
        if set.components.iter().any(|m| &m.source == o) {
            names.push(o.as_str());
        } else if let Some(r) = Role::parse(o) {
            roles.push(r);
        } else {
            return Err(OpsError::Invalid(format!(
                "--only {o:?} is neither a component of set {} nor a role (configuration, database, redis, files, other); its components: {}",
                set.set.id,
                present.join(", ")
            )));
        }
    }
    let mut steps = Vec::new();
    for m in &set.components {
        let method = catalog::method_of(m);
        let role = Role::of(method);
        if !only.is_empty() && !names.contains(&m.source.as_str()) && !roles.contains(&role) {
            continue;
        }
        let target = targets.get(&m.source).cloned().ok_or_else(|| {
            OpsError::Invalid(format!(
                "no restore target for component `{}` ({role}) of set `{}`: set it under [sets.restore] as {} = \"...\" or pass --target {}=TARGET",
                m.source, set.set.name, m.source, m.source
            ))
        })?;
        steps.push(Step {
            role,
            source: m.source.clone(),
            method,
            manifest: m.clone(),
            target,
        });
    }
    if steps.is_empty() {
        return Err(OpsError::Invalid(format!(
            "--only {} selects no component of set {}; its components: {}",
            only.join(","),
            set.set.id,
            present.join(", ")
        )));
    }
    Ok(steps)
}

/// What one step did or, dry, would do.
#[derive(Clone, Debug, Serialize)]
pub struct StepDone {
    pub role: Role,
    pub source: String,
    pub backup_id: Uuid,
    pub method: String,
    /// The target as shown (a database URL without its password).
    pub target: String,
    pub dry_run: bool,
    /// What is (or would be) written, in words.
    pub what: String,
    pub bytes: u64,
}

/// Runs (or, with `dry_run`, checks and describes) one step as `operator`. A real step is a
/// recovery like any single restore (`recovery.requested` .. `recovery.completed|failed`).
pub async fn restore_step(
    dp: &DataPath,
    step: &Step,
    operator: &str,
    dry_run: bool,
    jobs: usize,
) -> Result<StepDone, OpsError> {
    let backup_id = step.manifest.backup_id;
    let shown = match step.role {
        Role::Database => backstop_sources::pg::ConnInfo::parse(&step.target)
            .map(|c| c.redacted())
            .unwrap_or_else(|_| "<unparsable target>".into()),
        _ => step.target.clone(),
    };
    let done = |what: String, bytes: u64| StepDone {
        role: step.role,
        source: step.source.clone(),
        backup_id,
        method: step.method.to_string(),
        target: shown.clone(),
        dry_run,
        what,
        bytes,
    };
    let recovery = || {
        Recovery::new(
            operator,
            RecoveryScope {
                target: shown.clone(),
                tables: Vec::new(),
                point_in_time: None,
                dry_run: false,
            },
        )
    };
    if dry_run && step.method != BackupMethod::Files {
        // Presence of every object; nothing opened for writing, nothing recorded.
        let check = dp.repo.dry_run_restore(&step.manifest, None).await?;
        if let Some(m) = check.missing.first() {
            return Err(OpsError::Invalid(format!(
                "backup {backup_id} of `{}` cannot be restored: object {} is missing ({} objects missing in all); `backstop check --read-data` says more",
                step.source,
                m.key,
                check.missing.len()
            )));
        }
    }
    match step.method {
        BackupMethod::Logical => {
            let report = catalog::dump_report(&step.manifest)?;
            let tables = report.tables.iter().filter(|t| t.part.is_some()).count();
            let rows: u64 = report.tables.iter().map(|t| t.rows).sum();
            if dry_run {
                return Ok(done(
                    format!(
                        "{tables} tables, {rows} rows into {shown} (created if missing; its tables must not exist yet)"
                    ),
                    step.manifest.totals.raw_bytes,
                ));
            }
            let options = backstop_sources::pg::logical::RestoreOptions {
                jobs: jobs.max(1),
                create_db: true,
                ..Default::default()
            };
            let r = restore::restore_logical(
                dp,
                step.manifest.clone(),
                &recovery(),
                &step.target,
                options,
            )
            .await?;
            Ok(done(
                format!("{} tables, {} rows into {shown}", r.tables.len(), r.rows),
                r.bytes,
            ))
        }
        BackupMethod::Files => {
            let req = crate::files::FilesRestore {
                to_dir: step.target.clone().into(),
                paths: Vec::new(),
                dry_run,
            };
            let r =
                crate::files::restore_files(dp, step.manifest.clone(), &recovery(), &req).await?;
            let p = &r.plan;
            Ok(done(
                format!(
                    "{} files, {} directories and {} symlinks under {shown} (nothing existing overwritten)",
                    p.files, p.dirs, p.symlinks
                ),
                p.bytes,
            ))
        }
        BackupMethod::Redis | BackupMethod::Command => {
            let (target, what) = if step.method == BackupMethod::Redis {
                let keys: u64 = catalog::redis_report(&step.manifest)?
                    .keyspace
                    .iter()
                    .map(|d| d.keys)
                    .sum();
                (
                    StreamTarget::File(step.target.clone().into()),
                    format!(
                        "the RDB ({keys} keys) to {shown}: a dump.rdb for a stopped redis-server (--dir, --dbfilename)"
                    ),
                )
            } else {
                (
                    StreamTarget::Command {
                        target: step.target.clone(),
                        command: None,
                    },
                    format!(
                        "the backup into its recorded restore command with $BACKSTOP_TARGET={shown}"
                    ),
                )
            };
            if dry_run {
                return Ok(done(what, step.manifest.totals.raw_bytes));
            }
            let bytes =
                restore::restore_stream(dp, step.manifest.clone(), &recovery(), &target).await?;
            Ok(done(what, bytes))
        }
        BackupMethod::Config => {
            // A new file (mode 0600, never over an existing one): `.json` gets every item as
            // one JSON object, anything else the env file exactly (`config import`'s formats).
            let format = if step.target.ends_with(".json") {
                crate::config_backup::ImportFormat::Json
            } else {
                crate::config_backup::ImportFormat::Env
            };
            let what = format!(
                "the configuration as a new {} file {shown} (mode 0600)",
                if format == crate::config_backup::ImportFormat::Json {
                    "JSON"
                } else {
                    "env"
                }
            );
            if dry_run {
                if std::path::Path::new(&step.target).exists() {
                    return Err(OpsError::Invalid(format!(
                        "{shown} exists; a configuration is restored into a new file only"
                    )));
                }
                return Ok(done(what, step.manifest.totals.raw_bytes));
            }
            let bytes = crate::config_backup::import(
                dp,
                &step.manifest,
                &recovery(),
                &format,
                std::path::Path::new(&step.target),
            )
            .await?;
            Ok(done(what, bytes))
        }
        other => Err(OpsError::Invalid(format!(
            "component `{}` is a {other} backup ({backup_id}), which a set restore does not restore yet: restore it alone with `backstop restore {backup_id}`, or leave it out with --only",
            step.source
        ))),
    }
}

/// A set taken: the completed components and the failed ones.
pub struct SetTaken {
    pub set: SetRef,
    pub completed: Vec<BackupDone>,
    /// Source, backup id, error.
    pub failed: Vec<(String, Uuid, OpsError)>,
}

/// Takes a backup of each of `sources` in turn as set `name`, in the foreground (`backstop
/// backup --set`), each with `opts` (tags, limits) and the set's reference, and records
/// `set.started` and `set.completed` (see the module docs). Returns an error only when the
/// ledger refused the set's own events; the components' outcomes are in [`SetTaken`].
pub async fn run_set(
    dp: &DataPath,
    name: &str,
    sources: &[String],
    kind: BackupKind,
    actor: &Actor,
    opts: &BackupOptions,
) -> Result<SetTaken, OpsError> {
    let set = SetRef {
        id: uuid_v7(),
        name: name.to_string(),
    };
    let requested_at = backstop_events::now_micros();
    let planned: Vec<SetComponent> = sources
        .iter()
        .map(|s| SetComponent {
            source: s.clone(),
            backup_id: uuid_v7(),
        })
        .collect();
    let stream = streams::set(set.id);
    crate::record::record(
        dp.appender.as_ref(),
        &stream,
        actor,
        None,
        requested_at,
        "started",
        set.id,
        Event::SetStarted(SetStarted {
            set_id: set.id,
            name: set.name.clone(),
            components: planned.clone(),
            tags: opts.tags.clone(),
        }),
    )
    .await?;
    let mut opts = opts.clone();
    opts.set = Some(set.clone());
    let mut completed = Vec::new();
    let mut failed = Vec::new();
    for c in &planned {
        let request = BackupRequested {
            backup_id: c.backup_id,
            source: c.source.clone(),
            kind,
            method: BackupMethod::Logical,
            // Run here, in the foreground: workers leave it alone.
            trigger: Trigger::Foreground {
                host: crate::context::hostname(),
            },
            attempt: 1,
        };
        let bstream = streams::backup(c.backup_id);
        let event = NewEvent::new(
            &bstream,
            actor.clone(),
            &Event::BackupRequested(request.clone()),
        );
        let at = event.occurred_at;
        dp.appender
            .append(&bstream, ExpectedVersion::NoStream, vec![event])
            .await?;
        // The default method means each kind's own (logical for PostgreSQL).
        match run_backup(dp, &request, at, actor, None, &opts).await {
            Ok(done) => completed.push(done),
            Err(e) => {
                tracing::error!(set = %set.id, source = %c.source, error = %e.chain(), "a component of the set failed; the others go on");
                failed.push((c.source.clone(), c.backup_id, e));
            }
        }
    }
    crate::record::record(
        dp.appender.as_ref(),
        &stream,
        actor,
        None,
        requested_at,
        "completed",
        set.id,
        Event::SetCompleted(SetCompleted {
            set_id: set.id,
            name: set.name.clone(),
            completed: completed
                .iter()
                .map(|d| SetComponent {
                    source: d.completed.source.clone(),
                    backup_id: d.completed.backup_id,
                })
                .collect(),
            failed: failed
                .iter()
                .map(|(source, backup_id, e)| SetComponentFailed {
                    source: source.clone(),
                    backup_id: *backup_id,
                    reason: e.chain(),
                })
                .collect(),
        }),
    )
    .await?;
    Ok(SetTaken {
        set,
        completed,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_order_the_restore_and_parse_from_the_command_line() {
        let mut roles = vec![Role::Other, Role::Files, Role::Redis, Role::Database];
        roles.push(Role::Configuration);
        roles.sort();
        assert_eq!(
            roles,
            vec![
                Role::Configuration,
                Role::Database,
                Role::Redis,
                Role::Files,
                Role::Other
            ]
        );
        assert_eq!(Role::of(BackupMethod::Logical), Role::Database);
        assert_eq!(Role::of(BackupMethod::Redis), Role::Redis);
        assert_eq!(Role::of(BackupMethod::Files), Role::Files);
        assert_eq!(Role::of(BackupMethod::Command), Role::Other);
        assert_eq!(Role::parse("config"), Some(Role::Configuration));
        assert_eq!(Role::parse("database"), Some(Role::Database));
        assert_eq!(Role::parse("cache"), None);
    }
}
