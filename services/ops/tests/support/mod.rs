//! What the ops tests against a real PostgreSQL share: an in-memory repository, a data path
//! with one source, and a logical backup request.
#![allow(dead_code)]

use std::sync::Arc;

use backstop_events::{BackupKind, BackupMethod, BackupRequested, Trigger, uuid_v7};
use backstop_ledger::Appender;
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
        sources: vec![SourceSpec {
            name: name.into(),
            conninfo,
            jobs: 1,
        }],
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
