//! The ledger survives its machine: committed events are mirrored into the repository as sealed
//! segments, and `backstop ledger restore` rebuilds the ledger from them alone.
//!
//! # Segments (`docs/FORMAT.md`, "Ledger segments")
//!
//! A segment is a blob (kind 3) sealed with the `ledger` data key at
//! `ledger/<first position, 20 digits>-<last position, 20 digits>`, so listing `ledger/` in name
//! order is position order. Its plaintext is JSON lines: first a [`SegmentHeader`], then each
//! envelope from `first` to `last`, one per line, exactly as the ledger stores it. The header
//! carries the hash before `first` and the hash of `last` (so segments chain to each other), the
//! signed checkpoints whose positions fall in the segment, and the ledger's signature over
//! [`segment_statement`], so that a segment's tail is signed even where no checkpoint falls.
//!
//! # Invariants
//!
//! - Segments are write-once and gapless: each starts at the mirror cursor (`meta/mirror` in
//!   sled), which moves past a segment only after `put_blob` has read it back and the cursor is
//!   flushed. A crash between the upload and the cursor leaves a segment that starts at the
//!   cursor; the first round after a start (or after a failed round) finds it by listing
//!   `ledger/<cursor>-`, checks it and moves the cursor past it instead of writing a second,
//!   overlapping one.
//! - A segment holds only flushed (acknowledged) events: it is cut at the ledger's committed
//!   head.
//! - Restore checks, before anything is marked restored: segment names are gapless from 1; each
//!   opens with this repository's keys (so one copied from another bucket is refused); its
//!   header names this repository and its own range; its envelopes chain (`prev_hash`), hash
//!   right and follow on from the previous segment; every checkpoint and segment signature
//!   holds for the expected key (the pinned `[ledger] public_key`, else the key the first
//!   segment names, reported as unpinned). It builds the new ledger in a temporary directory
//!   beside the target and renames it into place only when every segment passed.
//!
//! The mirror's key accesses are recorded as `key.accessed` like every unwrap: the handle it is
//! given reports them (one per key version per handle, see `Repository::with_access`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use backstop_events::{Digest, Envelope};
use backstop_ledger::checkpoint::{Checkpoint, verify_checkpoint, verify_statement};
use backstop_ledger::import::Importer;
use backstop_ledger::{Ledger, LedgerError};
use backstop_repo::{KeyPurpose, RepoError, Repository};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where segments live in the repository.
pub const PREFIX: &str = "ledger/";
/// The header's `format`.
pub const FORMAT: &str = "backstop-ledger-segment/1";
/// Most events in one segment (a long backlog is cut into several).
pub const MAX_SEGMENT_EVENTS: usize = 10_000;
/// How often `serve` mirrors by default (`[ledger] mirror_seconds`).
pub const DEFAULT_EVERY: Duration = Duration::from_secs(5);
/// Segments downloaded at once by a restore.
const RESTORE_CONCURRENCY: usize = 8;

/// `ledger/<first>-<last>`, both 20 digits.
pub fn segment_path(first: u64, last: u64) -> String {
    format!("{PREFIX}{first:020}-{last:020}")
}

/// The range a segment's object name says it holds.
pub fn parse_segment_path(key: &str) -> Option<(u64, u64)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (a, b) = rest.split_once('-')?;
    if a.len() != 20 || b.len() != 20 {
        return None;
    }
    let (first, last) = (a.parse().ok()?, b.parse().ok()?);
    (first >= 1 && last >= first).then_some((first, last))
}

/// The first line of a segment (module docs).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SegmentHeader {
    pub format: String,
    /// The repository it was written into; restore refuses a segment of another one.
    pub repository: Uuid,
    pub first: u64,
    pub last: u64,
    /// The hash of the event at `first - 1` (zero when `first` is 1).
    pub prev_hash: Digest,
    /// The hash of the event at `last`.
    pub last_hash: Digest,
    /// The signed checkpoints at positions `first..=last`.
    pub checkpoints: Vec<Checkpoint>,
    /// The ledger key that signed `signature` (hex).
    pub public_key: String,
    /// The ledger's signature over [`segment_statement`] (hex).
    pub signature: String,
}

