//! `backstop bench fuzz`: runs the cargo-fuzz targets of fuzz/ (Backstop's parsers: envelopes,
//! remote append requests, manifests, sealed objects, the pg_dump table of contents, the tar
//! reader, WAL names, the configuration file) for `--seconds` each, and prints per target the
//! executions, executions per second, coverage (libFuzzer's `cov:` edges and `ft:` features of
//! its last status line) and any crash with the file libFuzzer wrote its input to. Not part of
//! CI: it needs the nightly toolchain and cargo-fuzz (installed on demand with
//! `cargo install cargo-fuzz --locked` when `cargo +nightly fuzz` is missing).
//!
//! Each target is `cargo +nightly fuzz run -s none -a <target> fuzz/target/corpus/<target>
//! fuzz/corpus/<target> -- -max_total_time=N -print_final_stats=1`, from the repository root:
//! - `-s none`: the targets are safe Rust, where a bug shows as a panic, which libFuzzer catches
//!   without AddressSanitizer; ASan doubles the build and halves the executions per second.
//! - `-a`: debug assertions and overflow checks, so an arithmetic overflow is a crash too.
//! - New inputs go to `fuzz/target/corpus/<target>` (not committed); the seeds in
//!   `fuzz/corpus/<target>` (committed) are only read. Crash inputs land in
//!   `fuzz/artifacts/<target>/`; `cargo +nightly fuzz run <target> <file>` replays one.
//! - libFuzzer's output goes to `fuzz/target/logs/<target>.log`, which the report is read from.
//!
//! The exit status is a failure when any target crashed, so a scripted run notices.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

/// Every target in fuzz/Cargo.toml, in the order they run.
pub const TARGETS: [&str; 8] = [
    "envelope",
    "append_request",
    "manifest",
    "sealed",
    "pg_toc",
    "tar",
    "wal_name",
    "config",
];

#[derive(Args)]
pub struct BenchFuzzArgs {
    /// Seconds of fuzzing per target (libFuzzer's `-max_total_time`).
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Run only this target (repeatable); default: all of them.
    #[arg(long = "target", value_name = "T")]
    targets: Vec<String>,
    /// The repository checkout holding fuzz/ (default: the one this binary was built from).
    #[arg(long)]
    repo: Option<PathBuf>,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

/// What one target's run showed.
#[derive(Debug, Default, PartialEq, Serialize)]
pub struct FuzzFigures {
    pub target: String,
    pub seconds: u64,
    /// Inputs executed (`stat::number_of_executed_units`, else the last `#N` status line).
    pub executions: u64,
    pub executions_per_second: u64,
    /// Edges covered (`cov:`) and features (`ft:`) on the last status line.
    pub cov: u64,
    pub ft: u64,
    /// Inputs in the corpus at the end (`corp:`).
    pub corpus: u64,
    /// Where libFuzzer wrote the crashing input, if the target crashed.
    pub crash: Option<String>,
    /// The panic message or libFuzzer's error line of a crash.
    pub crash_reason: Option<String>,
}

pub async fn run(args: BenchFuzzArgs) -> anyhow::Result<()> {
    let repo = match &args.repo {
        Some(r) => r.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    };
    if !repo.join("fuzz/Cargo.toml").is_file() {
        bail!(
            "{} has no fuzz/Cargo.toml: pass the repository checkout with --repo",
            repo.display()
        );
    }
    let targets: Vec<String> = if args.targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        for t in &args.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!(
                    "unknown fuzz target {t:?}; the targets: {}",
                    TARGETS.join(", ")
                );
            }
        }
        args.targets.clone()
    };
    ensure_cargo_fuzz(&repo).await?;
    eprintln!("building the fuzz targets (cargo +nightly fuzz build -s none -a)...");
    let status = cargo(&repo)
        .args(["fuzz", "build", "-s", "none", "-a"])
        .status()
        .await
        .context("cannot run cargo +nightly fuzz build")?;
    if !status.success() {
        bail!("cargo +nightly fuzz build failed ({status})");
    }
    let logs = repo.join("fuzz/target/logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut all = Vec::new();
    for target in &targets {
        eprintln!("fuzzing {target} for {} s...", args.seconds);
        let f = run_target(&repo, &logs, target, args.seconds).await?;
        eprintln!(
            "  {} executions, cov {}, ft {}{}",
            f.executions,
            f.cov,
            f.ft,
            if f.crash.is_some() { ", CRASHED" } else { "" }
        );
        all.push(f);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        print_report(&all);
    }
    let crashed: Vec<&str> = all
        .iter()
        .filter(|f| f.crash.is_some())
        .map(|f| f.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {}", crashed.join(", "));
    }
    Ok(())
}

fn cargo(repo: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("cargo");
    c.arg("+nightly").current_dir(repo);
    c
}

/// Installs cargo-fuzz when `cargo +nightly fuzz` does not run.
async fn ensure_cargo_fuzz(repo: &Path) -> anyhow::Result<()> {
    let present = cargo(repo)
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    eprintln!("cargo-fuzz is missing: cargo install cargo-fuzz --locked");
    let status = tokio::process::Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .await
        .context("cannot run cargo install cargo-fuzz (is the nightly toolchain installed?)")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status})");
    }
    Ok(())
}

