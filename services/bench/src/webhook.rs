//! `backstop bench webhook`: durable webhook-log appends (`ops::webhook`, fsync before the
//! acknowledgement, group commit) per second and p50/p99 latency with 1, 16 and 256
//! concurrent senders, each appending 200-byte signals in a loop to a fresh log in `--dir`
//! (default: the temporary directory; say which file system it is on, since fsync on tmpfs
//! costs nothing). No repository: sealed segments stay on disk. Each configuration runs
//! `--runs` times; the report gives the median run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backstop_ops::schedule::SystemClock;
use backstop_ops::webhook::{self, WebhookConfig};
use clap::Args;

#[derive(Args)]
pub struct BenchWebhookArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent senders to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    senders: Vec<usize>,
    /// Runs per configuration; the median run is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where the logs are written (a directory on the disk to measure).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
struct Figures {
    senders: usize,
    signals: u64,
    signals_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

pub async fn run(args: BenchWebhookArgs) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds.max(1));
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut rows = Vec::new();
    for &n in &args.senders {
        let mut runs = Vec::new();
        for _ in 0..args.runs.max(1) {
            runs.push(measure(n.max(1), duration, &parent).await?);
        }
        runs.sort_by(|a, b| a.signals_per_sec.total_cmp(&b.signals_per_sec));
        rows.push(runs.swap_remove(runs.len() / 2));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "backstop bench webhook: {} s per run, median of {} runs, {} cores, logs in {}",
        args.seconds,
        args.runs,
        crate::shared::cores(),
        parent.display()
    );
    println!(
        "{:>7} {:>10} {:>12} {:>9} {:>9}",
        "senders", "signals", "signals/s", "p50 ms", "p99 ms"
    );
    for r in &rows {
        println!(
            "{:>7} {:>10} {:>12.0} {:>9.2} {:>9.2}",
            r.senders, r.signals, r.signals_per_sec, r.p50_ms, r.p99_ms
        );
    }
    Ok(())
}

async fn measure(
    senders: usize,
    duration: Duration,
    parent: &std::path::Path,
) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir_in(parent)?;
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let config = [WebhookConfig {
        name: "bench".into(),
        token: Some("bench-token-0123456789".into()),
        token_file: None,
        keep: None,
    }];
    let (logs, _tasks) = webhook::open(dir.path(), &config, None, Arc::new(SystemClock), stop)?;
    let log = logs
        .get("bench")
        .ok_or_else(|| anyhow::anyhow!("the bench log did not open"))?;
    let body = vec![b'x'; 200];
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..senders {
        let (log, body) = (log.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                log.append(body.clone()).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, webhook::WebhookError>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p).round() as usize)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    Ok(Figures {
        senders,
        signals: all.len() as u64,
        signals_per_sec: all.len() as f64 / elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    })
}
