//! What the ops tests against a real PostgreSQL share: an in-memory repository, a data path
//! with one source, and a logical backup request.
#![allow(dead_code)]

use std::sync::Arc;

use backstop_events::{Actor, BackupKind, BackupMethod, BackupRequested, Trigger, uuid_v7};
use backstop_ledger::Appender;
use backstop_ops::backup::{BackupOptions, run_backup};
use backstop_ops::verify::VerifySettings;
use backstop_ops::{DataPath, SourceSpec};
use backstop_repo::{KeyAccessLog, MasterKey, RepoParams, Repository};
use backstop_testkit::MemoryBackend;

/// A new repository in memory under a fixed test key.
pub async fn memory_repo() -> Repository {
    Repository::init(
        Arc::new(MemoryBackend::new()),
        &MasterKey::from_bytes([7; 64]),
        RepoParams::default(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .expect("a repository in memory")
}

/// `repo` and `appender` with the one source `name` at `conninfo`.
pub fn data_path(
    repo: Repository,
    appender: Arc<dyn Appender>,
    name: &str,
    conninfo: String,
) -> DataPath {
    DataPath {
        repo,
        appender,
        sources: vec![SourceSpec::postgres(name, conninfo, 1)],
    }
}

/// A full logical backup of `source`, requested by hand.
pub fn logical_request(source: &str) -> BackupRequested {
    BackupRequested {
        backup_id: uuid_v7(),
        source: source.into(),
        kind: BackupKind::Full,
        method: BackupMethod::Logical,
        trigger: Trigger::Manual,
        attempt: 1,
    }
}

/// Takes a full logical backup of `source` through `dp` as `actor`; returns its request.
pub async fn back_up(dp: &DataPath, source: &str, actor: &Actor) -> BackupRequested {
    let request = logical_request(source);
    run_backup(
        dp,
        &request,
        chrono::Utc::now(),
        actor,
        None,
        &BackupOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("backup of {source}: {}", e.chain()));
    request
}

/// Logical test restores on `scratch`, exact row counts, no retries, no physical settings.
pub fn scratch_settings(scratch: String, allow_superuser: bool) -> VerifySettings {
    VerifySettings {
        scratch: Some(scratch),
        tolerance_percent: 0.0,
        max_retries: 0,
        jobs: 1,
        physical: None,
        allow_superuser,
    }
}
