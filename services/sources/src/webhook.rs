//! The webhook log's local, durable form: segment files of length-prefixed, checksummed records.
//!
//! `backstop serve` appends every signal it accepts at `POST /webhooks/NAME` to a segment file
//! under `DATA_DIR/webhooks/NAME/` and acknowledges it only after the file was `fsync`ed
//! (`fdatasync`); sealed segments are uploaded to the repository by `backstop_ops::webhook`.
//! This module only knows the bytes on disk.
//!
//! # Segment file `<first sequence, 20 digits>.log` (format 1)
//!
//! All integers big-endian. CRC = CRC-32 (IEEE 802.3, as zlib and gzip compute it).
//!
//! ```text
//! header (24 bytes):  "BSWHLOG1" | first_seq u64 | day u32 (YYYYMMDD, America/New_York) | crc u32
//!                     (crc over the 20 bytes before it)
//! record (32 + n):    body_len u32 (n) | crc u32 (over the 24 + n bytes after it)
//!                     | seq u64 | received_at i64 (µs since the Unix epoch, UTC)
//!                     | synced_through u64 | body (n bytes)
//! ```
//!
//! - Records carry consecutive sequence numbers from `first_seq`; sequence numbers continue
//!   across segments and days (a log's entry is identified by its name and sequence number).
//! - `synced_through` is the highest sequence number that was already on disk (`fsync`ed) when
//!   the record was written: the writer's acknowledgement horizon. It is what makes the recovery
//!   below decidable.
//! - A body is at most [`MAX_BODY`] bytes (the API's own limit is far lower).
//!
//! # Recovery of a torn tail ([`recover`])
//!
//! A signal is acknowledged only after the `fsync` that covered its record returned. A crash
//! can therefore only damage what was written after the last completed `fsync`: records no
//! client was ever told were stored. Recovery reads a segment record by record; at the first
//! record that is incomplete, fails its CRC or carries the wrong sequence number (the damaged
//! record, sequence `s`), it looks at every intact record after it. If none says
//! `synced_through >= s`, nothing proves that `s` was ever on disk, and under fsync-before-ack
//! it was not acknowledged: the file is cut at the damaged record (the damaged record and any
//! record after it, all from the same unsynced batch, are dropped) and recovery goes on. If an
//! intact later record says `s` was synced, the damaged record was acknowledged and the disk
//! lost it: [`WebhookLogError::AcknowledgedDamaged`], naming the file, the offset and the
//! sequence numbers, and nothing is changed.
//!
//! A segment whose header is incomplete and that holds no record (a crash while it was being
//! created) is empty and removed; any other damaged header is an error.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Datelike, NaiveDate, Utc};

/// The first eight bytes of a segment file.
pub const MAGIC: &[u8; 8] = b"BSWHLOG1";
/// Header length.
pub const HEADER_LEN: usize = 24;
/// A record's fixed part.
pub const RECORD_HEAD: usize = 32;
/// The largest body a record may hold (16 MiB).
pub const MAX_BODY: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WebhookLogError {
    #[error("webhook log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "webhook log {path}: the header is damaged ({what}); the file holds records that cannot be attributed: keep a copy, then move the file out of the directory to start without it"
    )]
    BadHeader { path: PathBuf, what: String },
    #[error(
        "webhook log {path}: the record at byte {offset} (sequence {seq}) is damaged, but it was acknowledged (the intact record of sequence {witness} written after it says sequence {synced} was on disk): the disk lost acknowledged signals. Keep a copy of the file; the entries before it are intact (see RUNBOOK, \"Replay webhook signals after a recovery\")"
    )]
    AcknowledgedDamaged {
        path: PathBuf,
        offset: u64,
        seq: u64,
        witness: u64,
        synced: u64,
    },
    #[error("webhook log {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

impl WebhookLogError {
    /// Whether retrying the same operation may succeed (an I/O error may; damage never heals).
    pub fn is_transient(&self) -> bool {
        matches!(self, WebhookLogError::Io { .. })
    }
}

type Result<T> = std::result::Result<T, WebhookLogError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WebhookLogError + '_ {
    move |source| WebhookLogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One signal as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub received_at: DateTime<Utc>,
    pub body: Vec<u8>,
}

/// A segment's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub first_seq: u64,
    pub day: NaiveDate,
}

fn day_number(day: NaiveDate) -> u32 {
    day.year() as u32 * 10_000 + day.month() * 100 + day.day()
}

fn day_from_number(n: u32) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt((n / 10_000) as i32, (n / 100) % 100, n % 100)
}

/// The header's bytes.
pub fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&h.first_seq.to_be_bytes());
    b[16..20].copy_from_slice(&day_number(h.day).to_be_bytes());
    let crc = crc32fast::hash(&b[..20]);
    b[20..24].copy_from_slice(&crc.to_be_bytes());
    b
}

