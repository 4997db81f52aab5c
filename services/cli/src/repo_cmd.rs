//! Repository commands: init, backup, list, show, restore, check.
//!
//! Each opens the repository (location, S3 settings and master key from flags, the config file
//! or the environment) and an appender for its events: the local ledger when no `backstop serve`
//! holds it, or the serving process over NATS when it does and NATS is configured.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use backstop_events::{
    Actor, BackupKind, BackupRequested, Event, KeyCreated, NewEvent, RepositoryInitialized,
    Trigger, streams, uuid_v7,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerError};
use backstop_repo::{KeyAccess, Location, MasterKey, RepoParams, Repository, S3Settings};
use backstop_workers::backup::{self, DataPath, SourceSpec};
use clap::Args;
use tokio::sync::mpsc::unbounded_channel;

use crate::config::Config;

#[derive(Args, Clone, Default)]
pub struct RepoArgs {
    /// Repository: a directory or s3://BUCKET/PREFIX (overrides repository.location).
    #[arg(long)]
    pub repo: Option<String>,
    /// File holding the master key (default: $BACKSTOP_MASTER_KEY).
    #[arg(long)]
    pub master_key_file: Option<PathBuf>,
}

/// Where events go, and the ledger if this process opened it (closed at the end).
pub struct Events {
    pub appender: Arc<dyn Appender>,
    pub ledger: Option<Ledger>,
    key_recorder: Option<tokio::task::JoinHandle<()>>,
}

impl Events {
    pub async fn open(config: &Config, data_dir: &Path) -> anyhow::Result<Events> {
        match Ledger::open(&config.ledger_config(data_dir)) {
            Ok(ledger) => Ok(Events {
                appender: Arc::new(ledger.clone()),
                ledger: Some(ledger),
                key_recorder: None,
            }),
            Err(LedgerError::Locked { path }) => match &config.nats.url {
                Some(url) => {
                    let client = crate::runtime::connect_nats(url).await?;
                    Ok(Events {
                        appender: Arc::new(backstop_ledger::remote::RemoteLedger::new(client)),
                        ledger: None,
                        key_recorder: None,
                    })
                }
                None => bail!(
                    "the ledger at {} is held by a running `backstop serve`: stop it, configure [nats] url so this command can append through it, or request the backup through the API (POST /api/backups)",
                    path.display()
                ),
            },
            Err(e) => Err(e).context(format!("cannot open the ledger in {}", data_dir.display())),
        }
    }

    /// Waits for every key access to be recorded, then closes the ledger.
    pub async fn close(self) {
        let Events {
            appender,
            ledger,
            key_recorder,
        } = self;
        if let Some(t) = key_recorder {
            let _ = t.await;
        }
        // The appender may be a handle on the ledger: the writer stops only when every handle
        // is gone.
        drop(appender);
        if let Some(l) = ledger {
            l.close().await;
        }
    }
}

pub fn location(config: &Config, data_dir: &Path, args: &RepoArgs) -> anyhow::Result<Location> {
    let text = args
        .repo
        .clone()
        .or_else(|| config.repository.location.clone())
        .unwrap_or_else(|| data_dir.join("repository").display().to_string());
    Ok(Location::parse(&text)?)
}

pub fn s3_settings(config: &Config) -> S3Settings {
    let r = &config.repository;
    S3Settings {
        endpoint: r.endpoint.clone(),
        region: r.region.clone(),
        access_key: r.access_key_id.clone(),
        secret_key: r.secret_access_key.clone(),
        path_style: r.path_style.unwrap_or(true),
        ..Default::default()
    }
}

pub fn master_key(config: &Config, args: &RepoArgs) -> anyhow::Result<MasterKey> {
    let file = args
        .master_key_file
        .clone()
        .or_else(|| config.repository.master_key_file.clone());
    Ok(MasterKey::load(file.as_deref())?)
}

