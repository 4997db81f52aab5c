//! `wal-push %p`: archives one WAL file for PostgreSQL, and the other `.ready` files beside it.
//!
//! Invariants:
//! - The requested file is reported archived only once the store holds it with this file's
//!   checksum (stored now, or found there already). A different checksum is a refusal.
//! - Other files PostgreSQL has marked `.ready` are pushed in the same call, `parallel` at a time
//!   and at most `batch` of them, so a backlog drains at the store's speed rather than one
//!   process start per segment. Each one archived gets a marker in `<spool>/pushed/` holding its
//!   checksum, object key, scope and the file's stamp; PostgreSQL's later call for it then only
//!   compares ([`already_pushed`]), without opening the repository.
//! - The quick path trusts the stamp (size, device, inode, modification and change times to the
//!   nanosecond, as `stat` gives them) instead of reading the file again: a stamp is recorded
//!   only when the file's `stat` was the same before and after it was read for pushing, so the
//!   pushed bytes are the bytes of that stamp. Any write, truncation or rename into the name
//!   since changes the change time or the inode. PostgreSQL never writes a file once it is
//!   `.ready`, so the stamp only protects against someone else doing so. A marker without a stamp
//!   (written by an older build, or when the file moved while it was read) is checked by hashing
//!   the file; a marker whose stamp or checksum does not match is ignored (the slow path
//!   decides).
//! - A failure pushing an extra file never fails the call: PostgreSQL will ask for that file
//!   itself, and its own call reports the error.
//! - Markers of files no longer in `pg_wal` (PostgreSQL removed them after archiving) are deleted.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{
    WalError, WalFile, WalKind, WalStore, check_segment_header, sha3_hex_blocking, write_atomic,
};

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Files pushed at once (the requested one included). Default 4.
    pub parallel: usize,
    /// Other `.ready` files pushed per call, at most. Default 16.
    pub batch: usize,
    /// Spool directory; default `backstop/` beside the file (i.e. `pg_wal/backstop`).
    pub spool_dir: Option<PathBuf>,
    /// Refuse segments whose header names another cluster (the source's system identifier, as
    /// recorded by its base backups). `None`: no check.
    pub expected_system_identifier: Option<u64>,
    /// Which archive the markers speak for (e.g. the repository location and source name):
    /// a marker written for another scope is ignored, so pointing `archive_command` at another
    /// repository never trusts markers of the old one.
    pub marker_scope: String,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            parallel: 4,
            batch: 16,
            spool_dir: None,
            expected_system_identifier: None,
            marker_scope: String::new(),
        }
    }
}

/// One file known to be in the archive after a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedWal {
    pub name: String,
    pub kind: WalKind,
    pub timeline: u32,
    /// SHA3-256 of the file (lowercase hex).
    pub sha3: String,
    pub bytes: u64,
    /// The store's object key.
    pub object: String,
    /// True if this call stored it; false if it was archived already with the same checksum.
    pub newly_stored: bool,
}

/// What one `wal-push` call did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReport {
    /// The file PostgreSQL asked for.
    pub requested: ArchivedWal,
    /// True when a marker showed it archived by an earlier call (the store was not consulted).
    pub from_marker: bool,
    /// Other `.ready` files archived by this call.
    pub extra: Vec<ArchivedWal>,
    /// Other `.ready` files that could not be archived now, with the reason (PostgreSQL will
    /// ask for them again).
    pub extra_failed: Vec<(String, String)>,
    pub duration_ms: u64,
}

impl PushReport {
    /// Every file this call stored (not those found already archived).
    pub fn newly_stored(&self) -> impl Iterator<Item = &ArchivedWal> {
        std::iter::once(&self.requested)
            .chain(self.extra.iter())
            .filter(|a| a.newly_stored)
    }

    /// The files to announce with one `wal.archived` event each: those stored now, and the
    /// requested file when the store already had it (a call killed after storing it and before
    /// its event was appended). Derive each event's id from [`ArchivedWal::event_key`] so the
    /// ledger's idempotent append keeps one event per file. Empty on the marker path (the call
    /// that pushed the file ahead announced it).
    pub fn to_announce(&self) -> Vec<&ArchivedWal> {
        if self.from_marker {
            return Vec::new();
        }
        std::iter::once(&self.requested)
            .chain(self.extra.iter().filter(|a| a.newly_stored))
            .collect()
    }
}

impl ArchivedWal {
    /// A stable key for this file's `wal.archived` event: the same file with the same content
    /// always gives the same key.
    pub fn event_key(&self) -> String {
        format!("wal.archived/{}/{}", self.name, self.sha3)
    }
}

fn spool_of(path: &Path, opts: &PushOptions) -> PathBuf {
    match &opts.spool_dir {
        Some(d) => d.clone(),
        None => wal_dir_of(path).join("backstop"),
    }
}

