//! Files sources: directory trees (application files, ML models, configuration files) read into
//! the data path, and written back.
//!
//! A backup of a files source is one stream per regular file (so a retrained model that changed
//! 5% shares the other 95% of its chunks with the previous backup, and a restore of a few paths
//! reads only their streams) plus the tree: every entry's path, type, mode, modification time,
//! size, symlink target and, for files, the SHA3-256 of the bytes read. The tree travels in the
//! manifest (`extra.files`, see docs/FORMAT.md, "Files backups").
//!
//! # Paths
//! An entry's path is its absolute path on the source machine without the leading `/`
//! (`srv/app/models/m.bin`): several configured roots never collide, and `restore --to-dir DIR`
//! writes `DIR/srv/app/models/m.bin`. Paths are stored as UTF-8; a name that is not UTF-8 is
//! refused at backup time with its path (rather than stored under a lossy name that would
//! restore elsewhere).
//!
//! # Selection
//! `exclude` patterns without a `/` match any path component (`node_modules`, `*.log`); with a
//! `/` they match the whole path (`srv/app/cache/**`). An excluded directory is not descended
//! into. `include` patterns, when given, keep only the regular files and symlinks whose path
//! matches (directories are kept while they may hold a match). Symlinks are stored as links,
//! never followed. Other file types (sockets, devices, FIFOs) are skipped with a warning.
//!
//! # Invariants
//! - Restore never writes outside its target: every stored path is checked to be relative and
//!   free of `.`, `..` and empty components before anything is written, and a path that is not
//!   is an error naming it (a damaged or forged tree must not become a write elsewhere).
//! - Restore refuses to overwrite: an existing file or link in the target is an error before
//!   anything is written (`--dry-run` lists the same plan and writes nothing).
//! - A file is written to `NAME.backstop-partial` and renamed into place only after its bytes
//!   matched the stored size and SHA3-256; modes and times are applied after the contents, and
//!   directories' times last (writing into a directory changes its time).

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::capture::Measured;
use crate::pg::logical::{DumpSink, DumpSource, PartReader, SinkError};

/// A configured files source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilesSource {
    /// Absolute roots: directories or single files.
    pub paths: Vec<PathBuf>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the files source's {what} pattern {pattern:?} is not a glob: {why}")]
    BadPattern {
        what: &'static str,
        pattern: String,
        why: String,
    },
    #[error(
        "{0}: the files source's paths must be absolute (e.g. /srv/app); a relative path would depend on where backstop runs"
    )]
    NotAbsolute(PathBuf),
    #[error("{0}: the name is not UTF-8; rename it or exclude it")]
    NotUtf8(PathBuf),
    #[error(
        "the backup's tree holds the path {0:?}, which is not a plain relative path; refusing to write outside the target (the manifest is damaged or forged)"
    )]
    UnsafePath(String),
    #[error("{0} exists already; restore into an empty or new directory (nothing was written)")]
    Exists(PathBuf),
    #[error("no entry of the backup matches {0:?}; `backstop show ID` lists its paths")]
    NoMatch(String),
    #[error(
        "{path}: the restored bytes do not match the backup ({why}); the partial file was removed"
    )]
    Mismatch { path: String, why: String },
    #[error("reading the stored stream of {path}: {source}")]
    Stream { path: String, source: io::Error },
    #[error("storing {path}: {source}")]
    Sink { path: String, source: SinkError },
    #[error("the files scan stopped: {0}")]
    Task(String),
}

impl FilesError {
    /// Whether trying again may succeed: I/O on the source or the target (a busy disk, a
    /// vanished mount) may; a bad pattern, an unsafe path or a mismatch will not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            FilesError::Io { .. } | FilesError::Stream { .. } | FilesError::Sink { .. }
        )
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// One entry of a files backup's tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// Relative, `/`-separated (see the module docs).
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Bytes (files only; 0 otherwise).
    #[serde(default)]
    pub size: u64,
    /// SHA3-256 of the bytes read (files only), lowercase hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha3: Option<String>,
    /// Where a symlink points, as stored in the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl TreeEntry {
    /// The name of the repository stream holding a file's bytes.
    pub fn stream_name(&self) -> String {
        format!("files/{}", self.path)
    }
}

