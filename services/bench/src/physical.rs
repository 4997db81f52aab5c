//! `backstop bench physical`: Backstop's physical backups and WAL archiving beside pgBackRest, in
//! one run, on one PostgreSQL 15 cluster loaded with `bench/trading.sql`. A report, not a test:
//! it measures and prints; it asserts nothing.
//!
//! What it measures, `--runs` times each (the report gives medians and Backstop/pgBackRest
//! ratios; the order of the two tools alternates between runs so neither always reads a warm
//! page cache):
//! 1. A full base backup into a fresh repository (wall time, bytes stored).
//! 2. `bench/churn.sql`, a CHECKPOINT, then a second base backup (pgBackRest `--type=incr`):
//!    time and bytes stored by that backup alone.
//! 3. A restore of the latest backup into an empty directory (laying out the files and the
//!    recovery settings; no replay: neither tool replays WAL itself).
//! 4. WAL archiving throughput under pgbench load: archiving is held (the `archive_command`
//!    fails) while pgbench builds a backlog of ready segments, then the tool's command is put
//!    back while pgbench keeps running, and the backlog's draining is timed: segments per second.
//! 5. WAL archive lag under sustained pgbench load (`--lag-seconds`): with the tool's command in
//!    place, the bench watches `pg_wal/archive_status` every 20 ms and times each segment from
//!    its `.ready` file appearing to its `.done` file (PostgreSQL writes that once the command
//!    returned success): p50, p99 and the largest, and the largest number of segments ready at
//!    once. A segment seen only as `.done` (archived between two looks) counts as 20 ms. When the
//!    load ends, the segment it was filling is closed and timed too.
//!
//! Each backup and restore is timed (wall clock) and charged CPU seconds: the tool's processes
//! and their children (`wait4`), plus the server backends that served them (the postmaster's
//! reaped children: `pg_basebackup`'s walsender). On a shared machine the CPU figure moves
//! less than the wall time; the report prints the load average before and after. The peak
//! memory row is the largest resident set size `wait4` gives for the tool's process (or any child
//! it reaped) over its backups and restore.
//!
//! `--tools backstop` (or `pgbackrest`) measures one tool alone; `backstop bench scale` uses
//! Backstop's base backups and restores from here.
//!
//! Set-up: the database is loaded, then `CHECKPOINT; VACUUM (FREEZE, ANALYZE); CHECKPOINT`
//! (a database at rest, its pages hinted and all-visible, as it is between nightly backups; see
//! `backstop-sources`' physical notes). `archive_command` runs a small script in the working
//! directory that pushes each segment to both archives during the backup runs (each tool's base
//! backups need their own archive), and to one tool at a time during the WAL runs. The cluster is
//! started through the testkit (`shared_buffers = 256MB`, `max_wal_size = 4GB`, autovacuum off,
//! `fsync = off` as in the tests). Backstop is the `backstop` binary (`wal-push`, `backup
//! --physical`, `restore --physical`; see main.rs for how it is found), with a local repository
//! of the default parameters; pgBackRest is Debian's 2.45 with `compress-type=zst`,
//! `compress-level=3`, `process-max=2`, `start-fast=y`, and asynchronous archiving
//! (`archive-async=y`, its recommended setting for high WAL volume). As root, PostgreSQL,
//! pgBackRest and the archive command run as the `postgres` user.
//!
//! Run the release builds: `cargo build --release -p backstop -p backstop-bench`, then
//! `target/release/backstop bench physical`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backstop_testkit::{Postgres, PostgresOptions, give_to_server_user, server_user_command};
use clap::Args;

use crate::shared::{CHURN_SQL, ChildGuard, TRADING_SQL, loadavg, wait_rusage};

/// psql runs that load the dataset may take long at full size.
const LOAD_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
const STANZA: &str = "bench";
const SOURCE: &str = "bench";
/// The archive script's name: pgBackRest refuses to back up unless `archive_command` contains
/// "pgbackrest".
const ARCHIVE_SCRIPT: &str = "archive-backstop-or-pgbackrest.sh";

#[derive(Args)]
pub struct BenchPhysicalArgs {
    /// Rows in realtime_prices (the other tables scale from it).
    #[arg(long, default_value_t = 4_000_000)]
    rows: u64,
    /// Runs of every measurement; the report gives medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// pgbench scale for the WAL runs.
    #[arg(long, default_value_t = 10)]
    pgbench_scale: u32,
    /// Seconds of pgbench load that build each WAL backlog.
    #[arg(long, default_value_t = 30)]
    backlog_seconds: u64,
    /// Parent of the temporary working directory (default: the system's temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the working directory (and print where it is).
    #[arg(long)]
    keep: bool,
    /// Seconds of sustained pgbench load in each archive-lag run (0: no lag runs).
    #[arg(long, default_value_t = 60)]
    lag_seconds: u64,
    /// Skip the WAL archiving runs (backlog and lag).
    #[arg(long)]
    no_wal: bool,
    /// What to measure (comma-separated): `backstop`, `pgbackrest` or both side by side.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "backstop,pgbackrest"
    )]
    tools: Vec<Tool>,
    /// Print every run's figures and the medians as JSON.
    #[arg(long)]
    json: bool,
}

