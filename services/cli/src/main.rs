//! `backstop`: the one binary. It parses the command line and the configuration file, then hands
//! over to one module per command group. Errors reach the user through `anyhow` with the context
//! each layer added; the exit code is 1 for a failure and 2 for a usage error (clap's).

mod alerts_cmd;
mod allocator;
mod audit_cmd;
mod backup_cmd;
mod bench;
mod catalog_cmd;
mod check_cmd;
mod config;
mod config_cmd;
mod control;
mod copy_cmd;
mod cost_cmd;
mod drill_cmd;
mod export_cmd;
mod forget_cmd;
mod git_cmd;
mod identity;
mod init_cmd;
mod key_cmd;
mod key_rotate_cmd;
mod ledger_cmd;
mod notify_cmd;
mod projections_cmd;
mod prune_cmd;
mod replica_cmd;
mod report_cmd;
mod restore_cmd;
mod runtime;
mod schedule_cmd;
mod serve;
mod serve_context;
mod set_cmd;
mod verify_cmd;
mod wal_cmd;
mod webhook_cmd;
mod wiring;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "backstop",
    version,
    about = "Event-sourced backup and disaster recovery for PostgreSQL platforms"
)]
struct Cli {
    /// Configuration file (default: ./backstop.toml if present).
    #[arg(long, short = 'c', global = true, env = "BACKSTOP_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory for the ledger and local state (default: ./backstop-data).
    #[arg(long, global = true, env = "BACKSTOP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ledger, the workers and the API in one process.
    Serve(serve::ServeArgs),
    /// Run workers on another machine, fed by NATS JetStream.
    Worker(serve::WorkerArgs),
    /// Inspect and verify the ledger.
    #[command(subcommand)]
    Ledger(ledger_cmd::LedgerCommand),
    /// Create a repository (a directory or s3://BUCKET/PREFIX).
    Init {
        #[command(flatten)]
        repo: wiring::RepoArgs,
        /// Generate a new master key into this file (mode 0600) instead of reading one.
        #[arg(long)]
        generate_key: Option<PathBuf>,
        /// Average chunk size in KiB, a power of two (default 1024; min and max are a quarter
        /// and four times it). Smaller finds more duplication in small databases.
        #[arg(long)]
        chunk_avg_kib: Option<usize>,
    },
    /// Back up a PostgreSQL database.
    Backup(Box<backup_cmd::BackupArgs>),
    /// List the backups in the repository.
    List {
        #[command(flatten)]
        repo: wiring::RepoArgs,
        #[arg(long)]
        json: bool,
    },
    /// Show one backup (an id or `latest`).
    Show {
        #[command(flatten)]
        repo: wiring::RepoArgs,
        backup: String,
        #[arg(long)]
        json: bool,
    },
    /// Verify a backup now: every object read and checked, or (--restore) a real test restore.
    Verify(verify_cmd::VerifyArgs),
    /// Restore a backup into a database.
    Restore(Box<restore_cmd::RestoreArgs>),
    /// Check the repository's consistency; with --read-data, read and verify sealed objects.
    Check {
        #[command(flatten)]
        repo: wiring::RepoArgs,
        #[arg(long)]
        read_data: bool,
        /// With --read-data: the percentage of objects to read (default all).
        #[arg(long, requires = "read_data")]
        subset: Option<f64>,
        #[arg(long)]
        json: bool,
        /// Compare the primary with this replica instead (presence and SHA3-256 of every object).
        #[arg(long, conflicts_with = "read_data")]
        replica: Option<String>,
        /// With --replica: rewrite what is missing or different there from the primary.
        #[arg(long, requires = "replica")]
        heal: bool,
    },
    /// Copy backups to the configured replicas ([[repository.replicas]]), verified by SHA3-256.
    Replicate(replica_cmd::ReplicateArgs),
    /// An offline copy (a directory or s3://BUCKET/PREFIX) of the backups, restorable with the
    /// master key alone; every object read back and compared by SHA3-256.
    Copy(Box<copy_cmd::CopyArgs>),
    /// Export tables as JSON Lines (sealed with the export key); `export get`, `export list`.
    Export(Box<export_cmd::ExportArgs>),
    /// A DR drill: the newest verified backup restored to a staging database, timed phase by
    /// phase, checked, and reported (JSON, Markdown, HTML).
    Drill(Box<drill_cmd::DrillArgs>),
    /// Apply the retention policies: keep or remove per backup, with the rule that keeps it.
    Forget(forget_cmd::ForgetArgs),
    /// The estimated monthly storage cost, its 90-day trend and retention recommendations.
    Cost(cost_cmd::CostArgs),
    /// Garbage collection: delete what no kept backup references, after a grace period.
    Prune(prune_cmd::PruneArgs),
    /// Git sources: `git sync NAME` mirrors one now, compares the hashes and bundles it.
    #[command(subcommand)]
    Git(git_cmd::GitCommand),
    /// Configuration backups: `config import ID --out FILE [--format env|json]`, `config show ID`.
    #[command(subcommand, name = "config")]
    ConfigBackup(config_cmd::ConfigCommand),
    /// Export the audit trail for an auditor, and verify an export offline.
    #[command(subcommand)]
    Audit(audit_cmd::AuditCommand),
    /// Reports from the ledger: `report weekly`.
    #[command(subcommand)]
    Report(report_cmd::ReportCommand),
    /// The webhook log's sealed pieces (`list`), and replaying them into a database (`replay`).
    #[command(subcommand)]
    Webhook(webhook_cmd::WebhookCommand),
    /// The open alerts (`list`, the default), or resolve one by its key.
    Alerts {
        #[command(subcommand)]
        cmd: Option<alerts_cmd::AlertsCommand>,
    },
    /// Rebuild the read models from the ledger, or show how far behind they are.
    #[command(subcommand)]
    Projections(projections_cmd::ProjectionsCommand),
    /// Benchmarks that print a report: runs the separate `backstop-bench` binary (ledger, api,
    /// backup, physical; `backstop bench --help`).
    Bench(bench::BenchArgs),
    /// Backup sets (`[[sets]]`): `set list` shows the sets in the repository and their
    /// components (`backup --set NAME` takes one, `restore --set ID` restores one).
    #[command(subcommand)]
    Set(set_cmd::SetCommand),
    /// Schedules: the next firings of each, in its zone and in UTC.
    #[command(subcommand)]
    Schedule(schedule_cmd::ScheduleCommand),
    /// Notifications: `backstop notify test` sends a test message to every channel.
    #[command(subcommand)]
    Notify(notify_cmd::NotifyCommand),
    /// Archive a WAL file: PostgreSQL's archive_command, `backstop wal-push %p`.
    WalPush(wal_cmd::WalPushArgs),
    /// Restore a WAL file: PostgreSQL's restore_command, `backstop wal-fetch %f %p`.
    WalFetch(wal_cmd::WalFetchArgs),
    /// The WAL archive: continuity and checksums.
    #[command(subcommand)]
    Wal(wal_cmd::WalCommand),
    /// The repository's data keys: list them, export one purpose's key to a host, rotate them
    /// and re-encrypt the backups, retire unused versions.
    #[command(subcommand)]
    Key(key_cmd::KeyCommand),
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BACKSTOP_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    allocator::limit_arenas();
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let mut config = match config::Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        // wal-fetch must never exit 1 for a failure: PostgreSQL would end recovery early.
        Err(e) if matches!(cli.command, Command::WalFetch(_)) => {
            return Ok(wal_cmd::wal_fetch_unconfigured(&e));
        }
        Err(e) => return Err(e),
    };
    backstop_ops::lease::set_period(config.lease_period());
    let data_dir = config.data_dir(cli.data_dir.as_deref());
    // What is wired from the configuration (git sources' working mirrors) uses the same one.
    config.data_dir = Some(data_dir.clone());
    if let Some(notice) = config.signing_key_notice(&data_dir) {
        tracing::warn!("{notice}");
    }
    match cli.command {
        Command::Serve(args) => serve::serve(&config, &data_dir, args).await,
        Command::Worker(args) => serve::worker(&config, &data_dir, args).await,
        Command::Ledger(cmd) => ledger_cmd::run(&config, &data_dir, cmd).await,
        Command::Audit(cmd) => audit_cmd::run(&config, &data_dir, cmd).await,
        Command::Git(cmd) => git_cmd::run(&config, &data_dir, cmd).await,
        Command::ConfigBackup(cmd) => config_cmd::run(&config, &data_dir, cmd).await,
        Command::Alerts { cmd } => alerts_cmd::run(&config, &data_dir, cmd).await,
        Command::Report(cmd) => report_cmd::run(&config, &data_dir, cmd).await,
        Command::Webhook(cmd) => webhook_cmd::run(&config, &data_dir, cmd).await,
        Command::Projections(cmd) => projections_cmd::run(&config, &data_dir, cmd).await,
        Command::Schedule(cmd) => schedule_cmd::run(&config, cmd),
        Command::Set(cmd) => set_cmd::run(&config, &data_dir, cmd).await,
        Command::Notify(cmd) => notify_cmd::run(&config, &data_dir, cmd).await,
        Command::Bench(args) => bench::run(args),
        Command::Init {
            repo,
            generate_key,
            chunk_avg_kib,
        } => init_cmd::init(&config, &data_dir, repo, generate_key, chunk_avg_kib).await,
        Command::Backup(args) => backup_cmd::run_backup(&config, &data_dir, *args).await,
        Command::List { repo, json } => catalog_cmd::list(&config, &data_dir, repo, json).await,
        Command::Show { repo, backup, json } => {
            catalog_cmd::show(&config, &data_dir, repo, backup, json).await
        }
        Command::Restore(args) => restore_cmd::restore(&config, &data_dir, *args).await,
        Command::Export(args) => export_cmd::run(&config, &data_dir, *args).await,
        Command::Drill(args) => drill_cmd::run(&config, &data_dir, *args).await,
        Command::Forget(args) => forget_cmd::run(&config, &data_dir, args).await,
        Command::Cost(args) => cost_cmd::run(&config, &data_dir, args).await,
        Command::Prune(args) => prune_cmd::run(&config, &data_dir, args).await,
        Command::Verify(args) => verify_cmd::verify(&config, &data_dir, args).await,
        Command::WalPush(args) => wal_cmd::wal_push(&config, &data_dir, args).await,
        Command::WalFetch(args) => wal_cmd::wal_fetch(&config, &data_dir, args).await,
        Command::Wal(cmd) => wal_cmd::wal(&config, &data_dir, cmd).await,
        Command::Key(cmd) => key_cmd::run(&config, &data_dir, cmd).await,
        Command::Check {
            repo,
            json,
            replica: Some(name),
            heal,
            ..
        } => replica_cmd::check_replica(&config, &data_dir, repo, &name, heal, json).await,
        Command::Check {
            repo,
            read_data,
            subset,
            json,
            ..
        } => check_cmd::check(&config, &data_dir, repo, read_data, subset, json).await,
        Command::Replicate(args) => replica_cmd::replicate(&config, &data_dir, args).await,
        Command::Copy(args) => copy_cmd::run(&config, &data_dir, *args).await,
    }
}
