//! A streaming reader of the tar archives `pg_basebackup -Ft` writes, and an extractor.
//!
//! Format (as PostgreSQL writes it): 512-byte ustar headers (name up to 100 bytes, optional
//! 155-byte prefix, octal or base-256 size, octal checksum), each entry's data padded to 512
//! bytes, and two zero blocks at the end, possibly followed by more zero padding.
//!
//! Invariants:
//! - [`TarScanner`] is fed arbitrary slices and never buffers entry data: it reports ranges of
//!   the slice it was given, so memory stays constant whatever the archive's size.
//! - Every header's checksum is checked; an archive is complete only once both end blocks were
//!   seen ([`TarScanner::finish`]), so a truncated stream is an error, never a short restore.
//! - The extractor writes only inside its directory: absolute names and `..` are refused, and
//!   so are links and special files (a single-tablespace base backup has none).

use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const BLOCK: usize = 512;

/// What a header describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    File,
    Dir,
    Symlink,
    Other(u8),
}

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TarEntry {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub link: String,
}

/// What feeding bytes produced, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TarEvent {
    Entry(TarEntry),
    /// Bytes of the current entry: a range of the slice just fed.
    Data(Range<usize>),
    EntryEnd,
    /// Both end-of-archive blocks were seen.
    End,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    Data {
        remaining: u64,
        pad: u64,
    },
    Pad {
        remaining: u64,
    },
    /// One zero block seen; the next must be zero too.
    Trailer,
    Done,
}

/// An incremental tar parser.
pub(crate) struct TarScanner {
    state: State,
    block: [u8; BLOCK],
    filled: usize,
    offset: u64,
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn octal(field: &[u8]) -> Option<u64> {
    let s = cstr(field);
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn number(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        // base-256 (GNU), which PostgreSQL uses for sizes over 8 GiB
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        Some(v)
    } else {
        octal(field)
    }
}

impl TarScanner {
    pub fn new() -> TarScanner {
        TarScanner {
            state: State::Header,
            block: [0; BLOCK],
            filled: 0,
            offset: 0,
        }
    }

    /// Checks that the archive ended properly.
    pub fn finish(&self) -> Result<(), String> {
        match self.state {
            State::Done => Ok(()),
            State::Data { remaining, .. } => Err(format!(
                "the archive is truncated: it ends {remaining} bytes short of the end of a file"
            )),
            _ => Err(format!(
                "the archive is truncated: it ends after {} bytes without its end-of-archive blocks",
                self.offset
            )),
        }
    }