/// Opens the repository; key unwraps are recorded through `events`.
pub async fn open_repository(
    config: &Config,
    data_dir: &Path,
    args: &RepoArgs,
    events: &mut Events,
) -> anyhow::Result<Repository> {
    let master = master_key(config, args)?;
    let loc = location(config, data_dir, args)?;
    let backend = loc.open(Some(s3_settings(config))).await?;
    let (tx, rx) = unbounded_channel::<KeyAccess>();
    let repo = Repository::open(backend, &master, Arc::new(tx)).await?;
    events.key_recorder = Some(tokio::spawn(backstop_workers::keys::record_key_accesses(
        rx,
        events.appender.clone(),
    )));
    Ok(repo)
}

pub fn source_specs(config: &Config) -> Vec<SourceSpec> {
    config
        .sources
        .iter()
        .map(|s| SourceSpec {
            name: s.name.clone(),
            conninfo: s.postgres.clone(),
            jobs: s.jobs.unwrap_or(2),
        })
        .collect()
}

pub fn operator() -> String {
    std::env::var("BACKSTOP_OPERATOR")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into())
}

pub async fn init(
    config: &Config,
    data_dir: &Path,
    args: RepoArgs,
    generate_key: Option<PathBuf>,
    chunk_avg_kib: Option<usize>,
) -> anyhow::Result<std::process::ExitCode> {
    let chunk_avg_kib = chunk_avg_kib.or(config.repository.chunk_avg_kib);
    let master = match &generate_key {
        Some(path) => {
            if path.exists() {
                bail!(
                    "{} exists; refusing to overwrite a master key",
                    path.display()
                );
            }
            let key = MasterKey::generate();
            write_secret(path, key.to_base64().as_str())?;
            eprintln!(
                "A new master key is in {} (mode 0600). Keep a copy OFF this machine: without it no backup can be restored.",
                path.display()
            );
            key
        }
        None => master_key(config, &args)?,
    };
    let loc = location(config, data_dir, &args)?;
    let backend = loc.open(Some(s3_settings(config))).await?;
    let mut params = RepoParams::default();
    if let Some(q) = config.repository.brotli_quality {
        params.compression.quality = q;
    }
    if let Some(kib) = chunk_avg_kib {
        if !kib.is_power_of_two() || !(64..=16384).contains(&kib) {
            bail!(
                "the average chunk size must be a power of two between 64 and 16384 KiB, got {kib}"
            );
        }
        let avg = (kib * 1024) as u32;
        params.chunker = backstop_repo::ChunkerParams {
            min_size: avg / 4,
            avg_size: avg,
            max_size: avg * 4,
        };
    }
    let mut events = Events::open(config, data_dir).await?;
    let (tx, rx) = unbounded_channel::<KeyAccess>();
    let repo = Repository::init(backend, &master, params, Arc::new(tx)).await?;
    events.key_recorder = Some(tokio::spawn(backstop_workers::keys::record_key_accesses(
        rx,
        events.appender.clone(),
    )));
    let actor = Actor::operator(operator());
    let stream = streams::repository();
    let e = NewEvent::new(
        &stream,
        actor.clone(),
        &Event::RepositoryInitialized(RepositoryInitialized {
            repository_id: repo.id(),
            location: loc.to_string(),
            format_version: repo.config().format_version,
        }),
    );
    events
        .appender
        .append(&stream, ExpectedVersion::Any, vec![e])
        .await?;
    for key in repo.keys() {
        let stream = streams::keys(key.purpose.as_str());
        let e = NewEvent::new(
            &stream,
            actor.clone(),
            &Event::KeyCreated(KeyCreated {
                purpose: key.purpose.as_str().to_string(),
                key_id: key.key_id.clone(),
                version: key.version,
            }),
        );
        events
            .appender
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await?;
    }
    println!("initialized repository {} at {loc}", repo.id());
    drop(repo);
    events.close().await;
    Ok(std::process::ExitCode::SUCCESS)
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

#[derive(Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// A source from the configuration file.
    #[arg(long, conflicts_with = "pg")]
    pub source: Option<String>,
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
            sources.push(SourceSpec {
                name: name.clone(),
                conninfo: url.clone(),
                jobs: adhoc_jobs,
            });
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
) -> anyhow::Result<std::process::ExitCode> {
    if args.physical {
        return crate::physical_cmd::run_physical_backup(config, data_dir, args).await;
    }
    let (source, mut sources) = resolve_source(config, &args, 2)?;
    if let Some(j) = args.jobs {
        for s in &mut sources {
            s.jobs = j;
        }
    }
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events).await?;
    let dp = DataPath {
        repo,
        appender: events.appender.clone(),
        sources,
    };
    let operator = operator();
    let actor = Actor::operator(&operator);
    let request = BackupRequested {
        backup_id: uuid_v7(),
        source: source.clone(),
        kind: args.kind,
        physical: false,
        trigger: Trigger::Foreground {
            host: backup::hostname(),
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
    let progress: Option<backup::ProgressFn> = bar.clone().map(|bar| {
        let started = std::time::Instant::now();
        let f: backup::ProgressFn = Arc::new(move |p: backstop_repo::Progress| {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let dedup = if p.raw_bytes > 0 {
                100.0 * p.dedup_bytes as f64 / p.raw_bytes as f64
            } else {
                0.0
            };
            bar.set_message(format!(
                "read {} · stored {} · deduplicated {dedup:.0}% · {}/s",
                human(p.raw_bytes),
                human(p.new_bytes),
                human((p.raw_bytes as f64 / secs) as u64)
            ));
        });
        f
    });
    let result = backup::run_backup(&dp, &request, requested_at, &actor, None, progress).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    drop(dp);
    events.close().await;
    let completed = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&completed.clone())?);
    } else {
        println!(
            "backup {} of `{}` ({}) complete in {:.1} s: read {}, stored {} in all, {} new ({} of {} chunks new); {} tables, {} rows",
            completed.backup_id,
            completed.source,
            completed.kind,
            completed.duration_ms as f64 / 1000.0,
            human(completed.raw_bytes),
            human(completed.stored_bytes),
            human(completed.new_bytes),
            completed.new_chunks,
            completed.chunks,
            completed.tables.len(),
            completed.tables.iter().map(|t| t.rows).sum::<u64>()
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Verification state of a backup from its ledger stream, when the ledger is readable here.
fn verification_state(ledger: Option<&Ledger>, backup_id: uuid::Uuid) -> String {
    let Some(ledger) = ledger else {
        return "unknown (ledger busy)".into();
    };
    let Ok(events) = ledger.read_stream(&streams::backup(backup_id), 1) else {
        return "unknown".into();
    };
    let mut state = "not verified".to_string();
    for e in events {
        match e.event_type.as_str() {
            "verification.passed" => {
                state = format!("verified {}", e.recorded_at.format("%Y-%m-%d %H:%M"))
            }
            "verification.failed" => {
                state = format!(
                    "FAILED verification {}",
                    e.recorded_at.format("%Y-%m-%d %H:%M")
                )
            }
            _ => {}
        }
    }
    state
}

pub async fn list(
    config: &Config,
    data_dir: &Path,
    args: RepoArgs,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args, &mut events).await?;
    let mut rows = Vec::new();
    for listed in repo.list_backups().await? {
        match listed.manifest {
            Ok(m) => rows.push(Ok(m)),
            Err(e) => rows.push(Err((listed.backup_id, e.to_string()))),
        }
    }
    rows.sort_by_key(|r| match r {
        Ok(m) => m.finished_at,
        Err(_) => chrono::DateTime::<chrono::Utc>::MIN_UTC,
    });
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| match r {
                Ok(m) => serde_json::json!({
                    "backup_id": m.backup_id, "source": m.source, "kind": m.kind, "parent": m.parent,
                    "finished_at": m.finished_at, "totals": m.totals,
                    "verification": verification_state(events.ledger.as_ref(), m.backup_id),
                }),
                Err((id, e)) => serde_json::json!({"backup_id": id, "error": e}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<36}  {:<10} {:<12} {:<19} {:>10} {:>10} {:>10} {:>8}  verification",
            "backup", "source", "kind", "finished (UTC)", "raw", "stored", "new", "secs",
        );
        for r in &rows {
            match r {
                Ok(m) => println!(
                    "{:<36}  {:<10} {:<12} {:<19} {:>10} {:>10} {:>10} {:>8.1}  {}",
                    m.backup_id,
                    m.source,
                    m.kind.as_str(),
                    m.finished_at.format("%Y-%m-%d %H:%M:%S"),
                    human(m.totals.raw_bytes),
                    human(m.totals.stored_bytes),
                    human(m.totals.new_bytes),
                    m.duration().num_milliseconds() as f64 / 1000.0,
                    verification_state(events.ledger.as_ref(), m.backup_id)
                ),
                Err((id, e)) => println!("{id:<36}  UNREADABLE: {e}"),
            }
        }
    }
    drop(repo);
    events.close().await;
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn show(
    config: &Config,
    data_dir: &Path,
    args: RepoArgs,
    which: String,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args, &mut events).await?;
    let m = backup::resolve_backup(&repo, &which, None).await?;
    let report = backup::dump_report(&m).ok();
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!("backup        {}", m.backup_id);
        println!("source        {}", m.source);
        println!("kind          {}", m.kind);
        println!(
            "parent        {}",
            m.parent
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into())
        );
        println!("started       {}", m.started_at);
        println!("finished      {}", m.finished_at);
        println!(
            "duration      {:.1} s",
            m.duration().num_milliseconds() as f64 / 1000.0
        );
        println!("raw           {}", human(m.totals.raw_bytes));
        println!("stored        {}", human(m.totals.stored_bytes));
        println!("new           {}", human(m.totals.new_bytes));
        println!(
            "verification  {}",
            verification_state(events.ledger.as_ref(), m.backup_id)
        );
        if let Some(r) = report {
            println!(
                "database      {} (PostgreSQL {})",
                r.database, r.server_version
            );
            println!("tables (row counts in the backup's snapshot):");
            for t in r.tables.iter().filter(|t| t.part.is_some()) {
                println!(
                    "  {:<40} {:>12} rows  {:>10}",
                    t.table.to_string(),
                    t.rows,
                    human(t.bytes)
                );
            }
        }
    }
    drop(repo);
    events.close().await;
    Ok(std::process::ExitCode::SUCCESS)
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
    /// Parallel jobs.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Physical restore: a data directory that recovers to a point in time (see --to-dir).
    #[arg(long)]
    pub physical: bool,
    #[command(flatten)]
    pub pitr: crate::physical_cmd::PitrArgs,
}

