//! Physical PostgreSQL backups: base backups streamed into the repository, restores to any
//! moment the WAL archive covers, and verification on a temporary cluster.
//!
//! # The base backup part
//! A base backup is one part, [`BASE_PART`] (`base/base.tar`): the uncompressed tar stream of
//! `pg_basebackup --format=tar --pgdata=- --wal-method=none`, handed to the caller's
//! [`DumpSink`](crate::pg::logical::DumpSink) as it is produced (never a local copy). The
//! repository chunks it by content, so data unchanged between two base backups is stored once.
//! The stream carries `backup_label` (first) and the backup manifest (last, with a CRC32C per
//! file), which restore checks with `pg_verifybackup`. WAL is not in the part: it comes from the
//! archive ([`crate::pg::wal`]); `pg_basebackup` returns only once the server has archived the
//! segments the backup needs, and the backup refuses to start on a server that does not archive.
//!
//! Only the default tablespaces are supported (`pg_basebackup` cannot stream several tablespaces
//! to one output); a cluster with others gets a clear error.
//!
//! # Restore
//! [`restore_physical`] extracts the part into an empty directory, checks it against the
//! manifest, and writes `recovery.signal` and the recovery settings (appended to
//! `postgresql.auto.conf` under a `# backstop restore` comment): `restore_command`, the target,
//! `recovery_target_action` and `recovery_target_timeline`, and `archive_mode = off` unless told
//! to keep archiving (a restored copy must not push a new timeline into the production archive
//! by surprise). Starting PostgreSQL on the directory replays to the target and stops there:
//! PostgreSQL 13+ refuses to finish recovery short of an explicit target, and `wal-fetch` aborts
//! recovery on a damaged segment or a gap instead of letting it end early.
//!
//! # Verification
//! [`verify_restored`] starts a private server on a restored directory (Unix socket only, in a
//! directory of its own, trust authentication through a temporary `hba_file`, archiving off),
//! waits for recovery to finish, runs `pg_amcheck`, counts every table's rows in every database,
//! stops the server and removes the directory. [`PrivateServer`] is that server on its own,
//! for callers that run their own checks on the recovered cluster (the DR drill, which may also
//! give it a loopback port).

mod backup;
mod os;
mod restore;
mod tar;
mod verify;

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::SourceError;
use crate::pg::logical::PartStored;
use crate::pg::wal::{BackupWalRange, Lsn, WalError};

pub use backup::{BaseBackupOptions, base_backup};
pub use restore::{
    PhysicalRestoreOptions, PhysicalRestoreReport, RestoreWindow, WindowPoint, choose_base_backup,
    list_window, recovery_settings, restore_physical,
};
pub use verify::{
    DatabaseRows, PhysicalVerifyOptions, PhysicalVerifyReport, PrivateServer, RecoveryEnd,
    TableCount, verify_restored,
};

/// Runs the streaming tar reader over `data` handed over in pieces of `piece` bytes (at least
/// one), as a restore does with a stored base backup, then checks that the archive ended
/// properly; returns the number of events it produced. It exists for fuzzing (the `tar` target
/// in fuzz/): the reader itself stays private to this module.
pub fn scan_tar(data: &[u8], piece: usize) -> Result<usize, String> {
    let mut scanner = tar::TarScanner::new();
    let mut events = 0;
    for part in data.chunks(piece.max(1)) {
        events += scanner.feed(part)?.len();
    }
    scanner.finish()?;
    Ok(events)
}

/// Name of the base backup's part.
pub const BASE_PART: &str = "base/base.tar";

/// Everything a restore needs besides the part itself, and what an operator wants to see of a
/// base backup. Serializable: the repository keeps it in the backup's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseBackupReport {
    /// Version of this description (1).
    pub format: u32,
    /// The part holding the tar stream ([`BASE_PART`]).
    pub part: String,
    pub server_version: String,
    pub server_version_num: u32,
    pub pg_basebackup_version: String,
    /// The cluster's system identifier (from `pg_control`): every WAL segment of this cluster
    /// carries it.
    pub system_identifier: u64,
    pub wal_segment_size: u64,
    pub data_checksums: bool,
    pub label: String,
    /// From `backup_label`: where replay starts, and the checkpoint it starts from.
    pub start_lsn: Lsn,
    pub checkpoint_lsn: Lsn,
    pub timeline: u32,
    /// From the backup manifest: where the backup becomes consistent.
    pub stop_lsn: Lsn,
    pub stop_timeline: u32,
    /// First and last WAL segment the backup needs from the archive.
    pub start_segment: String,
    pub stop_segment: String,
    /// `START TIME` from `backup_label` (the server's clock).
    pub start_time: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    /// When `pg_basebackup` returned: the backup was consistent by then, so this is the earliest
    /// moment it can be restored to.
    pub finished_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// Files and bytes of file data in the archive.
    pub files: u64,
    pub data_bytes: u64,
    /// Bytes of the tar stream (what the repository was given).
    pub raw_bytes: u64,
    pub stored: PartStored,
    /// True when the stream carried a backup manifest (checked on restore).
    pub has_manifest: bool,
}

