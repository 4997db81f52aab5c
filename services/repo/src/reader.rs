//! Reading backups: manifests, restore streams, dry runs.
//!
//! Invariants:
//! - Every chunk read is checked three ways before a byte of it is returned: the SHA3-256 of the
//!   sealed object against the manifest, AES-SIV authentication (which binds the repository id,
//!   the object's path and so its chunk id, and the key id), and, unless disabled, the keyed
//!   chunk id of the plaintext. A failure names the object and the backup.
//! - Restore streams prefetch a bounded number of chunks (`ReadOptions::prefetch`), each fetched
//!   and decoded on its own task (decoding on the blocking pool), and yield plaintext strictly in
//!   order. Memory is bounded by `prefetch * (sealed + plaintext chunk size)`.
//! - Manifests are authenticated against their own path, so a manifest cannot pass for another
//!   backup's; a truncated, edited or undecryptable manifest is a clear error naming the backup.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};
use tokio_util::io::StreamReader;
use uuid::Uuid;

use crate::chunk::{Hash32, chunk_id};
use crate::error::{RepoError, Result};
use crate::keys::DataKey;
use crate::manifest::{ChunkRef, MANIFEST_PREFIX, Manifest, manifest_key};
use crate::repository::{Repository, join_err};
use crate::seal::{self, ObjectKind};

/// Tuning of restore streams.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Chunks fetched ahead of the reader.
    pub prefetch: usize,
    /// Recompute each chunk's keyed id from its plaintext (on by default). AES-SIV
    /// authentication already binds the chunk id through the object path; this is a second,
    /// independent check that costs one SHA3 pass over the plaintext.
    pub verify_chunk_ids: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            prefetch: 6,
            verify_chunk_ids: true,
        }
    }
}

/// One entry of [`Repository::list_backups`]: the manifest, or why it could not be read.
#[derive(Debug)]
pub struct ListedBackup {
    pub backup_id: Uuid,
    pub manifest_key: String,
    pub manifest_size: u64,
    pub manifest: Result<Manifest>,
}

/// An object a restore needs that is missing or has the wrong size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingObject {
    pub key: String,
    pub backup: Uuid,
    pub expected_size: u64,
    /// `None` when absent; `Some(n)` when present with another size.
    pub found_size: Option<u64>,
}

/// What [`Repository::dry_run_restore`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunReport {
    pub backup_id: Uuid,
    pub streams: Vec<String>,
    /// Distinct chunks the restore would read.
    pub chunks: u64,
    /// Plaintext bytes the restore would produce.
    pub raw_bytes: u64,
    /// Sealed bytes it would read.
    pub stored_bytes: u64,
    pub missing: Vec<MissingObject>,
}

impl DryRunReport {
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// The plaintext of one stream of a backup, as an `AsyncRead` (also `AsyncBufRead`). Errors are
/// `io::Error`s wrapping a [`RepoError`]; recover it with [`RepoError::from_io`].
pub struct RestoreStream {
    inner: StreamReader<BoxStream<'static, io::Result<Bytes>>, Bytes>,
    raw_bytes: u64,
}

impl RestoreStream {
    /// The stream's length, from the manifest.
    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes
    }
}

impl AsyncRead for RestoreStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncBufRead for RestoreStream {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().inner).poll_fill_buf(cx)
    }
    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.inner).consume(amt)
    }
}

/// Checks a sealed chunk against its reference and returns its plaintext. CPU-bound.
pub(crate) fn decode_chunk(
    repository_id: &Uuid,
    chunk_id_key: &[u8; 32],
    key: &DataKey,
    cref: &ChunkRef,
    path: &str,
    object: &[u8],
    verify_id: bool,
) -> Result<Vec<u8>> {
    let path = path.to_string();
    let actual = Hash32(seal::sha3(object));
    if actual != cref.sealed_sha3 {
        return Err(RepoError::Corrupt {
            key: path,
            expected: cref.sealed_sha3.to_hex(),
            actual: format!(
                "{} ({} bytes, expected {})",
                actual.to_hex(),
                object.len(),
                cref.sealed_len
            ),
            backup: None,
        });
    }
    let (header, plain) =
        seal::open_object(repository_id, &path, key, object, Some(cref.len as usize))?;
    if header.kind != ObjectKind::Chunk {
        return Err(RepoError::damaged(&path, "not a chunk object"));
    }
    if plain.len() != cref.len as usize {
        return Err(RepoError::damaged(
            &path,
            format!(
                "plaintext is {} bytes, the manifest says {}",
                plain.len(),
                cref.len
            ),
        ));
    }
    if verify_id && chunk_id(chunk_id_key, &plain) != cref.id {
        return Err(RepoError::damaged(
            &path,
            "plaintext does not match its chunk id",
        ));
    }
    Ok(plain)
}

