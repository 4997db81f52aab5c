//! `backstop git sync NAME`: one sync of a git source by hand (backstop_ops::git::sync): the
//! mirror pushed and its hashes compared, the outcome recorded, and a bundle backed up when
//! the refs changed. Exits 0 when the mirror equals the source and the bundle is in the
//! repository, 1 otherwise (a diverged mirror, a failed sync or bundle).

use std::path::Path;
use std::process::ExitCode;

use backstop_events::Actor;
use backstop_ops::DataPath;
use backstop_ops::backup::BackupOptions;
use backstop_ops::git::{BundleOutcome, sync};
use clap::Subcommand;

use crate::config::Config;
use crate::wiring::{Events, RepoArgs, human, open_repository, operator, source_specs};

#[derive(Subcommand)]
pub enum GitCommand {
    /// Sync a git source now: mirror it, compare every ref's hash on both sides, bundle it.
    Sync {
        #[command(flatten)]
        repo: RepoArgs,
        /// The git source (`[[sources]] kind = "git"`).
        name: String,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: &Config, data_dir: &Path, cmd: GitCommand) -> anyhow::Result<ExitCode> {
    let GitCommand::Sync { repo, name, json } = cmd;
    let mut events = Events::open(config, data_dir).await?;
    let repository = open_repository(config, data_dir, &repo, &mut events).await?;
    let dp = DataPath {
        repo: repository,
        appender: events.appender.clone(),
        sources: source_specs(config),
    };
    let mut opts = BackupOptions::default();
    config.job_limits().apply(&mut opts);
    let outcome = sync(&dp, &name, &Actor::operator(operator()), &opts).await;
    drop(dp);
    events.close().await;
    let outcome = outcome?;
    if json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        match (&outcome.report, &outcome.failed, &outcome.mirror) {
            (_, Some(why), Some(m)) => println!("mirror {m}: sync FAILED: {why}"),
            (Some(r), None, Some(m)) if r.in_sync() => println!(
                "mirror {m}: in sync, {} refs with equal hashes on both sides (HEAD {} at {}); {} pushed{}",
                r.refs.len(),
                r.head_ref.as_deref().unwrap_or("-"),
                r.head.as_deref().unwrap_or("-"),
                r.updated.len(),
                if r.forced.is_empty() {
                    String::new()
                } else {
                    format!(", {} diverged ref(s) FORCED", r.forced.len())
                }
            ),
            (Some(r), None, Some(m)) => {
                println!(
                    "mirror {m}: DIVERGED, {} ref(s) differ and were left alone ({} others pushed):",
                    r.diverged.len(),
                    r.updated.len()
                );
                for d in &r.diverged {
                    println!(
                        "  {}: source {}, mirror {}: {}",
                        d.name,
                        d.source.as_deref().unwrap_or("(none)"),
                        d.mirror.as_deref().unwrap_or("(none)"),
                        d.why
                    );
                }
            }
            _ => println!("no mirror configured: bundle only"),
        }
        match &outcome.bundle {
            BundleOutcome::Taken {
                backup_id,
                raw_bytes,
            } => println!("bundle: backup {backup_id} ({})", human(*raw_bytes)),
            BundleOutcome::Unchanged { backup_id } => {
                println!("bundle: refs unchanged since backup {backup_id}; none taken")
            }
            BundleOutcome::Failed { reason } => println!("bundle: FAILED: {reason}"),
        }
    }
    Ok(if outcome.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
