//! `backstop bench drill`: the end-to-end RTO of a DR drill (backstop_ops::drill, in-process)
//! on `bench/trading.sql` at `--rows` rows, phase by phase (fetch, restore, replay, checks). One
//! PostgreSQL 15 is the production source, another the staging server; the repository is a
//! directory on local disk (`--dir`, default the temporary directory). The backup is taken once;
//! each of `--runs` drills restores it anew and the median run is reported.
//!
//! The physical variant (`--method physical` or `both`, the default) goes through the `backstop`
//! binary as an operator would: a PostgreSQL 15 loaded the same way archives its WAL with
//! `backstop wal-push` into a local repository; `pgbench -i` (scale `--pgbench-scale`), a base
//! backup (`backstop backup --physical`), then `--pgbench-seconds` of pgbench load (the issue's
//! figure: 600 s), whose WAL is archived; each run is `backstop drill --method physical`: the
//! base backup laid out, a throwaway server replaying all that WAL, the checks. Its report says
//! how much WAL was replayed. A report, not a test: it measures and prints, it asserts nothing.
//! The machine is shared: the load average is printed with the figures.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backstop_events::{Actor, BackupKind, BackupMethod, BackupRequested, Trigger, uuid_v7};
use backstop_ops::backup::{BackupOptions, run_backup};
use backstop_ops::drill::{DrillPlan, DrillReport, run_drill};
use backstop_ops::{DataPath, SourceSpec};
use backstop_repo::{KeyAccessLog, LocalBackend, MasterKey, RepoParams, Repository};
use backstop_testkit::{Postgres, PostgresOptions, RecordingAppender, give_to_server_user};
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
    /// Which drills: logical, physical or both.
    #[arg(long, default_value = "both", value_parser = ["logical", "physical", "both"])]
    method: String,
    /// Seconds of pgbench load after the base backup: the WAL a physical drill replays.
    #[arg(long, default_value_t = 600)]
    pgbench_seconds: u64,
    /// pgbench's scale (its database is part of the cluster a physical drill restores).
    #[arg(long, default_value_t = 10)]
    pgbench_scale: u32,
}

pub async fn run(args: BenchDrillArgs, backstop: Option<&Path>) -> anyhow::Result<()> {
    let mut out = Vec::new();
    if args.method != "physical" {
        out.push(logical(&args).await?);
    }
    if args.method != "logical" {
        let backstop = crate::shared::backstop_binary(backstop)?;
        out.push(physical(&args, &backstop)?);
    }
    if args.json {
        let v: serde_json::Map<String, serde_json::Value> = out
            .iter()
            .map(|(label, r)| Ok((label.clone(), serde_json::to_value(r)?)))
            .collect::<anyhow::Result<_>>()?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for (label, r) in &out {
        print_report(&args, label, r);
    }
    Ok(())
}

/// The logical drills: `(label, median report)`.
async fn logical(args: &BenchDrillArgs) -> anyhow::Result<(String, DrillReport)> {
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
    Ok((
        format!("logical, rows={} ({size_mb:.0} MB database)", args.rows),
        median(runs),
    ))
}

fn median(mut runs: Vec<DrillReport>) -> DrillReport {
    runs.sort_by_key(|r| r.rto_ms);
    runs.swap_remove(runs.len() / 2)
}

fn print_report(args: &BenchDrillArgs, label: &str, median: &DrillReport) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "backstop bench drill: {label}, median of {} drills, {} cores, load average {}",
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
    println!();
}

