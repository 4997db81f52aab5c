//! `backstop bench api`: the dashboard and the audit query under load, over a big ledger.
//!
//! 1. Fills a fresh ledger (temporary directory) with `--events` realistic events (default
//!    1,000,000): backups with their verifications, key accesses, storage samples, WAL segments,
//!    health checks, alerts.
//! 2. Projects them into PostgreSQL (`--projections-url`, or a throwaway PostgreSQL 15 started
//!    through the testkit with `shared_buffers = 256MB`) and reports the projection speed.
//! 3. Starts `backstop serve` (the `backstop` binary, as a child process) on that ledger, prints the plans (`EXPLAIN`) of the audit queries,
//!    and drives each target from this process over loopback: `wrk -t2 -c8 --latency` at full
//!    speed (saturation throughput and its p99), then a paced run at `--rate` requests per second
//!    whose latencies are measured from each request's scheduled time (so a stall counts against
//!    every request it delays, unlike a closed loop).
//!
//! It measures and prints; it asserts nothing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use backstop_events::{Actor, Event, HealthChecked, NewEvent, WalArchived, streams};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};
use backstop_projections::read::AuditFilter;
use backstop_projections::sample::{self, BackupSpec};
use backstop_projections::{Projections, projectors};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Args)]
pub struct BenchApiArgs {
    /// Events in the ledger.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// PostgreSQL for the projections; default: start a throwaway PostgreSQL 15.
    #[arg(long)]
    projections_url: Option<String>,
    /// Seconds per load run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Requests per second of the paced runs.
    #[arg(long, default_value_t = 200)]
    rate: u64,
}

const TOKEN: &str = "bench-operator-token-0123456789abcdef";

pub async fn run(args: BenchApiArgs, backstop: &Path) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let mut throwaway = None;
    let url = match args.projections_url.clone() {
        Some(u) => u,
        None => {
            let options = backstop_testkit::PostgresOptions::new()
                .conf("shared_buffers = 256MB")
                .conf("max_connections = 50");
            let pg = backstop_testkit::Postgres::start_with(options).context(
                "starting PostgreSQL 15 for the projections (or pass --projections-url)",
            )?;
            let u = pg.conninfo("postgres");
            throwaway = Some(pg);
            u
        }
    };
    let data = work.path().join("data");
    println!(
        "backstop bench api: {} events, {} cores",
        args.events,
        crate::shared::cores()
    );

    // 1. Fill.
    let started = Instant::now();
    let mut cfg = LedgerConfig::in_data_dir(&data);
    cfg.checkpoint_every = 10_000;
    let ledger = Ledger::open(&cfg)?;
    fill(&ledger, args.events).await?;
    let head = ledger.head().position;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fill:     {head} events in {secs:.1} s ({:.0} events/s)",
        head as f64 / secs
    );

    // 2. Project.
    let projections = Projections::connect(&url).await?;
    projections.migrate().await?;
    let mut handles = Vec::new();
    for p in projectors() {
        let (projections, ledger) = (projections.clone(), ledger.clone());
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = projections.rebuild(&ledger, p.as_ref(), 2000).await;
            (p.name(), r, t.elapsed().as_secs_f64())
        }));
    }
    for h in handles {
        let (name, r, secs) = h.await?;
        let n = r?;
        println!(
            "project:  {name:<6} {n} events in {secs:.1} s ({:.0} events/s, both projectors running at once)",
            n as f64 / secs
        );
    }
    projections.analyze().await?;
    ledger.close().await;

    // 3. Serve and load.
    let tokens = work.path().join("tokens");
    std::fs::write(&tokens, format!("bench operator {TOKEN}\n"))?;
    let config = work.path().join("backstop.toml");
    std::fs::write(
        &config,
        format!("[api]\ntokens_file = \"{}\"\n", tokens.display()),
    )?;
    let port = backstop_testkit::try_free_port()?;
    let log_path = work.path().join("serve.log");
    let log = std::fs::File::create(&log_path)?;
    let mut serve = Command::new(backstop)
        .arg("--data-dir")
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .args([
            "serve",
            "--no-workers",
            "--projections-url",
            &url,
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .env("BACKSTOP_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} serve", backstop.display()))?;
    let result = load(&args, port, &projections).await;
    let _ = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status();
    let _ = serve.wait();
    drop(throwaway);
    result.with_context(|| {
        format!(
            "backstop serve's log ends:\n{}",
            backstop_testkit::log_tail(&log_path, 20)
        )
    })
}

