//! `backstop restore`: a logical backup into a database, or (`--physical`) a base backup into a
//! data directory that PostgreSQL recovers to a point in time with `wal-fetch`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use backstop_events::{Actor, BackupMethod, RecoveryScope};
use backstop_ops::DataPath;
use backstop_ops::catalog::{self, Selector};
use backstop_ops::restore::{self, Recovery};
use backstop_ops::wal::RepoWalStore;
use backstop_sources::pg::physical::{
    PhysicalRestoreOptions, RecoveryTarget, RecoveryTimeline, TargetAction, list_window,
};
use backstop_sources::pg::wal::Lsn;
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use clap::Args;

use crate::config::Config;
use crate::wiring::{
    Events, RepoArgs, human, open_repository, operator, self_invocation, source_in_repo,
    verified_backups,
};

/// The physical restore's flags (flattened into `backstop restore`).
#[derive(Args, Clone, Default)]
pub struct PitrArgs {
    /// Physical restore: the data directory to lay out (new or empty). Files backups: the
    /// directory the tree is written under (`DIR/srv/app/...`; nothing existing is overwritten).
    #[arg(long)]
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

#[derive(Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// A backup id, or `latest`.
    pub backup: Option<String>,
    /// Target database (postgres:// URL).
    #[arg(long)]
    pub to: Option<String>,
    /// Restore only these tables (comma-separated, schema.table or table).
    #[arg(long, value_delimiter = ',')]
    pub tables: Vec<String>,
    /// Create the target database if it does not exist.
    #[arg(long)]
    pub create_db: bool,
    /// Say what would be restored and check that every object is present; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With `latest`: the newest backup of this source.
    #[arg(long)]
    pub source: Option<String>,
    /// With `latest`: the newest backup even if it has not passed verification (default: the
    /// newest one that passed).
    #[arg(long)]
    pub allow_unverified: bool,
    /// Parallel jobs.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Physical restore: a data directory that recovers to a point in time (see --to-dir).
    #[arg(long)]
    pub physical: bool,
    /// Command and Redis backups: write the raw stream to this file (a Redis `dump.rdb` for a
    /// stopped server; a command's output, or its directory as tar) instead of restoring.
    #[arg(long, conflicts_with_all = ["physical", "tables", "create_db"])]
    pub out: Option<PathBuf>,
    /// Command backups: run this restore command instead of the one recorded in the backup.
    #[arg(long, conflicts_with_all = ["physical", "out"])]
    pub restore_with: Option<String>,
    /// Files backups: restore only these paths (as stored: `srv/app/models`; comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["physical", "tables", "out"])]
    pub paths: Vec<String>,
    #[command(flatten)]
    pub pitr: PitrArgs,
    /// Read from this replica ([[repository.replicas]] name) instead of the primary. Without
    /// it, a replica serves the restore only when the primary is unreachable.
    #[arg(long)]
    pub from: Option<String>,
    /// Restore a backup set: its id, `latest`, or a set's name (its newest set), instead of
    /// one backup; components in order (configuration, databases, Redis, files, the rest).
    #[arg(long, conflicts_with_all = ["backup", "physical", "out", "paths", "tables", "to"])]
    pub set: Option<String>,
    /// With --set: only these components, by source name or role (configuration, database,
    /// redis, files, other), comma-separated.
    #[arg(long, value_delimiter = ',', requires = "set")]
    pub only: Vec<String>,
    /// With --set: where a component goes, SOURCE=TARGET (repeatable), over [sets.restore].
    #[arg(long = "target", requires = "set")]
    pub targets: Vec<String>,
    /// With --set latest or a set's name: the newest set carrying this tag (e.g. pre-deploy).
    #[arg(long, requires = "set")]
    pub tag: Option<String>,
}

