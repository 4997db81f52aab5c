//! Errors of this crate. Each message says what went wrong and what to do about it; none carries
//! a password (connection strings appear only in their redacted form).

use crate::pg::ConnInfo;
use crate::pg::logical::SinkError;

/// Everything that can go wrong dumping, restoring or inspecting a PostgreSQL source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "invalid PostgreSQL connection string: {why}; give a postgres://USER@HOST:PORT/DB URL or `host=... port=... dbname=...` pairs"
    )]
    InvalidConninfo { why: String },

    #[error(
        "cannot connect to PostgreSQL at {target}: {source}; check that the server is running and reachable, and the host, port, user and password"
    )]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },

    /// A restore's target database is missing (and the restore was not asked to create it).
    #[error(
        "database {database:?} does not exist on {server}; pass --create-db to create it, or name an existing database"
    )]
    DatabaseMissing { database: String, server: String },

    /// The database to back up (or otherwise read) is missing: the name or the server is wrong.
    #[error(
        "database {database:?} does not exist on {server}, so there is nothing to back up there; check the database named in the connection URL (--pg), or `postgres` of the [[sources]] entry in the configuration, and that it points at the right server"
    )]
    SourceDatabaseMissing { database: String, server: String },

    #[error("PostgreSQL error while {doing} on {target}: {source}")]
    Query {
        doing: String,
        target: String,
        #[source]
        source: sqlx::Error,
    },

    #[error(
        "{tool} was not found (looked in {searched}); install the PostgreSQL client tools (Debian: apt-get install postgresql-client-{major}) or set BACKSTOP_PG_BIN to their directory"
    )]
    ToolMissing {
        tool: String,
        major: u32,
        searched: String,
    },

    #[error(
        "{tool} {found} is older than the server (PostgreSQL {server}): it cannot dump it; install the PostgreSQL {server} client tools or set BACKSTOP_PG_BIN to a newer bin directory"
    )]
    ToolTooOld {
        tool: String,
        found: String,
        server: u32,
    },

    #[error("{tool} failed ({status}) while {doing}: {stderr}")]
    ToolFailed {
        tool: String,
        doing: String,
        status: String,
        stderr: String,
    },

    #[error("could not run {tool}: {source}")]
    ToolSpawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "another session is waiting for an exclusive lock on {table} (ALTER TABLE, DROP, VACUUM FULL, ...); the dump was abandoned rather than deadlock with it; retry when it is done"
    )]
    LockConflict { table: String },

    #[error(
        "a table of {target} is locked by another session (a migration, or a long transaction holding an ACCESS EXCLUSIVE lock), and the backup stopped waiting for it while {doing} ([workers] lock_wait_timeout); it is retried later. The holder: SELECT pid, state, query FROM pg_stat_activity WHERE pid IN (SELECT pid FROM pg_locks WHERE mode = 'AccessExclusiveLock')"
    )]
    LockTimeout { doing: String, target: String },

    #[error("storing part {part:?} failed: {source}")]
    Sink {
        part: String,
        #[source]
        source: SinkError,
    },

    #[error("reading part {part:?} of the backup failed: {source}")]
    Source {
        part: String,
        #[source]
        source: SinkError,
    },

    #[error(
        "the repository stopped reading part {part:?} before its end; the part is incomplete and the dump was abandoned"
    )]
    SinkStoppedEarly { part: String },

    #[error("{count} part(s) of the backup are missing or unreadable: {list}")]
    PartsMissing { count: usize, list: String },

    #[error(
        "database {database:?} on {server} is not empty ({what}); restore into a new database (--create-db with a new name), drop these objects first, or pass --force to restore beside them"
    )]
    TargetNotEmpty {
        database: String,
        server: String,
        what: String,
    },

    #[error(
        "table(s) {tables} already exist in database {database:?}; drop them first or restore into another database"
    )]
    TablesExist { database: String, tables: String },

    #[error("table {name:?} is not in this backup{hint}")]
    UnknownTable { name: String, hint: String },

    #[error(
        "table name {name:?} is ambiguous: it matches {candidates}; qualify it with its schema"
    )]
    AmbiguousTable { name: String, candidates: String },

    #[error(
        "table {table} cannot be restored without {needs}, which is not among the tables chosen; add it to --tables"
    )]
    MissingDependency { table: String, needs: String },

    #[error(
        "row count mismatch for {table}: the backup recorded {expected} rows but {got} were {doing}; the backup or the restore is not trustworthy"
    )]
    RowCountMismatch {
        table: String,
        expected: u64,
        got: u64,
        doing: &'static str,
    },

    #[error("the schema archive is unreadable: {why}")]
    Archive { why: String },

    #[error("the dump description is inconsistent: {why}")]
    BadReport { why: String },

    #[error("local I/O failed while {doing}: {source}")]
    Io {
        doing: String,
        #[source]
        source: std::io::Error,
    },

    #[error("internal task failed: {0}")]
    Task(String),

    /// A command source's backup, restore or verify command ended badly.
    #[error(
        "the {what} `{command}` failed ({status}); nothing was recorded as good. Its standard error ended with: {stderr}"
    )]
    CommandFailed {
        what: String,
        command: String,
        status: String,
        stderr: String,
    },

    #[error(
        "the {what} `{command}` did not finish within {limit_secs} s and was killed (with everything it started); raise timeout_seconds of the source if it is only slow. Its standard error ended with: {stderr}"
    )]
    CommandTimeout {
        what: String,
        command: String,
        limit_secs: u64,
        stderr: String,
    },

    /// Redis could not be reached (it may be restarting): retried.
    #[error(
        "cannot connect to Redis at {target}: {source}; check that the server is running and the host, port and password of the source"
    )]
    RedisConnect {
        target: String,
        #[source]
        source: std::io::Error,
    },

    #[error("Redis at {target} failed while {doing}: {why}")]
    Redis {
        target: String,
        doing: String,
        why: String,
    },

    /// What a backup recorded and what came back differ: the backup is not trustworthy.
    #[error("{what}: {why}")]
    Mismatch { what: String, why: String },
}

impl SourceError {
    pub(crate) fn connect(target: &ConnInfo, source: sqlx::Error) -> SourceError {
        if let sqlx::Error::Database(db) = &source
            && db.code().as_deref() == Some("3D000")
        {
            return SourceError::DatabaseMissing {
                database: target.database().unwrap_or_default().to_string(),
                server: target.server(),
            };
        }
        SourceError::Connect {
            target: target.redacted(),
            source,
        }
    }

    /// The same error seen from a database that is read rather than written to: a missing
    /// database is then the source's, and the advice is to name the right one, not to create it.
    pub(crate) fn reading_source(self) -> SourceError {
        match self {
            SourceError::DatabaseMissing { database, server } => {
                SourceError::SourceDatabaseMissing { database, server }
            }
            other => other,
        }
    }

    pub(crate) fn query(doing: impl Into<String>, target: &ConnInfo, source: sqlx::Error) -> Self {
        // 55P03 lock_not_available: lock_timeout ran out.
        if let sqlx::Error::Database(db) = &source
            && db.code().as_deref() == Some("55P03")
        {
            return SourceError::LockTimeout {
                doing: doing.into(),
                target: target.redacted(),
            };
        }
        SourceError::Query {
            doing: doing.into(),
            target: target.redacted(),
            source,
        }
    }

    pub(crate) fn io(doing: impl Into<String>, source: std::io::Error) -> Self {
        SourceError::Io {
            doing: doing.into(),
            source,
        }
    }
}
