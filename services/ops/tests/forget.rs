//! The retention use case over a real repository in memory and a recording ledger, with time
//! injected: `now` is given to every run (the manifests carry the real time they were written,
//! so runs "later" are `now` plus days). Decisions are checked against what the policy says by
//! construction (keep-last counts, chains, verifications), never against the code under test.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use backstop_events::{
    Actor, BackupKind, Event, RetentionDecided, VerificationFailed, VerificationPassed, VerifyTier,
    streams, uuid_v7,
};
use backstop_ledger::Appender;
use backstop_ops::forget::{
    ForgetOptions, ForgetReport, PruneRun, RetentionFacts, forget, prune_repository,
};
use backstop_ops::record::record;
use backstop_ops::retention::{Class, PolicyEntry, RetentionConfig, Verification};
use backstop_repo::{BackupMeta, KeyAccessLog, KeyPurpose, MasterKey, RepoParams, Repository};
use backstop_testkit::{MemoryBackend, RecordingAppender};
use bytes::Bytes;
use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

struct World {
    repo: Repository,
    ledger: Arc<RecordingAppender>,
}

async fn world() -> World {
    let repo = Repository::init(
        Arc::new(MemoryBackend::new()),
        &MasterKey::from_bytes([9; 64]),
        RepoParams::default(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .expect("a repository in memory");
    World {
        repo,
        ledger: Arc::new(RecordingAppender::new()),
    }
}

/// A policy for `main` that keeps the newest `n` and nothing by period or tag.
fn keep_last(n: u32) -> RetentionConfig {
    RetentionConfig::new(vec![PolicyEntry {
        source: Some("main".into()),
        class: Class::Backups,
        keep_last: Some(n),
        keep_hourly: Some(0),
        keep_daily: Some(0),
        keep_weekly: Some(0),
        keep_monthly: Some(0),
        keep_yearly: Some(0),
        keep_tags: Some(BTreeMap::new()),
        ..Default::default()
    }])
    .expect("a valid policy")
}

async fn stored(
    repo: &Repository,
    kind: BackupKind,
    parent: Option<Uuid>,
    data: &[u8],
    extra: serde_json::Value,
) -> Uuid {
    let backup_id = uuid_v7();
    let w = repo
        .start_backup(BackupMeta {
            backup_id,
            kind,
            parent,
            source: "main".into(),
            purpose: KeyPurpose::Database,
            actor: "test".into(),
        })
        .await
        .expect("a writer");
    w.add_stream("data/public.t", data).await.expect("a stream");
    w.finish(extra).await.expect("a manifest");
    // Distinct finish times (milliseconds) for every backup.
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    backup_id
}

async fn full(repo: &Repository, seed: u8) -> Uuid {
    let data = vec![seed; 10_000];
    stored(repo, BackupKind::Full, None, &data, serde_json::json!({})).await
}

fn opts(dry_run: bool, now: DateTime<Utc>) -> ForgetOptions {
    ForgetOptions {
        source: None,
        dry_run,
        now,
    }
}

fn keep_set(r: &ForgetReport) -> BTreeMap<Uuid, (bool, String)> {
    r.decisions
        .iter()
        .map(|d| (d.backup_id, (d.keep, d.reason.clone())))
        .collect()
}

fn actor() -> Actor {
    Actor::operator("tester")
}

async fn present(repo: &Repository) -> BTreeSet<Uuid> {
    repo.backup_ids().await.unwrap().into_iter().collect()
}

#[tokio::test]
async fn a_dry_run_and_a_real_run_agree_and_every_deletion_is_an_event_with_its_policy() {
    let w = world().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(full(&w.repo, i).await);
    }
    let policy = keep_last(2);
    let facts = RetentionFacts::default();
    let now = Utc::now() + TimeDelta::days(1);

    let dry = forget(
        &w.repo,
        w.ledger.as_ref(),
        &policy,
        &facts,
        &opts(true, now),
        &actor(),
    )
    .await
    .unwrap();
    assert!(w.ledger.envelopes().is_empty(), "a dry run records nothing");
    assert_eq!(present(&w.repo).await.len(), 5, "a dry run deletes nothing");
    let expected: BTreeSet<Uuid> = ids[3..].iter().copied().collect();
    let kept: BTreeSet<Uuid> = dry
        .decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.backup_id)
        .collect();
    assert_eq!(kept, expected, "keep_last 2 keeps the two newest");
    assert!(dry.decisions.iter().all(|d| !d.forgotten));

    let real = forget(
        &w.repo,
        w.ledger.as_ref(),
        &policy,
        &facts,
        &opts(false, now),
        &actor(),
    )
    .await
    .unwrap();
    assert_eq!(keep_set(&dry), keep_set(&real), "same decisions");
    assert_eq!(present(&w.repo).await, expected);

    let decided = w.ledger.of_type("retention.decided");
    assert_eq!(decided.len(), 5);
    for e in &decided {
        let Event::RetentionDecided(d) = e else {
            panic!("{e:?}")
        };
        assert_eq!(d.policy, "backups/main");
        assert_eq!(d.keep, expected.contains(&d.backup_id), "{d:?}");
        if d.keep {
            assert_eq!(d.reason, "last 2");
        }
    }
    let deleted: BTreeMap<Uuid, (String, String)> = w
        .ledger
        .of_type("backup.deleted")
        .into_iter()
        .map(|e| match e {
            Event::BackupDeleted(d) => (d.backup_id, (d.policy, d.reason)),
            other => panic!("{other:?}"),
        })
        .collect();
    let removed: BTreeSet<Uuid> = ids[..3].iter().copied().collect();
    assert_eq!(deleted.keys().copied().collect::<BTreeSet<_>>(), removed);
    for (policy, reason) in deleted.values() {
        assert_eq!(policy, "backups/main");
        assert_eq!(reason, "no rule keeps it");
    }
    // The deletion events are on each backup's own stream.
    for env in w.ledger.envelopes() {
        if env.event_type == "backup.deleted" {
            assert!(removed.iter().any(|id| env.stream == streams::backup(*id)));
        }
    }

    // The same day again: nothing new is recorded.
    let before = w.ledger.envelopes().len();
    let again = forget(
        &w.repo,
        w.ledger.as_ref(),
        &policy,
        &facts,
        &opts(false, now),
        &actor(),
    )
    .await
    .unwrap();
    assert!(again.removed().next().is_none());
    assert_eq!(
        w.ledger.envelopes().len(),
        before,
        "a rerun records nothing twice"
    );
    // The next day, the decisions are recorded again (one per backup and day).
    let next = now + TimeDelta::days(1);
    forget(
        &w.repo,
        w.ledger.as_ref(),
        &policy,
        &facts,
        &opts(false, next),
        &actor(),
    )
    .await
    .unwrap();
    assert_eq!(w.ledger.envelopes().len(), before + 2);
}

