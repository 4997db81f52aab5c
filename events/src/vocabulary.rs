//! The typed payloads of every event Backstop records.
//!
//! Each variant of [`Event`] has a stable type name (`backup.completed`) and a schema version.
//! Schema evolution rules, so that any build reads every older ledger:
//! - adding a field: give it `#[serde(default)]`; the schema version stays;
//! - renaming, removing or changing the meaning of a field: bump the version and add a step to
//!   [`upcast`] that rewrites the older payload into the current shape;
//! - a type name is never reused for a different meaning.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::envelope::EventError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupKind {
    Full,
    Incremental,
    Differential,
}

impl BackupKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
            BackupKind::Differential => "differential",
        }
    }
}

impl std::str::FromStr for BackupKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(BackupKind::Full),
            "incremental" => Ok(BackupKind::Incremental),
            "differential" => Ok(BackupKind::Differential),
            other => Err(format!(
                "unknown backup kind {other:?}: expected full, incremental or differential"
            )),
        }
    }
}

impl std::fmt::Display for BackupKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a backup reads its source. Every handler matches it exhaustively, so a new method cannot
/// be accepted by the API and then silently refused by a worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupMethod {
    /// `pg_dump`'s schema plus parallel `COPY` streams from one exported snapshot.
    #[default]
    Logical,
    /// A base backup (`pg_basebackup`), restored with archived WAL to a point in time.
    Physical,
    /// A command source: a configured command's output (or the directory it wrote).
    Command,
    /// A Redis snapshot (RDB) taken over the replication protocol.
    Redis,
    /// A files source: one stream per file and the tree (modes, times, links).
    Files,
    /// A git source: a bundle of every mirrored ref (`git clone FILE.bundle` restores it).
    Git,
    /// A configuration source: environment variables, JSON settings and database settings in
    /// one sealed document (`backstop config import` restores it).
    Config,
}

impl BackupMethod {
    pub fn as_str(&self) -> &'static str {
        match self {
            BackupMethod::Logical => "logical",
            BackupMethod::Physical => "physical",
            BackupMethod::Command => "command",
            BackupMethod::Redis => "redis",
            BackupMethod::Files => "files",
            BackupMethod::Git => "git",
            BackupMethod::Config => "config",
        }
    }
}

impl std::str::FromStr for BackupMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "logical" => Ok(BackupMethod::Logical),
            "physical" => Ok(BackupMethod::Physical),
            "command" => Ok(BackupMethod::Command),
            "redis" => Ok(BackupMethod::Redis),
            "files" => Ok(BackupMethod::Files),
            "git" => Ok(BackupMethod::Git),
            "config" => Ok(BackupMethod::Config),
            other => Err(format!(
                "unknown backup method {other:?}: expected logical, physical, command, redis, files, git or config"
            )),
        }
    }
}

impl std::fmt::Display for BackupMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a schedule's slot runs (`[[schedules]] job = ...`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduledJob {
    /// `backup.requested` for the schedule's source.
    #[default]
    Backup,
    /// `export.requested` for these tables of the schedule's source (empty: all).
    Export { tables: Vec<String> },
    /// `drill.requested`: a DR drill of the schedule's source (a `[[drills]]` entry's schedule).
    Drill,
}

impl ScheduledJob {
    pub fn is_backup(&self) -> bool {
        matches!(self, ScheduledJob::Backup)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Trigger {
    /// An operator asked (API or CLI); a backup worker runs it.
    Manual,
    /// An operator's command runs it in the foreground on `host` (`backstop backup`); workers
    /// leave it alone.
    Foreground {
        host: String,
    },
    Schedule {
        schedule: String,
    },
    Retry {
        of: Uuid,
        reason: String,
    },
}

/// An endpoint's state in the health monitor's judgement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// Answering, in time (or not yet failed often enough to be judged down).
    #[default]
    Up,
    /// Answering, but slowly on consecutive checks.
    Degraded,
    /// Failing on consecutive checks.
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "tier")]
pub enum VerifyTier {
    /// Presence and checksum of every object.
    Checksums,
    /// A share of the sealed objects read back, decrypted and checked.
    Sampled { percent: f64 },
    /// A real restore into a scratch database, row counts compared.
    Restore,
}

