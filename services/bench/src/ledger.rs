//! `backstop bench ledger`: durable appends per second and p50/p99 append latency with 1, 16 and
//! 256 concurrent appenders, each appending single events in a loop on a fresh ledger in a
//! temporary directory, without and with NATS publication; with NATS, also the publication lag
//! (JetStream's ack time minus the event's recorded-at). Each configuration runs `--runs` times;
//! the report gives the median run. Without `--nats`, a nats-server is started through the
//! testkit for the publication runs (skipped, with a note, if none is installed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use backstop_events::{Actor, Event, NewEvent, StorageUsageSampled};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig, outbox};
use clap::Args;

#[derive(Args)]
pub struct BenchLedgerArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent appenders to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    appenders: Vec<usize>,
    /// Runs per configuration; the median run is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// NATS URL for the publication runs; default: start a throwaway nats-server if one is
    /// installed; `none` skips them.
    #[arg(long)]
    nats: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
struct Figures {
    appenders: usize,
    nats: bool,
    appends: u64,
    appends_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    lag_p50_ms: Option<f64>,
    lag_p99_ms: Option<f64>,
}

pub async fn run(args: BenchLedgerArgs) -> anyhow::Result<()> {
    let BenchLedgerArgs {
        seconds,
        appenders,
        runs,
        nats,
        json,
    } = args;
    let duration = Duration::from_secs(seconds.max(1));
    let mut throwaway = None;
    let nats_url = match nats.as_deref() {
        Some("none") => None,
        Some(url) => Some(url.to_string()),
        None => match backstop_testkit::Nats::start() {
            Ok(n) => {
                let url = n.url();
                throwaway = Some(n);
                Some(url)
            }
            Err(e) => {
                eprintln!("skipping the NATS runs (or pass --nats URL): {e:#}");
                None
            }
        },
    };
    let mut rows = Vec::new();
    for &n in &appenders {
        rows.push(median(measure_runs(n, None, duration, runs).await?));
        if let Some(url) = &nats_url {
            rows.push(median(measure_runs(n, Some(url), duration, runs).await?));
        }
    }
    drop(throwaway);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "backstop bench ledger: {seconds} s per run, median of {runs} runs, {} cores",
        crate::shared::cores()
    );
    println!(
        "{:>9} {:>5} {:>10} {:>12} {:>9} {:>9} {:>11} {:>11}",
        "appenders", "nats", "appends", "appends/s", "p50 ms", "p99 ms", "lag p50 ms", "lag p99 ms"
    );
    for r in &rows {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "{:>9} {:>5} {:>10} {:>12.0} {:>9.2} {:>9.2} {:>11} {:>11}",
            r.appenders,
            if r.nats { "yes" } else { "no" },
            r.appends,
            r.appends_per_sec,
            r.p50_ms,
            r.p99_ms,
            f(r.lag_p50_ms),
            f(r.lag_p99_ms)
        );
    }
    Ok(())
}

fn median(mut runs: Vec<Figures>) -> Figures {
    runs.sort_by(|a, b| a.appends_per_sec.total_cmp(&b.appends_per_sec));
    runs.swap_remove(runs.len() / 2)
}

async fn measure_runs(
    appenders: usize,
    nats: Option<&str>,
    duration: Duration,
    runs: usize,
) -> anyhow::Result<Vec<Figures>> {
    let mut out = Vec::new();
    for _ in 0..runs.max(1) {
        out.push(measure(appenders, nats, duration).await?);
    }
    Ok(out)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn measure(
    appenders: usize,
    nats: Option<&str>,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path()))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut lag_rx = None;
    let mut outbox_task = None;
    let stream_name = format!("BENCH_{}", uuid::Uuid::new_v4().simple());
    if let Some(url) = nats {
        let client = crate::shared::connect_nats(url).await?;
        let js = async_nats::jetstream::new(client);
        let config = outbox::OutboxConfig {
            stream: stream_name.clone(),
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        lag_rx = Some((rx, js.clone()));
        outbox_task = Some(tokio::spawn(outbox::run(
            ledger.clone(),
            js,
            config,
            stop_rx.clone(),
            Some(tx),
        )));
    }
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    let payload = Event::StorageUsageSampled(StorageUsageSampled {
        region: "bench".into(),
        storage_class: "STANDARD".into(),
        bytes: 123_456_789,
        objects: 4_321,
        repository: String::new(),
    });
    let payload = Arc::new(payload);
    for i in 0..appenders {
        let ledger = ledger.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let stream = format!("bench-{}", i % 64);
            let mut lat = Vec::with_capacity(4096);
            while Instant::now() < deadline {
                let e = NewEvent::new(&stream, Actor::System, &payload);
                let t = Instant::now();
                ledger
                    .append(&stream, ExpectedVersion::Any, vec![e])
                    .await?;
                lat.push(t.elapsed());
            }
            Ok::<_, backstop_ledger::LedgerError>(lat)
        }));
    }
    let started = Instant::now();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = started.elapsed();
    lat.sort();
    let appends = lat.len() as u64;
    let (mut lag_p50, mut lag_p99) = (None, None);
    if let Some((mut rx, js)) = lag_rx {
        // Let the outbox finish, then read every observation.
        outbox::wait_published(
            &js,
            &stream_name,
            ledger.head().position,
            Duration::from_secs(120),
        )
        .await?;
        let mut lags = Vec::new();
        while let Ok(p) = rx.try_recv() {
            lags.push(p.lag);
        }
        lags.sort();
        lag_p50 = Some(percentile(&lags, 0.50));
        lag_p99 = Some(percentile(&lags, 0.99));
        let _ = js.delete_stream(&stream_name).await;
    }
    let _ = stop_tx.send(true);
    if let Some(t) = outbox_task {
        let _ = t.await;
    }
    ledger.close().await;
    Ok(Figures {
        appenders,
        nats: nats.is_some(),
        appends,
        appends_per_sec: appends as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        lag_p50_ms: lag_p50,
        lag_p99_ms: lag_p99,
    })
}
