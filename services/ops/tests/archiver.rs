//! The WAL archiver probe against a real PostgreSQL whose archive_command fails and then works:
//! the probe reads the failure, the monitor raises `wal_archiving_failing` and resolves it.

use std::time::{Duration, Instant};

use backstop_events::{Event, WalArchiverChecked};
use backstop_ledger::{Appender, ExpectedVersion};
use backstop_ops::SourceSpec;
use backstop_ops::alerting::{AlertMonitor, AlertThresholds};
use backstop_ops::archiver::{self, Recorder, read_status};
use backstop_testkit::{Postgres, PostgresOptions, RecordingAppender};
use chrono::{TimeDelta, TimeZone, Utc};

/// Polls the server (its archiver retries on its own schedule) until `want` holds.
async fn until(
    source: &SourceSpec,
    want: impl Fn(&WalArchiverChecked) -> bool,
) -> WalArchiverChecked {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = read_status(source)
            .await
            .unwrap()
            .expect("archive_mode is on");
        if want(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the archiver never got there: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn record(a: &RecordingAppender, check: WalArchiverChecked, at: chrono::DateTime<Utc>) {
    let e = archiver::event(check, at);
    let stream = e.stream.clone();
    a.append(&stream, ExpectedVersion::Any, vec![e])
        .await
        .unwrap();
}

fn alert_keys(a: &RecordingAppender) -> Vec<(String, String)> {
    a.envelopes()
        .iter()
        .filter_map(|e| match e.event().ok()? {
            Event::AlertRaised(r) => Some(("raised".into(), r.key)),
            Event::AlertResolved(r) => Some(("resolved".into(), r.key)),
            _ => None,
        })
        .collect()
}

async fn settle(a: &RecordingAppender, now: chrono::DateTime<Utc>) {
    let mut m = AlertMonitor::new(AlertThresholds::default(), None);
    for e in a.envelopes() {
        m.observe(&e);
    }
    m.record(a, now).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_archive_command_raises_a_critical_alert_that_resolves_when_archiving_works() {
    let pg = Postgres::start_with(
        PostgresOptions::new()
            .conf("archive_mode = on")
            .conf("archive_command = 'false'"),
    )
    .unwrap();
    pg.create_db("app").unwrap();
    let source = SourceSpec::postgres("app", pg.conninfo("app"), 1);
    let fresh = read_status(&source).await.unwrap().unwrap();
    assert!(!fresh.failing, "{fresh:?}");
    pg.psql(
        "app",
        "CREATE TABLE t AS SELECT 1 AS x; SELECT pg_switch_wal();",
    )
    .unwrap();
    let bad = until(&source, |s| s.failing).await;
    assert!(bad.failed_count >= 1);
    assert!(bad.last_failed_wal.is_some());

    let a = RecordingAppender::new();
    let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 2, 0, 0).unwrap();
    record(&a, bad.clone(), t0).await;
    settle(&a, t0).await;
    assert_eq!(
        alert_keys(&a),
        vec![(
            "raised".to_string(),
            "wal_archiving_failing/app".to_string()
        )]
    );
    let raised = a.of_type("alert.raised");
    let Event::AlertRaised(r) = &raised[0] else {
        unreachable!()
    };
    assert!(
        r.message.contains(bad.last_failed_wal.as_deref().unwrap()),
        "{}",
        r.message
    );

    pg.psql(
        "app",
        "ALTER SYSTEM SET archive_command = 'true'; SELECT pg_reload_conf();",
    )
    .unwrap();
    pg.psql("app", "INSERT INTO t VALUES (2); SELECT pg_switch_wal();")
        .unwrap();
    let good = until(&source, |s| !s.failing).await;
    assert!(good.archived_count >= 1, "{good:?}");
    record(&a, good, t0 + TimeDelta::minutes(5)).await;
    settle(&a, t0 + TimeDelta::minutes(5)).await;
    assert_eq!(
        alert_keys(&a).last().unwrap(),
        &(
            "resolved".to_string(),
            "wal_archiving_failing/app".to_string()
        )
    );
}

#[tokio::test]
async fn archiving_off_is_not_probed() {
    let pg = Postgres::start().unwrap();
    let source = SourceSpec::postgres("plain", pg.conninfo("postgres"), 1);
    assert_eq!(read_status(&source).await.unwrap(), None);
}

#[test]
fn state_changes_and_hourly_samples_are_recorded_nothing_else() {
    let check = |failing| WalArchiverChecked {
        source: "app".into(),
        failing,
        archived_count: 1,
        failed_count: 0,
        last_archived_wal: None,
        last_archived_at: None,
        last_failed_wal: None,
        last_failed_at: None,
    };
    let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 2, 0, 0).unwrap();
    let mut r = Recorder::default();
    let minutes = |m| t0 + TimeDelta::minutes(m);
    assert!(r.take(&check(false), minutes(0)), "the first check");
    assert!(!r.take(&check(false), minutes(5)));
    assert!(r.take(&check(true), minutes(10)), "a change");
    assert!(!r.take(&check(true), minutes(15)));
    assert!(r.take(&check(false), minutes(20)), "a change back");
    assert!(!r.take(&check(false), minutes(75)));
    assert!(r.take(&check(false), minutes(80)), "an hourly sample");
    // Two serves probing in the same five-minute slot record one event.
    let a = archiver::event(check(false), minutes(81));
    let b = archiver::event(check(false), minutes(84));
    assert_eq!(a.id, b.id);
    assert_ne!(a.id, archiver::event(check(false), minutes(86)).id);
}
