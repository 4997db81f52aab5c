//! S3 object lock (compliance mode) against moto's S3 server (backstop-testkit's `Moto`), since
//! Garage has no object lock. Retention dates are read independently of the backend, with the
//! SDK's HeadObject (moto does not implement GetObjectRetention: it answers with the object; the
//! date HeadObject carries is the same one).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ObjectLockMode;
use backstop_repo::{
    Backend, Hash32, KeyAccessLog, LocalBackend, Location, LockTargets, MasterKey, PruneOptions,
    RepoError, Repository, S3Backend, S3Settings,
};
use backstop_testkit::Moto;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use common::*;

const DAY: Duration = Duration::from_secs(86_400);

fn settings(m: &Moto, bucket: &str, prefix: &str, lock: Option<Duration>) -> S3Settings {
    S3Settings {
        endpoint: Some(m.endpoint()),
        region: Some(m.region().to_string()),
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        access_key: Some(m.access_key().to_string()),
        secret_key: Some(m.secret_key().to_string()),
        max_attempts: 2,
        base_backoff: Duration::from_millis(10),
        object_lock: lock,
        ..Default::default()
    }
}

/// A plain SDK client, to look at the bucket without going through the backend under test.
fn raw_client(m: &Moto) -> Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(m.region().to_string()))
        .endpoint_url(m.endpoint())
        .credentials_provider(Credentials::new(
            m.access_key(),
            m.secret_key(),
            None,
            None,
            "test",
        ))
        .force_path_style(true)
        .build();
    Client::from_conf(conf)
}

/// The lock mode and retain-until date of the current version of `key`.
async fn lock_of(
    c: &Client,
    bucket: &str,
    key: &str,
) -> (Option<ObjectLockMode>, Option<DateTime<Utc>>) {
    let h = c
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("head {key}: {e:?}"));
    let until = h
        .object_lock_retain_until_date()
        .map(|d| DateTime::<Utc>::from_timestamp(d.secs(), d.subsec_nanos()).unwrap());
    (h.object_lock_mode().cloned(), until)
}

/// (object versions, delete markers) of exactly `key`.
async fn versions_of(c: &Client, bucket: &str, key: &str) -> (usize, usize) {
    let out = c
        .list_object_versions()
        .bucket(bucket)
        .prefix(key)
        .send()
        .await
        .unwrap();
    let v = out
        .versions()
        .iter()
        .filter(|v| v.key() == Some(key))
        .count();
    let d = out
        .delete_markers()
        .iter()
        .filter(|d| d.key() == Some(key))
        .count();
    (v, d)
}