/// What the ledger signs for a segment: `backstop-ledger-segment/1`, a newline, the repository
/// id (16 bytes), `first` and `last` (u64 big-endian), `prev_hash` and `last_hash` (32 bytes
/// each). Signed as a statement (`CheckpointSigner::sign_statement`), whose prefix keeps it
/// apart from checkpoints.
pub fn segment_statement(
    repository: Uuid,
    first: u64,
    last: u64,
    prev_hash: &Digest,
    last_hash: &Digest,
) -> Vec<u8> {
    let mut b = format!("{FORMAT}\n").into_bytes();
    b.extend_from_slice(repository.as_bytes());
    b.extend_from_slice(&first.to_be_bytes());
    b.extend_from_slice(&last.to_be_bytes());
    b.extend_from_slice(&prev_hash.0);
    b.extend_from_slice(&last_hash.0);
    b
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("repository: {0}")]
    Repo(Box<RepoError>),
    /// A segment that cannot be opened with this repository's keys, or whose sealed bytes are
    /// damaged (truncated, changed).
    #[error(
        "segment {path} cannot be opened: {source}. It is damaged (truncated or changed) or was not written by this repository (copied from another bucket?); put the right copy back (a replica, an offline copy) and run the restore again"
    )]
    Unreadable {
        path: String,
        #[source]
        source: Box<RepoError>,
    },
    /// A segment that opens but whose content is wrong.
    #[error(
        "segment {path} is not a good copy of the ledger: {what}; put the right copy back (a replica, an offline copy) and run the restore again"
    )]
    BadSegment { path: String, what: String },
    #[error(
        "positions {from} to {to} are in no segment ({after}): the segment that held them is missing from the repository; put it back (a replica, an offline copy) and run the restore again"
    )]
    Gap {
        from: u64,
        to: u64,
        /// Which segments lie either side.
        after: String,
    },
    #[error("the repository holds no ledger segments under {PREFIX}: nothing to restore")]
    NoSegments,
    #[error(
        "{path} is not empty: a restore writes a new ledger only where there is none; move it aside or pass another --data-dir"
    )]
    NotEmpty { path: PathBuf },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<RepoError> for MirrorError {
    fn from(e: RepoError) -> MirrorError {
        MirrorError::Repo(Box::new(e))
    }
}

impl MirrorError {
    /// Whether the same round may succeed later (the repository or the disk was unreachable);
    /// a damaged or missing segment will not heal by retrying.
    pub fn is_transient(&self) -> bool {
        match self {
            MirrorError::Ledger(e) => e.is_transient(),
            MirrorError::Repo(e) => e.is_transient(),
            _ => false,
        }
    }
}

fn bad(path: &str, what: impl Into<String>) -> MirrorError {
    MirrorError::BadSegment {
        path: path.to_string(),
        what: what.into(),
    }
}

/// One segment written (or found already written) by a mirror round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirrored {
    pub path: String,
    pub first: u64,
    pub last: u64,
    /// False when the segment was already in the repository (a crash before the cursor moved).
    pub uploaded: bool,
}

/// Mirrors every committed event past the cursor, in segments of at most
/// [`MAX_SEGMENT_EVENTS`], and returns what it wrote. `repo` should be a handle made with
/// `with_access` for the mirror, so that its key access is recorded once.
pub async fn mirror_once(ledger: &Ledger, repo: &Repository) -> Result<Vec<Mirrored>, MirrorError> {
    mirror_round(ledger, repo, true).await
}

