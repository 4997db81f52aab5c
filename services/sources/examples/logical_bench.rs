//! Measures the logical dump (and optionally a restore) against a database, with a sink that
//! reads and discards (or spools to a directory), so the source's own speed shows.
//!
//! Usage: cargo run --release -p backstop-sources --example logical_bench -- CONNINFO [JOBS]
//!        [--restore-to CONNINFO --spool DIR]
//! Reports wall time, bytes, rows and this process's peak RSS. Not a test: numbers for notes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use backstop_sources::pg::logical::{
    self, DumpOptions, DumpSink, DumpSource, PartReader, PartStored, RestoreOptions, SinkError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Discards parts (or writes them under `dir`), counting bytes.
struct Bench {
    dir: Option<PathBuf>,
}

impl Bench {
    fn path(&self, name: &str) -> Option<PathBuf> {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.as_ref().map(|d| d.join(hex))
    }
}

#[async_trait]
impl DumpSink for Bench {
    async fn put_part(&self, name: &str, mut reader: PartReader) -> Result<PartStored, SinkError> {
        let mut file = match self.path(name) {
            Some(p) => Some(tokio::fs::File::create(p).await?),
            None => None,
        };
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if let Some(f) = file.as_mut() {
                f.write_all(&buf[..n]).await?;
            }
        }
        Ok(PartStored {
            stored_bytes: total,
            new_bytes: total,
        })
    }
}

#[async_trait]
impl DumpSource for Bench {
    async fn open_part(&self, name: &str) -> Result<PartReader, SinkError> {
        let path = self
            .path(name)
            .ok_or_else(|| SinkError::new("no spool directory"))?;
        Ok(Box::pin(tokio::fs::File::open(path).await?))
    }
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let conninfo = args
        .get(1)
        .ok_or("usage: logical_bench CONNINFO [JOBS] [--restore-to CONNINFO --spool DIR]")?;
    let jobs: usize = args.get(2).and_then(|j| j.parse().ok()).unwrap_or(2);
    let flag = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let restore_to = flag("--restore-to");
    let spool = flag("--spool").map(PathBuf::from);
    let bench = Arc::new(Bench { dir: spool });

    let t = Instant::now();
    let report = logical::dump(
        conninfo,
        &DumpOptions {
            jobs,
            ..DumpOptions::default()
        },
        bench.clone(),
    )
    .await?;
    println!(
        "dump: {:.2} s, {} bytes, {} rows, {} tables, jobs {jobs}, peak RSS {} KB",
        t.elapsed().as_secs_f64(),
        report.raw_bytes,
        report.total_rows,
        report.tables.len(),
        peak_rss_kb()
    );
    for p in report.parts.iter().filter(|p| p.raw_bytes > 1_000_000) {
        println!(
            "  {:<40} {:>12} bytes {:>7} ms",
            p.name, p.raw_bytes, p.duration_ms
        );
    }
    if let Some(target) = restore_to {
        let t = Instant::now();
        let r = logical::restore(
            &target,
            &RestoreOptions {
                jobs,
                create_db: true,
                ..RestoreOptions::default()
            },
            bench,
            &report,
        )
        .await?;
        println!(
            "restore: {:.2} s (pre-data {} ms, data {} ms, post-data {} ms), {} rows, peak RSS {} KB",
            t.elapsed().as_secs_f64(),
            r.pre_data_ms,
            r.data_ms,
            r.post_data_ms,
            r.rows,
            peak_rss_kb()
        );
    }
    Ok(())
}