/// The directory holding `path` (`pg_wal`), `.` for a bare file name.
pub(crate) fn wal_dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn parse_path(path: &Path) -> Result<WalFile, WalError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    WalFile::parse(&name).ok_or(WalError::NotWalName { name })
}

async fn read_file(path: &Path) -> Result<Bytes, WalError> {
    tokio::fs::read(path)
        .await
        .map(Bytes::from)
        .map_err(|source| WalError::ReadFile {
            path: path.display().to_string(),
            source,
        })
}

/// A marker: `<sha3>\n<object>\n<scope>\n<stamp>\n`, the stamp line empty or absent when none
/// was recorded.
struct Marker {
    sha3: String,
    object: String,
    scope: String,
    stamp: Option<String>,
}

async fn read_marker(path: &Path) -> Option<Marker> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    let mut lines = text.split('\n');
    let sha3 = lines.next()?.to_string();
    let object = lines.next()?.to_string();
    let scope = lines.next()?.to_string();
    let stamp = lines.next().filter(|l| !l.is_empty()).map(str::to_string);
    Some(Marker {
        sha3,
        object,
        scope,
        stamp,
    })
}

/// The stamp of a file (module docs): `<size> <dev> <ino> <mtime s>.<ns> <ctime s>.<ns>`.
fn stamp_of(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{} {} {} {}.{:09} {}.{:09}",
        meta.size(),
        meta.dev(),
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

async fn stamp_now(path: &Path) -> Option<String> {
    tokio::fs::metadata(path).await.ok().map(|m| stamp_of(&m))
}

/// The quick path for PostgreSQL's call on a file an earlier call already pushed: if a marker
/// says so and the local file still has the marked checksum, returns the report (and removes
/// the marker) without any store access. `None`: take the normal path ([`push`]).
pub async fn already_pushed(
    path: &Path,
    opts: &PushOptions,
) -> Result<Option<PushReport>, WalError> {
    let started = Instant::now();
    let file = parse_path(path)?;
    let marker = spool_of(path, opts).join("pushed").join(&file.name);
    let Some(marked) = read_marker(&marker).await else {
        return Ok(None);
    };
    if marked.scope != opts.marker_scope {
        return Ok(None);
    }
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|source| WalError::ReadFile {
            path: path.display().to_string(),
            source,
        })?;
    let (sha3, bytes) = match &marked.stamp {
        Some(stamp) if *stamp == stamp_of(&meta) => (marked.sha3, meta.len()),
        Some(_) => {
            tracing::warn!(file = %file.name, "the file changed since it was pushed ahead; pushing normally");
            return Ok(None);
        }
        None => {
            let data = read_file(path).await?;
            let bytes = data.len() as u64;
            let sha3 = sha3_hex_blocking(data).await;
            if sha3 != marked.sha3 {
                tracing::warn!(file = %file.name, "push marker does not match the file; pushing normally");
                return Ok(None);
            }
            (sha3, bytes)
        }
    };
    let object = marked.object;
    let _ = tokio::fs::remove_file(&marker).await;
    Ok(Some(PushReport {
        requested: ArchivedWal {
            name: file.name.clone(),
            kind: file.kind,
            timeline: file.timeline,
            sha3,
            bytes,
            object,
            newly_stored: false,
        },
        from_marker: true,
        extra: Vec::new(),
        extra_failed: Vec::new(),
        duration_ms: started.elapsed().as_millis() as u64,
    }))
}

