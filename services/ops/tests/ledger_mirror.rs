//! The ledger mirrored into a real local-directory repository, the data directory deleted, and
//! the ledger rebuilt from the bucket alone (`ops::ledger_mirror`). Mirror rounds are explicit
//! calls (`mirror_once`), not timers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use backstop_events::{Actor, Event, KeyAccessed, NewEvent, streams};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig, verify};
use backstop_ops::ledger_mirror::{
    self, MirrorError, SegmentHeader, decode_segment, encode_segment, mirror_once, segment_path,
};
use backstop_repo::{KeyAccess, KeyPurpose, LocalBackend, MasterKey, RepoParams, Repository};
use tokio::sync::mpsc::unbounded_channel;

struct World {
    _dirs: tempfile::TempDir,
    data_dir: PathBuf,
    bucket: PathBuf,
    key_file: PathBuf,
}

impl World {
    fn new() -> World {
        let dirs = tempfile::tempdir().unwrap();
        let data_dir = dirs.path().join("data");
        let bucket = dirs.path().join("bucket");
        // The signing key lives outside the data directory (as beside /etc/backstop), so it
        // survives the data directory's loss.
        let key_file = dirs.path().join("etc").join("ledger-signing.key");
        World {
            _dirs: dirs,
            data_dir,
            bucket,
            key_file,
        }
    }

    fn ledger_config(&self) -> LedgerConfig {
        LedgerConfig {
            signing_key: self.key_file.clone(),
            checkpoint_every: 7,
            ..LedgerConfig::in_data_dir(&self.data_dir)
        }
    }
}

async fn repository(
    bucket: &Path,
    observer: Arc<dyn backstop_repo::KeyAccessObserver>,
) -> Repository {
    let backend = Arc::new(LocalBackend::new(bucket).unwrap());
    if Repository::exists(backend.as_ref()).await.unwrap() {
        Repository::open(backend, &MasterKey::from_bytes([7; 64]), observer)
            .await
            .unwrap()
    } else {
        Repository::init(
            backend,
            &MasterKey::from_bytes([7; 64]),
            RepoParams::default(),
            observer,
        )
        .await
        .unwrap()
    }
}

fn event(i: u64) -> NewEvent {
    NewEvent::new(
        streams::keys("test"),
        Actor::System,
        &Event::KeyAccessed(KeyAccessed {
            purpose: "test".into(),
            key_id: format!("k{i}"),
            reason: format!("event {i}"),
        }),
    )
}

async fn append(ledger: &Ledger, from: u64, n: u64) {
    for i in from..from + n {
        let e = event(i);
        let stream = e.stream.clone();
        ledger
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await
            .unwrap();
    }
}