pub async fn restore(
    config: &Config,
    data_dir: &Path,
    args: RestoreArgs,
) -> anyhow::Result<std::process::ExitCode> {
    if args.physical {
        return crate::physical_cmd::restore(config, data_dir, args).await;
    }
    let which = args
        .backup
        .clone()
        .context("say which backup to restore: an id or `latest`")?;
    let to = args
        .to
        .clone()
        .context("say where to restore: --to postgres://... (or --physical --to-dir DIR)")?;
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events).await?;
    let manifest = backup::resolve_backup(&repo, &which, args.source.as_deref()).await?;
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
    let result =
        backup::run_restore(&dp, manifest, &target_redacted, &to, options, &operator()).await;
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

pub async fn check(
    config: &Config,
    data_dir: &Path,
    args: RepoArgs,
    read_data: bool,
    subset: Option<f64>,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args, &mut events).await?;
    let percent = read_data.then(|| subset.unwrap_or(100.0));
    let report = repo.check(percent).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            println!("{p}");
        }
        if report.is_ok() {
            println!(
                "repository consistent: {} manifests, {} chunks referenced, {} objects read ({}), {} unreferenced chunks ({}) in {:.1} s",
                report.manifests,
                report.chunks_referenced,
                report.objects_read,
                human(report.bytes_read),
                report.unreferenced_chunks,
                human(report.unreferenced_bytes),
                report.duration_ms as f64 / 1000.0
            );
        } else {
            eprintln!("repository has {} problems", report.problems.len());
        }
    }
    drop(repo);
    events.close().await;
    Ok(if report.is_ok() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Probes the repository's storage by reading its config object's size.
struct RepoProbe {
    backend: Arc<dyn backstop_repo::Backend>,
}

#[async_trait::async_trait]
impl backstop_api::StorageProbe for RepoProbe {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    async fn probe(&self) -> Result<std::time::Duration, String> {
        let started = std::time::Instant::now();
        match self.backend.head("config").await {
            Ok(Some(_)) => Ok(started.elapsed()),
            Ok(None) => Err("reachable, but the repository config object is missing".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What a long-running process needs for the data-path workers and the storage probe. Missing
/// pieces (no repository yet, no master key) leave those workers off with a log line, so that
/// `serve` still runs the ledger, the alerts and the API.
pub async fn worker_context(
    config: &Config,
    data_dir: &Path,
    appender: Arc<dyn Appender>,
) -> (
    backstop_workers::WorkerContext,
    Option<Arc<dyn backstop_api::StorageProbe>>,
) {
    let none = || backstop_workers::WorkerContext {
        data_path: None,
        verify: None,
    };
    let loc = match location(config, data_dir, &RepoArgs::default()) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "repository location unusable; data-path workers off");
            return (none(), None);
        }
    };
    if let Location::Local(path) = &loc
        && !path.join("config").exists()
    {
        tracing::info!(repository = %loc, "no repository yet (`backstop init`); data-path workers off");
        return (none(), None);
    }
    let backend = match loc.open(Some(s3_settings(config))).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot reach the repository; data-path workers off");
            return (none(), None);
        }
    };
    let probe: Arc<dyn backstop_api::StorageProbe> = Arc::new(RepoProbe {
        backend: backend.clone(),
    });
    let master = match master_key(config, &RepoArgs::default()) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %e, "no master key; backup and verify workers off");
            return (none(), Some(probe));
        }
    };
    let (tx, rx) = unbounded_channel::<KeyAccess>();
    let repo = match Repository::open(backend, &master, Arc::new(tx)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the repository; backup and verify workers off");
            return (none(), Some(probe));
        }
    };
    tokio::spawn(backstop_workers::keys::record_key_accesses(
        rx,
        appender.clone(),
    ));
    let verify =
        config
            .verify
            .scratch
            .as_ref()
            .map(|scratch| backstop_workers::verify::VerifySettings {
                scratch: scratch.clone(),
                tolerance_percent: config.verify.tolerance_percent.unwrap_or(1.0),
                max_retries: config.verify.max_retries.unwrap_or(2),
                jobs: config.verify.jobs.unwrap_or(2),
            });
    (
        backstop_workers::WorkerContext {
            data_path: Some(DataPath {
                repo,
                appender,
                sources: source_specs(config),
            }),
            verify,
        },
        Some(probe),
    )
}

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// A backup id, or `latest`.
    pub backup: String,
    /// A real test restore into a scratch database (default: read and check every object).
    #[arg(long)]
    pub restore: bool,
    /// Scratch PostgreSQL for --restore (overrides verify.scratch).
    #[arg(long)]
    pub scratch: Option<String>,
}

