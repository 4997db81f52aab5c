//! Configuration sources through the data path (in-memory repository, real ledger): sealed with
//! the `config` key, change detection by keyed hash (unchanged, a changed value, a key
//! rotation), the verify worker's test restore, an import, and no value in any event.

mod support;

use std::sync::Arc;

use backstop_events::{Actor, BackupMethod, Event, RecoveryScope};
use backstop_ledger::{Ledger, LedgerConfig};
use backstop_ops::backup::{BackupOptions, run_backup};
use backstop_ops::config_backup::{self, Change, ImportFormat};
use backstop_ops::restore::Recovery;
use backstop_ops::verify::{VerifyOutcome, verify_completed};
use backstop_ops::{DataPath, SourceKind, SourceSpec};
use backstop_repo::KeyPurpose;
use backstop_sources::config::ConfigSource;

const SECRET: &str = "Hunter2-Okapi-3141";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_source_is_detected_unchanged_or_changed_by_keyed_hash() {
    let src = tempfile::tempdir().unwrap();
    let env = src.path().join("app.env");
    std::fs::write(&env, format!("API_KEY={SECRET}\nMODE=live\n")).unwrap();
    let json = src.path().join("settings.json");
    std::fs::write(&json, b"{\"risk\": 0.02}").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let dp = DataPath {
        repo: support::memory_repo().await,
        appender: Arc::new(ledger.clone()),
        sources: vec![SourceSpec {
            name: "cfg".into(),
            kind: SourceKind::Config(ConfigSource {
                env_file: Some(env.clone()),
                json_files: vec![json.clone()],
                ..Default::default()
            }),
        }],
    };
    let actor = Actor::operator("test");
    let backup = |dp: DataPath| async move {
        run_backup(
            &dp,
            &support::logical_request("cfg"),
            chrono::Utc::now(),
            &Actor::operator("test"),
            None,
            &BackupOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{}", e.chain()))
    };
    assert_eq!(
        config_backup::check(&dp, "cfg", &actor).await.unwrap(),
        Change::Changed { previous: None }
    );
    let first = backup(dp.clone()).await;
    assert_eq!(first.completed.method, BackupMethod::Config);
    let id1 = first.completed.backup_id;
    let m1 = dp.repo.load_manifest(id1).await.unwrap();
    assert_eq!(m1.purpose, KeyPurpose::Config, "sealed with the config key");
    let report = backstop_ops::catalog::config_report(&m1).unwrap();
    let names: Vec<&str> = report.items.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, vec!["API_KEY", "MODE", json.to_str().unwrap()]);
    assert!(!serde_json::to_string(&m1.extra).unwrap().contains(SECRET));

    // Unchanged: said so, with the backup it equals.
    match config_backup::check(&dp, "cfg", &actor).await.unwrap() {
        Change::Unchanged { since, hash } => {
            assert_eq!(since, id1);
            assert_eq!(hash, report.hash);
        }
        other => panic!("{other:?}"),
    }
    // A rotated config key: the check uses the version the backup's hash was made with.
    dp.repo.rotate_key(KeyPurpose::Config).await.unwrap();
    assert!(matches!(
        config_backup::check(&dp, "cfg", &actor).await.unwrap(),
        Change::Unchanged { .. }
    ));
    // A changed value: changed since the first backup; the new backup's hash differs for that
    // item only.
    std::fs::write(&env, format!("API_KEY={SECRET}\nMODE=maintenance\n")).unwrap();
    assert_eq!(
        config_backup::check(&dp, "cfg", &actor).await.unwrap(),
        Change::Changed {
            previous: Some(id1)
        }
    );
    let second = backup(dp.clone()).await;
    let m2 = dp
        .repo
        .load_manifest(second.completed.backup_id)
        .await
        .unwrap();
    let report2 = backstop_ops::catalog::config_report(&m2).unwrap();
    assert_ne!(
        report2.hash_key_id, report.hash_key_id,
        "the new key version"
    );
    assert!(matches!(
        config_backup::check(&dp, "cfg", &actor).await.unwrap(),
        Change::Unchanged { since, .. } if since == second.completed.backup_id
    ));

    // The verify worker's test restore passes.
    let events = ledger.read(1, 10_000).unwrap();
    let completed = events
        .iter()
        .rfind(|e| e.event_type == "backup.completed")
        .unwrap()
        .clone();
    let Ok(Event::BackupCompleted(c)) = completed.event() else {
        unreachable!()
    };
    let settings = support::scratch_settings("postgres://unused@127.0.0.1:1/x".into(), false);
    let outcome = verify_completed(&dp, &settings, &completed, &c, &actor)
        .await
        .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert!(matches!(outcome, VerifyOutcome::Passed), "{outcome:?}");

    // Import of the first backup: the env file as it was then, byte for byte.
    let out = dir.path().join("restored.env");
    let recovery = Recovery::new(
        "test",
        RecoveryScope {
            target: out.display().to_string(),
            tables: vec![],
            point_in_time: None,
            dry_run: false,
        },
    );
    config_backup::import(&dp, &m1, &recovery, &ImportFormat::Env, &out)
        .await
        .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        format!("API_KEY={SECRET}\nMODE=live\n")
    );

    // No event carries the value.
    for e in ledger.read(1, 10_000).unwrap() {
        let text = serde_json::to_string(&e).unwrap();
        assert!(!text.contains(SECRET), "{text}");
    }
}