#[tokio::test]
async fn the_newest_verified_backup_is_never_deleted() {
    let w = world().await;
    let verified = full(&w.repo, 1).await;
    let failed_older = full(&w.repo, 2).await;
    let newest = full(&w.repo, 3).await;
    let mut facts = RetentionFacts::default();
    let t = Utc::now();
    facts.set_verification(verified, Verification::Passed { at: t });
    // A failed verification that is older than the passed one does not hold anything.
    facts.set_verification(
        failed_older,
        Verification::Failed {
            at: t - TimeDelta::hours(1),
        },
    );
    let r = forget(
        &w.repo,
        w.ledger.as_ref(),
        &keep_last(1),
        &facts,
        &opts(false, t + TimeDelta::days(3)),
        &actor(),
    )
    .await
    .unwrap();
    let d = keep_set(&r);
    assert_eq!(d[&verified], (true, "newest verified".to_string()));
    assert_eq!(d[&newest], (true, "last 1".to_string()));
    assert!(!d[&failed_older].0);
    assert_eq!(
        present(&w.repo).await,
        BTreeSet::from([verified, newest]),
        "only the unverified older backup went"
    );
}

#[tokio::test]
async fn a_parent_that_a_kept_incremental_needs_is_kept_with_its_whole_chain() {
    let w = world().await;
    let lone = full(&w.repo, 1).await;
    let base = full(&w.repo, 2).await;
    let data = vec![3u8; 10_000];
    let i1 = stored(
        &w.repo,
        BackupKind::Incremental,
        Some(base),
        &data,
        serde_json::json!({}),
    )
    .await;
    let i2 = stored(
        &w.repo,
        BackupKind::Incremental,
        Some(i1),
        &data,
        serde_json::json!({}),
    )
    .await;
    let r = forget(
        &w.repo,
        w.ledger.as_ref(),
        &keep_last(1),
        &RetentionFacts::default(),
        &opts(false, Utc::now() + TimeDelta::days(1)),
        &actor(),
    )
    .await
    .unwrap();
    let d = keep_set(&r);
    assert_eq!(d[&i2], (true, "last 1".into()));
    assert_eq!(d[&i1], (true, format!("parent of kept {i2}")));
    assert_eq!(d[&base], (true, format!("parent of kept {i1}")));
    assert!(!d[&lone].0);
    assert_eq!(present(&w.repo).await, BTreeSet::from([base, i1, i2]));
}

