//! The one error type of the repository crate.
//!
//! Every variant says what is wrong and what to do about it, and names the object (and, where it
//! is known, the backup) concerned, so that a message shown to an operator is actionable without
//! a debugger. Callers that need to branch (a worker deciding whether to retry, a test checking
//! that a wrong key was detected) match on the variant.
//!
//! Errors that cross an [`std::io::Error`] boundary (the `AsyncRead` returned by
//! `Repository::open_stream`) are wrapped with [`std::io::Error::other`]; [`RepoError::from_io`]
//! recovers them.

use uuid::Uuid;

pub type Result<T, E = RepoError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The object does not exist.
    #[error("object {key} not found in {location}{}", backup_suffix(.backup))]
    NotFound {
        key: String,
        location: String,
        backup: Option<Uuid>,
    },

    /// The storage could not be reached, or kept failing, after every retry.
    #[error("storage unreachable: {what}: {detail}; check {check}")]
    Unreachable {
        what: String,
        detail: String,
        check: String,
    },

    /// The storage answered, but refused the request in a way retrying will not fix
    /// (access denied, no such bucket, invalid request).
    #[error("storage refused {what}: {detail}; check {check}")]
    Refused {
        what: String,
        detail: String,
        check: String,
    },

    /// The store refused to delete an object because it is locked (S3 object lock: a retention
    /// date not reached yet, or a legal hold). Retrying now fails the same way, so it is not
    /// transient; garbage collection keeps the object listed and tries again on a later run.
    #[error(
        "object {key} in {location} is locked and cannot be deleted yet ({detail}); it stays listed for garbage collection and is retried after its retention date"
    )]
    Locked {
        key: String,
        location: String,
        detail: String,
    },

    /// Object lock was asked for (`[repository] object_lock`) where there is none: a local
    /// directory, a store without the S3 object-lock API (Garage), or a bucket created without
    /// object lock. Nothing was written.
    #[error(
        "object lock is unavailable at {location}: {detail}; use an S3 bucket created with object lock enabled (`aws s3api create-bucket --object-lock-enabled-for-bucket ...`), or remove `object_lock` from the [repository] section"
    )]
    ObjectLockUnavailable { location: String, detail: String },

    /// An object's SHA3-256 does not match the one recorded for it.
    #[error(
        "corrupt object {key}{}: expected SHA3-256 {expected}, found {actual}; the stored copy is damaged, restore it from a replica or take a new backup",
        backup_suffix(.backup)
    )]
    Corrupt {
        key: String,
        expected: String,
        actual: String,
        backup: Option<Uuid>,
    },

    /// An object failed to authenticate, decompress or decode: it was modified, truncated, or
    /// sealed for another repository or path.
    #[error("damaged object {key}{}: {detail}", backup_suffix(.backup))]
    Damaged {
        key: String,
        detail: String,
        backup: Option<Uuid>,
    },

    /// The master key does not open this repository.
    #[error(
        "wrong master key: {detail}; set BACKSTOP_MASTER_KEY (or --master-key-file) to the key used at `backstop init`"
    )]
    WrongKey { detail: String },

    /// A repository object is not in a format this build understands.
    #[error("invalid repository format in {key}: {detail}")]
    Format { key: String, detail: String },

    /// `init` found something already there.
    #[error(
        "a repository already exists at {location} ({detail}); open it instead, or choose an empty location"
    )]
    AlreadyExists { location: String, detail: String },

    /// `open` found no repository.
    #[error("no repository at {location}: run `backstop init --repo {location}` first")]
    NoRepository { location: String },

    /// A data key (purpose or id) is not in the repository.
    #[error("no data key {what} in the repository; {hint}")]
    NoKey { what: String, hint: String },

    /// A purpose-key file (`backstop key export`) was asked to open an object sealed with a key
    /// it does not hold: another purpose's (a backup's chunks or manifest), or a version of its
    /// own purpose made after the file was exported.
    #[error(
        "object {key} is sealed with key {key_id}, and this key file holds only the {purpose} key ({held}): {hint}"
    )]
    KeyNotHeld {
        key: String,
        key_id: String,
        purpose: crate::keys::KeyPurpose,
        held: String,
        hint: String,
    },

    /// A purpose-key file that is damaged, was modified, or belongs to another repository.
    #[error("key file {path}: {detail}")]
    KeyFile { path: String, detail: String },

    /// Bad parameters or settings supplied by the caller.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// Misuse of the writer or reader API (duplicate stream name, unknown stream...).
    #[error("{0}")]
    Usage(String),

    /// A local I/O failure (local backend, reading a source stream, key file).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn backup_suffix(backup: &Option<Uuid>) -> String {
    match backup {
        Some(b) => format!(" (backup {b})"),
        None => String::new(),
    }
}

impl RepoError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RepoError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn format(key: impl Into<String>, detail: impl Into<String>) -> Self {
        RepoError::Format {
            key: key.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn damaged(key: impl Into<String>, detail: impl Into<String>) -> Self {
        RepoError::Damaged {
            key: key.into(),
            detail: detail.into(),
            backup: None,
        }
    }

    /// Attaches the backup concerned to errors that name an object.
    pub fn in_backup(mut self, id: Uuid) -> Self {
        match &mut self {
            RepoError::NotFound { backup, .. }
            | RepoError::Corrupt { backup, .. }
            | RepoError::Damaged { backup, .. }
                if backup.is_none() =>
            {
                *backup = Some(id);
            }
            _ => {}
        }
        self
    }

    /// True when retrying later may succeed (the store was unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, RepoError::Unreachable { .. })
    }

    /// True when the error means stored data is damaged or missing (an integrity failure, as
    /// opposed to an operational one).
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            RepoError::Corrupt { .. } | RepoError::Damaged { .. } | RepoError::NotFound { .. }
        )
    }

    /// The object key this error names, if any.
    pub fn object_key(&self) -> Option<&str> {
        match self {
            RepoError::NotFound { key, .. }
            | RepoError::Corrupt { key, .. }
            | RepoError::Damaged { key, .. }
            | RepoError::Locked { key, .. }
            | RepoError::KeyNotHeld { key, .. }
            | RepoError::Format { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Recovers a `RepoError` carried inside an `io::Error` (from a restore stream).
    pub fn from_io(err: &std::io::Error) -> Option<&RepoError> {
        err.get_ref().and_then(|e| e.downcast_ref::<RepoError>())
    }

    /// Converts into an `io::Error` that keeps this error recoverable with [`RepoError::from_io`].
    pub fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }
}
