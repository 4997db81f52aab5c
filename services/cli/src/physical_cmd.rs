//! Physical backups, WAL archiving and point-in-time restores on the command line:
//! `backup --physical`, `wal-push %p`, `wal-fetch %f %p`, `wal verify`, and
//! `restore --physical [--to-dir DIR --target-... | --list-window]`.
//!
//! `wal-push` and `wal-fetch` run as PostgreSQL's `archive_command` and `restore_command`, as
//! the server's user, with the data directory as their working directory:
//! - They read the configuration file, the master key file and the repository (local: a
//!   directory that user can write; S3: its credentials), so those must be readable by it and
//!   every path in the configuration absolute.
//! - They never open the sled ledger: it belongs to `backstop serve` (or to whichever command an
//!   operator runs), and a `wal-push` holding it even briefly, once per segment, would make
//!   those fail. `wal-push` appends its `wal.archived` events (and key accesses) through NATS
//!   when `[nats] url` is configured; otherwise, or if that fails, the catch-up records them
//!   from the repository later (`backstop serve` every minute, and `wal verify`).
//!   A segment is safe once it is in the repository: archiving never fails for want of a ledger.
//! - `wal-push`'s quick path (a file an earlier call already pushed ahead) opens nothing.
//! - `wal-fetch` exits 0 (restored), 1 (not archived: the end of the archive), or 150 (abort
//!   recovery: a damaged segment, a gap, an unreadable repository), never 1 for a failure, since
//!   PostgreSQL would take it for the end of the archive and finish recovery early. A
//!   configuration that cannot be read is such a failure too (see `main`).

use std::collections::{BTreeSet, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use backstop_events::{Actor, BackupRequested, Event, NewEvent, Trigger, streams, uuid_v7};
use backstop_ledger::{Appender, ExpectedVersion};
use backstop_repo::{KeyAccess, Location, Repository};
use backstop_sources::pg::physical::{
    PhysicalRestoreOptions, RecoveryTarget, RecoveryTimeline, TargetAction, list_window,
};
use backstop_sources::pg::wal::{
    self, FetchOptions, FetchOutcome, Lsn, PushOptions, WalProblemKind, WalVerifyOptions,
    WalVerifyReport,
};
use backstop_workers::backup::{DataPath, ProgressFn};
use backstop_workers::physical::{
    self, PhysicalBackupOptions, RepoWalStore, WAL_PREFIX, parse_wal_object_key,
};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use clap::{Args, Subcommand};
use tokio::sync::mpsc::unbounded_channel;

use crate::config::Config;
use crate::repo_cmd::{
    self, BackupArgs, Events, RepoArgs, RestoreArgs, human, open_repository, operator,
};

/// How long `wal-push` and `wal-fetch` give NATS to take their events before leaving them to
/// the catch-up.
const EVENT_BUDGET: Duration = Duration::from_secs(5);

/// The source name when none is given and none (or several) are configured.
const ADHOC: &str = "adhoc";

#[derive(Args)]
pub struct WalPushArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The source this cluster is (default: the only source in the configuration file, or
    /// `adhoc` when there is none).
    #[arg(long)]
    pub source: Option<String>,
    /// Files pushed at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Other ready files pushed ahead per call, at most.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// PostgreSQL's %p: the file to archive, relative to the data directory.
    pub path: PathBuf,
}

#[derive(Args)]
pub struct WalFetchArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The source whose archive to read (as for wal-push).
    #[arg(long)]
    pub source: Option<String>,
    /// Segments fetched per round trip, the requested one included (1: no prefetch).
    #[arg(long, default_value_t = 8)]
    pub prefetch: usize,
    /// Fetches at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// PostgreSQL's %f: the file wanted.
    pub name: String,
    /// PostgreSQL's %p: where to put it.
    pub dest: PathBuf,
}

#[derive(Subcommand)]
pub enum WalCommand {
    /// Check the WAL archive: continuity per timeline from the oldest base backup to now, and
    /// every file's checksum. Exits non-zero on a gap or a damaged file, naming them.
    Verify(WalVerifyArgs),
}

#[derive(Args)]
pub struct WalVerifyArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The source whose archive to check (default: the only one).
    #[arg(long)]
    pub source: Option<String>,
    /// Check presence only; do not read the files.
    #[arg(long)]
    pub presence_only: bool,
    #[arg(long)]
    pub json: bool,
}

