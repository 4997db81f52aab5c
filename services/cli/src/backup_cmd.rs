//! `backstop backup`: a logical or physical backup in the foreground, with a progress bar,
//! through [`backstop_ops::backup::run_backup`] (the same use case the backup worker runs).

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use backstop_events::{
    Actor, BackupKind, BackupMethod, BackupRequested, Event, NewEvent, Trigger, streams, uuid_v7,
};
use backstop_ledger::ExpectedVersion;
use backstop_ops::backup::{BackupOptions, ProgressFn, SourceReport, run_backup as run};
use backstop_ops::{DataPath, SourceSpec};
use clap::Args;

use crate::config::Config;
use crate::wiring::{Events, RepoArgs, human, open_repository, operator, source_specs};

#[derive(Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// A source from the configuration file.
    #[arg(long, conflicts_with = "pg")]
    pub source: Option<String>,
    /// A backup set from the configuration file (`[[sets]]`): each of its sources, one backup
    /// and one manifest each, grouped by a set id (`restore --set ID`).
    #[arg(long, conflicts_with_all = ["source", "pg", "physical"])]
    pub set: Option<String>,
    /// Back up this database directly (a postgres:// URL); recorded as source `adhoc`
    /// unless --name says otherwise.
    #[arg(long)]
    pub pg: Option<String>,
    #[arg(long, requires = "pg")]
    pub name: Option<String>,
    #[arg(long, default_value = "full")]
    pub kind: BackupKind,
    /// Parallel COPY jobs (overrides the source's setting).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Print the result as JSON (no progress bar).
    #[arg(long)]
    pub json: bool,
    /// A physical base backup (pg_basebackup) for point-in-time recovery, instead of a dump.
    #[arg(long)]
    pub physical: bool,
    /// Tag the backup (repeatable), e.g. `--tag pre-deploy`: retention's keep_tags rules keep
    /// tagged backups for their own period.
    #[arg(long = "tag", value_parser = parse_tag)]
    pub tags: Vec<String>,
    /// A configuration source: back up even when nothing changed since its newest backup
    /// (by default an unchanged configuration takes no backup).
    #[arg(long)]
    pub force: bool,
}

fn parse_tag(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "a tag is 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' and '.', got {s:?}"
        ))
    }
}

/// What `backstop backup` backs up: the source's name and every source spec, with an ad-hoc
/// one (`--pg URL [--name N]`, `adhoc_jobs` COPY jobs) added when asked; checks the name.
pub fn resolve_source(
    config: &Config,
    args: &BackupArgs,
    adhoc_jobs: usize,
) -> anyhow::Result<(String, Vec<SourceSpec>)> {
    let mut sources = source_specs(config);
    let source = match (&args.source, &args.pg) {
        (Some(s), _) => s.clone(),
        (None, Some(url)) => {
            let name = args.name.clone().unwrap_or_else(|| "adhoc".into());
            sources.retain(|s| s.name != name);
            sources.push(SourceSpec::postgres(name.clone(), url.clone(), adhoc_jobs));
            name
        }
        (None, None) => match sources.as_slice() {
            [only] => only.name.clone(),
            _ => bail!(
                "say what to back up: --source NAME (from the configuration file) or --pg postgres://..."
            ),
        },
    };
    if !sources.iter().any(|s| s.name == source) {
        bail!("unknown source `{source}`; configure it under [[sources]] or pass --pg");
    }
    Ok((source, sources))
}

