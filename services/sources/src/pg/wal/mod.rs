//! Continuous WAL archiving: `backstop wal-push %p` (PostgreSQL's `archive_command`),
//! `backstop wal-fetch %f %p` (its `restore_command`), and the archive's continuity check.
//!
//! This module knows PostgreSQL's WAL files and what the two commands must promise PostgreSQL;
//! it knows nothing about the repository. The caller implements [`WalStore`] (sealing each file
//! with the `wal` data key under an object key such as `wal/<timeline>/<name>`) and turns every
//! newly archived file in a [`PushReport`] into a `wal.archived` event.
//!
//! # Files
//! The archive holds PostgreSQL's WAL files by their own names (see [`WalFile`]): segments
//! (`000000010000000A000000FF`), timeline history files (`00000002.history`), backup history
//! files (`...0003.00000028.backup`) and the `.partial` last segment of a timeline left behind by
//! a promotion. Each is stored whole, with the SHA3-256 of its bytes (lowercase hex) recorded
//! beside it at push time; every read checks the bytes against that checksum.
//!
//! # Promises
//! - Push never overwrites: a file already archived with the same checksum is a success (so a
//!   push killed halfway and re-run archives the file once); with a different checksum it is
//!   refused, non-zero, so PostgreSQL keeps the file and retries while an operator looks.
//! - Push reports success only after the store said the file is durably stored.
//! - Fetch writes the destination atomically (temporary file, fsync, rename), so PostgreSQL never
//!   reads half a segment.
//! - Fetch never lets recovery end early without saying so. A file that is absent exits 1, which
//!   is how PostgreSQL learns where the archive ends; but a segment that is damaged, a segment
//!   missing while later segments of its timeline exist (a gap), or an archive that cannot be
//!   read exits [`FETCH_FATAL_EXIT`] (greater than 125), which PostgreSQL treats as fatal:
//!   recovery aborts instead of promoting at an earlier point. The reason is also written to
//!   [`RECOVERY_FAILED_MARKER`] in the data directory, for the restore and verification tools.
//!   On a standby (`standby.signal` present) an unreadable archive exits 1 instead, since a
//!   standby retries. When recovery has an explicit target, damage and gaps exit 1 too, reported
//!   as the end of the usable archive: PostgreSQL itself then refuses to finish short of the
//!   target (see [`fetch`](fetch()) for why).
//!
//! # Local state (the spool)
//! Both commands keep a small spool directory, by default `pg_wal/backstop/` of the cluster
//! (`pg_basebackup -X none` leaves `pg_wal` contents out of base backups, and PostgreSQL ignores
//! names in `pg_wal` that are not WAL files):
//! - `pushed/<name>`: written after push archived a file PostgreSQL had not asked for yet (it
//!   pushes other `.ready` files in parallel); holds the file's checksum, object key, scope and
//!   `stat` stamp (see `push`). PostgreSQL's own later call for that file finds it, compares the
//!   stamp, and returns at once, without reading the file again or opening the repository.
//! - `prefetch/<name>`: segments fetched ahead of PostgreSQL's requests, in the stored form
//!   (checksum header, then the bytes: see [`encode_stored`]), checked again when served.
//!
//! Every spool file is written to a temporary name and renamed, so a killed command leaves at
//! worst a stray temporary file, never a wrong entry.

mod fetch;
mod push;
mod verify;

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_256};

pub use fetch::{
    FetchError, FetchOptions, FetchOutcome, fetch, fetch_failure, recovery_has_target,
};
pub use push::{ArchivedWal, PushOptions, PushReport, already_pushed, push};
pub use verify::{
    BackupWalRange, TimelineHistory, TimelineReport, WalGap, WalProblem, WalProblemKind,
    WalVerifyOptions, WalVerifyReport, parse_history, wal_verify,
};

/// PostgreSQL's default WAL segment size (16 MiB).
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

