//! Purpose-key files: one purpose's data keys, exported for a host that needs only them, and the
//! repository handle such a host opens with one.
//!
//! A database host archives its WAL (`wal-push`) and fetches it back in a recovery
//! (`wal-fetch`). With the master key it could open every backup; with a purpose-key file of the
//! `wal` purpose it can seal and open WAL objects and nothing else:
//!
//! - the file holds the `wal` data keys (every version, the newest one sealing) and no master
//!   key, wrap key, chunk-id key or other purpose's key. The data keys are independent random
//!   keys (see `keys`), so none of those can be derived from it;
//! - [`PurposeRepository`] is not a [`Repository`]: nothing that reads backups, manifests or
//!   chunks accepts it, and its [`get_blob`](PurposeRepository::get_blob) refuses an object
//!   sealed with a key the file does not hold ([`RepoError::KeyNotHeld`], naming the purpose).
//!
//! # Format (format version 1)
//! A JSON document, written with mode 0600 by `backstop key export`:
//!
//! ```json
//! {"format":"backstop-purpose-key","format_version":1,
//!  "repository_id":"<uuid>","purpose":"wal","exported_at":"2026-12-02T06:00:00Z",
//!  "compression":{"quality":2,"lgwin":22},
//!  "sealing_key_id":"wal-v2-0badf00d",
//!  "keys":[{"key_id":"wal-v1-00c0ffee","version":1,"created_at":"...","key":"<base64, 64 bytes>"},
//!          {"key_id":"wal-v2-0badf00d","version":2,"created_at":"...","key":"<base64>"}],
//!  "mac":"<base64, 16 bytes>"}
//! ```
//!
//! - `keys`: every version of the purpose's key at export time, by version. Old versions are in
//!   the file so that `wal-fetch` reads WAL sealed before a rotation; `sealing_key_id` (the
//!   newest) seals.
//! - `compression`: the repository's brotli settings, copied from its authenticated config at
//!   export (a key-file holder cannot check the config's MAC, which is under the wrap key).
//! - `mac` = AES-256-SIV S2V tag under the sealing key over AD = ["backstop/v1/purpose-key-file",
//!   canonical JSON of the document without `mac`] (the canonical JSON of the workspace, as for
//!   the repository config). Any changed byte (the repository id, the purpose, a key, a version)
//!   makes the file refused at load.
//!
//! # What the holder checks instead of the config's MAC and key check
//! The repository config's MAC and key check are under the wrap key, which the holder does not
//! have. It checks instead: (1) the file's MAC (the file is whole and unmodified); (2) that the
//! repository at the configured location names the file's repository id in its config (a
//! misconfigured location is refused before anything is written); (3) on every read, the sealed
//! object's authentication, whose associated data binds the repository id, the object's path and
//! the key id (see `seal`): an object from another repository or path does not open. Check (2)
//! is against an unauthenticated document: whoever can write the bucket can forge it, but such a
//! writer gains nothing, since the WAL it then receives is sealed under keys it does not hold.
//!
//! # Rotation
//! After `wal` is rotated, a host keeps sealing with the newest version in its file until the
//! file is re-exported; the repository keeps every version, so readers with the master key (and
//! re-exported files, which hold every version) still open it. [`PurposeRepository::open`] lists
//! `keys/<purpose>/` and, when a newer version exists, says so ([`PurposeRepository::newer_key`]):
//! `wal-push` warns with the command to re-export.
//!
//! Secrets in memory: the keys are held in zeroed-on-drop buffers and the file's bytes are
//! zeroed after use; the intermediate JSON values of encoding and decoding are not (best effort,
//! as for any process that parses a key file).
//!
//! # Key accesses
//! Every first use of a key by a handle (made with [`PurposeRepository::with_access`]) is
//! reported to the observer as a [`KeyAccess`], its reason marked "with a key file", exactly as
//! an unwrap is for a [`Repository`]: the caller records it as a `key.accessed` event when the
//! ledger is reachable.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::warn;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::backend::Backend;
use crate::chunk::Hash32;
use crate::config::{CONFIG_KEY, CompressionParams, FORMAT_NAME};
use crate::error::{RepoError, Result};
use crate::keys::{DataKey, KeyAccess, KeyAccessObserver, KeyInfo, KeyPurpose};
use crate::repository::{
    Repository, SealedBlob, StoredObject, open_blob, seal_blob_with, store_sealed,
};
use crate::seal::{self, Brotli};

