//! On-change schedules of a configuration source (R16): the real scheduler on an injected clock
//! requests a backup every 5 minutes; each request is handled as the backup worker does
//! (`config_backup::skip_unchanged`, then `run_backup`). An unchanged slot is closed as
//! `backup.skipped` with no new manifest, a changed variable backs up at the next slot, and the
//! skips keep the staleness alert quiet.

mod support;

use std::sync::Arc;

use backstop_events::{Actor, BackupRequested, Envelope, Event, streams};
use backstop_ledger::{Ledger, LedgerConfig};
use backstop_ops::alerting::{AlertThresholds, Facts, conditions};
use backstop_ops::backup::{BackupOptions, run_backup};
use backstop_ops::config_backup;
use backstop_ops::lease::LeaseMonitor;
use backstop_ops::schedule::{self, ConfigDuration, ManualClock, Schedule, ScheduleConfig};
use backstop_ops::{DataPath, SourceKind, SourceSpec};
use backstop_sources::config::ConfigSource;
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use uuid::Uuid;

/// What handling one slot's request did.
#[derive(Debug, PartialEq)]
enum Handled {
    BackedUp(Uuid),
    Skipped { since: Uuid },
}

/// Fires the schedule's slot at `slot` (the real scheduler's tick) and handles its request as
/// the backup worker does.
async fn slot(dp: &DataPath, ledger: &Ledger, s: &Schedule, at: DateTime<Utc>) -> Handled {
    let clock = ManualClock::new(at);
    let t = schedule::tick(s, ledger, ledger, &clock).await.unwrap();
    let fired = t.fired.expect("the slot fires");
    assert_eq!(fired.slot, at);
    let id = schedule::backup_id_for(s.name(), fired.slot);
    let stream = ledger.read_stream(&streams::backup(id), 1).unwrap();
    let Ok(Event::BackupRequested(request)) = stream[0].event() else {
        panic!("not a backup.requested: {:?}", stream[0])
    };
    handle(dp, &request, &stream[0]).await
}

async fn handle(dp: &DataPath, request: &BackupRequested, event: &Envelope) -> Handled {
    let actor = Actor::worker("backup");
    if let Some(since) =
        config_backup::skip_unchanged(dp, request, event.occurred_at, &actor, Some(event))
            .await
            .unwrap_or_else(|e| panic!("{}", e.chain()))
    {
        return Handled::Skipped { since };
    }
    let done = run_backup(
        dp,
        request,
        event.occurred_at,
        &actor,
        Some(event),
        &BackupOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", e.chain()));
    Handled::BackedUp(done.completed.backup_id)
}

async fn manifests(dp: &DataPath) -> usize {
    dp.repo.list_backups().await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_minute_schedule_backs_up_a_config_source_only_on_change() {
    let src = tempfile::tempdir().unwrap();
    let env = src.path().join("app.env");
    std::fs::write(&env, "MODE=live\nRISK=0.02\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let dp = DataPath {
        repo: support::memory_repo().await,
        appender: Arc::new(ledger.clone()),
        sources: vec![SourceSpec {
            name: "cfg".into(),
            kind: SourceKind::Config(ConfigSource {
                env_file: Some(env.clone()),
                ..Default::default()
            }),
        }],
    };
    let config: ScheduleConfig = toml::from_str(
        "name = \"cfg-on-change\"\nsource = \"cfg\"\ncron = \"*/5 * * * *\"\nzone = \"UTC\"",
    )
    .unwrap();
    let s = Schedule::new(config).unwrap();
    let t0 = Utc.with_ymd_and_hms(2026, 6, 10, 12, 0, 0).unwrap();
    let at = |n: i64| t0 + TimeDelta::minutes(5 * n);

    // First slot: nothing backed up yet, so a backup.
    let Handled::BackedUp(first) = slot(&dp, &ledger, &s, at(0)).await else {
        panic!("the first slot backs up")
    };
    assert_eq!(manifests(&dp).await, 1);
    // Unchanged: skipped, naming the first backup; no new manifest.
    for n in 1..=3 {
        assert_eq!(
            slot(&dp, &ledger, &s, at(n)).await,
            Handled::Skipped { since: first },
            "slot {n}"
        );
    }
    assert_eq!(manifests(&dp).await, 1, "a skip writes no manifest");
    let skipped = schedule::backup_id_for(s.name(), at(1));
    let events = ledger.read_stream(&streams::backup(skipped), 1).unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, vec!["backup.requested", "backup.skipped"]);
    let Ok(Event::BackupSkipped(k)) = events[1].event() else {
        unreachable!()
    };
    assert_eq!((k.backup_id, k.source.as_str()), (skipped, "cfg"));
    assert_eq!(k.unchanged_since, first);
    // A redelivered request records its skip once.
    let Ok(Event::BackupRequested(r)) = events[0].event() else {
        unreachable!()
    };
    handle(&dp, &r, &events[0]).await;
    assert_eq!(
        ledger
            .read_stream(&streams::backup(skipped), 1)
            .unwrap()
            .len(),
        2
    );

    // A changed variable: the next slot backs up, and the one after is skipped against it.
    std::fs::write(&env, "MODE=maintenance\nRISK=0.02\n").unwrap();
    let Handled::BackedUp(second) = slot(&dp, &ledger, &s, at(4)).await else {
        panic!("a changed configuration backs up")
    };
    assert_ne!(second, first);
    assert_eq!(manifests(&dp).await, 2);
    assert_eq!(
        slot(&dp, &ledger, &s, at(5)).await,
        Handled::Skipped { since: second }
    );
    assert_eq!(
        slot(&dp, &ledger, &s, at(6)).await,
        Handled::Skipped { since: second }
    );

    // The readers: no request left pending for the lease monitor, and the staleness alert
    // (stale after 10 minutes) quiet while skips confirm the source, 22 minutes after its last
    // backup; it holds once they stop.
    // The scheduler's events carry the injected clock's time, the handling's events real time:
    // the alert facts see each backup's events at its slot, as a worker handling it at once does.
    let mut slot_of = std::collections::HashMap::new();
    let mut leases = LeaseMonitor::new(std::time::Duration::from_secs(60));
    let mut facts = Facts::default();
    for mut e in ledger.read(1, 10_000).unwrap() {
        if e.event_type == "backup.requested" {
            slot_of.insert(e.stream.clone(), e.occurred_at);
        } else if let Some(at) = slot_of.get(&e.stream) {
            e.occurred_at = *at;
        }
        leases.observe(&e);
        facts.observe(&e);
    }
    assert_eq!(leases.running(), 0, "a skipped request is closed");
    assert!(leases.expired(at(6) + TimeDelta::days(1)).is_empty());
    let t = AlertThresholds {
        stale_after: ConfigDuration::from_secs(600),
        ..Default::default()
    };
    let stale = |now: DateTime<Utc>| {
        conditions(&facts, &t, None, now)
            .into_iter()
            .filter(|c| c.kind == "no_recent_backup")
            .count()
    };
    assert_eq!(stale(at(6) + TimeDelta::minutes(2)), 0);
    assert_eq!(stale(at(6) + TimeDelta::minutes(11)), 1);
}
