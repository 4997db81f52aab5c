//! Continuous WAL archiving on the command line: `wal-push %p`, `wal-fetch %f %p` and
//! `wal verify` (base backups are `backup --physical`, point-in-time restores
//! `restore --physical`).
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
//! - With `[[repository.replicas]]` configured, `wal-push` writes each file to the primary and,
//!   concurrently, to every replica; it is acknowledged once the primary holds it (a replica
//!   unreachable or slower than `[wal] replica_timeout_seconds` falls behind and `backstop
//!   replicate` copies what it lacks: see `backstop_ops::wal_replicas` for the rule and why).
//!   `wal-fetch` reads from a replica when the primary is unreachable (or `--from NAME`) and
//!   says which copy served the file on stderr. A copy found unreachable is skipped for
//!   `[wal] unreachable_rest_seconds` (a marker in `pg_wal/backstop/unreachable/`), so an outage
//!   costs its retries once, not on every call. Replicas are used only with the configured
//!   repository (no `--repo` naming another one): they are copies of that one.
//! - `wal-fetch` exits 0 (restored), 1 (not archived: the end of the archive), or 150 (abort
//!   recovery: a damaged segment, a gap, an unreadable repository), never 1 for a failure, since
//!   PostgreSQL would take it for the end of the archive and finish recovery early. A
//!   configuration that cannot be read is such a failure too (see `main`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backstop_events::Actor;
use backstop_ledger::Appender;
use backstop_ops::catalog;
use backstop_ops::replicate::Replica;
use backstop_ops::wal::{self as repo_wal, RepoWalStore};
use backstop_ops::wal_replicas::{
    DEFAULT_REPLICA_TIMEOUT, DEFAULT_REST, FallbackWalStore, OpenCopy, ReplicatedWalStore, Rests,
};
use backstop_repo::{KeyAccess, Location, PurposeKeyFile, PurposeRepository, Repository};
use backstop_sources::pg::wal::{
    self, FetchOptions, FetchOutcome, PushOptions, WalProblemKind, WalStore, WalStoreError,
    WalVerifyOptions, WalVerifyReport,
};
use clap::{Args, Subcommand};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::config::{Config, ReplicaSection};
use crate::wiring::{
    self, Events, RepoArgs, configured_source, human, open_repository, operator, source_in_repo,
};

/// How long `wal-push` and `wal-fetch` give NATS to take their events before leaving them to
/// the catch-up.
const EVENT_BUDGET: Duration = Duration::from_secs(5);

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
    /// A `wal` key file (`backstop key export --purpose wal`), used instead of the master key
    /// (default: `[wal] key_file`).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
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
    /// A `wal` key file, used instead of the master key (as for wal-push).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Read from this replica ([[repository.replicas]] name) instead of the primary. Without
    /// it, a replica serves the file only when the primary is unreachable.
    #[arg(long)]
    pub from: Option<String>,
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

async fn catch_up(repo: &Repository, events: &Events) {
    let actor = Actor::worker("wal-catch-up");
    let repo = repo.with_access(actor.to_string(), "recording archived WAL files");
    let result = match &events.ledger {
        Some(ledger) => repo_wal::catch_up_with_ledger(&repo, ledger, &actor).await,
        None => {
            repo_wal::record_archived_wal(
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
    let servers = match crate::runtime::server_addrs(url) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%url, error = %e, "bad NATS URL; events left to the catch-up");
            return None;
        }
    };
    let connect = async_nats::ConnectOptions::new()
        .name("backstop-wal")
        .connection_timeout(Duration::from_secs(2))
        .connect(servers);
    match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Ok(client)) => match crate::runtime::remote_ledger(config, client) {
            Ok(remote) => Some(Arc::new(remote)),
            // The WAL is still archived; the ledger's catch-up records what this host could not.
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot sign appends; events left to the catch-up");
                None
            }
        },
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

/// What `wal-push` and `wal-fetch` opened: the repository with the master key, or, on a
/// database host, with a `wal` key file (`backstop key export --purpose wal`), which seals and
/// opens WAL and nothing else.
enum WalRepo {
    Full(Repository),
    KeyFile(PurposeRepository),
}

