//! The alert rules and monitor without servers: events recorded at chosen instants, a monitor
//! rebuilt from what the appender holds (as a restarted `serve` would), asked at chosen times.
//! One test runs the monitor's loop on a real ledger with a manual clock. No real time passes.

use std::sync::Arc;

use backstop_events::{
    Actor, AlertRaised, AlertResolved, BackupCompleted, BackupFailed, BackupKind, BackupMethod,
    BackupRequested, BackupStarted, Event, HealthChecked, HealthState, NewEvent, Severity,
    StorageConnectivityChecked, StorageUsageSampled, TableCheck, Trigger, VerificationFailed,
    VerificationPassed, VerifyTier, WalArchived, WorkerDeadLettered, streams, uuid_v7,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};
use backstop_ops::alerting::{AlertMonitor, AlertThresholds, CostEstimator, run_monitor_with};
use backstop_ops::schedule::{Clock, ManualClock};
use backstop_testkit::RecordingAppender;
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use uuid::Uuid;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 2, 0, 0).unwrap()
}

fn mins(m: i64) -> TimeDelta {
    TimeDelta::minutes(m)
}

async fn append_at(appender: &dyn Appender, stream: &str, at: DateTime<Utc>, event: Event) {
    let mut e = NewEvent::new(stream, Actor::operator("alice"), &event);
    e.occurred_at = at;
    appender
        .append(stream, ExpectedVersion::Any, vec![e])
        .await
        .unwrap();
}

async fn started(a: &dyn Appender, source: &str, at: DateTime<Utc>) -> Uuid {
    let id = uuid_v7();
    let stream = streams::backup(id);
    append_at(
        a,
        &stream,
        at,
        Event::BackupRequested(BackupRequested {
            backup_id: id,
            source: source.into(),
            kind: BackupKind::Full,
            method: BackupMethod::Logical,
            trigger: Trigger::Manual,
            attempt: 1,
        }),
    )
    .await;
    append_at(
        a,
        &stream,
        at,
        Event::BackupStarted(BackupStarted {
            backup_id: id,
            source: source.into(),
            kind: BackupKind::Full,
            parent: None,
            method: BackupMethod::Logical,
            host: "db1".into(),
        }),
    )
    .await;
    id
}

async fn completed_with(
    a: &dyn Appender,
    source: &str,
    kind: BackupKind,
    raw_bytes: u64,
    at: DateTime<Utc>,
) -> Uuid {
    let id = started(a, source, at).await;
    append_at(
        a,
        &streams::backup(id),
        at,
        Event::BackupCompleted(BackupCompleted {
            backup_id: id,
            source: source.into(),
            kind,
            parent: None,
            method: BackupMethod::Logical,
            manifest: format!("manifests/{id}"),
            manifest_sha3: "00".into(),
            raw_bytes,
            stored_bytes: raw_bytes / 2,
            new_bytes: raw_bytes / 4,
            chunks: 1,
            new_chunks: 1,
            duration_ms: 1000,
            attempt: 1,
            tables: Vec::new(),
        }),
    )
    .await;
    id
}

async fn completed(a: &dyn Appender, source: &str, at: DateTime<Utc>) -> Uuid {
    completed_with(a, source, BackupKind::Full, 1_000_000, at).await
}

async fn failed(a: &dyn Appender, source: &str, at: DateTime<Utc>) -> Uuid {
    let id = started(a, source, at).await;
    append_at(
        a,
        &streams::backup(id),
        at,
        Event::BackupFailed(BackupFailed {
            backup_id: id,
            source: source.into(),
            reason: "pg_dump: connection refused".into(),
            attempt: 1,
        }),
    )
    .await;
    id
}

/// A monitor rebuilt from everything recorded, recording what is due at `now`; returns the
/// alert events it added (type, key).
async fn settle(
    a: &RecordingAppender,
    t: &AlertThresholds,
    now: DateTime<Utc>,
) -> Vec<(String, String)> {
    settle_with(a, t, None, now).await
}

async fn settle_with(
    a: &RecordingAppender,
    t: &AlertThresholds,
    cost: Option<CostEstimator>,
    now: DateTime<Utc>,
) -> Vec<(String, String)> {
    let before = a.envelopes().len();
    let mut m = AlertMonitor::new(t.clone(), cost);
    for e in a.envelopes() {
        m.observe(&e);
    }
    m.record(a, now).await;
    a.envelopes()[before..]
        .iter()
        .map(|e| match e.event().unwrap() {
            Event::AlertRaised(r) => ("raised".to_string(), r.key),
            Event::AlertResolved(r) => ("resolved".to_string(), r.key),
            other => panic!("the monitor appended {other:?}"),
        })
        .collect()
}

