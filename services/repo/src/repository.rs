//! The repository handle: init, open, data keys and their accesses, sealed blobs.
//!
//! # Layout of a repository
//! ```text
//! config                         the repository config (see `config`), written last by init
//! keys/<purpose>/<key id>        wrapped data keys, one object per version (see `keys`)
//! chunks/<2 hex>/<64 hex>        sealed chunks, addressed by chunk id
//! manifests/<backup id>          sealed backup manifests, written after their chunks
//! gc/pending-<time>-<uuid>       sealed lists of objects marked for garbage collection (`gc`)
//! <anything else>/...            sealed blobs of other components (WAL segments, ledger
//!                                segments), written with `put_blob`
//! ```
//!
//! Invariants:
//! - `init` refuses a location that holds a config, chunks or manifests, and writes the config
//!   last, so a location with a config is a complete repository.
//! - `open` reads the config and checks the master key before anything else, and writes nothing:
//!   a wrong key is reported before any side effect.
//! - Every data-key unwrap is reported to the [`KeyAccessObserver`]. A handle made with
//!   [`Repository::with_access`] caches the keys it unwrapped, so one operation (a backup, a
//!   restore, a check) reports each key it uses once, with its actor and reason.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::backend::Backend;
use crate::chunk::Hash32;
use crate::config::{CONFIG_KEY, RepoConfig, RepoParams};
use crate::error::{RepoError, Result};
use crate::keys::{
    DataKey, KeyAccess, KeyAccessObserver, KeyInfo, KeyPurpose, MasterKey, STORED_KEY_FORMAT,
    StoredKey,
};
use crate::seal::{self, Brotli, ObjectKind};

/// A new key version made by [`Repository::rotate_key`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotation {
    pub purpose: KeyPurpose,
    pub old: KeyInfo,
    pub new: KeyInfo,
}

/// What [`Repository::put_blob`] stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredObject {
    pub key: String,
    pub size: u64,
    pub sha3: Hash32,
    pub key_id: String,
}

pub(crate) struct Inner {
    pub backend: Arc<dyn Backend>,
    pub config: RepoConfig,
    wrap_key: Zeroizing<[u8; 64]>,
    pub chunk_id_key: Zeroizing<[u8; 32]>,
    keyring: RwLock<BTreeMap<String, StoredKey>>,
    damaged_keys: RwLock<Vec<(String, String)>>,
    observer: Arc<dyn KeyAccessObserver>,
}

struct AccessContext {
    actor: String,
    reason: String,
    cache: Mutex<HashMap<String, Arc<DataKey>>>,
}