pub const PURPOSE_KEY_FORMAT: &str = "backstop-purpose-key";
pub const PURPOSE_KEY_FORMAT_VERSION: u32 = 1;
const MAC_DOMAIN: &[u8] = b"backstop/v1/purpose-key-file";

/// The purposes whose keys may be exported. The others (database, export, config, files,
/// ledger) open backups or the audit trail and stay behind the master key.
pub const EXPORTABLE: [KeyPurpose; 1] = [KeyPurpose::Wal];

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportedKey {
    key_id: String,
    version: u32,
    created_at: DateTime<Utc>,
    key: String,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurposeKeyDoc {
    format: String,
    format_version: u32,
    repository_id: Uuid,
    purpose: KeyPurpose,
    exported_at: DateTime<Utc>,
    compression: CompressionParams,
    sealing_key_id: String,
    keys: Vec<ExportedKey>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    mac: String,
}

fn mac_input(doc: &PurposeKeyDoc) -> Result<Vec<u8>> {
    let mut v = serde_json::to_value(doc)
        .map_err(|e| RepoError::Usage(format!("cannot encode a key file: {e}")))?;
    if let Value::Object(m) = &mut v {
        m.remove("mac");
    }
    Ok(backstop_events::canonical::json_bytes(&v))
}

/// One purpose's keys, loaded from (or made for) a purpose-key file. `Debug` shows no secret.
pub struct PurposeKeyFile {
    /// Where it was read from (for messages), or `<new>`.
    label: String,
    repository_id: Uuid,
    purpose: KeyPurpose,
    exported_at: DateTime<Utc>,
    compression: CompressionParams,
    sealing: Arc<DataKey>,
    keys: BTreeMap<String, Arc<DataKey>>,
}

impl fmt::Debug for PurposeKeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PurposeKeyFile")
            .field("repository_id", &self.repository_id)
            .field("purpose", &self.purpose)
            .field("sealing", &self.sealing.key_id())
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PurposeKeyFile {
    /// Every version of `purpose`'s key in `repo`, the current one sealing. Each is unwrapped
    /// and reported to the repository's observer with `actor` and `reason`. Refuses a purpose
    /// outside [`EXPORTABLE`].
    pub async fn export(
        repo: &Repository,
        purpose: KeyPurpose,
        actor: &str,
        reason: &str,
        exported_at: DateTime<Utc>,
    ) -> Result<PurposeKeyFile> {
        if !EXPORTABLE.contains(&purpose) {
            return Err(RepoError::Usage(format!(
                "the {purpose} key cannot be exported: it opens backups or the audit trail, and stays behind the master key (exportable: {})",
                EXPORTABLE.map(|p| p.as_str()).join(", ")
            )));
        }
        repo.reload_keys().await?;
        let current = repo.current_key(purpose)?;
        let mut keys = Vec::new();
        for info in repo.keys().into_iter().filter(|k| k.purpose == purpose) {
            keys.push(repo.data_key_by_id(&info.key_id, reason, actor).await?);
        }
        PurposeKeyFile::assemble(
            "<new>".into(),
            repo.id(),
            purpose,
            exported_at,
            repo.config().compression.params,
            &current.key_id,
            keys,
        )
    }

    /// A file from given keys, for golden test vectors (`tests/vectors/`) that must produce the
    /// same bytes on every run. The newest version seals.
    #[doc(hidden)]
    pub fn from_parts(
        repository_id: Uuid,
        exported_at: DateTime<Utc>,
        compression: CompressionParams,
        keys: Vec<DataKey>,
    ) -> Result<PurposeKeyFile> {
        let sealing = keys
            .iter()
            .max_by_key(|k| k.version())
            .map(|k| k.key_id().to_string())
            .ok_or_else(|| RepoError::Usage("a key file needs at least one key".into()))?;
        let purpose = keys[0].purpose();
        PurposeKeyFile::assemble(
            "<new>".into(),
            repository_id,
            purpose,
            exported_at,
            compression,
            &sealing,
            keys.into_iter().map(Arc::new).collect(),
        )
    }

    fn assemble(
        label: String,
        repository_id: Uuid,
        purpose: KeyPurpose,
        exported_at: DateTime<Utc>,
        compression: CompressionParams,
        sealing_key_id: &str,
        keys: Vec<Arc<DataKey>>,
    ) -> Result<PurposeKeyFile> {
        let bad = |detail: String| RepoError::KeyFile {
            path: label.clone(),
            detail,
        };
        let mut by_id = BTreeMap::new();
        for k in keys {
            if k.purpose() != purpose {
                return Err(bad(format!(
                    "key {} is not a {purpose} key: a key file holds one purpose",
                    k.key_id()
                )));
            }
            if !k
                .key_id()
                .starts_with(&format!("{purpose}-v{}-", k.version()))
            {
                return Err(bad(format!(
                    "key id {} does not name its purpose and version",
                    k.key_id()
                )));
            }
            if by_id.insert(k.key_id().to_string(), k.clone()).is_some() {
                return Err(bad(format!("key {} is listed twice", k.key_id())));
            }
        }
        let sealing = by_id.get(sealing_key_id).cloned().ok_or_else(|| {
            bad(format!(
                "the sealing key {sealing_key_id} is not in the file"
            ))
        })?;
        Ok(PurposeKeyFile {
            label,
            repository_id,
            purpose,
            exported_at,
            compression,
            sealing,
            keys: by_id,
        })
    }

    fn doc(&self) -> Result<PurposeKeyDoc> {
        let mut keys: Vec<&Arc<DataKey>> = self.keys.values().collect();
        keys.sort_by_key(|k| k.version());
        let mut doc = PurposeKeyDoc {
            format: PURPOSE_KEY_FORMAT.into(),
            format_version: PURPOSE_KEY_FORMAT_VERSION,
            repository_id: self.repository_id,
            purpose: self.purpose,
            exported_at: self.exported_at,
            compression: self.compression,
            sealing_key_id: self.sealing.key_id().to_string(),
            keys: keys
                .into_iter()
                .map(|k| ExportedKey {
                    key_id: k.key_id().to_string(),
                    version: k.version(),
                    created_at: k.info().created_at,
                    key: STANDARD.encode(k.secret()),
                })
                .collect(),
            mac: String::new(),
        };
        let mac = seal::siv_mac(self.sealing.secret(), &[MAC_DOMAIN, &mac_input(&doc)?]);
        doc.mac = STANDARD.encode(mac);
        Ok(doc)
    }

    /// The file's bytes: pretty JSON, ending with a newline. Zeroed on drop.
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>> {
        let doc = self.doc()?;
        let mut out = Zeroizing::new(
            serde_json::to_vec_pretty(&doc)
                .map_err(|e| RepoError::Usage(format!("cannot encode a key file: {e}")))?,
        );
        out.push(b'\n');
        Ok(out)
    }

    /// Parses and checks a file's bytes (format, keys, MAC); `label` names it in errors.
    pub fn from_bytes(label: &str, bytes: &[u8]) -> Result<PurposeKeyFile> {
        let bad = |detail: String| RepoError::KeyFile {
            path: label.to_string(),
            detail,
        };
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            bad(format!(
                "not JSON ({e}): it is not a key file from `backstop key export`"
            ))
        })?;
        if v.get("format").and_then(Value::as_str) != Some(PURPOSE_KEY_FORMAT) {
            return Err(bad(format!(
                "its \"format\" is not {PURPOSE_KEY_FORMAT:?}: it is not a key file from `backstop key export` (a master key goes in master_key_file instead)"
            )));
        }
        if v.get("format_version").and_then(Value::as_u64)
            != Some(PURPOSE_KEY_FORMAT_VERSION as u64)
        {
            return Err(bad(format!(
                "format version {} (this build reads version {PURPOSE_KEY_FORMAT_VERSION}; upgrade backstop)",
                v.get("format_version").unwrap_or(&Value::Null)
            )));
        }
        let doc: PurposeKeyDoc = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        if !EXPORTABLE.contains(&doc.purpose) {
            return Err(bad(format!(
                "purpose {} is not one a key file may hold",
                doc.purpose
            )));
        }
        let mut keys = Vec::new();
        for k in &doc.keys {
            let raw = Zeroizing::new(
                STANDARD
                    .decode(&k.key)
                    .map_err(|_| bad(format!("key {} is not base64", k.key_id)))?,
            );
            let secret: [u8; 64] = raw
                .as_slice()
                .try_into()
                .map_err(|_| bad(format!("key {} is not 64 bytes", k.key_id)))?;
            keys.push(Arc::new(DataKey::new(
                KeyInfo {
                    purpose: doc.purpose,
                    key_id: k.key_id.clone(),
                    version: k.version,
                    created_at: k.created_at,
                },
                Zeroizing::new(secret),
            )));
        }
        let file = PurposeKeyFile::assemble(
            label.to_string(),
            doc.repository_id,
            doc.purpose,
            doc.exported_at,
            doc.compression,
            &doc.sealing_key_id,
            keys,
        )?;
        let mac = STANDARD
            .decode(&doc.mac)
            .map_err(|_| bad("its mac is not base64".into()))?;
        if !seal::siv_mac_ok(
            file.sealing.secret(),
            &[MAC_DOMAIN, &mac_input(&doc)?],
            &mac,
        ) {
            return Err(bad(format!(
                "its MAC does not match: the file was modified or damaged (its repository id, purpose, a key or another byte changed). Export a new one where the master key is: `backstop key export --purpose {} --out FILE`",
                doc.purpose
            )));
        }
        file.compression
            .validate()
            .map_err(|e| bad(e.to_string()))?;
        Ok(file)
    }

    /// Reads and checks a key file. A file its group or others may read or write is refused
    /// with the `chmod` that fixes it, as for the master key.
    pub fn load(path: &Path) -> Result<PurposeKeyFile> {
        refuse_shared(path)?;
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
            RepoError::io(format!("cannot read the key file {}", path.display()), e)
        })?);
        PurposeKeyFile::from_bytes(&path.display().to_string(), &bytes)
    }

    /// Writes the file at `path` with mode 0600. Never overwrites: an existing file is an error.
    pub fn write_new(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        let bytes = self.to_bytes()?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                RepoError::Usage(format!(
                    "{} exists: a key file is never overwritten; remove it first, or choose another path",
                    path.display()
                ))
            } else {
                RepoError::io(format!("cannot create the key file {}", path.display()), e)
            }
        })?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| RepoError::io(format!("cannot write the key file {}", path.display()), e))
    }

    pub fn repository_id(&self) -> Uuid {
        self.repository_id
    }
    pub fn purpose(&self) -> KeyPurpose {
        self.purpose
    }
    pub fn exported_at(&self) -> DateTime<Utc> {
        self.exported_at
    }
    /// The version that seals new objects (the newest at export).
    pub fn sealing_key(&self) -> &KeyInfo {
        self.sealing.info()
    }
    /// Every version in the file, by version.
    pub fn key_infos(&self) -> Vec<KeyInfo> {
        let mut v: Vec<KeyInfo> = self.keys.values().map(|k| k.info().clone()).collect();
        v.sort_by_key(|k| k.version);
        v
    }
}

