//! Retention: which backups and which WAL a policy keeps, and why.
//!
//! - [`policy`]: `[[retention]]` entries ([`PolicyEntry`]) per source and class (backups,
//!   exports, configuration), resolved into a [`Policy`] with the seeds' defaults.
//! - [`decide()`]: keep or remove per backup ([`Decision`]), restic's `forget` semantics for
//!   periods, with the guard rails (newest verified, parents of kept backups, nothing while the
//!   newest verification failed). Pure: a dry run and a real run compute the same decisions.
//! - [`wal`]: the WAL window ([`wal_plan`]): the oldest segment to keep per timeline.
//!
//! Nothing here deletes: callers record each decision (`retention.decided`, with
//! [`Policy::name`] as the policy and [`Decision::reason`] as the reason) and delete what is
//! removed (`backup.deleted`).

pub mod decide;
pub mod policy;
pub mod wal;

pub use decide::{Candidate, Decision, Reason, Verification, decide};
pub use policy::{Class, DEFAULT_WAL_WINDOW, PRE_DEPLOY_TAG, Policy, PolicyEntry, RetentionConfig};
pub use wal::{BaseBackup, WalPlan, wal_plan};

use uuid::Uuid;

/// Why a retention configuration or input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    #[error(
        "unknown time zone {zone:?} in [[retention]]; use an IANA zone name such as America/New_York or UTC"
    )]
    UnknownZone { zone: String },
    #[error("retention configuration: {why}")]
    Config { why: String },
    #[error(
        "base backup {backup} names WAL segment {name:?}, which is not a segment name (24 upper-case hex digits, timeline first); the catalog entry is damaged"
    )]
    BadSegment { backup: Uuid, name: String },
}