/// Runs a command to its end; its stderr in the error when it fails.
fn checked(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("{what}: cannot run: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The physical drills (see the module docs): `(label, median report)`.
fn physical(args: &BenchDrillArgs, backstop: &Path) -> anyhow::Result<(String, DrillReport)> {
    // Everything in it is reached by PostgreSQL's user too (work_dir makes it 0755).
    let work = crate::shared::work_dir(args.dir.as_deref(), "backstop-bench-drill-physical-")?;
    let w = work.path();
    let config = w.join("backstop.toml");
    let bs = |a: &[&str]| {
        let mut c = Command::new(backstop);
        c.arg("--config").arg(&config).args(a);
        c.env("BACKSTOP_LOG", "warn")
            .env_remove("BACKSTOP_MASTER_KEY");
        c
    };
    let mut pg = Postgres::start_with(
        PostgresOptions::new()
            .in_dir(w)
            .conf("shared_buffers = 256MB")
            .conf("max_wal_size = 4GB")
            .autovacuum_off()
            .conf("archive_mode = on")
            .conf(format!(
                "archive_command = '{} --config {} wal-push --source trading %p'",
                backstop.display(),
                config.display()
            )),
    )?;
    pg.set_command_timeout(Duration::from_secs(6 * 3600));
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n[[sources]]\nname = \"trading\"\npostgres = \"{}\"\n",
            w.join("data"),
            w.join("repo"),
            w.join("master.key"),
            pg.conninfo("trading"),
        ),
    )?;
    checked(
        bs(&[
            "init",
            "--generate-key",
            w.join("master.key").to_str().unwrap_or_default(),
        ]),
        "backstop init",
    )?;
    give_to_server_user(w)?;
    pg.create_db("trading")?;
    let sql = w.join("trading.sql");
    std::fs::write(&sql, TRADING_SQL)?;
    eprintln!(
        "physical: loading bench/trading.sql with rows={}",
        args.rows
    );
    pg.psql_file("trading", &sql, &[("rows", &args.rows.to_string())])?;
    pg.create_db("pgbench")?;
    let scale = args.pgbench_scale.max(1).to_string();
    checked(
        {
            let mut c = pg.client("pgbench");
            c.args(["-i", "-q", "-s", &scale, "pgbench"]);
            c
        },
        "pgbench -i",
    )?;
    pg.psql("postgres", "CHECKPOINT")?;
    let clock = Instant::now();
    checked(
        bs(&["backup", "--source", "trading", "--physical"]),
        "backstop backup --physical",
    )?;
    eprintln!(
        "physical: base backup taken in {:.1} s",
        clock.elapsed().as_secs_f64()
    );
    let before = pg.psql("postgres", "SELECT pg_current_wal_lsn()")?;
    eprintln!("physical: {} s of pgbench", args.pgbench_seconds);
    checked(
        {
            let mut c = pg.client("pgbench");
            c.args([
                "-n",
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                &args.pgbench_seconds.max(1).to_string(),
                "pgbench",
            ]);
            c
        },
        "pgbench",
    )?;
    let wal_bytes: String = pg.psql(
        "postgres",
        &format!(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{}')::bigint",
            before.trim()
        ),
    )?;
    let wal_mb = wal_bytes.trim().parse::<f64>().unwrap_or(0.0) / 1e6;
    // Everything written is archived before the drills: they replay it all.
    let last = pg.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    while pg
        .psql(
            "postgres",
            "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
        )?
        .trim()
        < last.trim()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "WAL {last} was not archived within an hour"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let size: String = pg.psql(
        "postgres",
        "SELECT sum(pg_database_size(datname))::bigint FROM pg_database",
    )?;
    let size_mb = size.trim().parse::<f64>().unwrap_or(0.0) / 1e6;
    let reports = w.join("reports");
    let mut runs = Vec::new();
    for i in 0..args.runs.max(1) {
        let target = format!("{}s", args.target_secs);
        let out = bs(&[
            "drill",
            "--source",
            "trading",
            "--method",
            "physical",
            "--allow-unverified",
            "--rto-target",
            &target,
            "--rpo",
            "24h",
            "--report-dir",
            reports.to_str().unwrap_or_default(),
        ])
        .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("reports: "))
            .and_then(|p| p.strip_suffix(".{json,md,html}"))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "backstop drill wrote no report: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        let r: DrillReport = serde_json::from_str(&std::fs::read_to_string(format!("{id}.json"))?)?;
        eprintln!(
            "physical drill {}: {} ms, passed {}",
            i + 1,
            r.rto_ms,
            r.passed
        );
        runs.push(r);
    }
    drop(pg);
    Ok((
        format!(
            "physical, rows={} ({size_mb:.0} MB cluster; {} s of pgbench at scale {scale}: {wal_mb:.0} MB of WAL to replay)",
            args.rows, args.pgbench_seconds
        ),
        median(runs),
    ))
}