/// Parses a header; `None` when the bytes are not an intact header.
pub fn decode_header(b: &[u8]) -> Option<Header> {
    if b.len() < HEADER_LEN || &b[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_be_bytes(b[20..24].try_into().ok()?);
    if crc32fast::hash(&b[..20]) != crc {
        return None;
    }
    Some(Header {
        first_seq: u64::from_be_bytes(b[8..16].try_into().ok()?),
        day: day_from_number(u32::from_be_bytes(b[16..20].try_into().ok()?))?,
    })
}

/// Appends one record's bytes to `out`.
pub fn encode_record(out: &mut Vec<u8>, e: &Entry, synced_through: u64) {
    let start = out.len();
    out.extend_from_slice(&(e.body.len() as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&e.seq.to_be_bytes());
    out.extend_from_slice(&e.received_at.timestamp_micros().to_be_bytes());
    out.extend_from_slice(&synced_through.to_be_bytes());
    out.extend_from_slice(&e.body);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// A record parsed at the start of `b`: the entry, its `synced_through` and its length.
pub fn decode_record(b: &[u8]) -> Option<(Entry, u64, usize)> {
    if b.len() < RECORD_HEAD {
        return None;
    }
    let n = u32::from_be_bytes(b[..4].try_into().ok()?) as usize;
    if n > MAX_BODY || b.len() < RECORD_HEAD + n {
        return None;
    }
    let crc = u32::from_be_bytes(b[4..8].try_into().ok()?);
    if crc32fast::hash(&b[8..RECORD_HEAD + n]) != crc {
        return None;
    }
    let seq = u64::from_be_bytes(b[8..16].try_into().ok()?);
    let micros = i64::from_be_bytes(b[16..24].try_into().ok()?);
    let synced = u64::from_be_bytes(b[24..32].try_into().ok()?);
    let received_at = DateTime::<Utc>::from_timestamp_micros(micros)?;
    Some((
        Entry {
            seq,
            received_at,
            body: b[RECORD_HEAD..RECORD_HEAD + n].to_vec(),
        },
        synced,
        RECORD_HEAD + n,
    ))
}

/// The records of a segment's bytes after its header. Strict: any damage is an error (for
/// sealed segments and uploaded pieces, which were written whole).
pub fn decode_records(path: &Path, header: &Header, mut b: &[u8]) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut offset = HEADER_LEN as u64;
    while !b.is_empty() {
        let expected = header.first_seq + out.len() as u64;
        match decode_record(b) {
            Some((e, _, len)) if e.seq == expected => {
                out.push(e);
                b = &b[len..];
                offset += len as u64;
            }
            _ => {
                return Err(WebhookLogError::Invalid {
                    path: path.to_path_buf(),
                    what: format!("the record at byte {offset} (sequence {expected}) is damaged"),
                });
            }
        }
    }
    Ok(out)
}

/// The file name of the segment starting at `first_seq`.
pub fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

/// The segments in `dir`, in sequence order (other files are ignored).
pub fn list_segments(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in rd {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".log")
            && stem.len() == 20
            && stem.bytes().all(|c| c.is_ascii_digit())
        {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// What [`recover`] found in a segment.
#[derive(Debug)]
pub struct Recovered {
    /// None when the segment was empty (torn at creation) and removed.
    pub header: Option<Header>,
    pub entries: Vec<Entry>,
    /// Bytes cut from the end (a torn, never acknowledged tail).
    pub dropped_bytes: u64,
}

/// Reads a segment after a crash, cutting a torn tail that was never acknowledged (see the
/// module documentation); an error when acknowledged data is damaged.
pub fn recover(path: &Path) -> Result<Recovered> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io(path))?;
    let Some(header) = decode_header(&bytes) else {
        if bytes.len() <= HEADER_LEN {
            std::fs::remove_file(path).map_err(io(path))?;
            sync_dir(path)?;
            return Ok(Recovered {
                header: None,
                entries: Vec::new(),
                dropped_bytes: bytes.len() as u64,
            });
        }
        return Err(WebhookLogError::BadHeader {
            path: path.to_path_buf(),
            what: "bad magic or checksum".into(),
        });
    };
    let mut entries = Vec::new();
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let expected = header.first_seq + entries.len() as u64;
        match decode_record(&bytes[at..]) {
            Some((e, _, len)) if e.seq == expected => {
                entries.push(e);
                at += len;
            }
            _ => {
                // The damaged record `expected` at `at`: does anything written later vouch
                // for it having been on disk?
                if let Some((witness, synced)) = voucher(&bytes[at + 1..], expected) {
                    return Err(WebhookLogError::AcknowledgedDamaged {
                        path: path.to_path_buf(),
                        offset: at as u64,
                        seq: expected,
                        witness,
                        synced,
                    });
                }
                let dropped = (bytes.len() - at) as u64;
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io(path))?;
                f.set_len(at as u64).map_err(io(path))?;
                f.sync_all().map_err(io(path))?;
                return Ok(Recovered {
                    header: Some(header),
                    entries,
                    dropped_bytes: dropped,
                });
            }
        }
    }
    Ok(Recovered {
        header: Some(header),
        entries,
        dropped_bytes: 0,
    })
}