#[tokio::test]
async fn nothing_is_deleted_while_the_newest_verification_failed() {
    let w = world().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(full(&w.repo, i).await);
    }
    let t = Utc::now();
    let mut facts = RetentionFacts::default();
    facts.set_verification(ids[0], Verification::Passed { at: t });
    facts.set_verification(
        ids[3],
        Verification::Failed {
            at: t + TimeDelta::minutes(5),
        },
    );
    let r = forget(
        &w.repo,
        w.ledger.as_ref(),
        &keep_last(1),
        &facts,
        &opts(false, t + TimeDelta::days(2)),
        &actor(),
    )
    .await
    .unwrap();
    assert!(r.decisions.iter().all(|d| d.keep), "{r:#?}");
    assert!(
        r.decisions
            .iter()
            .all(|d| d.reason.contains("held: the newest verification")),
        "{r:#?}"
    );
    assert_eq!(present(&w.repo).await.len(), 4);
    assert!(w.ledger.of_type("backup.deleted").is_empty());

    // The same facts read from verification events in a ledger hold the same way, and a later
    // passed verification of the failed backup lifts the hold.
    let events = RecordingAppender::new();
    let verified = |backup_id| {
        Event::VerificationPassed(VerificationPassed {
            verification_id: uuid_v7(),
            backup_id,
            tier: VerifyTier::Checksums,
            objects_checked: 1,
            bytes_checked: 1,
            restore_ms: None,
            restore_bytes_per_sec: None,
            tables: Vec::new(),
        })
    };
    let failed = Event::VerificationFailed(VerificationFailed {
        verification_id: uuid_v7(),
        backup_id: ids[3],
        tier: VerifyTier::Checksums,
        reason: "chunk damaged".into(),
        tables: Vec::new(),
    });
    for (label, e) in [("v0", verified(ids[0])), ("v3", failed)] {
        record(
            &events,
            "verification",
            &actor(),
            None,
            t,
            label,
            uuid_v7(),
            e,
        )
        .await
        .unwrap();
    }
    let from_ledger = RetentionFacts::from_envelopes(&events.envelopes());
    assert!(matches!(
        from_ledger.verification(ids[3]),
        Verification::Failed { .. }
    ));
    let held = forget(
        &w.repo,
        w.ledger.as_ref(),
        &keep_last(1),
        &from_ledger,
        &opts(true, t + TimeDelta::days(2)),
        &actor(),
    )
    .await
    .unwrap();
    assert!(held.decisions.iter().all(|d| d.keep));
    record(
        &events,
        "verification",
        &actor(),
        None,
        t,
        "v3 again",
        uuid_v7(),
        verified(ids[3]),
    )
    .await
    .unwrap();
    let lifted = RetentionFacts::from_envelopes(&events.envelopes());
    let r = forget(
        &w.repo,
        w.ledger.as_ref(),
        &keep_last(1),
        &lifted,
        &opts(false, t + TimeDelta::days(2)),
        &actor(),
    )
    .await
    .unwrap();
    // ids[3] is now both the newest and the newest verified: the three older ones go.
    assert_eq!(r.removed().count(), 3, "{r:#?}");
    assert_eq!(present(&w.repo).await, BTreeSet::from([ids[3]]));
}

