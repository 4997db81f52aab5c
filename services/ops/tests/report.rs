//! The weekly summary from recorded events, its period in a zone across DST, and the composer
//! loop on a real ledger with a manual clock (one report per week, however often it looks).

use backstop_events::{
    Actor, BackupCompleted, BackupFailed, BackupKind, BackupMethod, BackupRequested, Event,
    NewEvent, Trigger, VerificationFailed, VerificationPassed, VerifyTier, streams, uuid_v7,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};
use backstop_ops::alerting::{AlertMonitor, AlertThresholds};
use backstop_ops::report::{self, last_full_week, weekly_from};
use backstop_ops::schedule::{Clock, ManualClock};
use backstop_testkit::RecordingAppender;
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use uuid::Uuid;

async fn at(a: &dyn Appender, stream: &str, when: DateTime<Utc>, event: Event) {
    let mut e = NewEvent::new(stream, Actor::operator("alice"), &event);
    e.occurred_at = when;
    a.append(stream, ExpectedVersion::Any, vec![e])
        .await
        .unwrap();
}

async fn backup(a: &dyn Appender, source: &str, when: DateTime<Utc>, ok: bool, ms: u64) -> Uuid {
    let id = uuid_v7();
    let stream = streams::backup(id);
    at(
        a,
        &stream,
        when,
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
    let end = if ok {
        Event::BackupCompleted(BackupCompleted {
            backup_id: id,
            source: source.into(),
            kind: BackupKind::Full,
            parent: None,
            method: BackupMethod::Logical,
            manifest: "m".into(),
            manifest_sha3: "00".into(),
            raw_bytes: 1000,
            stored_bytes: 500,
            new_bytes: 100,
            chunks: 1,
            new_chunks: 1,
            duration_ms: ms,
            attempt: 1,
            tables: Vec::new(),
        })
    } else {
        Event::BackupFailed(BackupFailed {
            backup_id: id,
            source: source.into(),
            reason: "disk full".into(),
            attempt: 1,
        })
    };
    at(a, &stream, when, end).await;
    id
}

async fn verdict(a: &dyn Appender, backup_id: Uuid, when: DateTime<Utc>, passed: bool) {
    let e = if passed {
        Event::VerificationPassed(VerificationPassed {
            verification_id: uuid_v7(),
            backup_id,
            tier: VerifyTier::Restore,
            objects_checked: 1,
            bytes_checked: 1,
            restore_ms: None,
            restore_bytes_per_sec: None,
            tables: Vec::new(),
        })
    } else {
        Event::VerificationFailed(VerificationFailed {
            verification_id: uuid_v7(),
            backup_id,
            tier: VerifyTier::Restore,
            reason: "row counts differ".into(),
            tables: Vec::new(),
        })
    };
    at(a, &streams::backup(backup_id), when, e).await;
}

fn ny() -> chrono_tz::Tz {
    chrono_tz::America::New_York
}

#[test]
fn the_week_is_monday_to_monday_in_the_zone_even_across_dst() {
    // Wednesday 2026-03-11 12:00 UTC: the last full week is Mon 2 March to Mon 9 March, local
    // midnights; DST began on Sunday 8 March, so that week is 167 hours long.
    let now = Utc.with_ymd_and_hms(2026, 3, 11, 12, 0, 0).unwrap();
    let (start, end) = last_full_week(now, ny());
    assert_eq!(start, Utc.with_ymd_and_hms(2026, 3, 2, 5, 0, 0).unwrap());
    assert_eq!(end, Utc.with_ymd_and_hms(2026, 3, 9, 4, 0, 0).unwrap());
    assert_eq!(end - start, TimeDelta::hours(167));
    // Exactly at a Monday midnight the week that just ended is the last full one.
    assert_eq!(last_full_week(end, ny()), (start, end));
    assert_eq!(
        last_full_week(end + TimeDelta::days(7), ny()),
        (end, end + TimeDelta::hours(168))
    );
}

#[tokio::test]
async fn the_summary_counts_the_period_only_and_lists_slowest_backups_and_open_alerts() {
    let a = RecordingAppender::new();
    let (start, end) = last_full_week(Utc.with_ymd_and_hms(2026, 3, 11, 0, 0, 0).unwrap(), ny());
    // Before the period: counted nowhere, but its backup is known for later verdicts.
    let old = backup(&a, "orders", start - TimeDelta::days(1), true, 9_000_000).await;
    let b1 = backup(&a, "orders", start + TimeDelta::hours(1), true, 120_000).await;
    let b2 = backup(&a, "orders", start + TimeDelta::days(1), true, 300_000).await;
    backup(&a, "ledgerdb", start + TimeDelta::days(2), true, 60_000).await;
    backup(&a, "ledgerdb", start + TimeDelta::days(3), false, 0).await;
    verdict(&a, old, start + TimeDelta::hours(1), true).await;
    verdict(&a, b1, start + TimeDelta::hours(2), true).await;
    verdict(&a, b2, start + TimeDelta::days(1), false).await;
    // After the period: ignored.
    backup(&a, "orders", end + TimeDelta::hours(1), false, 0).await;
    // The alerts open at the end of the period come from the monitor's own events.
    let mut m = AlertMonitor::new(AlertThresholds::default(), None);
    for e in a.envelopes() {
        if e.occurred_at < end {
            m.observe(&e);
        }
    }
    m.record(&a, end - TimeDelta::hours(1)).await;
    let r = weekly_from(a.envelopes().iter(), (start, end), ny(), None);
    assert_eq!(r.backups_completed, 3);
    assert_eq!(r.backups_failed, 1);
    assert_eq!(r.success_rate, Some(75.0));
    assert_eq!(r.verifications_passed, 2);
    assert_eq!(r.verifications_failed, 1);
    assert_eq!(r.sources["orders"].completed, 2);
    assert_eq!(r.sources["orders"].verified, 2);
    assert_eq!(r.sources["orders"].verification_failed, 1);
    assert_eq!(r.sources["ledgerdb"].failed, 1);
    let slow: Vec<u64> = r.slowest.iter().map(|b| b.duration_ms).collect();
    assert_eq!(slow, vec![300_000, 120_000, 60_000]);
    let keys: Vec<&str> = r.open_alerts.iter().map(|a| a.key.as_str()).collect();
    // All critical and raised together: in key order. Both sources are stale by the end.
    assert_eq!(
        keys,
        vec![
            "backup_failed/ledgerdb",
            "no_recent_backup/ledgerdb",
            "no_recent_backup/orders",
            "verification_failed/orders"
        ]
    );
    let text = r.text();
    assert!(
        text.contains("3 completed, 1 failed (success rate 75.0%)"),
        "{text}"
    );
    assert!(text.contains("Open alerts: 4"), "{text}");
    assert!(
        r.title().contains("2026-03-02 to 2026-03-08"),
        "{}",
        r.title()
    );
}

#[tokio::test]
async fn serve_composes_each_week_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let t = Utc.with_ymd_and_hms(2026, 3, 4, 12, 0, 0).unwrap();
    backup(&ledger, "orders", t - TimeDelta::days(1), true, 1000).await;
    let clock = ManualClock::new(t);
    // Through the next Monday midnight (9 March, 04:00 UTC), hour by hour.
    clock.set_horizon(Some(Utc.with_ymd_and_hms(2026, 3, 10, 0, 0, 0).unwrap()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let run = report::run_weekly(ledger.clone(), ny(), None, &clock, stop_rx);
    let driver = async {
        clock.wait_parked(1).await;
        stop_tx.send(true).unwrap();
    };
    let (ran, ()) = tokio::join!(run, driver);
    ran.unwrap();
    let reports: Vec<Event> = ledger
        .read(1, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "report.generated")
        .map(|e| e.event().unwrap())
        .collect();
    // Only the week that ended on 9 March: the one before (Feb 23 - Mar 2) ended before the
    // ledger's first event, and a new installation gets no summary of the week before it.
    assert_eq!(reports.len(), 1, "{reports:?}");
    let Event::ReportGenerated(second) = &reports[0] else {
        unreachable!()
    };
    assert_eq!(
        second.period_end,
        Utc.with_ymd_and_hms(2026, 3, 9, 4, 0, 0).unwrap()
    );
    assert_eq!(second.summary["backups_completed"], 1);
    assert!(
        second.text.contains("orders: 1 completed"),
        "{}",
        second.text
    );
    // A second composer (another serve) finds it recorded and adds nothing.
    let clock2 = ManualClock::new(clock.now());
    clock2.set_horizon(Some(clock.now()));
    let (stop2, rx2) = tokio::sync::watch::channel(false);
    let run2 = report::run_weekly(ledger.clone(), ny(), None, &clock2, rx2);
    let driver2 = async {
        clock2.wait_parked(1).await;
        stop2.send(true).unwrap();
    };
    let (ran2, ()) = tokio::join!(run2, driver2);
    ran2.unwrap();
    let n = ledger
        .read(1, 1000)
        .unwrap()
        .iter()
        .filter(|e| e.event_type == "report.generated")
        .count();
    assert_eq!(n, 1);
    ledger.close().await;
}