/// [`mirror_once`], looking for a segment already at the cursor only when `probe` is set. A
/// segment can be at the cursor only after a crash or a failed round (module docs), so
/// [`run`] probes on its first round and after a failure, and saves a listing per segment
/// otherwise.
pub async fn mirror_round(
    ledger: &Ledger,
    repo: &Repository,
    mut probe: bool,
) -> Result<Vec<Mirrored>, MirrorError> {
    let store = ledger.store();
    let mut done = Vec::new();
    loop {
        let next = store.mirror_cursor()?;
        // Only what is flushed: the committed head, not sled's in-memory one.
        let head = ledger.head();
        if next > head.position {
            return Ok(done);
        }
        if probe {
            if let Some(found) = existing_segment(repo, next).await? {
                tracing::info!(segment = %found.path, "ledger segment already mirrored; moving the cursor past it");
                store.set_mirror_cursor_durable(found.last + 1).await?;
                done.push(found);
                continue;
            }
            // Segments are written in position order: none lies beyond the first one missing.
            probe = false;
        }
        let events: Vec<Envelope> = store
            .range(next, MAX_SEGMENT_EVENTS)?
            .into_iter()
            .take_while(|e| e.position <= head.position)
            .collect();
        let Some(last_env) = events.last() else {
            return Ok(done);
        };
        let last = last_env.position;
        let prev_hash = match next {
            1 => Digest::ZERO,
            p => {
                store
                    .get(p - 1)?
                    .ok_or_else(|| LedgerError::Corrupt {
                        position: p - 1,
                        what: "the event before the mirror cursor is missing".into(),
                    })?
                    .hash
            }
        };
        let mut checkpoints = Vec::new();
        let mut from = next;
        while let Some(cp) = store.checkpoint_at_or_after(from)? {
            if cp.position > last {
                break;
            }
            from = cp.position + 1;
            checkpoints.push(cp);
        }
        let header = SegmentHeader {
            format: FORMAT.to_string(),
            repository: repo.id(),
            first: next,
            last,
            prev_hash,
            last_hash: last_env.hash,
            checkpoints,
            public_key: ledger.public_key().to_string(),
            signature: ledger.sign_statement(&segment_statement(
                repo.id(),
                next,
                last,
                &prev_hash,
                &last_env.hash,
            )),
        };
        let body = encode_segment(&header, &events)?;
        let path = segment_path(next, last);
        // put_blob reads the object back and compares its SHA3-256: durable before the cursor.
        repo.put_blob(&path, KeyPurpose::Ledger, body).await?;
        store.set_mirror_cursor_durable(last + 1).await?;
        tracing::debug!(segment = %path, events = events.len(), "ledger segment mirrored");
        done.push(Mirrored {
            path,
            first: next,
            last,
            uploaded: true,
        });
    }
}

/// A segment starting at `first` already in the repository, checked to be this repository's
/// and to hold what its name says.
async fn existing_segment(repo: &Repository, first: u64) -> Result<Option<Mirrored>, MirrorError> {
    let listed = repo
        .backend()
        .list(&format!("{PREFIX}{first:020}-"))
        .await?;
    let Some(obj) = listed
        .iter()
        .find(|o| parse_segment_path(&o.key).is_some_and(|(f, _)| f == first))
    else {
        return Ok(None);
    };
    let (_, last) = parse_segment_path(&obj.key).unwrap_or((first, first));
    let bytes = repo
        .get_blob(&obj.key, None)
        .await
        .map_err(|source| MirrorError::Unreadable {
            path: obj.key.clone(),
            source: Box::new(source),
        })?;
    let (header, events) = decode_segment(&obj.key, &bytes)?;
    check_header(&obj.key, &header, repo.id(), first, last, events.len())?;
    Ok(Some(Mirrored {
        path: obj.key.clone(),
        first,
        last,
        uploaded: false,
    }))
}

/// The segment's plaintext: the header line, then one envelope per line.
pub fn encode_segment(header: &SegmentHeader, events: &[Envelope]) -> Result<Bytes, MirrorError> {
    let enc = |e: serde_json::Error| LedgerError::Corrupt {
        position: header.first,
        what: format!("cannot encode a segment: {e}"),
    };
    let mut out = serde_json::to_vec(header).map_err(enc)?;
    out.push(b'\n');
    for e in events {
        out.extend_from_slice(&serde_json::to_vec(e).map_err(enc)?);
        out.push(b'\n');
    }
    Ok(Bytes::from(out))
}

/// Splits a segment's plaintext into its header and envelopes.
pub fn decode_segment(
    path: &str,
    bytes: &[u8],
) -> Result<(SegmentHeader, Vec<Envelope>), MirrorError> {
    let mut lines = bytes.split(|b| *b == b'\n');
    let first = lines.next().unwrap_or_default();
    let header: SegmentHeader = serde_json::from_slice(first)
        .map_err(|e| bad(path, format!("its header does not decode: {e}")))?;
    if header.format != FORMAT {
        return Err(bad(
            path,
            format!(
                "its format is {:?}, this build reads {FORMAT:?}",
                header.format
            ),
        ));
    }
    let mut events = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.is_empty() {
            continue;
        }
        let env: Envelope = serde_json::from_slice(line)
            .map_err(|e| bad(path, format!("line {} does not decode: {e}", i + 2)))?;
        events.push(env);
    }
    Ok((header, events))
}