pub async fn run_backup(
    config: &Config,
    data_dir: &Path,
    args: BackupArgs,
) -> anyhow::Result<ExitCode> {
    if let Some(set) = args.set.clone() {
        return crate::set_cmd::backup_set(config, data_dir, &set, &args).await;
    }
    let method = if args.physical {
        BackupMethod::Physical
    } else {
        BackupMethod::Logical
    };
    let (source, sources) = resolve_source(config, &args, 2)?;
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events).await?;
    let dp = DataPath {
        repo,
        appender: events.appender.clone(),
        sources,
    };
    let operator = operator();
    let actor = Actor::operator(&operator);
    // A configuration source is backed up when it changed (R16): compared by keyed hash with
    // its newest backup, before anything is requested.
    if !args.force
        && let Ok(spec) = dp.source(&source)
        && matches!(spec.kind, backstop_ops::SourceKind::Config(_))
    {
        let change = backstop_ops::config_backup::check(&dp, &source, &actor).await;
        if let Ok(backstop_ops::config_backup::Change::Unchanged { since, hash }) = &change {
            drop(dp);
            events.close().await;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "source": source, "unchanged_since": since, "hash": hash })
                );
            } else {
                println!(
                    "configuration of `{source}` unchanged since backup {since} (keyed hash {hash}); no backup taken (--force takes one anyway)"
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        // Changed, or the check failed: the backup runs, and records its own failure if the
        // source cannot be read.
        if let Err(e) = change {
            tracing::warn!(source = %source, error = %e.chain(), "configuration change check failed; backing up");
        }
    }
    let request = BackupRequested {
        backup_id: uuid_v7(),
        source: source.clone(),
        kind: args.kind,
        method,
        // Run here, in the foreground: workers leave it alone.
        trigger: Trigger::Foreground {
            host: backstop_ops::context::hostname(),
        },
        attempt: 1,
    };
    let stream = streams::backup(request.backup_id);
    let requested = NewEvent::new(
        &stream,
        actor.clone(),
        &Event::BackupRequested(request.clone()),
    );
    let requested_at = requested.occurred_at;
    dp.appender
        .append(&stream, ExpectedVersion::NoStream, vec![requested])
        .await?;
    let bar = (!args.json && std::io::stderr().is_terminal()).then(progress_bar);
    let progress: Option<ProgressFn> = bar.clone().map(|bar| {
        let started = std::time::Instant::now();
        let f: ProgressFn = Arc::new(move |p: backstop_repo::Progress| {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let dedup = if p.raw_bytes > 0 {
                100.0 * p.dedup_bytes as f64 / p.raw_bytes as f64
            } else {
                0.0
            };
            bar.set_message(format!(
                "{method}: read {} · stored {} · deduplicated {dedup:.0}% · {}/s",
                human(p.raw_bytes),
                human(p.new_bytes),
                human((p.raw_bytes as f64 / secs) as u64)
            ));
        });
        f
    });
    let mut opts = BackupOptions {
        progress,
        jobs: args.jobs,
        tags: args.tags.clone(),
        ..Default::default()
    };
    config.job_limits().apply(&mut opts);
    let result = run(&dp, &request, requested_at, &actor, None, &opts).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Archived WAL is recorded by `serve` and `wal verify`, not here: reading every segment
    // archived since the last catch-up would make a physical backup wait for it.
    drop(dp);
    events.close().await;
    let done = result?;
    let c = &done.completed;
    if args.json {
        let mut v = serde_json::to_value(c)?;
        if let SourceReport::Physical(r) = &done.report {
            v["physical_report"] = serde_json::to_value(r)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    match &done.report {
        SourceReport::Logical(_) => println!(
            "backup {} of `{}` ({}) complete in {:.1} s: read {}, stored {} in all, {} new ({} of {} chunks new); {} tables, {} rows",
            c.backup_id,
            c.source,
            c.kind,
            c.duration_ms as f64 / 1000.0,
            human(c.raw_bytes),
            human(c.stored_bytes),
            human(c.new_bytes),
            c.new_chunks,
            c.chunks,
            c.tables.len(),
            c.tables.iter().map(|t| t.rows).sum::<u64>()
        ),
        SourceReport::Physical(r) => println!(
            "physical backup {} of `{}` ({}) complete in {:.1} s: read {}, {} new ({} of {} chunks new); PostgreSQL {}, WAL {} .. {} (timeline {}), restorable from {}",
            c.backup_id,
            c.source,
            c.kind,
            c.duration_ms as f64 / 1000.0,
            human(c.raw_bytes),
            human(c.new_bytes),
            c.new_chunks,
            c.chunks,
            r.server_version,
            r.start_lsn,
            r.stop_lsn,
            r.timeline,
            r.finished_at.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        SourceReport::Command(r) => println!(
            "command backup {} of `{}` ({}) complete in {:.1} s: read {} ({}), {} new ({} of {} chunks new); SHA3-256 {}",
            c.backup_id,
            c.source,
            c.kind,
            c.duration_ms as f64 / 1000.0,
            human(c.raw_bytes),
            if r.output == backstop_sources::command::CommandOutput::Directory {
                "a directory, as tar"
            } else {
                "standard output"
            },
            human(c.new_bytes),
            c.new_chunks,
            c.chunks,
            r.sha3
        ),
        SourceReport::Redis(r) => println!(
            "redis backup {} of `{}` ({}) complete in {:.1} s: RDB {}, {} new ({} of {} chunks new); Redis {}, {} keys in {} database(s)",
            c.backup_id,
            c.source,
            c.kind,
            c.duration_ms as f64 / 1000.0,
            human(c.raw_bytes),
            human(c.new_bytes),
            c.new_chunks,
            c.chunks,
            r.redis_version,
            r.keyspace.iter().map(|d| d.keys).sum::<u64>(),
            r.keyspace.len()
        ),
        SourceReport::Git(r) => println!(
            "git backup {} of `{}` complete in {:.1} s: a bundle of {} refs (HEAD {} at {}), {}, {} new ({} of {} chunks new); SHA3-256 {}",
            c.backup_id,
            c.source,
            c.duration_ms as f64 / 1000.0,
            r.refs.len(),
            r.head_ref.as_deref().unwrap_or("-"),
            r.head.as_deref().unwrap_or("-"),
            human(c.raw_bytes),
            human(c.new_bytes),
            c.new_chunks,
            c.chunks,
            r.sha3
        ),
        SourceReport::Config(r) => println!(
            "configuration backup {} of `{}` complete in {:.1} s: {} items, {}, {} new; keyed hash {}",
            c.backup_id,
            c.source,
            c.duration_ms as f64 / 1000.0,
            r.items.len(),
            human(c.raw_bytes),
            human(c.new_bytes),
            r.hash
        ),
        SourceReport::Files(r) => {
            println!(
                "files backup {} of `{}` ({}) complete in {:.1} s: {} files, {} read, {} new ({} of {} chunks new); {} entries in the tree",
                c.backup_id,
                c.source,
                c.kind,
                c.duration_ms as f64 / 1000.0,
                r.files,
                human(c.raw_bytes),
                human(c.new_bytes),
                c.new_chunks,
                c.chunks,
                r.entries.len()
            );
            for p in &r.changed_while_read {
                eprintln!("warning: {p} changed while it was read; stored as read");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}