impl BenchPhysicalArgs {
    /// Backstop's base backups and restores alone at `rows` (no WAL runs, no pgBackRest), as
    /// `backstop bench scale` measures them.
    pub(crate) fn backstop_only(rows: u64, runs: usize, work_dir: Option<PathBuf>) -> Self {
        BenchPhysicalArgs {
            rows,
            runs,
            pgbench_scale: 10,
            backlog_seconds: 0,
            work_dir,
            keep: false,
            lag_seconds: 0,
            no_wal: true,
            tools: vec![Tool::Backstop],
            json: false,
        }
    }

    fn has(&self, tool: Tool) -> bool {
        self.tools.contains(&tool)
    }

    /// The tools in the order run `r` measures them: alternating, so neither always reads a warm
    /// page cache.
    fn order(&self, r: usize) -> Vec<Tool> {
        let both = if r.is_multiple_of(2) {
            [Tool::Backstop, Tool::Pgbackrest]
        } else {
            [Tool::Pgbackrest, Tool::Backstop]
        };
        both.into_iter().filter(|t| self.has(*t)).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Tool {
    Backstop,
    Pgbackrest,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Backstop => "backstop",
            Tool::Pgbackrest => "pgbackrest",
        }
    }
}

/// One tool's figures in one run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub(crate) struct Figures {
    pub(crate) full_secs: Option<f64>,
    /// CPU seconds: the tool's processes and the server backends serving it (a figure less
    /// sensitive than wall time to what else the machine runs).
    pub(crate) full_cpu: Option<f64>,
    pub(crate) full_bytes: Option<u64>,
    /// Peak resident set size of the tool's process (and of any child it reaped), bytes.
    pub(crate) full_peak_bytes: Option<u64>,
    pub(crate) incr_secs: Option<f64>,
    pub(crate) incr_cpu: Option<f64>,
    pub(crate) incr_bytes: Option<u64>,
    pub(crate) incr_peak_bytes: Option<u64>,
    pub(crate) restore_secs: Option<f64>,
    pub(crate) restore_cpu: Option<f64>,
    pub(crate) restore_peak_bytes: Option<u64>,
    pub(crate) wal_segments: Option<u64>,
    pub(crate) wal_secs: Option<f64>,
    pub(crate) wal_segments_per_sec: Option<f64>,
    /// Segments that became ready during the sustained-load run.
    pub(crate) lag_segments: Option<u64>,
    /// From `.ready` to `.done`, milliseconds (see [`Lag`]).
    pub(crate) lag_p50_ms: Option<f64>,
    pub(crate) lag_p99_ms: Option<f64>,
    pub(crate) lag_max_ms: Option<f64>,
    /// The most segments ready and not yet archived at once.
    pub(crate) lag_peak_backlog: Option<u64>,
}

#[derive(Debug, serde::Serialize)]
pub(crate) struct Report {
    rows: u64,
    pub(crate) database_bytes: u64,
    cores: usize,
    /// `None` when pgBackRest was not among the tools.
    pgbackrest_version: Option<String>,
    loadavg: String,
    runs: Vec<[(Tool, Figures); 2]>,
    pub(crate) backstop: Figures,
    pgbackrest: Figures,
}

pub async fn run(args: BenchPhysicalArgs, backstop: &Path) -> anyhow::Result<()> {
    // Everything in it is reached by PostgreSQL's user too (work_dir makes it 0755).
    let work = crate::shared::work_dir(args.work_dir.as_deref(), "backstop-bench-physical-")?;
    let result = run_in(&args, backstop, work.path()).await;
    if args.keep {
        let kept = work.keep();
        eprintln!("working directory kept: {}", kept.display());
    }
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &args);
    }
    Ok(())
}

/// Measures as [`run`] does, in a fresh working directory (removed afterwards), and returns the
/// report without printing it.
pub(crate) async fn measure(args: &BenchPhysicalArgs, backstop: &Path) -> anyhow::Result<Report> {
    let work = crate::shared::work_dir(args.work_dir.as_deref(), "backstop-bench-physical-")?;
    run_in(args, backstop, work.path()).await
}