fn check_header(
    path: &str,
    header: &SegmentHeader,
    repository: Uuid,
    first: u64,
    last: u64,
    events: usize,
) -> Result<(), MirrorError> {
    if header.repository != repository {
        return Err(bad(
            path,
            format!(
                "it was written into repository {}, not this one ({repository})",
                header.repository
            ),
        ));
    }
    if header.first != first || header.last != last {
        return Err(bad(
            path,
            format!(
                "its name says positions {first} to {last} but its header says {} to {}",
                header.first, header.last
            ),
        ));
    }
    let expected = (last - first + 1) as usize;
    if events != expected {
        return Err(bad(
            path,
            format!("it should hold {expected} events and holds {events} (truncated?)"),
        ));
    }
    Ok(())
}

/// Mirrors every `every` until `shutdown`, then once more so that what was committed when it
/// stopped is in the repository. A failed round is logged and retried at the next one.
pub async fn run(
    ledger: Ledger,
    repo: Repository,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), LedgerError> {
    let mut probe = true;
    loop {
        let stopping = *shutdown.borrow();
        let round = mirror_round(&ledger, &repo, probe).await;
        probe = round.is_err();
        match round {
            Ok(done) if !done.is_empty() => tracing::debug!(
                segments = done.len(),
                last = done.last().map(|m| m.last),
                "ledger mirrored"
            ),
            Ok(_) => {}
            Err(e) if stopping => {
                tracing::error!(error = %e, "the ledger's last mirror before shutdown failed; the next start mirrors what is left");
            }
            Err(e) => {
                tracing::warn!(error = %e, transient = e.is_transient(), "mirroring the ledger into the repository failed; retrying");
            }
        }
        if stopping {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }
}

/// What a restore rebuilt.
#[derive(Clone, Debug, Serialize)]
pub struct Restored {
    pub segments: usize,
    pub last_position: u64,
    pub last_hash: String,
    pub checkpoints: usize,
    pub last_checkpoint: Option<u64>,
    /// The key every checkpoint and segment signature was checked against.
    pub public_key: String,
    /// Whether that key was pinned by the caller (else it was taken from the first segment).
    pub pinned: bool,
}

/// A restored ledger in its temporary directory, not yet in place. Dropped without
/// [`Staged::commit`], the directory is removed.
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
    pub report: Restored,
}

