//! Rotation every 90 days with re-encryption, on a real PostgreSQL, a real ledger and a local
//! repository: the schedule's tick (an injected instant, no sleeping) rotates only when the
//! current versions are older than the limit, the job re-seals both backups and records its
//! events, each backup then passes a real test restore from the `backup.completed` it was
//! recorded with, unwrapping only the new versions, and the old database version is retired once
//! prune has removed the originals.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use backstop_events::{Actor, Event};
use backstop_ledger::{Ledger, LedgerConfig};
use backstop_ops::rotation::{DEFAULT_ROTATE_AFTER_DAYS, retire, rotate_if_due};
use backstop_ops::verify::{VerifyOutcome, verify_completed};
use backstop_repo::{
    KeyAccessLog, KeyPurpose, LocalBackend, MasterKey, PruneOptions, ReencryptOptions, RepoParams,
    Repository, RetireOptions,
};
use backstop_testkit::Postgres;
use chrono::{Duration, Utc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_rotates_after_90_days_and_every_backup_restores_with_the_new_keys_only() {
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE trades (id int PRIMARY KEY, sym text, qty int); \
         INSERT INTO trades SELECT g, 'ACME', g % 97 FROM generate_series(1, 20000) g;",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(&dir.path().join("ledger"))).unwrap();
    let log = Arc::new(KeyAccessLog::new());
    let repo = Repository::init(
        Arc::new(LocalBackend::new(dir.path().join("repo")).unwrap()),
        &MasterKey::generate(),
        RepoParams::default(),
        log.clone(),
    )
    .await
    .unwrap();
    let appender: Arc<dyn backstop_ledger::Appender> = Arc::new(ledger.clone());
    let dp = support::data_path(repo.clone(), appender.clone(), "app", pg.conninfo("app"));
    let actor = Actor::worker("keys");
    support::back_up(&dp, "app", &actor).await;
    pg.psql(
        "app",
        "INSERT INTO trades SELECT g, 'INIT', g % 13 FROM generate_series(20001, 25000) g;",
    )
    .unwrap();
    support::back_up(&dp, "app", &actor).await;
    let old_db = repo.current_key(KeyPurpose::Database).unwrap();

    let t0 = Utc::now();
    let limit = Duration::days(DEFAULT_ROTATE_AFTER_DAYS as i64);
    let tick = rotate_if_due(
        &repo,
        appender.clone(),
        &actor,
        t0 + Duration::days(89),
        limit,
    )
    .await
    .unwrap();
    assert!(
        tick.rotated.is_empty() && tick.reencryption.is_none(),
        "{tick:?}"
    );

    let at = t0 + Duration::days(91);
    let tick = rotate_if_due(&repo, appender.clone(), &actor, at, limit)
        .await
        .unwrap();
    let rotated: Vec<KeyPurpose> = tick.rotated.iter().map(|r| r.purpose).collect();
    assert_eq!(rotated, [KeyPurpose::Database, KeyPurpose::Files]);
    let report = tick.reencryption.expect("the job ran");
    assert_eq!(report.backups_reencrypted, 2);
    assert!(report.chunks_resealed > 0);
    let new_db = repo.current_key(KeyPurpose::Database).unwrap();
    assert_eq!(
        new_db.created_at, at,
        "the new version is dated by the schedule's clock"
    );

    // The new versions are young by the same clock: the next tick does nothing.
    let tick = rotate_if_due(&repo, appender.clone(), &actor, at, limit)
        .await
        .unwrap();
    assert!(tick.rotated.is_empty() && tick.reencryption.is_none());

    let events = ledger.read(1, 10_000).unwrap();
    let count = |t: &str| events.iter().filter(|e| e.event_type == t).count();
    assert_eq!(count("key.rotated"), 2);
    assert_eq!(count("reencryption.started"), 1);
    assert_eq!(count("reencryption.progressed"), 2);
    assert_eq!(count("reencryption.completed"), 1);
    let progress: Vec<(u64, u64, bool)> = events
        .iter()
        .filter_map(|e| match e.event() {
            Ok(Event::ReencryptionProgressed(p)) => {
                Some((p.backups_done, p.backups_total, p.manifest_sha3.len() == 64))
            }
            _ => None,
        })
        .collect();
    assert_eq!(progress, [(1, 2, true), (2, 2, true)]);

    // Each backup passes a real test restore from the completion recorded at backup time (its
    // manifest SHA3 names the manifest before re-encryption), unwrapping the new version only.
    let settings = support::scratch_settings(pg.scratch_role().unwrap(), false);
    log.take();
    let completions: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "backup.completed")
        .cloned()
        .collect();
    assert_eq!(completions.len(), 2);
    for env in &completions {
        let Ok(Event::BackupCompleted(done)) = env.event() else {
            unreachable!()
        };
        let outcome = verify_completed(&dp, &settings, env, &done, &actor)
            .await
            .unwrap_or_else(|e| panic!("verification of {}: {}", done.backup_id, e.chain()));
        assert!(matches!(outcome, VerifyOutcome::Passed), "{outcome:?}");
    }
    let used: BTreeSet<String> = log.take().into_iter().map(|a| a.key_id).collect();
    assert_eq!(used, BTreeSet::from([new_db.key_id.clone()]));

    // The originals are still there: the old version seals them, so it is not retired (the
    // files version, which never sealed anything, is).
    let no_hold = |now| RetireOptions {
        now,
        hold: Duration::zero(),
    };
    let r = retire(&repo, appender.as_ref(), &actor, &no_hold(at))
        .await
        .unwrap();
    assert!(r.in_use.iter().any(|(k, _)| k.key_id == old_db.key_id));
    assert!(r.retired.iter().all(|k| k.purpose == KeyPurpose::Files));

    // Prune marks and then sweeps them; the old database version goes with the last of them.
    repo.prune(&PruneOptions::new(at + Duration::hours(1)))
        .await
        .unwrap();
    let swept = repo
        .prune(&PruneOptions::new(at + Duration::hours(30)))
        .await
        .unwrap();
    assert!(swept.swept > 0);
    let r = retire(
        &repo,
        appender.as_ref(),
        &actor,
        &no_hold(at + Duration::hours(31)),
    )
    .await
    .unwrap();
    assert_eq!(
        r.retired
            .iter()
            .map(|k| k.key_id.clone())
            .collect::<Vec<_>>(),
        std::slice::from_ref(&old_db.key_id)
    );
    let retired: Vec<String> = ledger
        .read(1, 10_000)
        .unwrap()
        .iter()
        .filter_map(|e| match e.event() {
            Ok(Event::KeyRetired(k)) => Some(k.key_id),
            _ => None,
        })
        .collect();
    assert_eq!(retired.len(), 2, "{retired:?}");
    assert!(retired.contains(&old_db.key_id));
    drop((dp, appender));
    ledger.close().await;
}

