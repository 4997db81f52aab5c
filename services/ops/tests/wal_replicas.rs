//! WAL in every repository, without servers: a segment pushed while one replica is down is
//! still acknowledged (it is durable in the primary), lands on the replica that is up byte for
//! byte, and is copied to the other one by the catch-up once it is back; `check --replica`'s
//! comparison then finds both sides equal. And a fetch whose primary is unreachable is served
//! by a replica and says which.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use backstop_ops::replicate::{self, Replica};
use backstop_ops::wal::{RepoWalStore, wal_object_key};
use backstop_ops::wal_replicas::{FallbackWalStore, OpenCopy, ReplicatedWalStore, Rests};
use backstop_repo::{
    Backend, KeyAccessLog, MasterKey, ObjectMeta, RepoError, RepoParams, Repository,
};
use backstop_sources::pg::wal::{self, FetchOptions, FetchOutcome, PushOptions, WalStoreError};
use backstop_testkit::MemoryBackend;
use bytes::Bytes;

/// A store that can be taken down: every call fails as an unreachable endpoint does.
struct Switch {
    inner: MemoryBackend,
    down: AtomicBool,
}

impl Switch {
    fn new() -> Arc<Switch> {
        Arc::new(Switch {
            inner: MemoryBackend::new(),
            down: AtomicBool::new(false),
        })
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> backstop_repo::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(RepoError::Unreachable {
                what: "the test store".into(),
                detail: "connection refused".into(),
                check: "start it again".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for Switch {
    async fn put(&self, key: &str, data: Bytes) -> backstop_repo::Result<()> {
        self.check()?;
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> backstop_repo::Result<Bytes> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn head(&self, key: &str) -> backstop_repo::Result<Option<u64>> {
        self.check()?;
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> backstop_repo::Result<Vec<ObjectMeta>> {
        self.check()?;
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> backstop_repo::Result<()> {
        self.check()?;
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        "switch://test".into()
    }
}

const SEG: usize = 1 << 20;

/// A 1 MiB WAL segment whose long page header is what PostgreSQL writes for `segno` on
/// timeline 1 (the rest is filler: push checks the header, not the records).
fn segment(segno: u64) -> (String, Vec<u8>) {
    let mut data = vec![0u8; SEG];
    data[0..2].copy_from_slice(&0xD10Du16.to_le_bytes());
    data[2..4].copy_from_slice(&0x0002u16.to_le_bytes());
    data[4..8].copy_from_slice(&1u32.to_le_bytes());
    data[8..16].copy_from_slice(&(segno * SEG as u64).to_le_bytes());
    data[24..32].copy_from_slice(&7_000_000_000_000_000_001u64.to_le_bytes());
    data[32..36].copy_from_slice(&(SEG as u32).to_le_bytes());
    data[36..40].copy_from_slice(&8192u32.to_le_bytes());
    for (i, b) in data[40..].iter_mut().enumerate() {
        *b = (i as u64 * 31 + segno) as u8;
    }
    (wal::segment_name(1, segno, SEG as u64), data)
}

/// A directory laid out as `pg_wal` with `name` ready to archive; returns the file's path.
fn pg_wal_with(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let pg_wal = dir.join("pg_wal");
    std::fs::create_dir_all(pg_wal.join("archive_status")).unwrap();
    std::fs::write(pg_wal.join(name), data).unwrap();
    std::fs::write(
        pg_wal.join("archive_status").join(format!("{name}.ready")),
        b"",
    )
    .unwrap();
    pg_wal.join(name)
}

async fn open_repo(backend: Arc<dyn Backend>) -> Repository {
    Repository::open(
        backend,
        &MasterKey::from_bytes([7; 64]),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .expect("the copy opens with the master key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_pushed_with_a_replica_down_is_acknowledged_and_caught_up_later() {
    let primary_backend = Switch::new();
    let primary = Repository::init(
        primary_backend.clone(),
        &MasterKey::from_bytes([7; 64]),
        RepoParams::default(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .unwrap();
    let eu = Arc::new(MemoryBackend::new());
    let us = Switch::new();
    us.set_down(true);
    let replicas = vec![
        Replica {
            name: "eu".into(),
            backend: eu.clone(),
        },
        Replica {
            name: "us".into(),
            backend: us.clone(),
        },
    ];
    // The replica that is up needs config and keys to open later, as `replicate` gives it.
    replicate::replicate_wal(&primary, &replicas[0])
        .await
        .unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let (name, data) = segment(3);
    let path = pg_wal_with(tmp.path(), &name, &data);
    let store = ReplicatedWalStore::new(
        RepoWalStore::new(primary.clone(), "main"),
        replicas.clone(),
        Duration::from_secs(5),
    );
    let opts = PushOptions {
        marker_scope: "test".into(),
        ..PushOptions::default()
    };
    // Acknowledged: the primary holds it, whatever the replica that is down says.
    let report = wal::push(&path, &opts, &store)
        .await
        .expect("push acknowledged");
    assert!(report.requested.newly_stored);
    let key = wal_object_key("main", &name);
    assert_eq!(report.requested.object, key);
    let on_primary = primary.backend().get(&key).await.unwrap();
    // The replica that is up has the same sealed object, byte for byte (sealed once).
    assert_eq!(eu.get(&key).await.unwrap(), on_primary);
    let outcomes = store.outcomes();
    assert_eq!(
        (outcomes[0].stored, outcomes[0].failed.len()),
        (1, 0),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1].replica, "us");
    assert_eq!(outcomes[1].stored, 0);
    assert_eq!(outcomes[1].failed.len(), 1, "{outcomes:?}");
    assert!(outcomes[1].unreachable);

    // The replica that failed is rested: the next pushes skip it for a while.
    let rests = Rests::new(tmp.path().join("unreachable"), Duration::from_secs(60));
    let now = SystemTime::now();
    rests.after_push(&outcomes, now);
    assert!(rests.resting("us", now));
    assert!(!rests.resting("eu", now));

    // Back up: the catch-up copies what it lacks, read back and compared.
    us.set_down(false);
    let us_replica = &replicas[1];
    assert_eq!(
        replicate::missing_wal(&primary, us_replica).await.unwrap(),
        vec![key.clone()]
    );
    let copied = replicate::replicate_wal(&primary, us_replica)
        .await
        .unwrap();
    assert!(copied.copied >= 1, "{copied:?}");
    assert_eq!(us.inner.get(&key).await.unwrap(), on_primary);
    assert!(
        replicate::missing_wal(&primary, us_replica)
            .await
            .unwrap()
            .is_empty()
    );
    let again = replicate::replicate_wal(&primary, us_replica)
        .await
        .unwrap();
    assert_eq!(again.copied, 0, "{again:?}");
    let compared = replicate::compare(&primary, us_replica, false)
        .await
        .unwrap();
    assert!(compared.is_ok(), "{compared:?}");
    assert!(compared.objects >= 3, "{compared:?}");

    // A WAL file damaged on the replica only is found by the comparison and healed.
    let mut bad = on_primary.to_vec();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    us.inner.put(&key, Bytes::from(bad)).await.unwrap();
    let compared = replicate::compare(&primary, us_replica, true)
        .await
        .unwrap();
    assert_eq!(compared.differences.len(), 1, "{compared:?}");
    assert_eq!(compared.differences[0].key, key);
    assert!(compared.differences[0].healed);
    assert_eq!(us.inner.get(&key).await.unwrap(), on_primary);

    // The primary lost: a fetch is served by a replica, and says which.
    primary_backend.set_down(true);
    struct Opener(Arc<dyn Backend>);
    #[async_trait]
    impl OpenCopy for Opener {
        fn name(&self) -> &str {
            "us"
        }
        async fn open(&self) -> Result<RepoWalStore, WalStoreError> {
            Ok(RepoWalStore::new(open_repo(self.0.clone()).await, "main"))
        }
    }
    let fallback = FallbackWalStore::new(
        "main",
        Some(RepoWalStore::new(primary.clone(), "main")),
        None,
        vec![Box::new(Opener(us.clone()))],
    );
    let restore_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(restore_dir.path().join("pg_wal")).unwrap();
    let dest = restore_dir.path().join("pg_wal/RECOVERYXLOG");
    let fetch_opts = FetchOptions {
        prefetch: 1,
        data_dir: Some(restore_dir.path().to_path_buf()),
        recovery_has_target: Some(false),
        ..FetchOptions::default()
    };
    let outcome = wal::fetch(&name, &dest, &fetch_opts, &fallback)
        .await
        .expect("served by the replica");
    assert!(
        matches!(outcome, FetchOutcome::Restored { .. }),
        "{outcome:?}"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert!(fallback.primary_unreachable());
    assert_eq!(fallback.served_by(), Some("us"));
    assert!(
        fallback
            .primary_failure()
            .is_some_and(|w| w.contains("connection refused")),
        "{:?}",
        fallback.primary_failure()
    );
    // The end of the archive is still the end, read from the replica.
    let next = wal::segment_name(1, 4, SEG as u64);
    let outcome = wal::fetch(&next, &dest, &fetch_opts, &fallback)
        .await
        .unwrap();
    assert!(
        matches!(outcome, FetchOutcome::Missing { .. }),
        "{outcome:?}"
    );
}
