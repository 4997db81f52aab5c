//! `wal-fetch %f %p`: hands PostgreSQL one archived WAL file during recovery, fetching the next
//! segments ahead in parallel.
//!
//! Invariants:
//! - The destination is written only with bytes whose SHA3-256 equals the checksum recorded at
//!   push time, and atomically (temporary file, fsync, rename).
//! - Outcomes and exit statuses: the file restored, 0; the file not archived and no later segment
//!   of its timeline archived either (the end of the archive), 1, quietly; anything that would
//!   make recovery stop early or read wrong data ([`WalError::Damaged`], [`WalError::Gap`], an
//!   unreadable archive), [`FETCH_FATAL_EXIT`], with the reason on stderr (the caller prints it)
//!   and in [`RECOVERY_FAILED_MARKER`] in the data directory. In standby mode (`standby.signal`),
//!   an unreadable archive is 1, because a standby retries.
//! - Except when recovery has an explicit target (`recovery_target*` set in the data directory's
//!   `postgresql.conf` or `postgresql.auto.conf`): then a damaged segment or a gap is reported
//!   ([`FetchOutcome::Unusable`], exit 1) as the end of the usable archive. PostgreSQL (13+)
//!   refuses to finish such a recovery short of its target ("recovery ended before configured
//!   recovery target was reached"), so nothing ends early silently; and a target before the
//!   damage stays reachable even though PostgreSQL's WAL read-ahead (`recovery_prefetch`) asks
//!   for segments beyond it. The reason is also appended to [`RECOVERY_WARNINGS`] in the data
//!   directory.
//! - Prefetch: on a segment not in the spool, the next `prefetch - 1` segments of the same
//!   timeline are fetched beside it, `parallel` at a time, checked, and kept in
//!   `<spool>/prefetch/` in the stored form; a later call serves from there after checking the
//!   checksum again, and tops the spool up when half of it is used. A damaged segment fetched
//!   ahead is not spooled, so the error surfaces when PostgreSQL asks for it, in order. Spooled
//!   segments at or before the one served are removed.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{
    FETCH_FATAL_EXIT, RECOVERY_FAILED_MARKER, RECOVERY_WARNINGS, StoredWal, WalError, WalFile,
    WalKind, WalStore, WalStoreError, decode_stored, encode_stored, segment_name, write_atomic,
};

/// How to fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Segments fetched per round trip, the requested one included (1: no prefetch). Default 8.
    pub prefetch: usize,
    /// Fetches at once. Default 4.
    pub parallel: usize,
    /// Spool directory; default `backstop/` beside the destination (i.e. `pg_wal/backstop`).
    pub spool_dir: Option<PathBuf>,
    /// The data directory (for the failure marker, standby and target detection); default: the
    /// current directory, which is where PostgreSQL runs `restore_command`.
    pub data_dir: Option<PathBuf>,
    /// Whether recovery has an explicit target (see the module docs); `None`: read it from the
    /// data directory's configuration files.
    pub recovery_has_target: Option<bool>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            prefetch: 8,
            parallel: 4,
            spool_dir: None,
            data_dir: None,
            recovery_has_target: None,
        }
    }
}

/// What `wal-fetch` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum FetchOutcome {
    /// The file was written to the destination.
    Restored {
        name: String,
        bytes: u64,
        sha3: String,
        /// Served from the prefetch spool.
        from_spool: bool,
        /// Segments fetched ahead into the spool by this call.
        prefetched: usize,
    },
    /// Not archived: the end of the archive (exit 1, quietly).
    Missing { name: String },
    /// Damaged, or missing in a gap, while recovery has an explicit target: reported as the end
    /// of the usable archive (exit 1); the caller prints `reason` on stderr.
    Unusable { name: String, reason: String },
}

impl FetchOutcome {
    /// The exit status `wal-fetch` must return.
    pub fn exit_code(&self) -> i32 {
        match self {
            FetchOutcome::Restored { .. } => 0,
            FetchOutcome::Missing { .. } | FetchOutcome::Unusable { .. } => 1,
        }
    }
}