/// What [`scan`] found: the entries in path order, and the absolute path of each file to read.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    pub entries: Vec<TreeEntry>,
    /// `(index into entries, absolute path)` of every regular file.
    pub files: Vec<(usize, PathBuf)>,
    /// Entries skipped because of their type (sockets, devices, FIFOs), for the log.
    pub skipped: Vec<PathBuf>,
}

struct Patterns {
    any_component: globset::GlobSet,
    whole_path: globset::GlobSet,
    empty: bool,
}

impl Patterns {
    fn new(what: &'static str, patterns: &[String]) -> Result<Patterns, FilesError> {
        let mut component = globset::GlobSetBuilder::new();
        let mut whole = globset::GlobSetBuilder::new();
        for p in patterns {
            let glob = globset::GlobBuilder::new(p.trim_start_matches('/'))
                .literal_separator(true)
                .build()
                .map_err(|e| FilesError::BadPattern {
                    what,
                    pattern: p.clone(),
                    why: e.to_string(),
                })?;
            if p.contains('/') {
                whole.add(glob);
            } else {
                component.add(glob);
            }
        }
        let build = |b: globset::GlobSetBuilder| {
            b.build().map_err(|e| FilesError::BadPattern {
                what,
                pattern: patterns.join(", "),
                why: e.to_string(),
            })
        };
        Ok(Patterns {
            any_component: build(component)?,
            whole_path: build(whole)?,
            empty: patterns.is_empty(),
        })
    }

    fn matches(&self, rel: &str) -> bool {
        self.whole_path.is_match(rel) || rel.split('/').any(|c| self.any_component.is_match(c))
    }
}

fn rel_of(path: &Path) -> Result<String, FilesError> {
    let s = path
        .to_str()
        .ok_or_else(|| FilesError::NotUtf8(path.to_path_buf()))?;
    Ok(s.trim_start_matches('/').to_string())
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

/// Walks the source's roots (blocking: run it on a blocking thread).
pub fn scan(src: &FilesSource) -> Result<Scan, FilesError> {
    let exclude = Patterns::new("exclude", &src.exclude)?;
    let include = Patterns::new("include", &src.include)?;
    let mut out = Scan::default();
    let mut seen = BTreeSet::new();
    for root in &src.paths {
        if !root.is_absolute() {
            return Err(FilesError::NotAbsolute(root.clone()));
        }
        // The root's parents are entries too (with their modes), so a restore recreates them.
        let mut parents = Vec::new();
        let mut p = root.parent();
        while let Some(dir) = p {
            if dir.as_os_str() != "/" {
                parents.push(dir.to_path_buf());
            }
            p = dir.parent();
        }
        for dir in parents.into_iter().rev() {
            let rel = rel_of(&dir)?;
            if seen.insert(rel.clone()) {
                let m = std::fs::metadata(&dir).map_err(io_err(&dir))?;
                out.entries.push(TreeEntry {
                    path: rel,
                    kind: EntryKind::Dir,
                    mode: m.mode() & 0o7777,
                    mtime_ns: mtime_ns(&m),
                    size: 0,
                    sha3: None,
                    target: None,
                });
            }
        }
        walk(root, &exclude, &include, &mut seen, &mut out)?;
    }
    // Path order by components, so parents come before their children.
    let mut files: std::collections::HashMap<usize, PathBuf> = out.files.drain(..).collect();
    let mut all: Vec<(TreeEntry, Option<PathBuf>)> = out
        .entries
        .drain(..)
        .enumerate()
        .map(|(i, e)| {
            let f = files.remove(&i);
            (e, f)
        })
        .collect();
    all.sort_by(|a, b| a.0.path.split('/').cmp(b.0.path.split('/')));
    for (e, f) in all {
        if let Some(f) = f {
            out.files.push((out.entries.len(), f));
        }
        out.entries.push(e);
    }
    Ok(out)
}

fn walk(
    path: &Path,
    exclude: &Patterns,
    include: &Patterns,
    seen: &mut BTreeSet<String>,
    out: &mut Scan,
) -> Result<(), FilesError> {
    let rel = rel_of(path)?;
    if !exclude.empty && exclude.matches(&rel) {
        return Ok(());
    }
    let m = std::fs::symlink_metadata(path).map_err(io_err(path))?;
    let ft = m.file_type();
    let mut entry = TreeEntry {
        path: rel.clone(),
        kind: EntryKind::File,
        mode: m.mode() & 0o7777,
        mtime_ns: mtime_ns(&m),
        size: 0,
        sha3: None,
        target: None,
    };
    if ft.is_dir() {
        entry.kind = EntryKind::Dir;
        let mut children: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io_err(path))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(io_err(path))?;
        children.sort();
        if seen.insert(rel) {
            out.entries.push(entry);
        }
        for c in children {
            walk(&c, exclude, include, seen, out)?;
        }
        return Ok(());
    }
    if !include.empty && !include.matches(&rel) {
        return Ok(());
    }
    if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(io_err(path))?;
        entry.kind = EntryKind::Symlink;
        entry.target = Some(
            target
                .to_str()
                .ok_or_else(|| FilesError::NotUtf8(target.clone()))?
                .to_string(),
        );
    } else if ft.is_file() {
        entry.size = m.len();
        out.files.push((out.entries.len(), path.to_path_buf()));
    } else {
        tracing::warn!(path = %path.display(), "not a file, directory or symlink; skipped");
        out.skipped.push(path.to_path_buf());
        return Ok(());
    }
    if seen.insert(rel) {
        out.entries.push(entry);
    } else if entry.kind == EntryKind::File {
        // A root given twice: read once.
        out.files.pop();
    }
    Ok(())
}

