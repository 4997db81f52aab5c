//! backstop-ops: the typed use cases of Backstop.
//!
//! Every capability an operator can ask for (a backup, a restore, a verification, a schedule's
//! firing, a retention decision) is one function here, called alike by the CLI (in the
//! foreground), the workers (when an event asks for it) and the API. The crate sits between the
//! data path (`backstop-repo`, `backstop-sources`) and the thin handlers of `backstop-workers`:
//!
//! ```text
//! events -> ledger -> (NATS) -> workers (thin handlers) -> ops (use cases) -> repo, sources
//!                                 cli, api ---------------^
//! ```
//!
//! Failures come back typed ([`error::OpsError`]): a caller decides retries and alerts by variant
//! (`is_transient()`, `is_data()`), never by the text of a message.
//!
//! Modules, one use case (or one shared concern) each:
//! - [`error`]: the failure policy ([`error::FailureClass`]) and the one error type;
//! - [`context`]: what every use case needs ([`DataPath`]: repository, appender, sources);
//! - [`record`]: appending a use case's events with ids derived from what they are about;
//! - [`export`]: table exports (JSON Lines from one snapshot, sealed with the `export` key);
//! - [`parts`]: the sources' parts to and from the repository;
//! - [`catalog`]: the backups a repository holds, their methods, parents, and `latest`;
//! - [`backup`], [`restore`], [`verify`]: the data path's use cases, logical and physical;
//! - [`wal`]: the WAL archive's layout, its store, and `wal.archived` events;
//! - [`wal_replicas`]: WAL pushed to every repository, and fetched from a replica when the
//!   primary is unreachable;
//! - [`lease`]: running jobs' leases, and the monitor that records abandoned ones;
//! - [`notify`]: email and webhook notifications of alerts, recoveries, successes and reports;
//! - [`keys`]: every data-key unwrap recorded as `key.accessed`;
//! - [`ledger_mirror`]: the ledger mirrored into the repository as sealed segments, and rebuilt
//!   from them (`ledger restore`);
//! - [`replicate`]: replicas (copies of the repository elsewhere), their comparison and lag;
//! - [`copy`]: offline copies (a repository of their own, for media taken offline), and their
//!   check against the copy's description;
//! - [`rotation`]: key rotation (every 90 days by default), re-encryption and retirement;
//! - [`schedule`], [`retention`]: when backups run, and which are kept;
//! - [`forget`]: retention carried out (decisions recorded, backups deleted) and the prune;
//! - [`throttle`]: the trading-hours bandwidth cap on a backup's reads;
//! - [`alerting`]: the alert rules and the monitor that raises and resolves alerts;
//! - [`report`]: the weekly summary;
//! - [`archiver`]: each source's `pg_stat_archiver`, probed for the WAL alert;
//! - [`git`]: git sources mirrored to a second remote, hashes compared, bundles backed up;
//! - [`drill`]: DR drills (a restore to staging, timed, checked and reported).
//! - [`drill_request`]: the drills serve's `[[drills]]` schedules request, run once per slot.

pub mod alerting;
pub mod archiver;
pub mod backup;
pub mod catalog;
pub mod config_backup;
pub mod context;
pub mod copy;
pub mod cost;
pub mod drill;
pub mod drill_request;
pub mod error;
pub mod export;
pub mod export_lifecycle;
pub mod files;
pub mod forget;
pub mod git;
pub mod health;
pub mod keys;
pub mod lease;
pub mod ledger_mirror;
pub mod notify;
pub mod parts;
pub mod record;
pub mod replicate;
pub mod report;
pub mod restore;
pub mod retention;
pub mod rotation;
pub mod schedule;
pub mod sets;
pub mod storage_probe;
pub mod throttle;
pub mod verify;
pub mod wal;
pub mod wal_replicas;
pub mod webhook;

pub use context::{DataPath, PostgresSource, SourceKind, SourceSpec};
pub use error::{FailureClass, OpsError};
