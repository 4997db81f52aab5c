//! `backstop bench backup`: Backstop's logical backups side by side with `pg_dump` and restic, on
//! the trading dataset, in one run. A report: it measures and prints, it asserts nothing.
//!
//! What one invocation does:
//! 1. Starts a throwaway PostgreSQL 15 in the working directory through the testkit (as the
//!    `postgres` system user when run as root: PostgreSQL refuses root) with `shared_buffers =
//!    256MB`, `max_wal_size = 4GB`, `maintenance_work_mem = 256MB` and autovacuum off, loads
//!    `bench/trading.sql` with `--rows` rows (compiled into the binary, so the bench needs no
//!    checkout), then `VACUUM ANALYZE`. With `garage` among `--tools`, also starts a throwaway
//!    single-node Garage through the testkit, storing blocks uncompressed (`compression_level =
//!    "none"`, as a store of encrypted backups is configured: Garage's default zstd pass over
//!    sealed, incompressible objects only burns the CPU the machine shares with the tools
//!    measured).
//! 2. Per run (`--runs`), on a fresh copy of the loaded database (`CREATE DATABASE ... TEMPLATE`,
//!    so every run starts from the same bytes), in this order:
//!    `pg_dump -Fd -j2 -Z6`; `pg_dump -Fc -Z0` (the floor, and the file the restore reference
//!    restores); restic backing up `pg_dump -Fc -Z0` from standard input into a fresh restic
//!    repository; Backstop into a fresh local repository and into a fresh Garage prefix; then
//!    `bench/churn.sql`; the second backups (restic, Backstop incremental); then the restores,
//!    each into a new empty database: `pg_restore -j2` of the plain dump, and Backstop's full
//!    backup (the same data) from each repository.
//! 3. Prints, per tool, the median of each figure over the runs, and the ratios the issue's
//!    targets are stated in (against restic and against `pg_restore -j2`).
//!
//! How it measures:
//! - Every tool is a child process of this one (Backstop is the `backstop` binary, see main.rs),
//!   timed from spawn to exit; its peak memory is the child's maximum resident set size from
//!   `wait4` (it includes the child's own reaped children, e.g. `pg_dump -j2`'s workers). For the
//!   restic pipeline, the time is until both ends exit and the memory is restic's.
//! - Stored bytes: the apparent size of every file under the repository or dump directory; for
//!   Garage, the sizes of the objects listed under the run's prefix (what the bucket bills). A
//!   second backup "adds" the difference before and after it.
//! - Before each measured step the server checkpoints and the page cache is flushed (`sync`),
//!   so one step's writeback does not land in the next one's time.
//! - CPU seconds: the tool's own (user + system, from `wait4`) plus those of the PostgreSQL
//!   backends that served it (the postmaster's own and its reaped children's account, read from
//!   /proc before and after; autovacuum is off so nothing else lands there). Wall time on a shared
//!   2-core machine swings with whatever else runs; CPU seconds hardly do, so the report gives
//!   both. Garage's own CPU is recorded separately (`store_cpu_secs`) and left out of the total.
//! - The server runs with `fsync = off` and `synchronous_commit = off` (a throwaway, as in the
//!   tests) unless `--fsync`; every tool restores into that same server, so the ratios compare
//!   like with like.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backstop_testkit::{Garage, GarageOptions, Postgres, PostgresOptions};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::shared::{CHURN_SQL, TRADING_SQL, dir_bytes, loadavg, proc_cpu_secs, wait_rusage};

/// The bucket the Garage repositories live in (one prefix per run).
const GARAGE_BUCKET: &str = "bench";
/// psql runs that load or churn the dataset may take long at full size.
const LOAD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
const RESTIC_PASSWORD: &str = "backstop-bench";

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchTool {
    /// `pg_dump -Fd -j2 -Z6` and `pg_dump -Fc -Z0`, and the reference restore: `pg_restore -j2`
    /// of the latter.
    Pgdump,
    /// restic 0.14 backing up `pg_dump -Fc -Z0` from standard input.
    Restic,
    /// Backstop into a local directory.
    Local,
    /// Backstop into a throwaway Garage (S3).
    Garage,
}