/// Refuses a key file whose mode lets its group or others read or write it.
#[cfg(unix)]
fn refuse_shared(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        // Unreadable or missing: reading it says so, with the path.
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(RepoError::KeyFile {
            path: path.display().to_string(),
            detail: format!(
                "its mode {mode:o} lets its group or others read it, and it seals and opens this repository's WAL. Run `chmod 600 {}` (and give it to the user that runs wal-push, e.g. `chown postgres {}`)",
                path.display(),
                path.display()
            ),
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn refuse_shared(_path: &Path) -> Result<()> {
    Ok(())
}

/// A newer version of the file's purpose in the repository than the file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewerKey {
    pub key_id: String,
    pub version: u32,
    pub created_at: Option<DateTime<Utc>>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    file: PurposeKeyFile,
    observer: Arc<dyn KeyAccessObserver>,
    newer: Option<NewerKey>,
}

struct Access {
    actor: String,
    reason: String,
    reported: Mutex<HashSet<String>>,
}

/// A repository opened with a purpose-key file: seals and opens that purpose's blobs only.
/// Cheap to clone; clones share the access context.
#[derive(Clone)]
pub struct PurposeRepository {
    inner: Arc<Inner>,
    access: Arc<Access>,
}

impl fmt::Debug for PurposeRepository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PurposeRepository")
            .field("id", &self.id())
            .field("purpose", &self.purpose())
            .field("location", &self.location())
            .finish()
    }
}

