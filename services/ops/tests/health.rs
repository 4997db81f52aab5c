//! The health monitor's loop against a real HTTP server on loopback, on a manual clock.
//!
//! The server follows a script: fail twice (503), answer slowly three times, then answer in
//! time. "Slowly" is done by the server moving the injected clock 4 s forward before it answers:
//! the monitor measures latency on that clock (see `ops::health`), so the seeds' 3 s threshold
//! is tested as configured without the test waiting 12 real seconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use backstop_events::{Event, HealthState};
use backstop_ledger::{Ledger, LedgerConfig};
use backstop_ops::health::{self, EndpointConfig, HealthConfig};
use backstop_ops::schedule::{Clock, ManualClock};
use backstop_ops::storage_probe::{self, StorageSeries};
use backstop_repo::backend::{Backend, MemoryBackend};
use chrono::{TimeDelta, TimeZone, Utc};
use tokio::sync::watch;

#[derive(Clone)]
struct Script {
    clock: Arc<ManualClock>,
    calls: Arc<AtomicUsize>,
}

async fn answer(State(s): State<Script>) -> StatusCode {
    let n = s.calls.fetch_add(1, Ordering::SeqCst);
    match n {
        0 | 1 => StatusCode::SERVICE_UNAVAILABLE,
        2..=4 => {
            s.clock.advance_to(s.clock.now() + TimeDelta::seconds(4));
            StatusCode::OK
        }
        _ => StatusCode::OK,
    }
}