#[derive(Args)]
pub struct BenchBackupArgs {
    /// Rows in realtime_prices (the other tables scale from it).
    #[arg(long, default_value_t = 4_000_000)]
    rows: u64,
    /// Runs; the report gives the median of each figure.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// What to measure (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "pgdump,restic,local,garage"
    )]
    tools: Vec<BenchTool>,
    /// Parallel COPY jobs of Backstop's backups and restores.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Brotli quality of the Backstop repositories (default: the repository default).
    #[arg(long)]
    brotli_quality: Option<u32>,
    /// Average chunk size in KiB of the Backstop repositories (default: the repository default).
    #[arg(long)]
    chunk_avg_kib: Option<usize>,
    /// Skip the restores.
    #[arg(long)]
    no_restore: bool,
    /// Run the throwaway PostgreSQL durably (fsync and synchronous_commit on, as a production
    /// restore target would be) instead of with both off.
    #[arg(long)]
    fsync: bool,
    /// Parent of the temporary working directory (default: the system's temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the working directory (and print where it is) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// Print every run's figures and the medians as JSON.
    #[arg(long)]
    json: bool,
}

/// One measured step.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Sample {
    /// Wall time, spawn to exit.
    pub(crate) secs: f64,
    /// Peak resident set size of the tool, bytes.
    pub(crate) peak_bytes: u64,
    /// CPU time (user + system) of the tool's processes.
    cpu_secs: f64,
    /// CPU time of the PostgreSQL backends that served the step.
    server_cpu_secs: f64,
    /// CPU time of the Garage server during the step (Garage runs only): the object store's
    /// share of the machine, not counted in [`Sample::total_cpu`] (S3 is usually elsewhere).
    store_cpu_secs: f64,
}

impl Sample {
    /// CPU seconds the step cost the machine: the tool's and the server's. Unlike wall time it
    /// barely moves when other work shares the cores.
    fn total_cpu(&self) -> f64 {
        self.cpu_secs + self.server_cpu_secs
    }
}

/// One tool's figures in one run; `None` where the tool has no such figure.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ToolRun {
    pub(crate) full: Option<Sample>,
    pub(crate) stored_bytes: Option<u64>,
    pub(crate) second: Option<Sample>,
    pub(crate) added_bytes: Option<u64>,
    pub(crate) restore: Option<Sample>,
}

impl ToolRun {
    /// The highest peak memory over the tool's steps.
    pub(crate) fn peak_bytes(&self) -> Option<u64> {
        [self.full, self.second, self.restore]
            .iter()
            .flatten()
            .map(|s| s.peak_bytes)
            .max()
    }
}

const ROWS: [&str; 6] = [
    "pg_dump -Fd -j2 -Z6",
    "pg_dump -Fc -Z0 (floor)",
    "restic (pg_dump -Fc -Z0 | --stdin)",
    "backstop -> local",
    "backstop -> garage",
    "pg_restore -j2 (plain -Fc -Z0)",
];
const PG_DUMP_FD: usize = 0;
const PG_DUMP_FC: usize = 1;
const RESTIC: usize = 2;
pub(crate) const BS_LOCAL: usize = 3;
const BS_GARAGE: usize = 4;
const PG_RESTORE: usize = 5;

#[derive(Serialize)]
pub(crate) struct Report {
    rows: u64,
    runs: usize,
    cores: usize,
    pub(crate) database_bytes: u64,
    plain_dump_bytes: Option<u64>,
    load_secs: f64,
    brotli_quality: Option<u32>,
    chunk_avg_kib: Option<usize>,
    jobs: usize,
    fsync: bool,
    loadavg_before: String,
    loadavg_after: String,
    tools: Vec<&'static str>,
    per_run: Vec<Vec<ToolRun>>,
    pub(crate) median: Vec<ToolRun>,
}

impl BenchBackupArgs {
    /// Backstop's logical backups and restores alone (a local repository, no peers and no
    /// reference restore) at `rows`, as `backstop bench scale` measures them.
    pub(crate) fn backstop_only(
        rows: u64,
        runs: usize,
        jobs: usize,
        work_dir: Option<PathBuf>,
    ) -> Self {
        BenchBackupArgs {
            rows,
            runs,
            tools: vec![BenchTool::Local],
            jobs,
            brotli_quality: None,
            chunk_avg_kib: None,
            no_restore: false,
            fsync: false,
            work_dir,
            keep: false,
            json: false,
        }
    }
}