/// Rows of one table, counted in the backup's snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableRows {
    pub schema: String,
    pub table: String,
    pub rows: u64,
}

/// A table's row count after a test restore, against the count in the source's snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableCheck {
    pub schema: String,
    pub table: String,
    pub expected: u64,
    pub restored: u64,
}

/// A ref a git sync moved on the mirror: `from` none when it was created, `to` none when it was
/// deleted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitRefChange {
    pub name: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// A ref whose hash differs between a git source and its mirror (none: that side lacks it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitRefDivergence {
    pub name: String,
    pub source: Option<String>,
    pub mirror: Option<String>,
    pub why: String,
}

/// What a recovery restores, and where.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct RecoveryScope {
    /// The target: a connection string with the password removed, or a directory.
    pub target: String,
    /// Empty means every table.
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub point_in_time: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// One component of a backup set: its source and the backup taken of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetComponent {
    pub source: String,
    pub backup_id: Uuid,
}

/// A component of a backup set whose backup failed, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetComponentFailed {
    pub source: String,
    pub backup_id: Uuid,
    pub reason: String,
}

/// The kind of job a lease is held for (`lease.renewed`'s `what`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeasedJob {
    /// A backup, on the stream `backup-<id>`.
    Backup,
    /// A restore, on the stream `recovery-<id>`.
    Recovery,
}

impl LeasedJob {
    pub fn as_str(&self) -> &'static str {
        match self {
            LeasedJob::Backup => "backup",
            LeasedJob::Recovery => "recovery",
        }
    }
}

