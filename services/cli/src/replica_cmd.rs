//! Replicas from the command line: opening `[[repository.replicas]]`, `backstop replicate
//! [--catch-up]`, `backstop check --replica NAME [--heal]`, and choosing the copy a restore
//! reads (`--from NAME`, or a replica when the primary is unreachable).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use backstop_events::Actor;
use backstop_ops::replicate::{self, Recorder, Replica};
use backstop_repo::{KeyAccess, Location, Repository, S3Settings};
use clap::Args;
use tokio::sync::mpsc::unbounded_channel;
use uuid::Uuid;

use crate::config::{Config, ReplicaSection};
use crate::wiring::{self, Events, RepoArgs, human, operator};

fn settings(r: &ReplicaSection) -> S3Settings {
    S3Settings {
        endpoint: r.endpoint.clone(),
        region: r.region.clone(),
        access_key: r.access_key_id.clone(),
        secret_key: r.secret_access_key.clone(),
        path_style: r.path_style.unwrap_or(true),
        ..Default::default()
    }
}

pub(crate) fn section<'a>(config: &'a Config, name: &str) -> anyhow::Result<&'a ReplicaSection> {
    config
        .repository
        .replicas
        .iter()
        .find(|r| r.name == name)
        .with_context(|| {
            let names: Vec<&str> = config
                .repository
                .replicas
                .iter()
                .map(|r| r.name.as_str())
                .collect();
            format!(
                "no replica named `{name}`: configured under [[repository.replicas]]: {}",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })
}

/// Opens a configured replica's backend.
pub async fn open_replica(r: &ReplicaSection) -> anyhow::Result<Replica> {
    let loc = Location::parse(&r.location)
        .with_context(|| format!("[[repository.replicas]] `{}`: location", r.name))?;
    let backend = loc
        .open(Some(settings(r)))
        .await
        .with_context(|| format!("cannot open replica `{}` at {loc}", r.name))?;
    Ok(Replica {
        name: r.name.clone(),
        backend,
    })
}

/// Every configured replica that opens (for the replicate worker); one that does not is logged
/// and left out.
pub async fn open_replicas(config: &Config) -> Vec<Replica> {
    let mut out = Vec::new();
    for r in &config.repository.replicas {
        match open_replica(r).await {
            Ok(x) => out.push(x),
            Err(e) => {
                tracing::error!(replica = %r.name, error = %format!("{e:#}"), "replica unusable; the replicate worker leaves it out")
            }
        }
    }
    out
}

/// The replicas to work on: `only` or every configured one.
async fn chosen(config: &Config, only: Option<&str>) -> anyhow::Result<Vec<Replica>> {
    let sections: Vec<&ReplicaSection> = match only {
        Some(n) => vec![section(config, n)?],
        None => config.repository.replicas.iter().collect(),
    };
    if sections.is_empty() {
        anyhow::bail!(
            "no replica configured: add a [[repository.replicas]] section (name, location) to the configuration file"
        );
    }
    let mut out = Vec::new();
    for s in sections {
        out.push(open_replica(s).await?);
    }
    Ok(out)
}

/// Opens the repository a restore reads: the replica `from` when given; otherwise the primary,
/// or, when the primary is unreachable (a transient storage error), the first configured
/// replica that opens. Says on stderr (and in the log) which copy serves it, and returns its
/// name (`primary` or the replica's).
pub async fn open_for_restore(
    config: &Config,
    data_dir: &Path,
    args: &RepoArgs,
    events: &mut Events,
    from: Option<&str>,
) -> anyhow::Result<(Repository, String)> {
    if let Some(name) = from {
        let r = section(config, name)?;
        let repo = open_replica_repository(config, args, events, r).await?;
        eprintln!("restoring from replica `{name}` ({})", repo.location());
        tracing::info!(replica = %name, "restore served by a replica (--from)");
        return Ok((repo, name.to_string()));
    }
    match wiring::open_repository(config, data_dir, args, events).await {
        Ok(repo) => Ok((repo, replicate::PRIMARY.to_string())),
        Err(e) => {
            let transient = e
                .downcast_ref::<backstop_repo::RepoError>()
                .is_some_and(|r| r.is_transient());
            if !transient || config.repository.replicas.is_empty() {
                return Err(e);
            }
            for r in &config.repository.replicas {
                match open_replica_repository(config, args, events, r).await {
                    Ok(repo) => {
                        eprintln!(
                            "the primary repository is unreachable ({e:#}); restoring from replica `{}` ({})",
                            r.name,
                            repo.location()
                        );
                        tracing::warn!(replica = %r.name, error = %format!("{e:#}"), "primary unreachable: restore served by a replica");
                        return Ok((repo, r.name.clone()));
                    }
                    Err(re) => {
                        tracing::warn!(replica = %r.name, error = %format!("{re:#}"), "replica cannot be opened either");
                    }
                }
            }
            Err(e.context("the primary is unreachable and no replica could be opened"))
        }
    }
}