/// A failed fetch, with the exit status that tells PostgreSQL what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct FetchError {
    #[source]
    pub error: WalError,
    /// [`FETCH_FATAL_EXIT`] (recovery aborts) or 1 (a standby retries).
    pub exit_code: i32,
}

fn data_dir_of(opts: &FetchOptions) -> PathBuf {
    opts.data_dir.clone().unwrap_or_else(|| PathBuf::from("."))
}

/// Records a failure that must abort recovery and decides the exit status: writes the reason
/// into the data directory's [`RECOVERY_FAILED_MARKER`] and returns [`FETCH_FATAL_EXIT`], or, in
/// standby mode for an archive that cannot be read (`retryable`), returns 1 without a marker.
/// The CLI calls this too when it cannot even open the repository.
pub fn fetch_failure(opts: &FetchOptions, message: &str, retryable: bool) -> i32 {
    let data_dir = data_dir_of(opts);
    if retryable && data_dir.join("standby.signal").exists() {
        return 1;
    }
    let text = format!(
        "{}\nwal-fetch aborted recovery: {message}\n",
        chrono::Utc::now().to_rfc3339()
    );
    if let Err(e) = std::fs::write(data_dir.join(RECOVERY_FAILED_MARKER), text) {
        tracing::warn!(error = %e, "could not write the recovery failure marker");
    }
    FETCH_FATAL_EXIT
}

/// Appends to the data directory's [`RECOVERY_WARNINGS`] (best effort).
fn note_warning(opts: &FetchOptions, reason: &str) {
    use std::io::Write;
    let path = data_dir_of(opts).join(RECOVERY_WARNINGS);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{} {reason}", chrono::Utc::now().to_rfc3339());
    }
}

/// Fetches `name` (`%f`) into `dest` (`%p`, relative to the data directory PostgreSQL runs us in).
pub async fn fetch(
    name: &str,
    dest: &Path,
    opts: &FetchOptions,
    store: &dyn WalStore,
) -> Result<FetchOutcome, FetchError> {
    match fetch_inner(name, dest, opts, store).await {
        Ok(o) => Ok(o),
        Err(error @ (WalError::Damaged(_) | WalError::Gap { .. }))
            if opts
                .recovery_has_target
                .unwrap_or_else(|| recovery_has_target(&data_dir_of(opts))) =>
        {
            let reason = format!(
                "{error}; treated as the end of the archive because recovery has a target: PostgreSQL stops with \"recovery ended before configured recovery target was reached\" if the target lies beyond it"
            );
            note_warning(opts, &reason);
            Ok(FetchOutcome::Unusable {
                name: name.to_string(),
                reason,
            })
        }
        Err(error) => {
            let retryable = matches!(error, WalError::Store(WalStoreError::Unavailable { .. }));
            let exit_code = fetch_failure(opts, &error.to_string(), retryable);
            Err(FetchError { error, exit_code })
        }
    }
}

/// True when the data directory's configuration sets a recovery target. Reads `postgresql.conf`
/// then `postgresql.auto.conf` (which PostgreSQL reads last), last assignment winning; `include`
/// directives are not followed.
pub fn recovery_has_target(data_dir: &Path) -> bool {
    const KEYS: [&str; 5] = [
        "recovery_target",
        "recovery_target_time",
        "recovery_target_lsn",
        "recovery_target_xid",
        "recovery_target_name",
    ];
    let mut values: std::collections::HashMap<String, String> = Default::default();
    for file in ["postgresql.conf", "postgresql.auto.conf"] {
        let Ok(text) = std::fs::read_to_string(data_dir.join(file)) else {
            continue;
        };
        for line in text.lines() {
            if let Some((k, v)) = conf_assignment(line)
                && KEYS.contains(&k.as_str())
            {
                values.insert(k, v);
            }
        }
    }
    values.values().any(|v| !v.is_empty())
}

