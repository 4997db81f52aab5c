//! `backstop webhook list NAME` and `backstop webhook replay NAME`: the webhook log's pieces in
//! the repository, and their entries (plus the local, not yet uploaded tail) replayed into a
//! database table after a recovery, each (log, sequence) once ([`backstop_ops::webhook`]).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use backstop_ops::webhook::{check_name, list_pieces, log_dir, read_entries, replay_into};
use chrono::{DateTime, Utc};
use clap::Subcommand;

use crate::config::Config;
use crate::wiring::{Events, RepoArgs, human, open_repository, operator};

#[derive(Subcommand)]
pub enum WebhookCommand {
    /// The sealed pieces of a webhook log in the repository (day, sequence range, size).
    List {
        #[command(flatten)]
        repo: RepoArgs,
        /// The log (`[[webhooks]] name`).
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Insert the entries received in [--from, --to) into a table, skipping those already
    /// there (the table's primary key is (log, seq)); creates the table when missing.
    Replay {
        #[command(flatten)]
        repo: RepoArgs,
        /// The log (`[[webhooks]] name`).
        name: String,
        /// Start (inclusive), RFC 3339, e.g. 2026-12-01T00:00:00-05:00.
        #[arg(long)]
        from: DateTime<Utc>,
        /// End (exclusive), RFC 3339; default now.
        #[arg(long)]
        to: Option<DateTime<Utc>>,
        /// The database: postgres://...
        #[arg(long)]
        to_db: String,
        /// The table (`table` or `schema.table`).
        #[arg(long)]
        table: String,
        /// Leave out the local, not yet uploaded tail (DATA_DIR/webhooks/NAME).
        #[arg(long)]
        no_local: bool,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(
    config: &Config,
    data_dir: &Path,
    cmd: WebhookCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        WebhookCommand::List { repo, name, json } => {
            check_name(&name)?;
            let mut events = Events::open(config, data_dir).await?;
            let repo = open_repository(config, data_dir, &repo, &mut events)
                .await?
                .with_access(
                    backstop_events::Actor::operator(operator()).to_string(),
                    format!("listing the webhook log {name}"),
                );
            let result = list_pieces(&repo, &name).await;
            drop(repo);
            events.close().await;
            let pieces = result?;
            if json {
                println!("{}", serde_json::to_string_pretty(&pieces)?);
                return Ok(ExitCode::SUCCESS);
            }
            if pieces.is_empty() {
                println!("no sealed pieces of the webhook log {name}");
            }
            for p in &pieces {
                println!(
                    "{}  seq {}-{}  {} entries  {}  {}",
                    p.day,
                    p.first,
                    p.last,
                    p.entries,
                    human(p.sealed_bytes),
                    p.key
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        WebhookCommand::Replay {
            repo,
            name,
            from,
            to,
            to_db,
            table,
            no_local,
            json,
        } => {
            check_name(&name)?;
            let to = to.unwrap_or_else(Utc::now);
            if to <= from {
                anyhow::bail!("--to ({to}) must be after --from ({from})");
            }
            let mut events = Events::open(config, data_dir).await?;
            let repo = open_repository(config, data_dir, &repo, &mut events)
                .await?
                .with_access(
                    backstop_events::Actor::operator(operator()).to_string(),
                    format!("replaying the webhook log {name} into {table}"),
                );
            let dir = log_dir(data_dir, &name);
            let local = (!no_local && dir.exists()).then_some(dir.as_path());
            let result = read_entries(&repo, &name, from, to, local).await;
            drop(repo);
            events.close().await;
            let entries = result.with_context(|| format!("reading the webhook log {name}"))?;
            let report = replay_into(&to_db, &table, &name, &entries).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "webhook log {name}: {} entries from {from} to {to}; {} inserted into {table}, {} already there",
                    report.entries, report.inserted, report.skipped
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
