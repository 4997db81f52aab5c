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
//! - **Fixed + per GiB**: a least-squares line through each step's (GiB, seconds) points: the
//!   fixed cost every run pays, and the marginal seconds per GiB. Where the spread is missed, it
//!   tells a fixed cost (a flat marginal rate) from a cost that grows faster than the data.
//! - **Peak memory**: per step and the largest over a method's steps, at each size. Targets:
//!   under 300 MB at every size, and flat (the largest size's peak within 15% of the smallest
//!   size's).
//! - **Projection for 10 GB** (seed 000's R10.4: a full backup of a database of up to 10 GB
//!   within 15 minutes): the fitted line at 10 GB (with a single size, that size's time per GiB
//!   times 10 GB). It holds as far as the measured sizes say time is linear, on a machine like
//!   this one (the report prints its cores).

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

/// The steps every method measures, in the order the report prints them.
const STEP_NAMES: [&str; 3] = ["full", "second", "restore"];

/// The three steps of one method at one size (medians).
#[derive(Clone, Debug, Serialize)]
struct Steps {
    database_bytes: u64,
    full_secs: f64,
    second_secs: f64,
    restore_secs: f64,
    /// Peak resident set size of each step, bytes.
    full_peak_bytes: u64,
    second_peak_bytes: u64,
    restore_peak_bytes: u64,
}

impl Steps {
    fn gib(&self) -> f64 {
        self.database_bytes.max(1) as f64 / GIB
    }

    fn per_gib(&self, secs: f64) -> f64 {
        secs / self.gib()
    }

    /// Each step's peak, in [`STEP_NAMES`] order.
    fn step_peaks(&self) -> [u64; 3] {
        [
            self.full_peak_bytes,
            self.second_peak_bytes,
            self.restore_peak_bytes,
        ]
    }

    /// The largest peak over the three steps.
    fn peak_bytes(&self) -> u64 {
        self.step_peaks().into_iter().max().unwrap_or(0)
    }
}

/// A step's seconds as `fixed + per_gib * GiB`, fitted by least squares over the sizes.
#[derive(Clone, Copy, Debug, Serialize)]
struct Line {
    fixed_secs: f64,
    per_gib_secs: f64,
}

impl Line {
    /// The line through `(GiB, seconds)` points; with fewer than two distinct sizes, no fixed
    /// cost and the mean rate.
    fn fit(points: &[(f64, f64)]) -> Line {
        let n = points.len() as f64;
        let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
        let my = points.iter().map(|p| p.1).sum::<f64>() / n;
        let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        if sxx <= f64::EPSILON * mx.max(1.0) {
            return Line {
                fixed_secs: 0.0,
                per_gib_secs: if mx > 0.0 { my / mx } else { 0.0 },
            };
        }
        let per_gib_secs = sxy / sxx;
        Line {
            fixed_secs: my - per_gib_secs * mx,
            per_gib_secs,
        }
    }