/// Exit status of `wal-fetch` for failures that must abort recovery. PostgreSQL treats a
/// `restore_command` exit status above 125 as fatal (143, i.e. SIGTERM, means shutdown; avoided).
pub const FETCH_FATAL_EXIT: i32 = 150;

/// Written by `wal-fetch` into the data directory when it aborted recovery; holds the reason.
pub const RECOVERY_FAILED_MARKER: &str = "backstop.recovery-failed";

/// Appended to by `wal-fetch` in the data directory when it reported a damaged or missing
/// segment as the end of the archive (recovery with a target); one line per file.
pub const RECOVERY_WARNINGS: &str = "backstop.recovery-warnings";

/// A log sequence number (`X/Y` in PostgreSQL's notation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The segment number this LSN falls in.
    pub fn segno(self, segment_size: u64) -> u64 {
        self.0 / segment_size
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Lsn, String> {
        let bad = || format!("{s:?} is not an LSN; write it as PostgreSQL does, e.g. 0/3000028");
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What kind of WAL file a name denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalKind {
    /// A WAL segment: `TTTTTTTTLLLLLLLLSSSSSSSS`.
    Segment,
    /// The last, incomplete segment of a timeline, archived at promotion: `<segment>.partial`.
    Partial,
    /// A timeline history file: `TTTTTTTT.history`.
    History,
    /// A backup history file: `<segment>.OOOOOOOO.backup`.
    Backup,
}

/// A parsed WAL file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WalFile {
    pub name: String,
    pub kind: WalKind,
    pub timeline: u32,
    /// High and low halves of the segment position (zero for history files).
    pub log: u32,
    pub seg: u32,
}

fn is_upper_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

impl WalFile {
    /// Parses a file name as PostgreSQL writes it (upper-case hex). `None` for anything else.
    pub fn parse(name: &str) -> Option<WalFile> {
        let seg_part = |s: &str| -> Option<(u32, u32, u32)> {
            if s.len() != 24 || !is_upper_hex(s) {
                return None;
            }
            Some((
                u32::from_str_radix(&s[0..8], 16).ok()?,
                u32::from_str_radix(&s[8..16], 16).ok()?,
                u32::from_str_radix(&s[16..24], 16).ok()?,
            ))
        };
        let (kind, (timeline, log, seg)) = if name.len() == 24 {
            (WalKind::Segment, seg_part(name)?)
        } else if let Some(base) = name.strip_suffix(".partial") {
            (WalKind::Partial, seg_part(base)?)
        } else if let Some(tli) = name.strip_suffix(".history") {
            if tli.len() != 8 || !is_upper_hex(tli) {
                return None;
            }
            (WalKind::History, (u32::from_str_radix(tli, 16).ok()?, 0, 0))
        } else if let Some(rest) = name.strip_suffix(".backup") {
            let (base, offset) = rest.split_once('.')?;
            if offset.len() != 8 || !is_upper_hex(offset) {
                return None;
            }
            (WalKind::Backup, seg_part(base)?)
        } else {
            return None;
        };
        if timeline == 0 {
            return None;
        }
        Some(WalFile {
            name: name.to_string(),
            kind,
            timeline,
            log,
            seg,
        })
    }

    /// The segment number (for segments, partial segments and backup history files).
    pub fn segno(&self, segment_size: u64) -> u64 {
        self.log as u64 * segments_per_id(segment_size) + self.seg as u64
    }

    /// True for the files recovery reads in sequence (segments).
    pub fn is_segment(&self) -> bool {
        self.kind == WalKind::Segment
    }
}

fn segments_per_id(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size
}

/// The name of segment `segno` on `timeline`.
pub fn segment_name(timeline: u32, segno: u64, segment_size: u64) -> String {
    let per = segments_per_id(segment_size);
    format!("{:08X}{:08X}{:08X}", timeline, segno / per, segno % per)
}

/// The name of the history file of `timeline`.
pub fn history_name(timeline: u32) -> String {
    format!("{timeline:08X}.history")
}

/// SHA3-256 of `data`, lowercase hex (the form every checksum in the archive and the events has).
pub fn sha3_hex(data: &[u8]) -> String {
    to_hex(&Sha3_256::digest(data))
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// SHA3-256 off the async runtime (a segment takes tens of milliseconds).
pub(crate) async fn sha3_hex_blocking(data: Bytes) -> String {
    let d = data.clone();
    match tokio::task::spawn_blocking(move || sha3_hex(&d)).await {
        Ok(h) => h,
        // The closure cannot panic; if the runtime refused the task, hash here.
        Err(_) => sha3_hex(&data),
    }
}

/// Writes `data` to `path` atomically: a temporary file beside it, fsync, rename.
pub(crate) async fn write_atomic(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.backstop-tmp.{}", std::process::id()));
    let result = async {
        let mut f = tokio::fs::File::create(&tmp).await?;
        f.write_all(data).await?;
        f.sync_all().await?;
        drop(f);
        tokio::fs::rename(&tmp, path).await
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

const STORED_MAGIC: &[u8] = b"BSWAL1\n";
const STORED_HEADER_LEN: usize = STORED_MAGIC.len() + 64 + 1;

/// The stored form of a WAL file for stores that keep opaque blobs: `BSWAL1\n`, the SHA3-256 of
/// the file in lowercase hex, `\n`, then the file's bytes. A [`WalStore`] on top of the
/// repository can seal this as one object, so the checksum recorded at push time travels with
/// the data and a restore needs nothing but the bucket and the key.
pub fn encode_stored(sha3: &str, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(STORED_HEADER_LEN + data.len());
    out.extend_from_slice(STORED_MAGIC);
    out.extend_from_slice(sha3.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(data);
    Bytes::from(out)
}

/// Splits the stored form (see [`encode_stored`]) into the recorded checksum and the file's
/// bytes. Does not check the checksum: [`StoredWal::verify`] does.
pub fn decode_stored(name: &str, stored: Bytes) -> Result<StoredWal, WalStoreError> {
    let bad = |why: &str| WalStoreError::Corrupt {
        object: name.to_string(),
        why: why.to_string(),
    };
    if stored.len() < STORED_HEADER_LEN || !stored.starts_with(STORED_MAGIC) {
        return Err(bad("it does not start with the BSWAL1 header"));
    }
    let sha = &stored[STORED_MAGIC.len()..STORED_MAGIC.len() + 64];
    if stored[STORED_HEADER_LEN - 1] != b'\n' || !sha.iter().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("its checksum header is malformed"));
    }
    let sha3 = String::from_utf8_lossy(sha).to_ascii_lowercase();
    Ok(StoredWal {
        sha3,
        data: stored.slice(STORED_HEADER_LEN..),
    })
}

/// A WAL file as read back from the store, with the checksum recorded when it was pushed.
#[derive(Debug, Clone)]
pub struct StoredWal {
    /// SHA3-256 recorded at push time (lowercase hex).
    pub sha3: String,
    pub data: Bytes,
}

impl StoredWal {
    /// Checks the bytes against the recorded checksum; returns the checksum.
    pub async fn verify(&self, name: &str) -> Result<String, WalStoreError> {
        let actual = sha3_hex_blocking(self.data.clone()).await;
        if actual != self.sha3 {
            return Err(WalStoreError::Corrupt {
                object: name.to_string(),
                why: format!(
                    "its SHA3-256 is {actual} but {} was recorded when it was archived",
                    self.sha3
                ),
            });
        }
        Ok(actual)
    }
}

/// One file in the archive, as [`WalStore::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalEntry {
    pub name: String,
    /// Stored size (what the store keeps; used for figures, not for checks).
    pub bytes: u64,
}

/// A failure of the caller's WAL storage.
#[derive(Debug, thiserror::Error)]
pub enum WalStoreError {
    /// The store could not be reached or answered with an error; retrying may help.
    #[error("the WAL archive is unavailable: {message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// An object is there but its content is wrong (failed authentication, bad header, ...).
    #[error("{object} in the WAL archive is damaged: {why}")]
    Corrupt { object: String, why: String },
}

impl WalStoreError {
    pub fn unavailable(message: impl Into<String>) -> WalStoreError {
        WalStoreError::Unavailable {
            message: message.into(),
            source: None,
        }
    }

    pub fn unavailable_with(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> WalStoreError {
        WalStoreError::Unavailable {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

impl From<std::io::Error> for WalStoreError {
    fn from(e: std::io::Error) -> WalStoreError {
        WalStoreError::unavailable_with(e.to_string(), e)
    }
}

/// Where WAL files are archived (implemented by the repository glue).
///
/// Names are PostgreSQL's file names ([`WalFile::parse`] accepts them); checksums are SHA3-256 of
/// the file's bytes in lowercase hex. Methods are called concurrently (push and fetch run up to
/// their `parallel` setting at once).
#[async_trait]
pub trait WalStore: Send + Sync {
    /// Where the file is (or would be) stored, for events and messages, e.g.
    /// `wal/00000001/000000010000000000000003`.
    fn object_key(&self, file: &WalFile) -> String;

    /// Stores a file durably with its checksum, atomically (a reader sees all of it or nothing)
    /// and returns its object key. Called only after [`head`](Self::head) said it is absent;
    /// two pushes of the same name may still race, so a store that can refuse to overwrite
    /// should.
    async fn put_segment(
        &self,
        file: &WalFile,
        data: Bytes,
        sha3: &str,
    ) -> Result<String, WalStoreError>;

    /// Reads a file back with the checksum recorded for it; `None` if it is not archived. The
    /// caller checks the bytes against the checksum.
    async fn get_segment(&self, name: &str) -> Result<Option<StoredWal>, WalStoreError>;

    /// The checksum recorded for a file, or `None` if it is not archived. The default reads the
    /// whole file; a store that keeps checksums apart can answer without the data.
    async fn head(&self, name: &str) -> Result<Option<String>, WalStoreError> {
        Ok(self.get_segment(name).await?.map(|s| s.sha3))
    }

    /// Every archived file.
    async fn list(&self) -> Result<Vec<WalEntry>, WalStoreError>;

    /// True if a segment of `file`'s timeline later than `file` is archived (used to tell a
    /// gap from the end of the archive). Segment names of one timeline sort in WAL order, so a
    /// store that can list keys after a given key (S3's `start-after`) should override the
    /// default, which lists everything.
    async fn has_later_segment(&self, file: &WalFile) -> Result<bool, WalStoreError> {
        Ok(self.list().await?.iter().any(|e| {
            WalFile::parse(&e.name).is_some_and(|f| {
                f.kind == WalKind::Segment && f.timeline == file.timeline && f.name > file.name
            })
        }))
    }
}

/// Everything that can go wrong pushing, fetching or checking WAL.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error(
        "{name:?} is not a WAL file name PostgreSQL writes (segment, .partial, .history or .backup); wal-push takes %p and wal-fetch takes %f %p"
    )]
    NotWalName { name: String },

    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{name} is already archived with a different checksum (archived {archived}, this file {local}); refusing to overwrite it. Two clusters may be archiving to the same place, or a restored cluster kept archiving: check archive_command and the repository before PostgreSQL can recycle this file"
    )]
    Conflict {
        name: String,
        archived: String,
        local: String,
    },

    #[error(
        "{name} belongs to another cluster (system identifier {found}, this archive is for {expected}); refusing to archive it: point this cluster's archive_command at its own source"
    )]
    WrongCluster {
        name: String,
        found: u64,
        expected: u64,
    },

    #[error("{name} is not a valid WAL segment: {why}")]
    BadSegment { name: String, why: String },

    #[error(
        "WAL segment {name} is missing from the archive although later segments of timeline {timeline} are there: the archive has a gap, and recovery would stop early at it. Run `backstop wal verify`; restore to a point before the gap, or put the segment back"
    )]
    Gap { name: String, timeline: u32 },

    #[error(
        "{0}; recovery was aborted rather than ending early at this file. Run `backstop wal verify`, then restore to a point before this file"
    )]
    Damaged(WalStoreError),

    #[error("{0}")]
    Store(WalStoreError),

    #[error("local I/O failed while {doing}: {source}")]
    Io {
        doing: String,
        #[source]
        source: std::io::Error,
    },

    #[error("internal task failed: {0}")]
    Task(String),
}