/// `backstop verify`: what the verify worker does, by hand, recorded with the operator.
pub async fn verify(
    config: &Config,
    data_dir: &Path,
    args: VerifyArgs,
) -> anyhow::Result<std::process::ExitCode> {
    use backstop_events::{
        TableCheck, VerificationFailed, VerificationPassed, VerificationStarted, VerifyTier,
    };
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events).await?;
    let manifest = backup::resolve_backup(&repo, &args.backup, None).await?;
    let backup_id = manifest.backup_id;
    let actor = Actor::operator(operator());
    let stream = streams::backup(backup_id);
    let verification_id = uuid_v7();
    let tier = if args.restore {
        VerifyTier::Restore
    } else {
        VerifyTier::Checksums
    };
    let append = |event: Event| {
        let e = NewEvent::new(&stream, actor.clone(), &event);
        let appender = events.appender.clone();
        let stream = stream.clone();
        async move {
            appender
                .append(&stream, ExpectedVersion::Any, vec![e])
                .await
        }
    };
    append(Event::VerificationStarted(VerificationStarted {
        verification_id,
        backup_id,
        tier: tier.clone(),
    }))
    .await?;
    type Verdict =
        Result<(u64, u64, Option<u64>, Option<f64>, Vec<TableCheck>), (String, Vec<TableCheck>)>;
    // A physical backup is test-restored as a temporary cluster (no scratch database needed).
    let physical = match args.restore {
        true => {
            crate::physical_cmd::verify_restore(config, data_dir, &args.repo, &repo, &manifest)
                .await
        }
        false => None,
    };
    let verdict: Verdict = if let Some(v) = physical {
        v.map(|(objects, bytes, ms, speed)| (objects, bytes, ms, speed, Vec::new()))
            .map_err(|reason| (reason, Vec::new()))
    } else if args.restore {
        let scratch = args
            .scratch
            .clone()
            .or_else(|| config.verify.scratch.clone())
            .context(
                "--restore needs a scratch PostgreSQL: pass --scratch URL or set verify.scratch",
            )?;
        let worker = backstop_workers::verify::VerifyWorker {
            data_path: DataPath {
                repo: repo.clone(),
                appender: events.appender.clone(),
                sources: Vec::new(),
            },
            settings: backstop_workers::verify::VerifySettings {
                scratch,
                tolerance_percent: config.verify.tolerance_percent.unwrap_or(1.0),
                max_retries: 0,
                jobs: config.verify.jobs.unwrap_or(2),
            },
        };
        worker.test_restore(manifest).await.map(|o| {
            let secs = (o.restore_ms as f64 / 1000.0).max(0.001);
            (
                o.objects,
                o.bytes,
                Some(o.restore_ms),
                Some(o.raw_bytes as f64 / secs),
                o.tables,
            )
        })
    } else {
        let checker = repo.with_access(
            actor.to_string(),
            format!("verification of backup {backup_id}"),
        );
        let report = checker.check_backup(&manifest, Some(100.0)).await?;
        if report.is_ok() {
            Ok((
                report.objects_read,
                report.bytes_read,
                None,
                None,
                Vec::new(),
            ))
        } else {
            let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
            Err((problems.join("; "), Vec::new()))
        }
    };
    let code = match verdict {
        Ok((objects, bytes, restore_ms, speed, tables)) => {
            append(Event::VerificationPassed(VerificationPassed {
                verification_id,
                backup_id,
                tier,
                objects_checked: objects,
                bytes_checked: bytes,
                restore_ms,
                restore_bytes_per_sec: speed,
                tables,
            }))
            .await?;
            println!(
                "backup {backup_id} verified: {objects} objects, {} checked{}",
                human(bytes),
                restore_ms
                    .map(|ms| format!(", test restore in {:.1} s", ms as f64 / 1000.0))
                    .unwrap_or_default()
            );
            std::process::ExitCode::SUCCESS
        }
        Err((reason, tables)) => {
            append(Event::VerificationFailed(VerificationFailed {
                verification_id,
                backup_id,
                tier,
                reason: reason.clone(),
                tables,
            }))
            .await?;
            eprintln!("backup {backup_id} FAILED verification: {reason}");
            std::process::ExitCode::FAILURE
        }
    };
    drop(repo);
    events.close().await;
    Ok(code)
}