impl WalRepo {
    fn store(&self, actor: &Actor, reason: String, source: &str) -> RepoWalStore {
        match self {
            WalRepo::Full(r) => RepoWalStore::new(r.with_access(actor.to_string(), reason), source),
            WalRepo::KeyFile(repo) => {
                RepoWalStore::with_key_file(repo.with_access(actor.to_string(), reason), source)
            }
        }
    }
}

/// The `wal` key file: `--key-file`, else `[wal] key_file`; `None` means the master key.
fn wal_key_file(config: &Config, flag: Option<&Path>) -> Option<PathBuf> {
    flag.map(Path::to_path_buf)
        .or_else(|| config.wal.key_file.clone())
}

/// The key-access channel of a `wal-push` / `wal-fetch` call: accesses go to `appender` when
/// there is one (recorded in the background; see [`finish_key_accesses`]), else to the log.
fn key_recorder(
    appender: Option<Arc<dyn Appender>>,
) -> (UnboundedSender<KeyAccess>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = unbounded_channel::<KeyAccess>();
    let recorder = match appender {
        Some(a) => tokio::spawn(backstop_ops::keys::record_key_accesses(rx, a)),
        None => tokio::spawn(async move {
            while let Some(access) = rx.recv().await {
                tracing::debug!(
                    actor = %access.actor, key = %access.key_id, reason = %access.reason,
                    "key access (no ledger reachable from here: not recorded)"
                );
            }
        }),
    };
    (tx, recorder)
}

/// Opens the repository (or a replica) at `backend` for `wal-push` / `wal-fetch`, with the
/// `wal` key file when one is configured (the master key is then not read at all), else with
/// the master key.
async fn open_wal_repo(
    config: &Config,
    args: &RepoArgs,
    key_file: Option<&Path>,
    backend: Arc<dyn backstop_repo::Backend>,
    tx: UnboundedSender<KeyAccess>,
) -> anyhow::Result<WalRepo> {
    Ok(match key_file {
        Some(path) => {
            let file = PurposeKeyFile::load(path)?;
            let repo = PurposeRepository::open(backend, file, Arc::new(tx)).await?;
            if let Some(newer) = repo.newer_key() {
                tracing::warn!(
                    key_file = %path.display(), sealing = %repo.sealing_key().key_id, newer = %newer.key_id,
                    "the wal key was rotated after this key file was exported: WAL is still sealed with {}, not {}. Re-export it where the master key is (`backstop key export --purpose wal --out NEW_FILE`) and install it in place of {} (mode 0600)",
                    repo.sealing_key().key_id, newer.key_id, path.display()
                );
            }
            WalRepo::KeyFile(repo)
        }
        None => {
            let master = wiring::master_key(config, args)?;
            WalRepo::Full(Repository::open(backend, &master, Arc::new(tx)).await?)
        }
    })
}

/// Opens the primary repository for `wal-push` / `wal-fetch` (see [`open_wal_repo`]).
async fn open_for_wal(
    config: &Config,
    data_dir: &Path,
    args: &RepoArgs,
    key_file: Option<&Path>,
    tx: UnboundedSender<KeyAccess>,
) -> anyhow::Result<WalRepo> {
    let loc = wiring::location(config, data_dir, args)?;
    let backend = loc.open(Some(wiring::s3_settings(config))).await?;
    open_wal_repo(config, args, key_file, backend, tx).await
}

/// True when `args` name the configured repository (its replicas are copies of that one).
fn replicas_apply(config: &Config, data_dir: &Path, args: &RepoArgs) -> bool {
    if config.repository.replicas.is_empty() {
        return false;
    }
    let configured = wiring::location(config, data_dir, &RepoArgs::default());
    match (configured, wiring::location(config, data_dir, args)) {
        (Ok(a), Ok(b)) => a.to_string() == b.to_string(),
        _ => false,
    }
}