/// The physical restore's flags (flattened into `backstop restore`).
#[derive(Args, Clone, Default)]
pub struct PitrArgs {
    /// Physical restore: the data directory to lay out (new or empty).
    #[arg(long, requires = "physical")]
    pub to_dir: Option<PathBuf>,
    /// Recover to this moment: RFC 3339 or `YYYY-MM-DD HH:MM:SS[.ffffff][+HH]`; without an
    /// offset, UTC.
    #[arg(long, requires = "physical")]
    pub target_time: Option<String>,
    /// Recover to this WAL position (e.g. 0/5A000028).
    #[arg(long, requires = "physical")]
    pub target_lsn: Option<String>,
    /// Recover to this transaction id.
    #[arg(long, requires = "physical")]
    pub target_xid: Option<u64>,
    /// Recover to this restore point (`SELECT pg_create_restore_point('NAME')`).
    #[arg(long, requires = "physical")]
    pub target_name: Option<String>,
    /// Stop as soon as the base backup is consistent.
    #[arg(long, requires = "physical")]
    pub target_immediate: bool,
    /// Timeline to follow: latest (default), current (the base backup's), or a number.
    #[arg(long, requires = "physical")]
    pub target_timeline: Option<String>,
    /// What PostgreSQL does at the target: promote (default), pause or shutdown.
    #[arg(long, requires = "physical")]
    pub target_action: Option<String>,
    /// Stop just before the target instead of just after it.
    #[arg(long, requires = "physical")]
    pub target_exclusive: bool,
    /// Print the earliest and latest moments that can be restored to, and exit.
    #[arg(long, requires = "physical")]
    pub list_window: bool,
    /// The restore_command to write (default: this binary's `wal-fetch` with this
    /// configuration, repository and key file, which PostgreSQL's user must be able to read).
    #[arg(long, requires = "physical")]
    pub restore_command: Option<String>,
    /// When run as root: give the directory to this user (default postgres).
    #[arg(long, requires = "physical")]
    pub owner: Option<String>,
    /// Keep the backup's archive settings (default: archive_mode = off in the copy).
    #[arg(long, requires = "physical")]
    pub keep_archiving: bool,
    /// Print the result as JSON.
    #[arg(long, requires = "physical")]
    pub json: bool,
}

// ---------------------------------------------------------------------------------------------
// Sources