    fn parse_header(&self) -> Result<TarEntry, String> {
        let h = &self.block;
        let at = self.offset - BLOCK as u64;
        let recorded = octal(&h[148..156])
            .ok_or_else(|| format!("unreadable header checksum at byte {at}"))?;
        let computed: u64 = h
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    b as u64
                }
            })
            .sum();
        if recorded != computed {
            return Err(format!(
                "damaged header at byte {at} (checksum {recorded} recorded, {computed} computed)"
            ));
        }
        let mut path = cstr(&h[0..100]);
        if &h[257..262] == b"ustar" {
            let prefix = cstr(&h[345..500]);
            if !prefix.is_empty() {
                path = format!("{prefix}/{path}");
            }
        }
        let size = number(&h[124..136])
            .ok_or_else(|| format!("unreadable size in header at byte {at}"))?;
        let mode = octal(&h[100..108]).unwrap_or(0o600) as u32;
        let kind = match h[156] {
            b'0' | 0 | b'7' => EntryKind::File,
            b'5' => EntryKind::Dir,
            b'2' => EntryKind::Symlink,
            other => EntryKind::Other(other),
        };
        Ok(TarEntry {
            path,
            kind,
            size: if kind == EntryKind::Dir { 0 } else { size },
            mode,
            link: cstr(&h[157..257]),
        })
    }

    /// Consumes `buf`, returning what it contained.
    pub fn feed(&mut self, buf: &[u8]) -> Result<Vec<TarEvent>, String> {
        let mut events = Vec::new();
        let mut i = 0;
        while i < buf.len() {
            match self.state {
                State::Header | State::Trailer | State::Done => {
                    let n = (BLOCK - self.filled).min(buf.len() - i);
                    self.block[self.filled..self.filled + n].copy_from_slice(&buf[i..i + n]);
                    self.filled += n;
                    self.offset += n as u64;
                    i += n;
                    if self.filled < BLOCK {
                        continue;
                    }
                    self.filled = 0;
                    let zero = self.block.iter().all(|&b| b == 0);
                    match (self.state, zero) {
                        (State::Header, true) => self.state = State::Trailer,
                        (State::Header, false) => {
                            let entry = self.parse_header()?;
                            let size = entry.size;
                            events.push(TarEvent::Entry(entry));
                            if size == 0 {
                                events.push(TarEvent::EntryEnd);
                            } else {
                                self.state = State::Data {
                                    remaining: size,
                                    pad: padding(size),
                                };
                            }
                        }
                        (State::Trailer, true) => {
                            self.state = State::Done;
                            events.push(TarEvent::End);
                        }
                        (State::Trailer, false) => {
                            return Err(format!(
                                "a lone zero block at byte {} in the middle of the archive",
                                self.offset - 2 * BLOCK as u64
                            ));
                        }
                        (_, true) => {}
                        (_, false) => {
                            return Err(format!(
                                "data after the end of the archive at byte {}",
                                self.offset - BLOCK as u64
                            ));
                        }
                    }
                }
                State::Data { remaining, pad } => {
                    let n = remaining.min((buf.len() - i) as u64) as usize;
                    events.push(TarEvent::Data(i..i + n));
                    i += n;
                    self.offset += n as u64;
                    let remaining = remaining - n as u64;
                    if remaining == 0 {
                        events.push(TarEvent::EntryEnd);
                        self.state = if pad > 0 {
                            State::Pad { remaining: pad }
                        } else {
                            State::Header
                        };
                    } else {
                        self.state = State::Data { remaining, pad };
                    }
                }
                State::Pad { remaining } => {
                    let n = remaining.min((buf.len() - i) as u64) as usize;
                    i += n;
                    self.offset += n as u64;
                    let remaining = remaining - n as u64;
                    self.state = if remaining == 0 {
                        State::Header
                    } else {
                        State::Pad { remaining }
                    };
                }
            }
        }
        Ok(events)
    }
}

/// Figures of an extraction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Extracted {
    pub files: u64,
    pub dirs: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Bytes of archive read.
    pub archive_bytes: u64,
}

/// A member's path under `dir`, refusing anything that would leave it.
fn safe_join(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let rel = Path::new(name);
    let mut out = dir.to_path_buf();
    let mut any = false;
    for c in rel.components() {
        match c {
            Component::Normal(p) => {
                out.push(p);
                any = true;
            }
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "refusing archive member {name:?}: it points outside the target directory"
                ));
            }
        }
    }
    if !any {
        return Err(format!("archive member with an empty name ({name:?})"));
    }
    Ok(out)
}

/// Why an extraction stopped: the stream could not be read (the error kept whole, so a damaged
/// repository object is told from a full disk by its type), or anything else.
#[derive(Debug)]
pub(crate) enum ExtractError {
    Read(std::io::Error),
    Other(String),
}

impl From<String> for ExtractError {
    fn from(why: String) -> ExtractError {
        ExtractError::Other(why)
    }
}