/// Appends `target` events with 8 concurrent appenders, each append a batch on one stream.
async fn fill(ledger: &Ledger, target: u64) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<NewEvent>>(256);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (ledger, rx) = (ledger.clone(), rx.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let batch = rx.lock().await.recv().await;
                let Some(batch) = batch else {
                    return Ok::<(), anyhow::Error>(());
                };
                let stream = batch[0].stream.clone();
                ledger.append(&stream, ExpectedVersion::Any, batch).await?;
            }
        }));
    }
    let now = chrono::Utc::now();
    let sources = ["trading", "reference", "risk", "ledger-db", "analytics"];
    let mut produced = 0u64;
    let mut i = 0u64;
    while produced < target {
        // Per round (about 100 events): one backup with its verification (5 events), a batch
        // of key accesses, WAL segments, health checks and a storage sample.
        let at = now - chrono::Duration::minutes(((target - produced) / 100) as i64);
        let mut spec = BackupSpec::new(
            sources[(i % 5) as usize],
            at,
            500_000_000 + (i % 97) * 3_000_000,
        );
        spec.verified = Some(i % 50 != 7);
        let mut batches = vec![sample::backup(&spec).1];
        batches.push(
            (0..30)
                .map(|k| sample::key_access("database", &format!("backup {i}/{k}")))
                .collect(),
        );
        batches.push(
            (0..40)
                .map(|k| {
                    NewEvent::new(
                        streams::wal(1),
                        Actor::worker("wal"),
                        &Event::WalArchived(WalArchived {
                            timeline: 1,
                            segment: format!("{:024X}", i * 40 + k),
                            sha3: "0".repeat(64),
                            bytes: 16 << 20,
                            object: format!("wal/{i}/{k}"),
                        }),
                    )
                })
                .collect(),
        );
        batches.push(
            (0..24)
                .map(|k| {
                    NewEvent::new(
                        streams::health("https://app.internal/health"),
                        Actor::worker("monitor"),
                        &Event::HealthChecked(HealthChecked {
                            endpoint: "https://app.internal/health".into(),
                            ok: k % 17 != 0,
                            status: Some(200),
                            latency_ms: 20 + k,
                            error: None,
                            state: Default::default(),
                        }),
                    )
                })
                .collect(),
        );
        batches.push(vec![sample::storage_sample(
            at,
            10_000_000_000 + i * 1_000_000,
            100_000 + i,
        )]);
        if i % 500 == 3 {
            batches.push(vec![sample::alert(
                "size_change",
                sources[(i % 5) as usize],
                "backup size changed by more than 20%",
            )]);
        }
        for mut b in batches {
            let room = (target - produced) as usize;
            if room == 0 {
                break;
            }
            b.truncate(room);
            produced += b.len() as u64;
            tx.send(b)
                .await
                .map_err(|_| anyhow::anyhow!("appenders stopped"))?;
        }
        i += 1;
    }
    drop(tx);
    for w in workers {
        w.await??;
    }
    Ok(())
}