/// `serve`'s loop around the tick: at its start it rotates what is due at the clock's time, then
/// waits an hour of that clock (parked here at the horizon) until shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serve_schedule_ticks_at_start_and_stops_at_shutdown() {
    use backstop_ops::schedule::ManualClock;
    let dir = tempfile::tempdir().unwrap();
    let repo = local_repository(dir.path()).await;
    let limit = Duration::days(DEFAULT_ROTATE_AFTER_DAYS as i64);
    for (age_days, rotations) in [(89, 0), (91, 2)] {
        let recorded = Arc::new(backstop_testkit::RecordingAppender::new());
        let at = Utc::now() + Duration::days(age_days);
        let clock = Arc::new(ManualClock::new(at));
        clock.set_horizon(Some(at));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = {
            let (repo, recorded, clock) = (repo.clone(), recorded.clone(), clock.clone());
            tokio::spawn(async move {
                backstop_ops::rotation::run_schedule(repo, recorded, limit, clock.as_ref(), stopped)
                    .await
            })
        };
        clock.wait_parked(1).await;
        assert_eq!(
            recorded.of_type("key.rotated").len(),
            rotations,
            "at {age_days} days"
        );
        stop.send(true).unwrap();
        assert_eq!(task.await.unwrap(), 1, "one tick before the shutdown");
    }
}

/// A first run killed after its job state was written and before `reencryption.started` reached
/// the ledger (the gap `e2e_reencrypt_kill` can land in): the resumed run records `started`, so
/// the ledger tells the whole story, and a second resumed run does not record it twice.
#[tokio::test]
async fn a_resumed_job_records_the_start_its_killed_first_run_did_not() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(&dir.path().join("ledger"))).unwrap();
    let repo = local_repository(dir.path()).await;
    let appender: Arc<dyn backstop_ledger::Appender> = Arc::new(ledger.clone());
    let actor = Actor::worker("keys");
    repo.rotate_key(KeyPurpose::Database).await.unwrap();
    let now = Utc::now();
    let opts = |job| ReencryptOptions::new(job, now);
    // The killed first run: its state exists, the ledger has heard nothing.
    let job = uuid::Uuid::now_v7();
    let (state, resumed) = repo.begin_reencryption(&opts(job)).await.unwrap();
    assert!(!resumed);
    assert_eq!(state.job_id, job);
    let count = |t: &str| {
        ledger
            .read(1, 10_000)
            .unwrap()
            .iter()
            .filter(|e| e.event_type == t)
            .count()
    };
    assert_eq!(count("reencryption.started"), 0);

    // The resumed run (with another job id offered, which it must not use).
    backstop_ops::rotation::reencrypt(&repo, appender.clone(), &actor, &opts(uuid::Uuid::now_v7()))
        .await
        .unwrap();
    let started: Vec<uuid::Uuid> = ledger
        .read(1, 10_000)
        .unwrap()
        .iter()
        .filter_map(|e| match e.event() {
            Ok(Event::ReencryptionStarted(s)) => Some(s.job_id),
            _ => None,
        })
        .collect();
    assert_eq!(started, [job], "the start of the job that ran, once");
    assert_eq!(count("reencryption.completed"), 1);
    assert!(repo.reencryption_state().await.unwrap().is_none());
    drop(appender);
    ledger.close().await;
}

/// A fresh local repository in `dir/repo`, with a key access log nobody reads.
async fn local_repository(dir: &std::path::Path) -> Repository {
    Repository::init(
        Arc::new(LocalBackend::new(dir.join("repo")).unwrap()),
        &MasterKey::generate(),
        RepoParams::default(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .unwrap()
}