async fn open_replica_repository(
    config: &Config,
    args: &RepoArgs,
    events: &mut Events,
    r: &ReplicaSection,
) -> anyhow::Result<Repository> {
    let master = wiring::master_key(config, args)?;
    let replica = open_replica(r).await?;
    let (tx, rx) = unbounded_channel::<KeyAccess>();
    let repo = Repository::open(replica.backend, &master, Arc::new(tx))
        .await
        .with_context(|| format!("cannot open replica `{}`", r.name))?;
    events.key_recorder = Some(tokio::spawn(backstop_ops::keys::record_key_accesses(
        rx,
        events.appender.clone(),
    )));
    Ok(repo)
}

#[derive(Args)]
pub struct ReplicateArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Only this replica (default: every configured one).
    #[arg(long)]
    pub to: Option<String>,
    /// This backup (default: the newest).
    #[arg(long, conflicts_with = "catch_up")]
    pub backup: Option<Uuid>,
    /// Every backup on the primary that the replica lacks, oldest first.
    #[arg(long)]
    pub catch_up: bool,
}

/// `backstop replicate`.
pub async fn replicate(
    config: &Config,
    data_dir: &Path,
    args: ReplicateArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let primary = wiring::open_repository(config, data_dir, &args.repo, &mut events).await?;
    let replicas = chosen(config, args.to.as_deref()).await?;
    let rec = Recorder {
        appender: events.appender.as_ref(),
        actor: Actor::operator(operator()),
        cause: None,
    };
    let result = async {
        let mut failed = false;
        for replica in &replicas {
            let ids = if args.catch_up {
                replicate::missing_backups(&primary, replica).await?
            } else if let Some(id) = args.backup {
                vec![id]
            } else {
                match primary.backup_ids().await?.last() {
                    Some(id) => vec![*id],
                    None => {
                        println!("no backup to replicate");
                        Vec::new()
                    }
                }
            };
            for id in ids {
                match replicate::replicate_backup(&rec, &primary, replica, id).await {
                    Ok(r) => println!(
                        "backup {id} replicated to {}: {} objects, {} copied ({})",
                        replica.name,
                        r.objects,
                        r.copied,
                        human(r.bytes)
                    ),
                    Err(e) => {
                        eprintln!("backup {id} not replicated to {}: {e}", replica.name);
                        failed = true;
                    }
                }
            }
            // WAL files wal-push could not write to it while it was unreachable.
            match replicate::replicate_wal(&primary, replica).await {
                Ok(r) => println!(
                    "WAL replicated to {}: {} objects, {} copied ({})",
                    replica.name,
                    r.objects,
                    r.copied,
                    human(r.bytes)
                ),
                Err(e) => {
                    eprintln!("WAL not replicated to {}: {e}", replica.name);
                    failed = true;
                }
            }
            let now = chrono::Utc::now();
            let lag = replicate::measure_lag(&primary, replica, now).await?;
            replicate::record_lag(&rec, &replica.name, lag, now).await?;
            println!("replica {} lag: {lag} s", replica.name);
        }
        Ok::<bool, anyhow::Error>(failed)
    }
    .await;
    drop(primary);
    events.close().await;
    let failed = result?;
    Ok(if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}

/// `backstop check --replica NAME [--heal]`.
pub async fn check_replica(
    config: &Config,
    data_dir: &Path,
    args: RepoArgs,
    name: &str,
    heal: bool,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let primary = wiring::open_repository(config, data_dir, &args, &mut events).await?;
    let replica = open_replica(section(config, name)?).await?;
    let report = replicate::compare(&primary, &replica, heal).await;
    // The key-access recorder (and so `close`) waits until every repository handle is gone.
    drop(primary);
    events.close().await;
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for d in &report.differences {
            println!(
                "{}: {} on replica {}{}",
                d.key,
                d.kind,
                name,
                if d.healed {
                    " (healed from the primary)"
                } else {
                    ""
                }
            );
        }
        println!(
            "replica {name}: {} objects compared ({} read), {} differences",
            report.objects,
            human(report.bytes_read),
            report.differences.len()
        );
    }
    if report.is_ok() {
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        eprintln!(
            "replica {name} differs from the primary: run `backstop check --replica {name} --heal`"
        );
        Ok(std::process::ExitCode::FAILURE)
    }
}