/// The source named on the command line, else the only configured one, else `adhoc` (what
/// `backup --pg` records without --name) when none is configured.
fn configured_source(config: &Config, explicit: Option<&str>) -> anyhow::Result<String> {
    if let Some(s) = explicit {
        return Ok(s.to_string());
    }
    match config.sources.as_slice() {
        [] => Ok(ADHOC.into()),
        [only] => Ok(only.name.clone()),
        many => bail!(
            "say which source: --source NAME (configured: {})",
            many.iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// As [`configured_source`], but when nothing is configured, the only source with physical
/// backups or WAL in the repository.
async fn source_in_repo(
    config: &Config,
    explicit: Option<&str>,
    repo: &Repository,
) -> anyhow::Result<String> {
    if explicit.is_some() || !config.sources.is_empty() {
        return configured_source(config, explicit);
    }
    let mut found: BTreeSet<String> = physical::physical_backups(repo, None)
        .await?
        .into_iter()
        .map(|b| b.manifest.source)
        .collect();
    for o in repo.backend().list(WAL_PREFIX).await? {
        if let Some((s, _)) = parse_wal_object_key(&o.key) {
            found.insert(s);
        }
    }
    match found.len() {
        0 => bail!(
            "the repository holds no physical backup and no WAL yet: take one with `backstop backup --physical`"
        ),
        1 => Ok(found.into_iter().next().unwrap_or_default()),
        _ => bail!(
            "say which source: --source NAME (the repository has physical backups or WAL of {})",
            found.into_iter().collect::<Vec<_>>().join(", ")
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// backup --physical

pub async fn run_physical_backup(
    config: &Config,
    data_dir: &Path,
    args: BackupArgs,
) -> anyhow::Result<ExitCode> {
    let (source, sources) = repo_cmd::resolve_source(config, &args, 1)?;
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events).await?;
    let dp = DataPath {
        repo: repo.clone(),
        appender: events.appender.clone(),
        sources,
    };
    let operator = operator();
    let actor = Actor::operator(&operator);
    let request = BackupRequested {
        backup_id: uuid_v7(),
        source: source.clone(),
        kind: args.kind,
        physical: true,
        // Run here, in the foreground: workers leave it alone.
        trigger: Trigger::Foreground {
            host: backstop_workers::backup::hostname(),
        },
        attempt: 1,
    };
    let stream = streams::backup(request.backup_id);
    let requested = NewEvent::new(
        &stream,
        actor.clone(),
        &Event::BackupRequested(request.clone()),
    );
    dp.appender
        .append(&stream, ExpectedVersion::NoStream, vec![requested])
        .await?;
    let bar = (!args.json && std::io::stderr().is_terminal()).then(spinner);
    let progress: Option<ProgressFn> = bar.clone().map(|bar| {
        let started = std::time::Instant::now();
        let f: ProgressFn = Arc::new(move |p: backstop_repo::Progress| {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            bar.set_message(format!(
                "base backup: read {} · stored {} new · {}/s",
                human(p.raw_bytes),
                human(p.new_bytes),
                human((p.raw_bytes as f64 / secs) as u64)
            ));
        });
        f
    });
    let opts = PhysicalBackupOptions {
        progress,
        ..Default::default()
    };
    let result = physical::run_physical_backup(&dp, &request, &actor, None, opts).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Archived WAL is recorded by `serve` and `wal verify`, not here: reading every segment
    // archived since the last catch-up would make the backup wait for it.
    drop(dp);
    drop(repo);
    events.close().await;
    let done = result?;
    if args.json {
        let mut v = serde_json::to_value(&done.completed)?;
        v["physical_report"] = serde_json::to_value(&done.report)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let c = &done.completed;
        let r = &done.report;
        println!(
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
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn spinner() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Records `wal.archived` for archived files the ledger lacks (logged, never fatal).
async fn catch_up(repo: &Repository, events: &Events) {
    let actor = Actor::worker("wal-catch-up");
    let repo = repo.with_access(actor.to_string(), "recording archived WAL files");
    let result = match &events.ledger {
        Some(ledger) => physical::catch_up_with_ledger(&repo, ledger, &actor).await,
        None => {
            physical::record_archived_wal(
                &repo,
                events.appender.as_ref(),
                &mut HashSet::new(),
                &actor,
            )
            .await
        }
    };
    match result {
        Ok(r) if r.recorded > 0 => {
            tracing::info!(recorded = r.recorded, "recorded archived WAL files")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "could not record archived WAL files; a later catch-up will")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// wal-push / wal-fetch

/// An appender through NATS when one is configured and answers quickly; `None` otherwise.
async fn remote_appender(config: &Config) -> Option<Arc<dyn Appender>> {
    let url = config.nats.url.as_deref()?;
    let connect = async_nats::ConnectOptions::new()
        .name("backstop-wal")
        .connection_timeout(Duration::from_secs(2))
        .connect(url);
    match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Ok(client)) => Some(Arc::new(backstop_ledger::remote::RemoteLedger::new(client))),
        Ok(Err(e)) => {
            tracing::warn!(%url, error = %e, "NATS unreachable; events left to the catch-up");
            None
        }
        Err(_) => {
            tracing::warn!(%url, "NATS did not answer; events left to the catch-up");
            None
        }
    }
}

/// Opens the repository for `wal-push` / `wal-fetch`: key accesses go to `appender` when there
/// is one (recorded in the background; see [`finish_key_accesses`]), else to the log.
async fn open_for_wal(
    config: &Config,
    data_dir: &Path,
    args: &RepoArgs,
    appender: Option<Arc<dyn Appender>>,
) -> anyhow::Result<(Repository, tokio::task::JoinHandle<()>)> {
    let master = repo_cmd::master_key(config, args)?;
    let loc = repo_cmd::location(config, data_dir, args)?;
    let backend = loc.open(Some(repo_cmd::s3_settings(config))).await?;
    let (tx, mut rx) = unbounded_channel::<KeyAccess>();
    let repo = Repository::open(backend, &master, Arc::new(tx)).await?;
    let recorder = match appender {
        Some(a) => tokio::spawn(backstop_workers::keys::record_key_accesses(rx, a)),
        None => tokio::spawn(async move {
            while let Some(access) = rx.recv().await {
                tracing::debug!(
                    actor = %access.actor, key = %access.key_id, reason = %access.reason,
                    "key access (no ledger reachable from here: not recorded)"
                );
            }
        }),
    };
    Ok((repo, recorder))
}

/// Waits (within the budget) for the key accesses to be recorded.
async fn finish_key_accesses(repo: Repository, recorder: tokio::task::JoinHandle<()>) {
    // The channel closes when the last handle on the repository is gone.
    drop(repo);
    if tokio::time::timeout(EVENT_BUDGET, recorder).await.is_err() {
        tracing::warn!("key accesses not recorded in time; giving up on them");
    }
}

fn push_scope(loc: &Location, source: &str) -> String {
    format!("{loc}#{source}")
}

pub async fn wal_push(
    config: &Config,
    data_dir: &Path,
    args: WalPushArgs,
) -> anyhow::Result<ExitCode> {
    match push_inner(config, data_dir, &args).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            // PostgreSQL keeps the file and retries; its log shows this line.
            eprintln!("backstop wal-push {}: {e:#}", args.path.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn push_inner(config: &Config, data_dir: &Path, args: &WalPushArgs) -> anyhow::Result<()> {
    let source = configured_source(config, args.source.as_deref())?;
    let loc = repo_cmd::location(config, data_dir, &args.repo)?;
    let opts = PushOptions {
        parallel: args.parallel.max(1),
        batch: args.batch,
        marker_scope: push_scope(&loc, &source),
        ..PushOptions::default()
    };
    // Pushed ahead by an earlier call: nothing to open, nothing to announce.
    if wal::already_pushed(&args.path, &opts).await?.is_some() {
        return Ok(());
    }
    let appender = remote_appender(config).await;
    let actor = Actor::worker("wal-push");
    let (repo, recorder) = open_for_wal(config, data_dir, &args.repo, appender.clone()).await?;
    let store = RepoWalStore::new(
        repo.with_access(actor.to_string(), format!("archiving WAL of {source}")),
        source.clone(),
    );
    let report = wal::push(&args.path, &opts, &store).await?;
    // Files that could not be pushed ahead were logged by the push; PostgreSQL asks again.
    drop(store);
    if let Some(a) = &appender {
        match tokio::time::timeout(
            EVENT_BUDGET,
            physical::announce_push(a.as_ref(), &report, &actor),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "wal.archived not recorded now; the catch-up will")
            }
            Err(_) => tracing::warn!("wal.archived not recorded in time; the catch-up will"),
        }
    }
    finish_key_accesses(repo, recorder).await;
    Ok(())
}

pub async fn wal_fetch(
    config: &Config,
    data_dir: &Path,
    args: WalFetchArgs,
) -> anyhow::Result<ExitCode> {
    let opts = FetchOptions {
        prefetch: args.prefetch.max(1),
        parallel: args.parallel.max(1),
        ..FetchOptions::default()
    };
    let code = fetch_inner(config, data_dir, &args, &opts).await;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

async fn fetch_inner(
    config: &Config,
    data_dir: &Path,
    args: &WalFetchArgs,
    opts: &FetchOptions,
) -> i32 {
    let source = match configured_source(config, args.source.as_deref()) {
        Ok(s) => s,
        Err(e) => return fatal_fetch(opts, &format!("{e:#}"), false),
    };
    let appender = remote_appender(config).await;
    let (repo, recorder) = match open_for_wal(config, data_dir, &args.repo, appender).await {
        Ok(r) => r,
        // A standby retries an unreachable repository; recovery otherwise aborts.
        Err(e) => {
            return fatal_fetch(opts, &format!("cannot open the repository: {e:#}"), true);
        }
    };
    let store = RepoWalStore::new(
        repo.with_access(
            Actor::worker("wal-fetch").to_string(),
            format!("recovery from the WAL of {source}"),
        ),
        source,
    );
    let code = match wal::fetch(&args.name, &args.dest, opts, &store).await {
        Ok(FetchOutcome::Unusable { reason, .. }) => {
            eprintln!("backstop wal-fetch {}: {reason}", args.name);
            1
        }
        Ok(o) => o.exit_code(),
        Err(e) => {
            eprintln!("backstop wal-fetch {}: {e}", args.name);
            e.exit_code
        }
    };
    drop(store);
    finish_key_accesses(repo, recorder).await;
    code
}

fn fatal_fetch(opts: &FetchOptions, message: &str, retryable: bool) -> i32 {
    eprintln!("backstop wal-fetch: {message}");
    wal::fetch_failure(opts, message, retryable)
}

/// For `main`: `wal-fetch` could not even read its configuration. Exiting 1 would tell
/// PostgreSQL the archive ends here; abort recovery instead.
pub fn wal_fetch_unconfigured(error: &anyhow::Error) -> ExitCode {
    let code = fatal_fetch(
        &FetchOptions::default(),
        &format!("cannot read the configuration: {error:#}"),
        false,
    );
    ExitCode::from(code.clamp(0, 255) as u8)
}

// ---------------------------------------------------------------------------------------------
// wal verify

pub async fn wal(config: &Config, data_dir: &Path, cmd: WalCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WalCommand::Verify(args) => wal_verify(config, data_dir, args).await,
    }
}

async fn wal_verify(
    config: &Config,
    data_dir: &Path,
    args: WalVerifyArgs,
) -> anyhow::Result<ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events)
        .await?
        .with_access(
            Actor::operator(operator()).to_string(),
            "checking the WAL archive",
        );
    let result = async {
        let source = source_in_repo(config, args.source.as_deref(), &repo).await?;
        catch_up(&repo, &events).await;
        let backups = physical::physical_backups(&repo, Some(&source)).await?;
        let store = RepoWalStore::new(
            repo.with_access(
                Actor::operator(operator()).to_string(),
                format!("checking the WAL archive of {source}"),
            ),
            source.clone(),
        );
        let report = wal::wal_verify(
            &store,
            &WalVerifyOptions {
                backups: backups.iter().map(|b| b.report.wal_range()).collect(),
                read_data: !args.presence_only,
                ..WalVerifyOptions::default()
            },
        )
        .await?;
        anyhow::Ok((source, backups.len(), report))
    }
    .await;
    drop(repo);
    events.close().await;
    let (source, backups, report) = result?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["source"] = source.clone().into();
        v["ok"] = report.is_ok().into();
        v["missing_segments"] = serde_json::to_value(report.missing_segments())?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_wal_report(&source, backups, &report, !args.presence_only);
    }
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_wal_report(source: &str, backups: usize, r: &WalVerifyReport, read: bool) {
    println!(
        "WAL archive of `{source}`: {} files, {} read and checked ({}); {backups} base backups; segment size {}",
        r.files,
        r.files_checked,
        human(r.bytes_checked),
        human(r.segment_size)
    );
    for t in &r.timelines {
        let parent = t
            .parent
            .map(|p| format!(", branched from timeline {p}"))
            .unwrap_or_default();
        println!(
            "  timeline {}{parent}: {} segments, {} .. {}; required {} .. {}; {}",
            t.timeline,
            t.segments,
            t.first.as_deref().unwrap_or("-"),
            t.last.as_deref().unwrap_or("-"),
            t.required_from.as_deref().unwrap_or("-"),
            t.required_to.as_deref().unwrap_or("-"),
            if t.gaps.is_empty() {
                "continuous".to_string()
            } else {
                format!("{} gaps", t.gaps.len())
            }
        );
    }
    for p in &r.problems {
        let kind = match p.kind {
            WalProblemKind::Missing => "MISSING",
            WalProblemKind::Damaged => "DAMAGED",
            WalProblemKind::HistoryMissing => "HISTORY MISSING",
            WalProblemKind::Unreadable => "UNREADABLE",
        };
        println!("{kind} {}: {}", p.name, p.detail);
    }
    if r.is_ok() && read {
        println!("WAL archive intact: no gap, every checksum matches");
    } else if r.is_ok() {
        println!("WAL archive continuous: no gap (checksums not read: --presence-only)");
    } else {
        eprintln!(
            "WAL archive has {} problems: restores cannot pass them. Take a new base backup now (restores then start after them) and restore to moments before them.",
            r.problems.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// verify --restore of a physical backup

/// What a test restore of a physical backup found, in the shape `backstop verify` records:
/// `(objects, bytes, restore_ms, bytes per second)` or the reason it failed.
pub type PhysicalVerdict = Result<(u64, u64, Option<u64>, Option<f64>), String>;

/// `backstop verify ID --restore` for a physical backup: restores it into a temporary directory
/// (recovery target immediate), starts a private server on it, waits for consistency, runs
/// `pg_amcheck`, counts rows, and removes everything (see
/// [`backstop_workers::physical::verify_physical`]). WAL comes through this binary's
/// `wal-fetch`, as PostgreSQL's user when run as root.
pub async fn verify_restore(
    config: &Config,
    data_dir: &Path,
    args: &RepoArgs,
    repo: &Repository,
    manifest: &backstop_repo::Manifest,
) -> Option<PhysicalVerdict> {
    let report = physical::physical_report(manifest)?;
    let backup = physical::PhysicalBackup {
        manifest: manifest.clone(),
        report,
    };
    let command = match self_invocation(config, data_dir, args, &manifest.source, "wal-fetch") {
        Ok(c) => c,
        Err(e) => return Some(Err(format!("{e:#}"))),
    };
    let opts = physical::VerifyPhysicalOptions::new(command);
    Some(
        match physical::verify_physical(repo, &backup, &opts).await {
            Ok(v) => {
                let secs = (v.restore.duration_ms + v.verify.recovery_ms) as f64 / 1000.0;
                println!(
                    "test restore of physical backup {}: {} files laid out, consistent after {:.1} s of recovery (timeline {}, LSN {}); pg_amcheck: {}; {} rows in {} databases",
                    manifest.backup_id,
                    v.restore.files,
                    v.verify.recovery_ms as f64 / 1000.0,
                    v.verify.timeline,
                    v.verify.end_lsn,
                    match v.verify.amcheck_ok {
                        Some(true) => "no corruption",
                        _ => "not run",
                    },
                    v.verify.total_rows,
                    v.verify.databases.len()
                );
                for d in &v.verify.databases {
                    for t in &d.tables {
                        println!("  {}.{:<40} {:>12} rows", d.database, t.table, t.rows);
                    }
                }
                Ok((
                    v.restore.files,
                    v.restore.bytes,
                    Some(v.restore.duration_ms + v.verify.recovery_ms),
                    Some(v.restore.bytes as f64 / secs.max(0.001)),
                ))
            }
            Err(e) => Err(e.to_string()),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// restore --physical

/// `backstop restore --physical ...`.
pub async fn restore(
    config: &Config,
    data_dir: &Path,
    args: RestoreArgs,
) -> anyhow::Result<ExitCode> {
    let p = &args.pitr;
    if p.list_window {
        return print_window(config, data_dir, &args).await;
    }
    let dir = p
        .to_dir
        .clone()
        .context("say where to lay out the data directory: --to-dir DIR (new or empty)")?;
    if args.to.is_some() || !args.tables.is_empty() || args.create_db || args.dry_run {
        bail!(
            "--to, --tables, --create-db and --dry-run are for logical restores; a physical restore lays out a whole cluster in --to-dir"
        );
    }
    let dir =
        std::path::absolute(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let target = recovery_target(p)?;
    let which = args.backup.clone().unwrap_or_else(|| "latest".into());

    let mut events = Events::open(config, data_dir).await?;
    let operator = operator();
    // Chained, so that no other handle on the repository outlives `drop(repo)` below: the key
    // access recorder (and so `events.close()`) waits until every handle is gone.
    let repo = open_repository(config, data_dir, &args.repo, &mut events)
        .await?
        .with_access(
            Actor::operator(&operator).to_string(),
            format!("physical restore into {}", dir.display()),
        );
    let result = async {
        let source = if which == "latest" {
            Some(source_in_repo(config, args.source.as_deref(), &repo).await?)
        } else {
            args.source.clone()
        };
        let backup =
            physical::select_base_backup(&repo, &which, source.as_deref(), &target).await?;
        let source = backup.manifest.source.clone();
        let restore_command = match &p.restore_command {
            Some(c) => c.clone(),
            None => self_invocation(config, data_dir, &args.repo, &source, "wal-fetch")?,
        };
        let mut opts = PhysicalRestoreOptions::new(restore_command);
        opts.target = target.clone();
        opts.inclusive = !p.target_exclusive;
        opts.action = target_action(p.target_action.as_deref())?;
        opts.timeline = target_timeline(p.target_timeline.as_deref())?;
        opts.keep_archiving = p.keep_archiving;
        opts.owner = Some(p.owner.clone().unwrap_or_else(|| "postgres".into()));
        let report = physical::run_physical_restore(
            &repo,
            events.appender.as_ref(),
            &backup,
            &dir,
            &opts,
            &operator,
        )
        .await?;
        anyhow::Ok((backup, report, opts))
    }
    .await;
    drop(repo);
    events.close().await;
    let (backup, report, opts) = result?;
    if p.json {
        let v = serde_json::json!({
            "backup_id": backup.manifest.backup_id,
            "source": backup.manifest.source,
            "base_backup": backup.report,
            "restore": report,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "restored base backup {} of `{}` (consistent at LSN {}, {}) into {}: {} files, {} in {:.1} s{}",
            backup.manifest.backup_id,
            backup.manifest.source,
            backup.report.stop_lsn,
            backup.report.finished_at.format("%Y-%m-%d %H:%M:%S UTC"),
            dir.display(),
            report.files,
            human(report.bytes),
            report.duration_ms as f64 / 1000.0,
            if report.manifest_verified {
                "; every file matches the backup's manifest"
            } else {
                ""
            }
        );
        let action = match opts.action {
            TargetAction::Promote => "promotes to a new timeline",
            TargetAction::Pause => "pauses (SELECT pg_wal_replay_resume() to promote)",
            TargetAction::Shutdown => "shuts down",
        };
        match opts.target {
            RecoveryTarget::Latest => println!("recovery target: {}", opts.target),
            _ => println!(
                "recovery target: {}; PostgreSQL {action} there",
                opts.target
            ),
        }
        println!(
            "next: start PostgreSQL on it (as its owner), e.g. `pg_ctl -D {} -l {}/recovery.log start`; it replays the archived WAL to the target{}",
            dir.display(),
            dir.display(),
            match opts.target {
                RecoveryTarget::Latest => " (the latest archived point) and promotes",
                _ => " and stops there",
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn print_window(
    config: &Config,
    data_dir: &Path,
    args: &RestoreArgs,
) -> anyhow::Result<ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events)
        .await?
        .with_access(
            Actor::operator(operator()).to_string(),
            "computing the restorable window",
        );
    let result = async {
        let source = source_in_repo(config, args.source.as_deref(), &repo).await?;
        let backups = physical::physical_backups(&repo, Some(&source)).await?;
        let reports: Vec<_> = backups.iter().map(|b| b.report.clone()).collect();
        let store = RepoWalStore::new(
            repo.with_access(
                Actor::operator(operator()).to_string(),
                format!("computing the restorable window of {source}"),
            ),
            source.clone(),
        );
        let window = list_window(&reports, &store, None).await?;
        anyhow::Ok((source, backups, window))
    }
    .await;
    drop(repo);
    events.close().await;
    let (source, backups, window) = result?;
    if args.pitr.json {
        let mut v = serde_json::to_value(&window)?;
        v["source"] = source.into();
        v["base_backups"] = backups.len().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let when = |t: Option<DateTime<Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string())
            .unwrap_or_else(|| "time unknown".into())
    };
    println!(
        "restorable window of `{source}` ({} base backups):",
        backups.len()
    );
    match &window.earliest {
        Some(e) => println!(
            "  earliest  {}  (LSN {}, timeline {}: the end of the oldest base backup)",
            when(e.time),
            e.lsn,
            e.timeline
        ),
        None => println!("  earliest  none: no physical backup yet"),
    }
    match &window.latest {
        Some(l) => println!(
            "  latest    {}  (LSN {}, timeline {}: the last commit archived, in {})",
            when(l.time),
            l.lsn,
            l.timeline,
            window.last_segment.as_deref().unwrap_or("-")
        ),
        None => println!("  latest    none: no WAL archived yet"),
    }
    if window.earliest.is_none() || window.latest.is_none() {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn recovery_target(p: &PitrArgs) -> anyhow::Result<RecoveryTarget> {
    let mut targets = Vec::new();
    if let Some(t) = &p.target_time {
        targets.push(RecoveryTarget::Time(parse_time(t)?));
    }
    if let Some(l) = &p.target_lsn {
        targets.push(RecoveryTarget::Lsn(
            l.parse::<Lsn>().map_err(anyhow::Error::msg)?,
        ));
    }
    if let Some(x) = p.target_xid {
        targets.push(RecoveryTarget::Xid(x));
    }
    if let Some(n) = &p.target_name {
        targets.push(RecoveryTarget::Name(n.clone()));
    }
    if p.target_immediate {
        targets.push(RecoveryTarget::Immediate);
    }
    match targets.len() {
        0 => Ok(RecoveryTarget::Latest),
        1 => Ok(targets.remove(0)),
        _ => bail!(
            "give one recovery target: --target-time, --target-lsn, --target-xid, --target-name or --target-immediate (none: the latest archived point)"
        ),
    }
}

/// RFC 3339, or PostgreSQL's `YYYY-MM-DD HH:MM:SS[.f][+HH[:MM]]`; no offset means UTC.
pub fn parse_time(s: &str) -> anyhow::Result<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    // `2026-03-02T14:29:59` and `2026-03-02 14:29:59` alike.
    let t = match s.get(10..11) {
        Some("T") => format!("{} {}", &s[..10], &s[11..]),
        _ => s.to_string(),
    };
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f %#z"] {
        if let Ok(t) = DateTime::parse_from_str(&t, fmt) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    let naive = t.strip_suffix(" UTC").unwrap_or(&t).trim_end_matches('Z');
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M"] {
        if let Ok(n) = NaiveDateTime::parse_from_str(naive, fmt) {
            return Ok(Utc.from_utc_datetime(&n));
        }
    }
    bail!(
        "{s:?} is not a time: write it as 2026-03-02T14:29:59Z or '2026-03-02 14:29:59+00' (no offset: UTC)"
    )
}

fn target_action(s: Option<&str>) -> anyhow::Result<TargetAction> {
    Ok(match s.unwrap_or("promote") {
        "promote" => TargetAction::Promote,
        "pause" => TargetAction::Pause,
        "shutdown" => TargetAction::Shutdown,
        other => bail!("--target-action {other:?}: expected promote, pause or shutdown"),
    })
}

fn target_timeline(s: Option<&str>) -> anyhow::Result<RecoveryTimeline> {
    Ok(match s.unwrap_or("latest") {
        "latest" => RecoveryTimeline::Latest,
        "current" => RecoveryTimeline::Current,
        n => RecoveryTimeline::Id(n.parse().map_err(|_| {
            anyhow::anyhow!(
                "--target-timeline {n:?}: expected latest, current or a timeline number"
            )
        })?),
    })
}

/// The configuration file this process was started with (absolute), if any: `--config`/`-c`,
/// `BACKSTOP_CONFIG`, else `./backstop.toml` when present (as `Config::load` does).
fn config_path() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    let mut found = None;
    while let Some(a) = args.next() {
        let s = a.to_string_lossy();
        if s == "--config" || s == "-c" {
            found = args.next().map(PathBuf::from);
        } else if let Some(v) = s.strip_prefix("--config=") {
            found = Some(PathBuf::from(v));
        } else if s == "--" {
            break;
        }
    }
    let path = found
        .or_else(|| std::env::var_os("BACKSTOP_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let p = PathBuf::from("backstop.toml");
            p.is_file().then_some(p)
        })?;
    std::path::absolute(path).ok()
}

/// Single-quotes a word for `sh` when it needs it.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@%+,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// This binary as PostgreSQL should run it (`wal-fetch %f %p` or `wal-push %p`): absolute
/// paths to the binary, the configuration file, the repository and the key file, so it works
/// from the data directory and as another user.
pub fn self_invocation(
    config: &Config,
    data_dir: &Path,
    repo: &RepoArgs,
    source: &str,
    sub: &str,
) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find this binary's path")?;
    let mut words = vec![sh_quote(&exe.display().to_string())];
    if let Some(c) = config_path() {
        words.push("--config".into());
        words.push(sh_quote(&c.display().to_string()));
    }
    words.push(sub.into());
    words.push("--source".into());
    words.push(sh_quote(source));
    let loc = match repo_cmd::location(config, data_dir, repo)? {
        Location::Local(p) => Location::Local(std::path::absolute(&p).unwrap_or(p)),
        other => other,
    };
    words.push("--repo".into());
    words.push(sh_quote(&loc.to_string()));
    match repo
        .master_key_file
        .clone()
        .or_else(|| config.repository.master_key_file.clone())
    {
        Some(k) => {
            words.push("--master-key-file".into());
            words.push(sh_quote(
                &std::path::absolute(&k).unwrap_or(k).display().to_string(),
            ));
        }
        None => eprintln!(
            "warning: the master key comes from the environment here; PostgreSQL's {sub} will need BACKSTOP_MASTER_KEY in its own environment (or pass --restore-command)"
        ),
    }
    words.push(if sub == "wal-fetch" { "%f %p" } else { "%p" }.into());
    Ok(words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        let want = Utc.with_ymd_and_hms(2026, 3, 2, 14, 29, 59).unwrap();
        for s in [
            "2026-03-02T14:29:59Z",
            "2026-03-02T14:29:59+00:00",
            "2026-03-02 14:29:59+00",
            "2026-03-02 16:29:59+02",
            "2026-03-02 14:29:59",
            "2026-03-02 14:29:59 UTC",
        ] {
            assert_eq!(parse_time(s).unwrap(), want, "{s}");
        }
        assert_eq!(
            parse_time("2026-03-02 14:29:59.250+00").unwrap(),
            want + chrono::Duration::milliseconds(250)
        );
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn words_are_quoted_for_sh() {
        assert_eq!(sh_quote("/usr/bin/backstop"), "/usr/bin/backstop");
        assert_eq!(sh_quote("/a b/it's"), "'/a b/it'\\''s'");
        assert_eq!(sh_quote("s3://bucket/prefix"), "s3://bucket/prefix");
    }

    #[test]
    fn targets_are_exclusive() {
        let mut p = PitrArgs {
            target_time: Some("2026-03-02 14:29:59".into()),
            ..Default::default()
        };
        assert!(matches!(recovery_target(&p), Ok(RecoveryTarget::Time(_))));
        p.target_lsn = Some("0/3000028".into());
        assert!(recovery_target(&p).is_err());
        assert!(matches!(
            recovery_target(&PitrArgs::default()),
            Ok(RecoveryTarget::Latest)
        ));
    }
}
