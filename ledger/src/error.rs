//! The ledger's error policy.
//!
//! - [`LedgerError::Conflict`] is an expected outcome of optimistic concurrency, not a failure:
//!   the caller re-reads the stream and decides again.
//! - [`LedgerError::Invalid`] means the event itself is wrong (unknown type, bad payload, too
//!   large); retrying cannot help, and nothing was written.
//! - [`LedgerError::Corrupt`], [`LedgerError::Damaged`] and [`LedgerError::NotALedger`] are
//!   about the data on disk; they name the position or the path and never lead to a write.
//! - Storage and NATS errors carry what to check. An append that returns any error wrote nothing
//!   (appends are atomic), so retrying with the same event ids is always safe.
//! - [`LedgerError::IdReused`] means the id is taken by an event with other content: permanent.
//! - [`LedgerError::Failed`] means the writer stopped after a storage error: permanent until the
//!   process restarts (a retry in this process could be acknowledged from memory that never
//!   reached the disk).

use std::path::PathBuf;

use backstop_events::EventError;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "version conflict on stream `{stream}`: expected {expected}, but the stream is at version {actual}; re-read the stream and decide again"
    )]
    Conflict {
        stream: String,
        expected: String,
        actual: u64,
    },
    #[error("event {id} was already appended with different content or to another stream")]
    IdReused { id: uuid::Uuid },
    #[error("invalid event: {0}")]
    Invalid(#[from] EventError),
    #[error("an append must carry between 1 and {max} events, got {got}")]
    BadBatch { got: usize, max: usize },
    #[error("ledger corrupt at position {position}: {what}")]
    Corrupt { position: u64, what: String },
    #[error(
        "{path} is not a Backstop ledger: {why}. Point --data-dir at an existing ledger or an empty directory"
    )]
    NotALedger { path: PathBuf, why: String },
    /// sled found its own files damaged. A process killed mid-write is not this: sled replays
    /// its log, and an unfinished snapshot is removed before it opens (`store`).
    #[error(
        "the ledger at {path} is damaged ({why}): move that directory aside and rebuild the ledger from the repository with `backstop ledger restore` (docs/RUNBOOK.md, \"The ledger's machine is lost, or its files are damaged\")"
    )]
    Damaged { path: PathBuf, why: String },
    #[error(
        "the ledger at {path} is in use by another process (a running `backstop serve`?); stop it, or read through its API"
    )]
    Locked { path: PathBuf },
    #[error(
        "ledger storage error: {0} (check free disk space and permissions of the data directory)"
    )]
    Storage(#[from] sled::Error),
    #[error("the ledger writer has stopped; the process is shutting down")]
    Closed,
    /// The writer met a storage error (a failed flush or transaction) and accepts nothing more:
    /// what it holds in memory may differ from what is on disk, so only a restart, which reopens
    /// the ledger from disk, makes appends safe again. Permanent for this process.
    #[error(
        "the ledger refuses appends since a storage error ({reason}): what is in memory may not be on disk, so nothing more is written until `backstop serve` is restarted (check free disk space and the data directory first); appends that were not acknowledged must be sent again after the restart"
    )]
    Failed { reason: String },
    #[error("signing key {path}: {why}")]
    SigningKey { path: PathBuf, why: String },
    /// An append identity or its grants, as configured, are not usable (see
    /// [`crate::identity`]): a configuration error, permanent.
    #[error("append identity: {0}")]
    BadIdentity(String),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("remote ledger: {0}")]
    Remote(String),
    /// The ledger (over NATS or the control socket) answered and refused the request: it is
    /// malformed, invalid, reuses an id, or comes from an identity that may not append. Sending
    /// it again cannot help; nothing was written.
    #[error("the ledger refused the append ({kind}): {message}")]
    Refused { kind: String, message: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LedgerError {
    /// Whether the ledger already holds one of the appended ids with other content: locally
    /// [`LedgerError::IdReused`], through NATS or the control socket the refusal `id_reused`.
    pub fn is_id_reused(&self) -> bool {
        match self {
            LedgerError::IdReused { .. } => true,
            LedgerError::Refused { kind, .. } => kind == "id_reused",
            _ => false,
        }
    }

    /// Whether the same append may succeed if retried later (the events are valid and the
    /// failure was about the environment).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            LedgerError::Storage(_) | LedgerError::Nats(_) | LedgerError::Remote(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_reused_is_recognised_locally_and_as_a_remote_refusal() {
        assert!(
            LedgerError::IdReused {
                id: uuid::Uuid::nil()
            }
            .is_id_reused()
        );
        let remote = LedgerError::Refused {
            kind: "id_reused".into(),
            message: "event 0 was already appended with different content".into(),
        };
        assert!(remote.is_id_reused());
        let other = LedgerError::Refused {
            kind: "denied".into(),
            message: "no".into(),
        };
        assert!(!other.is_id_reused());
        assert!(!LedgerError::Remote("down".into()).is_id_reused());
    }
}
