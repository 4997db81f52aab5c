//! A repository in a local directory (the embedded default).
//!
//! Layout: each object key is a relative path under the root directory.
//!
//! Crash safety: `put` writes `<dir>/.tmp-<random>`, fsyncs it, renames it over the final name
//! and fsyncs the directory (and the parents of any directory it had to create), so a crash
//! leaves either the old object, the new one, or a stray `.tmp-*` file, never a partial object
//! under its final name. Stray temporary files are ignored by `list` (no valid key can start a
//! segment with `.tmp-`). `put_if_absent` links the temporary file to the final name, which fails
//! atomically when the name exists.
//!
//! Every operation runs on tokio's blocking pool: file system calls block.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use rand::RngCore;

use super::{Backend, ObjectMeta, validate_key};
use crate::error::{RepoError, Result};

#[derive(Clone, Debug)]
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    /// A backend rooted at `root`. The directory is created on the first write.
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| RepoError::io("cannot resolve the current directory", e))?
                .join(root)
        };
        Ok(LocalBackend { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| RepoError::io("local storage task failed", io::Error::other(e)))?
    }
}

fn not_found(root: &Path, key: &str) -> RepoError {
    RepoError::NotFound {
        key: key.to_string(),
        location: root.display().to_string(),
        backup: None,
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing ancestors, then fsyncs the parent of each created directory so
/// the new entries survive a crash.
fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.is_dir() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent() {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

/// Writes `data` to a fresh temporary file in `dir` and fsyncs it. Returns its path.
fn write_temp(dir: &Path, data: &[u8]) -> io::Result<PathBuf> {
    create_dirs_durably(dir)?;
    let tmp = dir.join(format!(".tmp-{:016x}", rand::thread_rng().next_u64()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let res = f.write_all(data).and_then(|_| f.sync_all());
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<ObjectMeta>, prefix: &str) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(".tmp-") {
            continue;
        }
        let key = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let ft = entry.file_type()?;
        if ft.is_dir() {
            // Only descend where a key under this directory can still match the prefix.
            let as_dir = format!("{key}/");
            if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                walk(&entry.path(), &key, out, prefix)?;
            }
        } else if ft.is_file() && key.starts_with(prefix) {
            out.push(ObjectMeta {
                key,
                size: entry.metadata()?.len(),
            });
        }
    }
    Ok(())
}

/// Unlinks each path; `Ok(Some(dir))` when a file was removed from `dir`, `Ok(None)` when it
/// was already gone.
fn unlink_all(paths: Vec<(String, Result<PathBuf>)>) -> Vec<Result<Option<PathBuf>>> {
    paths
        .into_iter()
        .map(|(key, path)| {
            let path = path?;
            match fs::remove_file(&path) {
                Ok(()) => Ok(path.parent().map(Path::to_path_buf)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(RepoError::io(
                    format!("cannot delete object {key} at {}", path.display()),
                    e,
                )),
            }
        })
        .collect()
}

#[async_trait]
impl Backend for LocalBackend {
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path(key)?;
        let key = key.to_string();
        self.blocking(move || {
            let ctx = || format!("cannot write object {key} at {}", path.display());
            let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            let tmp = write_temp(&dir, &data).map_err(|e| RepoError::io(ctx(), e))?;
            if let Err(e) = fs::rename(&tmp, &path) {
                let _ = fs::remove_file(&tmp);
                return Err(RepoError::io(ctx(), e));
            }
            fsync_dir(&dir).map_err(|e| RepoError::io(ctx(), e))
        })
        .await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        let path = self.path(key)?;
        let key = key.to_string();
        self.blocking(move || {
            let ctx = || format!("cannot write object {key} at {}", path.display());
            let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            let tmp = write_temp(&dir, &data).map_err(|e| RepoError::io(ctx(), e))?;
            // link(2) fails with EEXIST when the name is taken: an atomic "create if absent".
            let linked = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    fsync_dir(&dir).map_err(|e| RepoError::io(ctx(), e))?;
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(RepoError::io(ctx(), e)),
            }
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        let key = key.to_string();
        let root = self.root.clone();
        self.blocking(move || match fs::read(&path) {
            Ok(v) => Ok(Bytes::from(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_found(&root, &key)),
            Err(e) => Err(RepoError::io(
                format!("cannot read object {key} at {}", path.display()),
                e,
            )),
        })
        .await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        let path = self.path(key)?;
        let key = key.to_string();
        let root = self.root.clone();
        self.blocking(move || {
            let ctx = || format!("cannot read object {key} at {}", path.display());
            let mut f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(not_found(&root, &key));
                }
                Err(e) => return Err(RepoError::io(ctx(), e)),
            };
            f.seek(SeekFrom::Start(offset))
                .map_err(|e| RepoError::io(ctx(), e))?;
            let mut buf = Vec::with_capacity(len.min(64 << 20) as usize);
            f.take(len)
                .read_to_end(&mut buf)
                .map_err(|e| RepoError::io(ctx(), e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>> {
        let path = self.path(key)?;
        let key = key.to_string();
        self.blocking(move || match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io(
                format!("cannot stat object {key} at {}", path.display()),
                e,
            )),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        self.blocking(move || {
            let mut out = Vec::new();
            walk(&root, "", &mut out, &prefix).map_err(|e| {
                RepoError::io(
                    format!("cannot list {prefix:?} under {}", root.display()),
                    e,
                )
            })?;
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let key = key.to_string();
        self.blocking(move || {
            let ctx = || format!("cannot delete object {key} at {}", path.display());
            match fs::remove_file(&path) {
                Ok(()) => {
                    if let Some(dir) = path.parent() {
                        fsync_dir(dir).map_err(|e| RepoError::io(ctx(), e))?;
                    }
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(RepoError::io(ctx(), e)),
            }
        })
        .await
    }

    async fn delete_many(&self, keys: &[String]) -> Vec<Result<()>> {
        // Unlinks run on several threads (on ext4 mounted with `discard`, one unlink takes about
        // a millisecond, mostly waiting, and parallel unlinks overlap even in one directory);
        // then each directory is fsynced once for the whole batch.
        const THREADS: usize = 16;
        let per = keys.len().div_ceil(THREADS).max(1);
        let mut tasks = Vec::new();
        for part in keys.chunks(per) {
            let paths: Vec<(String, Result<PathBuf>)> =
                part.iter().map(|k| (k.clone(), self.path(k))).collect();
            tasks.push(self.blocking(move || Ok(unlink_all(paths))));
        }
        let mut unlinked: Vec<Result<Option<PathBuf>>> = Vec::with_capacity(keys.len());
        for (part, done) in keys.chunks(per).zip(futures::future::join_all(tasks).await) {
            match done {
                Ok(v) => unlinked.extend(v),
                Err(e) => {
                    let msg = e.to_string();
                    unlinked.extend(part.iter().map(|_| {
                        Err(RepoError::io(
                            "local storage task failed",
                            io::Error::other(msg.clone()),
                        ))
                    }));
                }
            }
        }
        let mut dirs: Vec<PathBuf> = unlinked
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned().flatten())
            .collect();
        dirs.sort();
        dirs.dedup();
        let synced = self
            .blocking(move || {
                Ok(dirs
                    .into_iter()
                    .filter_map(|d| fsync_dir(&d).err().map(|e| (d, e.to_string())))
                    .collect::<std::collections::HashMap<_, _>>())
            })
            .await;
        let failed_dirs = match synced {
            Ok(f) => f,
            Err(e) => {
                let msg = e.to_string();
                return keys
                    .iter()
                    .map(|_| {
                        Err(RepoError::io(
                            "local storage task failed",
                            io::Error::other(msg.clone()),
                        ))
                    })
                    .collect();
            }
        };
        unlinked
            .into_iter()
            .map(|r| match r {
                Ok(Some(dir)) => match failed_dirs.get(&dir) {
                    Some(e) => Err(RepoError::io(
                        format!("cannot make a delete in {} durable", dir.display()),
                        io::Error::other(e.clone()),
                    )),
                    None => Ok(()),
                },
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            })
            .collect()
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().join("repo")).unwrap();
        assert!(b.list("").await.unwrap().is_empty());
        b.put("a/b/c", Bytes::from_static(b"hello")).await.unwrap();
        b.put("a/d", Bytes::from_static(b"xy")).await.unwrap();
        b.put("ab", Bytes::from_static(b"z")).await.unwrap();
        assert_eq!(b.get("a/b/c").await.unwrap(), Bytes::from_static(b"hello"));
        assert_eq!(
            b.get_range("a/b/c", 1, 3).await.unwrap(),
            Bytes::from_static(b"ell")
        );
        assert_eq!(b.head("a/d").await.unwrap(), Some(2));
        assert_eq!(b.head("a/zz").await.unwrap(), None);
        let keys: Vec<_> = b
            .list("a/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, vec!["a/b/c", "a/d"]);
        assert_eq!(b.list("a").await.unwrap().len(), 3);
        // A stray temporary file from a crash is invisible.
        std::fs::write(dir.path().join("repo/a/.tmp-123"), b"partial").unwrap();
        assert_eq!(b.list("a/").await.unwrap().len(), 2);
        assert!(
            !b.put_if_absent("a/d", Bytes::from_static(b"new"))
                .await
                .unwrap()
        );
        assert_eq!(b.get("a/d").await.unwrap(), Bytes::from_static(b"xy"));
        assert!(
            b.put_if_absent("a/e", Bytes::from_static(b"new"))
                .await
                .unwrap()
        );
        b.delete("a/d").await.unwrap();
        b.delete("a/d").await.unwrap();
        b.put("a/f", Bytes::from_static(b"1")).await.unwrap();
        let res = b
            .delete_many(&[
                "a/e".into(),
                "a/f".into(),
                "a/missing".into(),
                "../x".into(),
            ])
            .await;
        assert!(res[0].is_ok() && res[1].is_ok() && res[2].is_ok());
        assert!(res[3].is_err(), "an escaping key is refused");
        assert_eq!(b.head("a/e").await.unwrap(), None);
        assert_eq!(b.head("a/f").await.unwrap(), None);
        assert!(matches!(
            b.get("a/d").await,
            Err(RepoError::NotFound { .. })
        ));
        assert!(b.get("../etc/passwd").await.is_err());
    }
}
