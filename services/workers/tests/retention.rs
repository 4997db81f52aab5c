//! The retention worker and the daily maintenance job, without a server: the repository in
//! memory, the ledger a recording appender (also the facts' source), time from a manual clock.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use backstop_events::{
    Actor, BackupCompleted, BackupKind, BackupMethod, Digest, Envelope, Event, NewEvent, streams,
    uuid_v7,
};
use backstop_ledger::consumer::Handler;
use backstop_ops::forget::{FactsSource, RetentionFacts};
use backstop_ops::retention::{PolicyEntry, RetentionConfig};
use backstop_ops::schedule::{Clock, ManualClock};
use backstop_ops::{DataPath, OpsError};
use backstop_repo::{BackupMeta, KeyAccessLog, KeyPurpose, MasterKey, RepoParams, Repository};
use backstop_testkit::{MemoryBackend, RecordingAppender};
use backstop_workers::retention::{
    Maintenance, RetentionSettings, RetentionWorker, next_run, run_maintenance,
};
use chrono::{NaiveTime, TimeDelta, TimeZone, Utc};
use uuid::Uuid;

struct Recorded(Arc<RecordingAppender>);

#[async_trait]
impl FactsSource for Recorded {
    async fn facts(&self) -> Result<RetentionFacts, OpsError> {
        Ok(RetentionFacts::from_envelopes(&self.0.envelopes()))
    }
}