impl std::fmt::Display for LeasedJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! vocabulary {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal v $ver:literal { $($(#[$fdoc:meta])* $field:ident : $ty:ty),* $(,)? } )*) => {
        $(
            $(#[$doc])*
            #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
            pub struct $variant { $( $(#[$fdoc])* pub $field: $ty ),* }

            impl From<$variant> for Event {
                fn from(v: $variant) -> Event { Event::$variant(v) }
            }
        )*

        /// Every event Backstop records, by type.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Event { $( $variant($variant) ),* }

        /// Every type name with its current schema version.
        pub const EVENT_TYPES: &[(&str, u16)] = &[ $( ($name, $ver) ),* ];

        impl Event {
            pub fn type_name(&self) -> &'static str {
                match self { $( Event::$variant(_) => $name ),* }
            }

            pub fn schema_version(&self) -> u16 {
                match self { $( Event::$variant(_) => $ver ),* }
            }

            /// The payload as a JSON object.
            pub fn payload(&self) -> Value {
                let v = match self { $( Event::$variant(p) => serde_json::to_value(p) ),* };
                // Serializing these plain structs into a Value cannot fail.
                v.unwrap_or(Value::Null)
            }

            /// Decodes a stored payload, upgrading older schema versions first.
            pub fn decode(event_type: &str, version: u16, payload: &Value) -> Result<Event, EventError> {
                let current = current_version(event_type)
                    .ok_or_else(|| EventError::UnknownType(event_type.to_string()))?;
                if version > current {
                    return Err(EventError::FutureSchema {
                        event_type: event_type.to_string(),
                        found: version,
                        supported: current,
                    });
                }
                let payload = upcast(event_type, version, payload.clone());
                let bad = |source| EventError::BadPayload { event_type: event_type.to_string(), source };
                match event_type {
                    $( $name => serde_json::from_value(payload).map(Event::$variant).map_err(bad), )*
                    other => Err(EventError::UnknownType(other.to_string())),
                }
            }
        }
    };
}

/// The schema version this build writes for a type, or `None` for an unknown type.
pub fn current_version(event_type: &str) -> Option<u16> {
    EVENT_TYPES
        .iter()
        .find(|(n, _)| *n == event_type)
        .map(|(_, v)| *v)
}

/// Rewrites a payload of an older schema version into the current shape, one version at a time.
///
/// Steps:
/// - `backup.requested`, `backup.started`, `backup.completed` 1 -> 2: the boolean `physical`
///   became `method` (`"logical"` or `"physical"`); a version-1 payload without the field was
///   logical.
///
/// A step is `("type.name", n) => { ...rewrite...; n + 1 }`, and the tests below keep a stored
/// version-n payload that must still decode.
pub fn upcast(event_type: &str, mut version: u16, mut payload: Value) -> Value {
    let current = current_version(event_type).unwrap_or(version);
    while version < current {
        match (event_type, version) {
            ("backup.requested" | "backup.started" | "backup.completed", 1) => {
                if let Value::Object(fields) = &mut payload {
                    let physical = fields
                        .remove("physical")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false);
                    let method = if physical {
                        BackupMethod::Physical
                    } else {
                        BackupMethod::Logical
                    };
                    fields.insert("method".into(), Value::String(method.as_str().into()));
                }
                version = 2;
            }
            _ => version = current,
        }
    }
    payload
}

vocabulary! {
    /// A repository was created, or opened for the first time by this ledger.
    RepositoryInitialized = "repository.initialized" v 1 {
        repository_id: Uuid, location: String, format_version: u32,
    }

    /// Someone asked for a backup: an operator, a schedule, or a retry after a failure.
    BackupRequested = "backup.requested" v 2 {
        backup_id: Uuid, source: String, kind: BackupKind,
        #[serde(default)] method: BackupMethod,
        trigger: Trigger,
        #[serde(default = "one")] attempt: u32,
    }
    BackupStarted = "backup.started" v 2 {
        backup_id: Uuid, source: String, kind: BackupKind,
        parent: Option<Uuid>,
        #[serde(default)] method: BackupMethod,
        host: String,
    }
    /// A backup is complete: its manifest is sealed, uploaded and read back intact.
    BackupCompleted = "backup.completed" v 2 {
        backup_id: Uuid, source: String, kind: BackupKind,
        parent: Option<Uuid>,
        #[serde(default)] method: BackupMethod,
        /// Object key of the sealed manifest in the repository.
        manifest: String,
        /// SHA3-256 of the sealed manifest object.
        manifest_sha3: String,
        /// Bytes read from the source.
        raw_bytes: u64,
        /// Bytes the whole backup occupies in the repository (all chunks it references).
        stored_bytes: u64,
        /// Bytes this backup added to the repository.
        new_bytes: u64,
        chunks: u64,
        new_chunks: u64,
        duration_ms: u64,
        /// 1 for a first attempt; retries after failed verifications count up.
        #[serde(default = "one")] attempt: u32,
        #[serde(default)] tables: Vec<TableRows>,
    }
    BackupFailed = "backup.failed" v 1 {
        backup_id: Uuid, source: String, reason: String,
        #[serde(default = "one")] attempt: u32,
    }
    /// A scheduled or API-requested backup of a configuration source was not taken: the
    /// source's keyed hash equals that of backup `unchanged_since` (R16). The request is closed.
    BackupSkipped = "backup.skipped" v 1 {
        backup_id: Uuid, source: String, unchanged_since: Uuid, reason: String,
    }
    /// Every object a backup wrote was read back after upload and its SHA3-256 matched.
    UploadVerified = "upload.verified" v 1 {
        backup_id: Uuid, objects: u64, bytes: u64,
    }

    VerificationStarted = "verification.started" v 1 {
        verification_id: Uuid, backup_id: Uuid, tier: VerifyTier,
    }
    VerificationPassed = "verification.passed" v 1 {
        verification_id: Uuid, backup_id: Uuid, tier: VerifyTier,
        objects_checked: u64, bytes_checked: u64,
        #[serde(default)] restore_ms: Option<u64>,
        /// Restore speed in bytes of source data per second, for recovery-time estimates.
        #[serde(default)] restore_bytes_per_sec: Option<f64>,
        #[serde(default)] tables: Vec<TableCheck>,
    }
    VerificationFailed = "verification.failed" v 1 {
        verification_id: Uuid, backup_id: Uuid, tier: VerifyTier, reason: String,
        #[serde(default)] tables: Vec<TableCheck>,
    }

    RetentionDecided = "retention.decided" v 1 {
        backup_id: Uuid, policy: String, keep: bool, reason: String,
    }
    BackupDeleted = "backup.deleted" v 1 {
        backup_id: Uuid, policy: String, reason: String,
        #[serde(default)] objects_removed: u64,
        #[serde(default)] bytes_freed: u64,
    }

    KeyCreated = "key.created" v 1 { purpose: String, key_id: String, version: u32 }
    /// A data key was unwrapped with the master key. The envelope's actor says who.
    KeyAccessed = "key.accessed" v 1 { purpose: String, key_id: String, reason: String }
    KeyRotated = "key.rotated" v 1 {
        purpose: String, old_key_id: String, new_key_id: String, version: u32,
    }
    ReencryptionStarted = "reencryption.started" v 1 {
        job_id: Uuid, purpose: String, from_key_id: String, to_key_id: String, backups: u64,
    }
    /// One backup of a re-encryption job checkpointed: `objects` chunks re-sealed for it (0 when
    /// it was already on the job's keys), `manifest_sha3` the SHA3-256 of its rewritten
    /// manifest (empty when not rewritten), and the job's count so far.
    ReencryptionProgressed = "reencryption.progressed" v 1 {
        job_id: Uuid, backup_id: Uuid, objects: u64,
        #[serde(default)] bytes: u64,
        #[serde(default)] manifest_sha3: String,
        #[serde(default)] backups_done: u64,
        #[serde(default)] backups_total: u64,
    }
    ReencryptionCompleted = "reencryption.completed" v 1 {
        job_id: Uuid, objects: u64,
        #[serde(default)] bytes: u64,
        #[serde(default)] backups: u64,
    }
    /// A key version nothing in the repository is sealed with any more was retired (it is
    /// kept, and still unwraps; nothing new is sealed with it).
    KeyRetired = "key.retired" v 1 { purpose: String, key_id: String, version: u32 }
    ReencryptionFailed = "reencryption.failed" v 1 { job_id: Uuid, reason: String }

    /// Table exports (`backstop export`, or a `[[schedules]]` entry with `job = "export"`), on
    /// the stream `export-<id>`. A requested export is run by the export worker; a foreground
    /// one (trigger `foreground`) by the operator's command, which records the same events.
    ExportRequested = "export.requested" v 1 {
        export_id: Uuid, source: String,
        /// The tables asked for; empty: every table of the database.
        #[serde(default)] tables: Vec<String>,
        trigger: Trigger,
    }
    /// An export's index is stored and every piece was read back intact.
    ExportCompleted = "export.completed" v 1 {
        export_id: Uuid, source: String, tables: u64, rows: u64, sealed_bytes: u64,
        duration_ms: u64,
    }
    ExportFailed = "export.failed" v 1 { export_id: Uuid, source: String, reason: String }
    /// An export its retention policy (`[[retention]] class = "exports"`, 90 days by default) no
    /// longer keeps is deleted:
    /// recorded before its objects go, so a deletion cut short is finished by the next pass.
    ExportDeleted = "export.deleted" v 1 {
        export_id: Uuid, source: String, finished_at: DateTime<Utc>, reason: String,
    }

    RecoveryRequested = "recovery.requested" v 1 {
        recovery_id: Uuid, backup_id: Uuid, operator: String, scope: RecoveryScope,
    }
    RecoveryStarted = "recovery.started" v 1 {
        recovery_id: Uuid, backup_id: Uuid, operator: String, scope: RecoveryScope,
    }
    RecoveryCompleted = "recovery.completed" v 1 {
        recovery_id: Uuid, backup_id: Uuid, operator: String, scope: RecoveryScope,
        duration_ms: u64, bytes: u64,
        #[serde(default)] tables: Vec<TableRows>,
    }
    RecoveryFailed = "recovery.failed" v 1 {
        recovery_id: Uuid, backup_id: Uuid, operator: String, scope: RecoveryScope, reason: String,
    }

    /// The process running a job (a backup, a recovery) is alive and holds the job's lease until
    /// `until`; it renews every third of the lease. On the job's own stream, with ids derived from
    /// the job, the run and the renewal number. A job whose lease lapses before it ends is recorded
    /// as failed (abandoned) by `backstop serve`'s lease monitor.
    LeaseRenewed = "lease.renewed" v 1 {
        job: Uuid, what: LeasedJob, until: DateTime<Utc>,
        /// The machine the job runs on.
        #[serde(default)] host: String,
        /// 0 for the renewal at the start of a run, then 1, 2, ...
        #[serde(default)] renewal: u64,
    }

    /// Replicas (`[[repository.replicas]]`, `backstop replicate`; backstop_ops::replicate): a
    /// backup's objects copied to a replica and read back, on the backup's stream.
    /// `from_region` is `primary`, `to_region` the replica's name; ids derive from the backup
    /// and the replica, so a backup replicated again records nothing twice.
    ReplicationStarted = "replication.started" v 1 {
        replication_id: Uuid, backup_id: Uuid, from_region: String, to_region: String,
    }
    ReplicationCompleted = "replication.completed" v 1 {
        replication_id: Uuid, backup_id: Uuid, from_region: String, to_region: String,
        objects: u64, bytes: u64,
    }
    ReplicationFailed = "replication.failed" v 1 {
        replication_id: Uuid, backup_id: Uuid, from_region: String, to_region: String,
        reason: String,
    }
    /// A replica's lag (stream `storage`): the age of the oldest backup the primary holds that
    /// the replica does not; 0 when up to date. `region` is the replica's name.
    ReplicationLagMeasured = "replication.lag_measured" v 1 { region: String, lag_seconds: u64 }

    /// An offline copy (`backstop copy --to DIR|s3://...`; backstop_ops::copy) began, on the
    /// stream `copy-<copy_id>`: the repository copied (`from`), the destination (`to`) and the
    /// backups chosen.
    CopyStarted = "copy.started" v 1 {
        copy_id: Uuid, from: String, to: String, backups: Vec<Uuid>,
    }
    /// Every object of the copy is at the destination and was read back with the primary's
    /// SHA3-256, and its description (`copies/<copy_id>`) is written: `objects` and `bytes` the
    /// whole copy, `copied` and `copied_bytes` what this run wrote (the rest was there already),
    /// `repaired` objects found different at the destination and rewritten.
    CopyCompleted = "copy.completed" v 1 {
        copy_id: Uuid, from: String, to: String, backups: Vec<Uuid>,
        objects: u64, bytes: u64, copied: u64, copied_bytes: u64, repaired: u64,
        description: String, duration_ms: u64,
    }
    /// An offline copy stopped: `reason` says why (the destination holds another repository,
    /// an object read back wrong, a store unreachable). No description is written for it.
    CopyFailed = "copy.failed" v 1 { copy_id: Uuid, from: String, to: String, reason: String }

    WalArchived = "wal.archived" v 1 {
        timeline: u32, segment: String, sha3: String, bytes: u64, object: String,
    }

    /// A sealed piece of a webhook log (`[[webhooks]]`, `POST /webhooks/NAME`) was uploaded and
    /// read back intact: the entries `first..=last` the log `name` received on `day`
    /// (`YYYY-MM-DD`, America/New_York), at `object`, sealed with the `export` key `key_id`.
    /// On the stream `webhook-<name>`; the id derives from the name and `first`, so a piece
    /// uploaded again after a crash is recorded once.
    WebhookLogSealed = "webhook.log_sealed" v 1 {
        name: String, day: String, first: u64, last: u64, entries: u64,
        /// The sealed object's size and SHA3-256 (hex), as read back after upload.
        bytes: u64, sha3: String, object: String, key_id: String,
    }
    /// A piece older than the log's retention (`[[webhooks]] keep`, 90 days by default) is
    /// deleted: recorded before the object goes, so a deletion cut short is finished (and
    /// recorded once: same id) by the next pass.
    WebhookLogDeleted = "webhook.log_deleted" v 1 {
        name: String, day: String, first: u64, last: u64, object: String, reason: String,
    }

    /// What a source's `pg_stat_archiver` said (the monitor's `wal_archiving_failing` rule).
    /// Recorded when the archiver starts or stops failing, and hourly as a sample; ids derive
    /// from the source and the check's slot, so two `serve` processes record a check once.
    WalArchiverChecked = "wal.archiver_checked" v 1 {
        source: String,
        /// True when the archiver's newest attempt failed (its last failure is newer than its
        /// last success).
        failing: bool,
        archived_count: u64, failed_count: u64,
        #[serde(default)] last_archived_wal: Option<String>,
        #[serde(default)] last_archived_at: Option<DateTime<Utc>>,
        #[serde(default)] last_failed_wal: Option<String>,
        #[serde(default)] last_failed_at: Option<DateTime<Utc>>,
    }

    /// A schedule slot fired. The slot time makes two schedulers agree: the append uses the
    /// schedule stream's version, so only one of them records it.
    ScheduleFired = "schedule.fired" v 1 {
        schedule: String, slot: DateTime<Utc>, source: String, kind: BackupKind,
        #[serde(default)] physical: bool,
        /// What the slot runs: a backup (the default, left out of the encoding) or an export.
        #[serde(default, skip_serializing_if = "ScheduledJob::is_backup")] job: ScheduledJob,
    }

    /// A condition that needs a person began. One condition is one alert: `key` (`kind/subject`,
    /// for example `no_recent_backup/orders`) is open from its `alert.raised` until an
    /// `alert.resolved` with the same key, and is never raised twice while open.
    AlertRaised = "alert.raised" v 1 {
        alert_id: Uuid, severity: Severity, kind: String, subject: String, message: String,
        /// The condition's stable key; empty on alerts recorded before keys existed (then the
        /// alert is its own condition).
        #[serde(default, skip_serializing_if = "String::is_empty")] key: String,
        /// The source the alert concerns, when there is one (notification routing).
        #[serde(default, skip_serializing_if = "Option::is_none")] source: Option<String>,
    }
    /// The condition of an open alert cleared (or an operator closed it).
    AlertResolved = "alert.resolved" v 1 {
        alert_id: Uuid, kind: String, subject: String, message: String,
        #[serde(default, skip_serializing_if = "String::is_empty")] key: String,
        #[serde(default, skip_serializing_if = "Option::is_none")] source: Option<String>,
    }
    /// A notification went out on a channel. Its id is derived from (cause, channel), so one
    /// event is notified once per channel (see `backstop_ops::notify`).
    NotificationSent = "notification.sent" v 1 {
        alert_id: Option<Uuid>, channel: String, recipient: String, subject: String,
        /// The event that called for it (none for `backstop notify test`).
        #[serde(default)] cause: Option<Uuid>,
        /// The attempt that succeeded, from 1.
        #[serde(default)] attempt: u32,
        /// The alert's condition key, for alerts and recoveries.
        #[serde(default, skip_serializing_if = "String::is_empty")] key: String,
        /// alert, recovery, success, report or test.
        #[serde(default)] kind: String,
    }
    /// One failed attempt to send a notification on a channel.
    NotificationFailed = "notification.failed" v 1 {
        alert_id: Option<Uuid>, channel: String, recipient: String, reason: String,
        #[serde(default)] cause: Option<Uuid>,
        #[serde(default)] attempt: u32,
        #[serde(default, skip_serializing_if = "String::is_empty")] key: String,
        #[serde(default)] kind: String,
        /// Whether another attempt might succeed (by the error's variant).
        #[serde(default)] transient: bool,
        /// No further attempt follows for this event on this channel.
        #[serde(default)] last: bool,
    }

    HealthChecked = "health.checked" v 1 {
        endpoint: String, ok: bool, status: Option<u16>, latency_ms: u64,
        #[serde(default)] error: Option<String>,
        /// The endpoint's state after this check, as the health monitor judges it from the run
        /// of checks before it.
        #[serde(default)] state: HealthState,
    }
    StorageConnectivityChecked = "storage.connectivity_checked" v 1 {
        backend: String, ok: bool, latency_ms: u64,
        #[serde(default)] error: Option<String>,
    }
    StorageUsageSampled = "storage.usage_sampled" v 1 {
        region: String, storage_class: String, bytes: u64, objects: u64,
        /// The repository's location (bucket URL or path), so two repositories are two series.
        #[serde(default)] repository: String,
    }

    /// A periodic report (the weekly summary) was composed; the notifier sends it on. Its id is
    /// derived from the report and its period, so two monitors compose it once.
    ReportGenerated = "report.generated" v 1 {
        report: String, period_start: DateTime<Utc>, period_end: DateTime<Utc>,
        title: String, text: String,
        #[serde(default)] summary: Value,
    }

    /// A scheduled DR drill is due (serve's `[[drills]]` schedule), first on `drill-<id>`; the
    /// drill worker runs it, and its `drill.started` follows on the same stream. The id derives
    /// from the schedule and the slot, so a slot requests one drill whoever fires it.
    DrillRequested = "drill.requested" v 1 {
        drill_id: Uuid, source: String, trigger: Trigger,
    }
    /// A DR drill began (`backstop drill`, or serve's drill schedule): the backup it restores
    /// (nil when none could be chosen; the drill then completes failed) to the staging target
    /// (its password redacted).
    DrillStarted = "drill.started" v 1 {
        drill_id: Uuid, backup_id: Uuid, target: String,
        #[serde(default)] source: String,
        /// `logical` (physical drills are not built yet).
        #[serde(default)] method: String,
    }
    /// A DR drill ended: passed or not, the measured RTO (the sum of the phases' times), the
    /// target, why it failed, and the whole report (docs/FORMAT.md, "Drill reports").
    DrillCompleted = "drill.completed" v 1 {
        drill_id: Uuid, backup_id: Uuid, passed: bool, recovery_ms: u64,
        report: Value,
        #[serde(default)] source: String,
        #[serde(default)] rto_target_ms: u64,
        #[serde(default)] reason: String,
    }

    /// A backup set began (`backstop backup --set NAME`, on the stream `set-<id>`): one backup
    /// per component, each with its own manifest, which names the set (manifest extra `set`).
    SetStarted = "set.started" v 1 {
        set_id: Uuid, name: String, components: Vec<SetComponent>,
        #[serde(default)] tags: Vec<String>,
    }
    /// A backup set ended: the components that completed and those that failed (a failed one
    /// fails the set; the others' backups are kept and restorable).
    SetCompleted = "set.completed" v 1 {
        set_id: Uuid, name: String, completed: Vec<SetComponent>,
        failed: Vec<SetComponentFailed>,
    }

    /// A git source's sync ended with every ref equal on the source and the mirror (stream
    /// `git-<source>`): how many refs, the source's HEAD and the digest of its ref listing, and
    /// the refs pushed (at most 100 listed; `updated_total` counts them all). `forced` lists
    /// diverged refs overwritten because the source says `force = true`.
    GitMirrored = "git.mirrored" v 1 {
        sync_id: Uuid, source: String, mirror: String, refs: u64,
        head_ref: Option<String>, head: Option<String>, refs_sha3: String,
        updated: Vec<GitRefChange>, updated_total: u64,
        #[serde(default)] forced: Vec<GitRefDivergence>,
        duration_ms: u64,
    }
    /// A git source's sync found refs whose hashes differ on the mirror and left them (or they
    /// still differed after the push): the mirror was written to directly. The other refs were
    /// pushed as usual. Raises `git_mirror_diverged`.
    GitDiverged = "git.diverged" v 1 {
        sync_id: Uuid, source: String, mirror: String, refs: u64,
        head_ref: Option<String>, head: Option<String>, refs_sha3: String,
        updated: Vec<GitRefChange>, updated_total: u64,
        diverged: Vec<GitRefDivergence>,
        duration_ms: u64,
    }
    /// A git source's sync could not finish (the source or the mirror unreachable, a push
    /// refused); `transient` says whether the next poll may succeed. Raises `git_mirror_failed`.
    GitMirrorFailed = "git.mirror_failed" v 1 {
        sync_id: Uuid, source: String, mirror: String, reason: String, transient: bool,
    }

    /// An event exhausted its deliveries to a worker; it needs an operator.
    WorkerDeadLettered = "worker.dead_lettered" v 1 {
        consumer: String, event_id: Uuid, event_type: String, position: u64,
        deliveries: u32, error: String,
    }
    /// A consumer refused a message on the events stream before any handler saw it (it does not
    /// decode, its hash is not that of its content, it does not link to the previous event, or
    /// its position cannot be where it sits in the stream). Nothing acted on it.
    ConsumerRefused = "consumer.refused" v 1 {
        consumer: String, subject: String, stream_sequence: u64,
        /// What the message claims, when it decodes that far.
        #[serde(default)] position: Option<u64>,
        #[serde(default)] event_id: Option<Uuid>,
        #[serde(default)] event_type: Option<String>,
        reason: String,
    }
    /// A refused API request, with whoever made it.
    AccessDenied = "access.denied" v 1 {
        caller: String, role: Option<String>, method: String, path: String, reason: String,
        /// How many refusals of this caller the event stands for (the API aggregates a client's
        /// refusals into one event per window); 0 in events recorded before aggregation, which
        /// each stand for one refusal.
        #[serde(default)] count: u64,
        /// The length of the aggregation window, in seconds (0: a single refusal).
        #[serde(default)] window_seconds: u64,
    }
}

fn one() -> u32 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_variant_round_trips_through_its_type_name() {
        let e = Event::from(BackupFailed {
            backup_id: Uuid::nil(),
            source: "main".into(),
            reason: "disk full".into(),
            attempt: 2,
        });
        let back = Event::decode(e.type_name(), e.schema_version(), &e.payload()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn a_backup_slot_encodes_as_before_and_an_export_slot_names_its_tables() {
        let fired = |job| ScheduleFired {
            schedule: "s".into(),
            slot: DateTime::<Utc>::UNIX_EPOCH,
            source: "main".into(),
            kind: BackupKind::Full,
            physical: false,
            job,
        };
        // Claims recorded before export schedules existed decode as backups, and a backup's
        // claim is encoded exactly as they were: no `job` key.
        let backup = Event::ScheduleFired(fired(ScheduledJob::Backup)).payload();
        assert_eq!(
            backup,
            json!({"schedule": "s", "slot": "1970-01-01T00:00:00Z", "source": "main",
                   "kind": "full", "physical": false})
        );
        let back = Event::decode("schedule.fired", 1, &backup).unwrap();
        assert_eq!(back, Event::ScheduleFired(fired(ScheduledJob::Backup)));
        let export = Event::ScheduleFired(fired(ScheduledJob::Export {
            tables: vec!["public.orders".into()],
        }))
        .payload();
        assert_eq!(
            export["job"],
            json!({"export": {"tables": ["public.orders"]}})
        );
        let back = Event::decode("schedule.fired", 1, &export).unwrap();
        let Event::ScheduleFired(f) = back else {
            panic!("{back:?}")
        };
        assert!(!f.job.is_backup());
    }

    #[test]
    fn added_fields_default_when_reading_older_payloads() {
        // A payload written before `attempt` existed still decodes, with the default.
        let old = json!({"backup_id": Uuid::nil(), "source": "main", "reason": "x"});
        let Event::BackupFailed(p) = Event::decode("backup.failed", 1, &old).unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(p.attempt, 1);
    }

    #[test]
    fn version_1_backup_events_read_as_methods() {
        // Stored before `method` replaced the boolean `physical`: both shapes still decode.
        let requested = json!({"backup_id": Uuid::nil(), "source": "main", "kind": "full",
            "physical": true, "trigger": {"by": "manual"}});
        let Event::BackupRequested(r) = Event::decode("backup.requested", 1, &requested).unwrap()
        else {
            panic!("wrong variant")
        };
        assert_eq!(r.method, BackupMethod::Physical);
        let started = json!({"backup_id": Uuid::nil(), "source": "main", "kind": "full",
            "parent": null, "host": "db1"});
        let Event::BackupStarted(s) = Event::decode("backup.started", 1, &started).unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(s.method, BackupMethod::Logical);
        // The current version writes `method` and no `physical`.
        let payload = Event::BackupRequested(r).payload();
        assert_eq!(payload["method"], "physical");
        assert!(payload.get("physical").is_none());
    }

    #[test]
    fn lease_renewals_name_their_job_kind_in_words() {
        let e = Event::LeaseRenewed(LeaseRenewed {
            job: Uuid::nil(),
            what: LeasedJob::Recovery,
            until: DateTime::<Utc>::UNIX_EPOCH,
            host: "db1".into(),
            renewal: 3,
        });
        assert_eq!(e.type_name(), "lease.renewed");
        assert_eq!(e.payload()["what"], "recovery");
        assert_eq!(Event::decode("lease.renewed", 1, &e.payload()).unwrap(), e);
        // Host and renewal number default, so a minimal renewal still decodes.
        let minimal =
            json!({"job": Uuid::nil(), "what": "backup", "until": "2026-01-01T00:00:00Z"});
        let Event::LeaseRenewed(r) = Event::decode("lease.renewed", 1, &minimal).unwrap() else {
            panic!("wrong variant")
        };
        assert_eq!(
            (r.what, r.renewal, r.host.as_str()),
            (LeasedJob::Backup, 0, "")
        );
    }

    #[test]
    fn type_names_are_unique() {
        let mut names: Vec<_> = EVENT_TYPES.iter().map(|(n, _)| *n).collect();
        names.sort();
        let len = names.len();
        names.dedup();
        assert_eq!(names.len(), len);
    }
}
