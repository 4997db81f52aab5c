//! Leases without servers: the heartbeat on a manual clock, and the monitor fed with what a
//! recording appender holds, asked at chosen instants. No real time passes.

use std::time::Duration;

use backstop_events::{
    Actor, BackupCompleted, BackupFailed, BackupKind, BackupMethod, BackupRequested, BackupStarted,
    Envelope, Event, LeaseRenewed, LeasedJob, NewEvent, RecoveryRequested, RecoveryScope,
    RecoveryStarted, Trigger, streams, uuid_v7, uuid_v7_derived,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};
use backstop_ops::lease::{self, Heartbeat, LeaseMonitor, renewal_id};
use backstop_ops::schedule::{Clock, ManualClock};
use backstop_testkit::RecordingAppender;
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap()
}

fn secs(s: i64) -> TimeDelta {
    TimeDelta::seconds(s)
}

async fn append_at(appender: &dyn Appender, stream: &str, at: DateTime<Utc>, event: Event) {
    let mut e = NewEvent::new(stream, Actor::operator("alice"), &event);
    e.occurred_at = at;
    appender
        .append(stream, ExpectedVersion::Any, vec![e])
        .await
        .unwrap();
}

/// A foreground backup requested and started at `at`, as `backstop backup` records them.
async fn start_backup(appender: &dyn Appender, at: DateTime<Utc>) -> (Uuid, BackupRequested) {
    let id = uuid_v7();
    let request = BackupRequested {
        backup_id: id,
        source: "trading".into(),
        kind: BackupKind::Full,
        method: BackupMethod::Logical,
        trigger: Trigger::Foreground { host: "db1".into() },
        attempt: 1,
    };
    let stream = streams::backup(id);
    append_at(appender, &stream, at, request.clone().into()).await;
    append_at(
        appender,
        &stream,
        at,
        Event::BackupStarted(BackupStarted {
            backup_id: id,
            source: "trading".into(),
            kind: BackupKind::Full,
            parent: None,
            method: BackupMethod::Logical,
            host: "db1".into(),
        }),
    )
    .await;
    (id, request)
}

async fn renew(appender: &dyn Appender, what: LeasedJob, job: Uuid, n: u64, at: DateTime<Utc>) {
    let stream = match what {
        LeasedJob::Backup => streams::backup(job),
        LeasedJob::Recovery => streams::recovery(job),
    };
    append_at(
        appender,
        &stream,
        at,
        Event::LeaseRenewed(LeaseRenewed {
            job,
            what,
            until: at + TimeDelta::from_std(LEASE).unwrap(),
            host: "db1".into(),
            renewal: n,
        }),
    )
    .await;
}

/// A fresh monitor fed with everything the appender holds.
fn monitor_of(appender: &RecordingAppender) -> LeaseMonitor {
    let mut m = LeaseMonitor::new(LEASE);
    feed(&mut m, &appender.envelopes());
    m
}

fn feed(m: &mut LeaseMonitor, events: &[Envelope]) {
    for e in events {
        m.observe(e);
    }
}