/// Drops directories that hold nothing selected when `include` patterns narrowed the tree
/// (an include that keeps `*.bin` should not restore every empty directory of the source).
/// Without include patterns every directory is kept: empty directories are part of a tree.
pub fn prune_unselected_dirs(scan: &mut Scan, src: &FilesSource) {
    if src.include.is_empty() {
        return;
    }
    let keep: BTreeSet<String> = scan
        .entries
        .iter()
        .filter(|e| e.kind != EntryKind::Dir)
        .flat_map(|e| {
            let parts: Vec<&str> = e.path.split('/').collect();
            (1..parts.len())
                .map(|n| parts[..n].join("/"))
                .collect::<Vec<_>>()
        })
        .collect();
    let old = std::mem::take(&mut scan.entries);
    let mut remap = vec![usize::MAX; old.len()];
    for (i, e) in old.into_iter().enumerate() {
        if e.kind != EntryKind::Dir || keep.contains(&e.path) {
            remap[i] = scan.entries.len();
            scan.entries.push(e);
        }
    }
    for f in &mut scan.files {
        f.0 = remap[f.0];
    }
}

/// Checks a stored path before it is joined to a target directory.
pub fn safe_relative(path: &str) -> Result<PathBuf, FilesError> {
    let unsafe_path = || FilesError::UnsafePath(path.to_string());
    if path.is_empty() || path.starts_with('/') || path.contains('\0') {
        return Err(unsafe_path());
    }
    let p = PathBuf::from(path);
    for c in p.components() {
        match c {
            Component::Normal(n) if !n.is_empty() => {}
            _ => return Err(unsafe_path()),
        }
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(unsafe_path());
    }
    Ok(p)
}

/// The entries a restore of `selection` (path prefixes, component-wise; empty: everything)
/// writes: the selected entries and every directory above them, in tree order.
pub fn select<'a>(
    entries: &'a [TreeEntry],
    selection: &[String],
) -> Result<Vec<&'a TreeEntry>, FilesError> {
    if selection.is_empty() {
        return Ok(entries.iter().collect());
    }
    let wanted: Vec<String> = selection
        .iter()
        .map(|s| s.trim_matches('/').to_string())
        .collect();
    let under =
        |path: &str, prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    for w in &wanted {
        if !entries.iter().any(|e| under(&e.path, w)) {
            return Err(FilesError::NoMatch(w.clone()));
        }
    }
    Ok(entries
        .iter()
        .filter(|e| {
            wanted
                .iter()
                .any(|w| under(&e.path, w) || (e.kind == EntryKind::Dir && under(w, &e.path)))
        })
        .collect())
}