fn segments(bucket: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(bucket.join("ledger"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Mirrors `n` events in three rounds (so three segments) and returns the head position, with
/// every key access recorded through the ledger as `key.accessed`.
async fn mirrored_ledger(w: &World, n: u64) -> u64 {
    let ledger = Ledger::open(&w.ledger_config()).unwrap();
    let (tx, rx) = unbounded_channel::<KeyAccess>();
    let recorder = tokio::spawn(backstop_ops::keys::record_key_accesses(
        rx,
        Arc::new(ledger.clone()),
    ));
    let repo = repository(&w.bucket, Arc::new(tx)).await.with_access(
        "worker:ledger-mirror",
        "mirroring the ledger into the repository",
    );
    let third = n / 3;
    append(&ledger, 1, third).await;
    let first = mirror_once(&ledger, &repo).await.unwrap();
    assert_eq!((first[0].first, first[0].last), (1, third), "{first:?}");
    // The mirror's one unwrap of the ledger key is recorded, as the next event.
    let mut heads = ledger.watch_head();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        heads.wait_for(|h| h.position > third),
    )
    .await
    .expect("the key access was never recorded")
    .unwrap();
    let access = ledger.store().get(third + 1).unwrap().unwrap();
    assert_eq!(access.event_type, "key.accessed");
    assert_eq!(access.actor.to_string(), "worker:ledger-mirror");
    assert_eq!(access.stream, streams::keys(KeyPurpose::Ledger.as_str()));
    append(&ledger, third + 1, third).await;
    mirror_once(&ledger, &repo).await.unwrap();
    append(&ledger, 2 * third + 1, n - 2 * third).await;
    let last = mirror_once(&ledger, &repo).await.unwrap();
    let head = ledger.head().position;
    assert_eq!(last.last().map(|m| m.last), Some(head));
    assert!(
        mirror_once(&ledger, &repo).await.unwrap().is_empty(),
        "nothing new to mirror"
    );
    assert_eq!(ledger.store().mirror_cursor().unwrap(), head + 1);
    drop(repo);
    recorder.await.unwrap();
    ledger.close().await;
    head
}

#[tokio::test]
async fn the_data_directory_deleted_restore_gives_back_every_event_and_the_chain_continues() {
    let w = World::new();
    let head = mirrored_ledger(&w, 30).await;
    // Three rounds, and a fourth segment when the key access landed between the first
    // round's segments.
    let count = segments(&w.bucket).len();
    assert!((3..=4).contains(&count), "{:?}", segments(&w.bucket));
    let original: Vec<_> = {
        let store = backstop_ledger::Store::open(&w.data_dir.join("ledger")).unwrap();
        store.range(1, usize::MAX).unwrap()
    };
    let public_key = backstop_ledger::CheckpointSigner::load_or_create(&w.key_file)
        .unwrap()
        .public_key_hex();

    std::fs::remove_dir_all(&w.data_dir).unwrap();

    let log = Arc::new(backstop_repo::KeyAccessLog::new());
    let repo = repository(&w.bucket, log.clone())
        .await
        .with_access("operator:alice", "restoring the ledger from its mirror");
    let dest = w.data_dir.join("ledger");
    let staged = ledger_mirror::restore(&repo, &dest, Some(&public_key))
        .await
        .unwrap();
    assert!(!dest.exists(), "nothing is in place before the commit");
    let report = staged.commit().unwrap();
    assert_eq!(report.last_position, head);
    assert_eq!(report.segments, count);
    assert!(report.pinned);
    assert!(report.checkpoints >= 3, "{report:?}");
    let accesses = log.take();
    assert_eq!(accesses.len(), 1, "{accesses:?}");
    assert_eq!(accesses[0].purpose, KeyPurpose::Ledger);
    assert_eq!(accesses[0].actor, "operator:alice");

    // Every event back, byte for byte, and the chain and checkpoints verify.
    let ledger = Ledger::open(&w.ledger_config()).unwrap();
    assert_eq!(ledger.store().range(1, usize::MAX).unwrap(), original);
    let v = verify::verify(ledger.store(), &public_key).unwrap();
    assert!(v.ok(), "{:?}", v.problems);
    assert_eq!(v.events, head);
    // Workers resume after the restored history; the mirror does not upload it again.
    assert_eq!(ledger.store().consumer_cursor("backup").unwrap(), head + 1);
    assert_eq!(ledger.store().mirror_cursor().unwrap(), head + 1);

    // Appends continue the chain at head + 1.
    append(&ledger, 1000, 1).await;
    let next = ledger.store().get(head + 1).unwrap().unwrap();
    assert_eq!(next.prev_hash, original.last().unwrap().hash);
    let mirrored = mirror_once(&ledger, &repo).await.unwrap();
    assert_eq!(mirrored.len(), 1);
    assert_eq!((mirrored[0].first, mirrored[0].last), (head + 1, head + 1));
    ledger.close().await;
    let ledger = Ledger::open(&w.ledger_config()).unwrap();
    let v = verify::verify(ledger.store(), &public_key).unwrap();
    assert!(v.ok(), "{:?}", v.problems);
    ledger.close().await;
}

#[tokio::test]
async fn a_crash_between_upload_and_cursor_reuses_the_segment_instead_of_overlapping_it() {
    let w = World::new();
    let ledger = Ledger::open(&w.ledger_config()).unwrap();
    let repo = repository(&w.bucket, Arc::new(backstop_repo::KeyAccessLog::new())).await;
    append(&ledger, 1, 5).await;
    mirror_once(&ledger, &repo).await.unwrap();
    // The cursor as if the process died after the upload, before the cursor was written.
    ledger.store().set_mirror_cursor_durable(1).await.unwrap();
    append(&ledger, 6, 4).await;
    let round = mirror_once(&ledger, &repo).await.unwrap();
    assert_eq!(round.len(), 2, "{round:?}");
    assert!(!round[0].uploaded);
    assert_eq!((round[0].first, round[0].last), (1, 5));
    assert!(round[1].uploaded);
    assert_eq!((round[1].first, round[1].last), (6, 9));
    // Later rounds of a process that has not failed need not look first (serve's `run`).
    append(&ledger, 10, 2).await;
    let later = ledger_mirror::mirror_round(&ledger, &repo, false)
        .await
        .unwrap();
    assert_eq!(
        (later[0].first, later[0].last, later[0].uploaded),
        (10, 11, true)
    );
    assert_eq!(
        segments(&w.bucket),
        vec![
            segment_path(1, 5).trim_start_matches("ledger/").to_string(),
            segment_path(6, 9).trim_start_matches("ledger/").to_string(),
            segment_path(10, 11)
                .trim_start_matches("ledger/")
                .to_string()
        ]
    );
    ledger.close().await;
    let dest = w._dirs.path().join("elsewhere").join("ledger");
    let report = ledger_mirror::restore(&repo, &dest, None)
        .await
        .unwrap()
        .commit()
        .unwrap();
    assert_eq!(report.last_position, 11);
    assert!(!report.pinned);
}

/// A restore that fails leaves nothing at the target and no temporary directory beside it.
async fn refused(repo: &Repository, root: &Path) -> MirrorError {
    let dest = root.join("restored").join("ledger");
    let err = match ledger_mirror::restore(repo, &dest, None).await {
        Ok(_) => panic!("the restore should have been refused"),
        Err(e) => e,
    };
    assert!(!dest.exists());
    let left: Vec<_> = std::fs::read_dir(root.join("restored"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    err
}

#[tokio::test]
async fn a_missing_segment_is_a_gap_named_by_its_neighbours() {
    let w = World::new();
    mirrored_ledger(&w, 30).await;
    let names = segments(&w.bucket);
    std::fs::remove_file(w.bucket.join("ledger").join(&names[1])).unwrap();
    let repo = repository(&w.bucket, Arc::new(backstop_repo::KeyAccessLog::new())).await;
    let err = refused(&repo, w._dirs.path()).await;
    let msg = err.to_string();
    assert!(matches!(err, MirrorError::Gap { .. }), "{msg}");
    assert!(msg.contains(&names[0]) && msg.contains(&names[2]), "{msg}");
    assert!(msg.contains("put it back"), "{msg}");
}

#[tokio::test]
async fn a_truncated_or_changed_segment_is_refused_by_name() {
    let w = World::new();
    mirrored_ledger(&w, 30).await;
    let names = segments(&w.bucket);
    let path = w.bucket.join("ledger").join(&names[1]);
    let good = std::fs::read(&path).unwrap();
    let repo = repository(&w.bucket, Arc::new(backstop_repo::KeyAccessLog::new())).await;

    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let err = refused(&repo, w._dirs.path()).await;
    assert!(matches!(err, MirrorError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains(&names[1]), "{err}");

    let mut changed = good.clone();
    let at = changed.len() - 40;
    changed[at] ^= 0x01;
    std::fs::write(&path, &changed).unwrap();
    let err = refused(&repo, w._dirs.path()).await;
    assert!(matches!(err, MirrorError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains(&names[1]), "{err}");

    std::fs::write(&path, &good).unwrap();
    let dest = w._dirs.path().join("restored").join("ledger");
    let ok = ledger_mirror::restore(&repo, &dest, None).await.unwrap();
    assert_eq!(ok.report.segments, names.len());
}

#[tokio::test]
async fn a_segment_with_a_changed_event_sealed_with_the_right_key_is_refused() {
    let w = World::new();
    mirrored_ledger(&w, 30).await;
    // The longest segment, so that its third event is not its last.
    let name = segments(&w.bucket)
        .into_iter()
        .max_by_key(|n| {
            let (f, l) = ledger_mirror::parse_segment_path(&format!("ledger/{n}")).unwrap();
            l - f
        })
        .unwrap();
    let key = format!("ledger/{name}");
    let repo = repository(&w.bucket, Arc::new(backstop_repo::KeyAccessLog::new())).await;
    let bytes = repo.get_blob(&key, None).await.unwrap();
    let (header, mut events): (SegmentHeader, _) = decode_segment(&key, &bytes).unwrap();
    // Someone holding the ledger key rewrites history: the payload changes, the hash does not.
    events[2].payload = serde_json::json!({"purpose": "test", "key_id": "forged", "reason": "x"});
    repo.put_blob(
        &key,
        KeyPurpose::Ledger,
        encode_segment(&header, &events).unwrap(),
    )
    .await
    .unwrap();
    let err = refused(&repo, w._dirs.path()).await;
    let msg = err.to_string();
    assert!(matches!(err, MirrorError::BadSegment { .. }), "{msg}");
    assert!(
        msg.contains(&name) && msg.contains("content changed"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_segment_from_another_repository_is_refused() {
    let w = World::new();
    mirrored_ledger(&w, 30).await;
    let other = World::new();
    mirrored_ledger(&other, 30).await;
    // The first round's segment has the same range in both.
    let name = segments(&w.bucket)[0].clone();
    assert_eq!(name, segments(&other.bucket)[0]);
    std::fs::copy(
        other.bucket.join("ledger").join(&name),
        w.bucket.join("ledger").join(&name),
    )
    .unwrap();
    let repo = repository(&w.bucket, Arc::new(backstop_repo::KeyAccessLog::new())).await;
    let err = refused(&repo, w._dirs.path()).await;
    let msg = err.to_string();
    assert!(matches!(err, MirrorError::Unreadable { .. }), "{msg}");
    assert!(
        msg.contains(&name) && msg.contains("another bucket"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_wrong_pinned_key_or_a_non_empty_target_is_refused() {
    let w = World::new();
    mirrored_ledger(&w, 12).await;
    let repo = repository(&w.bucket, Arc::new(backstop_repo::KeyAccessLog::new())).await;
    let dest = w._dirs.path().join("restored").join("ledger");
    let wrong = "11".repeat(32);
    let err = match ledger_mirror::restore(&repo, &dest, Some(&wrong)).await {
        Ok(_) => panic!("a wrong pinned key must be refused"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("not the expected"), "{err}");
    assert!(!dest.exists());

    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("something"), b"x").unwrap();
    let err = match ledger_mirror::restore(&repo, &dest, None).await {
        Ok(_) => panic!("a non-empty target must be refused"),
        Err(e) => e,
    };
    assert!(matches!(err, MirrorError::NotEmpty { .. }), "{err}");
    assert!(dest.join("something").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_garage_the_bucket_alone_gives_the_ledger_back() {
    let garage = backstop_testkit::Garage::start().expect("start Garage");
    let settings = backstop_repo::S3Settings {
        endpoint: Some(garage.endpoint()),
        region: Some(garage.region().to_string()),
        access_key: Some(garage.access_key().to_string()),
        secret_key: Some(garage.secret_key().to_string()),
        ..Default::default()
    };
    let location =
        backstop_repo::Location::parse(&format!("s3://{}/repo", garage.bucket())).unwrap();
    let backend = location.open(Some(settings.clone())).await.unwrap();
    let repo = Repository::init(
        backend,
        &MasterKey::from_bytes([7; 64]),
        RepoParams::default(),
        Arc::new(backstop_repo::KeyAccessLog::new()),
    )
    .await
    .unwrap();
    let w = World::new();
    let ledger = Ledger::open(&w.ledger_config()).unwrap();
    append(&ledger, 1, 12).await;
    mirror_once(&ledger, &repo).await.unwrap();
    // A crash before the cursor moved: the S3 listing of `ledger/<cursor>-` finds the segment.
    ledger.store().set_mirror_cursor_durable(1).await.unwrap();
    append(&ledger, 13, 3).await;
    let round = mirror_once(&ledger, &repo).await.unwrap();
    assert_eq!(round.len(), 2, "{round:?}");
    assert!(!round[0].uploaded && round[1].uploaded, "{round:?}");
    let original = ledger.store().range(1, usize::MAX).unwrap();
    let public_key = ledger.public_key().to_string();
    ledger.close().await;
    std::fs::remove_dir_all(&w.data_dir).unwrap();

    // A new machine: only the bucket, the master key and the signing key.
    let backend = location.open(Some(settings)).await.unwrap();
    let repo = repository_on(backend).await;
    let report = ledger_mirror::restore(&repo, &w.data_dir.join("ledger"), Some(&public_key))
        .await
        .unwrap()
        .commit()
        .unwrap();
    assert_eq!(report.last_position, 15);
    assert_eq!(report.segments, 2);
    let ledger = Ledger::open(&w.ledger_config()).unwrap();
    assert_eq!(ledger.store().range(1, usize::MAX).unwrap(), original);
    let v = verify::verify(ledger.store(), &public_key).unwrap();
    assert!(v.ok(), "{:?}", v.problems);
    ledger.close().await;
}

async fn repository_on(backend: Arc<dyn backstop_repo::Backend>) -> Repository {
    Repository::open(
        backend,
        &MasterKey::from_bytes([7; 64]),
        Arc::new(backstop_repo::KeyAccessLog::new()),
    )
    .await
    .unwrap()
}