/// The first intact record in `b` (at any offset) with a sequence after `seq` whose
/// `synced_through` reaches `seq`: (its sequence, its synced_through).
fn voucher(b: &[u8], seq: u64) -> Option<(u64, u64)> {
    for i in 0..b.len().saturating_sub(RECORD_HEAD - 1) {
        let w = &b[i..];
        // Cheap filters before the CRC: a plausible length and sequence.
        let n = u32::from_be_bytes(w[..4].try_into().ok()?) as usize;
        let s = u64::from_be_bytes(w[8..16].try_into().ok()?);
        if n > MAX_BODY || s <= seq || s > seq + (1 << 32) {
            continue;
        }
        if let Some((e, synced, _)) = decode_record(w)
            && synced >= seq
        {
            return Some((e.seq, synced));
        }
    }
    None
}

/// The highest sequence of any intact record anywhere in `bytes` (a damaged file set aside:
/// its sequence numbers must never be handed out again).
pub fn highest_intact_seq(bytes: &[u8]) -> Option<u64> {
    let mut best = decode_header(bytes).map(|h| h.first_seq.saturating_sub(1));
    for i in 0..bytes.len().saturating_sub(RECORD_HEAD - 1) {
        let n = u32::from_be_bytes(bytes[i..i + 4].try_into().ok()?) as usize;
        if n > MAX_BODY {
            continue;
        }
        if let Some((e, _, _)) = decode_record(&bytes[i..]) {
            best = Some(best.map_or(e.seq, |b| b.max(e.seq)));
        }
    }
    best
}

fn sync_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// The segment being appended to.
pub struct SegmentWriter {
    path: PathBuf,
    file: File,
    header: Header,
    entries: u64,
    buf: Vec<u8>,
}