fn assert_near(actual: DateTime<Utc>, lo: DateTime<Utc>, hi: DateTime<Utc>, what: &str) {
    // Dates are whole seconds, rounded up.
    let lo = lo - chrono::Duration::seconds(1);
    let hi = hi + chrono::Duration::seconds(1);
    assert!(
        lo <= actual && actual <= hi,
        "{what}: retained until {actual}, expected between {lo} and {hi}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_repository_on_moto() {
    let moto = Moto::start().expect("start moto");
    moto.create_bucket("locked", true).unwrap();
    let raw = raw_client(&moto);
    let bucket = "locked";

    // A repository with object_lock = 1 day: every object it writes is locked.
    let loc = Location::parse("s3://locked/repo").unwrap();
    let t0 = Utc::now();
    let backend = loc
        .open(Some(settings(&moto, "ignored", "ignored", Some(DAY))))
        .await
        .unwrap();
    assert_eq!(backend.object_lock(), Some(DAY));
    let master = MasterKey::generate();
    let log = Arc::new(KeyAccessLog::new());
    let repo = Repository::init(backend.clone(), &master, small_chunks(), log.clone())
        .await
        .unwrap();
    let dump = test_data(2 << 20, 71);
    let other = test_data(600 << 10, 72);
    let first = backup(&repo, &[("dump", &dump), ("other", &other)]).await;
    let t1 = Utc::now();
    let day = chrono::Duration::days(1);

    let m1 = repo.load_manifest(first.backup_id).await.unwrap();
    let chunk_keys: BTreeSet<String> = m1
        .distinct_chunks()
        .iter()
        .map(|c| c.object_key())
        .collect();
    let key_objects: Vec<String> = backend
        .list("keys/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(!key_objects.is_empty());
    let mut written = vec!["config".to_string(), first.manifest_key.clone()];
    written.extend(key_objects.iter().cloned());
    written.extend(chunk_keys.iter().cloned());
    for key in &written {
        let (mode, until) = lock_of(&raw, bucket, &format!("repo/{key}")).await;
        assert_eq!(mode, Some(ObjectLockMode::Compliance), "{key}");
        assert_near(until.expect("a retain-until date"), t0 + day, t1 + day, key);
    }

    // Large objects go up in parts, locked (and checksummed) just the same.
    let small_parts = S3Settings {
        multipart_threshold: 6 << 20,
        part_size: 5 << 20,
        ..settings(&moto, bucket, "repo", Some(DAY))
    };
    let parts_backend = S3Backend::connect(small_parts).await.unwrap();
    let big = Bytes::from(test_data(11 << 20, 73));
    parts_backend.put("blobs/big", big.clone()).await.unwrap();
    assert_eq!(parts_backend.get("blobs/big").await.unwrap(), big);
    let (mode, until) = lock_of(&raw, bucket, "repo/blobs/big").await;
    assert_eq!(mode, Some(ObjectLockMode::Compliance), "multipart upload");
    assert!(until.unwrap() > t0 + day - chrono::Duration::seconds(1));

    // Garbage collection's own lists are bookkeeping, written unlocked.
    backend
        .put("gc/probe", Bytes::from_static(b"list"))
        .await
        .unwrap();
    assert_eq!(lock_of(&raw, bucket, "repo/gc/probe").await, (None, None));
    backend.delete("gc/probe").await.unwrap();
    assert_eq!(versions_of(&raw, bucket, "repo/gc/probe").await, (0, 0));

    // A locked object cannot be deleted before its date: Locked, and it is still readable
    // (no delete marker hides it).
    let chunk = chunk_keys.iter().next().unwrap().clone();
    let before = backend.get(&chunk).await.unwrap();
    let err = backend.delete(&chunk).await.unwrap_err();
    assert!(matches!(err, RepoError::Locked { .. }), "{err}");
    assert!(!err.is_transient());
    assert_eq!(err.object_key(), Some(chunk.as_str()));
    assert!(err.to_string().contains("compliance"), "{err}");
    assert_eq!(backend.get(&chunk).await.unwrap(), before);
    assert_eq!(
        versions_of(&raw, bucket, &format!("repo/{chunk}")).await,
        (1, 0)
    );
    let err = backend
        .delete_many(std::slice::from_ref(&chunk))
        .await
        .remove(0)
        .unwrap_err();
    assert!(matches!(err, RepoError::Locked { .. }), "{err}");
    // Forgetting a backup inside its lock period is refused the same way.
    let err = repo.forget_backup(first.backup_id).await.unwrap_err();
    assert!(matches!(err, RepoError::Locked { .. }), "{err}");
    assert!(repo.load_manifest(first.backup_id).await.is_ok());

    // A prune marks an unreferenced chunk (left by a killed backup), then counts it as locked
    // instead of failing, and keeps it listed for a later run.
    let orphan_id = Hash32([0xab; 32]);
    let orphan = orphan_id.chunk_key();
    backend
        .put(&orphan, Bytes::from_static(b"left by a killed backup"))
        .await
        .unwrap();
    let (_, orphan_until) = lock_of(&raw, bucket, &format!("repo/{orphan}")).await;
    let mut opts = PruneOptions::new(Utc::now());
    opts.grace = chrono::Duration::zero();
    let marked = repo.prune(&opts).await.unwrap();
    assert_eq!(marked.newly_marked, 1, "{marked:?}");
    opts.now = Utc::now() + chrono::Duration::seconds(1);
    let swept = repo.prune(&opts).await.unwrap();
    assert_eq!(
        (swept.locked, swept.swept, swept.failed),
        (1, 0, 0),
        "{swept:?}"
    );
    assert!(backend.head(&orphan).await.unwrap().is_some());
    assert_eq!(
        backend.list("gc/").await.unwrap().len(),
        1,
        "the list is kept"
    );

    // A second backup, not in the kept set below.
    let third = test_data(300 << 10, 74);
    let second = backup(&repo, &[("third", &third)]).await;
    let (_, second_until) = lock_of(&raw, bucket, &format!("repo/{}", second.manifest_key)).await;

    // extend_locks moves the dates of what the kept backup needs to now + 2 days, and leaves
    // the unreferenced chunk and the backup not kept alone.
    let now = Utc::now();
    let two_days = chrono::Duration::days(2);
    let targets = LockTargets::backups([first.backup_id]).with_extra(["blobs/big".to_string()]);
    let report = repo.extend_locks(now, two_days, &targets).await.unwrap();
    let expected_objects = (chunk_keys.len() + 1 + key_objects.len() + 1 + 1) as u64;
    assert_eq!(report.objects, expected_objects, "{report:?}");
    assert_eq!(report.extended, expected_objects, "{report:?}");
    assert_eq!(
        (report.already_locked, report.missing, report.failed),
        (0, 0, 0)
    );
    assert!(report.is_complete());
    assert_eq!(report.manifests, 1);
    for key in written.iter().chain(["blobs/big".to_string()].iter()) {
        let (mode, until) = lock_of(&raw, bucket, &format!("repo/{key}")).await;
        assert_eq!(mode, Some(ObjectLockMode::Compliance), "{key}");
        assert_near(until.unwrap(), now + two_days, now + two_days, key);
    }
    assert_eq!(
        lock_of(&raw, bucket, &format!("repo/{orphan}")).await.1,
        orphan_until,
        "an unreferenced chunk keeps its date"
    );
    assert_eq!(
        lock_of(&raw, bucket, &format!("repo/{}", second.manifest_key))
            .await
            .1,
        second_until,
        "the manifest of a backup not kept keeps its date"
    );

    // Again at the same time: everything is already locked long enough; nothing changes.
    let again = repo.extend_locks(now, two_days, &targets).await.unwrap();
    assert_eq!(again.already_locked, expected_objects, "{again:?}");
    assert_eq!(again.extended, 0);
    // A shorter period never shortens a lock.
    let shorter = repo.extend_locks(now, day, &targets).await.unwrap();
    assert_eq!(shorter.already_locked, expected_objects, "{shorter:?}");
    let (_, until) = lock_of(&raw, bucket, &format!("repo/{chunk}")).await;
    assert_near(
        until.unwrap(),
        now + two_days,
        now + two_days,
        "after a shorter period",
    );
    // A kept backup or an extra object that does not exist is reported, not skipped silently.
    let gone = LockTargets::backups([uuid::Uuid::now_v7()]).with_extra(["wal/none".into()]);
    let report = repo.extend_locks(now, two_days, &gone).await.unwrap();
    assert_eq!(report.missing, 2, "{report:?}");
    assert!(!report.is_complete());

    // The repository restores from the bucket alone with the master key: a fresh backend and
    // a fresh handle, every stream of every backup read back, and a full data check.
    let fresh = Location::parse("s3://locked/repo")
        .unwrap()
        .open(Some(settings(&moto, "x", "x", None)))
        .await
        .unwrap();
    let reopened = Repository::open(fresh, &master, Arc::new(KeyAccessLog::new()))
        .await
        .unwrap();
    let listed = reopened.list_backups().await.unwrap();
    assert_eq!(listed.len(), 2);
    let expected: [(&str, &[u8]); 3] = [("dump", &dump), ("other", &other), ("third", &third)];
    let mut streams_read = 0;
    for b in &listed {
        let m = b.manifest.as_ref().unwrap();
        for name in m.stream_names() {
            let data = read_stream(&reopened, m, name).await.unwrap();
            let want = expected.iter().find(|(n, _)| *n == name).unwrap().1;
            assert_eq!(data, want, "stream {name} of {}", b.backup_id);
            streams_read += 1;
        }
    }
    assert_eq!(streams_read, 3);
    let check = reopened.check(Some(100.0)).await.unwrap();
    assert!(check.is_ok(), "{:?}", check.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_remove_every_version_when_nothing_is_locked() {
    let moto = Moto::start().expect("start moto");
    moto.create_bucket("versions", true).unwrap();
    let raw = raw_client(&moto);
    // Two versions written without a lock (as before object lock was configured).
    for body in ["one", "two"] {
        raw.put_object()
            .bucket("versions")
            .key("p/wal/a")
            .body(ByteStream::from_static(body.as_bytes()))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(versions_of(&raw, "versions", "p/wal/a").await, (2, 0));
    let b = S3Backend::connect(settings(&moto, "versions", "p", Some(DAY)))
        .await
        .unwrap();
    b.check_object_lock().await.unwrap();
    assert_eq!(b.get("wal/a").await.unwrap(), Bytes::from_static(b"two"));
    b.delete("wal/a").await.unwrap();
    assert_eq!(
        versions_of(&raw, "versions", "p/wal/a").await,
        (0, 0),
        "a real deletion: no version and no delete marker left"
    );
    assert_eq!(b.head("wal/a").await.unwrap(), None);
    b.delete("wal/a").await.unwrap();

    // extend_lock locks an object that had no retention, and says what it found.
    raw.put_object()
        .bucket("versions")
        .key("p/wal/b")
        .body(ByteStream::from_static(b"b"))
        .send()
        .await
        .unwrap();
    let until = Utc::now() + chrono::Duration::days(3);
    assert_eq!(
        b.extend_lock("wal/b", until).await.unwrap(),
        backstop_repo::LockExtension::Extended { previous: None }
    );
    assert!(matches!(
        b.extend_lock("wal/b", until).await.unwrap(),
        backstop_repo::LockExtension::AlreadyUntil(_)
    ));
    assert!(matches!(
        b.delete("wal/b").await.unwrap_err(),
        RepoError::Locked { .. }
    ));
    assert!(matches!(
        b.extend_lock("wal/none", until).await.unwrap_err(),
        RepoError::NotFound { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_lock_where_there_is_none_is_a_clear_error() {
    let moto = Moto::start().expect("start moto");
    moto.create_bucket("plain", false).unwrap();

    // A bucket created without object lock.
    let err = Location::parse("s3://plain/repo")
        .unwrap()
        .open(Some(settings(&moto, "x", "x", Some(DAY))))
        .await
        .err()
        .expect("a bucket without object lock is refused");
    assert!(
        matches!(err, RepoError::ObjectLockUnavailable { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("created without object lock"), "{msg}");
    assert!(msg.contains("remove `object_lock`"), "{msg}");
    assert!(msg.contains("object-lock-enabled-for-bucket"), "{msg}");

    // A local directory.
    let dir = tempfile::tempdir().unwrap();
    let err = Location::parse(dir.path().to_str().unwrap())
        .unwrap()
        .open(Some(S3Settings {
            object_lock: Some(DAY),
            ..Default::default()
        }))
        .await
        .err()
        .expect("a local directory with object_lock is refused");
    assert!(
        matches!(err, RepoError::ObjectLockUnavailable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("local directory"), "{err}");

    // A period shorter than the daily extension.
    let err = S3Backend::connect(settings(
        &moto,
        "plain",
        "",
        Some(Duration::from_secs(3600)),
    ))
    .await
    .err()
    .expect("a one-hour lock is refused");
    assert!(matches!(err, RepoError::Config(_)), "{err}");
    assert!(err.to_string().contains("at least 1d") || err.to_string().contains("between 1d"));

    // Without object lock nothing changes: the plain bucket works, and extend_locks says why
    // it cannot run.
    let backend = Location::parse("s3://plain/repo")
        .unwrap()
        .open(Some(settings(&moto, "x", "x", None)))
        .await
        .unwrap();
    assert_eq!(backend.object_lock(), None);
    let master = MasterKey::generate();
    let repo = Repository::init(
        backend,
        &master,
        small_chunks(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .unwrap();
    let err = repo
        .extend_locks(
            Utc::now(),
            chrono::Duration::days(1),
            &LockTargets::all_backups(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, RepoError::ObjectLockUnavailable { .. }),
        "{err}"
    );
    let local: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("r")).unwrap());
    assert!(matches!(
        local.extend_lock("config", Utc::now()).await.unwrap_err(),
        RepoError::ObjectLockUnavailable { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_says_object_lock_is_unavailable() {
    let garage = backstop_testkit::Garage::start().expect("start Garage");
    let s = S3Settings {
        endpoint: Some(garage.endpoint()),
        region: Some(garage.region().to_string()),
        access_key: Some(garage.access_key().to_string()),
        secret_key: Some(garage.secret_key().to_string()),
        max_attempts: 2,
        base_backoff: Duration::from_millis(10),
        object_lock: Some(DAY),
        ..Default::default()
    };
    let err = Location::parse(&format!("s3://{}/repo", garage.bucket()))
        .unwrap()
        .open(Some(s))
        .await
        .err()
        .expect("Garage has no object lock");
    assert!(
        matches!(err, RepoError::ObjectLockUnavailable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("remove `object_lock`"), "{err}");
}