impl BaseBackupReport {
    /// The WAL this backup needs, for [`crate::pg::wal::wal_verify`].
    pub fn wal_range(&self) -> BackupWalRange {
        BackupWalRange {
            timeline: self.timeline,
            start_lsn: self.start_lsn,
            stop_lsn: self.stop_lsn,
        }
    }

    /// The server's major version (15 for 150004).
    pub fn server_major(&self) -> u32 {
        self.server_version_num / 10000
    }
}

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum RecoveryTarget {
    /// Replay everything archived, then open.
    Latest,
    /// Stop as soon as the base backup is consistent (verification of the backup itself).
    Immediate,
    /// Stop at this commit time (`recovery_target_time`).
    Time(DateTime<Utc>),
    /// Stop at this LSN (`recovery_target_lsn`).
    Lsn(Lsn),
    /// Stop at this transaction (`recovery_target_xid`).
    Xid(u64),
    /// Stop at this restore point (`recovery_target_name`, from `pg_create_restore_point`).
    Name(String),
}

impl std::fmt::Display for RecoveryTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecoveryTarget::Latest => f.write_str("the latest archived point"),
            RecoveryTarget::Immediate => f.write_str("the end of the base backup"),
            RecoveryTarget::Time(t) => write!(f, "time {}", t.to_rfc3339()),
            RecoveryTarget::Lsn(l) => write!(f, "LSN {l}"),
            RecoveryTarget::Xid(x) => write!(f, "transaction {x}"),
            RecoveryTarget::Name(n) => write!(f, "restore point {n:?}"),
        }
    }
}

/// What PostgreSQL does on reaching the target (`recovery_target_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TargetAction {
    /// Open read-write on a new timeline.
    #[default]
    Promote,
    /// Stay read-only in recovery; `SELECT pg_wal_replay_resume()` promotes after inspection.
    Pause,
    /// Stop the server.
    Shutdown,
}

/// Which timeline recovery follows (`recovery_target_timeline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum RecoveryTimeline {
    /// The newest timeline in the archive (PostgreSQL's default).
    #[default]
    Latest,
    /// The base backup's timeline.
    Current,
    Id(u32),
}

/// Everything that can go wrong backing up, restoring or verifying physically.
#[derive(Debug, thiserror::Error)]
pub enum PhysicalError {
    #[error(transparent)]
    Source(#[from] SourceError),

    #[error(transparent)]
    Wal(#[from] WalError),

    #[error(
        "base backups need WAL archiving, but on {server} {why}; set wal_level = replica, archive_mode = on and archive_command = 'backstop wal-push %p', then restart PostgreSQL"
    )]
    NotArchiving { server: String, why: String },

    #[error(
        "{server} has tablespaces outside the data directory ({names}); physical backups support the default tablespaces only: move those objects to pg_default, or use logical backups"
    )]
    Tablespaces { server: String, names: String },

    #[error("the base backup stream is not a valid tar archive: {why}")]
    BadArchive { why: String },

    #[error("the base backup is missing what a restore needs: {why}")]
    BadLabel { why: String },

    #[error(
        "refusing to restore into {dir}: it is not empty; give a new or empty directory (nothing was written)"
    )]
    TargetNotEmpty { dir: PathBuf },

    #[error("restoring the base backup into {dir} failed: {why}")]
    Extract { dir: PathBuf, why: String },

    #[error(
        "the restored files in {dir} do not match the backup's manifest (pg_verifybackup): {output}"
    )]
    ManifestMismatch { dir: PathBuf, output: String },

    #[error(
        "no base backup can reach {target}: the earliest restorable moment is {earliest}; choose a later target"
    )]
    NoBackupForTarget { target: String, earliest: String },

    #[error("recovery of {dir} failed: {why}\n--- last lines of the server log ---\n{log}")]
    Recovery {
        dir: PathBuf,
        why: String,
        log: String,
    },

    #[error("could not {doing} the verification server on {dir}: {why}")]
    Server {
        doing: String,
        dir: PathBuf,
        why: String,
    },

    #[error("pg_amcheck found corruption in the restored cluster: {output}")]
    Amcheck { output: String },

    #[error("local I/O failed while {doing}: {source}")]
    Io {
        doing: String,
        #[source]
        source: std::io::Error,
    },
}

impl PhysicalError {
    pub(crate) fn io(doing: impl Into<String>, source: std::io::Error) -> PhysicalError {
        PhysicalError::Io {
            doing: doing.into(),
            source,
        }
    }
}