/// Extracts a tar stream into `dir` (which must exist), streaming each file to disk. Files get
/// mode 0600 and directories 0700, as PostgreSQL wants its data directory.
pub(crate) async fn extract<R: AsyncRead + Unpin>(
    mut reader: R,
    dir: &Path,
) -> Result<Extracted, ExtractError> {
    let mut scanner = TarScanner::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut stats = Extracted::default();
    let mut current: Option<(tokio::fs::File, PathBuf)> = None;
    loop {
        let n = reader.read(&mut buf).await.map_err(ExtractError::Read)?;
        if n == 0 {
            break;
        }
        stats.archive_bytes += n as u64;
        for ev in scanner.feed(&buf[..n])? {
            match ev {
                TarEvent::Entry(e) => {
                    let path = safe_join(dir, &e.path)?;
                    match e.kind {
                        EntryKind::Dir => {
                            tokio::fs::create_dir_all(&path).await.map_err(|err| {
                                format!("cannot create {}: {err}", path.display())
                            })?;
                            let _ = tokio::fs::set_permissions(
                                &path,
                                std::fs::Permissions::from_mode(0o700),
                            )
                            .await;
                            stats.dirs += 1;
                        }
                        EntryKind::File => {
                            if let Some(parent) = path.parent() {
                                tokio::fs::create_dir_all(parent).await.map_err(|err| {
                                    format!("cannot create {}: {err}", parent.display())
                                })?;
                            }
                            let file = tokio::fs::OpenOptions::new()
                                .write(true)
                                .create_new(true)
                                .mode(0o600)
                                .open(&path)
                                .await
                                .map_err(|err| {
                                    format!("cannot create {}: {err}", path.display())
                                })?;
                            current = Some((file, path));
                            stats.files += 1;
                        }
                        EntryKind::Symlink => {
                            return Err(ExtractError::Other(format!(
                                "the base backup holds a link {} -> {}: tablespaces outside the data directory are not supported",
                                e.path, e.link
                            )));
                        }
                        EntryKind::Other(flag) => {
                            return Err(ExtractError::Other(format!(
                                "the base backup holds {} of tar type {:?}, which a PostgreSQL base backup never has",
                                e.path, flag as char
                            )));
                        }
                    }
                }
                TarEvent::Data(r) => {
                    if let Some((file, path)) = current.as_mut() {
                        file.write_all(&buf[r.clone()])
                            .await
                            .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
                        stats.bytes += r.len() as u64;
                    }
                }
                TarEvent::EntryEnd => {
                    if let Some((mut file, path)) = current.take() {
                        file.flush()
                            .await
                            .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
                    }
                }
                TarEvent::End => {}
            }
        }
    }
    scanner.finish()?;
    Ok(stats)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ustar header (for test archives here and in the restore tests).
    pub(crate) fn header(name: &str, size: u64, flag: u8) -> Vec<u8> {
        let mut h = vec![0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000600");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[156] = flag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| b as u64).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    fn archive() -> Vec<u8> {
        let mut a = header("global/", 0, b'5');
        a.extend(header("global/pg_control", 700, b'0'));
        a.extend(vec![7u8; 700]);
        a.extend(vec![0u8; padding(700) as usize]);
        a.extend(header("PG_VERSION", 3, b'0'));
        a.extend(b"15\n");
        a.extend(vec![0u8; padding(3) as usize]);
        a.extend(vec![0u8; 2048]);
        a
    }

    #[test]
    fn scans_in_any_slicing() {
        let a = archive();
        for step in [1, 7, 512, 513, 4096, a.len()] {
            let mut s = TarScanner::new();
            let mut names = Vec::new();
            let mut data = 0;
            for chunk in a.chunks(step) {
                for ev in s.feed(chunk).unwrap() {
                    match ev {
                        TarEvent::Entry(e) => names.push(e.path),
                        TarEvent::Data(r) => data += r.len(),
                        _ => {}
                    }
                }
            }
            s.finish().unwrap();
            assert_eq!(names, ["global/", "global/pg_control", "PG_VERSION"]);
            assert_eq!(data, 703);
        }
    }

    #[test]
    fn truncation_and_damage_are_errors() {
        let a = archive();
        let mut s = TarScanner::new();
        s.feed(&a[..1000]).unwrap();
        assert!(s.finish().unwrap_err().contains("truncated"));
        let mut bad = a.clone();
        bad[600] ^= 1; // inside the second header
        let mut s = TarScanner::new();
        assert!(s.feed(&bad).unwrap_err().contains("damaged header"));
    }

    #[test]
    fn paths_stay_inside() {
        let d = Path::new("/x");
        assert_eq!(safe_join(d, "./base/1").unwrap(), Path::new("/x/base/1"));
        assert!(safe_join(d, "../etc/passwd").is_err());
        assert!(safe_join(d, "/etc/passwd").is_err());
        assert!(safe_join(d, "").is_err());
    }

    #[tokio::test]
    async fn extracts() {
        let dir = tempfile::tempdir().unwrap();
        let stats = extract(&archive()[..], dir.path()).await.unwrap();
        assert_eq!((stats.files, stats.dirs, stats.bytes), (2, 1, 703));
        assert_eq!(
            std::fs::read(dir.path().join("PG_VERSION")).unwrap(),
            b"15\n"
        );
        let truncated = archive();
        let other = tempfile::tempdir().unwrap();
        assert!(extract(&truncated[..1600], other.path()).await.is_err());
    }
}