pub async fn run(args: BenchBackupArgs, backstop: &Path) -> anyhow::Result<()> {
    let loadavg_before = loadavg();
    let work = crate::shared::work_dir(args.work_dir.as_deref(), "backstop-bench-")?;
    let dir = work.path().to_path_buf();
    let result = measure_in(&args, backstop, &dir, loadavg_before, !args.json).await;
    if args.keep {
        let kept = work.keep();
        eprintln!("working directory kept: {}", kept.display());
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Measures as [`run`] does, in a fresh working directory (removed afterwards), and returns the
/// report without printing it.
pub(crate) async fn measure(args: &BenchBackupArgs, backstop: &Path) -> anyhow::Result<Report> {
    let loadavg_before = loadavg();
    let work = crate::shared::work_dir(args.work_dir.as_deref(), "backstop-bench-")?;
    measure_in(args, backstop, work.path(), loadavg_before, false).await
}

/// The runs; each run's table is printed as it ends when `print_runs`.
async fn measure_in(
    args: &BenchBackupArgs,
    backstop: &Path,
    dir: &Path,
    loadavg_before: String,
    print_runs: bool,
) -> anyhow::Result<Report> {
    let has = |t: BenchTool| args.tools.contains(&t);
    eprintln!(
        "starting PostgreSQL 15{} in {}",
        if has(BenchTool::Garage) {
            " and Garage"
        } else {
            ""
        },
        dir.display()
    );
    let mut options = PostgresOptions::new()
        .in_dir(dir)
        .conf("shared_buffers = 256MB")
        .conf("max_connections = 50")
        .conf("max_wal_size = 4GB")
        .conf("maintenance_work_mem = 256MB")
        .autovacuum_off();
    if args.fsync {
        options = options.durable();
    }
    let mut pg = Postgres::start_with(options).context("starting PostgreSQL 15")?;
    pg.set_command_timeout(LOAD_TIMEOUT);
    let garage =
        if has(BenchTool::Garage) {
            let options = GarageOptions::new()
                .bucket(GARAGE_BUCKET)
                .uncompressed()
                .in_dir(dir);
            Some(Garage::start_with(options).context(
                "starting Garage for the garage runs (or leave `garage` out of --tools)",
            )?)
        } else {
            None
        };
    let restic = if has(BenchTool::Restic) {
        Some(backstop_testkit::require_tool("restic")?)
    } else {
        None
    };

    // 1. Load.
    eprintln!("loading bench/trading.sql with rows={}", args.rows);
    let t = Instant::now();
    pg.psql("postgres", "CREATE DATABASE bench_source")?;
    let sql = dir.join("trading.sql");
    std::fs::write(&sql, TRADING_SQL)?;
    let churn = dir.join("churn.sql");
    std::fs::write(&churn, CHURN_SQL)?;
    pg.psql_file("bench_source", &sql, &[("rows", &args.rows.to_string())])?;
    pg.psql("bench_source", "VACUUM ANALYZE")?;
    let load_secs = t.elapsed().as_secs_f64();
    let database_bytes: u64 = pg
        .psql(
            "bench_source",
            "SELECT pg_database_size(current_database())",
        )?
        .trim()
        .parse()
        .context("reading the database size")?;
    eprintln!(
        "loaded in {load_secs:.0} s: {} database",
        crate::shared::human(database_bytes)
    );

    // 2. Runs.
    let mut per_run = Vec::new();
    let mut plain_dump_bytes = None;
    for run in 0..args.runs.max(1) {
        eprintln!("run {} of {}", run + 1, args.runs.max(1));
        let ctx = RunCtx {
            args,
            backstop,
            pg: &pg,
            garage: garage.as_ref(),
            restic: restic.as_deref(),
            dir: dir.join(format!("run{run}")),
            db: format!("run{run}"),
            churn: churn.clone(),
        };
        std::fs::create_dir_all(&ctx.dir)?;
        pg.psql(
            "postgres",
            &format!(
                "CREATE DATABASE {} TEMPLATE bench_source STRATEGY FILE_COPY",
                ctx.db
            ),
        )?;
        let (figures, plain) = ctx.measure().await?;
        plain_dump_bytes = plain.or(plain_dump_bytes);
        pg.psql("postgres", &format!("DROP DATABASE {}", ctx.db))?;
        let _ = std::fs::remove_dir_all(&ctx.dir);
        if print_runs {
            print_table(&format!("run {}", run + 1), &figures, false);
        }
        per_run.push(figures);
    }
    let median = medians(&per_run);
    let report = Report {
        rows: args.rows,
        runs: per_run.len(),
        cores: crate::shared::cores(),
        database_bytes,
        plain_dump_bytes,
        load_secs,
        brotli_quality: args.brotli_quality,
        chunk_avg_kib: args.chunk_avg_kib,
        jobs: args.jobs,
        fsync: args.fsync,
        loadavg_before,
        loadavg_after: loadavg(),
        tools: ROWS.to_vec(),
        per_run,
        median,
    };
    drop(garage);
    drop(pg);
    Ok(report)
}

struct RunCtx<'a> {
    args: &'a BenchBackupArgs,
    backstop: &'a Path,
    pg: &'a Postgres,
    garage: Option<&'a Garage>,
    restic: Option<&'a Path>,
    dir: PathBuf,
    db: String,
    churn: PathBuf,
}

/// A Backstop repository of one run.
struct BsRepo {
    label: &'static str,
    config: PathBuf,
    data_dir: PathBuf,
    key: PathBuf,
    location: String,
}

impl RunCtx<'_> {
    fn has(&self, t: BenchTool) -> bool {
        self.args.tools.contains(&t)
    }

    /// Before a measured step: checkpoint and flush dirty pages, so that the step is timed on
    /// its own; returns the servers' CPU times so far (PostgreSQL, Garage).
    fn begin(&self) -> anyhow::Result<(f64, f64)> {
        self.pg.psql("postgres", "CHECKPOINT")?;
        let _ = Command::new("sync").status();
        Ok((crate::shared::server_cpu(self.pg)?, self.store_cpu()))
    }

    /// After a measured step: adds the CPU time of the backends that served it, and Garage's.
    fn end(&self, before: (f64, f64), mut s: Sample) -> anyhow::Result<Sample> {
        // A backend's time reaches the postmaster's account once it has exited and been reaped,
        // a moment after its client disconnected.
        std::thread::sleep(Duration::from_millis(300));
        s.server_cpu_secs = (crate::shared::server_cpu(self.pg)? - before.0).max(0.0);
        s.store_cpu_secs = (self.store_cpu() - before.1).max(0.0);
        Ok(s)
    }

    fn store_cpu(&self) -> f64 {
        self.garage
            .and_then(Garage::pid)
            .and_then(|pid| proc_cpu_secs(pid, false).ok())
            .unwrap_or(0.0)
    }

    async fn measure(&self) -> anyhow::Result<(Vec<ToolRun>, Option<u64>)> {
        let mut f: Vec<ToolRun> = vec![ToolRun::default(); ROWS.len()];
        let url = self.pg.conninfo(&self.db);
        let restore = !self.args.no_restore;

        // Full backups.
        if self.has(BenchTool::Pgdump) {
            let mark = self.begin()?;
            let out = self.dir.join("fd");
            let s = self
                .pg
                .client("pg_dump")
                .args(["-Fd", "-j2", "-Z6", "-f"])
                .arg(&out)
                .arg(&self.db)
                .measured(&self.dir, "pg_dump -Fd")?;
            f[PG_DUMP_FD].full = Some(self.end(mark, s)?);
            f[PG_DUMP_FD].stored_bytes = Some(dir_bytes(&out)?);
            let _ = std::fs::remove_dir_all(&out);
        }
        let plain = self.dir.join("plain.dump");
        let mut plain_bytes = None;
        // The reference restore (pg_restore -j2 of this dump) belongs to the pg_dump tool.
        let reference = restore && self.has(BenchTool::Pgdump);
        if self.has(BenchTool::Pgdump) {
            let mark = self.begin()?;
            let s = self
                .pg
                .client("pg_dump")
                .args(["-Fc", "-Z0", "-f"])
                .arg(&plain)
                .arg(&self.db)
                .measured(&self.dir, "pg_dump -Fc -Z0")?;
            let s = self.end(mark, s)?;
            let bytes = std::fs::metadata(&plain)?.len();
            plain_bytes = Some(bytes);
            if self.has(BenchTool::Pgdump) {
                f[PG_DUMP_FC].full = Some(s);
                f[PG_DUMP_FC].stored_bytes = Some(bytes);
            }
        }
        let restic_repo = self.dir.join("restic");
        if let Some(restic) = self.restic {
            let init = Command::new(restic)
                .arg("-r")
                .arg(&restic_repo)
                .args(["init", "--quiet"])
                .env("RESTIC_PASSWORD", RESTIC_PASSWORD)
                .output()?;
            if !init.status.success() {
                bail!(
                    "restic init failed: {}",
                    String::from_utf8_lossy(&init.stderr)
                );
            }
            let mark = self.begin()?;
            let s = self.restic_backup(restic, &restic_repo)?;
            f[RESTIC].full = Some(self.end(mark, s)?);
            f[RESTIC].stored_bytes = Some(dir_bytes(&restic_repo)?);
        }
        let mut repos = Vec::new();
        if self.has(BenchTool::Local) {
            repos.push((BS_LOCAL, self.backstop_repo("local")?));
        }
        if self.has(BenchTool::Garage) {
            repos.push((BS_GARAGE, self.backstop_repo("garage")?));
        }
        let mut full_ids = Vec::new();
        for (row, repo) in &repos {
            let mark = self.begin()?;
            let (s, id) = self.backstop_backup(repo, &url, "full")?;
            f[*row].full = Some(self.end(mark, s)?);
            f[*row].stored_bytes = Some(self.repo_bytes(repo).await?);
            full_ids.push(id);
        }

        // A trading day's change, then the second backups.
        self.pg.psql_file(&self.db, &self.churn, &[])?;
        if let Some(restic) = self.restic {
            let before = dir_bytes(&restic_repo)?;
            let mark = self.begin()?;
            let s = self.restic_backup(restic, &restic_repo)?;
            f[RESTIC].second = Some(self.end(mark, s)?);
            f[RESTIC].added_bytes = Some(dir_bytes(&restic_repo)?.saturating_sub(before));
        }
        for (row, repo) in &repos {
            let before = self.repo_bytes(repo).await?;
            let mark = self.begin()?;
            let (s, _) = self.backstop_backup(repo, &url, "incremental")?;
            f[*row].second = Some(self.end(mark, s)?);
            f[*row].added_bytes = Some(self.repo_bytes(repo).await?.saturating_sub(before));
        }

        // Restores of the full backup's data, each into a new empty database.
        if reference {
            let target = format!("{}_pg_restore", self.db);
            self.pg
                .psql("postgres", &format!("CREATE DATABASE {target}"))?;
            let mark = self.begin()?;
            let s = self
                .pg
                .client("pg_restore")
                .args(["-j2", "-d", &target])
                .arg(&plain)
                .measured(&self.dir, "pg_restore -j2")?;
            f[PG_RESTORE].restore = Some(self.end(mark, s)?);
            self.pg
                .psql("postgres", &format!("DROP DATABASE {target}"))?;
        }
        if restore {
            for ((row, repo), id) in repos.iter().zip(&full_ids) {
                let target = format!("{}_{}", self.db, repo.label);
                self.pg
                    .psql("postgres", &format!("CREATE DATABASE {target}"))?;
                let mark = self.begin()?;
                let s = self
                    .backstop(repo)
                    .arg("restore")
                    .arg(id)
                    .args(["--to", &self.pg.conninfo(&target), "--jobs"])
                    .arg(self.args.jobs.to_string())
                    .stdout_to(&self.dir.join(format!("restore-{}.out", repo.label)))
                    .measured(&self.dir, &format!("backstop restore ({})", repo.label))?;
                f[*row].restore = Some(self.end(mark, s)?);
                self.pg
                    .psql("postgres", &format!("DROP DATABASE {target}"))?;
            }
        }
        let _ = std::fs::remove_file(&plain);
        Ok((f, plain_bytes))
    }

    /// `pg_dump -Fc -Z0 DB | restic backup --stdin`: time until both exit, restic's peak.
    fn restic_backup(&self, restic: &Path, repo: &Path) -> anyhow::Result<Sample> {
        let started = Instant::now();
        let mut dump = self
            .pg
            .client("pg_dump")
            .args(["-Fc", "-Z0"])
            .arg(&self.db)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting pg_dump")?;
        let pipe = dump
            .stdout
            .take()
            .context("pg_dump started without a stdout pipe")?;
        let log = self.dir.join("restic.log");
        let mut backup = Command::new(restic)
            .arg("-r")
            .arg(repo)
            .arg("--cache-dir")
            .arg(self.dir.join("restic-cache"))
            .args([
                "backup",
                "--quiet",
                "--stdin",
                "--stdin-filename",
                "trading.dump",
            ])
            .env("RESTIC_PASSWORD", RESTIC_PASSWORD)
            .stdin(Stdio::from(pipe))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting restic")?;
        let mut dump_err = dump.stderr.take();
        let restic_usage = wait_rusage(&mut backup)?;
        let dump_usage = wait_rusage(&mut dump)?;
        let (restic_status, restic_peak, restic_cpu) = (
            restic_usage.status,
            restic_usage.peak_bytes,
            restic_usage.cpu_secs,
        );
        let (dump_status, dump_cpu) = (dump_usage.status, dump_usage.cpu_secs);
        let secs = started.elapsed().as_secs_f64();
        if !dump_status.success() {
            let mut e = String::new();
            if let Some(err) = dump_err.as_mut() {
                let _ = err.read_to_string(&mut e);
            }
            bail!("pg_dump for restic failed ({dump_status}): {e}");
        }
        if !restic_status.success() {
            bail!(
                "restic backup failed ({restic_status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(Sample {
            secs,
            peak_bytes: restic_peak,
            cpu_secs: restic_cpu + dump_cpu,
            server_cpu_secs: 0.0,
            store_cpu_secs: 0.0,
        })
    }

    /// A fresh repository (`backstop init`) with its own data directory and config file.
    fn backstop_repo(&self, label: &'static str) -> anyhow::Result<BsRepo> {
        let base = self.dir.join(format!("backstop-{label}"));
        std::fs::create_dir_all(&base)?;
        let key = base.join("master.key");
        let mut config = String::from("[repository]\n");
        if let Some(q) = self.args.brotli_quality {
            config.push_str(&format!("brotli_quality = {q}\n"));
        }
        if let Some(k) = self.args.chunk_avg_kib {
            config.push_str(&format!("chunk_avg_kib = {k}\n"));
        }
        let location = match label {
            "garage" => {
                let g = self
                    .garage
                    .context("internal error: no Garage for the garage repository")?;
                config.push_str(&format!(
                    "endpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
                    g.endpoint(),
                    g.region(),
                    g.access_key(),
                    g.secret_key()
                ));
                format!("s3://{GARAGE_BUCKET}/{}", self.db)
            }
            _ => base.join("repo").display().to_string(),
        };
        let repo = BsRepo {
            label,
            config: base.join("backstop.toml"),
            data_dir: base.join("data"),
            key,
            location,
        };
        std::fs::write(&repo.config, config)?;
        let out = Command::new(self.backstop)
            .arg("--config")
            .arg(&repo.config)
            .arg("--data-dir")
            .arg(&repo.data_dir)
            .args(["init", "--repo", &repo.location, "--generate-key"])
            .arg(&repo.key)
            .env("BACKSTOP_LOG", "warn")
            .output()
            .with_context(|| format!("running {} init", self.backstop.display()))?;
        if !out.status.success() {
            bail!(
                "backstop init ({label}) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(repo)
    }

    /// `backstop` with the repository's config, data directory, location and key.
    fn backstop(&self, repo: &BsRepo) -> BsCommand {
        let mut c = Command::new(self.backstop);
        c.arg("--config")
            .arg(&repo.config)
            .arg("--data-dir")
            .arg(&repo.data_dir)
            .env("BACKSTOP_LOG", "warn");
        BsCommand {
            cmd: c,
            repo: repo.location.clone(),
            key: repo.key.clone(),
        }
    }

    fn backstop_backup(
        &self,
        repo: &BsRepo,
        url: &str,
        kind: &str,
    ) -> anyhow::Result<(Sample, String)> {
        let out = self
            .dir
            .join(format!("backstop-{}-{kind}.json", repo.label));
        let s = self
            .backstop(repo)
            .arg("backup")
            .args(["--pg", url, "--name", "main", "--json", "--kind", kind])
            .arg("--jobs")
            .arg(self.args.jobs.to_string())
            .stdout_to(&out)
            .measured(&self.dir, &format!("backstop backup ({})", repo.label))?;
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out)?)
            .context("backstop backup --json printed no JSON")?;
        let id = json
            .get("backup_id")
            .and_then(|v| v.as_str())
            .context("backstop backup --json printed no backup_id")?
            .to_string();
        Ok((s, id))
    }

    /// What the repository occupies: files under the directory, or objects under the prefix.
    async fn repo_bytes(&self, repo: &BsRepo) -> anyhow::Result<u64> {
        match self.garage {
            Some(g) if repo.location.starts_with("s3://") => {
                let loc = backstop_repo::Location::parse(&repo.location)?;
                let settings = backstop_repo::S3Settings {
                    endpoint: Some(g.endpoint()),
                    region: Some(g.region().into()),
                    access_key: Some(g.access_key().into()),
                    secret_key: Some(g.secret_key().into()),
                    path_style: true,
                    ..Default::default()
                };
                let backend = loc.open(Some(settings)).await?;
                Ok(backend.list("").await?.iter().map(|o| o.size).sum())
            }
            _ => dir_bytes(Path::new(&repo.location)),
        }
    }
}

