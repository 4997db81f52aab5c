//! `backstop bench drill`: the end-to-end RTO of a DR drill (backstop_ops::drill, in-process)
//! on `bench/trading.sql` at `--rows` rows, phase by phase (fetch, restore, replay, checks). One
//! PostgreSQL 15 is the production source, another the staging server; the repository is a
//! directory on local disk (`--dir`, default the temporary directory). The backup is taken once;
//! each of `--runs` drills restores it anew and the median run is reported. Logical only:
//! physical drills (base backup plus replayed pgbench WAL) are not built yet. A report, not a
//! test: it measures and prints, it asserts nothing.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backstop_events::{Actor, BackupKind, BackupMethod, BackupRequested, Trigger, uuid_v7};
use backstop_ops::backup::{BackupOptions, run_backup};
use backstop_ops::drill::{DrillPlan, DrillReport, run_drill};
use backstop_ops::{DataPath, SourceSpec};
use backstop_repo::{KeyAccessLog, LocalBackend, MasterKey, RepoParams, Repository};
use backstop_testkit::{Postgres, RecordingAppender};
use clap::Args;

use crate::shared::TRADING_SQL;

#[derive(Args)]
pub struct BenchDrillArgs {
    /// Rows in realtime_prices (the other tables scale from it).
    #[arg(long, default_value_t = 4_000_000)]
    rows: u64,
    /// Drills to run; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Parallel COPY connections of the restore.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// The RTO target the report compares with, in seconds.
    #[arg(long, default_value_t = 60)]
    target_secs: u64,
    /// Where the repository is written.
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: BenchDrillArgs) -> anyhow::Result<()> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("bench-drill")
        .tempdir_in(&parent)?;
    let production = Postgres::start()?;
    let staging = Postgres::start()?;
    production.create_db("trading")?;
    let sql = work.path().join("trading.sql");
    std::fs::write(&sql, TRADING_SQL)?;
    eprintln!("loading bench/trading.sql with rows={}", args.rows);
    production.psql_file("trading", &sql, &[("rows", &args.rows.to_string())])?;
    let size: String = production.psql("trading", "SELECT pg_database_size('trading')")?;
    let size_mb = size.trim().parse::<f64>().unwrap_or(0.0) / 1e6;

    let repo = Repository::init(
        Arc::new(LocalBackend::new(work.path().join("repo"))?),
        &MasterKey::from_bytes([7; 64]),
        RepoParams::default(),
        Arc::new(KeyAccessLog::new()),
    )
    .await?;
    let dp = DataPath {
        repo,
        appender: Arc::new(RecordingAppender::new()),
        sources: vec![SourceSpec::postgres(
            "trading",
            production.conninfo("trading"),
            2,
        )],
    };
    let request = BackupRequested {
        backup_id: uuid_v7(),
        source: "trading".into(),
        kind: BackupKind::Full,
        method: BackupMethod::Logical,
        trigger: Trigger::Manual,
        attempt: 1,
    };
    let clock = Instant::now();
    run_backup(
        &dp,
        &request,
        chrono::Utc::now(),
        &Actor::operator("bench"),
        None,
        &BackupOptions::default(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e.chain()))?;
    eprintln!("backup taken in {:.1} s", clock.elapsed().as_secs_f64());
    let verified = HashSet::from([request.backup_id]);
    let plan = DrillPlan {
        source: "trading".into(),
        staging: staging.conninfo("drill"),
        rto_target: Duration::from_secs(args.target_secs),
        rpo: Duration::from_secs(86_400),
        endpoints: Vec::new(),
        jobs: args.jobs,
        operator: "bench".into(),
        method: backstop_ops::drill::DrillMethod::Logical,
        physical: None,
    };
    let mut runs: Vec<DrillReport> = Vec::new();
    for i in 0..args.runs.max(1) {
        let r = run_drill(&dp, &plan, Some(&verified))
            .await
            .map_err(|e| anyhow::anyhow!(e.chain()))?;
        eprintln!("drill {}: {} ms, passed {}", i + 1, r.rto_ms, r.passed);
        runs.push(r);
    }
    runs.sort_by_key(|r| r.rto_ms);
    let median = runs.swap_remove(runs.len() / 2);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&median)?);
        return Ok(());
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "backstop bench drill: logical, rows={} ({size_mb:.0} MB database), median of {} drills, {} cores, load average {}",
        args.rows,
        args.runs.max(1),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("{:<10} {:>10} {:>6}", "phase", "ms", "share");
    for p in &median.phases {
        println!(
            "{:<10} {:>10} {:>5.0}%",
            p.name,
            p.ms,
            if median.rto_ms == 0 {
                0.0
            } else {
                p.ms as f64 * 100.0 / median.rto_ms as f64
            }
        );
    }
    println!(
        "RTO {} ms against a target of {} ms: {}",
        median.rto_ms,
        args.target_secs * 1000,
        if median.passed { "met" } else { "NOT met" }
    );
    if !median.reason.is_empty() {
        println!("reason: {}", median.reason);
    }
    for r in &median.recommendations {
        println!("- {r}");
    }
    println!("physical drill (base backup + pgbench WAL replay): not built yet");
    Ok(())
}