impl Repository {
    /// Reads and authenticates the manifest of `backup_id`.
    pub async fn load_manifest(&self, backup_id: Uuid) -> Result<Manifest> {
        self.load_manifest_checked(backup_id, None).await
    }

    /// Same, first checking the sealed manifest's SHA3-256 against `expected_sha3` (from the
    /// `backup.completed` event), when given.
    pub async fn load_manifest_checked(
        &self,
        backup_id: Uuid,
        expected_sha3: Option<Hash32>,
    ) -> Result<Manifest> {
        let path = manifest_key(&backup_id);
        let obj = match self.backend().get(&path).await {
            Ok(o) => o,
            Err(RepoError::NotFound { .. }) => {
                return Err(RepoError::NotFound {
                    key: path,
                    location: self.location(),
                    backup: Some(backup_id),
                });
            }
            Err(e) => return Err(e),
        };
        self.decode_manifest(backup_id, obj, expected_sha3)
            .await
            .map_err(|e| e.in_backup(backup_id))
    }

    pub(crate) async fn decode_manifest(
        &self,
        backup_id: Uuid,
        obj: Bytes,
        expected_sha3: Option<Hash32>,
    ) -> Result<Manifest> {
        let path = manifest_key(&backup_id);
        if let Some(exp) = expected_sha3 {
            let actual = Hash32(seal::sha3(&obj));
            if actual != exp {
                let corrupt = RepoError::Corrupt {
                    key: path,
                    expected: exp.to_hex(),
                    actual: actual.to_hex(),
                    backup: Some(backup_id),
                };
                // A re-encrypted manifest differs from the one `backup.completed` describes; it
                // names that one's SHA3 among the forms it replaced, authenticated with the rest.
                return match Box::pin(self.decode_manifest(backup_id, obj, None)).await {
                    Ok(m) if m.replaced(&exp) => Ok(m),
                    Err(e) if e.is_transient() => Err(e),
                    _ => Err(corrupt),
                };
            }
        }
        let header = seal::parse_header(&path, &obj).map_err(|e| match e {
            RepoError::Damaged { key, detail, .. } => RepoError::Damaged {
                key,
                detail: format!("the manifest is truncated or not a manifest: {detail}"),
                backup: Some(backup_id),
            },
            other => other,
        })?;
        if header.kind != ObjectKind::Manifest {
            return Err(RepoError::damaged(&path, "not a manifest object"));
        }
        let key = self.key_by_id(&header.key_id).await?;
        let repo_id = self.id();
        let p = path.clone();
        let plain = tokio::task::spawn_blocking(move || {
            seal::open_object(&repo_id, &p, &key, &obj, None).map(|(_, v)| v)
        })
        .await
        .map_err(join_err)?
        .map_err(|e| match e {
            RepoError::Damaged { key, detail, backup } => RepoError::Damaged {
                key,
                detail: format!(
                    "the manifest cannot be trusted: {detail} (it was truncated or edited after the backup)"
                ),
                backup,
            },
            other => other,
        })?;
        crate::manifest::parse_manifest(&path, &plain, backup_id, self.id())
    }

