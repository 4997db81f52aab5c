//! What every use case needs: the repository, where events go, and the configured sources.

use std::sync::Arc;

use backstop_ledger::Appender;
use backstop_repo::Repository;

use crate::error::OpsError;

/// Where a named source's database is and how to dump it.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    pub name: String,
    pub conninfo: String,
    /// Parallel `COPY` streams of a logical backup.
    pub jobs: usize,
}

/// Everything a backup, restore or verification needs. Cheap to clone.
#[derive(Clone)]
pub struct DataPath {
    pub repo: Repository,
    pub appender: Arc<dyn Appender>,
    pub sources: Vec<SourceSpec>,
}

impl DataPath {
    /// The configured source named `name`.
    pub fn source(&self, name: &str) -> Result<&SourceSpec, OpsError> {
        self.sources
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| OpsError::UnknownSource(name.to_string()))
    }
}

/// This machine's name, for `backup.started`'s host.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
