//! Backup sets on the command line (`[[sets]]`, backstop_ops::sets): `backup --set NAME`,
//! `restore --set ID|latest|NAME [--only ...] [--target S=T] [--dry-run]` and `set list`.
//!
//! A set restore stops at the first step that fails: the later components (Redis after its
//! database, files after both) would otherwise come back ahead of what they depend on. The steps
//! already done stay done and are named, with the ones not run.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use backstop_events::Actor;
use backstop_ops::DataPath;
use backstop_ops::backup::{BackupOptions, SourceReport};
use backstop_ops::sets::{self, Role};
use clap::Subcommand;

use crate::backup_cmd::BackupArgs;
use crate::config::Config;
use crate::restore_cmd::RestoreArgs;
use crate::wiring::{Events, RepoArgs, human, open_repository, operator, source_specs};

#[derive(Subcommand)]
pub enum SetCommand {
    /// The backup sets in the repository, oldest first, with their components.
    List {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: &Config, data_dir: &Path, cmd: SetCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SetCommand::List { repo, json } => list(config, data_dir, &repo, json).await,
    }
}

/// `backstop backup --set NAME`: every source of the set, one after another.
pub async fn backup_set(
    config: &Config,
    data_dir: &Path,
    name: &str,
    args: &BackupArgs,
) -> anyhow::Result<ExitCode> {
    let set = config.set(name)?.clone();
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events).await?;
    let dp = DataPath {
        repo,
        appender: events.appender.clone(),
        sources: source_specs(config),
    };
    let actor = Actor::operator(operator());
    let mut opts = BackupOptions {
        jobs: args.jobs,
        tags: args.tags.clone(),
        ..Default::default()
    };
    config.job_limits().apply(&mut opts);
    let result = sets::run_set(&dp, &set.name, &set.sources, args.kind, &actor, &opts).await;
    drop(dp);
    events.close().await;
    let taken = result?;
    let ok = taken.failed.is_empty();
    if args.json {
        let v = serde_json::json!({
            "set_id": taken.set.id,
            "name": taken.set.name,
            "tags": args.tags,
            "ok": ok,
            "completed": taken.completed.iter().map(|d| serde_json::json!({
                "source": d.completed.source,
                "backup_id": d.completed.backup_id,
                "method": d.completed.method,
                "role": Role::of(d.completed.method),
                "raw_bytes": d.completed.raw_bytes,
                "new_bytes": d.completed.new_bytes,
            })).collect::<Vec<_>>(),
            "failed": taken.failed.iter().map(|(source, id, e)| serde_json::json!({
                "source": source, "backup_id": id, "reason": e.chain(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "backup set {} `{}`{}: {} of {} components completed",
            taken.set.id,
            taken.set.name,
            if args.tags.is_empty() {
                String::new()
            } else {
                format!(" (tags {})", args.tags.join(", "))
            },
            taken.completed.len(),
            set.sources.len()
        );
        for d in &taken.completed {
            let c = &d.completed;
            let extra = match &d.report {
                SourceReport::Logical(_) => format!(
                    "; {} tables, {} rows",
                    c.tables.len(),
                    c.tables.iter().map(|t| t.rows).sum::<u64>()
                ),
                SourceReport::Files(r) => format!("; {} files", r.files),
                _ => String::new(),
            };
            println!(
                "  ok      {:<16} {:<13} backup {}: read {}, {} new{extra}",
                c.source,
                Role::of(c.method).as_str(),
                c.backup_id,
                human(c.raw_bytes),
                human(c.new_bytes)
            );
        }
        for (source, id, e) in &taken.failed {
            println!("  FAILED  {source:<16} backup {id}: {}", e.chain());
        }
    }
    if !ok {
        eprintln!(
            "error: backup set {} is incomplete: {} of {} components failed ({}); the others' backups are kept and `restore --set {}` restores them",
            taken.set.id,
            taken.failed.len(),
            set.sources.len(),
            taken
                .failed
                .iter()
                .map(|(s, _, _)| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            taken.set.id
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `backstop restore --set ...`.
pub async fn restore_set(
    config: &Config,
    data_dir: &Path,
    args: &RestoreArgs,
) -> anyhow::Result<ExitCode> {
    let which = args.set.clone().context("--set names the set")?;
    let mut overrides = Vec::new();
    for t in &args.targets {
        let Some((s, target)) = t.split_once('=') else {
            bail!("--target {t:?}: write SOURCE=TARGET, e.g. --target main=postgres://db/app");
        };
        overrides.push((s.to_string(), target.to_string()));
    }
    let mut events = Events::open(config, data_dir).await?;
    let (repo, _served_by) = crate::replica_cmd::open_for_restore(
        config,
        data_dir,
        &args.repo,
        &mut events,
        args.from.as_deref(),
    )
    .await?;
    let dp = DataPath {
        repo,
        appender: events.appender.clone(),
        sources: Vec::new(),
    };
    let result = restore_steps(config, &dp, &which, args, &overrides).await;
    drop(dp);
    events.close().await;
    result
}

async fn restore_steps(
    config: &Config,
    dp: &DataPath,
    which: &str,
    args: &RestoreArgs,
    overrides: &[(String, String)],
) -> anyhow::Result<ExitCode> {
    let stored = sets::resolve_set(&dp.repo, which, args.tag.as_deref()).await?;
    let configured = config.sets.iter().find(|s| s.name == stored.set.name);
    let mut targets: HashMap<String, String> = configured
        .map(|s| s.restore.clone().into_iter().collect())
        .unwrap_or_default();
    for (s, t) in overrides {
        if !stored.components.iter().any(|m| &m.source == s) {
            bail!(
                "--target {s}=...: set {} has no component `{s}`",
                stored.set.id
            );
        }
        targets.insert(s.clone(), t.clone());
    }
    let steps = sets::plan(&stored, &args.only, &targets)?;
    println!(
        "{}backup set {} `{}` (finished {}{}): {} of {} components, in this order:",
        if args.dry_run { "dry run: " } else { "" },
        stored.set.id,
        stored.set.name,
        stored.finished_at().format("%Y-%m-%d %H:%M:%S UTC"),
        if stored.tags.is_empty() {
            String::new()
        } else {
            format!(", tags {}", stored.tags.join(", "))
        },
        steps.len(),
        stored.components.len()
    );
    if args.only.is_empty()
        && let Some(c) = configured
    {
        for s in c
            .sources
            .iter()
            .filter(|s| !stored.components.iter().any(|m| &m.source == *s))
        {
            println!("  note: the set has no backup of `{s}` (it failed or was added later)");
        }
    }
    let operator = operator();
    for (i, step) in steps.iter().enumerate() {
        println!(
            "  {}/{} {:<13} {:<16} backup {} ({}) -> {}",
            i + 1,
            steps.len(),
            step.role.as_str(),
            step.source,
            step.manifest.backup_id,
            step.method,
            step.target
        );
        match sets::restore_step(dp, step, &operator, args.dry_run, args.jobs).await {
            Ok(done) if args.dry_run => println!(
                "      would write {} ({}); every object is present",
                done.what,
                human(done.bytes)
            ),
            Ok(done) => println!("      restored {} ({})", done.what, human(done.bytes)),
            Err(e) => {
                println!("      FAILED: {}", e.chain());
                let rest: Vec<&str> = steps[i + 1..].iter().map(|s| s.source.as_str()).collect();
                eprintln!(
                    "error: restore of set {} stopped at `{}`: {}{}",
                    stored.set.id,
                    step.source,
                    e.chain(),
                    if rest.is_empty() {
                        String::new()
                    } else {
                        format!(" (not run: {})", rest.join(", "))
                    }
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    if args.dry_run {
        println!("dry run: nothing was written and no recovery was recorded");
    } else {
        println!(
            "restored {} component(s) of set {}",
            steps.len(),
            stored.set.id
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `backstop set list`.
async fn list(
    config: &Config,
    data_dir: &Path,
    repo: &RepoArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, repo, &mut events)
        .await?
        .with_access(
            Actor::operator(operator()).to_string(),
            "listing the backup sets",
        );
    let result = sets::list_sets(&repo).await;
    drop(repo);
    events.close().await;
    let all = result?;
    if json {
        let v: Vec<_> = all
            .iter()
            .map(|s| {
                serde_json::json!({
                    "set_id": s.set.id,
                    "name": s.set.name,
                    "started_at": s.started_at,
                    "finished_at": s.finished_at(),
                    "tags": s.tags,
                    "components": s.components.iter().map(|m| {
                        let method = backstop_ops::catalog::method_of(m);
                        serde_json::json!({
                            "source": m.source, "backup_id": m.backup_id,
                            "method": method, "role": Role::of(method),
                        })
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!("no backup sets yet (`backstop backup --set NAME` takes one)");
    }
    for s in &all {
        println!(
            "{}  {:<12} {}  {}{}",
            s.set.id,
            s.set.name,
            s.finished_at().format("%Y-%m-%d %H:%M:%S UTC"),
            s.components
                .iter()
                .map(|m| format!(
                    "{} ({})",
                    m.source,
                    Role::of(backstop_ops::catalog::method_of(m))
                ))
                .collect::<Vec<_>>()
                .join(", "),
            if s.tags.is_empty() {
                String::new()
            } else {
                format!("  [{}]", s.tags.join(", "))
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