fn raised(key: &str) -> (String, String) {
    ("raised".into(), key.into())
}

fn resolved(key: &str) -> (String, String) {
    ("resolved".into(), key.into())
}

fn alerts_raised(a: &RecordingAppender) -> Vec<AlertRaised> {
    a.of_type("alert.raised")
        .into_iter()
        .map(|e| match e {
            Event::AlertRaised(r) => r,
            _ => unreachable!(),
        })
        .collect()
}

#[tokio::test]
async fn a_failed_backup_raises_one_critical_alert_until_a_backup_completes() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    completed(&a, "orders", t0()).await;
    assert_eq!(settle(&a, &t, t0()).await, vec![]);
    failed(&a, "orders", t0() + mins(60)).await;
    failed(&a, "orders", t0() + mins(70)).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(71)).await,
        vec![raised("backup_failed/orders")]
    );
    // Still failing: one condition, one alert, however often it is evaluated.
    assert_eq!(settle(&a, &t, t0() + mins(72)).await, vec![]);
    let alert = &alerts_raised(&a)[0];
    assert_eq!(alert.severity, Severity::Critical);
    assert_eq!(alert.source.as_deref(), Some("orders"));
    assert!(
        alert.message.contains("connection refused"),
        "{}",
        alert.message
    );
    completed(&a, "orders", t0() + mins(80)).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(81)).await,
        vec![resolved("backup_failed/orders")]
    );
    // A failure after the recovery is a new alert with a new id, not swallowed as the old one.
    failed(&a, "orders", t0() + mins(90)).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(91)).await,
        vec![raised("backup_failed/orders")]
    );
    let ids: Vec<Uuid> = alerts_raised(&a).iter().map(|r| r.alert_id).collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test]
async fn no_success_in_25_hours_fires_at_25_hours_and_resolves_on_the_next_backup() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    completed(&a, "orders", t0()).await;
    let mut m = AlertMonitor::new(t.clone(), None);
    for e in a.envelopes() {
        m.observe(&e);
    }
    // The monitor wakes exactly when the condition can begin.
    assert_eq!(m.wake(t0() + mins(60)), t0() + mins(61));
    assert_eq!(
        backstop_ops::alerting::rules::next_change(m.facts(), &t, t0() + mins(60)),
        Some(t0() + TimeDelta::hours(25))
    );
    assert_eq!(
        settle(&a, &t, t0() + TimeDelta::hours(25) - mins(1)).await,
        vec![]
    );
    assert_eq!(
        settle(&a, &t, t0() + TimeDelta::hours(25)).await,
        vec![raised("no_recent_backup/orders")]
    );
    assert_eq!(settle(&a, &t, t0() + TimeDelta::hours(30)).await, vec![]);
    completed(&a, "orders", t0() + TimeDelta::hours(31)).await;
    assert_eq!(
        settle(&a, &t, t0() + TimeDelta::hours(31)).await,
        vec![resolved("no_recent_backup/orders")]
    );
}

#[tokio::test]
async fn a_source_that_never_succeeded_is_stale_25_hours_after_it_was_first_seen() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    failed(&a, "fresh", t0()).await;
    let got = settle(&a, &t, t0() + TimeDelta::hours(25)).await;
    assert_eq!(
        got,
        vec![
            raised("backup_failed/fresh"),
            raised("no_recent_backup/fresh")
        ]
    );
    let stale = alerts_raised(&a)
        .into_iter()
        .find(|r| r.kind == "no_recent_backup")
        .unwrap();
    assert!(
        stale.message.contains("none has completed"),
        "{}",
        stale.message
    );
}

