//! Key rotation with re-encryption on a local repository: every backup re-sealed with the new
//! versions and read with nothing else, a job stopped at each crash point and resumed, a backup
//! running across a job, prune beside it, and retirement only once nothing is sealed with an
//! old version.

mod common;

use std::collections::BTreeSet;

use backstop_events::BackupKind;
use backstop_repo::reencrypt::{CrashPoint, REENCRYPTION_STATE};
use backstop_repo::{
    BackupResult, KeyPurpose, PruneOptions, ReencryptOptions, ReencryptReport, Repository,
    RetireOptions,
};
use chrono::{DateTime, Duration, Utc};
use common::*;
use uuid::Uuid;

fn at(hours: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + Duration::hours(hours)
}

/// Three backups sharing most of their chunks (as nightly dumps do), each checked afterwards.
struct Fixture {
    t: TestRepo,
    backups: Vec<(BackupResult, Vec<u8>)>,
}

async fn fixture() -> Fixture {
    let t = TestRepo::new(small_chunks()).await;
    let base = test_data(3 << 20, 7);
    let mut backups = Vec::new();
    for i in 0..3u64 {
        let mut data = base.clone();
        data.extend(test_data(200_000, 100 + i));
        let r = backup(&t.repo, &[("dump", &data)]).await;
        backups.push((r, data));
    }
    Fixture { t, backups }
}

/// Every backup restores byte for byte, through a handle of its own, and the keys it unwrapped.
async fn restore_all(f: &Fixture) -> BTreeSet<String> {
    f.t.log.take();
    let repo = f.t.repo.with_access("operator:test", "restore test");
    for (r, data) in &f.backups {
        let m = repo
            .load_manifest_checked(r.backup_id, Some(r.manifest_sha3))
            .await
            .unwrap_or_else(|e| panic!("backup {} does not load: {e}", r.backup_id));
        assert_eq!(&read_stream(&repo, &m, "dump").await.unwrap(), data);
    }
    f.t.log.take().into_iter().map(|a| a.key_id).collect()
}