async fn run_in(args: &BenchPhysicalArgs, backstop: &Path, w: &Path) -> anyhow::Result<Report> {
    let loadavg_before = loadavg();
    if args.tools.is_empty() {
        bail!("--tools names nothing to measure: give backstop, pgbackrest or both");
    }
    let (pgbackrest, pgbackrest_version) = if args.has(Tool::Pgbackrest) {
        let path = backstop_testkit::require_tool("pgbackrest")?;
        let version = String::from_utf8_lossy(
            &Command::new(&path)
                .arg("version")
                .output()
                .context("running pgbackrest version")?
                .stdout,
        )
        .trim()
        .to_string();
        (Some(path), Some(version))
    } else {
        (None, None)
    };
    eprintln!("starting PostgreSQL 15 in {}", w.display());
    let bench = Bench {
        w: w.to_path_buf(),
        exe: backstop.to_path_buf(),
        pgbackrest,
        pg: start_pg(w)?,
    };

    eprintln!("loading bench/trading.sql with rows={}", args.rows);
    let t = Instant::now();
    let sql = w.join("trading.sql");
    std::fs::write(&sql, TRADING_SQL)?;
    let churn = w.join("churn.sql");
    std::fs::write(&churn, CHURN_SQL)?;
    bench.psql("postgres", "CREATE DATABASE trading")?;
    bench.psql_file("trading", &sql, &[("rows", &args.rows.to_string())])?;
    // A database at rest: commits flushed (hint bits are set only for flushed commits), then
    // every page hinted, frozen and all-visible, then flushed again.
    bench.psql("trading", "CHECKPOINT")?;
    bench.psql("trading", "VACUUM (FREEZE, ANALYZE)")?;
    bench.psql("trading", "CHECKPOINT")?;
    let database_bytes: u64 = bench
        .psql("trading", "SELECT pg_database_size('trading')")?
        .trim()
        .parse()
        .unwrap_or(0);
    eprintln!(
        "loaded in {:.0} s: trading is {:.0} MiB",
        t.elapsed().as_secs_f64(),
        mib(database_bytes)
    );

    // Each tool's base backups need their own archive: the segments go to every tool measured.
    let archive_all = match args.tools.as_slice() {
        [only] => ArchiveMode::Only(*only),
        _ => ArchiveMode::Both,
    };
    let mut runs = Vec::new();
    for r in 0..args.runs.max(1) {
        eprintln!("run {} of {}: base backups and restores", r + 1, args.runs);
        let order = args.order(r);
        let site = bench.new_site(&format!("run{r}"))?;
        bench.set_archive(&site, archive_all)?;
        if args.has(Tool::Pgbackrest) {
            bench.pgbackrest_cmd(&site, &["stanza-create"])?;
        }
        // Whatever piled up while archiving was held is archived before anything is timed.
        bench.drain_archive().await?;
        let mut figs = [Figures::default(), Figures::default()];
        for &tool in &order {
            let i = tool as usize;
            let (Measured { secs, cpu, peak }, bytes) = bench.full(&site, tool)?;
            eprintln!(
                "  {:<10} full base backup: {secs:.1} s ({cpu:.1} s CPU), {:.1} MiB stored",
                tool.name(),
                mib(bytes)
            );
            figs[i].full_secs = Some(secs);
            figs[i].full_cpu = Some(cpu);
            figs[i].full_bytes = Some(bytes);
            figs[i].full_peak_bytes = Some(peak);
        }
        bench.psql_file("trading", &churn, &[])?;
        bench.psql("trading", "CHECKPOINT")?;
        for &tool in &order {
            let i = tool as usize;
            let (Measured { secs, cpu, peak }, bytes) = bench.incr(&site, tool)?;
            eprintln!(
                "  {:<10} second base backup after churn.sql: {secs:.1} s ({cpu:.1} s CPU), {:.1} MiB stored",
                tool.name(),
                mib(bytes)
            );
            figs[i].incr_secs = Some(secs);
            figs[i].incr_cpu = Some(cpu);
            figs[i].incr_bytes = Some(bytes);
            figs[i].incr_peak_bytes = Some(peak);
        }
        for &tool in &order {
            let i = tool as usize;
            let Measured { secs, cpu, peak } = bench.restore(&site, tool)?;
            eprintln!(
                "  {:<10} restore: {secs:.1} s ({cpu:.1} s CPU)",
                tool.name()
            );
            figs[i].restore_secs = Some(secs);
            figs[i].restore_cpu = Some(cpu);
            figs[i].restore_peak_bytes = Some(peak);
        }
        bench.set_archive(&site, ArchiveMode::Hold)?;
        let _ = std::fs::remove_dir_all(&site.dir);
        runs.push(figs);
    }

    if !args.no_wal {
        eprintln!(
            "pgbench -i -s {} for the WAL archiving runs",
            args.pgbench_scale
        );
        bench.psql("postgres", "CREATE DATABASE pgbench")?;
        let out = bench
            .pg_tool("pgbench")
            .args(["-i", "-q", "-s", &args.pgbench_scale.to_string(), "pgbench"])
            .output()?;
        if !out.status.success() {
            bail!(
                "pgbench -i failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for r in 0..args.runs.max(1) {
            for tool in args.order(r) {
                let site = bench.new_site(&format!("wal{r}-{}", tool.name()))?;
                if tool == Tool::Pgbackrest {
                    bench.pgbackrest_cmd(&site, &["stanza-create"])?;
                }
                let (segments, secs) = bench.wal_run(&site, tool, args.backlog_seconds).await?;
                let rate = segments as f64 / secs.max(0.001);
                eprintln!(
                    "  {:<10} WAL: {segments} ready segments archived in {secs:.1} s under pgbench load: {rate:.1} segments/s",
                    tool.name()
                );
                let f = &mut runs[r][tool as usize];
                f.wal_segments = Some(segments);
                f.wal_secs = Some(secs);
                f.wal_segments_per_sec = Some(rate);
                if args.lag_seconds > 0 {
                    let lag = bench.lag_run(&site, tool, args.lag_seconds).await?;
                    eprintln!(
                        "  {:<10} WAL lag: {} segments under {} s of pgbench, .ready to archived p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; at most {} ready at once",
                        tool.name(),
                        lag.segments,
                        args.lag_seconds,
                        lag.p50_ms,
                        lag.p99_ms,
                        lag.max_ms,
                        lag.peak_backlog
                    );
                    f.lag_segments = Some(lag.segments);
                    f.lag_p50_ms = Some(lag.p50_ms);
                    f.lag_p99_ms = Some(lag.p99_ms);
                    f.lag_max_ms = Some(lag.max_ms);
                    f.lag_peak_backlog = Some(lag.peak_backlog);
                }
                bench.set_archive(&site, ArchiveMode::Hold)?;
                let _ = std::fs::remove_dir_all(&site.dir);
            }
        }
    }

    let med = |tool: Tool| {
        let all: Vec<&Figures> = runs.iter().map(|r| &r[tool as usize]).collect();
        let f = |g: fn(&Figures) -> Option<f64>| median(all.iter().filter_map(|x| g(x)).collect());
        let u = |g: fn(&Figures) -> Option<u64>| {
            median(all.iter().filter_map(|x| g(x)).map(|v| v as f64).collect()).map(|v| v as u64)
        };
        Figures {
            full_secs: f(|x| x.full_secs),
            full_cpu: f(|x| x.full_cpu),
            full_bytes: u(|x| x.full_bytes),
            full_peak_bytes: u(|x| x.full_peak_bytes),
            incr_secs: f(|x| x.incr_secs),
            incr_cpu: f(|x| x.incr_cpu),
            incr_bytes: u(|x| x.incr_bytes),
            incr_peak_bytes: u(|x| x.incr_peak_bytes),
            restore_secs: f(|x| x.restore_secs),
            restore_cpu: f(|x| x.restore_cpu),
            restore_peak_bytes: u(|x| x.restore_peak_bytes),
            wal_segments: u(|x| x.wal_segments),
            wal_secs: f(|x| x.wal_secs),
            wal_segments_per_sec: f(|x| x.wal_segments_per_sec),
            lag_segments: u(|x| x.lag_segments),
            lag_p50_ms: f(|x| x.lag_p50_ms),
            lag_p99_ms: f(|x| x.lag_p99_ms),
            lag_max_ms: f(|x| x.lag_max_ms),
            lag_peak_backlog: u(|x| x.lag_peak_backlog),
        }
    };
    Ok(Report {
        rows: args.rows,
        database_bytes,
        cores: crate::shared::cores(),
        pgbackrest_version,
        loadavg: format!("{loadavg_before} / {}", loadavg()),
        backstop: med(Tool::Backstop),
        pgbackrest: med(Tool::Pgbackrest),
        runs: runs
            .into_iter()
            .map(|[a, b]| [(Tool::Backstop, a), (Tool::Pgbackrest, b)])
            .collect(),
    })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn print_report(r: &Report, args: &BenchPhysicalArgs) {
    println!(
        "backstop bench physical: bench/trading.sql at {} rows (database {:.0} MiB), {} runs (medians), {} cores; {}",
        r.rows,
        mib(r.database_bytes),
        r.runs.len(),
        r.cores,
        r.pgbackrest_version
            .as_deref()
            .unwrap_or("pgBackRest not measured")
    );
    println!(
        "{:<44} {:>14} {:>14} {:>10}",
        "", "Backstop", "pgBackRest", "ratio"
    );
    let (b, p) = (&r.backstop, &r.pgbackrest);
    let row = |label: &str, x: Option<f64>, y: Option<f64>, unit: &str, prec: usize| {
        let cell = |v: Option<f64>| {
            v.map(|v| format!("{v:.prec$} {unit}"))
                .unwrap_or_else(|| "-".into())
        };
        let ratio = match (x, y) {
            (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
            _ => "-".into(),
        };
        println!("{label:<44} {:>14} {:>14} {:>10}", cell(x), cell(y), ratio);
    };
    let m = |v: Option<u64>| v.map(mib);
    row("full base backup: time", b.full_secs, p.full_secs, "s", 1);
    row("full base backup: CPU", b.full_cpu, p.full_cpu, "s", 1);
    row(
        "full base backup: stored",
        m(b.full_bytes),
        m(p.full_bytes),
        "MiB",
        1,
    );
    row(
        "second base backup after churn.sql: time",
        b.incr_secs,
        p.incr_secs,
        "s",
        1,
    );
    row(
        "second base backup after churn.sql: CPU",
        b.incr_cpu,
        p.incr_cpu,
        "s",
        1,
    );
    row(
        "second base backup after churn.sql: stored",
        m(b.incr_bytes),
        m(p.incr_bytes),
        "MiB",
        1,
    );
    let share = |f: &Figures| match (f.incr_bytes, f.full_bytes) {
        (Some(i), Some(f)) if f > 0 => Some(100.0 * i as f64 / f as f64),
        _ => None,
    };
    row("  as a share of the full", share(b), share(p), "%", 1);
    row(
        "restore (lay out the latest)",
        b.restore_secs,
        p.restore_secs,
        "s",
        1,
    );
    row("restore: CPU", b.restore_cpu, p.restore_cpu, "s", 1);
    let peak = |f: &Figures| {
        [f.full_peak_bytes, f.incr_peak_bytes, f.restore_peak_bytes]
            .into_iter()
            .flatten()
            .max()
            .map(mib)
    };
    row(
        "peak memory (backups and restore)",
        peak(b),
        peak(p),
        "MiB",
        0,
    );
    if !args.no_wal {
        row(
            "WAL archiving under pgbench (higher better)",
            b.wal_segments_per_sec,
            p.wal_segments_per_sec,
            "seg/s",
            1,
        );
        row(
            "  backlog drained (segments)",
            b.wal_segments.map(|v| v as f64),
            p.wal_segments.map(|v| v as f64),
            "",
            0,
        );
        if args.lag_seconds > 0 {
            row("WAL archive lag p50", b.lag_p50_ms, p.lag_p50_ms, "ms", 0);
            row("WAL archive lag p99", b.lag_p99_ms, p.lag_p99_ms, "ms", 0);
            row("WAL archive lag max", b.lag_max_ms, p.lag_max_ms, "ms", 0);
            let f = |v: Option<u64>| v.map(|v| v as f64);
            row(
                "  most segments ready at once",
                f(b.lag_peak_backlog),
                f(p.lag_peak_backlog),
                "",
                0,
            );
            row(
                "  segments in the lag run",
                f(b.lag_segments),
                f(p.lag_segments),
                "",
                0,
            );
        }
    }
    println!(
        "ratio = Backstop / pgBackRest: below 1 is better for times and bytes, above 1 for segments/s"
    );
    println!(
        "CPU = user+system seconds of the tool's processes and of the server backends that served it; load average before / after: {}",
        r.loadavg
    );
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ArchiveMode {
    /// Fail every call: segments pile up as `.ready`.
    Hold,
    Both,
    Only(Tool),
}

/// One run's repositories: Backstop's (with its configuration, key and ledger) and pgBackRest's.
struct Site {
    dir: PathBuf,
    config: PathBuf,
    pgbr_config: PathBuf,
}

struct Bench {
    w: PathBuf,
    exe: PathBuf,
    /// `None` when pgBackRest is not measured.
    pgbackrest: Option<PathBuf>,
    pg: Postgres,
}

/// The cluster, archiving into the archive script (which fails, holding WAL, until a run sets
/// it).
fn start_pg(w: &Path) -> anyhow::Result<Postgres> {
    let script = w.join(ARCHIVE_SCRIPT);
    std::fs::write(&script, "#!/bin/sh\nexit 1\n")?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let options = PostgresOptions::new()
        .in_dir(w)
        .conf("shared_buffers = 256MB")
        .conf("max_connections = 50")
        .conf("max_wal_size = 4GB")
        .conf("maintenance_work_mem = 256MB")
        .autovacuum_off()
        .conf("archive_mode = on")
        .conf(format!("archive_command = '{} %p'", script.display()));
    let mut pg = Postgres::start_with(options).context("starting PostgreSQL 15")?;
    pg.set_command_timeout(LOAD_TIMEOUT);
    Ok(pg)
}

impl Bench {
    /// A command running as PostgreSQL's user (when root).
    fn as_server(&self, program: &Path) -> anyhow::Result<Command> {
        server_user_command(program)
    }

    fn url(&self) -> String {
        self.pg.conninfo("postgres")
    }

    /// A PostgreSQL client aimed at the server (as the caller: trust authentication on TCP).
    fn pg_tool(&self, prog: &str) -> Command {
        self.pg.client(prog)
    }

    fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        self.pg.psql(db, sql)
    }

    fn psql_file(&self, db: &str, file: &Path, vars: &[(&str, &str)]) -> anyhow::Result<()> {
        self.pg.psql_file(db, file, vars).map(|_| ())
    }

    /// Fresh repositories for both tools.
    fn new_site(&self, name: &str) -> anyhow::Result<Site> {
        let dir = self.w.join(name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("backstop.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n[[sources]]\nname = {SOURCE:?}\npostgres = {:?}\n",
                dir.join("backstop-data"),
                dir.join("backstop-repo"),
                dir.join("master.key"),
                self.url()
            ),
        )?;
        let out = self
            .backstop(&config)
            .args(["init", "--generate-key"])
            .arg(dir.join("master.key"))
            .output()?;
        if !out.status.success() {
            bail!(
                "backstop init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let pg = &self.pg;
        let pgbr_config = dir.join("pgbackrest.conf");
        std::fs::write(
            &pgbr_config,
            format!(
                "[global]\nrepo1-path={repo}\nrepo1-retention-full=10\ncompress-type=zst\ncompress-level=3\n\
                 process-max=2\nstart-fast=y\narchive-async=y\nspool-path={d}/pgbr-spool\n\
                 lock-path={d}/pgbr-lock\nlog-path={d}/pgbr-log\nlog-level-console=warn\n\
                 log-level-file=off\n\n[{STANZA}]\npg1-path={data}\npg1-port={port}\n\
                 pg1-socket-path={sock}\npg1-user=postgres\n",
                repo = dir.join("pgbr-repo").display(),
                d = dir.display(),
                data = pg.data_dir().display(),
                port = pg.port(),
                sock = pg.socket_dir().display(),
            ),
        )?;
        std::fs::create_dir_all(dir.join("pgbr-repo"))?;
        // wal-push and pgBackRest run as PostgreSQL's user: its configuration, key and
        // repositories must be its own.
        give_to_server_user(&dir)?;
        Ok(Site {
            dir,
            config,
            pgbr_config,
        })
    }

    fn backstop(&self, config: &Path) -> Command {
        let mut c = Command::new(&self.exe);
        c.arg("--config")
            .arg(config)
            .env("BACKSTOP_LOG", "warn")
            .stdin(Stdio::null());
        c
    }

    fn pgbackrest(&self) -> anyhow::Result<&Path> {
        self.pgbackrest
            .as_deref()
            .context("internal error: pgBackRest is not among the tools measured")
    }

    fn pgbackrest_command(&self, site: &Site, args: &[&str]) -> anyhow::Result<Command> {
        let mut c = self.as_server(self.pgbackrest()?)?;
        c.arg(format!("--config={}", site.pgbr_config.display()))
            .arg(format!("--stanza={STANZA}"))
            .args(args)
            .stdin(Stdio::null());
        Ok(c)
    }

    fn pgbackrest_cmd(&self, site: &Site, args: &[&str]) -> anyhow::Result<String> {
        let out = self.pgbackrest_command(site, args)?.output()?;
        if !out.status.success() {
            bail!(
                "pgbackrest {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Rewrites the archive script (PostgreSQL runs it anew for every segment).
    fn set_archive(&self, site: &Site, mode: ArchiveMode) -> anyhow::Result<()> {
        let bs = format!(
            "{} --config {} wal-push --source {SOURCE} \"$1\"",
            self.exe.display(),
            site.config.display()
        );
        let br = || -> anyhow::Result<String> {
            Ok(format!(
                "{} --config={} --stanza={STANZA} archive-push \"$1\"",
                self.pgbackrest()?.display(),
                site.pgbr_config.display()
            ))
        };
        let body = match mode {
            ArchiveMode::Hold => "exit 1".to_string(),
            ArchiveMode::Both => format!("BACKSTOP_LOG=warn {bs} && exec {}", br()?),
            ArchiveMode::Only(Tool::Backstop) => format!("BACKSTOP_LOG=warn exec {bs}"),
            ArchiveMode::Only(Tool::Pgbackrest) => format!("exec {}", br()?),
        };
        let script = self.w.join(ARCHIVE_SCRIPT);
        let tmp = self.w.join(format!(".{ARCHIVE_SCRIPT}.tmp"));
        std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n"))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        // Renamed into place: PostgreSQL never runs half a script.
        std::fs::rename(&tmp, &script)?;
        Ok(())
    }

    /// Runs `cmd` to completion with its output in files; wall time and CPU seconds (its own and
    /// its waited-for children's, with the server's reaped backends).
    fn measured(&self, mut cmd: Command, what: &str) -> anyhow::Result<(Measured, String)> {
        let out_path = self.w.join("measured.out");
        let err_path = self.w.join("measured.err");
        cmd.stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(&err_path)?);
        let server_before = crate::shared::server_cpu(&self.pg)?;
        let t = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let usage = wait_rusage(&mut child)?;
        let (ok, cpu, peak) = (usage.status.success(), usage.cpu_secs, usage.peak_bytes);
        let secs = t.elapsed().as_secs_f64();
        let server = crate::shared::server_cpu(&self.pg)? - server_before;
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        if !ok {
            bail!(
                "{what} failed: {}{}",
                stdout,
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        Ok((
            Measured {
                secs,
                cpu: cpu + server,
                peak,
            },
            stdout,
        ))
    }

    /// Switches to a new segment and waits until it is archived: nothing queued behind.
    async fn drain_archive(&self) -> anyhow::Result<()> {
        // A record first: a switch with nothing written since the last one does nothing.
        self.psql(
            "postgres",
            "SELECT pg_logical_emit_message(false, 'bench', 'x')",
        )?;
        let name = self.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")?;
        let t = Instant::now();
        loop {
            let archived = self.psql(
                "postgres",
                "SELECT coalesce(left(last_archived_wal, 24), '') FROM pg_stat_archiver",
            )?;
            if archived.len() == 24 && archived >= name {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(1800) {
                bail!("the WAL backlog was not archived within 30 minutes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn full(&self, site: &Site, tool: Tool) -> anyhow::Result<(Measured, u64)> {
        match tool {
            Tool::Backstop => self.backstop_backup(site, "full"),
            Tool::Pgbackrest => self.pgbackrest_backup(site, "full"),
        }
    }

    fn incr(&self, site: &Site, tool: Tool) -> anyhow::Result<(Measured, u64)> {
        match tool {
            Tool::Backstop => self.backstop_backup(site, "incremental"),
            Tool::Pgbackrest => self.pgbackrest_backup(site, "incr"),
        }
    }

    fn backstop_backup(&self, site: &Site, kind: &str) -> anyhow::Result<(Measured, u64)> {
        let mut cmd = self.backstop(&site.config);
        cmd.args([
            "backup",
            "--physical",
            "--source",
            SOURCE,
            "--kind",
            kind,
            "--json",
        ]);
        let (m, stdout) = self.measured(cmd, "backstop backup --physical")?;
        let v: serde_json::Value =
            serde_json::from_str(&stdout).context("backstop backup --json printed no JSON")?;
        let new = v["new_bytes"]
            .as_u64()
            .context("backstop backup --json has no new_bytes")?;
        Ok((m, new))
    }

    fn pgbackrest_backup(&self, site: &Site, kind: &str) -> anyhow::Result<(Measured, u64)> {
        let cmd = self.pgbackrest_command(site, &[&format!("--type={kind}"), "backup"])?;
        let (m, _) = self.measured(cmd, "pgbackrest backup")?;
        let info: serde_json::Value =
            serde_json::from_str(&self.pgbackrest_cmd(site, &["--output=json", "info"])?)
                .context("pgbackrest info printed no JSON")?;
        let delta = info[0]["backup"]
            .as_array()
            .and_then(|b| b.last())
            .and_then(|b| b["info"]["repository"]["delta"].as_u64())
            .context("pgbackrest info has no repository delta for the last backup")?;
        Ok((m, delta))
    }

    fn restore(&self, site: &Site, tool: Tool) -> anyhow::Result<Measured> {
        let dir = site.dir.join(format!("restore-{}", tool.name()));
        let m = match tool {
            Tool::Backstop => {
                let mut cmd = self.backstop(&site.config);
                cmd.args([
                    "restore",
                    "latest",
                    "--allow-unverified",
                    "--physical",
                    "--source",
                    SOURCE,
                ])
                .arg("--to-dir")
                .arg(&dir);
                self.measured(cmd, "backstop restore --physical")?.0
            }
            Tool::Pgbackrest => {
                // pgBackRest wants the empty directory to exist: made beforehand, untimed.
                std::fs::create_dir_all(&dir)?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                give_to_server_user(&dir)?;
                let cmd = self.pgbackrest_command(
                    site,
                    &[&format!("--pg1-path={}", dir.display()), "restore"],
                )?;
                self.measured(cmd, "pgbackrest restore")?.0
            }
        };
        let _ = std::fs::remove_dir_all(&dir);
        Ok(m)
    }

    /// Holds archiving while pgbench builds a backlog, then times the tool draining it while
    /// pgbench keeps running. Returns (segments in the backlog, seconds).
    async fn wal_run(
        &self,
        site: &Site,
        tool: Tool,
        backlog_seconds: u64,
    ) -> anyhow::Result<(u64, f64)> {
        self.set_archive(site, ArchiveMode::Hold)?;
        let mut load = self.pgbench(backlog_seconds)?;
        let status = load.wait()?;
        if !status.success() {
            bail!("pgbench failed ({status})");
        }
        // The segment being written is closed too, so that a short load still leaves a backlog.
        self.psql("postgres", "SELECT pg_switch_wal()")?;
        let ready = self.psql(
            "postgres",
            "SELECT count(*) || '|' || coalesce(max(left(name, 24)), '') FROM pg_ls_archive_statusdir() \
             WHERE name ~ '^[0-9A-F]{24}\\.ready$'",
        )?;
        let (count, last) = ready.split_once('|').unwrap_or(("0", ""));
        let count: u64 = count.parse().unwrap_or(0);
        if count == 0 || last.is_empty() {
            bail!("pgbench produced no WAL backlog; raise --backlog-seconds");
        }
        let last = last.to_string();
        let mut load = ChildGuard(self.pgbench(3600)?);
        self.set_archive(site, ArchiveMode::Only(tool))?;
        let t = Instant::now();
        // Wakes the archiver, which backs off after failures.
        self.psql("postgres", "SELECT pg_switch_wal()")?;
        loop {
            let archived = self.psql(
                "postgres",
                "SELECT coalesce(left(last_archived_wal, 24), '') FROM pg_stat_archiver",
            )?;
            if archived.len() == 24 && archived >= last {
                break;
            }
            if t.elapsed() > Duration::from_secs(1800) {
                bail!(
                    "{} did not drain the WAL backlog in 30 minutes",
                    tool.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        let _ = load.0.kill();
        let _ = load.0.wait();
        Ok((count, secs))
    }

    /// Sustained pgbench with the tool archiving: each segment's time from `.ready` to `.done`
    /// (module docs, item 5).
    async fn lag_run(&self, site: &Site, tool: Tool, seconds: u64) -> anyhow::Result<Lag> {
        const POLL: Duration = Duration::from_millis(20);
        self.set_archive(site, ArchiveMode::Only(tool))?;
        self.drain_archive().await?;
        let status_dir = self.pg.data_dir().join("pg_wal").join("archive_status");
        let scan = || -> anyhow::Result<Vec<String>> {
            let mut names = Vec::new();
            for e in std::fs::read_dir(&status_dir)
                .with_context(|| format!("reading {}", status_dir.display()))?
            {
                // A file removed between the listing and this entry is simply not there.
                let Ok(e) = e else { continue };
                names.push(e.file_name().to_string_lossy().into_owned());
            }
            Ok(names)
        };
        // `.done` files of segments archived before the run are not part of it.
        let before: std::collections::HashSet<String> = scan()?
            .into_iter()
            .filter_map(|n| n.strip_suffix(".done").map(str::to_string))
            .collect();
        let mut ready_since: std::collections::HashMap<String, Instant> = Default::default();
        let mut finished = std::collections::HashSet::new();
        let mut lags_ms = Vec::new();
        let mut peak_backlog = 0u64;
        let mut load = ChildGuard(self.pgbench(seconds)?);
        let mut load_ended: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut backlog = 0u64;
            for name in scan()? {
                if let Some(seg) = name.strip_suffix(".ready") {
                    backlog += 1;
                    ready_since.entry(seg.to_string()).or_insert(now);
                } else if let Some(seg) = name.strip_suffix(".done")
                    && !before.contains(seg)
                    && finished.insert(seg.to_string())
                {
                    let lag = ready_since
                        .get(seg)
                        .map_or(POLL, |since| now.duration_since(*since));
                    lags_ms.push(lag.as_secs_f64() * 1000.0);
                }
            }
            peak_backlog = peak_backlog.max(backlog);
            if load_ended.is_none() && load.0.try_wait()?.is_some() {
                load_ended = Some(now);
                // The segment pgbench was filling is closed too, so that a short load still
                // leaves a segment to time.
                self.psql("postgres", "SELECT pg_switch_wal()")?;
                // Looked at again before the run can end: that segment is not in this scan.
                tokio::time::sleep(POLL).await;
                continue;
            }
            if let Some(ended) = load_ended {
                let all_done = ready_since.keys().all(|s| finished.contains(s));
                if all_done {
                    break;
                }
                if ended.elapsed() > Duration::from_secs(600) {
                    bail!(
                        "{} left segments unarchived 10 minutes after the load ended",
                        tool.name()
                    );
                }
            }
            tokio::time::sleep(POLL).await;
        }
        if lags_ms.is_empty() {
            bail!("pgbench filled no segment in {seconds} s; raise --lag-seconds");
        }
        lags_ms.sort_by(|a, b| a.total_cmp(b));
        let pick = |q: f64| lags_ms[((lags_ms.len() - 1) as f64 * q).round() as usize];
        Ok(Lag {
            segments: lags_ms.len() as u64,
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
            max_ms: lags_ms[lags_ms.len() - 1],
            peak_backlog,
        })
    }

    fn pgbench(&self, seconds: u64) -> anyhow::Result<Child> {
        self.pg_tool("pgbench")
            .args([
                "-n",
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                &seconds.to_string(),
                "pgbench",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pgbench")
    }
}

/// One archive-lag run's figures.
struct Lag {
    segments: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    peak_backlog: u64,
}

/// Wall and CPU seconds and peak memory of one measured command.
#[derive(Clone, Copy, Debug)]
struct Measured {
    secs: f64,
    cpu: f64,
    /// Peak resident set size of the command (or of a child it reaped), bytes.
    peak: u64,
}
