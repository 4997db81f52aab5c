//! Offline copies (`ops::copy`) between in-memory repositories, with a real ledger: two files
//! backups and the ledger mirrored into the primary; a copy of the newest per source holds one
//! backup and every ledger segment, checks clean against its description, and rebuilds the
//! ledger on its own; a chunk damaged in the copy is rewritten by the next copy (`repaired`);
//! an unknown backup and a destination holding another repository are refused and recorded as
//! `copy.failed`, with no description written.

mod support;

use std::sync::Arc;

use backstop_events::{Actor, Event};
use backstop_ledger::{Ledger, LedgerConfig};
use backstop_ops::backup::{BackupOptions, run_backup};
use backstop_ops::copy::{self, CopyError, CopyRequest, Selection};
use backstop_ops::replicate::{Recorder, Replica};
use backstop_ops::schedule::SystemClock;
use backstop_ops::{DataPath, SourceKind, SourceSpec};
use backstop_repo::{KeyAccessLog, MasterKey, Repository};
use backstop_sources::files::FilesSource;
use backstop_testkit::MemoryBackend;
use uuid::Uuid;

fn events_of(ledger: &Ledger, t: &str) -> Vec<Event> {
    ledger
        .read(1, 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == t)
        .map(|e| e.event().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_holds_its_backups_and_the_ledger_checks_clean_and_repairs_itself() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("settings.json"), br#"{"risk": 0.02}"#).unwrap();
    std::fs::write(src.path().join("model.bin"), vec![7u8; 300_000]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(&dir.path().join("data"))).unwrap();
    let dp = DataPath {
        repo: support::memory_repo().await,
        appender: Arc::new(ledger.clone()),
        sources: vec![SourceSpec {
            name: "app".into(),
            kind: SourceKind::Files(FilesSource {
                paths: vec![src.path().to_path_buf()],
                include: vec![],
                exclude: vec![],
            }),
        }],
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        let request = support::logical_request("app");
        run_backup(
            &dp,
            &request,
            chrono::Utc::now(),
            &Actor::operator("test"),
            None,
            &BackupOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.chain()));
        ids.push(request.backup_id);
    }
    let primary = dp.repo.clone();
    let segments = backstop_ops::ledger_mirror::mirror_once(&ledger, &primary)
        .await
        .unwrap();
    assert!(!segments.is_empty());

    let dest = Replica {
        name: "offline".into(),
        backend: Arc::new(MemoryBackend::new()),
    };
    let rec = Recorder {
        appender: &ledger,
        actor: Actor::operator("test"),
        cause: None,
    };
    let request = |selection| CopyRequest {
        copy_id: Uuid::now_v7(),
        selection,
        to: "offline".into(),
    };
    let newest = Selection::NewestPerSource;
    let first = copy::copy_to(&rec, &primary, &dest, request(&newest), &SystemClock)
        .await
        .unwrap();
    let d = &first.description;
    assert_eq!(d.backups.len(), 1);
    assert_eq!(d.backups[0].backup_id, ids[1], "the newest of the source");
    assert_eq!(d.backups[0].method, "files");
    assert!(d.objects.iter().any(|o| o.key.starts_with("ledger/")));
    assert!(
        !d.objects
            .iter()
            .any(|o| o.key == format!("manifests/{}", ids[0])),
        "the older backup is not in the copy"
    );
    assert_eq!(first.report.copied as usize, d.objects.len());

    // The copy opens with the master key alone, checks clean and rebuilds the ledger.
    let copy_repo = Repository::open(
        dest.backend.clone(),
        &MasterKey::from_bytes([7; 64]),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .unwrap();
    assert!(copy_repo.check(Some(100.0)).await.unwrap().is_ok());
    let checked = copy::check_copy(&copy_repo, true).await.unwrap().unwrap();
    assert_eq!(checked.copy_id, d.copy_id);
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    assert!(checked.objects_read > 0);
    let rebuilt = dir.path().join("rebuilt").join("ledger");
    std::fs::create_dir_all(rebuilt.parent().unwrap()).unwrap();
    let staged = backstop_ops::ledger_mirror::restore(&copy_repo, &rebuilt, None)
        .await
        .unwrap();
    let restored = staged.commit().unwrap();
    assert_eq!(restored.last_position, segments.last().unwrap().last);

    // A ledger segment damaged on the media is named by the check.
    let seg = d
        .objects
        .iter()
        .find(|o| o.key.starts_with("ledger/"))
        .unwrap()
        .key
        .clone();
    let good = dest.backend.get(&seg).await.unwrap();
    let mut bad = good.to_vec();
    bad[30] ^= 0xff;
    dest.backend.put(&seg, bad.into()).await.unwrap();
    let checked = copy::check_copy(&copy_repo, true).await.unwrap().unwrap();
    assert_eq!(checked.problems.len(), 1, "{:?}", checked.problems);
    assert_eq!(checked.problems[0].key, seg);
    // The next copy (every backup now) finds it, rewrites it and adds the older backup.
    let all = Selection::All;
    let second = copy::copy_to(&rec, &primary, &dest, request(&all), &SystemClock)
        .await
        .unwrap();
    assert_eq!(second.report.repaired, 1);
    assert_eq!(second.description.backups.len(), 2);
    assert!(second.report.copied < second.description.objects.len() as u64);
    assert_eq!(dest.backend.get(&seg).await.unwrap(), good);
    let checked = copy::check_copy(&copy_repo, true).await.unwrap().unwrap();
    assert_eq!(checked.copy_id, second.description.copy_id);
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);

    // Refused: a backup the repository does not hold, and another repository's copy.
    let unknown = Selection::Backups(vec![Uuid::now_v7()]);
    let err = copy::copy_to(&rec, &primary, &dest, request(&unknown), &SystemClock)
        .await
        .unwrap_err();
    assert!(matches!(err, CopyError::UnknownBackup(_)), "{err}");
    let other = support::memory_repo().await;
    let foreign = Replica {
        name: "foreign".into(),
        backend: other.backend().clone(),
    };
    let err = copy::copy_to(&rec, &primary, &foreign, request(&all), &SystemClock)
        .await
        .unwrap_err();
    assert!(matches!(err, CopyError::Foreign { .. }), "{err}");
    assert!(
        other
            .backend()
            .list(copy::COPIES_PREFIX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(events_of(&ledger, "copy.started").len(), 4);
    assert_eq!(events_of(&ledger, "copy.completed").len(), 2);
    let failed = events_of(&ledger, "copy.failed");
    assert_eq!(failed.len(), 2);
    let Event::CopyFailed(f) = &failed[1] else {
        panic!("{failed:?}")
    };
    assert!(
        f.reason.contains("holds another repository"),
        "{}",
        f.reason
    );
}