/// What a restore would write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RestorePlan {
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Every path written, relative to the target, in order.
    pub paths: Vec<String>,
}

/// Opens the stored bytes of a file entry (the repository's stream `files/<path>`).
#[async_trait]
pub trait StoredFiles: Send + Sync {
    async fn open(&self, entry: &TreeEntry) -> io::Result<PartReader>;
}

/// Checks every selected path and the target, and returns the plan. Nothing is written.
pub fn plan(selected: &[&TreeEntry], to_dir: &Path) -> Result<RestorePlan, FilesError> {
    let mut plan = RestorePlan::default();
    for e in selected {
        let rel = safe_relative(&e.path)?;
        let dest = to_dir.join(&rel);
        match e.kind {
            EntryKind::Dir => {
                if let Ok(m) = std::fs::symlink_metadata(&dest)
                    && !m.is_dir()
                {
                    return Err(FilesError::Exists(dest));
                }
                plan.dirs += 1;
            }
            EntryKind::File | EntryKind::Symlink => {
                if std::fs::symlink_metadata(&dest).is_ok() {
                    return Err(FilesError::Exists(dest));
                }
                if e.kind == EntryKind::File {
                    plan.files += 1;
                    plan.bytes += e.size;
                } else {
                    plan.symlinks += 1;
                }
            }
        }
        plan.paths.push(e.path.clone());
    }
    Ok(plan)
}

/// Writes the selected entries under `to_dir` (see the module's invariants). `plan` must have
/// accepted them.
pub async fn write(
    selected: &[&TreeEntry],
    to_dir: &Path,
    stored: &dyn StoredFiles,
) -> Result<RestorePlan, FilesError> {
    let plan = plan(selected, to_dir)?;
    tokio::fs::create_dir_all(to_dir)
        .await
        .map_err(io_err(to_dir))?;
    for e in selected {
        let dest = to_dir.join(safe_relative(&e.path)?);
        match e.kind {
            EntryKind::Dir => {
                tokio::fs::create_dir_all(&dest)
                    .await
                    .map_err(io_err(&dest))?;
            }
            EntryKind::Symlink => {
                if let Some(parent) = dest.parent() {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .map_err(io_err(parent))?;
                }
                let target = e.target.clone().unwrap_or_default();
                tokio::fs::symlink(&target, &dest)
                    .await
                    .map_err(io_err(&dest))?;
            }
            EntryKind::File => {
                if let Some(parent) = dest.parent() {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .map_err(io_err(parent))?;
                }
                write_file(e, &dest, stored).await?;
                set_mode_and_time(&dest, e).await?;
            }
        }
    }
    // Directories last, deepest first: writing their children changed their times.
    for e in selected.iter().rev().filter(|e| e.kind == EntryKind::Dir) {
        let dest = to_dir.join(safe_relative(&e.path)?);
        set_mode_and_time(&dest, e).await?;
    }
    Ok(plan)
}

