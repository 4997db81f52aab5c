//! `backstop bench scale`: Backstop's logical and physical full backup, second backup and
//! restore at several sizes of the trading dataset (by default 1, 4 and 16 million rows), to show
//! whether time grows linearly with the database and memory does not grow at all. A report: it
//! measures and prints; it asserts nothing.
//!
//! What it runs, for each size in `--rows`:
//! - the logical steps of `backstop bench backup` with Backstop alone (a local repository, no
//!   peers, no reference restore): full backup, `bench/churn.sql`, incremental backup, restore of
//!   the full backup into an empty database;
//! - the physical steps of `backstop bench physical` with Backstop alone (no WAL runs): full base
//!   backup, churn, second base backup, restore (lay-out) of the latest.
//!
//! Each benchmark starts its own throwaway PostgreSQL and loads the dataset at that size, and
//! runs its steps `--runs` times; this report takes their medians. How each step is timed and
//! how its peak memory is read (`wait4`'s maximum resident set size of the `backstop` process) is
//! stated in those modules.
//!
//! The figures it derives:
//! - **Time per GiB**: a step's wall seconds over the database's size (`pg_database_size`) in
//!   GiB. The churn grows with the rows too, so the second backup is put per GiB of database as
//!   well.
//! - **Spread**: for each step, (largest - smallest) / smallest of its time per GiB over the
//!   sizes. Target: within 15%. Fixed costs (process start, the checkpoint a base backup waits
//!   for) weigh most at the smallest size and show up here.
//! - **Peak memory**: the largest over a method's steps, at each size. Targets: under 300 MB at
//!   every size, and flat (the largest size's peak within 15% of the smallest size's).
//! - **Projection for 10 GB** (seed 000's R10.4: a full backup of a database of up to 10 GB
//!   within 15 minutes): the largest size's time per GiB times 10 GB. It holds as far as the
//!   spread says time is linear, on a machine like this one (the report prints its cores).

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::backup::{self, BenchBackupArgs};
use crate::physical::{self, BenchPhysicalArgs};
use crate::shared::loadavg;

/// The largest spread of time per GiB over the sizes that still counts as linear.
const LINEAR_SPREAD: f64 = 0.15;
/// Peak memory bound, bytes (decimal MB, as the other reports print memory).
const PEAK_LIMIT: u64 = 300_000_000;
/// R10.4: a full backup of a database of up to 10 GB within 15 minutes.
const R10_4_BYTES: f64 = 10e9;
const R10_4_SECS: f64 = 15.0 * 60.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Logical,
    Physical,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Logical => "logical",
            Method::Physical => "physical",
        }
    }
}

#[derive(Args)]
pub struct BenchScaleArgs {
    /// Sizes: rows in realtime_prices (the other tables scale from it), comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000000,4000000,16000000"
    )]
    rows: Vec<u64>,
    /// Runs at each size; the report gives the median of each figure.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Which backups to measure (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "logical,physical"
    )]
    methods: Vec<Method>,
    /// Parallel COPY jobs of the logical backups and restores.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Parent of the temporary working directories (default: the system's temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// The three steps of one method at one size (medians).
#[derive(Clone, Debug, Serialize)]
struct Steps {
    database_bytes: u64,
    full_secs: f64,
    second_secs: f64,
    restore_secs: f64,
    /// The largest peak resident set size over the three steps, bytes.
    peak_bytes: u64,
}

impl Steps {
    fn per_gib(&self, secs: f64) -> f64 {
        secs / (self.database_bytes.max(1) as f64 / GIB)
    }
}

#[derive(Clone, Debug, Serialize)]
struct Size {
    rows: u64,
    logical: Option<Steps>,
    physical: Option<Steps>,
}

impl Size {
    fn steps(&self, m: Method) -> Option<&Steps> {
        match m {
            Method::Logical => self.logical.as_ref(),
            Method::Physical => self.physical.as_ref(),
        }
    }
}

/// What the sizes say about one method.
#[derive(Clone, Debug, Serialize)]
struct Verdict {
    method: Method,
    /// (largest - smallest) / smallest time per GiB over the sizes, per step.
    full_spread: f64,
    second_spread: f64,
    restore_spread: f64,
    linear: bool,
    /// The largest peak at any size, and the largest size's peak over the smallest's.
    max_peak_bytes: u64,
    peak_growth: f64,
    peak_under_limit: bool,
    peak_flat: bool,
    /// Seconds for a 10 GB database at the largest size's time per GiB.
    projected_full_secs_10gb: f64,
    projected_restore_secs_10gb: f64,
    full_within_r10_4: bool,
}

#[derive(Serialize)]
struct Report {
    cores: usize,
    runs: usize,
    jobs: usize,
    loadavg: String,
    sizes: Vec<Size>,
    verdicts: Vec<Verdict>,
}

