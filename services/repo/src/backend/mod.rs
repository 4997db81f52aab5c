//! Object storage backends: a local directory and S3 (or any S3-compatible store).
//!
//! A backend stores opaque objects under `/`-separated keys relative to the repository root
//! (`config`, `keys/database/database-v1-1a2b3c4d`, `chunks/ab/ab12...`, `manifests/<uuid>`).
//!
//! Invariants every backend keeps:
//! - `put` is atomic: a reader sees either no object or the whole object, never a prefix, even if
//!   the process is killed mid-write (the local backend writes a temporary file, fsyncs it and
//!   renames it; S3 objects appear only when the upload completes).
//! - `list` returns every object under the prefix (all pages), sorted by key, with its size.
//! - `delete` (and `delete_many`) of a missing object succeeds (deletes are idempotent); a
//!   backend that can tell that a refused delete is due to an object lock reports
//!   [`RepoError::Locked`].
//! - Keys are validated: no empty, `.` or `..` segment, no leading `/`, no NUL: a key can never
//!   escape the repository root.
//! - Object lock (S3 compliance mode, `S3Settings::object_lock`) is a property of the backend:
//!   [`Backend::object_lock`] says whether new objects are locked, and
//!   [`Backend::extend_lock`] keeps one locked longer. Backends without it (local, memory)
//!   answer [`RepoError::ObjectLockUnavailable`]; [`Location::open`] refuses to open one when
//!   object lock is asked for, so a repository never silently runs unprotected.

mod local;
mod memory;
mod s3;

use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

pub use local::LocalBackend;
pub use memory::MemoryBackend;
pub use s3::{S3Backend, S3Settings};

use crate::error::{RepoError, Result};

/// What [`Backend::extend_lock`] did to an object's retain-until date.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockExtension {
    /// The date was moved to the requested one; `previous` is what it was (`None`: the object
    /// had no retention, e.g. it was written before object lock was configured).
    Extended { previous: Option<DateTime<Utc>> },
    /// The object is already retained until this date, which is not earlier than the one
    /// requested: nothing was changed (compliance mode cannot be shortened anyway).
    AlreadyUntil(DateTime<Utc>),
}

/// An object's key (relative to the repository root) and size in bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
}

#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Stores `data` under `key`, replacing any existing object, atomically.
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;

    /// Stores `data` under `key` only if no object exists there. Returns `false` (and writes
    /// nothing) when one already exists. The default checks then writes, which is racy between
    /// two writers; backends that can do better (the local one) override it.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        if self.head(key).await?.is_some() {
            return Ok(false);
        }
        self.put(key, data).await?;
        Ok(true)
    }

    /// Reads a whole object. A missing object is [`RepoError::NotFound`].
    async fn get(&self, key: &str) -> Result<Bytes>;

    /// Reads `len` bytes from `offset` (fewer at the end of the object).
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        let all = self.get(key).await?;
        let start = (offset as usize).min(all.len());
        let end = start.saturating_add(len as usize).min(all.len());
        Ok(all.slice(start..end))
    }

    /// The object's size, or `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<u64>>;

    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Removes an object; succeeds when it is already gone.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Removes several objects, with one result per key, in order (garbage collection deletes
    /// in batches). The default deletes them one by one, a few at a time; backends that can
    /// batch (the local one fsyncs each directory once per batch) override it.
    async fn delete_many(&self, keys: &[String]) -> Vec<Result<()>> {
        let mut out = Vec::with_capacity(keys.len());
        for batch in keys.chunks(16) {
            let deletes: Vec<_> = batch.iter().map(|k| self.delete(k)).collect();
            out.extend(futures::future::join_all(deletes).await);
        }
        out
    }

    /// Where this backend stores objects, for messages (`/srv/backups`, `s3://bucket/prefix at
    /// http://host:3900`).
    fn describe(&self) -> String;

    /// The period every object this backend writes is locked for (S3 object lock, compliance
    /// mode), or `None` when it writes unlocked objects.
    fn object_lock(&self) -> Option<Duration> {
        None
    }

    /// Keeps the current version of `key` locked until at least `until`: extends its
    /// retain-until date when it is earlier (or absent), never shortens it. A missing object is
    /// [`RepoError::NotFound`]; a backend without object lock answers
    /// [`RepoError::ObjectLockUnavailable`].
    async fn extend_lock(&self, key: &str, until: DateTime<Utc>) -> Result<LockExtension> {
        let _ = (key, until);
        Err(RepoError::ObjectLockUnavailable {
            location: self.describe(),
            detail: "this backend has no object lock".into(),
        })
    }
}

