//! DR drills against real PostgreSQL: a slice of the trading dataset (bench/trading.sql) backed
//! up from one server and drilled onto another (the staging server); the drill passes, its
//! report names each phase's time, the endpoint answered and every table matches its snapshot.
//! Then one chunk of the backup is damaged in the repository: the next drill completes failed
//! with the restore's reason, and the alert monitor raises `drill_failed` from the ledger.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backstop_events::{Actor, Event, streams};
use backstop_ops::alerting::{AlertMonitor, AlertThresholds};
use backstop_ops::drill::{DrillPlan, run_drill};
use backstop_testkit::{Postgres, RecordingAppender};
use bytes::Bytes;

fn trading_sql() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/trading.sql")
}

/// An HTTP endpoint on loopback answering 200 on /health.
async fn health_endpoint() -> String {
    let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/health")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_passes_with_each_phase_timed_and_a_damaged_chunk_fails_it_with_an_alert() {
    let production = Postgres::start().unwrap();
    production.create_db("trading").unwrap();
    production
        .psql_file("trading", &trading_sql(), &[("rows", "3000")])
        .unwrap();
    let staging = Postgres::start().unwrap();

    let ledger = Arc::new(RecordingAppender::new());
    let repo = support::memory_repo().await;
    let dp = support::data_path(
        repo.clone(),
        ledger.clone(),
        "trading",
        production.conninfo("trading"),
    );
    let request = support::back_up(&dp, "trading", &Actor::operator("test")).await;
    let verified = HashSet::from([request.backup_id]);
    let endpoint = health_endpoint().await;
    let plan = DrillPlan {
        source: "trading".into(),
        staging: staging.conninfo("drill"),
        rto_target: Duration::from_secs(300),
        rpo: Duration::from_secs(3600),
        endpoints: vec![endpoint.clone()],
        jobs: 2,
        operator: "test".into(),
        method: backstop_ops::drill::DrillMethod::Logical,
        physical: None,
    };

    // Production moves on after the backup: counts that move are compared with the snapshot.
    production
        .psql(
            "trading",
            "INSERT INTO realtime_prices (symbol, ts, price, volume) SELECT symbol, ts, price, volume FROM realtime_prices LIMIT 25",
        )
        .unwrap();
    let report = run_drill(&dp, &plan, Some(&verified)).await.unwrap();
    assert!(report.passed, "{}", report.reason);
    assert_eq!(report.backup_id, request.backup_id);
    let names: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["fetch", "restore", "replay", "checks"]);
    assert_eq!(
        report.rto_ms,
        report.phases.iter().map(|p| p.ms).sum::<u64>()
    );
    assert!(report.endpoints.iter().all(|e| e.ok) && report.endpoints.len() == 1);
    assert!(report.rows.len() >= 2, "{:?}", report.rows);
    assert!(report.rows.iter().all(|r| r.ok), "{:?}", report.rows);
    let md = report.markdown();
    for p in &report.phases {
        assert!(md.contains(&format!("| {} |", p.name)), "{md}");
    }
    assert!(md.contains("PASSED"));
    assert!(report.html().contains("<td>restore</td>"));
    let staged = staging
        .psql("drill", "SELECT count(*) FROM realtime_prices")
        .unwrap();
    let trades = report
        .rows
        .iter()
        .find(|r| r.table == "public.realtime_prices")
        .expect("realtime_prices in the report");
    assert_eq!(trades.production, Some(trades.snapshot + 25));
    assert_eq!(staged.trim(), trades.snapshot.to_string());

    // A second drill over the same staging database: it is scratch, replaced each time.
    let again = run_drill(&dp, &plan, Some(&verified)).await.unwrap();
    assert!(again.passed, "{}", again.reason);

    // One chunk of the backup damaged: the drill completes failed, with the restore's reason.
    let chunks = repo.backend().list("chunks/").await.unwrap();
    let victim = &chunks[chunks.len() / 2].key;
    let mut obj = repo.backend().get(victim).await.unwrap().to_vec();
    let mid = obj.len() / 2;
    obj[mid] ^= 0x40;
    repo.backend().put(victim, Bytes::from(obj)).await.unwrap();
    let failed = run_drill(&dp, &plan, Some(&verified)).await.unwrap();
    assert!(!failed.passed);
    assert!(
        failed.reason.contains("the staging restore failed"),
        "{}",
        failed.reason
    );
    assert!(failed.markdown().contains("FAILED"));

    // The ledger: three drills started and completed, the last one failed with its reason.
    let events = ledger.envelopes();
    let drill_events: Vec<&str> = events
        .iter()
        .filter(|e| e.stream.starts_with("drill-"))
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(drill_events.len(), 6, "{drill_events:?}");
    let last = events
        .iter()
        .rev()
        .find(|e| e.event_type == "drill.completed")
        .unwrap();
    let Event::DrillCompleted(c) = last.event().unwrap() else {
        panic!()
    };
    assert!(!c.passed && c.reason == failed.reason && c.source == "trading");
    assert_eq!(c.report["phases"][1]["name"], "restore");

    // The alert monitor, reading the ledger, raises drill_failed for the source.
    let mut monitor = AlertMonitor::new(AlertThresholds::default(), None);
    for e in &events {
        monitor.observe(e);
    }
    assert!(monitor.record(ledger.as_ref(), chrono::Utc::now()).await >= 1);
    let raised: Vec<String> = ledger
        .envelopes()
        .into_iter()
        .filter(|e| e.stream == streams::alerts() && e.event_type == "alert.raised")
        .filter_map(|e| match e.event() {
            Ok(Event::AlertRaised(a)) => Some(format!("{} {}", a.key, a.message)),
            _ => None,
        })
        .collect();
    assert!(
        raised
            .iter()
            .any(|a| a.contains("drill_failed") && a.contains("staging restore failed")),
        "{raised:?}"
    );
}