/// The spool's markers of unreachable copies, beside PostgreSQL's file (`pg_wal/backstop/`).
fn rests(config: &Config, pg_file: &Path) -> Rests {
    let wal_dir = match pg_file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Rests::new(
        wal_dir.join("backstop").join("unreachable"),
        Duration::from_secs(
            config
                .wal
                .unreachable_rest_seconds
                .unwrap_or(DEFAULT_REST.as_secs()),
        ),
    )
}

fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<backstop_repo::RepoError>()
            .is_some_and(|r| r.is_transient())
    })
}

/// Opens a replica's WAL archive when a fetch first needs it.
struct ReplicaOpener {
    config: Config,
    section: ReplicaSection,
    args: RepoArgs,
    key_file: Option<PathBuf>,
    tx: UnboundedSender<KeyAccess>,
    reason: String,
    source: String,
}

#[async_trait::async_trait]
impl OpenCopy for ReplicaOpener {
    fn name(&self) -> &str {
        &self.section.name
    }

    async fn open(&self) -> Result<RepoWalStore, WalStoreError> {
        let opened = async {
            let replica = crate::replica_cmd::open_replica(&self.section).await?;
            open_wal_repo(
                &self.config,
                &self.args,
                self.key_file.as_deref(),
                replica.backend,
                self.tx.clone(),
            )
            .await
        }
        .await;
        match opened {
            Ok(repo) => Ok(repo.store(
                &Actor::worker("wal-fetch"),
                format!("{} (replica `{}`)", self.reason, self.section.name),
                &self.source,
            )),
            Err(e) => Err(WalStoreError::unavailable(format!("{e:#}"))),
        }
    }
}