async fn data_path() -> (DataPath, Arc<RecordingAppender>) {
    let repo = Repository::init(
        Arc::new(MemoryBackend::new()),
        &MasterKey::from_bytes([3; 64]),
        RepoParams::default(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .unwrap();
    let ledger = Arc::new(RecordingAppender::new());
    (
        DataPath {
            repo,
            appender: ledger.clone(),
            sources: Vec::new(),
        },
        ledger,
    )
}

async fn backup(repo: &Repository, source: &str, seed: u8) -> Uuid {
    let backup_id = uuid_v7();
    let w = repo
        .start_backup(BackupMeta {
            backup_id,
            kind: BackupKind::Full,
            parent: None,
            source: source.into(),
            purpose: KeyPurpose::Database,
            actor: "test".into(),
        })
        .await
        .unwrap();
    w.add_stream("data/t", &vec![seed; 5000][..]).await.unwrap();
    w.finish(serde_json::json!({})).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    backup_id
}

fn keep_last(n: u32) -> RetentionConfig {
    RetentionConfig::new(vec![PolicyEntry {
        keep_last: Some(n),
        keep_daily: Some(0),
        keep_weekly: Some(0),
        keep_monthly: Some(0),
        keep_yearly: Some(0),
        keep_tags: Some(BTreeMap::new()),
        ..Default::default()
    }])
    .unwrap()
}

fn completed(id: Uuid, source: &str) -> Envelope {
    let e = Event::BackupCompleted(BackupCompleted {
        backup_id: id,
        source: source.into(),
        kind: BackupKind::Full,
        parent: None,
        method: BackupMethod::Logical,
        manifest: backstop_repo::manifest_key(&id),
        manifest_sha3: String::new(),
        raw_bytes: 1,
        stored_bytes: 1,
        new_bytes: 1,
        chunks: 1,
        new_chunks: 1,
        duration_ms: 1,
        attempt: 1,
        tables: Vec::new(),
    });
    let n = NewEvent::new(streams::backup(id), Actor::worker("backup"), &e);
    Envelope::seal(n, 1, 1, backstop_events::now_micros(), Digest::ZERO)
}

#[tokio::test]
async fn after_a_completed_backup_only_that_source_is_forgotten_and_a_redelivery_records_nothing() {
    let (dp, ledger) = data_path().await;
    let a1 = backup(&dp.repo, "a", 1).await;
    let b1 = backup(&dp.repo, "b", 2).await;
    let a2 = backup(&dp.repo, "a", 3).await;
    let b2 = backup(&dp.repo, "b", 4).await;
    let clock = Arc::new(ManualClock::new(Utc::now() + TimeDelta::days(1)));
    let worker = RetentionWorker {
        data_path: dp.clone(),
        settings: RetentionSettings {
            config: keep_last(1),
            facts: Arc::new(Recorded(ledger.clone())),
            clock: clock.clone(),
        },
    };
    assert!(worker.wants("backup.completed"));
    let event = completed(a2, "a");
    worker.handle(&event, ledger.as_ref()).await.unwrap();
    let ids: Vec<Uuid> = dp.repo.backup_ids().await.unwrap();
    assert!(!ids.contains(&a1), "a's older backup went");
    assert!(ids.contains(&a2) && ids.contains(&b1) && ids.contains(&b2));
    let deleted: Vec<Uuid> = ledger
        .of_type("backup.deleted")
        .into_iter()
        .map(|e| match e {
            Event::BackupDeleted(d) => {
                assert_eq!(d.policy, "backups/*");
                d.backup_id
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(deleted, vec![a1]);
    let before = ledger.envelopes().len();
    worker.handle(&event, ledger.as_ref()).await.unwrap();
    assert_eq!(ledger.envelopes().len(), before, "redelivered: nothing new");
}

#[test]
fn the_next_run_is_the_next_daily_time_strictly_after_now() {
    let at = NaiveTime::from_hms_opt(4, 0, 0).unwrap();
    let t = |d, h, m| Utc.with_ymd_and_hms(2026, 3, d, h, m, 0).unwrap();
    assert_eq!(next_run(t(1, 3, 59), at), t(1, 4, 0));
    assert_eq!(next_run(t(1, 4, 0), at), t(2, 4, 0));
    assert_eq!(next_run(t(1, 23, 0), at), t(2, 4, 0));
}

#[tokio::test]
async fn the_daily_job_forgets_every_source_then_prunes_once_a_day() {
    let (dp, ledger) = data_path().await;
    let a1 = backup(&dp.repo, "a", 1).await;
    let _a2 = backup(&dp.repo, "a", 2).await;
    let b1 = backup(&dp.repo, "b", 3).await;
    let _b2 = backup(&dp.repo, "b", 4).await;
    // The manifests carry the real time; the clock starts a day later, before 04:00 UTC.
    let day = (Utc::now() + TimeDelta::days(1)).date_naive();
    let start = day.and_hms_opt(1, 0, 0).unwrap().and_utc();
    let clock = Arc::new(ManualClock::new(start));
    let m = Arc::new(Maintenance {
        data_path: dp.clone(),
        settings: RetentionSettings {
            config: keep_last(1),
            facts: Arc::new(Recorded(ledger.clone())),
            clock: clock.clone(),
        },
        daily_at: NaiveTime::from_hms_opt(4, 0, 0).unwrap(),
        grace: TimeDelta::hours(20),
        scratch_dir: None,
        locks: None,
        retire_hold: TimeDelta::zero(),
    });
    let chunks = || async { dp.repo.backend().list("chunks/").await.unwrap().len() };
    let all_chunks = chunks().await;
    clock.set_horizon(Some(start + TimeDelta::hours(5)));
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = {
        let (m, clock) = (m.clone(), clock.clone());
        tokio::spawn(async move { run_maintenance(&m, clock.as_ref(), shutdown).await })
    };
    // First pass at 04:00: both sources' older backups forgotten; their chunks only marked.
    clock.wait_parked(1).await;
    assert_eq!(clock.now(), start + TimeDelta::hours(3));
    let ids = dp.repo.backup_ids().await.unwrap();
    assert!(!ids.contains(&a1) && !ids.contains(&b1) && ids.len() == 2);
    assert_eq!(ledger.of_type("backup.deleted").len(), 2);
    assert_eq!(
        chunks().await,
        all_chunks,
        "within the grace nothing is swept"
    );
    // Next day's pass: past the grace, the forgotten backups' chunks are swept.
    clock.set_horizon(Some(start + TimeDelta::hours(29)));
    while clock.now() < start + TimeDelta::hours(27) {
        tokio::task::yield_now().await;
    }
    clock.wait_parked(1).await;
    assert!(chunks().await < all_chunks, "swept after the grace");
    let check = dp.repo.check(Some(100.0)).await.unwrap();
    assert!(check.is_ok(), "{:?}", check.problems);
    assert_eq!(check.unreferenced_chunks, 0);
    stop.send(true).unwrap();
    assert_eq!(task.await.unwrap(), 2, "one pass a day");
}

#[tokio::test]
async fn the_daily_pass_retires_a_rotated_out_key_once_nothing_is_sealed_with_it() {
    let (dp, ledger) = data_path().await;
    let m = Maintenance {
        data_path: dp.clone(),
        settings: RetentionSettings {
            config: keep_last(1),
            facts: Arc::new(Recorded(ledger.clone())),
            clock: Arc::new(ManualClock::new(Utc::now())),
        },
        daily_at: NaiveTime::from_hms_opt(4, 0, 0).unwrap(),
        grace: TimeDelta::hours(20),
        scratch_dir: None,
        locks: None,
        // As with object lock: a version is retired only a day after it was found unused.
        retire_hold: TimeDelta::days(1),
    };
    let now = Utc::now();
    backstop_workers::retention::maintain_once(&m, now)
        .await
        .unwrap();
    assert!(
        ledger.of_type("key.retired").is_empty(),
        "nothing rotated out yet"
    );

    let rotation = dp.repo.rotate_key(KeyPurpose::Database).await.unwrap();
    backstop_workers::retention::maintain_once(&m, now + TimeDelta::hours(1))
        .await
        .unwrap();
    assert!(
        ledger.of_type("key.retired").is_empty(),
        "unused, but within the hold"
    );
    backstop_workers::retention::maintain_once(&m, now + TimeDelta::days(2))
        .await
        .unwrap();
    let retired: Vec<String> = ledger
        .of_type("key.retired")
        .into_iter()
        .map(|e| match e {
            Event::KeyRetired(k) => k.key_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(retired, [rotation.old.key_id]);
    backstop_workers::retention::maintain_once(&m, now + TimeDelta::days(3))
        .await
        .unwrap();
    assert_eq!(
        ledger.of_type("key.retired").len(),
        1,
        "a retired version is not retired again"
    );
}