/// The fields of a key object a key-file holder reads (it cannot unwrap them).
#[derive(Deserialize)]
struct StoredKeyHead {
    repository_id: Uuid,
    key_id: String,
    version: u32,
    created_at: Option<DateTime<Utc>>,
}

impl PurposeRepository {
    /// Opens the repository at `backend` with `file`: the config must name the file's
    /// repository id (see the module docs for what is and is not checked); a newer key version
    /// than the file's is noted ([`newer_key`](Self::newer_key)). Writes nothing.
    pub async fn open(
        backend: Arc<dyn Backend>,
        file: PurposeKeyFile,
        observer: Arc<dyn KeyAccessObserver>,
    ) -> Result<PurposeRepository> {
        let location = backend.describe();
        let bytes = match backend.get(CONFIG_KEY).await {
            Ok(b) => b,
            Err(RepoError::NotFound { .. }) => return Err(RepoError::NoRepository { location }),
            Err(e) => return Err(e),
        };
        let doc: Value = serde_json::from_slice(&bytes)
            .map_err(|e| RepoError::format(CONFIG_KEY, format!("not JSON ({e})")))?;
        if doc.get("format").and_then(Value::as_str) != Some(FORMAT_NAME) {
            return Err(RepoError::format(
                CONFIG_KEY,
                format!(
                    "the \"format\" field is not {FORMAT_NAME:?}: this is not a Backstop repository"
                ),
            ));
        }
        let id = doc
            .get("repository_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Uuid>().ok());
        if id != Some(file.repository_id) {
            return Err(RepoError::KeyFile {
                path: file.label.clone(),
                detail: format!(
                    "it is the {} key of repository {}, but the repository at {location} is {}: point the configuration at the right repository, or export a key file from this one",
                    file.purpose,
                    file.repository_id,
                    id.map(|i| i.to_string())
                        .unwrap_or_else(|| "unnamed".into())
                ),
            });
        }
        let newer = newer_version(backend.as_ref(), &file).await;
        if let Some(n) = &newer {
            // The caller says what to do (it knows the file's path); this is for the debug log.
            tracing::debug!(
                purpose = %file.purpose, held = %file.sealing.key_id(), newer = %n.key_id,
                "the key was rotated after this key file was exported"
            );
        }
        Ok(PurposeRepository {
            inner: Arc::new(Inner {
                backend,
                file,
                observer,
                newer,
            }),
            access: Arc::new(Access {
                actor: "system".into(),
                reason: "repository access".into(),
                reported: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// A handle whose key uses are reported with this actor and reason, each key once.
    pub fn with_access(
        &self,
        actor: impl Into<String>,
        reason: impl Into<String>,
    ) -> PurposeRepository {
        PurposeRepository {
            inner: self.inner.clone(),
            access: Arc::new(Access {
                actor: actor.into(),
                reason: reason.into(),
                reported: Mutex::new(HashSet::new()),
            }),
        }
    }

    pub fn id(&self) -> Uuid {
        self.inner.file.repository_id
    }
    pub fn purpose(&self) -> KeyPurpose {
        self.inner.file.purpose
    }
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }
    pub fn location(&self) -> String {
        self.inner.backend.describe()
    }
    /// The version this handle seals with.
    pub fn sealing_key(&self) -> &KeyInfo {
        self.inner.file.sealing_key()
    }
    /// A newer version of the purpose's key in the repository, found at open.
    pub fn newer_key(&self) -> Option<&NewerKey> {
        self.inner.newer.as_ref()
    }

    fn report(&self, key: &DataKey) {
        let first = self
            .access
            .reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.key_id().to_string());
        if first {
            self.inner.observer.key_accessed(KeyAccess {
                purpose: key.purpose(),
                key_id: key.key_id().to_string(),
                version: key.version(),
                reason: format!("{} (with a key file)", self.access.reason),
                actor: self.access.actor.clone(),
            });
        }
    }

    /// Seals `data` with the file's sealing key and stores it at `path`, then reads it back and
    /// checks its SHA3-256 (as [`Repository::put_blob`]). `purpose` must be the file's.
    pub async fn put_blob(
        &self,
        path: &str,
        purpose: KeyPurpose,
        data: Bytes,
    ) -> Result<StoredObject> {
        let blob = self.seal_blob(path, purpose, data).await?;
        store_sealed(self.inner.backend.as_ref(), &blob).await
    }

    /// Seals `data` for `path` without storing it (as [`Repository::seal_blob`]): write it to
    /// the repository and its replicas with [`store_sealed`]. `purpose` must be the file's.
    pub async fn seal_blob(
        &self,
        path: &str,
        purpose: KeyPurpose,
        data: Bytes,
    ) -> Result<SealedBlob> {
        if purpose != self.purpose() {
            return Err(RepoError::Usage(format!(
                "this key file holds only the {} key: it cannot seal {purpose} data ({path})",
                self.purpose()
            )));
        }
        crate::backend::validate_key(path)?;
        let key = self.inner.file.sealing.clone();
        self.report(&key);
        let c = self.inner.file.compression;
        let brotli = Brotli {
            quality: c.quality,
            lgwin: c.lgwin,
        };
        seal_blob_with(self.id(), path, key, brotli, data).await
    }

    /// Reads a blob sealed with one of the file's keys, checking its SHA3-256 when given. An
    /// object sealed with any other key (another purpose's, or a newer version) is refused with
    /// [`RepoError::KeyNotHeld`] before it is decrypted.
    pub async fn get_blob(&self, path: &str, expected_sha3: Option<Hash32>) -> Result<Bytes> {
        let obj = self.inner.backend.get(path).await?;
        let header = seal::parse_header(path, &obj)?;
        let purpose = self.purpose();
        let Some(key) = self.inner.file.keys.get(&header.key_id).cloned() else {
            let hint = if header.key_id.starts_with(&format!("{purpose}-")) {
                format!(
                    "it is a {purpose} key version made after this file was exported; re-export the file where the master key is (`backstop key export --purpose {purpose} --out FILE`)"
                )
            } else {
                format!(
                    "a {purpose} key file cannot open other purposes' objects (backups, manifests, chunks); open it where the master key is"
                )
            };
            return Err(RepoError::KeyNotHeld {
                key: path.to_string(),
                key_id: header.key_id,
                purpose,
                held: self
                    .inner
                    .file
                    .keys
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                hint,
            });
        };
        self.report(&key);
        open_blob(self.id(), path, key, obj, expected_sha3).await
    }
}

/// The newest version under `keys/<purpose>/` if it is newer than the file's sealing key. Best
/// effort: a listing that fails says nothing (it is for a warning only).
async fn newer_version(backend: &dyn Backend, file: &PurposeKeyFile) -> Option<NewerKey> {
    let objects = match backend.list(&format!("keys/{}/", file.purpose)).await {
        Ok(o) => o,
        Err(e) => {
            warn!(error = %e, "cannot list the key versions; a rotation would go unnoticed");
            return None;
        }
    };
    let mut newest: Option<NewerKey> = None;
    for o in objects {
        let Ok(bytes) = backend.get(&o.key).await else {
            continue;
        };
        let Ok(head) = serde_json::from_slice::<StoredKeyHead>(&bytes) else {
            continue;
        };
        if head.repository_id != file.repository_id {
            continue;
        }
        if newest.as_ref().is_none_or(|n| head.version > n.version) {
            newest = Some(NewerKey {
                key_id: head.key_id,
                version: head.version,
                created_at: head.created_at,
            });
        }
    }
    newest.filter(|n| n.version > file.sealing.version())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use crate::config::RepoParams;
    use crate::keys::{KeyAccessLog, MasterKey};

    fn private(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    async fn repo() -> (Repository, Arc<KeyAccessLog>) {
        let log = Arc::new(KeyAccessLog::new());
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
        let r = Repository::init(
            backend,
            &MasterKey::generate(),
            RepoParams::default(),
            log.clone(),
        )
        .await
        .unwrap();
        (r, log)
    }

    async fn exported(repo: &Repository) -> PurposeKeyFile {
        PurposeKeyFile::export(repo, KeyPurpose::Wal, "operator:t", "export", Utc::now())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_wal_key_file_seals_and_opens_wal_and_nothing_else() {
        let (repo, log) = repo().await;
        let file = exported(&repo).await;
        // The export unwrapped the wal key, and only it, and reported that.
        let accesses = log.take();
        assert_eq!(accesses.len(), 1);
        assert_eq!(accesses[0].purpose, KeyPurpose::Wal);
        assert!(
            file.key_infos()
                .iter()
                .all(|k| k.purpose == KeyPurpose::Wal)
        );
        let bytes = file.to_bytes().unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        // The master key's derived keys and the other purposes' keys are not in the file.
        for p in KeyPurpose::ALL.iter().filter(|p| **p != KeyPurpose::Wal) {
            assert!(!text.contains(&format!("\"{p}-v")), "{text}");
        }
        assert!(!text.contains("wrapped"));

        let file = PurposeKeyFile::from_bytes("f", &bytes).unwrap();
        let host_log = Arc::new(KeyAccessLog::new());
        let host = PurposeRepository::open(repo.backend().clone(), file, host_log.clone())
            .await
            .unwrap()
            .with_access("worker:wal-push", "archiving WAL");
        let stored = host
            .put_blob(
                "wal/main/00000001/x",
                KeyPurpose::Wal,
                Bytes::from_static(b"wal bytes"),
            )
            .await
            .unwrap();
        // The host's use is reported once, marked as a key-file use.
        let uses = host_log.take();
        assert_eq!(uses.len(), 1);
        assert!(uses[0].reason.contains("with a key file"), "{uses:?}");
        // The master-key side reads what the host sealed, and the other way round.
        let back = repo
            .get_blob("wal/main/00000001/x", Some(stored.sha3))
            .await
            .unwrap();
        assert_eq!(&back[..], b"wal bytes");
        repo.put_blob(
            "wal/main/00000001/y",
            KeyPurpose::Wal,
            Bytes::from_static(b"y"),
        )
        .await
        .unwrap();
        assert_eq!(
            &host.get_blob("wal/main/00000001/y", None).await.unwrap()[..],
            b"y"
        );

        // It cannot seal another purpose's data, nor open an object sealed with another key.
        let e = host
            .put_blob(
                "manifests/x",
                KeyPurpose::Database,
                Bytes::from_static(b"m"),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("holds only the wal key"), "{e}");
        repo.put_blob(
            "files/secret",
            KeyPurpose::Database,
            Bytes::from_static(b"s"),
        )
        .await
        .unwrap();
        let e = host.get_blob("files/secret", None).await.unwrap_err();
        assert!(
            matches!(
                e,
                RepoError::KeyNotHeld {
                    purpose: KeyPurpose::Wal,
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("holds only the wal key") && msg.contains("database-v1-"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn only_the_wal_key_can_be_exported() {
        let (repo, _) = repo().await;
        for p in KeyPurpose::ALL
            .into_iter()
            .filter(|p| *p != KeyPurpose::Wal)
        {
            let e = PurposeKeyFile::export(&repo, p, "operator:t", "export", Utc::now())
                .await
                .unwrap_err();
            assert!(e.to_string().contains("cannot be exported"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_modified_file_is_refused() {
        let (repo, _) = repo().await;
        let bytes = exported(&repo).await.to_bytes().unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        // Another repository id.
        let other = text.replace(&repo.id().to_string(), &Uuid::new_v4().to_string());
        let e = PurposeKeyFile::from_bytes("f", other.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("MAC does not match"), "{e}");
        // One flipped bit in the key.
        let v: Value = serde_json::from_str(&text).unwrap();
        let key = v["keys"][0]["key"].as_str().unwrap().to_string();
        let mut raw = STANDARD.decode(&key).unwrap();
        raw[5] ^= 1;
        let flipped = text.replace(&key, &STANDARD.encode(&raw));
        let e = PurposeKeyFile::from_bytes("f", flipped.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("MAC does not match"), "{e}");
        // Another purpose.
        let moved = text.replace("\"purpose\": \"wal\"", "\"purpose\": \"database\"");
        assert!(PurposeKeyFile::from_bytes("f", moved.as_bytes()).is_err());
        // A master key file is not a key file.
        let e = PurposeKeyFile::from_bytes("f", MasterKey::generate().to_base64().as_bytes())
            .unwrap_err();
        assert!(e.to_string().contains("not a key file"), "{e}");
    }

    #[tokio::test]
    async fn a_file_of_another_repository_is_refused_at_open() {
        let (a, _) = repo().await;
        let (b, _) = repo().await;
        let file = exported(&a).await;
        let e = PurposeRepository::open(b.backend().clone(), file, Arc::new(KeyAccessLog::new()))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&a.id().to_string()) && msg.contains(&b.id().to_string()),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn after_a_rotation_the_host_seals_with_its_version_and_learns_of_the_newer_one() {
        let (repo, _) = repo().await;
        let file = exported(&repo).await;
        let held = file.sealing_key().key_id.clone();
        let rotation = repo.rotate_key(KeyPurpose::Wal).await.unwrap();
        let host =
            PurposeRepository::open(repo.backend().clone(), file, Arc::new(KeyAccessLog::new()))
                .await
                .unwrap();
        assert_eq!(
            host.newer_key().map(|n| n.key_id.as_str()),
            Some(rotation.new.key_id.as_str())
        );
        let stored = host
            .put_blob("wal/a", KeyPurpose::Wal, Bytes::from_static(b"a"))
            .await
            .unwrap();
        assert_eq!(stored.key_id, held);
        // Readers with the master key still read it; WAL sealed with the new version is not
        // readable with the old file, and the message says to re-export.
        assert_eq!(&repo.get_blob("wal/a", None).await.unwrap()[..], b"a");
        repo.put_blob("wal/b", KeyPurpose::Wal, Bytes::from_static(b"b"))
            .await
            .unwrap();
        let e = host.get_blob("wal/b", None).await.unwrap_err();
        assert!(e.to_string().contains("re-export"), "{e}");
        // A re-exported file holds both versions and seals with the new one.
        let again = exported(&repo).await;
        assert_eq!(again.key_infos().len(), 2);
        assert_eq!(again.sealing_key().key_id, rotation.new.key_id);
        let host =
            PurposeRepository::open(repo.backend().clone(), again, Arc::new(KeyAccessLog::new()))
                .await
                .unwrap();
        assert!(host.newer_key().is_none());
        assert_eq!(&host.get_blob("wal/a", None).await.unwrap()[..], b"a");
        assert_eq!(&host.get_blob("wal/b", None).await.unwrap()[..], b"b");
    }

    #[tokio::test]
    async fn the_file_is_written_private_never_over_another_and_refused_when_shared() {
        use std::os::unix::fs::PermissionsExt;
        let (repo, _) = repo().await;
        let file = exported(&repo).await;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal.key");
        file.write_new(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = file.write_new(&p).unwrap_err();
        assert!(e.to_string().contains("never overwritten"), "{e}");
        assert_eq!(
            PurposeKeyFile::load(&p).unwrap().sealing_key(),
            file.sealing_key()
        );
        for mode in [0o640, 0o644, 0o604] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = PurposeKeyFile::load(&p).unwrap_err().to_string();
            assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
            assert!(e.contains(&format!("mode {mode:o}")), "{e}");
        }
        private(&p);
        assert!(PurposeKeyFile::load(&p).is_ok());
    }
}