#[tokio::test]
async fn a_size_change_over_20_percent_from_the_previous_comparable_backup_alerts_and_resolves() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    completed_with(&a, "orders", BackupKind::Full, 1_000, t0()).await;
    completed_with(&a, "orders", BackupKind::Full, 1_190, t0() + mins(1)).await;
    assert_eq!(settle(&a, &t, t0() + mins(2)).await, vec![]);
    // An incremental is compared with incrementals only: its small size is no anomaly.
    completed_with(&a, "orders", BackupKind::Incremental, 10, t0() + mins(3)).await;
    assert_eq!(settle(&a, &t, t0() + mins(4)).await, vec![]);
    completed_with(&a, "orders", BackupKind::Full, 1_500, t0() + mins(5)).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(6)).await,
        vec![raised("backup_size_changed/orders/logical/full")]
    );
    let r = &alerts_raised(&a)[0];
    assert_eq!(r.severity, Severity::Warning);
    assert!(r.message.contains("+26.1%"), "{}", r.message);
    // A shrink is an anomaly too; then a normal one clears it.
    completed_with(&a, "orders", BackupKind::Full, 1_520, t0() + mins(7)).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(8)).await,
        vec![resolved("backup_size_changed/orders/logical/full")]
    );
    completed_with(&a, "orders", BackupKind::Full, 700, t0() + mins(9)).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(10)).await,
        vec![raised("backup_size_changed/orders/logical/full")]
    );
}

#[tokio::test]
async fn a_failed_verification_is_critical_with_its_details_until_a_later_one_passes() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    let bad = completed(&a, "orders", t0()).await;
    append_at(
        &a,
        &streams::backup(bad),
        t0() + mins(1),
        Event::VerificationFailed(VerificationFailed {
            verification_id: uuid_v7(),
            backup_id: bad,
            tier: VerifyTier::Restore,
            reason: "row counts differ".into(),
            tables: vec![TableCheck {
                schema: "public".into(),
                table: "trades".into(),
                expected: 1000,
                restored: 999,
            }],
        }),
    )
    .await;
    assert_eq!(
        settle(&a, &t, t0() + mins(2)).await,
        vec![raised("verification_failed/orders")]
    );
    let r = &alerts_raised(&a)[0];
    assert_eq!(r.severity, Severity::Critical);
    assert!(
        r.message
            .contains("public.trades 1000 expected, 999 restored"),
        "{}",
        r.message
    );
    let good = completed(&a, "orders", t0() + mins(10)).await;
    append_at(
        &a,
        &streams::backup(good),
        t0() + mins(11),
        Event::VerificationPassed(VerificationPassed {
            verification_id: uuid_v7(),
            backup_id: good,
            tier: VerifyTier::Restore,
            objects_checked: 1,
            bytes_checked: 1,
            restore_ms: None,
            restore_bytes_per_sec: None,
            tables: Vec::new(),
        }),
    )
    .await;
    assert_eq!(
        settle(&a, &t, t0() + mins(12)).await,
        vec![resolved("verification_failed/orders")]
    );
}

#[tokio::test]
async fn a_backup_running_past_300_seconds_warns_until_it_ends() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    let id = started(&a, "orders", t0()).await;
    assert_eq!(settle(&a, &t, t0() + TimeDelta::seconds(299)).await, vec![]);
    let key = format!("backup_running_long/{id}");
    assert_eq!(
        settle(&a, &t, t0() + TimeDelta::seconds(300)).await,
        vec![raised(&key)]
    );
    append_at(
        &a,
        &streams::backup(id),
        t0() + mins(6),
        Event::BackupFailed(BackupFailed {
            backup_id: id,
            source: "orders".into(),
            reason: "cancelled".into(),
            attempt: 1,
        }),
    )
    .await;
    assert_eq!(
        settle(&a, &t, t0() + mins(7)).await,
        vec![raised("backup_failed/orders"), resolved(&key)]
    );
}

async fn wal(a: &dyn Appender, n: u32, at: DateTime<Utc>) {
    append_at(
        a,
        &streams::wal(1),
        at,
        Event::WalArchived(WalArchived {
            timeline: 1,
            segment: format!("{:024X}", n),
            sha3: "00".into(),
            bytes: 16 << 20,
            object: format!("wal/{n}"),
        }),
    )
    .await;
}

#[tokio::test]
async fn wal_archiving_that_stops_for_an_hour_is_critical_and_resolves_when_it_resumes() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    // No WAL archived ever: nothing to stall.
    assert_eq!(settle(&a, &t, t0() + TimeDelta::hours(5)).await, vec![]);
    wal(&a, 1, t0()).await;
    wal(&a, 2, t0() + mins(1)).await;
    assert_eq!(settle(&a, &t, t0() + mins(60)).await, vec![]);
    assert_eq!(
        settle(&a, &t, t0() + mins(61)).await,
        vec![raised("wal_stalled/wal")]
    );
    assert_eq!(alerts_raised(&a)[0].severity, Severity::Critical);
    wal(&a, 3, t0() + mins(90)).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(90)).await,
        vec![resolved("wal_stalled/wal")]
    );
}