/// `key = value` / `key value` from one configuration line (quotes and comments handled).
fn conf_assignment(line: &str) -> Option<(String, String)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line
        .find(|c: char| c == '=' || c.is_whitespace())
        .unwrap_or(line.len());
    let key = line[..end].to_ascii_lowercase();
    let rest = line[end..].trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
    let value = if let Some(q) = rest.strip_prefix('\'') {
        let mut out = String::new();
        let mut chars = q.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    out.push('\'');
                }
                '\'' => break,
                '\\' => {
                    if let Some(n) = chars.next() {
                        out.push(n);
                    }
                }
                c => out.push(c),
            }
        }
        out
    } else {
        rest.split(|c: char| c == '#' || c.is_whitespace())
            .next()
            .unwrap_or_default()
            .to_string()
    };
    Some((key, value))
}

fn spool_of(dest: &Path, opts: &FetchOptions) -> PathBuf {
    match &opts.spool_dir {
        Some(d) => d.join("prefetch"),
        None => super::push::wal_dir_of(dest)
            .join("backstop")
            .join("prefetch"),
    }
}

async fn fetch_inner(
    name: &str,
    dest: &Path,
    opts: &FetchOptions,
    store: &dyn WalStore,
) -> Result<FetchOutcome, WalError> {
    let file = WalFile::parse(name).ok_or_else(|| WalError::NotWalName {
        name: name.to_string(),
    })?;
    let spool = spool_of(dest, opts);
    if !file.is_segment() || opts.prefetch <= 1 {
        return match store.get_segment(name).await? {
            None => missing(&file, store).await,
            Some(stored) => {
                let sha3 = stored.verify(name).await?;
                write_dest(dest, &stored.data).await?;
                Ok(restored(&file, &stored, sha3, false, 0))
            }
        };
    }

    // Served from the spool?
    if let Some(stored) = read_spool(&spool, &file).await {
        match stored.verify(name).await {
            Ok(sha3) => {
                write_dest(dest, &stored.data).await?;
                let segment_size = stored.data.len() as u64;
                clean_spool(&spool, &file, segment_size).await;
                let prefetched = top_up(&spool, &file, segment_size, opts, store).await;
                return Ok(restored(&file, &stored, sha3, true, prefetched));
            }
            Err(e) => {
                // A local copy went bad; the archive decides.
                tracing::warn!(error = %e, "spooled WAL segment is damaged; fetching it again");
                let _ = tokio::fs::remove_file(spool.join(&file.name)).await;
            }
        }
    }

    let Some(stored) = store.get_segment(name).await? else {
        return missing(&file, store).await;
    };
    let sha3 = stored.verify(name).await?;
    write_dest(dest, &stored.data).await?;
    let segment_size = stored.data.len() as u64;
    clean_spool(&spool, &file, segment_size).await;
    let prefetched = prefetch(&spool, &file, segment_size, opts, store, &[]).await;
    Ok(restored(&file, &stored, sha3, false, prefetched))
}

fn restored(
    file: &WalFile,
    stored: &StoredWal,
    sha3: String,
    from_spool: bool,
    prefetched: usize,
) -> FetchOutcome {
    FetchOutcome::Restored {
        name: file.name.clone(),
        bytes: stored.data.len() as u64,
        sha3,
        from_spool,
        prefetched,
    }
}

/// The file is not archived: the end of the archive, or a gap if later segments exist.
async fn missing(file: &WalFile, store: &dyn WalStore) -> Result<FetchOutcome, WalError> {
    if file.kind == WalKind::Segment && store.has_later_segment(file).await? {
        return Err(WalError::Gap {
            name: file.name.clone(),
            timeline: file.timeline,
        });
    }
    Ok(FetchOutcome::Missing {
        name: file.name.clone(),
    })
}

async fn write_dest(dest: &Path, data: &[u8]) -> Result<(), WalError> {
    write_atomic(dest, data)
        .await
        .map_err(|e| WalError::io(format!("writing {}", dest.display()), e))
}

async fn read_spool(spool: &Path, file: &WalFile) -> Option<StoredWal> {
    let bytes = tokio::fs::read(spool.join(&file.name)).await.ok()?;
    decode_stored(&file.name, Bytes::from(bytes)).ok()
}