async fn run_target(
    repo: &Path,
    logs: &Path,
    target: &str,
    seconds: u64,
) -> anyhow::Result<FuzzFigures> {
    let work = repo.join("fuzz/target/corpus").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let seeds = format!("fuzz/corpus/{target}");
    let status = cargo(repo)
        .args(["fuzz", "run", "-s", "none", "-a", target])
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .stdout(log.try_clone().context("cannot share the log file")?)
        .stderr(log)
        .status()
        .await
        .with_context(|| format!("cannot run cargo +nightly fuzz run {target}"))?;
    let text = std::fs::read_to_string(&log_path)
        .with_context(|| format!("cannot read {}", log_path.display()))?;
    let mut f = parse_output(target, seconds, &text);
    if !status.success() && f.crash.is_none() {
        // Not a crash libFuzzer reported (a build or usage error): say where to look.
        bail!(
            "cargo +nightly fuzz run {target} failed ({status}) without a crash report; see {}",
            log_path.display()
        );
    }
    if let Some(c) = &f.crash {
        // libFuzzer names the file relative to the repository root, where it ran.
        let p = Path::new(c);
        if p.is_relative() {
            f.crash = Some(repo.join(p).display().to_string());
        }
    }
    Ok(f)
}

/// Reads libFuzzer's output: the final stats (`-print_final_stats=1`), the last status line
/// (`#N DONE cov: C ft: F corp: K/...`), and a crash (`Test unit written to PATH`).
pub fn parse_output(target: &str, seconds: u64, text: &str) -> FuzzFigures {
    let mut f = FuzzFigures {
        target: target.to_string(),
        seconds,
        ..FuzzFigures::default()
    };
    let field = |line: &str, name: &str| -> Option<u64> {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name)?;
        let v = words.next()?;
        v.split('/').next()?.parse().ok()
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix('#')
            && rest.starts_with(|c: char| c.is_ascii_digit())
        {
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                f.executions = n;
            }
            if let Some(c) = field(line, "cov:") {
                f.cov = c;
            }
            if let Some(c) = field(line, "ft:") {
                f.ft = c;
            }
            if let Some(c) = field(line, "corp:") {
                f.corpus = c;
            }
            if let Some(c) = field(line, "exec/s:") {
                f.executions_per_second = c;
            }
        } else if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            f.executions = v.trim().parse().unwrap_or(f.executions);
        } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            f.executions_per_second = v.trim().parse().unwrap_or(f.executions_per_second);
        } else if let Some(rest) = line.split("Test unit written to ").nth(1) {
            f.crash = Some(rest.trim().to_string());
        } else if f.crash_reason.is_none()
            && (line.contains("panicked at") || line.starts_with("==") && line.contains("ERROR"))
        {
            f.crash_reason = Some(line.to_string());
        }
    }
    f
}

fn print_report(all: &[FuzzFigures]) {
    println!("Fuzzing: cargo +nightly fuzz run -s none -a <target>, seconds per target as shown");
    println!(
        "{:<16} {:>7} {:>12} {:>9} {:>7} {:>7} {:>7}  crash",
        "target", "seconds", "executions", "exec/s", "cov", "ft", "corpus"
    );
    for f in all {
        println!(
            "{:<16} {:>7} {:>12} {:>9} {:>7} {:>7} {:>7}  {}",
            f.target,
            f.seconds,
            f.executions,
            f.executions_per_second,
            f.cov,
            f.ft,
            f.corpus,
            match (&f.crash, &f.crash_reason) {
                (Some(c), Some(r)) => format!("{c} ({r})"),
                (Some(c), None) => c.clone(),
                _ => "none".to_string(),
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as libFuzzer 18 prints them, from a run of the `tar` target.
    const CLEAN: &str = "\
INFO: Seed: 1234
#2\tINITED cov: 180 ft: 190 corp: 3/10Kb exec/s: 0 rss: 40Mb
#4096\tpulse  cov: 300 ft: 420 corp: 40/2Kb lim: 43 exec/s: 2048 rss: 45Mb
#91234\tDONE   cov: 355 ft: 610 corp: 77/5Kb lim: 1300 exec/s: 3041 rss: 60Mb
Done 91234 runs in 30 second(s)
stat::number_of_executed_units: 91234
stat::average_exec_per_sec:     3041
stat::new_units_added:          74
";

    #[test]
    fn a_clean_run_reports_executions_and_coverage() {
        let f = parse_output("tar", 30, CLEAN);
        assert_eq!(
            f,
            FuzzFigures {
                target: "tar".into(),
                seconds: 30,
                executions: 91234,
                executions_per_second: 3041,
                cov: 355,
                ft: 610,
                corpus: 77,
                crash: None,
                crash_reason: None,
            }
        );
    }

    #[test]
    fn a_crash_reports_the_input_file_and_the_panic() {
        let out = "\
#1024\tNEW    cov: 210 ft: 300 corp: 20/1Kb lim: 14 exec/s: 0 rss: 41Mb L: 9/12 MS: 2 ChangeBit-
thread '<unnamed>' panicked at services/sources/src/pg/logical/toc.rs:104:12:
attempt to add with overflow
==4242== ERROR: libFuzzer: deadly signal
MS: 1 ChangeByte-; base unit: 0000
artifact_prefix='/w/fuzz/artifacts/pg_toc/'; Test unit written to /w/fuzz/artifacts/pg_toc/crash-3f2a
";
        let f = parse_output("pg_toc", 30, out);
        assert_eq!(
            f.crash.as_deref(),
            Some("/w/fuzz/artifacts/pg_toc/crash-3f2a")
        );
        assert!(f.crash_reason.as_deref().unwrap().contains("toc.rs:104"));
        assert_eq!((f.executions, f.cov, f.ft), (1024, 210, 300));
    }
}