/// Waits (within the budget) for the key accesses to be recorded.
async fn finish_key_accesses(repo: Option<WalRepo>, recorder: tokio::task::JoinHandle<()>) {
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
    let loc = wiring::location(config, data_dir, &args.repo)?;
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
    let key_file = wal_key_file(config, args.key_file.as_deref());
    let (tx, recorder) = key_recorder(appender.clone());
    let repo = open_for_wal(config, data_dir, &args.repo, key_file.as_deref(), tx).await?;
    let store = repo.store(&actor, format!("archiving WAL of {source}"), &source);
    let replicas = push_replicas(config, data_dir, args).await;
    // Every handle on the repository is dropped before the events are announced: the
    // key-access recorder ends when the last one is gone.
    let report = if replicas.is_empty() {
        let pushed = wal::push(&args.path, &opts, &store).await;
        drop(store);
        pushed?
    } else {
        let timeout = config
            .wal
            .replica_timeout_seconds
            .map_or(DEFAULT_REPLICA_TIMEOUT, Duration::from_secs);
        let all = ReplicatedWalStore::new(store, replicas, timeout);
        let pushed = wal::push(&args.path, &opts, &all).await;
        rests(config, &args.path).after_push(&all.outcomes(), SystemTime::now());
        pushed?
    };
    // Files that could not be pushed ahead were logged by the push; PostgreSQL asks again.
    if let Some(a) = &appender {
        match tokio::time::timeout(
            EVENT_BUDGET,
            repo_wal::announce_push(a.as_ref(), &report, &actor),
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
    finish_key_accesses(Some(repo), recorder).await;
    Ok(())
}

/// The replicas `wal-push` writes to: every configured one that opens, but those found
/// unreachable less than the rest period ago (left to the catch-up).
async fn push_replicas(config: &Config, data_dir: &Path, args: &WalPushArgs) -> Vec<Replica> {
    if !replicas_apply(config, data_dir, &args.repo) {
        return Vec::new();
    }
    let rests = rests(config, &args.path);
    let now = SystemTime::now();
    let mut out = Vec::new();
    for r in &config.repository.replicas {
        if rests.resting(&r.name, now) {
            tracing::info!(replica = %r.name, "replica found unreachable recently: skipped; `backstop replicate` copies what it lacks");
            continue;
        }
        match crate::replica_cmd::open_replica(r).await {
            Ok(x) => out.push(x),
            Err(e) => {
                tracing::warn!(replica = %r.name, error = %format!("{e:#}"), "replica unusable: WAL not written to it")
            }
        }
    }
    out
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
    let key_file = wal_key_file(config, args.key_file.as_deref());
    let (tx, recorder) = key_recorder(appender);
    let reason = format!("recovery from the WAL of {source}");
    let actor = Actor::worker("wal-fetch");
    if let Some(name) = &args.from {
        let opened = async {
            let section = crate::replica_cmd::section(config, name)?;
            let replica = crate::replica_cmd::open_replica(section).await?;
            open_wal_repo(
                config,
                &args.repo,
                key_file.as_deref(),
                replica.backend,
                tx.clone(),
            )
            .await
        }
        .await;
        drop(tx);
        let repo = match opened {
            Ok(r) => r,
            Err(e) => {
                return fatal_fetch(
                    opts,
                    &format!("cannot open replica `{name}`: {e:#}"),
                    is_transient(&e),
                );
            }
        };
        let store = repo.store(&actor, format!("{reason} (replica `{name}`)"), &source);
        let code = run_fetch(args, opts, &store).await;
        if code == 0 {
            eprintln!(
                "backstop wal-fetch {}: served by replica `{name}`",
                args.name
            );
        }
        drop(store);
        finish_key_accesses(Some(repo), recorder).await;
        return code;
    }

    let fallback = replicas_apply(config, data_dir, &args.repo);
    let rests = rests(config, &args.dest);
    let now = SystemTime::now();
    let (repo, why) = if fallback && rests.resting(Rests::primary(), now) {
        (
            None,
            Some("found unreachable by an earlier call moments ago".to_string()),
        )
    } else {
        match open_for_wal(
            config,
            data_dir,
            &args.repo,
            key_file.as_deref(),
            tx.clone(),
        )
        .await
        {
            Ok(r) => (Some(r), None),
            Err(e) if fallback && is_transient(&e) => {
                rests.mark(Rests::primary(), now);
                (None, Some(format!("{e:#}")))
            }
            // A standby retries an unreachable repository; recovery otherwise aborts.
            Err(e) => {
                return fatal_fetch(opts, &format!("cannot open the repository: {e:#}"), true);
            }
        }
    };
    let primary = repo
        .as_ref()
        .map(|r| r.store(&actor, reason.clone(), &source));
    let openers: Vec<Box<dyn OpenCopy>> = if fallback {
        config
            .repository
            .replicas
            .iter()
            .map(|r| {
                Box::new(ReplicaOpener {
                    config: config.clone(),
                    section: r.clone(),
                    args: args.repo.clone(),
                    key_file: key_file.clone(),
                    tx: tx.clone(),
                    reason: reason.clone(),
                    source: source.clone(),
                }) as Box<dyn OpenCopy>
            })
            .collect()
    } else {
        Vec::new()
    };
    drop(tx);
    let store = FallbackWalStore::new(source.clone(), primary, why, openers);
    let code = run_fetch(args, opts, &store).await;
    if store.primary_unreachable() {
        rests.mark(Rests::primary(), now);
    }
    if let Some(name) = store.served_by() {
        eprintln!(
            "backstop wal-fetch {}: the primary repository is unreachable ({}); {} replica `{name}`",
            args.name,
            store.primary_failure().unwrap_or_default(),
            if code == 0 { "served by" } else { "read from" }
        );
    }
    drop(store);
    finish_key_accesses(repo, recorder).await;
    code
}

async fn run_fetch(args: &WalFetchArgs, opts: &FetchOptions, store: &dyn WalStore) -> i32 {
    match wal::fetch(&args.name, &args.dest, opts, store).await {
        Ok(FetchOutcome::Unusable { reason, .. }) => {
            eprintln!("backstop wal-fetch {}: {reason}", args.name);
            1
        }
        Ok(o) => o.exit_code(),
        Err(e) => {
            eprintln!("backstop wal-fetch {}: {e}", args.name);
            e.exit_code
        }
    }
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
        let backups = catalog::physical_backups(&repo, Some(&source)).await?;
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
