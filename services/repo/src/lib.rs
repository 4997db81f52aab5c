//! The Backstop repository: everything a restore needs lives in the bucket (or directory),
//! readable with nothing but the master key.
//!
//! - [`backend`]: object storage (local directory, S3-compatible), atomic puts, retries.
//! - [`keys`]: the master key, per-purpose data keys wrapped by it, key-access reporting.
//! - [`config`]: the self-describing, MACed repository config.
//! - [`chunk`]: content-defined chunking (fastcdc v2020) and keyed SHA3-256 chunk ids.
//! - [`seal`]: the sealed-object envelope (brotli, then AES-256-SIV with bound AD).
//! - [`manifest`]: what a backup contains.
//! - [`writer`]: the streaming, deduplicating, parallel backup writer.
//! - [`reader`]: manifests, restore streams, dry runs.
//! - [`check`]: consistency and data checks.
//! - [`gc`]: garbage collection (`prune`): mark, then sweep after a grace period.
//! - [`reencrypt`]: re-sealing every backup with the newest key versions (resumable), and the
//!   retirement of versions nothing is sealed with.
//! - [`purpose_key`]: one purpose's keys exported to a file (`backstop key export`), and the
//!   repository handle a host opens with it (WAL only; it cannot open backups).
//! - [`lock`]: S3 object lock maintenance (`extend_locks`) for what the repository still needs.
//! - [`bench`]: a micro-benchmark of the data path; [`gc_bench`]: the prune benchmark.
//!
//! The format is documented in `docs/FORMAT.md` ("Repository"). This crate does not depend on
//! the ledger: it reports key accesses to a [`KeyAccessObserver`] and returns figures; the caller
//! records the events.

pub mod backend;
pub mod bench;
pub mod check;
pub mod chunk;
pub mod config;
mod cpu;
pub mod error;
pub mod gc;
pub mod gc_bench;
pub mod keys;
pub mod lock;
pub mod manifest;
pub mod purpose_key;
pub mod reader;
pub mod reencrypt;
mod repository;
pub mod seal;
pub mod writer;

pub use backend::{
    Backend, LocalBackend, Location, LockExtension, MemoryBackend, ObjectMeta, S3Backend,
    S3Settings,
};
pub use bench::{PipelineFigures, bench_pipeline, bench_pipeline_with};
pub use check::{CheckOptions, CheckReport, Problem, ProblemKind};
pub use chunk::{ChunkId, Chunker, Hash32};
pub use config::{ChunkerParams, CompressionParams, RepoConfig, RepoParams};
pub use error::{RepoError, Result};
pub use gc::{PruneOptions, PruneReport};
pub use gc_bench::{PruneBenchFigures, bench_prune};
pub use keys::{
    DataKey, KeyAccess, KeyAccessLog, KeyAccessObserver, KeyInfo, KeyPurpose, MASTER_KEY_ENV,
    MasterKey,
};
pub use lock::{KeptBackups, LockReport, LockTargets};
pub use manifest::{ChunkRef, Manifest, ManifestRevision, StreamManifest, Totals, manifest_key};
pub use purpose_key::{PurposeKeyFile, PurposeRepository};
pub use reader::{DryRunReport, ListedBackup, MissingObject, ReadOptions, RestoreStream};
pub use reencrypt::{
    KeyState, ReencryptOptions, ReencryptReport, ReencryptStep, ReencryptionState, RetireOptions,
    RetireReport,
};
pub use repository::{KeyRotation, Repository, SealedBlob, StoredObject, store_sealed};
pub use writer::{BackupMeta, BackupResult, BackupWriter, Progress, StreamSummary, WriterOptions};

/// Timestamps are kept to whole microseconds, as in the ledger's events.
pub(crate) fn now() -> chrono::DateTime<chrono::Utc> {
    backstop_events::now_micros()
}