#[tokio::test]
async fn a_deletion_whose_event_was_lost_is_recorded_by_the_next_run() {
    let w = world().await;
    let old = full(&w.repo, 1).await;
    let _new = full(&w.repo, 2).await;
    let now = Utc::now() + TimeDelta::days(1);
    let day = now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    // What a run killed between the manifest's delete and `backup.deleted` leaves: the
    // decision (recorded as forget records it), and no manifest.
    record(
        w.ledger.as_ref() as &dyn Appender,
        &streams::backup(old),
        &actor(),
        None,
        day,
        "retention.decided backups/main remove",
        old,
        Event::RetentionDecided(RetentionDecided {
            backup_id: old,
            policy: "backups/main".into(),
            keep: false,
            reason: "no rule keeps it".into(),
        }),
    )
    .await
    .unwrap();
    assert!(w.repo.forget_backup(old).await.unwrap());
    let facts = RetentionFacts::from_envelopes(&w.ledger.envelopes());
    let r = forget(
        &w.repo,
        w.ledger.as_ref(),
        &keep_last(1),
        &facts,
        &opts(false, now),
        &actor(),
    )
    .await
    .unwrap();
    assert_eq!(r.healed, vec![old]);
    let deleted = w.ledger.of_type("backup.deleted");
    assert_eq!(deleted.len(), 1);
    let Event::BackupDeleted(d) = &deleted[0] else {
        panic!()
    };
    assert_eq!((d.backup_id, d.policy.as_str()), (old, "backups/main"));
    // Once recorded, never again.
    let facts = RetentionFacts::from_envelopes(&w.ledger.envelopes());
    let r = forget(
        &w.repo,
        w.ledger.as_ref(),
        &keep_last(1),
        &facts,
        &opts(false, now),
        &actor(),
    )
    .await
    .unwrap();
    assert!(r.healed.is_empty());
    assert_eq!(w.ledger.of_type("backup.deleted").len(), 1);
}

/// A physical backup's manifest `extra` naming the WAL range it needs.
fn physical_extra(start: &str, stop: &str) -> serde_json::Value {
    serde_json::json!({ "physical": {
        "format": 1, "part": "base/base.tar", "server_version": "15.18",
        "server_version_num": 150018, "pg_basebackup_version": "15.18",
        "system_identifier": 7, "wal_segment_size": 16777216, "data_checksums": true,
        "label": "backstop test", "start_lsn": "0/2000028", "checkpoint_lsn": "0/2000060",
        "timeline": 1, "stop_lsn": "0/2000100", "stop_timeline": 1,
        "start_segment": start, "stop_segment": stop, "start_time": null,
        "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:01Z",
        "duration_ms": 1000, "files": 1, "data_bytes": 1, "raw_bytes": 1,
        "stored": {"stored_bytes": 1, "new_bytes": 1}, "has_manifest": true,
    } })
}

fn segment(n: u32) -> String {
    format!("00000001000000000000{n:04X}")
}

