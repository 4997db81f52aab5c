//! Files sources through the whole data path (in-memory repository, real ledger): a tree with
//! a 200 MB model, a symlink, modes, an empty directory and excluded `node_modules`, `dist`
//! and `logs`. The model changed by 5% between two backups: the second stores under 10% of the
//! first. Then a restore of selected paths, a full restore (links, modes, times), a dry run that
//! writes nothing, the verify worker's test restore, and a damaged chunk that fails it.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use backstop_events::{Actor, BackupMethod, Event, RecoveryScope};
use backstop_ledger::{Ledger, LedgerConfig};
use backstop_ops::backup::{BackupOptions, run_backup};
use backstop_ops::files::{FilesRestore, restore_files};
use backstop_ops::restore::Recovery;
use backstop_ops::verify::{VerifyOutcome, verify_completed};
use backstop_ops::{DataPath, SourceKind, SourceSpec};
use backstop_repo::KeyPurpose;
use backstop_sources::files::FilesSource;
use bytes::Bytes;

const MODEL: usize = 200 << 20;

/// Deterministic bytes that do not compress (xorshift), so the figures are about dedup.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write(p: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

fn recovery(to: &Path) -> Recovery {
    Recovery::new(
        "test",
        RecoveryScope {
            target: to.display().to_string(),
            tables: vec![],
            point_in_time: None,
            dry_run: false,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_with_a_model_backs_up_incrementally_and_restores_selected_paths() {
    let src = tempfile::tempdir().unwrap();
    let app = src.path().join("app");
    let mut model = noise(1, MODEL);
    write(&app.join("models/model.bin"), &model);
    write(&app.join("config/settings.json"), br#"{"risk": 0.02}"#);
    write(&app.join("bin/run.sh"), b"#!/bin/sh\nexec app\n");
    std::fs::set_permissions(
        app.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    std::os::unix::fs::symlink("models/model.bin", app.join("current-model")).unwrap();
    std::fs::create_dir_all(app.join("uploads")).unwrap();
    for skipped in [
        "node_modules/left-pad/index.js",
        "dist/app.js",
        "logs/app.log",
    ] {
        write(&app.join(skipped), b"not backed up");
    }
    let source = FilesSource {
        paths: vec![app.clone()],
        include: vec![],
        exclude: vec!["node_modules".into(), "dist".into(), "logs".into()],
    };
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let dp = DataPath {
        repo: support::memory_repo().await,
        appender: Arc::new(ledger.clone()),
        sources: vec![SourceSpec {
            name: "app-files".into(),
            kind: SourceKind::Files(source),
        }],
    };
    let actor = Actor::operator("test");
    let backup = |dp: DataPath| async move {
        let request = support::logical_request("app-files");
        run_backup(
            &dp,
            &request,
            chrono::Utc::now(),
            &Actor::operator("test"),
            None,
            &BackupOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.chain()))
    };
    let first = backup(dp.clone()).await;
    assert_eq!(first.completed.method, BackupMethod::Files);
    let manifest1 = dp
        .repo
        .load_manifest(first.completed.backup_id)
        .await
        .unwrap();
    assert_eq!(
        manifest1.purpose,
        KeyPurpose::Files,
        "sealed with the files key"
    );

    // 5% of the model changes (a retrained layer in the middle).
    let start = MODEL / 2;
    model[start..start + MODEL / 20].copy_from_slice(&noise(2, MODEL / 20));
    write(&app.join("models/model.bin"), &model);
    let second = backup(dp.clone()).await;
    let (a, b) = (first.completed.new_bytes, second.completed.new_bytes);
    eprintln!(
        "files: first backup stored {a} bytes, the second (5% of the model changed) {b} ({:.1}%)",
        b as f64 * 100.0 / a as f64
    );
    assert!(
        b * 10 < a,
        "the second backup stored {b} bytes, the first {a}: not under 10%"
    );

    // Selected paths only, under a new directory.
    let base = app.to_str().unwrap().trim_start_matches('/').to_string();
    let manifest2 = dp
        .repo
        .load_manifest(second.completed.backup_id)
        .await
        .unwrap();
    let to = tempfile::tempdir().unwrap();
    let only = to.path().join("models-only");
    let done = restore_files(
        &dp,
        manifest2.clone(),
        &recovery(&only),
        &FilesRestore {
            to_dir: only.clone(),
            paths: vec![format!("{base}/models")],
            dry_run: false,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(done.plan.files, 1);
    let back = only.join(&base);
    assert!(std::fs::read(back.join("models/model.bin")).unwrap() == model);
    assert!(!back.join("config").exists() && !back.join("current-model").exists());

    // A dry run of everything: the plan, and nothing written.
    let all = to.path().join("all");
    let dry = restore_files(
        &dp,
        manifest2.clone(),
        &recovery(&all),
        &FilesRestore {
            to_dir: all.clone(),
            paths: vec![],
            dry_run: true,
        },
    )
    .await
    .unwrap();
    assert_eq!((dry.plan.files, dry.plan.symlinks), (3, 1));
    assert!(!all.exists(), "a dry run writes nothing");

    // Everything: links, modes, the empty directory; the excluded paths are absent.
    restore_files(
        &dp,
        manifest2.clone(),
        &recovery(&all),
        &FilesRestore {
            to_dir: all.clone(),
            paths: vec![],
            dry_run: false,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{}", e.chain()));
    let back = all.join(&base);
    assert_eq!(
        std::fs::read_link(back.join("current-model")).unwrap(),
        Path::new("models/model.bin")
    );
    let mode = std::fs::metadata(back.join("bin/run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o750);
    assert!(back.join("uploads").is_dir());
    for skipped in ["node_modules", "dist", "logs"] {
        assert!(!back.join(skipped).exists(), "{skipped} was excluded");
    }
    let recovered: Vec<String> = ledger
        .read(1, 10_000)
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .filter(|t| t.starts_with("recovery."))
        .collect();
    assert_eq!(
        recovered
            .iter()
            .filter(|t| *t == "recovery.completed")
            .count(),
        2,
        "two restores recorded (the dry run records nothing): {recovered:?}"
    );

    // The verify worker's test restore passes; with a chunk of the model damaged, it fails.
    let completed = ledger
        .read(1, 10_000)
        .unwrap()
        .into_iter()
        .rfind(|e| e.event_type == "backup.completed")
        .unwrap();
    let Ok(Event::BackupCompleted(c)) = completed.event() else {
        unreachable!()
    };
    let settings = support::scratch_settings("postgres://unused@127.0.0.1:1/x".into(), false);
    let outcome = verify_completed(&dp, &settings, &completed, &c, &actor)
        .await
        .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert!(matches!(outcome, VerifyOutcome::Passed), "{outcome:?}");

    let stream = manifest2
        .streams
        .iter()
        .find(|s| s.name.ends_with("models/model.bin"))
        .unwrap();
    let victim = stream.chunks[stream.chunks.len() / 2].id.chunk_key();
    let mut sealed = dp.repo.backend().get(&victim).await.unwrap().to_vec();
    let mid = sealed.len() / 2;
    sealed[mid] ^= 0x10;
    dp.repo
        .backend()
        .put(&victim, Bytes::from(sealed))
        .await
        .unwrap();
    let outcome = verify_completed(&dp, &settings, &completed, &c, &actor)
        .await
        .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert!(
        matches!(outcome, VerifyOutcome::Failed { .. }),
        "{outcome:?}"
    );
}