pub async fn run(args: BenchScaleArgs, backstop: &Path) -> anyhow::Result<()> {
    if args.rows.is_empty() || args.methods.is_empty() {
        anyhow::bail!("--rows and --methods must each name at least one value");
    }
    let loadavg_before = loadavg();
    let mut rows = args.rows.clone();
    rows.sort_unstable();
    rows.dedup();
    let runs = args.runs.max(1);
    let mut sizes = Vec::new();
    for &n in &rows {
        let mut size = Size {
            rows: n,
            logical: None,
            physical: None,
        };
        if args.methods.contains(&Method::Logical) {
            eprintln!("scale: logical at {n} rows, {runs} runs");
            let a = BenchBackupArgs::backstop_only(n, runs, args.jobs, args.work_dir.clone());
            let r = backup::measure(&a, backstop).await?;
            let b = &r.median[backup::BS_LOCAL];
            let secs = |s: Option<backup::Sample>, what: &str| {
                s.map(|s| s.secs)
                    .ok_or_else(|| anyhow::anyhow!("the logical {what} was not measured"))
            };
            size.logical = Some(Steps {
                database_bytes: r.database_bytes,
                full_secs: secs(b.full, "full backup")?,
                second_secs: secs(b.second, "second backup")?,
                restore_secs: secs(b.restore, "restore")?,
                peak_bytes: b.peak_bytes().unwrap_or(0),
            });
        }
        if args.methods.contains(&Method::Physical) {
            eprintln!("scale: physical at {n} rows, {runs} runs");
            let a = BenchPhysicalArgs::backstop_only(n, runs, args.work_dir.clone());
            let r = physical::measure(&a, backstop).await?;
            let b = &r.backstop;
            let secs = |s: Option<f64>, what: &str| {
                s.ok_or_else(|| anyhow::anyhow!("the physical {what} was not measured"))
            };
            size.physical = Some(Steps {
                database_bytes: r.database_bytes,
                full_secs: secs(b.full_secs, "full base backup")?,
                second_secs: secs(b.incr_secs, "second base backup")?,
                restore_secs: secs(b.restore_secs, "restore")?,
                peak_bytes: [b.full_peak_bytes, b.incr_peak_bytes, b.restore_peak_bytes]
                    .into_iter()
                    .flatten()
                    .max()
                    .unwrap_or(0),
            });
        }
        sizes.push(size);
    }
    let verdicts = args
        .methods
        .iter()
        .filter_map(|&m| verdict(m, &sizes))
        .collect();
    let report = Report {
        cores: crate::shared::cores(),
        runs,
        jobs: args.jobs,
        loadavg: format!("{loadavg_before} / {}", loadavg()),
        sizes,
        verdicts,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &args.methods);
    }
    Ok(())
}

/// (largest - smallest) / smallest.
fn spread(values: impl Iterator<Item = f64>) -> f64 {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > 0.0 && lo.is_finite() {
        (hi - lo) / lo
    } else {
        0.0
    }
}

