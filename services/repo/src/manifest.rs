//! Backup manifests: what a backup contains, sealed, at `manifests/<backup id>`.
//!
//! # Format (manifest format version 1)
//! A sealed object (see [`crate::seal`]: kind 2, brotli-compressed, sealed with the repository's
//! current *database* data key, whatever the backup's purpose, so that listing backups needs one
//! key) whose plaintext is this JSON document:
//!
//! ```json
//! {
//!   "format": "backstop-manifest", "format_version": 1,
//!   "repository_id": "<uuid>", "backup_id": "<uuid>",
//!   "kind": "full" | "incremental" | "differential", "parent": "<uuid>" | null,
//!   "source": "trading", "purpose": "database",
//!   "started_at": "...", "finished_at": "...",
//!   "keys": ["database-v1-1a2b3c4d"],
//!   "totals": {"raw_bytes": 0, "stored_bytes": 0, "new_bytes": 0, "chunks": 0, "new_chunks": 0},
//!   "streams": [
//!     {"name": "toc.dat", "raw_bytes": 123,
//!      "chunks": [{"id": "<64 hex>", "len": 1048576, "sealed_len": 250112,
//!                  "sealed_sha3": "<64 hex>", "key": 0}]}
//!   ],
//!   "extra": { ...caller-supplied: tables and row counts, server version, snapshot... }
//! }
//! ```
//!
//! A stream's plaintext is the concatenation of its chunks in order. `key` indexes `keys`: the
//! data key that sealed that chunk (a deduplicated chunk keeps the key it was first sealed with).
//! `sealed_sha3` is the SHA3-256 of the whole sealed chunk object, checked on every read.
//!
//! Invariants: the manifest is written after every chunk it references was uploaded and read
//! back intact, and it is never overwritten (written with put-if-absent). A backup without a
//! manifest does not exist, whatever chunks it left behind. The manifest's own path
//! (`manifests/<backup id>`) is authenticated, so a manifest cannot be passed off as another
//! backup's.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use backstop_events::BackupKind;

use crate::chunk::Hash32;
use crate::error::{RepoError, Result};
use crate::keys::KeyPurpose;

pub const MANIFEST_FORMAT: &str = "backstop-manifest";
pub const MANIFEST_VERSION: u32 = 1;
pub const MANIFEST_PREFIX: &str = "manifests/";

/// Decodes a manifest's plaintext (the opened sealed object at `path`) and checks what the
/// plaintext alone can prove: the format and version, that it names `backup_id` in repository
/// `repository_id`, and that every chunk's key index is in range. The reader's one decoding path;
/// public so that the fuzz target `manifest` (fuzz/) feeds it arbitrary bytes.
pub fn parse_manifest(
    path: &str,
    plain: &[u8],
    backup_id: Uuid,
    repository_id: Uuid,
) -> Result<Manifest> {
    let m: Manifest = serde_json::from_slice(plain)
        .map_err(|e| RepoError::format(path, format!("manifest JSON does not decode: {e}")))?;
    if m.format != MANIFEST_FORMAT || m.format_version != MANIFEST_VERSION {
        return Err(RepoError::format(
            path,
            format!(
                "manifest format {} v{}; this build reads {MANIFEST_FORMAT} v{MANIFEST_VERSION}",
                m.format, m.format_version
            ),
        ));
    }
    if m.backup_id != backup_id || m.repository_id != repository_id {
        return Err(RepoError::damaged(
            path,
            "the manifest names another backup or repository",
        ));
    }
    if let Some(bad) = m
        .streams
        .iter()
        .flat_map(|s| s.chunks.iter())
        .find(|c| c.key as usize >= m.keys.len())
    {
        return Err(RepoError::damaged(
            path,
            format!(
                "chunk {} refers to key index {} out of range",
                bad.id, bad.key
            ),
        ));
    }
    Ok(m)
}

/// `manifests/<backup id>`.
pub fn manifest_key(backup_id: &Uuid) -> String {
    format!("{MANIFEST_PREFIX}{backup_id}")
}

/// One chunk of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: Hash32,
    /// Plaintext length.
    pub len: u32,
    /// Length of the sealed object.
    pub sealed_len: u32,
    /// SHA3-256 of the sealed object.
    pub sealed_sha3: Hash32,
    /// Index into [`Manifest::keys`].
    pub key: u16,
    /// Set when re-encryption re-sealed the chunk: the tag of the job that did, which with the
    /// key id names the object's own path `chunks/ab/<64 hex>.<key id>.<tag, 8 hex>`
    /// ([`Manifest::chunk_path`]). Absent in what backups write (the object is at
    /// `chunks/ab/<64 hex>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resealed: Option<u32>,
}

impl ChunkRef {
    /// The path backups write this chunk to (`chunks/ab/<64 hex>`). Where the object of this
    /// reference is depends on [`resealed`](Self::resealed): use [`Manifest::chunk_path`].
    pub fn object_key(&self) -> String {
        self.id.chunk_key()
    }
}

