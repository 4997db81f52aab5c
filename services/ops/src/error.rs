//! The one error type of the use cases, and the policy that classifies failures.
//!
//! # Policy
//! Every failure belongs to exactly one [`FailureClass`], decided by the variant of the error
//! (and, for errors that wrap another crate's error, by that error's variant), never by the text
//! of a message:
//! - **Environment**: something around the data failed: a server or the storage unreachable, a
//!   tool that crashed, the scratch server gone. The backup or the data may be fine; the work is
//!   retried (when [`OpsError::is_transient`]) and no damage is assumed: no quarantine, no retry
//!   backup.
//! - **Data**: the data itself is wrong: a corrupt or missing object, a damaged manifest, row
//!   counts that differ, `pg_amcheck` finding corruption. Retrying the same read will not help;
//!   a verification failure of this class raises the critical alert, quarantines what is damaged
//!   and takes the backup again.
//! - **Configuration**: the request or the configuration is wrong: an unknown source, a database
//!   that does not exist, a missing tool, a malformed id. Nothing is retried; the message says
//!   what to change.
//! - **Ledger**: the ledger refused or could not be reached; transient when the ledger says so.
//!
//! Errors keep their chain (`#[source]`), so a log line or a recorded reason built with
//! [`OpsError::chain`] says every layer's part.

use backstop_ledger::LedgerError;
use backstop_repo::RepoError;
use backstop_sources::SourceError;
use backstop_sources::pg::logical::SinkError;
use backstop_sources::pg::physical::PhysicalError;
use backstop_sources::pg::wal::{WalError, WalStoreError};
use uuid::Uuid;

/// Which of the policy's classes a failure belongs to (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    Environment,
    Data,
    Configuration,
    Ledger,
}

impl FailureClass {
    pub fn as_str(&self) -> &'static str {
        match self {
            FailureClass::Environment => "environment",
            FailureClass::Data => "data",
            FailureClass::Configuration => "configuration",
            FailureClass::Ledger => "ledger",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("unknown source `{0}`; configure it under [[sources]] in the configuration file")]
    UnknownSource(String),

    /// A request that cannot be carried out as given (a malformed id, a backup of the wrong
    /// method for the operation, nothing to restore).
    #[error("{0}")]
    Invalid(String),

    /// The repository holds no backup that matches.
    #[error("{0}")]
    NoBackup(String),

