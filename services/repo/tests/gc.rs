//! Garbage collection on local repositories: grace, re-check, dry runs, backups running
//! during a prune, locked objects, and faults injected through the backend at random points.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Duration, Utc};
use common::*;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use backstop_events::BackupKind;
use backstop_repo::{
    Backend, KeyPurpose, ObjectMeta, PruneOptions, PruneReport, RepoError, Repository, manifest_key,
};

fn at(hours: i64) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        + Duration::hours(hours)
}

fn opts(now: DateTime<Utc>) -> PruneOptions {
    let mut o = PruneOptions::new(now);
    // Small lists and batches, so that tests cross their boundaries.
    o.list_entries = 7;
    o.delete_batch = 5;
    o.memory_ids = 300;
    o
}

async fn chunk_keys(backend: &dyn Backend) -> BTreeSet<String> {
    backend
        .list("chunks/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

/// Chunk keys referenced by the manifests present.
async fn referenced(repo: &Repository) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for b in repo.list_backups().await.unwrap() {
        let m = b.manifest.unwrap();
        for c in m.streams.iter().flat_map(|s| s.chunks.iter()) {
            out.insert(c.object_key());
        }
    }
    out
}

async fn pending_lists(backend: &dyn Backend) -> Vec<ObjectMeta> {
    backend.list("gc/pending-").await.unwrap()
}

/// The repository is consistent: every referenced object is present and intact.
async fn assert_consistent(repo: &Repository, read_data: bool) {
    let report = repo
        .check(if read_data { Some(100.0) } else { None })
        .await
        .unwrap();
    assert!(
        report.is_ok(),
        "check found problems: {:#?}",
        report.problems
    );
}

async fn restores(repo: &Repository, id: uuid::Uuid, name: &str, data: &[u8]) {
    let m = repo.load_manifest(id).await.unwrap();
    assert_eq!(read_stream(repo, &m, name).await.unwrap(), data);
}

/// Everything but the timings and the dry-run flag.
fn decisions(r: &PruneReport) -> PruneReport {
    let mut r = r.clone();
    r.dry_run = false;
    r.mark_ms = 0;
    r.sweep_ms = 0;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_is_honoured_with_an_injected_now() {
    let t = TestRepo::new(small_chunks()).await;
    let (da, db) = (test_data(1 << 20, 1), test_data(1 << 20, 2));
    let a = backup(&t.repo, &[("a.dat", &da)]).await;
    let b = backup(&t.repo, &[("b.dat", &db)]).await;
    let all = chunk_keys(&*t.backend).await;
    assert!(t.repo.forget_backup(a.backup_id).await.unwrap());
    assert!(!t.repo.forget_backup(a.backup_id).await.unwrap());
    let kept = referenced(&t.repo).await;
    let garbage: BTreeSet<String> = all.difference(&kept).cloned().collect();
    assert!(
        garbage.len() >= 4,
        "backup A had chunks of its own: {} of {}",
        garbage.len(),
        all.len()
    );

    let r = t.repo.prune(&opts(at(0))).await.unwrap();
    assert_eq!(r.manifests, 1);
    assert_eq!(r.objects_listed, all.len() as u64);
    assert_eq!(r.referenced, kept.len() as u64);
    assert_eq!(r.newly_marked, garbage.len() as u64);
    assert_eq!(r.lists_written, garbage.len().div_ceil(7) as u64);
    assert_eq!(r.swept, 0, "nothing is deleted when marking");
    assert_eq!(chunk_keys(&*t.backend).await, all);

    // One second short of the grace: nothing is due, nothing is marked twice.
    let r = t
        .repo
        .prune(&opts(at(24) - Duration::seconds(1)))
        .await
        .unwrap();
    assert_eq!((r.swept, r.newly_marked), (0, 0));
    assert_eq!(r.already_marked, garbage.len() as u64);
    assert_eq!(r.waiting, garbage.len() as u64);
    assert_eq!(chunk_keys(&*t.backend).await, all);

    // At exactly the grace, the marked chunks go, and only they.
    let r = t.repo.prune(&opts(at(24))).await.unwrap();
    assert_eq!(r.swept, garbage.len() as u64);
    assert_eq!(r.spared, 0);
    assert!(r.bytes_reclaimed > 0);
    assert_eq!(r.lists_removed, r.lists_due);
    assert_eq!(chunk_keys(&*t.backend).await, kept);
    assert!(pending_lists(&*t.backend).await.is_empty());
    let after = t.repo.check(Some(100.0)).await.unwrap();
    assert!(after.is_ok(), "{:?}", after.problems);
    assert_eq!(after.unreferenced_chunks, 0);
    restores(&t.repo, b.backup_id, "b.dat", &db).await;

    // A longer grace set by the operator applies to lists already written.
    let c = backup(&t.repo, &[("c.dat", &test_data(1 << 20, 3))]).await;
    t.repo.forget_backup(c.backup_id).await.unwrap();
    let mut o = opts(at(48));
    o.grace = Duration::hours(72);
    let marked = t.repo.prune(&o).await.unwrap().newly_marked;
    assert!(marked > 0);
    o.now = at(48 + 71);
    assert_eq!(t.repo.prune(&o).await.unwrap().swept, 0);
    o.now = at(48 + 72);
    assert_eq!(t.repo.prune(&o).await.unwrap().swept, marked);
    o.grace = Duration::seconds(-1);
    assert!(matches!(t.repo.prune(&o).await, Err(RepoError::Config(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_and_real_run_agree_and_a_dry_run_changes_nothing() {
    let t = TestRepo::new(small_chunks()).await;
    let data: Vec<Vec<u8>> = (0..4).map(|i| test_data(600_000, 10 + i)).collect();
    let mut ids = Vec::new();
    for d in &data {
        ids.push(backup(&t.repo, &[("x.dat", d)]).await.backup_id);
    }
    let wal = "wal/main/000000010000000000000001";
    t.repo
        .put_blob(wal, KeyPurpose::Wal, Bytes::from_static(b"segment"))
        .await
        .unwrap();
    t.repo.forget_backup(ids[0]).await.unwrap();
    let mut o = opts(at(0));
    o.extra_candidates = vec![wal.to_string()];
    t.repo.prune(&o).await.unwrap();
    // New garbage after the first mark, and a reuse of part of the old garbage.
    t.repo.forget_backup(ids[1]).await.unwrap();
    backup(&t.repo, &[("again.dat", &data[0][..300_000])]).await;

    o.now = at(30);
    o.dry_run = true;
    let before = snapshot(&t.root());
    let dry = t.repo.prune(&o).await.unwrap();
    assert_eq!(
        snapshot(&t.root()),
        before,
        "a dry run writes and deletes nothing"
    );
    assert!(dry.dry_run);
    assert!(
        dry.swept > 0 && dry.spared > 0 && dry.newly_marked > 0,
        "{dry:#?}"
    );

    o.dry_run = false;
    let real = t.repo.prune(&o).await.unwrap();
    assert_eq!(decisions(&dry), decisions(&real));
    assert_eq!(
        t.backend.head(wal).await.unwrap(),
        None,
        "the WAL segment went too"
    );
    assert_consistent(&t.repo, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extra_key_the_caller_no_longer_names_is_spared() {
    let t = TestRepo::new(small_chunks()).await;
    let wal = "wal/main/000000010000000000000002";
    t.repo
        .put_blob(wal, KeyPurpose::Wal, Bytes::from_static(b"segment"))
        .await
        .unwrap();
    let mut o = opts(at(0));
    o.extra_candidates = vec![wal.to_string()];
    assert_eq!(t.repo.prune(&o).await.unwrap().newly_marked, 1);
    // Retention changed its mind (a restore point now needs the segment).
    o.extra_candidates.clear();
    o.now = at(25);
    let r = t.repo.prune(&o).await.unwrap();
    assert_eq!((r.swept, r.spared, r.lists_removed), (0, 1, 1));
    assert!(t.backend.head(wal).await.unwrap().is_some());
    for bad in ["config", "manifests/x", "keys/database/x", "gc/pending-x"] {
        o.extra_candidates = vec![bad.into()];
        assert!(
            matches!(t.repo.prune(&o).await, Err(RepoError::Usage(_))),
            "{bad} accepted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_reuses_marked_chunks_keeps_them() {
    let t = TestRepo::new(small_chunks()).await;
    let (da, db) = (test_data(1 << 20, 21), test_data(1 << 20, 22));
    let a = backup(&t.repo, &[("a.dat", &da)]).await;
    backup(&t.repo, &[("b.dat", &db)]).await;
    t.repo.forget_backup(a.backup_id).await.unwrap();
    let kept_before = referenced(&t.repo).await;

    // Backup C starts (lists the chunks) before the mark and stores A's data after it.
    let w = t.repo.start_backup(meta(BackupKind::Full)).await.unwrap();
    let marked = t.repo.prune(&opts(at(0))).await.unwrap().newly_marked;
    assert!(marked > 0);
    w.add_stream("c.dat", std::io::Cursor::new(da.clone()))
        .await
        .unwrap();
    let c = w.finish(serde_json::json!({})).await.unwrap();
    assert_eq!(c.new_chunks, 0, "C reused every marked chunk");

    let r = t.repo.prune(&opts(at(25))).await.unwrap();
    assert_eq!(r.spared, marked);
    assert_eq!(r.swept, 0);
    assert!(pending_lists(&*t.backend).await.is_empty());
    assert_consistent(&t.repo, true).await;
    restores(&t.repo, c.backup_id, "c.dat", &da).await;
    let now_kept = referenced(&t.repo).await;
    assert!(now_kept.is_superset(&kept_before));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prune_running_while_a_backup_reuses_marked_chunks_loses_nothing() {
    let t = TestRepo::new(small_chunks()).await;
    let mut kept: Vec<(uuid::Uuid, Vec<u8>)> = Vec::new();
    let first = test_data(1 << 20, 30);
    let a = backup(&t.repo, &[("x.dat", &first)]).await;
    let mut old = first;
    let mut old_id = a.backup_id;
    let mut deferred = 0;
    for round in 0..6i64 {
        // Forget the previous backup and mark its chunks.
        t.repo.forget_backup(old_id).await.unwrap();
        t.repo.prune(&opts(at(round * 100))).await.unwrap();
        // A new backup reuses half of the marked data while prunes past the grace run.
        let mut data = old[..old.len() / 2].to_vec();
        data.extend(test_data(500_000, 100 + round as u64));
        let m = meta(BackupKind::Full);
        let id = m.backup_id;
        let repo = t.repo.clone();
        // The backup reads its source as the test feeds it, so prunes run between its chunks.
        let (mut feed, source) = tokio::io::duplex(64 << 10);
        let running = tokio::spawn(async move {
            let w = repo.start_backup(m).await.unwrap();
            w.add_stream("x.dat", source).await.unwrap();
            w.finish(serde_json::json!({})).await.unwrap()
        });
        for piece in data.chunks(150_000) {
            feed.write_all(piece).await.unwrap();
            let mut o = opts(at(round * 100 + 30));
            o.backups_in_progress = vec![id];
            let r = t.repo.prune(&o).await.unwrap();
            // No manifest before the source ends: the sweep waits, and deletes nothing.
            assert_eq!(r.sweep_deferred_for, vec![id]);
            assert_eq!((r.swept, r.lists_removed), (0, 0));
            deferred += 1;
        }
        drop(feed);
        let result = running.await.unwrap();
        assert!(
            result.new_chunks < result.chunks,
            "the backup reused marked chunks"
        );
        // The backup is over: the sweep runs, and spares what it reused.
        let mut o = opts(at(round * 100 + 31));
        o.backups_in_progress = vec![id];
        let r = t.repo.prune(&o).await.unwrap();
        assert!(r.sweep_deferred_for.is_empty());
        assert_consistent(&t.repo, false).await;
        restores(&t.repo, id, "x.dat", &data).await;
        for (k, d) in &kept {
            restores(&t.repo, *k, "x.dat", d).await;
        }
        if round % 2 == 0 {
            kept.push((id, data.clone()));
            // Keep this one; the next round forgets a fresh copy instead.
            let again = backup(&t.repo, &[("x.dat", &data)]).await;
            old_id = again.backup_id;
        } else {
            old_id = id;
        }
        old = data;
    }
    assert!(deferred >= 6 * 4, "prunes overlapped every backup");
    // Past every grace: only referenced chunks are left, and all of them are intact.
    t.repo.prune(&opts(at(10_000))).await.unwrap();
    t.repo.prune(&opts(at(10_100))).await.unwrap();
    let report = t.repo.check(Some(100.0)).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.unreferenced_chunks, 0);
    for (k, d) in &kept {
        restores(&t.repo, *k, "x.dat", d).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_manifest_stops_the_prune_before_any_delete() {
    let t = TestRepo::new(small_chunks()).await;
    let a = backup(&t.repo, &[("a.dat", &test_data(500_000, 40))]).await;
    let b = backup(&t.repo, &[("b.dat", &test_data(500_000, 41))]).await;
    t.repo.forget_backup(a.backup_id).await.unwrap();
    t.repo.prune(&opts(at(0))).await.unwrap();
    let before = chunk_keys(&*t.backend).await;
    let path = t.root().join(manifest_key(&b.backup_id));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = t.repo.prune(&opts(at(30))).await.unwrap_err();
    assert!(err.is_integrity(), "{err}");
    assert_eq!(chunk_keys(&*t.backend).await, before);
}

/// A backend that refuses to delete some keys, as S3 object lock does.
struct Locking {
    inner: Arc<dyn Backend>,
    locked: std::sync::Mutex<BTreeSet<String>>,
}

#[async_trait]
impl Backend for Locking {
    async fn put(&self, key: &str, data: Bytes) -> backstop_repo::Result<()> {
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> backstop_repo::Result<Bytes> {
        self.inner.get(key).await
    }
    async fn head(&self, key: &str) -> backstop_repo::Result<Option<u64>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> backstop_repo::Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> backstop_repo::Result<()> {
        if self.locked.lock().unwrap().contains(key) {
            return Err(RepoError::Locked {
                key: key.into(),
                location: self.describe(),
                detail: "retain until 2026-04-01".into(),
            });
        }
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_objects_stay_listed_and_are_retried() {
    let t = TestRepo::new(small_chunks()).await;
    let a = backup(&t.repo, &[("a.dat", &test_data(1 << 20, 50))]).await;
    t.repo.forget_backup(a.backup_id).await.unwrap();
    let garbage = chunk_keys(&*t.backend).await;
    let locking = Arc::new(Locking {
        inner: t.backend.clone(),
        locked: std::sync::Mutex::new(garbage.iter().step_by(3).cloned().collect()),
    });
    let n_locked = locking.locked.lock().unwrap().len() as u64;
    let repo = Repository::open(locking.clone(), &t.master, t.log.clone())
        .await
        .unwrap();
    let mut o = opts(at(0));
    o.list_entries = 1000;
    repo.prune(&o).await.unwrap();
    o.now = at(25);
    let r = repo.prune(&o).await.unwrap();
    assert_eq!(r.locked, n_locked);
    assert_eq!(r.swept, garbage.len() as u64 - n_locked);
    assert_eq!(r.failed, 0);
    assert_eq!(r.lists_removed, 0, "the list keeps the locked entries");
    assert_eq!(chunk_keys(&*t.backend).await.len() as u64, n_locked);
    // Still listed: not marked again.
    o.now = at(26);
    locking.locked.lock().unwrap().clear();
    let r = repo.prune(&o).await.unwrap();
    assert_eq!((r.newly_marked, r.swept, r.lists_removed), (0, n_locked, 1));
    assert!(chunk_keys(&*t.backend).await.is_empty());
    assert!(pending_lists(&*t.backend).await.is_empty());
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Every write or delete after the budget fails (the store became unreachable).
    Fail,
    /// Every write or delete after the budget never returns; the test then drops the whole
    /// operation, as `kill -9` would.
    Kill,
}

/// Wraps a backend and injects a fault after `budget` writes and deletes.
struct Faulty {
    inner: Arc<dyn Backend>,
    budget: AtomicI64,
    fault: Fault,
    tripped: AtomicBool,
    notify: Notify,
}

impl Faulty {
    fn new(inner: Arc<dyn Backend>, budget: i64, fault: Fault) -> Self {
        Faulty {
            inner,
            budget: AtomicI64::new(budget),
            fault,
            tripped: AtomicBool::new(false),
            notify: Notify::new(),
        }
    }

    fn allow(&self) -> bool {
        if self.budget.fetch_sub(1, Ordering::SeqCst) > 0 {
            return true;
        }
        if !self.tripped.swap(true, Ordering::SeqCst) {
            self.notify.notify_one();
        }
        false
    }

    async fn refuse<T>(&self, key: &str) -> backstop_repo::Result<T> {
        match self.fault {
            Fault::Fail => Err(RepoError::Unreachable {
                what: format!("write {key}"),
                detail: "injected fault".into(),
                check: "nothing: this is a test".into(),
            }),
            Fault::Kill => futures::future::pending().await,
        }
    }
}

#[async_trait]
impl Backend for Faulty {
    async fn put(&self, key: &str, data: Bytes) -> backstop_repo::Result<()> {
        if !self.allow() {
            return self.refuse(key).await;
        }
        self.inner.put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> backstop_repo::Result<bool> {
        if !self.allow() {
            return self.refuse(key).await;
        }
        self.inner.put_if_absent(key, data).await
    }
    async fn get(&self, key: &str) -> backstop_repo::Result<Bytes> {
        self.inner.get(key).await
    }
    async fn head(&self, key: &str) -> backstop_repo::Result<Option<u64>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> backstop_repo::Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> backstop_repo::Result<()> {
        if !self.allow() {
            return self.refuse(key).await;
        }
        self.inner.delete(key).await
    }
    async fn delete_many(&self, keys: &[String]) -> Vec<backstop_repo::Result<()>> {
        // Part of a batch may go through before the fault, as with a real crash.
        let allowed = keys.iter().take_while(|_| self.allow()).count();
        let mut out = self.inner.delete_many(&keys[..allowed]).await;
        if allowed < keys.len() {
            match self.fault {
                Fault::Kill => futures::future::pending::<()>().await,
                Fault::Fail => {
                    for k in &keys[allowed..] {
                        out.push(self.refuse(k).await);
                    }
                }
            }
        }
        out
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Runs `op` to its end when the store fails (it sees the errors); with a kill, until the
/// fault trips, then drops it mid-flight. `None` when killed.
async fn until_fault<T>(faulty: &Faulty, op: impl std::future::Future<Output = T>) -> Option<T> {
    match faulty.fault {
        Fault::Fail => Some(op.await),
        Fault::Kill => tokio::select! {
            r = op => Some(r),
            _ = faulty.notify.notified() => None,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_at_random_points_never_remove_a_referenced_object() {
    let seed: u64 = std::env::var("GC_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    eprintln!("fault injection seed {seed} (rerun with GC_FAULT_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t = TestRepo::new(small_chunks()).await;
    let mut live: Vec<(uuid::Uuid, Vec<u8>)> = Vec::new();
    let mut hour = 0i64;
    let mut faults = 0;
    for i in 0..40u64 {
        // New data (partly shared with what exists), and now and then a forgotten backup.
        let mut data = test_data(200_000 + rng.gen_range(0..300_000), 1000 + i);
        if let Some((_, d)) = live.last() {
            data.extend_from_slice(&d[..d.len() / 3]);
        }
        let r = backup(&t.repo, &[("x.dat", &data)]).await;
        live.push((r.backup_id, data));
        if live.len() > 3 || rng.gen_bool(0.3) {
            let (gone, _) = live.remove(rng.gen_range(0..live.len()));
            t.repo.forget_backup(gone).await.unwrap();
        }
        // Sometimes a backup is killed part-way: it leaves chunks and no manifest.
        if rng.gen_bool(0.2) {
            let faulty = Arc::new(Faulty::new(
                t.backend.clone(),
                rng.gen_range(1..6),
                Fault::Kill,
            ));
            let repo = Repository::open(faulty.clone(), &t.master, t.log.clone())
                .await
                .unwrap();
            let orphan = test_data(400_000, 5000 + i);
            until_fault(&faulty, async {
                let w = repo.start_backup(meta(BackupKind::Full)).await?;
                w.add_stream("x.dat", std::io::Cursor::new(orphan)).await?;
                w.finish(serde_json::json!({})).await
            })
            .await;
        }

        hour += rng.gen_range(1..30);
        let fault = if rng.gen_bool(0.5) {
            Fault::Fail
        } else {
            Fault::Kill
        };
        // A dry run says how many writes and deletes the real run will make: the fault falls
        // at a random one of them.
        let mut o = opts(at(hour));
        o.dry_run = true;
        let plan = t.repo.prune(&o).await.unwrap();
        o.dry_run = false;
        let writes = plan.lists_written + plan.swept + plan.lists_removed;
        let budget = rng.gen_range(0..writes.max(1)) as i64;
        let faulty = Arc::new(Faulty::new(t.backend.clone(), budget, fault));
        let repo = Repository::open(faulty.clone(), &t.master, t.log.clone())
            .await
            .unwrap();
        match until_fault(&faulty, repo.prune(&o)).await {
            // A failed delete is counted and kept for later, not an error.
            Some(Ok(r)) => assert!(r.failed == 0 || faulty.tripped.load(Ordering::SeqCst)),
            Some(Err(e)) => assert!(
                e.is_transient(),
                "only the injected fault fails a prune: {e}"
            ),
            None => {}
        }
        if faulty.tripped.load(Ordering::SeqCst) {
            faults += 1;
        }
        // Whatever happened, every kept backup is whole.
        assert_consistent(&t.repo, false).await;
    }
    assert!(faults > 20, "most of the 40 runs hit a fault ({faults})");

    // Clean runs past every grace finish the job.
    t.repo.prune(&opts(at(hour + 1))).await.unwrap();
    let r = t.repo.prune(&opts(at(hour + 100))).await.unwrap();
    assert_eq!(r.failed, 0);
    assert_eq!(chunk_keys(&*t.backend).await, referenced(&t.repo).await);
    assert!(pending_lists(&*t.backend).await.is_empty());
    let report = t.repo.check(Some(100.0)).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    for (id, d) in &live {
        restores(&t.repo, *id, "x.dat", d).await;
    }
}