    /// Ids of every backup with a manifest, oldest first (ids are UUIDv7).
    pub async fn backup_ids(&self) -> Result<Vec<Uuid>> {
        let mut ids: Vec<Uuid> = self
            .backend()
            .list(MANIFEST_PREFIX)
            .await?
            .iter()
            .filter_map(|o| o.key.strip_prefix(MANIFEST_PREFIX)?.parse().ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Every backup, oldest first, with its manifest or the reason it cannot be read. Only
    /// storage failures fail the whole listing.
    pub async fn list_backups(&self) -> Result<Vec<ListedBackup>> {
        let objects = self.backend().list(MANIFEST_PREFIX).await?;
        let mut entries: Vec<(Uuid, String, u64)> = objects
            .into_iter()
            .filter_map(|o| {
                let id: Uuid = o.key.strip_prefix(MANIFEST_PREFIX)?.parse().ok()?;
                Some((id, o.key, o.size))
            })
            .collect();
        entries.sort();
        let listed: Vec<ListedBackup> = futures::stream::iter(entries)
            .map(|(id, key, size)| {
                let repo = self.clone();
                async move {
                    let manifest = match repo.load_manifest(id).await {
                        Err(e) if e.is_transient() => return Err(e),
                        m => m,
                    };
                    Ok(ListedBackup {
                        backup_id: id,
                        manifest_key: key,
                        manifest_size: size,
                        manifest,
                    })
                }
            })
            .buffered(8)
            .try_collect()
            .await?;
        Ok(listed)
    }

    /// Unwraps (once per handle) every key a set of chunk refs needs.
    async fn keys_for(&self, manifest: &Manifest) -> Result<Vec<Arc<DataKey>>> {
        let mut out = Vec::with_capacity(manifest.keys.len());
        for k in &manifest.keys {
            out.push(
                self.key_by_id(k)
                    .await
                    .map_err(|e| e.in_backup(manifest.backup_id))?,
            );
        }
        Ok(out)
    }

    /// The plaintext of stream `name` of a backup, with default read options.
    pub async fn open_stream(&self, manifest: &Manifest, name: &str) -> Result<RestoreStream> {
        self.open_stream_with(manifest, name, ReadOptions::default())
            .await
    }

    pub async fn open_stream_with(
        &self,
        manifest: &Manifest,
        name: &str,
        opts: ReadOptions,
    ) -> Result<RestoreStream> {
        let stream = manifest.stream(name).ok_or_else(|| {
            RepoError::Usage(format!(
                "backup {} has no stream {name:?}; it has: {}",
                manifest.backup_id,
                manifest.stream_names().join(", ")
            ))
        })?;
        let keys = self.keys_for(manifest).await?;
        let chunks = stream.chunks.clone();
        let raw_bytes = stream.raw_bytes;
        let backup = manifest.backup_id;
        let repo = self.clone();
        let verify = opts.verify_chunk_ids;
        let chunks: Vec<(ChunkRef, String)> = chunks
            .into_iter()
            .map(|c| (c, manifest.chunk_path(&c)))
            .collect();
        let s = futures::stream::iter(chunks)
            .map(move |(cref, path)| {
                let repo = repo.clone();
                let key = keys[cref.key as usize].clone();
                // A task per chunk so fetches proceed while the consumer is busy; the
                // `buffered` window bounds how many exist at once.
                let handle = tokio::spawn(async move {
                    let obj = repo.backend().get(&path).await?;
                    let repo_id = repo.id();
                    let cid_key = *repo.inner.chunk_id_key;
                    tokio::task::spawn_blocking(move || {
                        decode_chunk(&repo_id, &cid_key, &key, &cref, &path, &obj, verify)
                    })
                    .await
                    .map_err(join_err)?
                });
                async move {
                    let plain = handle
                        .await
                        .map_err(join_err)
                        .and_then(|r| r)
                        .map_err(|e| e.in_backup(backup).into_io())?;
                    Ok::<_, io::Error>(Bytes::from(plain))
                }
            })
            .buffered(opts.prefetch.max(1))
            .boxed();
        Ok(RestoreStream {
            inner: StreamReader::new(s),
            raw_bytes,
        })
    }

    /// Checks that every object the restore of `streams` (all when `None`) needs is present with
    /// the recorded size, without reading them.
    pub async fn dry_run_restore(
        &self,
        manifest: &Manifest,
        streams: Option<&[String]>,
    ) -> Result<DryRunReport> {
        let selected: Vec<_> = match streams {
            None => manifest.streams.iter().collect(),
            Some(names) => {
                let mut v = Vec::new();
                for n in names {
                    v.push(manifest.stream(n).ok_or_else(|| {
                        RepoError::Usage(format!(
                            "backup {} has no stream {n:?}; it has: {}",
                            manifest.backup_id,
                            manifest.stream_names().join(", ")
                        ))
                    })?);
                }
                v
            }
        };
        let present: HashMap<String, u64> = self
            .backend()
            .list("chunks/")
            .await?
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect();
        let mut seen = std::collections::HashSet::new();
        let mut report = DryRunReport {
            backup_id: manifest.backup_id,
            streams: selected.iter().map(|s| s.name.clone()).collect(),
            chunks: 0,
            raw_bytes: selected.iter().map(|s| s.raw_bytes).sum(),
            stored_bytes: 0,
            missing: Vec::new(),
        };
        for c in selected.iter().flat_map(|s| s.chunks.iter()) {
            if !seen.insert(c.id) {
                continue;
            }
            report.chunks += 1;
            report.stored_bytes += c.sealed_len as u64;
            let key = manifest.chunk_path(c);
            match present.get(&key) {
                Some(&size) if size == c.sealed_len as u64 => {}
                found => report.missing.push(MissingObject {
                    key,
                    backup: manifest.backup_id,
                    expected_size: c.sealed_len as u64,
                    found_size: found.copied(),
                }),
            }
        }
        Ok(report)
    }
}
