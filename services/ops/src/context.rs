//! What every use case needs: the repository, where events go, and the configured sources.

use std::sync::Arc;

use backstop_ledger::Appender;
use backstop_repo::Repository;

use crate::error::OpsError;

/// A configured source: its name and what kind of thing it is.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    pub name: String,
    pub kind: SourceKind,
}

/// What a source is, with what reading it needs. Each kind backs up by its own method(s)
/// ([`SourceKind::method_for`]); everything after the source (chunks, sealing, events,
/// verification, retention) is the same for all.
#[derive(Clone, Debug)]
pub enum SourceKind {
    /// A PostgreSQL database: logical (`pg_dump` + `COPY`) or physical (base backup + WAL).
    Postgres(PostgresSource),
    /// A configured command whose output (or written directory) is the backup.
    Command(backstop_sources::command::CommandSource),
    /// A Redis server, snapshotted over the replication protocol.
    Redis(backstop_sources::redis::RedisSource),
    /// Directory trees (application files, models, configuration files).
    Files(backstop_sources::files::FilesSource),
    /// Environment variables, JSON settings and database settings, backed up when they change
    /// (`crate::config_backup`).
    Config(backstop_sources::config::ConfigSource),
    /// A git repository: mirrored to a second remote and bundled (`crate::git`).
    Git(backstop_sources::git::GitSource),
}

/// Where a PostgreSQL source's database is and how to dump it.
#[derive(Clone, Debug)]
pub struct PostgresSource {
    pub conninfo: String,
    /// Parallel `COPY` streams of a logical backup.
    pub jobs: usize,
}

impl SourceKind {
    /// The kind's name in the configuration (`kind = "..."`).
    pub fn name(&self) -> &'static str {
        match self {
            SourceKind::Postgres(_) => "postgres",
            SourceKind::Command(_) => "command",
            SourceKind::Redis(_) => "redis",
            SourceKind::Files(_) => "files",
            SourceKind::Config(_) => "config",
            SourceKind::Git(_) => "git",
        }
    }

    /// The method a backup of this kind takes when `requested` was asked for: PostgreSQL takes
    /// what was asked (logical or physical); the other kinds have one method each, which a
    /// request for the default (logical, e.g. from a schedule) means.
    pub fn method_for(
        &self,
        requested: backstop_events::BackupMethod,
    ) -> Result<backstop_events::BackupMethod, String> {
        use backstop_events::BackupMethod as M;
        let own = match self {
            SourceKind::Postgres(_) => {
                return match requested {
                    M::Logical | M::Physical => Ok(requested),
                    other => Err(format!(
                        "a {other} backup was asked of a PostgreSQL source; PostgreSQL sources take logical or physical backups"
                    )),
                };
            }
            SourceKind::Command(_) => M::Command,
            SourceKind::Redis(_) => M::Redis,
            SourceKind::Files(_) => M::Files,
            SourceKind::Config(_) => M::Config,
            SourceKind::Git(_) => M::Git,
        };
        if requested == own || requested == M::Logical {
            Ok(own)
        } else {
            Err(format!(
                "a {requested} backup was asked of a {} source, which takes {own} backups only",
                self.name()
            ))
        }
    }
}

impl SourceSpec {
    /// A PostgreSQL source.
    pub fn postgres(name: impl Into<String>, conninfo: impl Into<String>, jobs: usize) -> Self {
        SourceSpec {
            name: name.into(),
            kind: SourceKind::Postgres(PostgresSource {
                conninfo: conninfo.into(),
                jobs,
            }),
        }
    }

    /// The PostgreSQL side of this source, for what only PostgreSQL has (exports, WAL).
    pub fn pg(&self) -> Result<&PostgresSource, OpsError> {
        match &self.kind {
            SourceKind::Postgres(p) => Ok(p),
            other => Err(OpsError::Invalid(format!(
                "source `{}` is a {} source, not a PostgreSQL database",
                self.name,
                other.name()
            ))),
        }
    }
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