#[tokio::test]
async fn wal_no_kept_base_needs_is_handed_to_the_prune_and_swept_after_the_grace() {
    let w = world().await;
    let data = vec![5u8; 10_000];
    let b1 = stored(
        &w.repo,
        BackupKind::Full,
        None,
        &data,
        physical_extra(&segment(2), &segment(2)),
    )
    .await;
    let b2 = stored(
        &w.repo,
        BackupKind::Full,
        None,
        &data,
        physical_extra(&segment(5), &segment(5)),
    )
    .await;
    for n in 1..=7 {
        let key = format!("wal/main/00000001/{}", segment(n));
        w.repo
            .backend()
            .put(&key, Bytes::from_static(b"segment"))
            .await
            .unwrap();
    }
    // The window's base is b2 (the newest at or before now - window): WAL before its start
    // segment is no longer needed once b1 goes.
    let cfg = RetentionConfig::new(vec![PolicyEntry {
        source: Some("main".into()),
        keep_last: Some(1),
        keep_daily: Some(0),
        keep_weekly: Some(0),
        keep_monthly: Some(0),
        keep_yearly: Some(0),
        keep_tags: Some(BTreeMap::new()),
        wal_window: Some("1h".parse().unwrap()),
        ..Default::default()
    }])
    .unwrap();
    let now = Utc::now() + TimeDelta::days(1);
    let facts = RetentionFacts::default();
    let r = forget(
        &w.repo,
        w.ledger.as_ref(),
        &cfg,
        &facts,
        &opts(false, now),
        &actor(),
    )
    .await
    .unwrap();
    let d = keep_set(&r);
    assert!(d[&b2].0 && !d[&b1].0, "{r:#?}");
    let expected: Vec<String> = (1..5)
        .map(|n| format!("wal/main/00000001/{}", segment(n)))
        .collect();
    assert_eq!(r.wal_candidates(), expected);
    // forget deletes no WAL itself.
    assert_eq!(w.repo.backend().list("wal/").await.unwrap().len(), 7);

    let run = |now, dry_run| PruneRun {
        dry_run,
        grace: TimeDelta::hours(24),
        now,
        scratch_dir: None,
    };
    let first = prune_repository(&w.repo, &cfg, &facts, &run(now, false))
        .await
        .unwrap();
    assert_eq!(first.wal_candidates, 4);
    assert_eq!(first.report.swept, 0, "nothing is due before the grace");
    let later = now + TimeDelta::hours(25);
    let dry = prune_repository(&w.repo, &cfg, &facts, &run(later, true))
        .await
        .unwrap();
    assert_eq!(w.repo.backend().list("wal/").await.unwrap().len(), 7);
    let swept = prune_repository(&w.repo, &cfg, &facts, &run(later, false))
        .await
        .unwrap();
    assert_eq!(dry.report.swept, swept.report.swept, "dry run = real run");
    let left: Vec<String> = w
        .repo
        .backend()
        .list("wal/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(
        left,
        (5..=7)
            .map(|n| format!("wal/main/00000001/{}", segment(n)))
            .collect::<Vec<_>>()
    );
    let check = w.repo.check(Some(100.0)).await.unwrap();
    assert!(check.is_ok(), "{:?}", check.problems);
}

#[tokio::test]
async fn a_running_backup_from_the_ledger_defers_the_sweep() {
    let w = world().await;
    let old = full(&w.repo, 1).await;
    let _new = full(&w.repo, 2).await;
    let cfg = keep_last(1);
    let now = Utc::now() + TimeDelta::days(1);
    forget(
        &w.repo,
        w.ledger.as_ref(),
        &cfg,
        &RetentionFacts::default(),
        &opts(false, now),
        &actor(),
    )
    .await
    .unwrap();
    assert!(!present(&w.repo).await.contains(&old));
    // A backup started (in the ledger) and not finished, without a manifest yet.
    let running = uuid_v7();
    record(
        w.ledger.as_ref() as &dyn Appender,
        &streams::backup(running),
        &actor(),
        None,
        now,
        "started",
        running,
        Event::BackupStarted(backstop_events::BackupStarted {
            backup_id: running,
            source: "main".into(),
            kind: BackupKind::Full,
            parent: None,
            method: backstop_events::BackupMethod::Logical,
            host: "test".into(),
        }),
    )
    .await
    .unwrap();
    let facts = RetentionFacts::from_envelopes(&w.ledger.envelopes());
    assert_eq!(facts.running(), vec![running]);
    let run = |now| PruneRun {
        dry_run: false,
        grace: TimeDelta::zero(),
        now,
        scratch_dir: None,
    };
    prune_repository(&w.repo, &cfg, &facts, &run(now))
        .await
        .unwrap();
    let second = prune_repository(&w.repo, &cfg, &facts, &run(now + TimeDelta::hours(1)))
        .await
        .unwrap();
    assert_eq!(second.report.sweep_deferred_for, vec![running]);
    assert_eq!(second.report.swept, 0);
    // Without it the same prune sweeps the forgotten backup's chunks.
    let third = prune_repository(
        &w.repo,
        &cfg,
        &RetentionFacts::default(),
        &run(now + TimeDelta::hours(2)),
    )
    .await
    .unwrap();
    assert!(third.report.swept > 0, "{:?}", third.report);
    let check = w.repo.check(Some(100.0)).await.unwrap();
    assert!(check.is_ok(), "{:?}", check.problems);
    assert_eq!(check.unreferenced_chunks, 0);
}