    /// A manifest exists but cannot be read: the backup is damaged, not absent.
    #[error(
        "the manifest of backup {backup} is damaged: {source}; run `backstop check --read-data` and restore from another backup"
    )]
    DamagedManifest {
        backup: Uuid,
        #[source]
        source: RepoError,
    },

    /// What a backup's manifest says about its content is unreadable.
    #[error("backup {backup}'s manifest does not describe a {what}: {why}")]
    BadManifest {
        backup: Uuid,
        what: &'static str,
        why: String,
    },

    /// A test restore's row counts differ from those recorded in the source's snapshot.
    #[error("row counts differ beyond {tolerance_percent}%: {mismatches}")]
    RowCounts {
        tolerance_percent: f64,
        mismatches: String,
    },

    /// The server that test restores go to cannot be used; says nothing about the backup.
    #[error("cannot use the scratch server {server} for test restores: {source}")]
    Scratch {
        server: String,
        #[source]
        source: sqlx::Error,
    },

    /// The process ran out of time or was interrupted while it worked.
    #[error("{what} was abandoned: {why}")]
    Abandoned { what: String, why: String },

    /// A job ran past its deadline and was stopped (its external programs killed).
    #[error(
        "{what} ran past its deadline of {limit_secs} s and was stopped; if it legitimately needs longer, raise [workers] job_deadline"
    )]
    DeadlineExceeded { what: String, limit_secs: u64 },

    #[error("local I/O failed while {doing}: {source}")]
    Io {
        doing: String,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Repo(#[from] RepoError),

    #[error(transparent)]
    Source(#[from] SourceError),

    #[error(transparent)]
    Files(#[from] backstop_sources::files::FilesError),

    #[error(transparent)]
    Config(#[from] backstop_sources::config::ConfigError),

    #[error(transparent)]
    Physical(#[from] PhysicalError),

    #[error(transparent)]
    Wal(#[from] WalError),

    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl OpsError {
    /// The failure's class under the policy in the module docs.
    pub fn class(&self) -> FailureClass {
        use FailureClass::*;
        match self {
            OpsError::UnknownSource(_) | OpsError::Invalid(_) | OpsError::NoBackup(_) => {
                Configuration
            }
            OpsError::DamagedManifest { .. }
            | OpsError::BadManifest { .. }
            | OpsError::RowCounts { .. } => Data,
            OpsError::Scratch { .. }
            | OpsError::Abandoned { .. }
            | OpsError::DeadlineExceeded { .. }
            | OpsError::Io { .. } => Environment,
            OpsError::Repo(e) => repo_class(e),
            OpsError::Source(e) => source_class(e),
            OpsError::Files(e) => files_class(e),
            OpsError::Config(e) => config_class(e),
            OpsError::Physical(e) => physical_class(e),
            OpsError::Wal(e) => wal_class(e),
            OpsError::Ledger(_) => Ledger,
        }
    }

    /// True when the same operation may succeed if tried again later, unchanged.
    pub fn is_transient(&self) -> bool {
        match self {
            OpsError::Scratch { .. } => true,
            OpsError::Repo(e) => e.is_transient(),
            OpsError::Ledger(e) => e.is_transient(),
            OpsError::Source(e) => source_transient(e),
            OpsError::Files(e) => files_transient(e),
            OpsError::Config(backstop_sources::config::ConfigError::Sink(s)) => {
                repo_inside(s).is_some_and(|r| r.is_transient())
            }
            OpsError::Config(e) => e.is_transient(),
            OpsError::Physical(PhysicalError::Source(e)) => source_transient(e),
            _ => false,
        }
    }

    /// True when the failure says the stored data is damaged (see [`FailureClass::Data`]).
    pub fn is_data(&self) -> bool {
        self.class() == FailureClass::Data
    }

    /// The message with every cause in the chain, for recorded reasons and logs.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let text = c.to_string();
            // Transparent wrappers repeat their inner message; say each thing once.
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cause = c.source();
        }
        out
    }

    pub(crate) fn io(doing: impl Into<String>, source: std::io::Error) -> OpsError {
        OpsError::Io {
            doing: doing.into(),
            source,
        }
    }
}

fn repo_class(e: &RepoError) -> FailureClass {
    match e {
        _ if e.is_integrity() => FailureClass::Data,
        RepoError::WrongKey { .. } | RepoError::Format { .. } => FailureClass::Data,
        RepoError::Unreachable { .. } | RepoError::Io { .. } => FailureClass::Environment,
        _ => FailureClass::Configuration,
    }
}

fn files_class(e: &backstop_sources::files::FilesError) -> FailureClass {
    use backstop_sources::files::FilesError as F;
    match e {
        F::Io { .. } | F::Task(_) => FailureClass::Environment,
        F::Sink { source, .. } => repo_inside(source)
            .map(repo_class)
            .unwrap_or(FailureClass::Environment),
        F::Stream { source, .. } => RepoError::from_io(source)
            .map(repo_class)
            .unwrap_or(FailureClass::Data),
        F::Mismatch { .. } | F::UnsafePath(_) => FailureClass::Data,
        F::BadPattern { .. } | F::NotAbsolute(_) | F::NotUtf8(_) | F::Exists(_) | F::NoMatch(_) => {
            FailureClass::Configuration
        }
    }
}

fn config_class(e: &backstop_sources::config::ConfigError) -> FailureClass {
    use backstop_sources::config::ConfigError as C;
    match e {
        C::Io { .. } | C::Postgres(_) => FailureClass::Environment,
        C::Sink(source) => repo_inside(source)
            .map(repo_class)
            .unwrap_or(FailureClass::Environment),
        C::Document(_) => FailureClass::Data,
        C::MissingVar(_) | C::EnvLine { .. } | C::NotJson { .. } => FailureClass::Configuration,
    }
}

fn files_transient(e: &backstop_sources::files::FilesError) -> bool {
    use backstop_sources::files::FilesError as F;
    match e {
        F::Sink { source, .. } => repo_inside(source).is_some_and(|r| r.is_transient()),
        F::Stream { source, .. } => RepoError::from_io(source).is_some_and(|r| r.is_transient()),
        other => other.is_transient(),
    }
}

/// The repository error a sink or source error carries, if it carries one.
fn repo_inside(e: &SinkError) -> Option<&RepoError> {
    let inner = e.source.as_deref()?;
    inner.downcast_ref::<RepoError>().or_else(|| {
        inner
            .downcast_ref::<std::io::Error>()
            .and_then(RepoError::from_io)
    })
}

fn source_class(e: &SourceError) -> FailureClass {
    use FailureClass::*;
    match e {
        SourceError::Connect { .. }
        | SourceError::Query { .. }
        | SourceError::ToolFailed { .. }
        | SourceError::ToolSpawn { .. }
        | SourceError::LockConflict { .. }
        | SourceError::LockTimeout { .. }
        | SourceError::SinkStoppedEarly { .. }
        | SourceError::Io { .. }
        | SourceError::CommandFailed { .. }
        | SourceError::CommandTimeout { .. }
        | SourceError::RedisConnect { .. }
        | SourceError::Redis { .. }
        | SourceError::Task(_) => Environment,
        SourceError::Sink { source, .. } | SourceError::Source { source, .. } => {
            repo_inside(source).map(repo_class).unwrap_or(Environment)
        }
        SourceError::PartsMissing { .. }
        | SourceError::RowCountMismatch { .. }
        | SourceError::Archive { .. }
        | SourceError::BadReport { .. }
        | SourceError::Mismatch { .. } => Data,
        _ => Configuration,
    }
}

fn source_transient(e: &SourceError) -> bool {
    match e {
        SourceError::Connect { .. }
        | SourceError::LockConflict { .. }
        | SourceError::LockTimeout { .. }
        | SourceError::RedisConnect { .. } => true,
        SourceError::Sink { source, .. } | SourceError::Source { source, .. } => {
            repo_inside(source).is_some_and(RepoError::is_transient)
        }
        _ => false,
    }
}

fn physical_class(e: &PhysicalError) -> FailureClass {
    use FailureClass::*;
    match e {
        PhysicalError::Source(s) => source_class(s),
        PhysicalError::Wal(w) => wal_class(w),
        PhysicalError::NotArchiving { .. }
        | PhysicalError::Tablespaces { .. }
        | PhysicalError::TargetNotEmpty { .. }
        | PhysicalError::NoBackupForTarget { .. } => Configuration,
        PhysicalError::BadArchive { .. }
        | PhysicalError::BadLabel { .. }
        | PhysicalError::ManifestMismatch { .. }
        | PhysicalError::Amcheck { .. } => Data,
        // Recovery can fail for want of WAL (data) or of resources; the WAL archive's own
        // checks (`wal verify`) tell which, so treat it as data: a backup that cannot be
        // brought to consistency is not a good backup.
        PhysicalError::Recovery { .. } => Data,
        PhysicalError::Extract { .. } | PhysicalError::Server { .. } | PhysicalError::Io { .. } => {
            Environment
        }
    }
}

fn wal_class(e: &WalError) -> FailureClass {
    use FailureClass::*;
    match e {
        WalError::NotWalName { .. } | WalError::WrongCluster { .. } => Configuration,
        WalError::ReadFile { .. }
        | WalError::Io { .. }
        | WalError::Task(_)
        | WalError::Store(WalStoreError::Unavailable { .. }) => Environment,
        WalError::Conflict { .. }
        | WalError::BadSegment { .. }
        | WalError::Gap { .. }
        | WalError::Damaged(_)
        | WalError::Store(WalStoreError::Corrupt { .. }) => Data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_variants() {
        let unreachable = OpsError::Repo(RepoError::Unreachable {
            what: "GET config".into(),
            detail: "connection refused".into(),
            check: "the endpoint".into(),
        });
        assert_eq!(unreachable.class(), FailureClass::Environment);
        assert!(unreachable.is_transient());

        let corrupt_in_sink = OpsError::Source(SourceError::Sink {
            part: "data/public.trades".into(),
            source: SinkError::with_source(
                "upload failed",
                RepoError::Corrupt {
                    key: "chunks/ab/cd".into(),
                    expected: "00".into(),
                    actual: "ff".into(),
                    backup: None,
                },
            ),
        });
        assert_eq!(corrupt_in_sink.class(), FailureClass::Data);
        assert!(!corrupt_in_sink.is_transient());

        let missing_db = OpsError::Source(SourceError::DatabaseMissing {
            database: "ghost".into(),
            server: "127.0.0.1:5432".into(),
        });
        assert_eq!(missing_db.class(), FailureClass::Configuration);
        assert!(!missing_db.is_transient());

        let counts = OpsError::RowCounts {
            tolerance_percent: 1.0,
            mismatches: "public.trades: 1 rows restored, 2 recorded".into(),
        };
        assert!(counts.is_data());
    }

    #[test]
    fn chain_names_every_cause_once() {
        let e = OpsError::DamagedManifest {
            backup: Uuid::nil(),
            source: RepoError::Damaged {
                key: "manifests/x".into(),
                detail: "bad tag".into(),
                backup: None,
            },
        };
        let text = e.chain();
        assert!(text.contains("manifests/x"), "{text}");
        assert_eq!(text.matches("bad tag").count(), 1, "{text}");
    }
}