/// The names of the `count` segments after `file` on its timeline.
fn next_names(file: &WalFile, segment_size: u64, count: usize) -> Vec<String> {
    let segno = file.segno(segment_size);
    (1..=count as u64)
        .map(|i| segment_name(file.timeline, segno + i, segment_size))
        .collect()
}

/// Fetches the segments after `file` (up to `prefetch - 1`, skipping `have`) into the spool.
/// Returns how many were spooled. Failures only cost the prefetch, never the call.
async fn prefetch(
    spool: &Path,
    file: &WalFile,
    segment_size: u64,
    opts: &FetchOptions,
    store: &dyn WalStore,
    have: &[String],
) -> usize {
    let wanted: Vec<String> = next_names(file, segment_size, opts.prefetch.saturating_sub(1))
        .into_iter()
        .filter(|n| !have.contains(n))
        .collect();
    if wanted.is_empty() {
        return 0;
    }
    if let Err(e) = tokio::fs::create_dir_all(spool).await {
        tracing::warn!(error = %e, "cannot create the WAL prefetch spool");
        return 0;
    }
    let results: Vec<bool> = futures::stream::iter(wanted.into_iter().map(|n| async move {
        let stored = match store.get_segment(&n).await {
            Ok(Some(s)) => s,
            Ok(None) => return false,
            Err(e) => {
                tracing::debug!(segment = %n, error = %e, "prefetch failed");
                return false;
            }
        };
        let Ok(sha3) = stored.verify(&n).await else {
            // Left for PostgreSQL's own request, which will fail loudly and in order.
            return false;
        };
        write_atomic(&spool.join(&n), &encode_stored(&sha3, &stored.data))
            .await
            .is_ok()
    }))
    .buffer_unordered(opts.parallel.max(1))
    .collect()
    .await;
    results.into_iter().filter(|ok| *ok).count()
}

/// After serving from the spool: prefetch more when at most half of the window is spooled.
async fn top_up(
    spool: &Path,
    file: &WalFile,
    segment_size: u64,
    opts: &FetchOptions,
    store: &dyn WalStore,
) -> usize {
    let window = next_names(file, segment_size, opts.prefetch.saturating_sub(1));
    let mut have = Vec::new();
    for n in &window {
        if tokio::fs::try_exists(spool.join(n)).await.unwrap_or(false) {
            have.push(n.clone());
        }
    }
    if have.len() * 2 > window.len() {
        return 0;
    }
    prefetch(spool, file, segment_size, opts, store, &have).await
}

/// Removes spooled segments at or before `served` (any timeline) and stray temporary files.
async fn clean_spool(spool: &Path, served: &WalFile, segment_size: u64) {
    let Ok(mut rd) = tokio::fs::read_dir(spool).await else {
        return;
    };
    let served_segno = served.segno(segment_size);
    while let Ok(Some(e)) = rd.next_entry().await {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = match WalFile::parse(&name) {
            Some(f) => f.segno(segment_size) <= served_segno,
            None => name.starts_with('.'),
        };
        if old {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_targets_are_read_from_the_configuration() {
        let d = tempfile::tempdir().unwrap();
        assert!(!recovery_has_target(d.path()));
        std::fs::write(
            d.path().join("postgresql.conf"),
            "# recovery_target_time = '2026-01-01'\nrecovery_target_time = ''  # none\n",
        )
        .unwrap();
        assert!(!recovery_has_target(d.path()));
        std::fs::write(
            d.path().join("postgresql.auto.conf"),
            "restore_command = 'x %f %p'\nrecovery_target_lsn = '0/3000000'\n",
        )
        .unwrap();
        assert!(recovery_has_target(d.path()));
        std::fs::write(
            d.path().join("postgresql.auto.conf"),
            "recovery_target = 'immediate'\nrecovery_target='' \n",
        )
        .unwrap();
        assert!(!recovery_has_target(d.path()));
        assert_eq!(
            conf_assignment("recovery_target_name 'it''s'"),
            Some(("recovery_target_name".into(), "it's".into()))
        );
    }
}