/// Checks that a key is a safe relative path.
pub(crate) fn validate_key(key: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(RepoError::Usage(format!(
            "invalid object key {key:?}: {why}"
        )))
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.starts_with('/') {
        return bad("starts with /");
    }
    if key.contains('\0') || key.contains('\\') {
        return bad("contains NUL or backslash");
    }
    for seg in key.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad("empty, . or .. path segment");
        }
        if seg.starts_with(".tmp-") {
            return bad("reserved temporary-file name");
        }
    }
    Ok(())
}

/// Where a repository lives, as the operator writes it: `s3://bucket/prefix` or a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl Location {
    /// Parses `s3://bucket[/prefix]`, `file:///path` or a plain path.
    pub fn parse(s: &str) -> Result<Location> {
        let s = s.trim();
        if s.is_empty() {
            return Err(RepoError::Config(
                "empty repository location: give s3://BUCKET/PREFIX or a directory path".into(),
            ));
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = match rest.split_once('/') {
                Some((b, p)) => (b, p.trim_matches('/')),
                None => (rest, ""),
            };
            if bucket.is_empty() {
                return Err(RepoError::Config(format!(
                    "repository location {s:?} has no bucket: write s3://BUCKET/PREFIX"
                )));
            }
            if !prefix.is_empty() {
                validate_key(prefix).map_err(|_| {
                    RepoError::Config(format!(
                        "repository location {s:?}: the prefix {prefix:?} is not a valid key prefix"
                    ))
                })?;
            }
            return Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        if s.contains("://") && !s.starts_with("file://") {
            return Err(RepoError::Config(format!(
                "unsupported repository location {s:?}: use s3://BUCKET/PREFIX or a directory path"
            )));
        }
        let path = s.strip_prefix("file://").unwrap_or(s);
        Ok(Location::Local(PathBuf::from(path)))
    }

    /// Opens the backend for this location. `s3` supplies endpoint, region and credentials for
    /// S3 locations (its bucket and prefix are replaced by the location's); for local ones only
    /// its `object_lock` is looked at.
    ///
    /// With `object_lock` set, the S3 bucket's object-lock configuration is read first
    /// ([`S3Backend::check_object_lock`]), and a local location is refused: both fail with
    /// [`RepoError::ObjectLockUnavailable`] when the protection asked for cannot be given.
    pub async fn open(&self, s3: Option<S3Settings>) -> Result<Arc<dyn Backend>> {
        match self {
            Location::Local(path) => {
                if s3.as_ref().is_some_and(|s| s.object_lock.is_some()) {
                    return Err(RepoError::ObjectLockUnavailable {
                        location: path.display().to_string(),
                        detail: "a local directory cannot lock objects against deletion".into(),
                    });
                }
                Ok(Arc::new(LocalBackend::new(path)?))
            }
            Location::S3 { bucket, prefix } => {
                let mut settings = s3.unwrap_or_default();
                settings.bucket = bucket.clone();
                settings.prefix = prefix.clone();
                let backend = S3Backend::connect(settings).await?;
                if backend.object_lock().is_some() {
                    backend.check_object_lock().await?;
                }
                Ok(Arc::new(backend))
            }
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            Location::parse("s3://b/some/prefix/").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: "some/prefix".into()
            }
        );
        assert_eq!(
            Location::parse("s3://b").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            Location::parse("/srv/backups").unwrap(),
            Location::Local("/srv/backups".into())
        );
        assert_eq!(
            Location::parse("file:///srv/b").unwrap(),
            Location::Local("/srv/b".into())
        );
        assert!(Location::parse("s3:///x").is_err());
        assert!(Location::parse("gs://x").is_err());
        assert!(Location::parse("s3://b/../x").is_err());
    }

    #[test]
    fn rejects_escaping_keys() {
        for k in ["", "/abs", "a//b", "a/../b", "./a", "a/.tmp-1", "a\\b"] {
            assert!(validate_key(k).is_err(), "{k:?} accepted");
        }
        validate_key("chunks/ab/abcdef").unwrap();
    }
}