fn recorded(ledger: &Ledger) -> Vec<(chrono::DateTime<Utc>, bool, HealthState, u64)> {
    ledger
        .read(1, 1000)
        .unwrap()
        .iter()
        .filter_map(|e| match e.event() {
            Ok(Event::HealthChecked(h)) => Some((e.occurred_at, h.ok, h.state, h.latency_ms)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn fails_twice_then_slow_three_times_then_recovers_recording_down_up_degraded_up() {
    let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap();
    let clock = Arc::new(ManualClock::new(t0));
    // The loop runs until 40 minutes in, then parks.
    clock.set_horizon(Some(t0 + TimeDelta::minutes(40)));
    let script = Script {
        clock: clock.clone(),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let app = Router::new()
        .route("/healthz", get(answer))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let config: HealthConfig = toml::from_str(&format!(
        r#"
        [[endpoints]]
        name = "platform"
        url = "http://{addr}/healthz"
        "#
    ))
    .unwrap();
    config.validate().unwrap();
    let (stop, shutdown) = watch::channel(false);
    let monitor = {
        let (ledger, clock) = (ledger.clone(), clock.clone());
        tokio::spawn(async move {
            health::run(&config, Some(&ledger), &ledger, clock.as_ref(), shutdown).await
        })
    };
    clock.wait_parked(1).await;

    let events = recorded(&ledger);
    let at = |s: i64| t0 + TimeDelta::seconds(s);
    assert_eq!(
        events,
        vec![
            // The first failure, recorded, not yet judged.
            (at(0), false, HealthState::Up, 0),
            // The confirming re-check 30 s later: Down within a minute of the first failure.
            (at(30), false, HealthState::Down, 0),
            // At the next regular slot it answers, slowly: Up (answering) but recorded.
            (at(300), true, HealthState::Up, 4000),
            (at(600), true, HealthState::Up, 4000),
            // The third slow answer in a row: Degraded.
            (at(900), true, HealthState::Degraded, 4000),
            // In time again: Up. The healthy checks after it (20..40 min) are not recorded.
            (at(1200), true, HealthState::Up, 0),
        ]
    );
    // Every slot was checked: 2 failures, 3 slow, then 10:20..10:40 in time.
    assert_eq!(script.calls.load(Ordering::SeqCst), 2 + 3 + 5);
    let changes: Vec<HealthState> = events
        .windows(2)
        .filter(|w| w[0].2 != w[1].2)
        .map(|w| w[1].2)
        .collect();
    assert_eq!(
        changes,
        vec![
            HealthState::Down,
            HealthState::Up,
            HealthState::Degraded,
            HealthState::Up
        ]
    );

    // A second monitor over the same slots (a second `serve`) records nothing new: its ids are
    // the first one's.
    let head = ledger.head().position;
    let again = HealthConfig {
        endpoints: vec![EndpointConfig {
            name: "platform".into(),
            url: format!("http://{addr}/healthz"),
            expected_status: None,
            timeout: None,
        }],
        ..HealthConfig::default()
    };
    let clock2 = Arc::new(ManualClock::new(t0 + TimeDelta::minutes(20)));
    clock2.set_horizon(Some(t0 + TimeDelta::minutes(20)));
    let (stop2, shutdown2) = watch::channel(false);
    let second = {
        let (ledger, clock2) = (ledger.clone(), clock2.clone());
        tokio::spawn(
            async move { health::run(&again, None, &ledger, clock2.as_ref(), shutdown2).await },
        )
    };
    clock2.wait_parked(1).await;
    assert_eq!(
        ledger.head().position,
        head,
        "the 10:20 sample is already recorded"
    );

    stop.send_replace(true);
    stop2.send_replace(true);
    monitor.await.unwrap();
    second.await.unwrap();

    // A restarted monitor resumes from the last recorded check (Up at 10:20, this hour's
    // sample taken): its first check, at 10:45, healthy, records nothing.
    let config3 = HealthConfig {
        endpoints: vec![EndpointConfig {
            name: "platform".into(),
            url: format!("http://{addr}/healthz"),
            expected_status: None,
            timeout: None,
        }],
        ..HealthConfig::default()
    };
    let clock3 = Arc::new(ManualClock::new(t0 + TimeDelta::minutes(45)));
    clock3.set_horizon(Some(t0 + TimeDelta::minutes(45)));
    let (stop3, shutdown3) = watch::channel(false);
    let calls = script.calls.load(Ordering::SeqCst);
    let third = {
        let (ledger, clock3) = (ledger.clone(), clock3.clone());
        tokio::spawn(async move {
            health::run(&config3, Some(&ledger), &ledger, clock3.as_ref(), shutdown3).await
        })
    };
    clock3.wait_parked(1).await;
    assert_eq!(script.calls.load(Ordering::SeqCst), calls + 1, "it checked");
    assert_eq!(ledger.head().position, head, "and recorded nothing");
    stop3.send_replace(true);
    third.await.unwrap();
    server.abort();
}

#[tokio::test]
async fn the_storage_probe_records_connectivity_and_one_usage_sample_a_day() {
    let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 23, 50, 0).unwrap();
    let clock = Arc::new(ManualClock::new(t0));
    clock.set_horizon(Some(t0 + TimeDelta::minutes(20)));
    let backend = Arc::new(MemoryBackend::new());
    backend
        .put("chunks/aa/aa01", bytes::Bytes::from(vec![0u8; 1000]))
        .await
        .unwrap();
    backend
        .put("manifests/x", bytes::Bytes::from(vec![0u8; 24]))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let series = StorageSeries {
        repository: "memory://test".into(),
        region: "us-east-1".into(),
        storage_class: "STANDARD".into(),
    };
    let (stop, shutdown) = watch::channel(false);
    let probe = {
        let (ledger, clock) = (ledger.clone(), clock.clone());
        let backend: Arc<dyn Backend> = backend.clone();
        tokio::spawn(async move {
            storage_probe::run(
                backend,
                series,
                std::time::Duration::from_secs(300),
                &ledger,
                clock.as_ref(),
                shutdown,
            )
            .await
        })
    };
    clock.wait_parked(1).await;
    let mut connectivity = Vec::new();
    let mut usage = Vec::new();
    for e in ledger.read(1, 1000).unwrap() {
        match e.event().unwrap() {
            Event::StorageConnectivityChecked(c) => connectivity.push((e.occurred_at, c.ok)),
            Event::StorageUsageSampled(u) => {
                usage.push((e.occurred_at, u.bytes, u.objects, u.repository))
            }
            _ => {}
        }
    }
    // 23:50 (first), 00:00 (a new hour); 23:55, 00:05, 00:10 are unchanged and not recorded.
    assert_eq!(
        connectivity,
        vec![(t0, true), (t0 + TimeDelta::minutes(10), true)]
    );
    // One sample for each UTC day, at its midnight.
    let day1 = Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0).unwrap();
    let day2 = Utc.with_ymd_and_hms(2026, 3, 3, 0, 0, 0).unwrap();
    assert_eq!(
        usage,
        vec![
            (day1, 1024, 2, "memory://test".to_string()),
            (day2, 1024, 2, "memory://test".to_string())
        ]
    );
    stop.send_replace(true);
    probe.await.unwrap();
}