async fn health(a: &dyn Appender, endpoint: &str, state: HealthState, at: DateTime<Utc>) {
    append_at(
        a,
        &streams::health(endpoint),
        at,
        Event::HealthChecked(HealthChecked {
            endpoint: endpoint.into(),
            ok: state != HealthState::Down,
            status: (state != HealthState::Down).then_some(200),
            latency_ms: if state == HealthState::Degraded {
                3500
            } else {
                40
            },
            error: (state == HealthState::Down).then(|| "connection refused".to_string()),
            state,
        }),
    )
    .await;
}

#[tokio::test]
async fn endpoint_states_from_the_health_monitor_become_alerts_and_recoveries() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    let ep = "http://127.0.0.1:9/health";
    health(&a, ep, HealthState::Up, t0()).await;
    assert_eq!(settle(&a, &t, t0()).await, vec![]);
    health(&a, ep, HealthState::Down, t0() + mins(5)).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(5)).await,
        vec![raised(&format!("endpoint_down/{ep}"))]
    );
    health(&a, ep, HealthState::Degraded, t0() + mins(10)).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(10)).await,
        vec![
            raised(&format!("endpoint_slow/{ep}")),
            resolved(&format!("endpoint_down/{ep}"))
        ]
    );
    health(&a, ep, HealthState::Up, t0() + mins(15)).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(15)).await,
        vec![resolved(&format!("endpoint_slow/{ep}"))]
    );
}

async fn usage(a: &dyn Appender, class: &str, bytes: u64, at: DateTime<Utc>) {
    append_at(
        a,
        &streams::storage(),
        at,
        Event::StorageUsageSampled(StorageUsageSampled {
            region: "us-east-1".into(),
            storage_class: class.into(),
            bytes,
            objects: 10,
            repository: "s3://backups".into(),
        }),
    )
    .await;
}

#[tokio::test]
async fn storage_connectivity_quota_and_cost_alerts() {
    let a = RecordingAppender::new();
    let t = AlertThresholds {
        storage_quota_gib: Some(100.0),
        ..AlertThresholds::default()
    };
    // $0.02 per GiB-month whatever the class: 800 GiB is $16, over the $15 budget.
    let cost: CostEstimator = Arc::new(|_class: &str, _region: &str, bytes: u64| {
        bytes as f64 / (1u64 << 30) as f64 * 0.02
    });
    append_at(
        &a,
        &streams::storage(),
        t0(),
        Event::StorageConnectivityChecked(StorageConnectivityChecked {
            backend: "s3://backups".into(),
            ok: false,
            latency_ms: 5000,
            error: Some("connection timed out".into()),
        }),
    )
    .await;
    usage(&a, "STANDARD", 80 << 30, t0()).await;
    assert_eq!(
        settle_with(&a, &t, Some(cost.clone()), t0()).await,
        vec![raised("storage_unreachable/s3://backups")]
    );
    // 80 + 6 GiB of 100: 86 % is over 85 %.
    usage(&a, "GLACIER", 6 << 30, t0() + mins(1)).await;
    assert_eq!(
        settle_with(&a, &t, Some(cost.clone()), t0() + mins(1)).await,
        vec![raised("storage_quota/s3://backups")]
    );
    // The newest sample of a series replaces the older one: 800 GiB standard.
    usage(&a, "STANDARD", 800 << 30, t0() + mins(2)).await;
    let got = settle_with(&a, &t, Some(cost.clone()), t0() + mins(2)).await;
    assert_eq!(got, vec![raised("cost_over_budget/s3://backups")]);
    let over = alerts_raised(&a)
        .into_iter()
        .find(|r| r.kind == "cost_over_budget")
        .unwrap();
    // (800 + 6) GiB x $0.02 = $16.12.
    assert!(over.message.contains("$16.12"), "{}", over.message);
    usage(&a, "STANDARD", 1 << 30, t0() + mins(3)).await;
    append_at(
        &a,
        &streams::storage(),
        t0() + mins(3),
        Event::StorageConnectivityChecked(StorageConnectivityChecked {
            backend: "s3://backups".into(),
            ok: true,
            latency_ms: 20,
            error: None,
        }),
    )
    .await;
    let mut got = settle_with(&a, &t, Some(cost), t0() + mins(3)).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            resolved("cost_over_budget/s3://backups"),
            resolved("storage_quota/s3://backups"),
            resolved("storage_unreachable/s3://backups"),
        ]
    );
}

