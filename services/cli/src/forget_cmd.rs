//! `backstop forget`: the retention policies applied now, keep or remove per backup with the
//! rules that keep it; `--dry-run` shows the same decisions and changes nothing. The work is
//! `backstop_ops::forget::forget`; this module reads the ledger's facts (verifications, running
//! backups) and prints.

use std::path::Path;

use backstop_events::Actor;
use backstop_ops::forget::{ForgetOptions, ForgetReport, RetentionFacts, forget};
use clap::Args;

use crate::config::Config;
use crate::wiring::{Events, RepoArgs, open_repository, operator};

#[derive(Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Only this source's backups (default: every source).
    #[arg(long)]
    pub source: Option<String>,
    /// Show the decisions; record nothing and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(
    config: &Config,
    data_dir: &Path,
    args: ForgetArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let retention = config.retention_config()?;
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events).await?;
    let facts = retention_facts(&events, data_dir).await?;
    let opts = ForgetOptions {
        source: args.source.clone(),
        dry_run: args.dry_run,
        now: chrono::Utc::now(),
    };
    let actor = Actor::operator(operator());
    let result = forget(
        &repo,
        events.appender.as_ref(),
        &retention,
        &facts,
        &opts,
        &actor,
    )
    .await;
    drop(repo);
    events.close().await;
    let report = result.map_err(|e| anyhow::anyhow!(e.chain()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_report(r: &ForgetReport) {
    if r.sources.is_empty() {
        println!("no backups and no WAL to decide on");
    }
    for s in &r.sources {
        println!("{}", s.rules);
        for d in r.decisions.iter().filter(|d| d.source == s.source) {
            let verdict = match (d.keep, d.forgotten) {
                (true, _) => "keep",
                (false, true) => "removed",
                (false, false) if r.dry_run => "remove",
                (false, false) => "remove (not yet: locked)",
            };
            println!(
                "  {verdict:<8} {}  {}  {} {}  {}",
                d.time.format("%Y-%m-%d %H:%M:%S"),
                d.backup_id,
                d.kind.as_str(),
                d.method,
                d.reason
            );
        }
        if let Some(plan) = &s.wal {
            println!(
                "  WAL: {} files, {} no longer needed (the window starts {}; {}): the next prune deletes them",
                s.wal_files,
                s.wal_candidates.len(),
                plan.window_start.format("%Y-%m-%d %H:%M"),
                if plan.covered {
                    "covered by a kept base backup"
                } else {
                    "NOT covered: no kept base backup is that old"
                }
            );
        }
    }
    for (id, why) in &r.unreadable {
        eprintln!("warning: backup {id} cannot be read ({why}); run `backstop check --read-data`");
    }
    for id in &r.healed {
        println!("recorded the deletion of {id}, decided by an earlier run that stopped");
    }
    let removed = r.removed().count();
    if r.dry_run {
        println!("dry run: {removed} backups would be removed; nothing recorded, nothing deleted");
    } else {
        let done = r.removed().filter(|d| d.forgotten).count();
        println!(
            "{done} backups removed (their chunks are reclaimed by `backstop prune`), {} kept",
            r.decisions.len() - removed
        );
        if !r.locked.is_empty() {
            println!(
                "{} manifests are under object lock: they are removed by a later run, once the lock expires",
                r.locked.len()
            );
        }
    }
}

/// What retention reads from the ledger: this process's own, or the running serve's through
/// its control socket.
pub async fn retention_facts(events: &Events, data_dir: &Path) -> anyhow::Result<RetentionFacts> {
    let mut facts = RetentionFacts::default();
    crate::wiring::each_event(
        events,
        data_dir,
        "verifications decide what retention may delete",
        |env| facts.observe(env),
    )
    .await?;
    Ok(facts)
}