pub async fn restore(
    config: &Config,
    data_dir: &Path,
    args: RestoreArgs,
) -> anyhow::Result<std::process::ExitCode> {
    if args.set.is_some() {
        return crate::set_cmd::restore_set(config, data_dir, &args).await;
    }
    if args.physical {
        return restore_physical(config, data_dir, args).await;
    }
    let which = args
        .backup
        .clone()
        .context("say which backup to restore: an id or `latest`")?;
    let mut events = Events::open(config, data_dir).await?;
    let (repo, _served_by) = crate::replica_cmd::open_for_restore(
        config,
        data_dir,
        &args.repo,
        &mut events,
        args.from.as_deref(),
    )
    .await?;
    let verified = match (which.as_str(), args.allow_unverified) {
        ("latest", false) => Some(verified_backups(&events, data_dir).await?),
        _ => None,
    };
    // `latest` of a configured source that is not PostgreSQL means that source's method.
    let method = match config
        .sources
        .iter()
        .find(|s| Some(s.name.as_str()) == args.source.as_deref())
        .map(|s| &s.kind)
    {
        Some(crate::config::SourceKindSection::Command(_)) => Some(BackupMethod::Command),
        Some(crate::config::SourceKindSection::Redis(_)) => Some(BackupMethod::Redis),
        Some(crate::config::SourceKindSection::Files(_)) => Some(BackupMethod::Files),
        Some(crate::config::SourceKindSection::Git(_)) => Some(BackupMethod::Git),
        Some(crate::config::SourceKindSection::Config(_)) => Some(BackupMethod::Config),
        _ if args.out.is_some() => None,
        _ => Some(BackupMethod::Logical),
    };
    let selector = Selector {
        source: args.source.as_deref(),
        method,
        verified: verified.as_ref(),
    };
    let resolved = catalog::resolve_backup(&repo, &which, &selector).await?;
    if which == "latest" {
        eprintln!(
            "restoring backup {}: {}",
            resolved.manifest.backup_id, resolved.why
        );
    }
    let manifest = resolved.manifest;
    if catalog::method_of(&manifest) == BackupMethod::Config {
        // The repository reports key accesses through the events: gone before they close.
        drop(repo);
        events.close().await;
        bail!(
            "backup {} is a configuration backup: `backstop config import {} --out FILE [--format env|json]` writes it back",
            manifest.backup_id,
            manifest.backup_id
        );
    }
    if catalog::method_of(&manifest) == BackupMethod::Files {
        let dp = DataPath {
            repo,
            appender: events.appender.clone(),
            sources: Vec::new(),
        };
        let result = restore_files(&dp, manifest, &args).await;
        drop(dp);
        events.close().await;
        return result;
    }
    if args.pitr.to_dir.is_some() || !args.paths.is_empty() {
        bail!(
            "--to-dir (without --physical) and --paths are for files backups; backup {} is a {} backup",
            manifest.backup_id,
            catalog::method_of(&manifest)
        );
    }
    if matches!(
        catalog::method_of(&manifest),
        BackupMethod::Command | BackupMethod::Redis | BackupMethod::Git
    ) || args.out.is_some()
    {
        let dp = DataPath {
            repo,
            appender: events.appender.clone(),
            sources: Vec::new(),
        };
        let result = restore_stream(&dp, manifest, &args).await;
        drop(dp);
        events.close().await;
        return result;
    }
    let to = args
        .to
        .clone()
        .context("say where to restore: --to postgres://... (or --physical --to-dir DIR)")?;
    let backup_id = manifest.backup_id;
    if args.dry_run {
        let report = repo.dry_run_restore(&manifest, None).await?;
        if !report.missing.is_empty() {
            for m in &report.missing {
                println!(
                    "MISSING {} (expected {} bytes, found {})",
                    m.key,
                    m.expected_size,
                    m.found_size
                        .map(|s| format!("{s} bytes"))
                        .unwrap_or_else(|| "nothing".into())
                );
            }
            eprintln!(
                "backup {backup_id} cannot be restored: {} objects missing",
                report.missing.len()
            );
            drop(repo);
            events.close().await;
            return Ok(std::process::ExitCode::FAILURE);
        }
    }
    let dp = DataPath {
        repo,
        appender: events.appender.clone(),
        sources: Vec::new(),
    };
    let target_redacted = backstop_sources::pg::ConnInfo::parse(&to)
        .map(|c| c.redacted())
        .unwrap_or_else(|_| "<unparsable target>".into());
    let options = backstop_sources::pg::logical::RestoreOptions {
        jobs: args.jobs.max(1),
        tables: (!args.tables.is_empty()).then(|| args.tables.clone()),
        create_db: args.create_db,
        dry_run: args.dry_run,
        ..Default::default()
    };
    let recovery = Recovery::new(
        &operator(),
        RecoveryScope {
            target: target_redacted.clone(),
            tables: options.tables.clone().unwrap_or_default(),
            point_in_time: None,
            dry_run: options.dry_run,
        },
    );
    let result = restore::restore_logical(&dp, manifest, &recovery, &to, options).await;
    drop(dp);
    events.close().await;
    let report = result?;
    if args.dry_run {
        println!(
            "dry run: backup {backup_id} would restore {} tables into {}; every object is present",
            report.tables.len(),
            target_redacted
        );
        for t in &report.tables {
            println!("  {:<40} {:>12} rows", t.table.to_string(), t.rows);
        }
    } else {
        println!(
            "restored backup {backup_id} into {target_redacted}: {} tables, {} rows, {} in {:.1} s",
            report.tables.len(),
            report.rows,
            human(report.bytes),
            report.duration_ms as f64 / 1000.0
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// A files backup: its tree (or `--paths`) written under `--to-dir`.
async fn restore_files(
    dp: &DataPath,
    manifest: backstop_repo::Manifest,
    args: &RestoreArgs,
) -> anyhow::Result<ExitCode> {
    let backup_id = manifest.backup_id;
    let to_dir = args.pitr.to_dir.clone().with_context(|| {
        format!("backup {backup_id} is a files backup: say where with --to-dir DIR (new or empty; nothing is overwritten)")
    })?;
    let req = backstop_ops::files::FilesRestore {
        to_dir: to_dir.clone(),
        paths: args.paths.clone(),
        dry_run: args.dry_run,
    };
    let recovery = Recovery::new(
        &operator(),
        RecoveryScope {
            target: to_dir.display().to_string(),
            tables: args.paths.clone(),
            point_in_time: None,
            dry_run: args.dry_run,
        },
    );
    let done = backstop_ops::files::restore_files(dp, manifest, &recovery, &req).await?;
    let p = &done.plan;
    if args.dry_run {
        println!(
            "dry run: backup {backup_id} would write {} files ({}), {} directories and {} symlinks under {}; every object is present, nothing was written",
            p.files,
            human(p.bytes),
            p.dirs,
            p.symlinks,
            to_dir.display()
        );
        for path in &p.paths {
            println!("  {path}");
        }
    } else {
        println!(
            "restored backup {backup_id} under {}: {} files ({}), {} directories, {} symlinks (sizes and SHA3-256 checked)",
            to_dir.display(),
            p.files,
            human(p.bytes),
            p.dirs,
            p.symlinks
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A command backup or Redis snapshot: its raw stream to `--out FILE`, or a command backup's
/// restore command run with `$BACKSTOP_TARGET` = `--to`.
async fn restore_stream(
    dp: &DataPath,
    manifest: backstop_repo::Manifest,
    args: &RestoreArgs,
) -> anyhow::Result<ExitCode> {
    let backup_id = manifest.backup_id;
    let method = catalog::method_of(&manifest);
    if args.dry_run {
        let report = dp.repo.dry_run_restore(&manifest, None).await?;
        if !report.missing.is_empty() {
            bail!(
                "backup {backup_id} cannot be restored: {} objects missing",
                report.missing.len()
            );
        }
        println!("dry run: {method} backup {backup_id} is restorable; every object is present");
        return Ok(ExitCode::SUCCESS);
    }
    let target = match (&args.out, &args.to, method) {
        (Some(out), None, _) => restore::StreamTarget::File(out.clone()),
        (None, Some(to), BackupMethod::Command) => restore::StreamTarget::Command {
            target: to.clone(),
            command: args.restore_with.clone(),
        },
        (None, _, BackupMethod::Git) => bail!(
            "a git backup is restored as a bundle: --out FILE.bundle, then `git clone FILE.bundle` (see RUNBOOK)"
        ),
        (None, _, BackupMethod::Redis) => bail!(
            "a Redis backup is restored as a dump.rdb file: --out DIR/dump.rdb, then start redis-server with --dir DIR --dbfilename dump.rdb (see RUNBOOK)"
        ),
        (None, None, _) => bail!(
            "say where to restore backup {backup_id}: --to TARGET (given to its restore command as $BACKSTOP_TARGET) or --out FILE (the raw stream)"
        ),
        (Some(_), Some(_), _) => bail!("--out and --to exclude each other"),
        (None, Some(_), other) => {
            bail!("backup {backup_id} is a {other} backup: restore it with --to postgres://...")
        }
    };
    let scope_target = match &target {
        restore::StreamTarget::File(f) => f.display().to_string(),
        restore::StreamTarget::Command { target, .. } => target.clone(),
    };
    let recovery = Recovery::new(
        &operator(),
        RecoveryScope {
            target: scope_target.clone(),
            tables: Vec::new(),
            point_in_time: None,
            dry_run: false,
        },
    );
    let bytes = restore::restore_stream(dp, manifest, &recovery, &target).await?;
    println!(
        "restored {method} backup {backup_id} to {scope_target}: {} (bytes and SHA3-256 checked)",
        human(bytes)
    );
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// restore --physical

/// `backstop restore --physical ...`.
async fn restore_physical(
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
    let repo = crate::replica_cmd::open_for_restore(
        config,
        data_dir,
        &args.repo,
        &mut events,
        args.from.as_deref(),
    )
    .await?
    .0
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
        let verified = match (which.as_str(), args.allow_unverified) {
            ("latest", false) => Some(verified_backups(&events, data_dir).await?),
            _ => None,
        };
        let selector = Selector {
            source: source.as_deref(),
            method: Some(BackupMethod::Physical),
            verified: verified.as_ref(),
        };
        let backup = restore::select_base_backup(&repo, &which, &selector, &target).await?;
        if which == "latest" {
            eprintln!(
                "restoring base backup {}: the newest {}physical backup of `{}` that reaches {target}",
                backup.manifest.backup_id,
                if verified.is_some() { "verified " } else { "" },
                backup.manifest.source
            );
        }
        let source = backup.manifest.source.clone();
        let restore_command = match &p.restore_command {
            Some(c) => c.clone(),
            // With --from, recovery reads its WAL from the same replica as the base backup;
            // otherwise wal-fetch reads the primary and falls back to a replica by itself.
            None => match args.from.as_deref() {
                Some(from) => crate::wiring::self_invocation_with(
                    config,
                    data_dir,
                    &args.repo,
                    &source,
                    "wal-fetch",
                    &["--from", from],
                )?,
                None => self_invocation(config, data_dir, &args.repo, &source, "wal-fetch")?,
            },
        };
        let mut opts = PhysicalRestoreOptions::new(restore_command);
        opts.target = target.clone();
        opts.inclusive = !p.target_exclusive;
        opts.action = target_action(p.target_action.as_deref())?;
        opts.timeline = target_timeline(p.target_timeline.as_deref())?;
        opts.keep_archiving = p.keep_archiving;
        opts.owner = Some(p.owner.clone().unwrap_or_else(|| "postgres".into()));
        let report = restore::restore_physical(
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
        let backups = catalog::physical_backups(&repo, Some(&source)).await?;
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