/// A `backstop` command being assembled; `--repo` and `--master-key-file` go after the
/// subcommand's own arguments.
struct BsCommand {
    cmd: Command,
    repo: String,
    key: PathBuf,
}

impl BsCommand {
    fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.arg(a);
        self
    }
    fn args<const N: usize>(mut self, a: [&str; N]) -> Self {
        self.cmd.args(a);
        self
    }
    fn stdout_to(mut self, path: &Path) -> Self {
        match std::fs::File::create(path) {
            Ok(f) => {
                self.cmd.stdout(f);
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot create"),
        }
        self
    }
    fn measured(mut self, dir: &Path, what: &str) -> anyhow::Result<Sample> {
        self.cmd
            .args(["--repo", &self.repo, "--master-key-file"])
            .arg(&self.key);
        self.cmd.measured(dir, what)
    }
}

trait Measured {
    /// Runs to completion; fails with the tail of its standard error when it fails.
    fn measured(&mut self, dir: &Path, what: &str) -> anyhow::Result<Sample>;
}

impl Measured for Command {
    fn measured(&mut self, dir: &Path, what: &str) -> anyhow::Result<Sample> {
        let log = dir.join("step.log");
        self.stderr(std::fs::File::create(&log)?);
        let started = Instant::now();
        let mut child = self.spawn().with_context(|| format!("starting {what}"))?;
        let crate::shared::Usage {
            status,
            peak_bytes: peak,
            cpu_secs: cpu,
        } = wait_rusage(&mut child)?;
        let secs = started.elapsed().as_secs_f64();
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{what} failed ({status}):\n{}", tail.join("\n"));
        }
        Ok(Sample {
            secs,
            peak_bytes: peak,
            cpu_secs: cpu,
            server_cpu_secs: 0.0,
            store_cpu_secs: 0.0,
        })
    }
}