/// One re-encryption of a manifest: what it replaced. Authenticated with the rest of the
/// manifest, so a reader holding the SHA3-256 of an earlier form (from `backup.completed`) can
/// tell that this manifest is its re-encrypted successor, not a substitute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRevision {
    /// SHA3-256 of the sealed manifest this one replaced.
    pub replaced_sha3: Hash32,
    /// The key ids of the replaced form (its `keys` and the key that sealed it).
    pub replaced_keys: Vec<String>,
    pub reencrypted_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamManifest {
    pub name: String,
    pub raw_bytes: u64,
    pub chunks: Vec<ChunkRef>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Bytes read from the source.
    pub raw_bytes: u64,
    /// Sealed bytes of the distinct chunks the backup references.
    pub stored_bytes: u64,
    /// Sealed bytes this backup added (new chunks and the manifest).
    pub new_bytes: u64,
    /// Chunk references (with repeats).
    pub chunks: u64,
    /// Chunks this backup uploaded.
    pub new_chunks: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub repository_id: Uuid,
    pub backup_id: Uuid,
    pub kind: BackupKind,
    pub parent: Option<Uuid>,
    pub source: String,
    pub purpose: KeyPurpose,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub keys: Vec<String>,
    pub totals: Totals,
    pub streams: Vec<StreamManifest>,
    #[serde(default)]
    pub extra: serde_json::Value,
    /// Re-encryptions of this manifest, oldest first. Absent (empty) in what backups write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<ManifestRevision>,
}

impl Manifest {
    /// The manifest as stored at `path`: its JSON sealed with `key` as a kind-2 object, and the
    /// SHA3-256 of the sealed bytes. CPU-bound (compression and encryption): call it off the
    /// async runtime. Takes the manifest so that its lists are freed once encoded, before the
    /// sealing needs its own buffers (a large database's manifest is big).
    pub(crate) fn seal(
        self,
        repo_id: &Uuid,
        path: &str,
        key: &crate::keys::DataKey,
        brotli: crate::seal::Brotli,
    ) -> Result<(bytes::Bytes, Hash32)> {
        let json = serde_json::to_vec(&self)
            .map_err(|e| RepoError::format(path, format!("cannot encode: {e}")))?;
        drop(self);
        let sealed = crate::seal::seal_object(
            repo_id,
            path,
            key,
            crate::seal::ObjectKind::Manifest,
            Some(brotli),
            &json,
        );
        let sha = Hash32(crate::seal::sha3(&sealed));
        Ok((bytes::Bytes::from(sealed), sha))
    }

    pub fn stream(&self, name: &str) -> Option<&StreamManifest> {
        self.streams.iter().find(|s| s.name == name)
    }

    pub fn stream_names(&self) -> Vec<&str> {
        self.streams.iter().map(|s| s.name.as_str()).collect()
    }

    /// Every distinct chunk the backup references.
    pub fn distinct_chunks(&self) -> Vec<ChunkRef> {
        let mut seen = std::collections::HashSet::new();
        self.streams
            .iter()
            .flat_map(|s| s.chunks.iter())
            .filter(|c| seen.insert(c.id))
            .copied()
            .collect()
    }

    /// Where the object of `c`, a chunk of this manifest, is stored: the backup's path, or the
    /// re-sealed path named by its key id and job tag.
    pub fn chunk_path(&self, c: &ChunkRef) -> String {
        match self.chunk_seal(c) {
            Some(seal) => c.id.resealed_chunk_key(&seal),
            None => c.id.chunk_key(),
        }
    }

    /// The seal suffix of a re-sealed chunk of this manifest (`<key id>.<tag>`), `None` for a
    /// chunk at the backup's own path.
    pub fn chunk_seal(&self, c: &ChunkRef) -> Option<String> {
        let tag = c.resealed?;
        // parse_manifest refuses an index out of range; a hand-made manifest gets a path that
        // does not exist rather than a panic.
        let key = self.keys.get(c.key as usize).map_or("?", String::as_str);
        Some(crate::chunk::resealed_suffix(key, tag))
    }

    /// The id garbage collection judges the object of `c` by: the chunk id for a chunk at the
    /// backup's path, [`Hash32::resealed_ref_id`] for a re-sealed one.
    pub fn chunk_ref_id(&self, c: &ChunkRef) -> Hash32 {
        match self.chunk_seal(c) {
            Some(seal) => c.id.resealed_ref_id(&seal),
            None => c.id,
        }
    }

    /// The key id that sealed chunk `c` of this manifest.
    pub fn chunk_key_id(&self, c: &ChunkRef) -> Option<&str> {
        self.keys.get(c.key as usize).map(String::as_str)
    }

    /// Whether an earlier sealed form of this manifest had SHA3-256 `sha3` (see
    /// [`ManifestRevision`]).
    pub fn replaced(&self, sha3: &Hash32) -> bool {
        self.revisions.iter().any(|r| &r.replaced_sha3 == sha3)
    }

    pub fn duration(&self) -> chrono::Duration {
        self.finished_at - self.started_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPO: Uuid = Uuid::from_u128(0xa001);
    const BACKUP: Uuid = Uuid::from_u128(0xb001);

    /// The seed of the `manifest` fuzz target, with these ids and the chunk's key index `key`.
    fn manifest(key: u32) -> Vec<u8> {
        let text = include_str!("../../../fuzz/corpus/manifest/golden-shape.json")
            .replace("01941f29-7c00-7000-8000-00000000a001", &REPO.to_string())
            .replace("01941f29-7c00-7000-8000-00000000b001", &BACKUP.to_string())
            .replace("\"key\": 0", &format!("\"key\": {key}"));
        text.into_bytes()
    }

    #[test]
    fn a_manifest_decodes_and_what_it_cannot_prove_is_refused() {
        let path = manifest_key(&BACKUP);
        let m = parse_manifest(&path, &manifest(0), BACKUP, REPO).unwrap();
        assert_eq!(m.stream_names(), ["public.trades"]);
        let other = Uuid::from_u128(0xb002);
        let e = parse_manifest(&path, &manifest(0), other, REPO).unwrap_err();
        assert!(e.to_string().contains("another backup"), "{e}");
        let e = parse_manifest(&path, &manifest(1), BACKUP, REPO).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let e = parse_manifest(&path, b"\xff{not json", BACKUP, REPO).unwrap_err();
        assert!(matches!(e, RepoError::Format { .. }), "{e}");
    }
}