impl Staged {
    /// Renames the restored ledger into place.
    pub fn commit(mut self) -> Result<Restored, MirrorError> {
        std::fs::rename(&self.tmp, &self.dest).map_err(|source| MirrorError::Io {
            path: self.dest.clone(),
            source,
        })?;
        if let Some(parent) = self.dest.parent()
            && let Ok(dir) = std::fs::File::open(parent)
        {
            let _ = dir.sync_all();
        }
        self.committed = true;
        Ok(self.report.clone())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Removes the temporary directory unless disarmed.
struct TmpGuard(Option<PathBuf>);

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn dir_is_empty(path: &Path) -> Result<bool, MirrorError> {
    match std::fs::read_dir(path) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(MirrorError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Refuses a `dest` that already holds something (before anything is downloaded).
pub fn check_target(dest: &Path) -> Result<(), MirrorError> {
    if dir_is_empty(dest)? {
        Ok(())
    } else {
        Err(MirrorError::NotEmpty {
            path: dest.to_path_buf(),
        })
    }
}

/// Rebuilds the ledger from the repository's segments into a temporary directory beside `dest`
/// (module docs); [`Staged::commit`] puts it in place. `pinned` is the public key the signatures
/// must hold for; without one, the first segment's key is used and [`Restored::pinned`] is false.
pub async fn restore(
    repo: &Repository,
    dest: &Path,
    pinned: Option<&str>,
) -> Result<Staged, MirrorError> {
    check_target(dest)?;
    let mut segments: Vec<(u64, u64, String)> = Vec::new();
    for obj in repo.backend().list(PREFIX).await? {
        match parse_segment_path(&obj.key) {
            Some((first, last)) => segments.push((first, last, obj.key)),
            None => {
                tracing::warn!(object = %obj.key, "not a ledger segment name; ignored");
            }
        }
    }
    segments.sort();
    if segments.is_empty() {
        return Err(MirrorError::NoSegments);
    }
    let mut expected = 1u64;
    let mut before = "the start of the ledger".to_string();
    for (first, last, path) in &segments {
        if *first > expected {
            return Err(MirrorError::Gap {
                from: expected,
                to: first - 1,
                after: format!("between {before} and {path}"),
            });
        }
        if *first < expected {
            return Err(bad(
                path,
                format!("it overlaps {before}, which already holds position {first}"),
            ));
        }
        expected = last + 1;
        before = path.clone();
    }

    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|source| MirrorError::Io {
        path: parent.to_path_buf(),
        source,
    })?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ledger".into());
    let tmp = parent.join(format!(".{name}.restore-{}", std::process::id()));
    if tmp.exists() {
        // Left by a restore with this pid that was killed.
        std::fs::remove_dir_all(&tmp).map_err(|source| MirrorError::Io {
            path: tmp.clone(),
            source,
        })?;
    }
    let mut guard = TmpGuard(Some(tmp.clone()));
    let mut importer = Importer::create(&tmp)?;
    let mut key: Option<String> = pinned.map(|k| k.to_ascii_lowercase());
    let mut checkpoints = 0usize;
    let mut last_checkpoint = None;
    let count = segments.len();

    let mut downloads = futures::stream::iter(segments.into_iter().map(|(first, last, path)| {
        let repo = repo.clone();
        async move {
            let bytes = repo.get_blob(&path, None).await;
            (first, last, path, bytes)
        }
    }))
    .buffered(RESTORE_CONCURRENCY);
    while let Some((first, last, path, bytes)) = downloads.next().await {
        let bytes = bytes.map_err(|source| MirrorError::Unreadable {
            path: path.clone(),
            source: Box::new(source),
        })?;
        let (header, events) = decode_segment(&path, &bytes)?;
        check_header(&path, &header, repo.id(), first, last, events.len())?;
        let key = key.get_or_insert_with(|| header.public_key.to_ascii_lowercase());
        if !header.public_key.eq_ignore_ascii_case(key) {
            return Err(bad(
                &path,
                format!(
                    "it is signed by key {}, not the expected {key}",
                    header.public_key
                ),
            ));
        }
        let head = importer.head();
        if header.prev_hash != head.hash {
            return Err(bad(
                &path,
                format!(
                    "it says the event before it hashes to {} but the restored chain ends with {}",
                    header.prev_hash, head.hash
                ),
            ));
        }
        let last_hash = events.last().map(|e| e.hash).unwrap_or_default();
        if header.last_hash != last_hash {
            return Err(bad(&path, "its header's last hash is not its last event's"));
        }
        verify_statement(
            &segment_statement(repo.id(), first, last, &header.prev_hash, &header.last_hash),
            &header.signature,
            key,
        )
        .map_err(|why| bad(&path, format!("its signature does not hold: {why}")))?;
        importer
            .append(&events)
            .map_err(|e| bad(&path, e.to_string()))?;
        for cp in &header.checkpoints {
            if cp.position < first || cp.position > last {
                return Err(bad(
                    &path,
                    format!(
                        "it carries a checkpoint at {} outside its range",
                        cp.position
                    ),
                ));
            }
            verify_checkpoint(cp, key).map_err(|why| {
                bad(
                    &path,
                    format!("the checkpoint at {} does not verify: {why}", cp.position),
                )
            })?;
            importer
                .checkpoint(cp)
                .map_err(|e| bad(&path, e.to_string()))?;
            checkpoints += 1;
            last_checkpoint = Some(cp.position);
        }
    }
    let head = importer.finish().await?;
    guard.0 = None;
    Ok(Staged {
        tmp,
        dest: dest.to_path_buf(),
        committed: false,
        report: Restored {
            segments: count,
            last_position: head.position,
            last_hash: head.hash.to_hex(),
            checkpoints,
            last_checkpoint,
            public_key: key.unwrap_or_default(),
            pinned: pinned.is_some(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_sort_in_position_order_and_parse_back() {
        let a = segment_path(9, 10);
        let b = segment_path(11, 200);
        assert!(a < b, "{a} {b}");
        assert_eq!(parse_segment_path(&b), Some((11, 200)));
        assert_eq!(parse_segment_path("ledger/1-2"), None);
        assert_eq!(parse_segment_path(&segment_path(5, 4)), None);
    }
}