/// An open repository. Cheap to clone; clones share the keyring and the access context.
#[derive(Clone)]
pub struct Repository {
    pub(crate) inner: Arc<Inner>,
    access: Arc<AccessContext>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("id", &self.id())
            .field("location", &self.location())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Repository {
    /// Whether `backend` holds a repository config.
    pub async fn exists(backend: &dyn Backend) -> Result<bool> {
        Ok(backend.head(CONFIG_KEY).await?.is_some())
    }

    /// Creates a repository: one data key per purpose, then the config. Refuses a location that
    /// already holds a repository or backup objects.
    pub async fn init(
        backend: Arc<dyn Backend>,
        master: &MasterKey,
        params: RepoParams,
        observer: Arc<dyn KeyAccessObserver>,
    ) -> Result<Repository> {
        params.chunker.validate()?;
        params.compression.validate()?;
        let location = backend.describe();
        if backend.head(CONFIG_KEY).await?.is_some() {
            return Err(RepoError::AlreadyExists {
                location,
                detail: "it has a config object".into(),
            });
        }
        for prefix in ["chunks/", "manifests/"] {
            if !backend.list(prefix).await?.is_empty() {
                return Err(RepoError::AlreadyExists {
                    location,
                    detail: format!("it holds {prefix} objects but no config; it is not empty"),
                });
            }
        }
        let wrap_key = master.wrap_key();
        let config = RepoConfig::create(&wrap_key, &params)?;
        let repository_id = config.repository_id;
        for purpose in KeyPurpose::ALL {
            let sk = StoredKey::generate(&wrap_key, repository_id, purpose, 1);
            let bytes = serde_json::to_vec_pretty(&sk)
                .map_err(|e| RepoError::format(sk.info().object_key(), e.to_string()))?;
            if !backend
                .put_if_absent(&sk.info().object_key(), Bytes::from(bytes))
                .await?
            {
                return Err(RepoError::AlreadyExists {
                    location,
                    detail: format!("key object {} exists", sk.info().object_key()),
                });
            }
        }
        if !backend
            .put_if_absent(CONFIG_KEY, Bytes::from(config.to_bytes()?))
            .await?
        {
            return Err(RepoError::AlreadyExists {
                location,
                detail: "another init wrote a config at the same time".into(),
            });
        }
        info!(%repository_id, location = %backend.describe(), "repository initialized");
        Repository::open(backend, master, observer).await
    }

    /// Opens a repository: reads and authenticates the config (a wrong master key fails here,
    /// before anything is written), then reads the keyring.
    pub async fn open(
        backend: Arc<dyn Backend>,
        master: &MasterKey,
        observer: Arc<dyn KeyAccessObserver>,
    ) -> Result<Repository> {
        let bytes = match backend.get(CONFIG_KEY).await {
            Ok(b) => b,
            Err(RepoError::NotFound { .. }) => {
                return Err(RepoError::NoRepository {
                    location: backend.describe(),
                });
            }
            Err(e) => return Err(e),
        };
        let wrap_key = master.wrap_key();
        let (config, chunk_id_key) = RepoConfig::open(&bytes, &wrap_key)?;
        let repo = Repository {
            inner: Arc::new(Inner {
                backend,
                config,
                wrap_key,
                chunk_id_key,
                keyring: RwLock::new(BTreeMap::new()),
                damaged_keys: RwLock::new(Vec::new()),
                observer,
            }),
            access: Arc::new(AccessContext {
                actor: "system".into(),
                reason: "repository access".into(),
                cache: Mutex::new(HashMap::new()),
            }),
        };
        repo.reload_keys().await?;
        for purpose in KeyPurpose::ALL {
            if repo.current_key(purpose).is_err() {
                warn!(%purpose, "the repository has no data key for this purpose");
            }
        }
        Ok(repo)
    }

    /// A handle whose key unwraps are reported with this actor and reason. It has its own key
    /// cache: each key it uses is unwrapped (and reported) once.
    pub fn with_access(&self, actor: impl Into<String>, reason: impl Into<String>) -> Repository {
        Repository {
            inner: self.inner.clone(),
            access: Arc::new(AccessContext {
                actor: actor.into(),
                reason: reason.into(),
                cache: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn id(&self) -> Uuid {
        self.inner.config.repository_id
    }

    pub fn config(&self) -> &RepoConfig {
        &self.inner.config
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    pub fn location(&self) -> String {
        self.inner.backend.describe()
    }

    pub(crate) fn brotli(&self) -> Brotli {
        let p = self.inner.config.compression.params;
        Brotli {
            quality: p.quality,
            lgwin: p.lgwin,
        }
    }

    /// Re-reads `keys/` (after a rotation by another process).
    pub async fn reload_keys(&self) -> Result<()> {
        let objects = self.inner.backend.list("keys/").await?;
        let backend = self.inner.backend.clone();
        let fetched: Vec<(String, Result<Bytes>)> = futures::stream::iter(objects)
            .map(|o| {
                let backend = backend.clone();
                async move {
                    let r = backend.get(&o.key).await;
                    (o.key, r)
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut ring = BTreeMap::new();
        let mut damaged = Vec::new();
        for (key, res) in fetched {
            let bytes = res?;
            let parsed: std::result::Result<StoredKey, String> =
                serde_json::from_slice::<StoredKey>(&bytes)
                    .map_err(|e| format!("not a data key object: {e}"))
                    .and_then(|sk| {
                        if sk.format != STORED_KEY_FORMAT || sk.format_version != 1 {
                            Err(format!(
                                "unsupported key format {} v{}",
                                sk.format, sk.format_version
                            ))
                        } else if sk.info().object_key() != key {
                            Err(format!(
                                "stored at {key} but names {}",
                                sk.info().object_key()
                            ))
                        } else {
                            Ok(sk)
                        }
                    });
            match parsed {
                Ok(sk) if sk.repository_id != self.id() => {
                    // Left behind by an interrupted init of another repository: not ours.
                    warn!(key, "ignoring a data key of another repository");
                }
                Ok(sk) => {
                    ring.insert(sk.key_id.clone(), sk);
                }
                Err(detail) => {
                    warn!(key, %detail, "damaged data key object");
                    damaged.push((key, detail));
                }
            }
        }
        *self
            .inner
            .keyring
            .write()
            .unwrap_or_else(|p| p.into_inner()) = ring;
        *self
            .inner
            .damaged_keys
            .write()
            .unwrap_or_else(|p| p.into_inner()) = damaged;
        Ok(())
    }

    /// Every key version, by purpose then version.
    pub fn keys(&self) -> Vec<KeyInfo> {
        let ring = self.inner.keyring.read().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<KeyInfo> = ring.values().map(StoredKey::info).collect();
        v.sort_by_key(|a| (a.purpose, a.version));
        v
    }

    /// Key objects that could not be read at the last (re)load: (object key, what is wrong).
    pub fn damaged_keys(&self) -> Vec<(String, String)> {
        self.inner
            .damaged_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The newest version of a purpose's key: the one that seals new data.
    pub fn current_key(&self, purpose: KeyPurpose) -> Result<KeyInfo> {
        let ring = self.inner.keyring.read().unwrap_or_else(|p| p.into_inner());
        ring.values()
            .filter(|k| k.purpose == purpose)
            .max_by_key(|k| k.version)
            .map(StoredKey::info)
            .ok_or_else(|| RepoError::NoKey {
                what: format!("for purpose {purpose}"),
                hint: "the keys/ objects are missing or damaged; restore them from a copy of the bucket".into(),
            })
    }

    /// Every key version as stored (for retirement bookkeeping).
    pub(crate) fn stored_keys(&self) -> Vec<StoredKey> {
        self.inner
            .keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Rewrites a key object (its retirement fields; the wrapped key is unchanged) and the
    /// keyring's copy. An atomic put: a crash leaves the old or the new document.
    pub(crate) async fn replace_stored_key(&self, sk: StoredKey) -> Result<()> {
        let path = sk.info().object_key();
        let bytes =
            serde_json::to_vec_pretty(&sk).map_err(|e| RepoError::format(&path, e.to_string()))?;
        self.inner.backend.put(&path, Bytes::from(bytes)).await?;
        self.inner
            .keyring
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sk.key_id.clone(), sk);
        Ok(())
    }

    fn stored_key(&self, key_id: &str) -> Option<StoredKey> {
        self.inner
            .keyring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key_id)
            .cloned()
    }

    fn unwrap_and_report(&self, sk: &StoredKey, reason: &str, actor: &str) -> Result<Arc<DataKey>> {
        let key = sk.unwrap_key(&self.inner.wrap_key)?;
        self.inner.observer.key_accessed(KeyAccess {
            purpose: sk.purpose,
            key_id: sk.key_id.clone(),
            version: sk.version,
            reason: reason.to_string(),
            actor: actor.to_string(),
        });
        Ok(Arc::new(key))
    }

    /// Unwraps the current key of `purpose` and reports the access. Always unwraps (no cache).
    pub async fn data_key(
        &self,
        purpose: KeyPurpose,
        reason: &str,
        actor: &str,
    ) -> Result<Arc<DataKey>> {
        let info = self.current_key(purpose)?;
        self.data_key_by_id(&info.key_id, reason, actor).await
    }

    /// Unwraps a key version by id (re-reading the keyring once if it is unknown) and reports
    /// the access.
    pub async fn data_key_by_id(
        &self,
        key_id: &str,
        reason: &str,
        actor: &str,
    ) -> Result<Arc<DataKey>> {
        let sk = match self.stored_key(key_id) {
            Some(sk) => sk,
            None => {
                self.reload_keys().await?;
                self.stored_key(key_id).ok_or_else(|| RepoError::NoKey {
                    what: key_id.to_string(),
                    hint: "the object was sealed with a key that is not under keys/: restore the keys/ objects from a copy of the bucket".into(),
                })?
            }
        };
        self.unwrap_and_report(&sk, reason, actor)
    }

    /// The key `key_id` for this handle's operation: unwrapped and reported once per handle.
    pub(crate) async fn key_by_id(&self, key_id: &str) -> Result<Arc<DataKey>> {
        if let Some(k) = lock(&self.access.cache).get(key_id) {
            return Ok(k.clone());
        }
        let k = self
            .data_key_by_id(key_id, &self.access.reason, &self.access.actor)
            .await?;
        lock(&self.access.cache).insert(key_id.to_string(), k.clone());
        Ok(k)
    }

    /// The current key of `purpose` for this handle's operation.
    pub(crate) async fn key_for(&self, purpose: KeyPurpose) -> Result<Arc<DataKey>> {
        let info = self.current_key(purpose)?;
        self.key_by_id(&info.key_id).await
    }

    /// Makes a new version of `purpose`'s key. Older versions stay and keep opening what they
    /// sealed; new data is sealed with the new one. The caller records `key.rotated`.
    pub async fn rotate_key(&self, purpose: KeyPurpose) -> Result<KeyRotation> {
        self.rotate_key_at(purpose, crate::now()).await
    }

    /// [`rotate_key`](Self::rotate_key) with the new version's creation time from the caller's
    /// clock (the rotation schedule compares key ages with its own clock).
    pub async fn rotate_key_at(
        &self,
        purpose: KeyPurpose,
        created_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<KeyRotation> {
        self.reload_keys().await?;
        let old = self.current_key(purpose)?;
        let sk = StoredKey::generate_at(
            &self.inner.wrap_key,
            self.id(),
            purpose,
            old.version + 1,
            created_at,
        );
        let path = sk.info().object_key();
        let bytes =
            serde_json::to_vec_pretty(&sk).map_err(|e| RepoError::format(&path, e.to_string()))?;
        if !self
            .inner
            .backend
            .put_if_absent(&path, Bytes::from(bytes))
            .await?
        {
            return Err(RepoError::Usage(format!(
                "key object {path} already exists; retry the rotation"
            )));
        }
        let new = sk.info();
        self.inner
            .keyring
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sk.key_id.clone(), sk);
        info!(%purpose, old = %old.key_id, new = %new.key_id, "data key rotated");
        Ok(KeyRotation { purpose, old, new })
    }

    /// Seals `data` with the current key of `purpose` and stores it at `path`, then reads it back
    /// and checks its SHA3-256. For components that store whole objects (WAL segments, ledger
    /// segments) rather than chunked streams.
    pub async fn put_blob(
        &self,
        path: &str,
        purpose: KeyPurpose,
        data: Bytes,
    ) -> Result<StoredObject> {
        crate::backend::validate_key(path)?;
        let key = self.key_for(purpose).await?;
        store_blob(
            self.inner.backend.as_ref(),
            self.id(),
            path,
            key,
            self.brotli(),
            data,
        )
        .await
    }

    /// Seals `data` for `path` as [`put_blob`](Self::put_blob) does, without storing it: the
    /// same sealed bytes can then be written to several backends with [`store_sealed`] (the
    /// primary and its replicas hold identical objects, sealed once).
    pub async fn seal_blob(
        &self,
        path: &str,
        purpose: KeyPurpose,
        data: Bytes,
    ) -> Result<SealedBlob> {
        crate::backend::validate_key(path)?;
        let key = self.key_for(purpose).await?;
        seal_blob_with(self.id(), path, key, self.brotli(), data).await
    }

    /// Opens the sealed bytes of a blob read from anywhere (a replica, or a copy about to be
    /// made) with this repository's keys: authenticates them and returns the plaintext.
    pub async fn open_sealed_blob(&self, path: &str, obj: Bytes) -> Result<Bytes> {
        let header = seal::parse_header(path, &obj)?;
        let key = self.key_by_id(&header.key_id).await?;
        open_blob(self.id(), path, key, obj, None).await
    }

    /// As [`put_blob`](Self::put_blob), but stores the sealed object in `backend`: a copy of
    /// this repository (same `config`, so the same repository id, which the seal binds), such
    /// as an offline copy's description. Read back and checked like any blob.
    pub async fn put_blob_in(
        &self,
        backend: &dyn Backend,
        path: &str,
        purpose: KeyPurpose,
        data: Bytes,
    ) -> Result<StoredObject> {
        crate::backend::validate_key(path)?;
        let key = self.key_for(purpose).await?;
        store_blob(backend, self.id(), path, key, self.brotli(), data).await
    }

    /// Reads a blob written by [`put_blob`](Self::put_blob), checking its SHA3-256 when given.
    pub async fn get_blob(&self, path: &str, expected_sha3: Option<Hash32>) -> Result<Bytes> {
        let obj = self.inner.backend.get(path).await?;
        let header = seal::parse_header(path, &obj)?;
        let key = self.key_by_id(&header.key_id).await?;
        open_blob(self.id(), path, key, obj, expected_sha3).await
    }

    /// Reads an object back and compares its SHA3-256 with the one computed before upload.
    pub(crate) async fn verify_upload(&self, path: &str, expected: Hash32) -> Result<u64> {
        verify_upload(self.inner.backend.as_ref(), path, expected).await
    }
}

/// Reads an object back from `backend` and compares its SHA3-256 with `expected`; its size.
pub(crate) async fn verify_upload(
    backend: &dyn Backend,
    path: &str,
    expected: Hash32,
) -> Result<u64> {
    let back = backend.get(path).await?;
    let n = back.len() as u64;
    let actual = hash_off_runtime(back).await?;
    if actual != expected {
        return Err(RepoError::Corrupt {
            key: path.to_string(),
            expected: expected.to_hex(),
            actual: actual.to_hex(),
            backup: None,
        });
    }
    Ok(n)
}

/// The write path of every blob handle ([`Repository::put_blob`], and the WAL-only handle's):
/// seals `data` at `path` with `key` off the runtime, stores it, reads it back and checks it.
pub(crate) async fn store_blob(
    backend: &dyn Backend,
    repo_id: Uuid,
    path: &str,
    key: Arc<DataKey>,
    brotli: Brotli,
    data: Bytes,
) -> Result<StoredObject> {
    let blob = seal_blob_with(repo_id, path, key, brotli, data).await?;
    store_sealed(backend, &blob).await
}

/// A blob sealed for its path and not stored yet ([`Repository::seal_blob`]).
#[derive(Clone, Debug)]
pub struct SealedBlob {
    pub path: String,
    pub bytes: Bytes,
    /// SHA3-256 of `bytes`.
    pub sha3: Hash32,
    pub key_id: String,
}

/// Seals `data` at `path` with `key`, off the runtime.
pub(crate) async fn seal_blob_with(
    repo_id: Uuid,
    path: &str,
    key: Arc<DataKey>,
    brotli: Brotli,
    data: Bytes,
) -> Result<SealedBlob> {
    let p = path.to_string();
    let k = key.clone();
    let (sealed, sha) = tokio::task::spawn_blocking(move || {
        let sealed = seal::seal_object(&repo_id, &p, &k, ObjectKind::Blob, Some(brotli), &data);
        let sha = seal::sha3(&sealed);
        (Bytes::from(sealed), Hash32(sha))
    })
    .await
    .map_err(join_err)?;
    Ok(SealedBlob {
        path: path.to_string(),
        bytes: sealed,
        sha3: sha,
        key_id: key.key_id().to_string(),
    })
}

/// Writes a sealed blob to `backend`, reads it back and checks its SHA3-256: when this returns
/// the object is durably there.
pub async fn store_sealed(backend: &dyn Backend, blob: &SealedBlob) -> Result<StoredObject> {
    backend.put(&blob.path, blob.bytes.clone()).await?;
    verify_upload(backend, &blob.path, blob.sha3).await?;
    Ok(StoredObject {
        key: blob.path.clone(),
        size: blob.bytes.len() as u64,
        sha3: blob.sha3,
        key_id: blob.key_id.clone(),
    })
}

/// The read path of every blob handle: checks the sealed object's SHA3-256 when one is
/// expected, then opens it with `key`, off the runtime.
pub(crate) async fn open_blob(
    repo_id: Uuid,
    path: &str,
    key: Arc<DataKey>,
    obj: Bytes,
    expected_sha3: Option<Hash32>,
) -> Result<Bytes> {
    let p = path.to_string();
    tokio::task::spawn_blocking(move || {
        if let Some(exp) = expected_sha3 {
            let actual = Hash32(seal::sha3(&obj));
            if actual != exp {
                return Err(RepoError::Corrupt {
                    key: p,
                    expected: exp.to_hex(),
                    actual: actual.to_hex(),
                    backup: None,
                });
            }
        }
        seal::open_object(&repo_id, &p, &key, &obj, None).map(|(_, v)| Bytes::from(v))
    })
    .await
    .map_err(join_err)?
}

pub(crate) fn join_err(e: tokio::task::JoinError) -> RepoError {
    RepoError::io("a worker thread failed", std::io::Error::other(e))
}

/// SHA3-256 on the blocking pool for large buffers (it runs at a few hundred MB/s).
pub(crate) async fn hash_off_runtime(data: Bytes) -> Result<Hash32> {
    if data.len() < 64 << 10 {
        return Ok(Hash32(seal::sha3(&data)));
    }
    tokio::task::spawn_blocking(move || Hash32(seal::sha3(&data)))
        .await
        .map_err(join_err)
}