async fn load(args: &BenchApiArgs, port: u16, projections: &Projections) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = request(port, "/healthz").await {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("backstop serve did not answer /healthz within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (label, f) in [
        (
            "audit, by type",
            AuditFilter {
                types: vec!["backup.completed".into()],
                limit: 50,
                ..Default::default()
            },
        ),
        (
            "audit, by actor, page 2",
            AuditFilter {
                actor: Some("operator:alice".into()),
                before: Some(500_000),
                limit: 50,
                ..Default::default()
            },
        ),
        (
            "audit, by stream",
            AuditFilter {
                stream: Some("alerts".into()),
                limit: 50,
                ..Default::default()
            },
        ),
    ] {
        println!(
            "\nEXPLAIN {label}:\n{}",
            projections.explain_audit(&f).await?
        );
    }
    let targets = [
        ("overview page", "/".to_string()),
        (
            "audit query",
            "/api/audit?type=backup.completed&limit=50".to_string(),
        ),
        (
            "audit query, actor + page",
            "/api/audit?actor=operator:alice&before=500000&limit=50".to_string(),
        ),
    ];
    // `/healthz` answers as soon as the listener is up, while the read models may still be
    // migrating (503 with Retry-After): wait for each target to be ready before timing it.
    for (_, path) in &targets {
        loop {
            let (status, _) = request(port, path).await?;
            if status == 200 {
                break;
            }
            if status != 503 || Instant::now() > deadline {
                anyhow::bail!("GET {path} answered {status}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!();
    println!(
        "{:<28} {:>12} {:>10} {:>10} | {:>8} {:>10} {:>10} {:>10} {:>7}",
        "target",
        "wrk req/s",
        "wrk p50",
        "wrk p99",
        "paced/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "errors"
    );
    for (label, path) in &targets {
        let url = format!("http://127.0.0.1:{port}{path}");
        let wrk = run_wrk(&url, args.seconds);
        let paced = paced(port, path, args.rate, args.seconds).await;
        let (rps, p50, p99) = match &wrk {
            Ok(w) => (
                format!("{:.0}", w.0),
                format!("{:.2} ms", w.1),
                format!("{:.2} ms", w.2),
            ),
            Err(e) => {
                eprintln!("wrk: {e:#}");
                ("-".into(), "-".into(), "-".into())
            }
        };
        println!(
            "{label:<28} {rps:>12} {p50:>10} {p99:>10} | {:>8.0} {:>10.2} {:>10.2} {:>10.2} {:>7}",
            paced.rate, paced.p50, paced.p99, paced.max, paced.errors
        );
    }
    Ok(())
}

/// Runs wrk at full speed; returns (requests/s, p50 ms, p99 ms).
fn run_wrk(url: &str, seconds: u64) -> anyhow::Result<(f64, f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t2", "-c8", &format!("-d{seconds}s"), "--latency", "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(url)
        .output()
        .context("wrk is not installed (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("wrk printed no Requests/sec:\n{text}"))?;
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| {
                let l = l.trim();
                l.strip_prefix(p).map(|v| parse_wrk_time(v.trim()))
            })
            .flatten()
            .unwrap_or(f64::NAN)
    };
    Ok((rps, pct("50%"), pct("99%")))
}

/// `1.23ms`, `850.00us`, `1.02s` -> milliseconds.
fn parse_wrk_time(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

struct Paced {
    rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
    errors: u64,
}

/// Sends `rate` requests per second for `seconds`, each at its scheduled time on one of a pool
/// of keep-alive connections; latency runs from the scheduled time to the last byte.
async fn paced(port: u16, path: &str, rate: u64, seconds: u64) -> Paced {
    let total = rate.max(1) * seconds.max(1);
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let pool = Arc::new(tokio::sync::Mutex::new(Vec::<tokio::net::TcpStream>::new()));
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let (pool, path) = (pool.clone(), path.to_string());
        tasks.push(tokio::spawn(async move {
            let conn = pool.lock().await.pop();
            let mut conn = match conn {
                Some(c) => c,
                None => tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()?,
            };
            let ok = exchange(&mut conn, port, &path).await.ok()? == 200;
            let latency = scheduled.elapsed();
            pool.lock().await.push(conn);
            ok.then_some(latency)
        }));
    }
    let mut lat = Vec::with_capacity(total as usize);
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Some(l)) => lat.push(l.as_secs_f64() * 1000.0),
            _ => errors += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)]
        }
    };
    Paced {
        rate: total as f64 / elapsed,
        p50: q(0.50),
        p99: q(0.99),
        max: lat.last().copied().unwrap_or(f64::NAN),
        errors,
    }
}

async fn request(port: u16, path: &str) -> anyhow::Result<(u16, usize)> {
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let status = exchange(&mut c, port, path).await?;
    Ok((status, 0))
}

/// One keep-alive GET; reads the whole response (Content-Length or chunked).
async fn exchange(c: &mut tokio::net::TcpStream, port: u16, path: &str) -> anyhow::Result<u16> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    c.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = [0u8; 16 * 1024];
    let header_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        let n = c.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        while buf.len() < header_end + len {
            let n = c.read(&mut chunk).await?;
            if n == 0 {
                anyhow::bail!("connection closed mid-body");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    } else {
        // Chunked: read until the terminating zero-size chunk.
        while find(&buf[header_end..], b"\r\n0\r\n\r\n").is_none()
            && !buf[header_end..].starts_with(b"0\r\n\r\n")
        {
            let n = c.read(&mut chunk).await?;
            if n == 0 {
                anyhow::bail!("connection closed mid-body");
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(status)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