    fn at(&self, gib: f64) -> f64 {
        self.fixed_secs + self.per_gib_secs * gib
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

/// A step's name, its seconds at one size, and its spread over the sizes: what its two rows
/// of the report print.
type StepRows = (&'static str, fn(&Steps) -> f64, fn(&Verdict) -> f64);

/// What the sizes say about one method.
#[derive(Clone, Debug, Serialize)]
struct Verdict {
    method: Method,
    /// (largest - smallest) / smallest time per GiB over the sizes, per step.
    full_spread: f64,
    second_spread: f64,
    restore_spread: f64,
    linear: bool,
    full_line: Line,
    second_line: Line,
    restore_line: Line,
    /// The largest peak at any size, and the largest size's peak over the smallest's.
    max_peak_bytes: u64,
    peak_growth: f64,
    peak_under_limit: bool,
    peak_flat: bool,
    /// Seconds for a 10 GB database on the fitted lines.
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
                full_peak_bytes: b.full.map_or(0, |s| s.peak_bytes),
                second_peak_bytes: b.second.map_or(0, |s| s.peak_bytes),
                restore_peak_bytes: b.restore.map_or(0, |s| s.peak_bytes),
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
                full_peak_bytes: b.full_peak_bytes.unwrap_or(0),
                second_peak_bytes: b.incr_peak_bytes.unwrap_or(0),
                restore_peak_bytes: b.restore_peak_bytes.unwrap_or(0),
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
    let max_peak_bytes = steps.iter().map(|s| s.peak_bytes()).max().unwrap_or(0);
    let peak_growth = last.peak_bytes() as f64 / first.peak_bytes().max(1) as f64;
    let line_of = |g: fn(&Steps) -> f64| {
        Line::fit(&steps.iter().map(|s| (s.gib(), g(s))).collect::<Vec<_>>())
    };
    let full_line = line_of(|s| s.full_secs);
    let restore_line = line_of(|s| s.restore_secs);
    let gib_10gb = R10_4_BYTES / GIB;
    let projected_full_secs_10gb = full_line.at(gib_10gb);
    Some(Verdict {
        method,
        full_spread,
        second_spread,
        restore_spread,
        linear: [full_spread, second_spread, restore_spread]
            .iter()
            .all(|s| *s <= LINEAR_SPREAD),
        full_line,
        second_line: line_of(|s| s.second_secs),
        restore_line,
        max_peak_bytes,
        peak_growth,
        peak_under_limit: max_peak_bytes < PEAK_LIMIT,
        peak_flat: peak_growth <= 1.0 + LINEAR_SPREAD,
        projected_full_secs_10gb,
        projected_restore_secs_10gb: restore_line.at(gib_10gb),
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
        let steps: [StepRows; 3] = [
            ("full", |s| s.full_secs, |v| v.full_spread),
            ("second", |s| s.second_secs, |v| v.second_spread),
            ("restore", |s| s.restore_secs, |v| v.restore_spread),
        ];
        for (step, secs, spread) in steps {
            line(
                &format!("{name} {step}: time"),
                &|s| format!("{:.2} s", secs(s)),
                String::new(),
            );
            line(
                &format!("{name} {step}: per GiB"),
                &|s| format!("{:.2} s", s.per_gib(secs(s))),
                pct(spread),
            );
        }
        let mb = |b: u64| format!("{:.0} MB", b as f64 / 1e6);
        line(
            &format!("{name} peak memory"),
            &|s| mb(s.peak_bytes()),
            v.map(|v| format!("{:.2}x", v.peak_growth))
                .unwrap_or_else(|| "-".into()),
        );
        for (i, step) in STEP_NAMES.into_iter().enumerate() {
            line(
                &format!("{name}   in the {step}"),
                &|s| mb(s.step_peaks()[i]),
                String::new(),
            );
        }
        if let Some(v) = v {
            for (step, l) in [
                ("full", v.full_line),
                ("second", v.second_line),
                ("restore", v.restore_line),
            ] {
                println!(
                    "{:<34} {:.2} s + {:.2} s per GiB",
                    format!("{name} {step}: fixed + per GiB"),
                    l.fixed_secs,
                    l.per_gib_secs
                );
            }
        }
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
            "  {:<8} projected for a 10 GB database (fixed + per GiB): full {:.1} min, restore {:.1} min; full within R10.4's 15 minutes: {}",
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
            full_peak_bytes: peak,
            second_peak_bytes: peak / 2,
            restore_peak_bytes: peak / 3,
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
        assert_eq!(v.max_peak_bytes, 110_000_000);
        // The fitted line, at 10 GB (9.31 GiB): close to 4 s per GiB.
        let expected = v.full_line.fixed_secs + v.full_line.per_gib_secs * 1e10 / GIB;
        assert!((v.projected_full_secs_10gb - expected).abs() < 1e-9);
        assert!((v.full_line.per_gib_secs - 4.0).abs() < 0.1, "{v:?}");
        assert!(v.full_within_r10_4);
        assert!(verdict(Method::Physical, &s).is_none());
    }

    #[test]
    fn a_fixed_cost_shows_as_the_line_s_intercept() {
        let points = [(0.5, 3.0), (1.0, 5.0), (4.0, 17.0)];
        let l = Line::fit(&points);
        assert!((l.fixed_secs - 1.0).abs() < 1e-9, "{l:?}");
        assert!((l.per_gib_secs - 4.0).abs() < 1e-9, "{l:?}");
        assert!((l.at(10.0) - 41.0).abs() < 1e-9);
        // One size: no fixed cost can be told apart, the rate is that size's.
        let one = Line::fit(&[(2.0, 10.0)]);
        assert_eq!((one.fixed_secs, one.per_gib_secs), (0.0, 5.0));
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