#[tokio::test]
async fn a_dead_letter_stays_open_until_an_operator_resolves_it() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    let event_id = uuid_v7();
    append_at(
        &a,
        &streams::workers(),
        t0(),
        Event::WorkerDeadLettered(WorkerDeadLettered {
            consumer: "verify".into(),
            event_id,
            event_type: "backup.completed".into(),
            position: 42,
            deliveries: 5,
            error: "scratch server down".into(),
        }),
    )
    .await;
    let key = format!("event_dead_lettered/verify/{event_id}");
    assert_eq!(settle(&a, &t, t0()).await, vec![raised(&key)]);
    assert_eq!(settle(&a, &t, t0() + TimeDelta::days(3)).await, vec![]);
    let open = alerts_raised(&a).remove(0);
    append_at(
        &a,
        &streams::alerts(),
        t0() + TimeDelta::days(3),
        Event::AlertResolved(AlertResolved {
            alert_id: open.alert_id,
            kind: open.kind,
            subject: open.subject,
            message: "replayed by hand".into(),
            key: key.clone(),
            source: None,
        }),
    )
    .await;
    assert_eq!(settle(&a, &t, t0() + TimeDelta::days(4)).await, vec![]);
}

#[tokio::test]
async fn two_monitors_evaluating_the_same_ledger_record_each_alert_once() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    failed(&a, "orders", t0()).await;
    let build = || {
        let mut m = AlertMonitor::new(t.clone(), None);
        for e in a.envelopes() {
            m.observe(&e);
        }
        m
    };
    let (first, second) = (build(), build());
    assert_eq!(first.record(&a, t0()).await, 1);
    // The second has not read the first's raise: it proposes the same id, which is a duplicate.
    assert_eq!(second.record(&a, t0() + mins(1)).await, 0);
    assert_eq!(a.of_type("alert.raised").len(), 1);
}

#[tokio::test]
async fn an_alert_that_cannot_be_recorded_is_recorded_at_the_next_evaluation() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    failed(&a, "orders", t0()).await;
    a.fail_next(1);
    assert_eq!(settle(&a, &t, t0()).await, vec![]);
    assert_eq!(
        settle(&a, &t, t0() + mins(1)).await,
        vec![raised("backup_failed/orders")]
    );
}

#[test]
fn thresholds_default_to_the_seeds_and_bad_values_are_named() {
    let t = AlertThresholds::default();
    assert_eq!(t.stale_after.as_secs(), 25 * 3600);
    assert_eq!(t.running_warn_after.as_secs(), 300);
    assert_eq!(t.size_change_percent, 20.0);
    assert_eq!(t.quota_percent, 85.0);
    assert_eq!(t.budget_usd, 15.0);
    let parsed: AlertThresholds =
        toml::from_str("stale_after = \"2h\"\nstorage_quota_gib = 500.0").unwrap();
    assert_eq!(parsed.stale_after.as_secs(), 7200);
    assert_eq!(parsed.storage_quota_gib, Some(500.0));
    // The budget is [cost]'s, not a second one here.
    assert!(toml::from_str::<AlertThresholds>("budget_usd = 40.0").is_err());
    let bad = AlertThresholds {
        size_change_percent: -1.0,
        ..AlertThresholds::default()
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .contains("alerts.size_change_percent")
    );
    let unknown = toml::from_str::<AlertThresholds>("stale = \"2h\"").unwrap_err();
    assert!(unknown.to_string().contains("stale"), "{unknown}");
}

