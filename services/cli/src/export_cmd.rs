//! `backstop export`: table exports (JSON Lines from one snapshot, sealed with the `export` key)
//! through [`backstop_ops::export`]; `export get` writes one table as a `.jsonl.gz` file,
//! `export list` shows the exports in the repository.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use backstop_events::{Actor, Event, ExportRequested, NewEvent, Trigger, streams};
use backstop_ledger::ExpectedVersion;
use backstop_ops::export::{ExportIndex, export_get, list_exports};
use backstop_ops::export_lifecycle::{ExportFailures, run_requested};
use clap::{Args, Subcommand};
use uuid::Uuid;

use crate::config::Config;
use crate::wiring::{Events, RepoArgs, human, open_repository, operator, source_specs};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub cmd: Option<ExportCommand>,
    #[command(flatten)]
    pub repo: RepoArgs,
    /// A source from the configuration file (default: the only one).
    #[arg(long)]
    pub source: Option<String>,
    /// Export only these tables (`schema.table` or a bare name; comma-separated). Default: all.
    #[arg(long, value_delimiter = ',')]
    pub tables: Vec<String>,
    /// Print the export's index as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum ExportCommand {
    /// Write one table of an export as a `.jsonl.gz` file.
    Get {
        #[command(flatten)]
        repo: RepoArgs,
        /// The export's id (from `backstop export` or `backstop export list`).
        id: Uuid,
        /// The table (`schema.table`, or a bare name unique in the export).
        #[arg(long)]
        table: String,
        /// The file to write (replaced only once it is complete and checked).
        #[arg(long)]
        out: PathBuf,
    },
    /// Delete the exports their retention policy (`[[retention]] class = "exports"`, 90 days by
    /// default) no longer keeps, as the daily maintenance does, recording each as
    /// `export.deleted`.
    Expire {
        #[command(flatten)]
        repo: RepoArgs,
        /// Say what would be deleted; delete and record nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// The exports in the repository, oldest first.
    List {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: &Config, data_dir: &Path, args: ExportArgs) -> anyhow::Result<ExitCode> {
    match args.cmd {
        None => {
            export(
                config,
                data_dir,
                args.repo,
                args.source,
                args.tables,
                args.json,
            )
            .await
        }
        Some(ExportCommand::Get {
            repo,
            id,
            table,
            out,
        }) => get(config, data_dir, repo, id, &table, &out).await,
        Some(ExportCommand::List { repo, json }) => list(config, data_dir, repo, json).await,
        Some(ExportCommand::Expire {
            repo,
            dry_run,
            json,
        }) => expire(config, data_dir, repo, dry_run, json).await,
    }
}

async fn export(
    config: &Config,
    data_dir: &Path,
    repo_args: RepoArgs,
    source: Option<String>,
    tables: Vec<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let sources = source_specs(config);
    let name = crate::wiring::configured_source(config, source.as_deref())?;
    let spec = sources
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| backstop_ops::OpsError::UnknownSource(name.clone()))?;
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &repo_args, &mut events).await?;
    let actor = Actor::operator(operator());
    let request = ExportRequested {
        export_id: backstop_events::uuid_v7(),
        source: name.clone(),
        tables,
        // Run here, in the foreground: the export worker leaves it alone.
        trigger: Trigger::Foreground {
            host: backstop_ops::context::hostname(),
        },
    };
    let stream = streams::export(request.export_id);
    let requested = NewEvent::new(
        &stream,
        actor.clone(),
        &Event::ExportRequested(request.clone()),
    );
    let requested_at = requested.occurred_at;
    let result = match events
        .appender
        .append(&stream, ExpectedVersion::NoStream, vec![requested])
        .await
    {
        Ok(_) => {
            run_requested(
                &repo,
                events.appender.as_ref(),
                &spec,
                &request,
                requested_at,
                None,
                &actor,
                ExportFailures::RecordAll,
            )
            .await
        }
        Err(e) => Err(e.into()),
    };
    // The repository holds the key-access channel the recorder drains: drop it first, or
    // close() waits for a channel that never ends.
    drop(repo);
    events.close().await;
    let index = result.with_context(|| format!("export of source `{name}` failed"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&index)?);
    } else {
        print_index(&index);
    }
    Ok(ExitCode::SUCCESS)
}

async fn expire(
    config: &Config,
    data_dir: &Path,
    repo_args: RepoArgs,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &repo_args, &mut events).await?;
    let retention = config.retention_config()?;
    let result = backstop_ops::export_lifecycle::expire(
        &repo,
        events.appender.as_ref(),
        &retention,
        chrono::Utc::now(),
        &Actor::operator(operator()),
        dry_run,
    )
    .await;
    drop(repo);
    events.close().await;
    let report = result.context("the exports' retention pass failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    for d in &report.deleted {
        println!(
            "{verb} export {} of {} (finished {})",
            d.export_id,
            d.source,
            d.finished_at.format("%Y-%m-%d %H:%M UTC")
        );
    }
    for (id, why) in &report.unreadable {
        println!("kept export {id}: its index is unreadable ({why})");
    }
    println!(
        "{} export(s) {verb}, {} kept by the exports' retention policy, {} orphaned object(s){}",
        report.deleted.len(),
        report.kept,
        report.orphan_objects,
        if dry_run { " to remove" } else { " removed" }
    );
    if report.delete_failures > 0 {
        eprintln!(
            "{} object(s) could not be deleted; run `backstop export expire` again (the deletions are recorded and finish on the next pass)",
            report.delete_failures
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_index(index: &ExportIndex) {
    println!(
        "export {} of {} (database {}, PostgreSQL {}) at {}: {} tables, {} rows, {} stored",
        index.export_id,
        index.source,
        index.database,
        index.server_version,
        index.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
        index.tables.len(),
        index.rows(),
        human(index.sealed_bytes())
    );
    for t in &index.tables {
        println!(
            "  {:<40} {:>12} rows {:>10} JSON",
            t.table.to_string(),
            t.rows,
            human(t.json_bytes)
        );
    }
}

async fn get(
    config: &Config,
    data_dir: &Path,
    repo_args: RepoArgs,
    id: Uuid,
    table: &str,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &repo_args, &mut events).await?;
    let actor = format!("operator:{}", operator());
    let result = export_get(&repo, id, table, out, &actor).await;
    // The repository holds the key-access channel the recorder drains: drop it first, or
    // close() waits for a channel that never ends.
    drop(repo);
    events.close().await;
    let w = result.with_context(|| format!("export get {id} --table {table} failed"))?;
    println!(
        "{}: {} rows, {} of JSON Lines, {} gzip, written to {}",
        w.table,
        w.rows,
        human(w.json_bytes),
        human(w.gzip_bytes),
        w.path.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn list(
    config: &Config,
    data_dir: &Path,
    repo_args: RepoArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &repo_args, &mut events).await?;
    let result = list_exports(&repo).await;
    // The repository holds the key-access channel the recorder drains: drop it first, or
    // close() waits for a channel that never ends.
    drop(repo);
    events.close().await;
    let all = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!("no exports");
    }
    for index in &all {
        print_index(index);
    }
    Ok(ExitCode::SUCCESS)
}