/// The verdict for `method` over `sizes` (sorted smallest first); `None` if it was not measured.
fn verdict(method: Method, sizes: &[Size]) -> Option<Verdict> {
    let steps: Vec<&Steps> = sizes.iter().filter_map(|s| s.steps(method)).collect();
    let (first, last) = (steps.first()?, steps.last()?);
    let spread_of = |g: fn(&Steps) -> f64| spread(steps.iter().map(|s| s.per_gib(g(s))));
    let full_spread = spread_of(|s| s.full_secs);
    let second_spread = spread_of(|s| s.second_secs);
    let restore_spread = spread_of(|s| s.restore_secs);
    let max_peak_bytes = steps.iter().map(|s| s.peak_bytes).max().unwrap_or(0);
    let peak_growth = last.peak_bytes as f64 / first.peak_bytes.max(1) as f64;
    let gib_10gb = R10_4_BYTES / GIB;
    let projected_full_secs_10gb = last.per_gib(last.full_secs) * gib_10gb;
    Some(Verdict {
        method,
        full_spread,
        second_spread,
        restore_spread,
        linear: [full_spread, second_spread, restore_spread]
            .iter()
            .all(|s| *s <= LINEAR_SPREAD),
        max_peak_bytes,
        peak_growth,
        peak_under_limit: max_peak_bytes < PEAK_LIMIT,
        peak_flat: peak_growth <= 1.0 + LINEAR_SPREAD,
        projected_full_secs_10gb,
        projected_restore_secs_10gb: last.per_gib(last.restore_secs) * gib_10gb,
        full_within_r10_4: projected_full_secs_10gb <= R10_4_SECS,
    })
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn print_report(r: &Report, methods: &[Method]) {
    println!(
        "backstop bench scale: Backstop at {} rows, median of {} runs at each size, {} cores, {} COPY jobs; load average before / after: {}",
        r.sizes
            .iter()
            .map(|s| s.rows.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        r.runs,
        r.cores,
        r.jobs,
        r.loadavg
    );
    let header = |first: &str| {
        print!("{first:<34}");
        for s in &r.sizes {
            print!(" {:>16}", format!("{} rows", s.rows));
        }
    };
    for &m in methods {
        let name = m.name();
        println!();
        header(&format!("{name} (wall seconds)"));
        println!(" {:>8}", "spread");
        let line = |label: &str, cell: &dyn Fn(&Steps) -> String, tail: String| {
            print!("{label:<34}");
            for s in &r.sizes {
                let c = s.steps(m).map(cell).unwrap_or_else(|| "-".into());
                print!(" {c:>16}");
            }
            println!(" {tail:>8}");
        };
        let v = r.verdicts.iter().find(|v| v.method == m);
        let pct = |f: fn(&Verdict) -> f64| v.map(|v| format!("{:.0}%", 100.0 * f(v)));
        let pct = |f| pct(f).unwrap_or_else(|| "-".into());
        line(
            &format!("{name} database"),
            &|s| format!("{:.0} MiB", s.database_bytes as f64 / (1024.0 * 1024.0)),
            String::new(),
        );
        line(
            &format!("{name} full: time"),
            &|s| format!("{:.2} s", s.full_secs),
            String::new(),
        );
        line(
            &format!("{name} full: per GiB"),
            &|s| format!("{:.2} s", s.per_gib(s.full_secs)),
            pct(|v| v.full_spread),
        );
        line(
            &format!("{name} second: time"),
            &|s| format!("{:.2} s", s.second_secs),
            String::new(),
        );
        line(
            &format!("{name} second: per GiB"),
            &|s| format!("{:.2} s", s.per_gib(s.second_secs)),
            pct(|v| v.second_spread),
        );
        line(
            &format!("{name} restore: time"),
            &|s| format!("{:.2} s", s.restore_secs),
            String::new(),
        );
        line(
            &format!("{name} restore: per GiB"),
            &|s| format!("{:.2} s", s.per_gib(s.restore_secs)),
            pct(|v| v.restore_spread),
        );
        line(
            &format!("{name} peak memory"),
            &|s| format!("{:.0} MB", s.peak_bytes as f64 / 1e6),
            v.map(|v| format!("{:.2}x", v.peak_growth))
                .unwrap_or_else(|| "-".into()),
        );
    }
    println!();
    println!(
        "spread = (largest - smallest) / smallest over the sizes; for peak memory, the largest size's over the smallest's"
    );
    println!("targets:");
    for v in &r.verdicts {
        println!(
            "  {:<8} time per GiB within {:.0}% across the sizes: {}; peak under 300 MB: {} ({:.0} MB); peak flat (within {:.0}%): {}",
            v.method.name(),
            100.0 * LINEAR_SPREAD,
            met(v.linear),
            met(v.peak_under_limit),
            v.max_peak_bytes as f64 / 1e6,
            100.0 * LINEAR_SPREAD,
            met(v.peak_flat),
        );
        println!(
            "  {:<8} projected for a 10 GB database (the largest size's time per GiB): full {:.1} min, restore {:.1} min; full within R10.4's 15 minutes: {}",
            v.method.name(),
            v.projected_full_secs_10gb / 60.0,
            v.projected_restore_secs_10gb / 60.0,
            met(v.full_within_r10_4),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(gib: f64, full: f64, peak: u64) -> Steps {
        Steps {
            database_bytes: (gib * GIB) as u64,
            full_secs: full,
            second_secs: full / 4.0,
            restore_secs: full * 1.5,
            peak_bytes: peak,
        }
    }

    fn sizes(all: Vec<Steps>) -> Vec<Size> {
        all.into_iter()
            .enumerate()
            .map(|(i, s)| Size {
                rows: i as u64,
                logical: Some(s),
                physical: None,
            })
            .collect()
    }

    #[test]
    fn linear_time_and_flat_memory_meet_the_targets() {
        let s = sizes(vec![
            steps(0.25, 1.0, 100_000_000),
            steps(1.0, 4.1, 105_000_000),
            steps(4.0, 16.0, 110_000_000),
        ]);
        let v = verdict(Method::Logical, &s).expect("measured");
        assert!(v.linear, "{v:?}");
        assert!((v.full_spread - 0.025).abs() < 1e-9, "{v:?}");
        assert!(v.peak_under_limit && v.peak_flat, "{v:?}");
        // 4 s per GiB: 10 GB is 9.31 GiB.
        assert!((v.projected_full_secs_10gb - 4.0 * 1e10 / GIB).abs() < 1e-6);
        assert!(v.full_within_r10_4);
        assert!(verdict(Method::Physical, &s).is_none());
    }

    #[test]
    fn fixed_costs_growing_memory_and_a_slow_backup_are_missed() {
        // 8 s per GiB at the smallest size, 100 s at the largest.
        let s = sizes(vec![
            steps(0.25, 2.0, 100_000_000),
            steps(4.0, 400.0, 400_000_000),
        ]);
        let v = verdict(Method::Logical, &s).expect("measured");
        assert!(!v.linear, "{v:?}");
        assert!(!v.peak_under_limit && !v.peak_flat, "{v:?}");
        assert!((v.peak_growth - 4.0).abs() < 1e-9);
        // 100 s per GiB: 931 s for 10 GB, past 900 s.
        assert!(!v.full_within_r10_4, "{v:?}");
    }
}
