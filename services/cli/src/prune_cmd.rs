//! `backstop prune`: garbage collection. Marks the objects no backup references (and the WAL
//! the retention policies no longer need) in sealed pending lists, and deletes those marked at
//! least a grace period ago if they are still unreferenced (`backstop_repo::gc`). Safe beside
//! running backups: the ones the ledger knows are running defer the sweep.

use std::path::Path;

use backstop_ops::forget::{PruneOutcome, PruneRun, prune_repository};
use backstop_ops::schedule::ConfigDuration;
use clap::Args;

use crate::config::Config;
use crate::forget_cmd::retention_facts;
use crate::wiring::{Events, RepoArgs, human, open_repository};

#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Report what would be marked and swept; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How long a marked object waits before deletion (overrides [prune] grace; default 24h).
    /// Keep it longer than any backup runs.
    #[arg(long)]
    pub grace: Option<ConfigDuration>,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(
    config: &Config,
    data_dir: &Path,
    args: PruneArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let retention = config.retention_config()?;
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events).await?;
    let facts = retention_facts(&events, data_dir).await?;
    let run = PruneRun {
        dry_run: args.dry_run,
        grace: args
            .grace
            .map(|g| g.as_chrono())
            .unwrap_or_else(|| config.prune_grace()),
        now: chrono::Utc::now(),
        scratch_dir: config.prune.scratch_dir.clone(),
    };
    let result = prune_repository(&repo, &retention, &facts, &run).await;
    drop(repo);
    events.close().await;
    let outcome = result.map_err(|e| anyhow::anyhow!(e.chain()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print_outcome(&outcome);
    }
    let r = &outcome.report;
    Ok(if r.failed > 0 || !r.lists_damaged.is_empty() {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}

fn print_outcome(o: &PruneOutcome) {
    let r = &o.report;
    let would = if r.dry_run { "would be " } else { "" };
    println!(
        "listed {} objects ({}) against {} manifests: {} referenced, {} WAL files no kept backup needs",
        r.objects_listed,
        human(r.bytes_listed),
        r.manifests,
        r.referenced,
        o.wal_candidates
    );
    println!(
        "marked: {} newly {would}marked ({}), {} already marked; {} waiting for their grace ({} s)",
        r.newly_marked,
        human(r.newly_marked_bytes),
        r.already_marked,
        r.waiting,
        r.grace_seconds
    );
    println!(
        "swept: {} {would}deleted, {} reclaimed; {} spared (referenced again)",
        r.swept,
        human(r.bytes_reclaimed),
        r.spared
    );
    if !r.sweep_deferred_for.is_empty() {
        println!(
            "sweep deferred: backups {} are running (started in the ledger, no manifest yet); the next prune after they end sweeps",
            r.sweep_deferred_for
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if r.locked > 0 {
        println!(
            "{} objects are under object lock: kept in their list, retried by a later prune",
            r.locked
        );
    }
    if r.failed > 0 {
        eprintln!(
            "error: {} deletes failed (kept in their list, retried by the next prune): {}",
            r.failed,
            r.first_failure.as_deref().unwrap_or("?")
        );
    }
    for l in &r.lists_damaged {
        eprintln!(
            "error: pending list {l} does not authenticate; it was skipped (its objects are marked again). Run `backstop check --read-data`"
        );
    }
    if r.dry_run {
        println!("dry run: nothing written, nothing deleted");
    }
}