async fn write_file(
    e: &TreeEntry,
    dest: &Path,
    stored: &dyn StoredFiles,
) -> Result<(), FilesError> {
    let mut partial = dest.as_os_str().to_os_string();
    partial.push(".backstop-partial");
    let partial = PathBuf::from(partial);
    let result = async {
        let stream = stored.open(e).await.map_err(|source| FilesError::Stream {
            path: e.path.clone(),
            source,
        })?;
        let (mut reader, measure) = Measured::new(stream);
        let mut out = tokio::fs::File::create(&partial)
            .await
            .map_err(io_err(&partial))?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .map_err(|source| FilesError::Stream {
                    path: e.path.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).await.map_err(io_err(&partial))?;
        }
        out.sync_all().await.map_err(io_err(&partial))?;
        let (bytes, sha3) = measure.figures();
        if bytes != e.size {
            return Err(FilesError::Mismatch {
                path: e.path.clone(),
                why: format!("{bytes} bytes, {} expected", e.size),
            });
        }
        if let Some(expected) = &e.sha3
            && &sha3 != expected
        {
            return Err(FilesError::Mismatch {
                path: e.path.clone(),
                why: format!("SHA3-256 {sha3}, {expected} expected"),
            });
        }
        tokio::fs::rename(&partial, dest)
            .await
            .map_err(io_err(dest))
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    result
}

async fn set_mode_and_time(dest: &Path, e: &TreeEntry) -> Result<(), FilesError> {
    let dest_owned = dest.to_path_buf();
    let (mode, mtime_ns) = (e.mode, e.mtime_ns);
    tokio::task::spawn_blocking(move || -> io::Result<()> {
        std::fs::set_permissions(&dest_owned, std::fs::Permissions::from_mode(mode))?;
        let t = if mtime_ns >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::from_nanos(mtime_ns as u64)
        } else {
            std::time::UNIX_EPOCH
        };
        // A directory opens read-only too; futimens on its descriptor sets its time.
        let f = std::fs::File::open(&dest_owned)?;
        f.set_times(std::fs::FileTimes::new().set_modified(t))
    })
    .await
    .map_err(|e| FilesError::Io {
        path: dest.to_path_buf(),
        source: io::Error::other(e),
    })?
    .map_err(io_err(dest))
}

/// The report of a files backup, stored in its manifest: the tree and what the read found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesReport {
    /// The configured roots, as given.
    pub roots: Vec<String>,
    pub entries: Vec<TreeEntry>,
    /// Regular files stored, and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// Files whose size or time changed while they were read: stored as read (a backup of a
    /// file being written is only as consistent as the writer makes it), and named here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_while_read: Vec<String>,
    /// Files that vanished between the scan and their read: not in the tree.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vanished: Vec<String>,
    /// Entries skipped for their type (sockets, devices, FIFOs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// One file as read by [`backup`].
struct FileRead {
    bytes: u64,
    sha3: String,
    /// Its size or time differed after the read.
    changed: bool,
}

/// Backs up `src` into `sink`: one part per regular file (named [`TreeEntry::stream_name`]),
/// `parallel` files at a time; returns the tree with every file's size and SHA3-256 as read.
pub async fn backup(
    src: &FilesSource,
    sink: &dyn DumpSink,
    parallel: usize,
) -> Result<FilesReport, FilesError> {
    use futures::StreamExt;
    let scanned = {
        let src = src.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = scan(&src)?;
            prune_unselected_dirs(&mut s, &src);
            Ok::<_, FilesError>(s)
        })
        .await
        .map_err(|e| FilesError::Task(e.to_string()))??
    };
    let Scan {
        mut entries,
        files,
        skipped,
    } = scanned;
    let reads = futures::stream::iter(files.into_iter().map(|(i, path)| {
        let part = entries[i].stream_name();
        let rel = entries[i].path.clone();
        async move {
            let before = match tokio::fs::symlink_metadata(&path).await {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((i, None)),
                Err(source) => return Err(FilesError::Io { path, source }),
            };
            let file = match tokio::fs::File::open(&path).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((i, None)),
                Err(source) => return Err(FilesError::Io { path, source }),
            };
            let (reader, measure) = Measured::new(file);
            sink.put_part(&part, Box::pin(reader))
                .await
                .map_err(|source| FilesError::Sink {
                    path: rel.clone(),
                    source,
                })?;
            let after = tokio::fs::symlink_metadata(&path).await.ok();
            let changed =
                after.is_none_or(|a| a.len() != before.len() || mtime_ns(&a) != mtime_ns(&before));
            let (bytes, sha3) = measure.figures();
            Ok((
                i,
                Some(FileRead {
                    bytes,
                    sha3,
                    changed,
                }),
            ))
        }
    }))
    .buffer_unordered(parallel.max(1));
    let results: Vec<Result<(usize, Option<FileRead>), FilesError>> = reads.collect().await;
    let mut report = FilesReport {
        roots: src.paths.iter().map(|p| p.display().to_string()).collect(),
        skipped: skipped.iter().map(|p| p.display().to_string()).collect(),
        ..Default::default()
    };
    let mut gone = BTreeSet::new();
    for r in results {
        let (i, read) = r?;
        match read {
            None => {
                tracing::warn!(path = %entries[i].path, "vanished before it was read; not in the backup");
                report.vanished.push(entries[i].path.clone());
                gone.insert(i);
            }
            Some(FileRead {
                bytes,
                sha3,
                changed,
            }) => {
                let e = &mut entries[i];
                if changed {
                    tracing::warn!(path = %e.path, "changed while it was read; stored as read");
                    report.changed_while_read.push(e.path.clone());
                }
                // The tree says what the stream holds, which a restore checks.
                e.size = bytes;
                e.sha3 = Some(sha3);
                report.files += 1;
                report.bytes += bytes;
            }
        }
    }
    report.entries = entries
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !gone.contains(i))
        .map(|(_, e)| e)
        .collect();
    report.changed_while_read.sort();
    report.vanished.sort();
    Ok(report)
}