/// Archives `path` (PostgreSQL's `%p`, relative to the data directory it runs us in), then other
/// `.ready` files beside it. Returns an error, for a non-zero exit, unless the requested file is
/// archived with this file's checksum.
pub async fn push(
    path: &Path,
    opts: &PushOptions,
    store: &dyn WalStore,
) -> Result<PushReport, WalError> {
    if let Some(done) = already_pushed(path, opts).await? {
        return Ok(done);
    }
    let started = Instant::now();
    let file = parse_path(path)?;
    let wal_dir = wal_dir_of(path);
    let spool = spool_of(path, opts).join("pushed");

    let extras = ready_files(&wal_dir, &file.name, &spool, opts.batch).await;
    let parallel = opts.parallel.max(1);
    let mut jobs = vec![(file.clone(), path.to_path_buf())];
    jobs.extend(extras.into_iter().map(|f| {
        let p = wal_dir.join(&f.name);
        (f, p)
    }));
    let results: Vec<(WalFile, Result<Pushed, WalError>)> =
        futures::stream::iter(jobs.into_iter().map(|(f, p)| async move {
            let r = push_one(&f, &p, opts, store).await;
            (f, r)
        }))
        .buffer_unordered(parallel)
        .collect()
        .await;

    let mut requested = None;
    let mut extra = Vec::new();
    let mut extra_failed = Vec::new();
    for (f, r) in results {
        if f.name == file.name {
            requested = Some(r.map(|(a, _)| a));
            continue;
        }
        match r {
            Ok((a, stamp)) => {
                if let Err(e) = write_marker(&spool, &a, stamp.as_deref(), &opts.marker_scope).await
                {
                    tracing::warn!(file = %a.name, error = %e, "could not write the push marker");
                }
                extra.push(a);
            }
            Err(e) => {
                tracing::warn!(file = %f.name, error = %e, "pushing a ready WAL file ahead failed");
                extra_failed.push((f.name, e.to_string()));
            }
        }
    }
    extra.sort_by(|a, b| a.name.cmp(&b.name));
    clean_markers(&spool, &wal_dir).await;
    let requested =
        requested.unwrap_or_else(|| Err(WalError::Task("push lost its file".into())))?;
    Ok(PushReport {
        requested,
        from_marker: false,
        extra,
        extra_failed,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// One pushed file and the stamp of its bytes for the marker: `None` when the file changed
/// while it was read, so only its checksum can vouch for it later.
type Pushed = (ArchivedWal, Option<String>);

/// Pushes one file; returns it with its stamp while it was read, when it held still (module
/// docs), for the marker.
async fn push_one(
    file: &WalFile,
    path: &Path,
    opts: &PushOptions,
    store: &dyn WalStore,
) -> Result<Pushed, WalError> {
    let before = stamp_now(path).await;
    let data = read_file(path).await?;
    let after = stamp_now(path).await;
    let stamp = before.filter(|b| after.as_ref() == Some(b));
    if matches!(file.kind, WalKind::Segment | WalKind::Partial) {
        let header = check_segment_header(file, &data).map_err(|why| WalError::BadSegment {
            name: file.name.clone(),
            why,
        })?;
        if let Some(expected) = opts.expected_system_identifier
            && header.system_identifier != expected
        {
            return Err(WalError::WrongCluster {
                name: file.name.clone(),
                found: header.system_identifier,
                expected,
            });
        }
    }
    let bytes = data.len() as u64;
    let sha3 = sha3_hex_blocking(data.clone()).await;
    let (object, newly_stored) = match store.head(&file.name).await? {
        Some(archived) if archived == sha3 => (store.object_key(file), false),
        Some(archived) => {
            return Err(WalError::Conflict {
                name: file.name.clone(),
                archived,
                local: sha3,
            });
        }
        None => (store.put_segment(file, data, &sha3).await?, true),
    };
    tracing::debug!(file = %file.name, newly_stored, "WAL file archived");
    let archived = ArchivedWal {
        name: file.name.clone(),
        kind: file.kind,
        timeline: file.timeline,
        sha3,
        bytes,
        object,
        newly_stored,
    };
    Ok((archived, stamp))
}

/// `.ready` files other than `requested` with no marker yet: history files first (PostgreSQL
/// archives them first too), then by name (oldest first), at most `batch`.
async fn ready_files(wal_dir: &Path, requested: &str, spool: &Path, batch: usize) -> Vec<WalFile> {
    if batch == 0 {
        return Vec::new();
    }
    let Ok(mut rd) = tokio::fs::read_dir(wal_dir.join("archive_status")).await else {
        return Vec::new();
    };
    let mut found = Vec::new();
    while let Ok(Some(e)) = rd.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(base) = name.strip_suffix(".ready") else {
            continue;
        };
        if base == requested {
            continue;
        }
        let Some(f) = WalFile::parse(base) else {
            continue;
        };
        if tokio::fs::try_exists(spool.join(base))
            .await
            .unwrap_or(false)
        {
            continue;
        }
        found.push(f);
    }
    found.sort_by(|a, b| {
        (a.kind != WalKind::History, &a.name).cmp(&(b.kind != WalKind::History, &b.name))
    });
    found.truncate(batch);
    found
}

async fn write_marker(
    spool: &Path,
    a: &ArchivedWal,
    stamp: Option<&str>,
    scope: &str,
) -> std::io::Result<()> {
    tokio::fs::create_dir_all(spool).await?;
    // The scope is one line: a newline in it would only make every marker miss.
    let scope = scope.replace('\n', " ");
    write_atomic(
        &spool.join(&a.name),
        format!(
            "{}\n{}\n{scope}\n{}\n",
            a.sha3,
            a.object,
            stamp.unwrap_or("")
        )
        .as_bytes(),
    )
    .await
}

/// Deletes markers of files that are gone from `pg_wal` (archived, then recycled), and stray
/// temporary files of killed calls.
async fn clean_markers(spool: &Path, wal_dir: &Path) {
    let Ok(mut rd) = tokio::fs::read_dir(spool).await else {
        return;
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = if name.starts_with('.') {
            // A temporary file: stale if its writer is gone. Ours are renamed within
            // milliseconds, so anything older than a minute is abandoned.
            e.metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 60)
        } else {
            !tokio::fs::try_exists(wal_dir.join(&name))
                .await
                .unwrap_or(true)
        };
        if stale {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
    }
}
