//! The repository on a local directory: round trips, deduplication, damage detection, keys.

mod common;

use std::sync::Arc;

use backstop_events::BackupKind;
use backstop_repo::{
    Backend, KeyAccessLog, KeyPurpose, MasterKey, ProblemKind, RepoError, RepoParams, Repository,
    manifest_key,
};
use bytes::Bytes;
use common::*;
use tokio::io::AsyncRead;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_of_concurrent_streams_with_default_chunking() {
    let t = TestRepo::new(RepoParams::default()).await;
    let big = test_data(12 << 20, 1);
    let small = test_data(300_000, 2);
    let empty: Vec<u8> = Vec::new();
    let res = backup(
        &t.repo,
        &[
            ("big.dat", &big),
            ("small.dat", &small),
            ("empty.dat", &empty),
        ],
    )
    .await;
    assert_eq!(res.raw_bytes, (big.len() + small.len()) as u64);
    assert_eq!(
        res.new_chunks, res.chunks,
        "a first backup stores every chunk"
    );
    assert!(res.chunks >= 5, "12 MiB gives several 1 MiB-average chunks");
    assert!(res.stored_bytes < res.raw_bytes, "the text half compresses");
    assert_eq!(
        res.objects_verified,
        res.new_chunks + 1,
        "chunks and manifest read back"
    );
    assert_eq!(res.manifest_key, manifest_key(&res.backup_id));

    let m = t.repo.load_manifest(res.backup_id).await.unwrap();
    assert_eq!(m.kind, BackupKind::Full);
    assert_eq!(m.source, "test-source");
    assert_eq!(m.extra["tables"][0]["rows"], 42);
    assert_eq!(m.streams.len(), 3);
    assert_eq!(read_stream(&t.repo, &m, "big.dat").await.unwrap(), big);
    assert_eq!(read_stream(&t.repo, &m, "small.dat").await.unwrap(), small);
    assert_eq!(read_stream(&t.repo, &m, "empty.dat").await.unwrap(), empty);
    assert!(t.repo.open_stream(&m, "nope").await.is_err());

    let listed = t.repo.list_backups().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].backup_id, res.backup_id);
    assert!(listed[0].manifest.is_ok());

    let report = t.repo.check(Some(100.0)).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.objects_read, res.new_chunks);
    assert_eq!(report.unreferenced_chunks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deduplication_across_backups() {
    let t = TestRepo::new(small_chunks()).await;
    let data = test_data(8 << 20, 3);
    let first = backup(&t.repo, &[("dump", &data)]).await;
    assert!(first.chunks > 50);

    // The same data again: nothing new but the manifest.
    let mut m = meta(BackupKind::Incremental);
    m.parent = Some(first.backup_id);
    let second = backup_meta(&t.repo, m, &[("dump", &data)]).await;
    assert_eq!(second.new_chunks, 0);
    assert_eq!(second.chunks, first.chunks);
    assert_eq!(second.stored_bytes, first.stored_bytes);
    assert!(
        second.new_bytes < 64 << 10,
        "only the manifest: {}",
        second.new_bytes
    );

    // A 1% change: a few edits in place and 1% appended.
    let mut changed = data.clone();
    for pos in [100_000usize, 3_000_000, 6_000_000] {
        for b in &mut changed[pos..pos + 200] {
            *b = b.wrapping_add(1);
        }
    }
    changed.extend_from_slice(&test_data(data.len() / 100, 4));
    let third = backup(&t.repo, &[("dump", &changed)]).await;
    assert!(third.new_chunks > 0);
    assert!(
        third.new_bytes * 10 < first.new_bytes,
        "a 1% change added {} of {} bytes",
        third.new_bytes,
        first.new_bytes
    );
    let m3 = t.repo.load_manifest(third.backup_id).await.unwrap();
    assert_eq!(read_stream(&t.repo, &m3, "dump").await.unwrap(), changed);
    let m2 = t.repo.load_manifest(second.backup_id).await.unwrap();
    assert_eq!(m2.parent, Some(first.backup_id));
    assert_eq!(m2.kind, BackupKind::Incremental);

    // Two streams of one backup holding the same new data store it once.
    let fresh = test_data(2 << 20, 99);
    let both = backup(&t.repo, &[("a", &fresh), ("b", &fresh)]).await;
    let mb = t.repo.load_manifest(both.backup_id).await.unwrap();
    let distinct = mb.distinct_chunks().len() as u64;
    assert_eq!(both.chunks, 2 * mb.stream("a").unwrap().chunks.len() as u64);
    assert_eq!(both.new_chunks, distinct);
    assert_eq!(read_stream(&t.repo, &mb, "b").await.unwrap(), fresh);
}

#[tokio::test]
async fn wrong_master_key_is_detected_before_anything_is_written() {
    let t = TestRepo::new(small_chunks()).await;
    let data = test_data(1 << 20, 5);
    backup(&t.repo, &[("dump", &data)]).await;
    let before = snapshot(&t.root());

    let wrong = MasterKey::generate();
    let log = Arc::new(KeyAccessLog::new());
    let err = Repository::open(t.backend.clone(), &wrong, log.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::WrongKey { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("wrong master key") && msg.contains("BACKSTOP_MASTER_KEY"),
        "{msg}"
    );
    let err = Repository::init(t.backend.clone(), &wrong, small_chunks(), log.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::AlreadyExists { .. }), "{err}");
    assert!(log.take().is_empty(), "no key was unwrapped");
    assert_eq!(snapshot(&t.root()), before, "nothing was written");

    // The right key still opens it.
    Repository::open(t.backend.clone(), &t.master, log)
        .await
        .unwrap();
}

#[tokio::test]
async fn open_of_an_empty_location_says_to_init() {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> =
        Arc::new(backstop_repo::LocalBackend::new(dir.path().join("none")).unwrap());
    let err = Repository::open(
        backend,
        &MasterKey::generate(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::NoRepository { .. }));
    assert!(err.to_string().contains("backstop init"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bit_in_a_chunk_names_the_object_and_the_backup() {
    let t = TestRepo::new(small_chunks()).await;
    let data = test_data(2 << 20, 6);
    let res = backup(&t.repo, &[("dump", &data)]).await;
    let m = t.repo.load_manifest(res.backup_id).await.unwrap();
    let victim = m.streams[0].chunks[3];
    let path = t.root().join(victim.object_key());
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();

    // Presence and size are fine; reading the data finds it.
    assert!(t.repo.check(None).await.unwrap().is_ok());
    let report = t.repo.check(Some(100.0)).await.unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let p = &report.problems[0];
    assert_eq!(p.kind, ProblemKind::Corrupt);
    assert_eq!(p.key, victim.object_key());
    assert_eq!(p.backups, vec![res.backup_id]);

    let err = read_stream(&t.repo, &m, "dump").await.unwrap_err();
    let inner = RepoError::from_io(&err).expect("a repository error");
    assert!(matches!(inner, RepoError::Corrupt { .. }), "{inner}");
    let msg = inner.to_string();
    assert!(msg.contains(&victim.object_key()), "{msg}");
    assert!(msg.contains(&res.backup_id.to_string()), "{msg}");

    // The next backup of the same data notices nothing (the manifest describes the chunk), but a
    // repository whose manifests are gone re-checks and repairs the chunk.
    std::fs::remove_file(t.root().join(manifest_key(&res.backup_id))).unwrap();
    let again = backup(&t.repo, &[("dump", &data)]).await;
    assert_eq!(again.new_chunks, 1, "only the damaged chunk is rewritten");
    let m2 = t.repo.load_manifest(again.backup_id).await.unwrap();
    assert_eq!(read_stream(&t.repo, &m2, "dump").await.unwrap(), data);
}

#[tokio::test]
async fn truncated_or_edited_manifest_is_a_clear_error() {
    let t = TestRepo::new(small_chunks()).await;
    let data = test_data(1 << 20, 7);
    let res = backup(&t.repo, &[("dump", &data)]).await;
    let path = t.root().join(manifest_key(&res.backup_id));
    let original = std::fs::read(&path).unwrap();

    for (what, bytes) in [
        ("truncated", original[..original.len() / 2].to_vec()),
        ("truncated to its header", original[..10].to_vec()),
        ("edited", {
            let mut b = original.clone();
            let n = b.len() - 5;
            b[n] ^= 1;
            b
        }),
        ("emptied", Vec::new()),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        let err = t.repo.load_manifest(res.backup_id).await.unwrap_err();
        assert!(matches!(err, RepoError::Damaged { .. }), "{what}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(&res.backup_id.to_string()), "{what}: {msg}");
        assert!(msg.contains("manifests/"), "{what}: {msg}");
        let listed = t.repo.list_backups().await.unwrap();
        assert!(listed[0].manifest.is_err());
        let report = t.repo.check(None).await.unwrap();
        assert_eq!(report.problems[0].kind, ProblemKind::Manifest, "{what}");
    }
    // A manifest copied over another backup's name fails too (its path is authenticated).
    let other = backup(&t.repo, &[("dump", &data)]).await;
    std::fs::write(
        &path,
        std::fs::read(t.root().join(manifest_key(&other.backup_id))).unwrap(),
    )
    .unwrap();
    assert!(t.repo.load_manifest(res.backup_id).await.is_err());
    std::fs::write(&path, &original).unwrap();
    assert!(t.repo.load_manifest(res.backup_id).await.is_ok());
    // A missing manifest names the backup.
    let ghost = uuid::Uuid::now_v7();
    let err = t.repo.load_manifest(ghost).await.unwrap_err();
    assert!(matches!(err, RepoError::NotFound { .. }));
    assert!(err.to_string().contains(&ghost.to_string()));
}

#[tokio::test]
async fn dry_run_names_missing_objects() {
    let t = TestRepo::new(small_chunks()).await;
    let a = test_data(1 << 20, 8);
    let b = test_data(1 << 20, 9);
    let res = backup(&t.repo, &[("a", &a), ("b", &b)]).await;
    let m = t.repo.load_manifest(res.backup_id).await.unwrap();
    let full = t.repo.dry_run_restore(&m, None).await.unwrap();
    assert!(full.is_complete());
    assert_eq!(full.raw_bytes, (a.len() + b.len()) as u64);

    let gone = m.stream("b").unwrap().chunks[1];
    t.backend.delete(&gone.object_key()).await.unwrap();
    let report = t.repo.dry_run_restore(&m, None).await.unwrap();
    assert_eq!(report.missing.len(), 1);
    assert_eq!(report.missing[0].key, gone.object_key());
    assert_eq!(report.missing[0].backup, res.backup_id);
    assert_eq!(report.missing[0].found_size, None);
    // Restoring only stream a does not need it.
    let only_a = t
        .repo
        .dry_run_restore(&m, Some(&["a".to_string()]))
        .await
        .unwrap();
    assert!(only_a.is_complete());
    assert!(
        t.repo
            .dry_run_restore(&m, Some(&["zzz".to_string()]))
            .await
            .is_err()
    );
    // check reports it, and a restore of b fails naming it.
    let check = t.repo.check(None).await.unwrap();
    assert_eq!(check.problems[0].kind, ProblemKind::Missing);
    assert_eq!(check.problems[0].key, gone.object_key());
    let err = read_stream(&t.repo, &m, "b").await.unwrap_err();
    let msg = RepoError::from_io(&err).unwrap().to_string();
    assert!(
        msg.contains(&gone.object_key()) && msg.contains(&res.backup_id.to_string()),
        "{msg}"
    );
}

/// A reader that fails after `limit` bytes, like a source process killed mid-dump.
struct FailingReader {
    data: std::io::Cursor<Vec<u8>>,
    limit: u64,
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.data.position() >= self.limit {
            return std::task::Poll::Ready(Err(std::io::Error::other("source died")));
        }
        std::pin::Pin::new(&mut self.data).poll_read(cx, buf)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_backup_leaves_no_manifest_and_its_chunks_are_reused() {
    let t = TestRepo::new(small_chunks()).await;
    let data = test_data(6 << 20, 10);
    let m = meta(BackupKind::Full);
    let id = m.backup_id;
    let w = t.repo.start_backup(m).await.unwrap();
    let err = w
        .add_stream(
            "dump",
            FailingReader {
                data: std::io::Cursor::new(data.clone()),
                limit: 4 << 20,
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("source died"), "{err}");
    let stored_before = w.progress().new_chunks;
    assert!(stored_before > 0);
    assert!(
        w.finish(serde_json::Value::Null).await.is_err(),
        "a failed backup cannot finish"
    );
    assert_eq!(t.backend.head(&manifest_key(&id)).await.unwrap(), None);
    assert!(t.repo.list_backups().await.unwrap().is_empty());
    let report = t.repo.check(None).await.unwrap();
    assert!(report.is_ok());
    assert_eq!(report.unreferenced_chunks, stored_before);

    // The next backup reuses what was uploaded (checking each reused chunk against its data).
    assert_eq!(chunk_files(&t.root()).len() as u64, stored_before);
    let next = backup(&t.repo, &[("dump", &data)]).await;
    let m = t.repo.load_manifest(next.backup_id).await.unwrap();
    let distinct = m.distinct_chunks().len() as u64;
    assert!(
        next.new_chunks < distinct / 2,
        "{} of {}",
        next.new_chunks,
        distinct
    );
    assert_eq!(next.new_chunks + stored_before, distinct);
    assert_eq!(read_stream(&t.repo, &m, "dump").await.unwrap(), data);
    assert_eq!(
        t.repo.check(Some(100.0)).await.unwrap().unreferenced_chunks,
        0
    );
}

#[tokio::test]
async fn key_accesses_are_reported_and_rotation_keeps_old_backups_readable() {
    let t = TestRepo::new(small_chunks()).await;
    assert_eq!(t.repo.keys().len(), 6);
    t.log.take();
    let data = test_data(1 << 20, 11);
    let mut m1 = meta(BackupKind::Full);
    m1.actor = "operator:alice".into();
    let first = backup_meta(&t.repo, m1.clone(), &[("dump", &data)]).await;
    let accesses = t.log.take();
    assert_eq!(accesses.len(), 1, "the database key, once: {accesses:?}");
    assert_eq!(accesses[0].purpose, KeyPurpose::Database);
    assert_eq!(accesses[0].actor, "operator:alice");
    assert_eq!(accesses[0].reason, format!("backup {}", first.backup_id));
    assert_eq!(first.keys, vec![accesses[0].key_id.clone()]);

    let rot = t.repo.rotate_key(KeyPurpose::Database).await.unwrap();
    assert_eq!(rot.new.version, 2);
    assert_eq!(rot.old.key_id, accesses[0].key_id);
    assert_eq!(t.repo.current_key(KeyPurpose::Database).unwrap(), rot.new);

    // New data is sealed with the new key; reused chunks keep the old one.
    let mut more = data.clone();
    more.extend_from_slice(&test_data(1 << 20, 12));
    let second = backup(&t.repo, &[("dump", &more)]).await;
    let m2 = t.repo.load_manifest(second.backup_id).await.unwrap();
    assert_eq!(m2.keys.len(), 2, "{:?}", m2.keys);
    assert!(m2.keys.contains(&rot.old.key_id) && m2.keys.contains(&rot.new.key_id));

    // Another process opening the repository sees both versions; reading needs both keys.
    let log = Arc::new(KeyAccessLog::new());
    let other = Repository::open(t.backend.clone(), &t.master, log.clone())
        .await
        .unwrap()
        .with_access("operator:bob", "restore");
    assert_eq!(other.keys().len(), 7);
    let m1r = other.load_manifest(first.backup_id).await.unwrap();
    assert_eq!(read_stream(&other, &m1r, "dump").await.unwrap(), data);
    let m2r = other.load_manifest(second.backup_id).await.unwrap();
    assert_eq!(read_stream(&other, &m2r, "dump").await.unwrap(), more);
    let acc = log.take();
    assert_eq!(
        acc.len(),
        2,
        "each key unwrapped once for the restore: {acc:?}"
    );
    assert!(
        acc.iter()
            .all(|a| a.actor == "operator:bob" && a.reason == "restore")
    );

    // Explicit unwraps always report.
    other
        .data_key(
            KeyPurpose::Wal,
            "wal-push 000000010000000000000001",
            "postgres",
        )
        .await
        .unwrap();
    assert_eq!(log.take()[0].purpose, KeyPurpose::Wal);
}

#[tokio::test]
async fn blobs_round_trip_and_are_checked() {
    let t = TestRepo::new(small_chunks()).await;
    let segment = Bytes::from(test_data(3 << 20, 13));
    let stored = t
        .repo
        .put_blob(
            "wal/000000010000000000000001",
            KeyPurpose::Wal,
            segment.clone(),
        )
        .await
        .unwrap();
    assert!(stored.key_id.starts_with("wal-v1-"));
    let back = t
        .repo
        .get_blob("wal/000000010000000000000001", Some(stored.sha3))
        .await
        .unwrap();
    assert_eq!(back, segment);
    let path = t.root().join("wal/000000010000000000000001");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        t.repo
            .get_blob("wal/000000010000000000000001", Some(stored.sha3))
            .await,
        Err(RepoError::Corrupt { .. })
    ));
    assert!(matches!(
        t.repo.get_blob("wal/000000010000000000000001", None).await,
        Err(RepoError::Damaged { .. })
    ));
}

#[tokio::test]
async fn init_refuses_a_used_location_and_bad_parameters() {
    let t = TestRepo::new(small_chunks()).await;
    let err = Repository::init(t.backend.clone(), &t.master, small_chunks(), t.log.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::AlreadyExists { .. }));

    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(backstop_repo::LocalBackend::new(dir.path()).unwrap());
    let mut bad = RepoParams::default();
    bad.chunker.avg_size = 1_000_000;
    assert!(matches!(
        Repository::init(backend.clone(), &t.master, bad, t.log.clone()).await,
        Err(RepoError::Config(_))
    ));
    assert!(
        snapshot(dir.path()).is_empty(),
        "nothing written for bad parameters"
    );

    // The config describes the repository, readable without the key.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.root().join("config")).unwrap()).unwrap();
    assert_eq!(cfg["format"], "backstop-repository");
    assert_eq!(cfg["chunker"]["avg_size"], 64 << 10);
    assert_eq!(cfg["repository_id"], t.repo.id().to_string());
}