/// Stored files read through a [`DumpSource`] (the repository glue's reader of a backup's
/// streams).
pub struct FromParts<'a>(pub &'a dyn DumpSource);

#[async_trait]
impl StoredFiles for FromParts<'_> {
    async fn open(&self, entry: &TreeEntry) -> io::Result<PartReader> {
        self.0
            .open_part(&entry.stream_name())
            .await
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_paths_that_leave_the_target_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/./b",
            "./a",
            "a/",
            "a\0b",
        ] {
            assert!(safe_relative(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            safe_relative("srv/app/m.bin").unwrap(),
            PathBuf::from("srv/app/m.bin")
        );
    }

    #[test]
    fn exclude_patterns_match_components_or_whole_paths() {
        let p = Patterns::new(
            "exclude",
            &[
                "node_modules".into(),
                "*.log".into(),
                "srv/app/cache/**".into(),
            ],
        )
        .unwrap();
        assert!(p.matches("srv/app/node_modules"));
        assert!(p.matches("srv/app/node_modules/x/y.js"));
        assert!(p.matches("srv/app/logs/a.log"));
        assert!(p.matches("srv/app/cache/a/b"));
        assert!(!p.matches("srv/app/src/main.js"));
        assert!(!p.matches("srv/app/cachet/a"));
        let err = Patterns::new("exclude", &["[".into()]).err().unwrap();
        assert!(err.to_string().contains("exclude pattern \"[\""), "{err}");
    }

    #[test]
    fn a_selection_keeps_the_directories_above_it() {
        let e = |path: &str, kind| TreeEntry {
            path: path.into(),
            kind,
            mode: 0o755,
            mtime_ns: 0,
            size: 0,
            sha3: None,
            target: None,
        };
        let tree = vec![
            e("srv", EntryKind::Dir),
            e("srv/app", EntryKind::Dir),
            e("srv/app/a", EntryKind::File),
            e("srv/app/models", EntryKind::Dir),
            e("srv/app/models/m.bin", EntryKind::File),
            e("srv/app/modelsx", EntryKind::File),
        ];
        let picked: Vec<&str> = select(&tree, &["srv/app/models".into()])
            .unwrap()
            .iter()
            .map(|e| e.path.as_str())
            .collect();
        assert_eq!(
            picked,
            ["srv", "srv/app", "srv/app/models", "srv/app/models/m.bin"]
        );
        assert!(matches!(
            select(&tree, &["srv/nope".into()]),
            Err(FilesError::NoMatch(_))
        ));
    }

    /// Parts kept as files in a directory: the sink and source a repository would be.
    struct DirParts(PathBuf);

    impl DirParts {
        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name.replace('/', "%"))
        }
    }

    #[async_trait]
    impl DumpSink for DirParts {
        async fn put_part(
            &self,
            name: &str,
            mut reader: PartReader,
        ) -> Result<crate::pg::logical::PartStored, SinkError> {
            let mut out = tokio::fs::File::create(self.file(name)).await?;
            tokio::io::copy(&mut reader, &mut out).await?;
            Ok(Default::default())
        }
    }

    #[async_trait]
    impl DumpSource for DirParts {
        async fn open_part(&self, name: &str) -> Result<PartReader, SinkError> {
            Ok(Box::pin(tokio::fs::File::open(self.file(name)).await?))
        }
    }

    #[tokio::test]
    async fn a_tree_round_trips_with_modes_times_links_and_empty_dirs() {
        let src = tempfile::tempdir().unwrap();
        let app = src.path().join("app");
        std::fs::create_dir_all(app.join("models")).unwrap();
        std::fs::create_dir_all(app.join("empty")).unwrap();
        std::fs::create_dir_all(app.join("node_modules/x")).unwrap();
        std::fs::write(app.join("node_modules/x/i.js"), "x").unwrap();
        std::fs::write(app.join("models/m.bin"), vec![7u8; 300_000]).unwrap();
        std::fs::write(app.join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::write(app.join("debug.log"), "noise").unwrap();
        std::fs::set_permissions(app.join("run.sh"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::os::unix::fs::symlink("models/m.bin", app.join("current")).unwrap();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
        std::fs::File::open(app.join("models/m.bin"))
            .unwrap()
            .set_times(std::fs::FileTimes::new().set_modified(old))
            .unwrap();
        let source = FilesSource {
            paths: vec![app.clone()],
            include: vec![],
            exclude: vec!["node_modules".into(), "*.log".into()],
        };
        let stored = tempfile::tempdir().unwrap();
        let parts = DirParts(stored.path().to_path_buf());
        let report = backup(&source, &parts, 2).await.unwrap();
        let paths: Vec<String> = report.entries.iter().map(|e| e.path.clone()).collect();
        let base = app.to_str().unwrap().trim_start_matches('/').to_string();
        assert!(paths.contains(&format!("{base}/empty")), "{paths:?}");
        assert!(
            !paths
                .iter()
                .any(|p| p.contains("node_modules") || p.ends_with(".log"))
        );
        assert_eq!((report.files, report.bytes), (2, 300_000 + 10));
        let model = report
            .entries
            .iter()
            .find(|e| e.path.ends_with("models/m.bin"))
            .unwrap();
        assert_eq!(model.sha3.as_deref().map(str::len), Some(64));
        let disk = FromParts(&parts);
        let to = tempfile::tempdir().unwrap();
        let all = select(&report.entries, &[]).unwrap();
        let done = write(&all, to.path(), &disk).await.unwrap();
        assert_eq!((done.files, done.symlinks), (2, 1));
        let back = to.path().join(&base);
        assert_eq!(
            std::fs::read(back.join("models/m.bin")).unwrap(),
            vec![7u8; 300_000]
        );
        let m = std::fs::metadata(back.join("run.sh")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o750);
        let m = std::fs::metadata(back.join("models/m.bin")).unwrap();
        assert_eq!(m.modified().unwrap(), old);
        assert_eq!(
            std::fs::read_link(back.join("current")).unwrap(),
            PathBuf::from("models/m.bin")
        );
        assert!(back.join("empty").is_dir());
        assert!(!back.join("node_modules").exists());

        // Again into the same place: refused before anything is written.
        let err = write(&all, to.path(), &disk).await.unwrap_err();
        assert!(matches!(err, FilesError::Exists(_)), "{err}");

        // Bytes that do not match the tree: an error naming the file, no partial left.
        let to2 = tempfile::tempdir().unwrap();
        let victim = parts.file(&model.stream_name());
        let mut bytes = std::fs::read(&victim).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&victim, bytes).unwrap();
        let bad = FromParts(&parts);
        let err = write(&all, to2.path(), &bad).await.unwrap_err();
        assert!(matches!(err, FilesError::Mismatch { .. }), "{err}");
        let models = to2.path().join(&base).join("models");
        assert_eq!(std::fs::read_dir(&models).unwrap().count(), 0);
    }
}