async fn run_job(repo: &Repository, opts: &ReencryptOptions) -> Result<ReencryptReport, String> {
    let (state, _) = repo
        .begin_reencryption(opts)
        .await
        .map_err(|e| e.to_string())?;
    repo.run_reencryption(state, opts, |_| {})
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_then_reencryption_leaves_every_backup_on_the_new_key_and_retires_the_old() {
    let f = fixture().await;
    let repo = &f.t.repo;
    let old = repo.current_key(KeyPurpose::Database).unwrap();
    assert_eq!(restore_all(&f).await, BTreeSet::from([old.key_id.clone()]));

    // A restore that loaded its manifest before the job reads it after the switch.
    let early = repo.load_manifest(f.backups[0].0.backup_id).await.unwrap();

    let rotation = repo.rotate_key(KeyPurpose::Database).await.unwrap();
    let new = rotation.new.key_id.clone();
    let job = Uuid::now_v7();
    let opts = ReencryptOptions::new(job, at(0));
    let (state, resumed) = repo.begin_reencryption(&opts).await.unwrap();
    assert!(!resumed);
    assert_eq!(state.targets[&KeyPurpose::Database], new);
    assert!(
        f.t.backend
            .head(REENCRYPTION_STATE)
            .await
            .unwrap()
            .is_some()
    );
    let mut steps = Vec::new();
    let report = repo
        .run_reencryption(state, &opts, |s| steps.push(s.clone()))
        .await
        .unwrap();
    assert_eq!(report.job_id, job);
    assert_eq!(report.backups_reencrypted, 3);
    assert_eq!(steps.len(), 3);
    assert_eq!(
        steps.iter().map(|s| s.backups_done).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // Shared chunks are re-sealed once: the later backups add only their own tails.
    assert!(steps[0].chunks_resealed > steps[1].chunks_resealed);
    assert_eq!(
        report.chunks_resealed,
        steps.iter().map(|s| s.chunks_resealed).sum::<u64>()
    );
    assert!(
        f.t.backend
            .head(REENCRYPTION_STATE)
            .await
            .unwrap()
            .is_none()
    );

    // Every backup opens with the new version alone, and the SHA3 recorded at backup time is
    // recognised as the manifest's authenticated predecessor.
    assert_eq!(restore_all(&f).await, BTreeSet::from([new.clone()]));
    for (r, _) in &f.backups {
        let m = repo.load_manifest(r.backup_id).await.unwrap();
        assert_eq!(m.keys, std::slice::from_ref(&new));
        assert_eq!(m.revisions.len(), 1);
        assert_eq!(m.revisions[0].replaced_sha3, r.manifest_sha3);
        assert!(m.streams[0].chunks.iter().all(|c| c.resealed.is_some()));
    }
    // A SHA3 that is neither the manifest's nor a predecessor's is still refused.
    let mut wrong = f.backups[0].0.manifest_sha3;
    wrong.0[0] ^= 1;
    assert!(
        repo.load_manifest_checked(f.backups[0].0.backup_id, Some(wrong))
            .await
            .is_err()
    );
    assert_eq!(
        read_stream(repo, &early, "dump").await.unwrap(),
        f.backups[0].1
    );
    let check = repo.check(Some(100.0)).await.unwrap();
    assert!(check.is_ok(), "{:?}", check.problems);
    assert!(
        check.unreferenced_chunks > 0,
        "the originals wait for prune"
    );

    // A second job finds nothing to do.
    let again = run_job(repo, &ReencryptOptions::new(Uuid::now_v7(), at(1)))
        .await
        .unwrap();
    assert_eq!((again.backups_reencrypted, again.backups_current), (0, 3));

    // The originals are still there: the old version is in use, not retired.
    let retire = RetireOptions {
        now: at(1),
        hold: Duration::zero(),
    };
    let r = repo.retire_keys(&retire).await.unwrap();
    assert!(r.retired.is_empty());
    assert!(r.in_use.iter().any(|(k, _)| k.key_id == old.key_id));

    // Prune marks the originals, then sweeps them after the grace; backups still restore.
    repo.prune(&PruneOptions::new(at(2))).await.unwrap();
    let swept = repo.prune(&PruneOptions::new(at(30))).await.unwrap();
    assert!(swept.swept > 0, "{swept:?}");
    assert!(!swept.sweep_deferred_for_reencryption);
    assert_eq!(restore_all(&f).await, BTreeSet::from([new.clone()]));
    let check = repo.check(Some(100.0)).await.unwrap();
    assert!(check.is_ok(), "{:?}", check.problems);
    assert_eq!(check.unreferenced_chunks, 0);

    // Now nothing is sealed with the old database version: retired. The other purposes were
    // not rotated; their (current) versions are never retired.
    let r = repo
        .retire_keys(&RetireOptions {
            now: at(31),
            hold: Duration::zero(),
        })
        .await
        .unwrap();
    assert_eq!(
        r.retired
            .iter()
            .map(|k| k.key_id.clone())
            .collect::<Vec<_>>(),
        std::slice::from_ref(&old.key_id)
    );
    let states = repo.key_states();
    let old_state = states.iter().find(|k| k.info.key_id == old.key_id).unwrap();
    assert_eq!(old_state.retired_at, Some(at(31)));
    assert!(
        states
            .iter()
            .filter(|k| k.info.key_id != old.key_id)
            .all(|k| k.retired_at.is_none())
    );
    // Retired, not deleted: the key object is still there and still unwraps.
    repo.reload_keys().await.unwrap();
    assert!(
        repo.data_key_by_id(&old.key_id, "test", "operator:test")
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stopped_at_any_point_leaves_every_backup_restorable_and_resumes_to_the_end() {
    for crash in [
        CrashPoint::BeforeSwitch(0),
        CrashPoint::AfterSwitch(0),
        CrashPoint::BeforeSwitch(1),
        CrashPoint::AfterSwitch(2),
    ] {
        let f = fixture().await;
        let repo = &f.t.repo;
        let new = repo
            .rotate_key(KeyPurpose::Database)
            .await
            .unwrap()
            .new
            .key_id;
        let job = Uuid::now_v7();
        let mut opts = ReencryptOptions::new(job, at(0));
        opts.crash_at = Some(crash);
        let e = run_job(repo, &opts).await.unwrap_err();
        assert!(e.contains("simulated crash"), "{crash:?}: {e}");

        // As after a kill -9: every backup restores, the state is there, prune defers its sweep.
        let keys = restore_all(&f).await;
        assert!(!keys.is_empty());
        let check = repo.check(Some(100.0)).await.unwrap();
        assert!(check.is_ok(), "{crash:?}: {:?}", check.problems);
        let st = repo.reencryption_state().await.unwrap().unwrap();
        assert_eq!(st.job_id, job);
        repo.prune(&PruneOptions::new(at(1))).await.unwrap();
        let p = repo.prune(&PruneOptions::new(at(30))).await.unwrap();
        assert!(p.sweep_deferred_for_reencryption, "{crash:?}");
        assert_eq!(p.swept, 0);

        // Resumed under another requested id: the unfinished job goes on under its own.
        let opts = ReencryptOptions::new(Uuid::now_v7(), at(2));
        let (state, resumed) = repo.begin_reencryption(&opts).await.unwrap();
        assert!(resumed);
        assert_eq!(state.job_id, job);
        assert_eq!(state.tag, st.tag);
        let report = repo.run_reencryption(state, &opts, |_| {}).await.unwrap();
        assert_eq!(report.job_id, job);
        assert_eq!(report.backups_total, 3);
        assert_eq!(
            restore_all(&f).await,
            BTreeSet::from([new.clone()]),
            "{crash:?}"
        );

        // Then prune sweeps, and what is left is exactly what the manifests reference.
        repo.prune(&PruneOptions::new(at(40))).await.unwrap();
        let p = repo.prune(&PruneOptions::new(at(70))).await.unwrap();
        assert!(!p.sweep_deferred_for_reencryption);
        assert_eq!(
            restore_all(&f).await,
            BTreeSet::from([new.clone()]),
            "{crash:?}"
        );
        let check = repo.check(Some(100.0)).await.unwrap();
        assert!(check.is_ok(), "{crash:?}: {:?}", check.problems);
        assert_eq!(check.unreferenced_chunks, 0, "{crash:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_across_and_after_a_job_stay_restorable_and_keep_the_old_version_until_resealed() {
    let mut f = fixture().await;
    let old = f.t.repo.current_key(KeyPurpose::Database).unwrap().key_id;
    let new =
        f.t.repo
            .rotate_key(KeyPurpose::Database)
            .await
            .unwrap()
            .new
            .key_id;

    // A backup that started before the job (its index holds the old-key originals) and
    // finishes after it.
    let running = f.t.repo.start_backup(meta(BackupKind::Full)).await.unwrap();
    let mut data = f.backups[0].1.clone();
    data.extend(test_data(100_000, 999));
    running
        .add_stream("dump", std::io::Cursor::new(data.clone()))
        .await
        .unwrap();
    let report = run_job(&f.t.repo, &ReencryptOptions::new(Uuid::now_v7(), at(0)))
        .await
        .unwrap();
    assert_eq!(report.backups_reencrypted, 3);
    let late = running.finish(serde_json::json!({})).await.unwrap();
    f.backups.push((late.clone(), data));
    let m = f.t.repo.load_manifest(late.backup_id).await.unwrap();
    assert!(
        m.keys.contains(&old),
        "it deduplicated against the originals"
    );
    restore_all(&f).await;

    // Its old-key references keep the old version in use, through prune too.
    f.t.repo.prune(&PruneOptions::new(at(1))).await.unwrap();
    f.t.repo.prune(&PruneOptions::new(at(30))).await.unwrap();
    restore_all(&f).await;
    let retire = RetireOptions {
        now: at(31),
        hold: Duration::zero(),
    };
    let r = f.t.repo.retire_keys(&retire).await.unwrap();
    assert!(r.in_use.iter().any(|(k, _)| k.key_id == old), "{r:?}");

    // A backup started after the job deduplicates against the re-sealed copies.
    let again = f.backups[1].1.clone();
    let after = backup(&f.t.repo, &[("dump", &again)]).await;
    assert_eq!(after.new_chunks, 0, "every chunk was found re-sealed");
    let m = f.t.repo.load_manifest(after.backup_id).await.unwrap();
    assert_eq!(m.keys, std::slice::from_ref(&new));
    assert!(m.streams[0].chunks.iter().all(|c| c.resealed.is_some()));
    f.backups.push((after, again));

    // The next job re-seals the late backup; then prune and retirement finish the rotation.
    let report = run_job(&f.t.repo, &ReencryptOptions::new(Uuid::now_v7(), at(32)))
        .await
        .unwrap();
    assert_eq!(report.backups_reencrypted, 1);
    assert_eq!(restore_all(&f).await, BTreeSet::from([new.clone()]));
    f.t.repo.prune(&PruneOptions::new(at(33))).await.unwrap();
    f.t.repo.prune(&PruneOptions::new(at(60))).await.unwrap();
    assert_eq!(restore_all(&f).await, BTreeSet::from([new.clone()]));

    // With an object-lock hold, the first scan that finds it unused only starts the clock.
    let hold = Duration::days(30);
    let r =
        f.t.repo
            .retire_keys(&RetireOptions { now: at(61), hold })
            .await
            .unwrap();
    assert!(r.retired.is_empty());
    assert_eq!(r.waiting.len(), 1);
    assert_eq!(r.waiting[0].1, at(61) + hold);
    let r =
        f.t.repo
            .retire_keys(&RetireOptions {
                now: at(61) + hold,
                hold,
            })
            .await
            .unwrap();
    assert_eq!(
        r.retired
            .iter()
            .map(|k| k.key_id.clone())
            .collect::<Vec<_>>(),
        [old]
    );
    let check = f.t.repo.check(Some(100.0)).await.unwrap();
    assert!(check.is_ok(), "{:?}", check.problems);
}