fn failures(appender: &RecordingAppender) -> Vec<BackupFailed> {
    appender
        .of_type("backup.failed")
        .into_iter()
        .map(|e| match e {
            Event::BackupFailed(f) => f,
            other => panic!("not a failure: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn a_job_renewed_in_time_is_never_failed() {
    let ledger = RecordingAppender::new();
    let (id, _) = start_backup(&ledger, t0()).await;
    // Renewed every 10 s for ten minutes; asked every second in between.
    for n in 0..60 {
        let at = t0() + secs(10 * n);
        renew(&ledger, LeasedJob::Backup, id, n as u64, at).await;
        let mut m = monitor_of(&ledger);
        for s in 0..10 {
            assert_eq!(m.record_expired(&ledger, at + secs(s)).await, 0);
        }
        assert_eq!(m.running(), 1);
    }
    assert!(failures(&ledger).is_empty());
}

#[tokio::test]
async fn a_job_whose_renewals_stop_is_failed_once_at_lease_expiry_and_not_before() {
    let ledger = RecordingAppender::new();
    let (id, request) = start_backup(&ledger, t0()).await;
    for n in 0..3 {
        renew(
            &ledger,
            LeasedJob::Backup,
            id,
            n,
            t0() + secs(10 * n as i64),
        )
        .await;
    }
    // The last renewal, at +20 s, holds the lease until +50 s.
    let lapse = t0() + secs(50);
    let mut m = monitor_of(&ledger);
    assert_eq!(m.next_lapse(), Some(lapse));
    assert!(m.expired(lapse - TimeDelta::milliseconds(1)).is_empty());
    assert_eq!(
        m.record_expired(&ledger, lapse - TimeDelta::milliseconds(1))
            .await,
        0
    );
    assert!(failures(&ledger).is_empty());

    assert_eq!(m.record_expired(&ledger, lapse).await, 1);
    assert_eq!(m.record_expired(&ledger, lapse + secs(600)).await, 0);
    let failed = failures(&ledger);
    assert_eq!(failed.len(), 1, "{failed:?}");
    let reason = &failed[0].reason;
    assert!(reason.contains("abandoned"), "{reason}");
    assert!(
        reason.contains("stopped renewing its lease at 2026-03-02T09:00:20.000Z (host db1)"),
        "{reason}"
    );
    assert_eq!(failed[0].source, "trading");
    assert_eq!(failed[0].attempt, request.attempt);

    // The id is the one the backup's own process would have given its failure.
    let stored = ledger
        .envelopes()
        .into_iter()
        .find(|e| e.event_type == "backup.failed")
        .unwrap();
    assert_eq!(stored.id, uuid_v7_derived(id, t0(), "failed"));
    assert_eq!(stored.actor, Actor::worker(lease::MONITOR));

    // A monitor started afterwards (serve restarted) reads the failure and records nothing.
    let mut again = monitor_of(&ledger);
    assert_eq!(again.running(), 0);
    assert_eq!(again.record_expired(&ledger, lapse + secs(3600)).await, 0);
    assert_eq!(failures(&ledger).len(), 1);
}

#[tokio::test]
async fn a_completed_job_is_never_failed() {
    let ledger = RecordingAppender::new();
    let (id, _) = start_backup(&ledger, t0()).await;
    renew(&ledger, LeasedJob::Backup, id, 0, t0()).await;
    append_at(
        &ledger,
        &streams::backup(id),
        t0() + secs(5),
        Event::BackupCompleted(BackupCompleted {
            backup_id: id,
            source: "trading".into(),
            kind: BackupKind::Full,
            parent: None,
            method: BackupMethod::Logical,
            manifest: format!("manifests/{id}"),
            manifest_sha3: "00".repeat(32),
            raw_bytes: 1,
            stored_bytes: 1,
            new_bytes: 1,
            chunks: 1,
            new_chunks: 1,
            duration_ms: 5000,
            attempt: 1,
            tables: Vec::new(),
        }),
    )
    .await;
    let mut m = monitor_of(&ledger);
    assert_eq!(m.running(), 0);
    assert_eq!(m.record_expired(&ledger, t0() + secs(86_400)).await, 0);
    assert!(failures(&ledger).is_empty());
}

#[tokio::test]
async fn two_monitors_record_one_failure() {
    let ledger = RecordingAppender::new();
    let (id, _) = start_backup(&ledger, t0()).await;
    renew(&ledger, LeasedJob::Backup, id, 0, t0()).await;
    let mut first = monitor_of(&ledger);
    let mut second = monitor_of(&ledger);
    let late = t0() + secs(31);
    // Both judge before either sees the other's failure: the ledger stores it once.
    assert_eq!(first.expired(late).len(), 1);
    assert_eq!(second.expired(late).len(), 1);
    assert_eq!(first.record_expired(&ledger, late).await, 1);
    assert_eq!(second.record_expired(&ledger, late).await, 1);
    assert_eq!(failures(&ledger).len(), 1);
    assert_eq!(ledger.types().len(), 4, "{:?}", ledger.types());
}

#[tokio::test]
async fn a_job_from_a_build_without_leases_gets_the_lease_from_its_start() {
    let ledger = RecordingAppender::new();
    let (_, _) = start_backup(&ledger, t0()).await;
    let mut m = monitor_of(&ledger);
    assert_eq!(m.next_lapse(), Some(t0() + secs(30)));
    assert_eq!(m.record_expired(&ledger, t0() + secs(29)).await, 0);
    assert_eq!(m.record_expired(&ledger, t0() + secs(30)).await, 1);
    let reason = &failures(&ledger)[0].reason;
    assert!(
        reason.contains("stopped renewing its lease at 2026-03-02T09:00:00.000Z (host db1)"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_failure_that_cannot_be_recorded_is_tried_again() {
    let ledger = RecordingAppender::new();
    start_backup(&ledger, t0()).await;
    let mut m = monitor_of(&ledger);
    ledger.fail_next(1);
    assert_eq!(m.record_expired(&ledger, t0() + secs(40)).await, 0);
    assert_eq!(m.running(), 1);
    assert_eq!(m.record_expired(&ledger, t0() + secs(41)).await, 1);
    assert_eq!(failures(&ledger).len(), 1);
}

#[tokio::test]
async fn an_abandoned_recovery_is_recorded_as_failed() {
    let ledger = RecordingAppender::new();
    let recovery_id = uuid_v7();
    let backup_id = uuid_v7();
    let stream = streams::recovery(recovery_id);
    let scope = RecoveryScope {
        target: "postgres://restore@db2/trading".into(),
        ..Default::default()
    };
    append_at(
        &ledger,
        &stream,
        t0(),
        Event::RecoveryRequested(RecoveryRequested {
            recovery_id,
            backup_id,
            operator: "alice".into(),
            scope: scope.clone(),
        }),
    )
    .await;
    append_at(
        &ledger,
        &stream,
        t0(),
        Event::RecoveryStarted(RecoveryStarted {
            recovery_id,
            backup_id,
            operator: "alice".into(),
            scope: scope.clone(),
        }),
    )
    .await;
    renew(&ledger, LeasedJob::Recovery, recovery_id, 0, t0() + secs(1)).await;
    let mut m = monitor_of(&ledger);
    assert_eq!(m.record_expired(&ledger, t0() + secs(30)).await, 0);
    assert_eq!(m.record_expired(&ledger, t0() + secs(31)).await, 1);
    let failed = ledger.of_type("recovery.failed");
    assert_eq!(failed.len(), 1);
    let Event::RecoveryFailed(f) = &failed[0] else {
        unreachable!()
    };
    assert_eq!(f.backup_id, backup_id);
    assert_eq!(f.scope, scope);
    assert!(f.reason.contains("abandoned"), "{}", f.reason);
    assert!(f.reason.contains("(host db1)"), "{}", f.reason);
    let stored = ledger
        .envelopes()
        .into_iter()
        .find(|e| e.event_type == "recovery.failed")
        .unwrap();
    // The id the restore's own process gives its failure (restore::Recovery, label "failed").
    assert_eq!(stored.id, uuid_v7_derived(recovery_id, t0(), "failed"));
}

#[tokio::test]
async fn the_heartbeat_renews_every_third_of_the_lease_until_the_work_ends() {
    let ledger = RecordingAppender::new();
    let (id, _) = start_backup(&ledger, t0()).await;
    let clock = ManualClock::new(t0());
    // Sleepers past +25 s park: renewals at 0, 10 and 20 s, then the heartbeat waits for 30 s.
    clock.set_horizon(Some(t0() + secs(25)));
    let actor = Actor::worker("backup");
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<&'static str>();
    let heartbeat = Heartbeat::new(&ledger, LeasedJob::Backup, id, &actor, None)
        .with_lease(LEASE)
        .with_clock(&clock);
    let work = async { done_rx.await.unwrap() };
    let driver = async {
        clock.wait_parked(1).await;
        done_tx.send("dumped").unwrap();
    };
    let (out, ()) = tokio::join!(heartbeat.beside(work), driver);
    assert_eq!(out, "dumped");

    let renewals: Vec<(Envelope, LeaseRenewed)> = ledger
        .envelopes()
        .into_iter()
        .filter_map(|e| match e.event() {
            Ok(Event::LeaseRenewed(r)) => Some((e, r)),
            _ => None,
        })
        .collect();
    assert_eq!(renewals.len(), 3, "{renewals:?}");
    for (n, (env, r)) in renewals.iter().enumerate() {
        let at = t0() + secs(10 * n as i64);
        assert_eq!(env.stream, streams::backup(id));
        assert_eq!(env.occurred_at, at);
        assert_eq!(r.renewal, n as u64);
        assert_eq!(r.until, at + secs(30));
        assert_eq!(r.what, LeasedJob::Backup);
        assert_eq!(env.id, renewal_id(id, t0(), n as u64));
    }
    // The work ended: no renewal comes after it, however far the clock moves.
    clock.set_horizon(None);
    clock.advance_to(t0() + secs(3600));
    tokio::task::yield_now().await;
    assert_eq!(ledger.of_type("lease.renewed").len(), 3);

    // What the heartbeat wrote is what the monitor reads: the lease lapses 30 s after the last.
    let m = monitor_of(&ledger);
    assert_eq!(m.next_lapse(), Some(t0() + secs(50)));
}

#[tokio::test]
async fn a_renewal_that_fails_does_not_fail_the_work() {
    let ledger = RecordingAppender::new();
    let (id, _) = start_backup(&ledger, t0()).await;
    let clock = ManualClock::new(t0());
    clock.set_horizon(Some(t0() + secs(15)));
    ledger.fail_next(1);
    let actor = Actor::worker("backup");
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<u32>();
    let heartbeat = Heartbeat::new(&ledger, LeasedJob::Backup, id, &actor, None)
        .with_lease(LEASE)
        .with_clock(&clock);
    let driver = async {
        clock.wait_parked(1).await;
        done_tx.send(7).unwrap();
    };
    let (out, ()) = tokio::join!(heartbeat.beside(async { done_rx.await.unwrap() }), driver);
    assert_eq!(out, 7);
    // The first renewal was refused, the second (at +10 s) stored.
    let renewed = ledger.of_type("lease.renewed");
    assert_eq!(renewed.len(), 1);
    let Event::LeaseRenewed(r) = &renewed[0] else {
        unreachable!()
    };
    assert_eq!(r.renewal, 1);
}

/// The monitor's loop on a real (sled) ledger: it catches up from position 1, then records the
/// lapsed lease when its clock reaches it, once.
#[tokio::test]
async fn the_monitor_loop_follows_a_ledger_and_records_a_lapse_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let (id, _) = start_backup(&ledger, t0()).await;
    renew(&ledger, LeasedJob::Backup, id, 0, t0()).await;
    let clock = ManualClock::new(t0() + secs(5));
    clock.set_horizon(Some(t0() + secs(29)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let monitor = lease::run_monitor_with(ledger.clone(), &ledger, LEASE, &clock, stop_rx.clone());
    let driver = async {
        // Before the lapse: nothing recorded.
        clock.wait_parked(1).await;
        assert!(clock.now() <= t0() + secs(29));
        assert!(
            stream_types(&ledger, id)
                .iter()
                .all(|t| t != "backup.failed")
        );
        // Past it. The sleeper parked at the old horizon leaves it only when the monitor runs
        // again, so wait for the clock to have moved on and the monitor to park anew.
        clock.set_horizon(Some(t0() + secs(60)));
        while !(clock.now() >= t0() + secs(60) && clock.parked() == 1) {
            tokio::task::yield_now().await;
        }
        let types = stream_types(&ledger, id);
        assert_eq!(
            types.iter().filter(|t| *t == "backup.failed").count(),
            1,
            "{types:?}"
        );
        stop_tx.send(true).unwrap();
    };
    let (ran, ()) = tokio::join!(monitor, driver);
    ran.unwrap();
    ledger.close().await;
}

fn stream_types(ledger: &Ledger, id: Uuid) -> Vec<String> {
    ledger
        .read(1, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.stream == streams::backup(id))
        .map(|e| e.event_type)
        .collect()
}

#[tokio::test]
async fn a_slow_job_failing_after_the_monitor_recorded_it_abandoned_is_not_an_error() {
    // The real ledger compares a duplicate id's content: the job's own failure, with another
    // reason and actor, is refused as IdReused, and the job must take that as "recorded".
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let (id, request) = start_backup(&ledger, t0()).await;
    let abandoned = backstop_ops::OpsError::DeadlineExceeded {
        what: "the lease (abandoned)".into(),
        limit_secs: 30,
    };
    backstop_ops::backup::record_failure_to(
        &ledger,
        &request,
        t0(),
        &Actor::worker(lease::MONITOR),
        None,
        &abandoned,
    )
    .await
    .unwrap();
    let own = backstop_ops::OpsError::DeadlineExceeded {
        what: "the dump".into(),
        limit_secs: 86_400,
    };
    backstop_ops::backup::record_failure_to(
        &ledger,
        &request,
        t0(),
        &Actor::worker("backup"),
        None,
        &own,
    )
    .await
    .expect("an id already taken by the same failure is not an error");
    let failed: Vec<_> = ledger
        .read_stream(&streams::backup(id), 0)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "backup.failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].actor, Actor::worker(lease::MONITOR));
    ledger.close().await;
}