/// The loop on a real ledger: a source's last backup at t0; nothing before 25 hours, the alert
/// at 25 hours (the monitor wakes for it without a tick in between), once.
#[tokio::test]
async fn the_monitor_loop_raises_a_stale_source_when_its_clock_reaches_25_hours() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    completed(&ledger, "orders", t0()).await;
    let clock = ManualClock::new(t0() + mins(1));
    clock.set_horizon(Some(t0() + TimeDelta::hours(24)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let monitor = AlertMonitor::new(AlertThresholds::default(), None);
    let run = run_monitor_with(ledger.clone(), &ledger, monitor, &clock, stop_rx);
    let alerts = |ledger: &Ledger| -> Vec<String> {
        ledger
            .read(1, 10_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.stream == streams::alerts())
            .map(|e| e.event_type)
            .collect()
    };
    let driver = async {
        clock.wait_parked(1).await;
        assert!(alerts(&ledger).is_empty());
        clock.set_horizon(Some(t0() + TimeDelta::hours(26)));
        while !(clock.now() >= t0() + TimeDelta::hours(26) && clock.parked() == 1) {
            tokio::task::yield_now().await;
        }
        assert_eq!(alerts(&ledger), vec!["alert.raised".to_string()]);
        stop_tx.send(true).unwrap();
    };
    let (ran, ()) = tokio::join!(run, driver);
    ran.unwrap();
    ledger.close().await;
}

/// On the real ledger: a monitor that has not read another's raise proposes it again beside a
/// new one; the old comes back a duplicate and the new one is recorded.
#[tokio::test]
async fn a_monitor_behind_another_records_only_what_is_new_on_a_real_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let t = AlertThresholds::default();
    failed(&ledger, "orders", t0()).await;
    let build = |ledger: &Ledger| {
        let mut m = AlertMonitor::new(t.clone(), None);
        for e in ledger.read(1, 10_000).unwrap() {
            m.observe(&e);
        }
        m
    };
    let behind = build(&ledger);
    assert_eq!(build(&ledger).record(&ledger, t0()).await, 1);
    failed(&ledger, "ledgerdb", t0() + mins(1)).await;
    let mut behind = behind;
    // It reads the new failure but not the first monitor's raise.
    for e in ledger.read(1, 10_000).unwrap() {
        if e.event_type == "backup.failed"
            || e.event_type == "backup.started"
            || e.event_type == "backup.requested"
        {
            behind.observe(&e);
        }
    }
    assert_eq!(behind.record(&ledger, t0() + mins(2)).await, 1);
    let raised: Vec<String> = ledger
        .read(1, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "alert.raised")
        .map(|e| e.payload["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        raised,
        vec!["backup_failed/orders", "backup_failed/ledgerdb"]
    );
    ledger.close().await;
}

#[tokio::test]
async fn a_failed_table_export_warns_until_an_export_of_that_source_completes() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    let export = |source: &str, failed: bool| {
        let export_id = uuid_v7();
        let event = if failed {
            Event::ExportFailed(backstop_events::ExportFailed {
                export_id,
                source: source.into(),
                reason: "no table \"nope\" in the database".into(),
            })
        } else {
            Event::ExportCompleted(backstop_events::ExportCompleted {
                export_id,
                source: source.into(),
                tables: 1,
                rows: 10,
                sealed_bytes: 100,
                duration_ms: 5,
            })
        };
        (streams::export(export_id), event)
    };
    let (s, e) = export("orders", true);
    append_at(&a, &s, t0(), e).await;
    // Another source's success does not clear it.
    let (s, e) = export("risk", false);
    append_at(&a, &s, t0() + mins(1), e).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(2)).await,
        vec![raised("export_failed/orders")]
    );
    let alert = &alerts_raised(&a)[0];
    assert_eq!(alert.severity, Severity::Warning);
    assert_eq!(alert.source.as_deref(), Some("orders"));
    assert!(alert.message.contains("nope"), "{}", alert.message);
    assert_eq!(settle(&a, &t, t0() + mins(3)).await, vec![]);
    let (s, e) = export("orders", false);
    append_at(&a, &s, t0() + mins(4), e).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(5)).await,
        vec![resolved("export_failed/orders")]
    );
}

#[tokio::test]
async fn a_replica_that_falls_behind_more_than_2_hours_is_critical_until_it_catches_up() {
    let a = RecordingAppender::new();
    let t = AlertThresholds::default();
    let lag = |seconds: u64| {
        Event::ReplicationLagMeasured(backstop_events::ReplicationLagMeasured {
            region: "eu".into(),
            lag_seconds: seconds,
        })
    };
    // Up to date: nothing, however late.
    append_at(&a, &streams::storage(), t0(), lag(0)).await;
    assert_eq!(settle(&a, &t, t0() + TimeDelta::hours(5)).await, vec![]);
    // 30 minutes behind when measured: the missing backup turns 2 h old 90 minutes later.
    append_at(&a, &streams::storage(), t0() + mins(60), lag(30 * 60)).await;
    assert_eq!(settle(&a, &t, t0() + mins(149)).await, vec![]);
    assert_eq!(
        settle(&a, &t, t0() + mins(150)).await,
        vec![raised("replication_lagging/eu")]
    );
    assert_eq!(alerts_raised(&a)[0].severity, Severity::Critical);
    append_at(&a, &streams::storage(), t0() + mins(170), lag(0)).await;
    assert_eq!(
        settle(&a, &t, t0() + mins(170)).await,
        vec![resolved("replication_lagging/eu")]
    );
}
