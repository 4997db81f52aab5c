//! `backstop bench prune`: garbage collection over a large local repository (default 1,000,000
//! chunk objects referenced by 1,000 manifests, the older half of them forgotten), wall time and
//! peak memory of the mark run and of the sweep run past the grace. A report, not a test: it
//! measures and prints; it asserts nothing (the targets are printed beside the figures).
//!
//! The work is `backstop_repo::gc_bench` (its module doc says how the repository is built and
//! how peak memory is measured: the kernel's high-water mark of this process, reset before
//! each run). Run the release build: `cargo build --release -p backstop -p backstop-bench`, then
//! `target/release/backstop bench prune`.
//!
//! Measured on the 2-core development machine, release build, defaults (1,000,000 chunks, 1,000
//! manifests, 2,000,000 references, 500 forgotten, 1 Mi ids in memory, no spill): setup 34.9 s;
//! mark run 4.2 s and 115 MiB peak (499,000 marked in 5 lists); sweep run 24.4 s and 241 MiB
//! peak (499,000 swept in a 20.7 s sweep, 501,000 chunks left). Both within the targets of
//! 60 s and 300 MB per run.

use std::path::PathBuf;

use anyhow::Context;
use backstop_repo::gc_bench::{PruneBenchFigures, bench_prune_with};
use clap::Args;

/// The targets for each run.
const TARGET_SECONDS: f64 = 60.0;
const TARGET_MIB: f64 = 300.0;

#[derive(Args)]
pub struct BenchPruneArgs {
    /// Chunk objects in the repository.
    #[arg(long, default_value_t = 1_000_000)]
    chunks: usize,
    /// Manifests referencing them (each chunk is referenced by two); the older half is forgotten.
    #[arg(long, default_value_t = 1_000)]
    manifests: usize,
    /// Chunk ids the reference set keeps in memory before it spills to disk.
    #[arg(long, default_value_t = 1 << 20)]
    memory_ids: usize,
    /// Parent of the temporary working directory (default: the system's temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: BenchPruneArgs) -> anyhow::Result<()> {
    let dir = match &args.work_dir {
        Some(parent) => tempfile::tempdir_in(parent),
        None => tempfile::tempdir(),
    }
    .context("cannot create the benchmark's working directory")?;
    let f = bench_prune_with(dir.path(), args.chunks, args.manifests, args.memory_ids)
        .await
        .context("the prune benchmark failed")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&f)?);
    } else {
        print_report(&f);
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "within target" } else { "OVER TARGET" }
}

fn print_report(f: &PruneBenchFigures) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let secs = |ms: u64| ms as f64 / 1000.0;
    println!(
        "backstop bench prune: {} chunks, {} manifests ({} references), {} forgotten; {} ids in memory (spilled: {})",
        f.chunks, f.manifests, f.references, f.forgotten, f.memory_ids, f.spilled
    );
    println!("setup: {:.1} s (not part of the figures)", secs(f.setup_ms));
    println!(
        "mark run:  {:>8.1} s  {:>8.1} MiB peak  {} marked in {} lists  ({}, {})",
        secs(f.mark_run_ms),
        mib(f.mark_run_peak_rss_kib),
        f.newly_marked,
        f.lists_written,
        verdict(secs(f.mark_run_ms) < TARGET_SECONDS),
        verdict(mib(f.mark_run_peak_rss_kib) < TARGET_MIB)
    );
    println!(
        "sweep run: {:>8.1} s  {:>8.1} MiB peak  {} swept ({:.1} MiB) in a {:.1} s sweep; {} chunks left  ({}, {})",
        secs(f.sweep_run_ms),
        mib(f.sweep_run_peak_rss_kib),
        f.swept,
        f.bytes_reclaimed as f64 / (1 << 20) as f64,
        secs(f.sweep_ms),
        f.chunks_left,
        verdict(secs(f.sweep_run_ms) < TARGET_SECONDS),
        verdict(mib(f.sweep_run_peak_rss_kib) < TARGET_MIB)
    );
    println!(
        "targets: each run under {TARGET_SECONDS} s and {TARGET_MIB} MiB; resident before the runs {:.1} MiB{}",
        mib(f.rss_before_kib),
        if f.hwm_reset {
            ""
        } else {
            " (the peak could not be reset: the peaks include the setup)"
        }
    );
}