impl WalError {
    pub(crate) fn io(doing: impl Into<String>, source: std::io::Error) -> WalError {
        WalError::Io {
            doing: doing.into(),
            source,
        }
    }

    /// True when recovery must abort on this error (fetch): damage, a gap, or (outside standby
    /// mode) an archive that cannot be read.
    pub fn is_fatal_for_recovery(&self) -> bool {
        !matches!(self, WalError::NotWalName { .. })
    }
}

impl From<WalStoreError> for WalError {
    fn from(e: WalStoreError) -> WalError {
        match e {
            e @ WalStoreError::Corrupt { .. } => WalError::Damaged(e),
            e => WalError::Store(e),
        }
    }
}

/// What the first page of a segment says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub magic: u16,
    pub timeline: u32,
    pub page_address: u64,
    pub system_identifier: u64,
    pub segment_size: u32,
    pub block_size: u32,
}

/// Reads and checks the long page header that starts every segment: the page address must be
/// the segment's own position, the segment size the file's length, the timeline no later than
/// the name's (the first segment of a new timeline starts with a copy of its parent's pages).
pub fn check_segment_header(file: &WalFile, data: &[u8]) -> Result<SegmentHeader, String> {
    if data.len() < 40 {
        return Err(format!(
            "it is {} bytes long, too short for a WAL segment",
            data.len()
        ));
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
    let u64_at = |o: usize| (u32_at(o) as u64) | ((u32_at(o + 4) as u64) << 32);
    let h = SegmentHeader {
        magic: u16_at(0),
        timeline: u32_at(4),
        page_address: u64_at(8),
        system_identifier: u64_at(24),
        segment_size: u32_at(32),
        block_size: u32_at(36),
    };
    const XLP_LONG_HEADER: u16 = 0x0002;
    if h.magic >> 8 != 0xD1 {
        return Err(format!(
            "its first page has magic {:#06x}, not a PostgreSQL WAL page",
            h.magic
        ));
    }
    if u16_at(2) & XLP_LONG_HEADER == 0 {
        return Err("its first page lacks the long header every segment starts with".into());
    }
    if h.segment_size as usize != data.len() {
        return Err(format!(
            "its header gives a segment size of {} but the file is {} bytes",
            h.segment_size,
            data.len()
        ));
    }
    if !(h.segment_size as u64).is_power_of_two() {
        return Err(format!(
            "its header gives a segment size of {}, not a power of two",
            h.segment_size
        ));
    }
    // A name past the end of the 64-bit WAL address space (a segment number the header's size
    // cannot reach) has no page address: refused, not an overflow.
    let Some(expected) = file
        .segno(h.segment_size as u64)
        .checked_mul(h.segment_size as u64)
    else {
        return Err(format!(
            "its name {} is past the end of the WAL address space for {}-byte segments",
            file.name, h.segment_size
        ));
    };
    if h.page_address != expected {
        return Err(format!(
            "its first page is for {} but the name says {}",
            Lsn(h.page_address),
            Lsn(expected)
        ));
    }
    if h.timeline > file.timeline {
        return Err(format!(
            "its first page is on timeline {} but the name says timeline {}",
            h.timeline, file.timeline
        ));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_format() {
        let f = WalFile::parse("00000002000000010000000A").unwrap();
        assert_eq!(
            (f.kind, f.timeline, f.log, f.seg),
            (WalKind::Segment, 2, 1, 10)
        );
        assert_eq!(f.segno(DEFAULT_SEGMENT_SIZE), 256 + 10);
        assert_eq!(
            segment_name(2, 266, DEFAULT_SEGMENT_SIZE),
            "00000002000000010000000A"
        );
        assert_eq!(
            WalFile::parse("00000003.history").unwrap().kind,
            WalKind::History
        );
        let b = WalFile::parse("000000010000000000000002.00000028.backup").unwrap();
        assert_eq!((b.kind, b.seg), (WalKind::Backup, 2));
        let p = WalFile::parse("000000010000000000000005.partial").unwrap();
        assert_eq!((p.kind, p.seg), (WalKind::Partial, 5));
        for bad in [
            "RECOVERYXLOG",
            "00000001000000000000000a",
            "000000000000000000000001",
            "0000001.history",
            "000000010000000000000002.0028.backup",
            "../000000010000000000000002",
        ] {
            assert!(WalFile::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(history_name(10), "0000000A.history");
    }

    #[test]
    fn lsn_round_trips() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!(Lsn(0x2000028).to_string(), "0/2000028");
        assert!("nonsense".parse::<Lsn>().is_err());
        assert_eq!(
            l.segno(DEFAULT_SEGMENT_SIZE),
            0x16_B374_D848 / DEFAULT_SEGMENT_SIZE
        );
    }

    #[test]
    fn stored_form_round_trips_and_rejects_garbage() {
        let data = b"some wal bytes";
        let sha = sha3_hex(data);
        let stored = decode_stored("x", encode_stored(&sha, data)).unwrap();
        assert_eq!(stored.sha3, sha);
        assert_eq!(&stored.data[..], data);
        assert!(decode_stored("x", Bytes::from_static(b"BSWAL1\nshort")).is_err());
        assert!(decode_stored("x", Bytes::from(vec![0u8; 200])).is_err());
    }

    #[test]
    fn segment_header_checks() {
        let size = 1024 * 1024u64;
        let f = WalFile::parse("000000010000000000000003").unwrap();
        let mut data = vec![0u8; size as usize];
        data[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        data[2..4].copy_from_slice(&2u16.to_le_bytes());
        data[4..8].copy_from_slice(&1u32.to_le_bytes());
        data[8..16].copy_from_slice(&(3 * size).to_le_bytes());
        data[24..32].copy_from_slice(&42u64.to_le_bytes());
        data[32..36].copy_from_slice(&(size as u32).to_le_bytes());
        data[36..40].copy_from_slice(&8192u32.to_le_bytes());
        let h = check_segment_header(&f, &data).unwrap();
        assert_eq!(h.system_identifier, 42);
        let other = WalFile::parse("000000010000000000000004").unwrap();
        assert!(check_segment_header(&other, &data).is_err());
        assert!(check_segment_header(&f, &data[..4096]).is_err());
    }

    /// The highest name with a tiny segment size in its header: the segment's address does not
    /// fit in 64 bits, which overflowed instead of refusing the file.
    #[test]
    fn a_name_past_the_address_space_is_refused() {
        let f = WalFile::parse("FFFFFFFFFFFFFFFFFFFFFFFF").unwrap();
        let mut data = vec![0u8; 64];
        data[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        data[2..4].copy_from_slice(&2u16.to_le_bytes());
        data[32..36].copy_from_slice(&64u32.to_le_bytes());
        let e = check_segment_header(&f, &data).unwrap_err();
        assert!(e.contains("past the end of the WAL address space"), "{e}");
    }
}