fn median_f(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn median_u(mut v: Vec<u64>) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    Some(v[v.len() / 2])
}

/// The median of each figure separately, per tool.
fn medians(runs: &[Vec<ToolRun>]) -> Vec<ToolRun> {
    let sample = |all: Vec<Sample>| -> Option<Sample> {
        let col = |g: fn(&Sample) -> f64| median_f(all.iter().map(g).collect());
        Some(Sample {
            secs: col(|s| s.secs)?,
            peak_bytes: median_u(all.iter().map(|s| s.peak_bytes).collect())?,
            cpu_secs: col(|s| s.cpu_secs)?,
            server_cpu_secs: col(|s| s.server_cpu_secs)?,
            store_cpu_secs: col(|s| s.store_cpu_secs)?,
        })
    };
    (0..ROWS.len())
        .map(|i| {
            let tool = || runs.iter().map(move |r| &r[i]);
            ToolRun {
                full: sample(tool().filter_map(|t| t.full).collect()),
                stored_bytes: median_u(tool().filter_map(|t| t.stored_bytes).collect()),
                second: sample(tool().filter_map(|t| t.second).collect()),
                added_bytes: median_u(tool().filter_map(|t| t.added_bytes).collect()),
                restore: sample(tool().filter_map(|t| t.restore).collect()),
            }
        })
        .collect()
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn cell(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

/// "wall/cpu" seconds of a step.
fn secs_cell(s: Option<Sample>) -> String {
    s.map(|s| format!("{:.2}/{:.1}", s.secs, s.total_cpu()))
        .unwrap_or_else(|| "-".into())
}

fn print_table(title: &str, f: &[ToolRun], with_ratios: bool) {
    println!("{title} (times: wall seconds / CPU seconds of the tool and its PostgreSQL backends)");
    print!(
        "  {:<36} {:>11} {:>9} {:>11} {:>8} {:>11} {:>7}",
        "", "full", "stored MB", "2nd", "2nd +MB", "restore", "peak MB"
    );
    if with_ratios {
        print!(
            " | {:>13} {:>9} {:>8} {:>13}",
            "time/restic", "st/restic", "+/restic", "rest/pg_rest"
        );
    }
    println!();
    let restic = &f[RESTIC];
    let pg_restore = &f[PG_RESTORE];
    let wall = |s: Option<Sample>| s.map(|s| s.secs);
    let cpu = |s: Option<Sample>| s.map(|s| s.total_cpu());
    let as_f = |v: Option<u64>| v.map(|v| v as f64);
    for (i, r) in f.iter().enumerate() {
        if r.full.is_none() && r.restore.is_none() {
            continue;
        }
        print!(
            "  {:<36} {:>11} {:>9} {:>11} {:>8} {:>11} {:>7}",
            ROWS[i],
            secs_cell(r.full),
            cell(r.stored_bytes.map(mb), 1),
            secs_cell(r.second),
            cell(r.added_bytes.map(mb), 2),
            secs_cell(r.restore),
            cell(r.peak_bytes().map(mb), 0),
        );
        if with_ratios && i != RESTIC && i != PG_RESTORE {
            let pair = |a: Option<f64>, b: Option<f64>| match a {
                Some(_) => format!("{}/{}", cell(a, 2), cell(b, 2)),
                None => "-".into(),
            };
            print!(
                " | {:>13} {:>9} {:>8} {:>13}",
                pair(
                    ratio(wall(r.full), wall(restic.full)),
                    ratio(cpu(r.full), cpu(restic.full))
                ),
                cell(ratio(as_f(r.stored_bytes), as_f(restic.stored_bytes)), 2),
                cell(ratio(as_f(r.added_bytes), as_f(restic.added_bytes)), 2),
                if r.restore.is_some() {
                    pair(
                        ratio(wall(r.restore), wall(pg_restore.restore)),
                        ratio(cpu(r.restore), cpu(pg_restore.restore)),
                    )
                } else {
                    "-".into()
                },
            );
        }
        println!();
    }
}

fn print_report(r: &Report) {
    println!();
    println!(
        "backstop bench backup: rows={} ({:.0} MB database{}), median of {} runs, {} cores, load average {} before, {} after",
        r.rows,
        mb(r.database_bytes),
        r.plain_dump_bytes
            .map(|b| format!(", {:.0} MB plain dump", mb(b)))
            .unwrap_or_default(),
        r.runs,
        r.cores,
        r.loadavg_before,
        r.loadavg_after
    );
    println!(
        "backstop: brotli quality {}, average chunk {}, {} COPY jobs; PostgreSQL 15 with {}, autovacuum=off (a throwaway; every restore targets it)",
        r.brotli_quality
            .map(|q| q.to_string())
            .unwrap_or_else(|| "default".into()),
        r.chunk_avg_kib
            .map(|k| format!("{k} KiB"))
            .unwrap_or_else(|| "default".into()),
        r.jobs,
        if r.fsync {
            "fsync=on"
        } else {
            "fsync=off, synchronous_commit=off"
        }
    );
    print_table("median", &r.median, true);
    let g = &r.median[BS_GARAGE];
    if g.full.is_some() {
        let store = |s: Option<Sample>| cell(s.map(|s| s.store_cpu_secs), 1);
        println!(
            "  (Garage's own CPU, not in the figures above: full {} s, 2nd {} s, restore {} s)",
            store(g.full),
            store(g.second),
            store(g.restore)
        );
    }
    let m = &r.median;
    let restic = &m[RESTIC];
    let pg_restore = &m[PG_RESTORE];
    println!("targets (wall time; CPU time in brackets, the steadier figure on a shared machine):");
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "not measured",
    };
    let le = |a: Option<f64>, b: Option<f64>, k: f64| a.zip(b).map(|(a, b)| a <= b * k);
    let as_f = |v: Option<u64>| v.map(|v| v as f64);
    let wall = |s: Option<Sample>| s.map(|s| s.secs);
    let cpu = |s: Option<Sample>| s.map(|s| s.total_cpu());
    for (row, name) in [(BS_LOCAL, "local"), (BS_GARAGE, "garage")] {
        let b = &m[row];
        if b.full.is_none() {
            continue;
        }
        println!(
            "  {name:<6} full time <= restic: {} [{}]; stored <= restic: {}; second adds <= restic: {}; restore <= 1.3x pg_restore -j2: {} [{}]; peak < 300 MB: {}",
            verdict(le(wall(b.full), wall(restic.full), 1.0)),
            verdict(le(cpu(b.full), cpu(restic.full), 1.0)),
            verdict(le(as_f(b.stored_bytes), as_f(restic.stored_bytes), 1.0)),
            verdict(le(as_f(b.added_bytes), as_f(restic.added_bytes), 1.0)),
            verdict(le(wall(b.restore), wall(pg_restore.restore), 1.3)),
            verdict(le(cpu(b.restore), cpu(pg_restore.restore), 1.3)),
            verdict(b.peak_bytes().map(|p| p < 300_000_000)),
        );
    }
}
