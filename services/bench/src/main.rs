//! `backstop-bench`: Backstop's benchmarks, one module per benchmark, each printing a report. They
//! measure; they assert nothing (services/bench/tests/tiny.rs runs each at a tiny size and checks
//! the report's shape, so none rots).
//!
//! `backstop bench ARGS...` runs this binary with the same arguments (it is found beside the
//! `backstop` executable or on PATH), so both spellings work. The benchmarks that measure the
//! `backstop` binary run it as a child process: the one named by `--backstop` / `BACKSTOP_BIN`
//! (which `backstop bench` sets to itself), else the `backstop` beside this executable, else the
//! one on PATH.
//!
//! Every server a benchmark needs (PostgreSQL 15, Garage, nats-server) is started through
//! backstop-testkit, the same kit the tests use, on free loopback ports in temporary directories,
//! and stopped when the benchmark ends, whether it succeeds or fails.

mod api;
mod backup;
mod drill;
mod fuzz;
mod ledger;
mod physical;
mod prune;
mod scale;
mod shared;
mod webhook;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "backstop-bench",
    version,
    about = "Backstop's benchmarks: each prints a report (`backstop bench ...` runs this binary)"
)]
struct Cli {
    /// The `backstop` binary the backup, physical and api benchmarks run (default: the one
    /// beside this executable, else on PATH).
    #[arg(long, global = true, env = "BACKSTOP_BIN")]
    backstop: Option<PathBuf>,
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The dashboard and the audit query under load over a ledger of 1,000,000 events.
    Api(api::BenchApiArgs),
    /// Backstop's logical backups beside pg_dump and restic on the trading dataset: time, stored
    /// bytes, the second backup after a day's churn, restore time, peak memory.
    Backup(backup::BenchBackupArgs),
    /// Backstop's physical base backups, restores and WAL archiving beside pgBackRest on the
    /// trading dataset: times, stored bytes, the second backup after a day's churn, segments/s.
    Physical(physical::BenchPhysicalArgs),
    /// The cargo-fuzz targets of the parsers (fuzz/), each for --seconds (default 600): executions,
    /// coverage and crashes. Needs the nightly toolchain; installs cargo-fuzz if missing.
    Fuzz(fuzz::BenchFuzzArgs),
    /// Ledger append throughput and latency, with and without NATS publication.
    Ledger(ledger::BenchLedgerArgs),
    /// Garbage collection over 1,000,000 chunks referenced by 1,000 manifests, half of them
    /// forgotten: wall time and peak memory of the mark and sweep runs.
    Prune(prune::BenchPruneArgs),
    /// The end-to-end RTO of a DR drill (logical, and physical with pgbench WAL to replay) on
    /// the trading dataset, phase by phase.
    Drill(drill::BenchDrillArgs),
    /// Backstop's logical and physical full, second backup and restore at 1, 4 and 16 million
    /// rows: time per GiB and peak memory at each size, and the time projected for 10 GB.
    Scale(scale::BenchScaleArgs),
    /// Webhook-log appends (fsync before the acknowledgement, group commit) per second and
    /// p50/p99 latency with 1, 16 and 256 concurrent senders.
    Webhook(webhook::BenchWebhookArgs),
}

fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BACKSTOP_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
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
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let backstop = || shared::backstop_binary(cli.backstop.as_deref());
    match cli.command {
        BenchCommand::Ledger(args) => ledger::run(args).await,
        BenchCommand::Api(args) => api::run(args, &backstop()?).await,
        BenchCommand::Backup(args) => backup::run(args, &backstop()?).await,
        BenchCommand::Physical(args) => physical::run(args, &backstop()?).await,
        BenchCommand::Prune(args) => prune::run(args).await,
        BenchCommand::Drill(args) => drill::run(args, cli.backstop.as_deref()).await,
        BenchCommand::Fuzz(args) => fuzz::run(args).await,
        BenchCommand::Webhook(args) => webhook::run(args).await,
        BenchCommand::Scale(args) => scale::run(args, &backstop()?).await,
    }
}