impl SegmentWriter {
    /// Creates `dir/<first_seq>.log` with its header, durably (file and directory synced).
    pub fn create(dir: &Path, header: Header) -> Result<SegmentWriter> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(segment_name(header.first_seq));
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        file.write_all(&encode_header(&header))
            .and_then(|_| file.sync_all())
            .map_err(io(&path))?;
        sync_dir(&path)?;
        Ok(SegmentWriter {
            path,
            file,
            header,
            entries: 0,
            buf: Vec::new(),
        })
    }

    /// Reopens a recovered segment to append after its last entry.
    pub fn reopen(path: &Path, header: Header, entries: u64) -> Result<SegmentWriter> {
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(SegmentWriter {
            path: path.to_path_buf(),
            file,
            header,
            entries,
            buf: Vec::new(),
        })
    }

    pub fn header(&self) -> Header {
        self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries in the segment.
    pub fn len(&self) -> u64 {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// The sequence number the next entry must carry.
    pub fn next_seq(&self) -> u64 {
        self.header.first_seq + self.entries
    }

    /// Writes `entries` (consecutive from [`next_seq`](Self::next_seq)) in one write and
    /// `fdatasync`s: when this returns Ok they are durable and may be acknowledged.
    /// `synced_through` is the highest sequence already durable before this call.
    pub fn append(&mut self, entries: &[Entry], synced_through: u64) -> Result<()> {
        self.buf.clear();
        for (i, e) in entries.iter().enumerate() {
            if e.seq != self.next_seq() + i as u64 {
                return Err(WebhookLogError::Invalid {
                    path: self.path.clone(),
                    what: format!(
                        "sequence {} appended where {} was expected",
                        e.seq,
                        self.next_seq() + i as u64
                    ),
                });
            }
            encode_record(&mut self.buf, e, synced_through);
        }
        self.file
            .write_all(&self.buf)
            .and_then(|_| self.file.sync_data())
            .map_err(io(&self.path))?;
        self.entries += entries.len() as u64;
        Ok(())
    }
}

/// Reads a whole, closed segment strictly (header and every record intact).
pub fn read_segment(path: &Path) -> Result<(Header, Vec<Entry>)> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let header = decode_header(&bytes).ok_or_else(|| WebhookLogError::BadHeader {
        path: path.to_path_buf(),
        what: "bad magic or checksum".into(),
    })?;
    let entries = decode_records(path, &header, &bytes[HEADER_LEN..])?;
    Ok((header, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, body: &str) -> Entry {
        Entry {
            seq,
            received_at: DateTime::<Utc>::from_timestamp_micros(1_764_680_400_123_456).unwrap(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn day() -> NaiveDate {
        NaiveDate::from_ymd_opt(2025, 12, 2).unwrap()
    }

    /// Format 1, byte for byte: a header and one record. Changing this breaks every log on disk
    /// and every uploaded piece.
    #[test]
    fn golden_vector_pins_the_header_and_a_record() {
        let h = encode_header(&Header {
            first_seq: 1001,
            day: day(),
        });
        // Computed independently (Python: struct.pack and zlib.crc32).
        assert_eq!(
            hex::encode(h),
            "425357484c4f473100000000000003e901350242b9b53183"
        );
        let mut rec = Vec::new();
        encode_record(&mut rec, &entry(1001, "{\"buy\":1}"), 1000);
        assert_eq!(
            hex::encode(&rec),
            "00000009fbf9283100000000000003e9000644f7ac64364000000000000003e87b22627579223a317d"
        );
    }

    #[test]
    fn appended_entries_read_back_and_recover_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let header = Header {
            first_seq: 1,
            day: day(),
        };
        let mut w = SegmentWriter::create(dir.path(), header).unwrap();
        w.append(&[entry(1, "a"), entry(2, "bb")], 0).unwrap();
        w.append(&[entry(3, "ccc")], 2).unwrap();
        let (h, es) = read_segment(w.path()).unwrap();
        assert_eq!(h, header);
        assert_eq!(es.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        let r = recover(w.path()).unwrap();
        assert_eq!((r.entries.len(), r.dropped_bytes), (3, 0));
        assert!(w.append(&[entry(5, "gap")], 3).is_err(), "a gap is refused");
    }

    /// A record cut short by a crash (its write never completed, so its fsync never returned
    /// and it was never acknowledged) is dropped; the file is cut before it.
    #[test]
    fn a_torn_last_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(
            dir.path(),
            Header {
                first_seq: 1,
                day: day(),
            },
        )
        .unwrap();
        w.append(&[entry(1, "one")], 0).unwrap();
        w.append(&[entry(2, "two"), entry(3, "three")], 1).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let full = std::fs::metadata(&path).unwrap().len();
        // Torn inside record 3: cut 4 bytes off.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(full - 4).unwrap();
        let r = recover(&path).unwrap();
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.dropped_bytes, (RECORD_HEAD + 5 - 4) as u64);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            full - (RECORD_HEAD + 5) as u64
        );
        // Garbage in the last record (an unwritten block, say): the same.
        let mut w = SegmentWriter::reopen(&path, r.header.unwrap(), 2).unwrap();
        w.append(&[entry(3, "three")], 2).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let r = recover(&path).unwrap();
        assert_eq!(r.entries.len(), 2);
        // The recovered file is whole again.
        assert_eq!(read_segment(&path).unwrap().1.len(), 2);
    }

    /// A damaged record that a later intact record says was on disk (its `synced_through`) was
    /// acknowledged: a clear error, and the file is left as it is.
    #[test]
    fn a_damaged_acknowledged_record_is_an_error_and_nothing_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(
            dir.path(),
            Header {
                first_seq: 10,
                day: day(),
            },
        )
        .unwrap();
        w.append(&[entry(10, "ten")], 9).unwrap();
        w.append(&[entry(11, "eleven")], 10).unwrap();
        w.append(&[entry(12, "twelve")], 11).unwrap();
        let path = w.path().to_path_buf();
        let mut bytes = std::fs::read(&path).unwrap();
        // Damage record 11's body.
        let at = HEADER_LEN + RECORD_HEAD + 3 + RECORD_HEAD + 1;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        match recover(&path) {
            Err(WebhookLogError::AcknowledgedDamaged {
                seq,
                witness,
                synced,
                ..
            }) => assert_eq!((seq, witness, synced), (11, 12, 11)),
            other => panic!("expected AcknowledgedDamaged, got {other:?}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut");
        // The same damage with a later record of the same unsynced batch (synced_through 10):
        // nothing vouches for 11, so 11 and 12 are dropped.
        let mut w = SegmentWriter::create(
            &dir.path().join("b"),
            Header {
                first_seq: 10,
                day: day(),
            },
        )
        .unwrap();
        w.append(&[entry(10, "ten")], 9).unwrap();
        w.append(&[entry(11, "eleven"), entry(12, "twelve")], 10)
            .unwrap();
        let path = w.path().to_path_buf();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let r = recover(&path).unwrap();
        assert_eq!(
            r.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![10]
        );
    }

    #[test]
    fn a_segment_torn_at_creation_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(segment_name(7));
        std::fs::write(
            &path,
            &encode_header(&Header {
                first_seq: 7,
                day: day(),
            })[..10],
        )
        .unwrap();
        let r = recover(&path).unwrap();
        assert!(r.header.is_none() && !path.exists());
        assert_eq!(list_segments(dir.path()).unwrap(), Vec::<PathBuf>::new());
    }
}
