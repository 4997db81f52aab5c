//! Keys: the master key, the per-purpose data keys it wraps, and the record of every unwrap.
//!
//! # Master key
//! 64 random bytes, never written to the repository. It comes from `BACKSTOP_MASTER_KEY`
//! (base64, standard or URL-safe, padded or not, or 128 hex digits) or from a key file holding
//! the same text (or the 64 raw bytes). It is only used through a key derived from it,
//! `wrap key = SHA3-512("backstop/v1/master-wrap" || master)`, which is the AES-256-SIV key that
//! wraps data keys, wraps the chunk-id key, computes the key check and MACs the config.
//!
//! # Data keys
//! One AES-256-SIV key (64 bytes) per purpose: database, wal, export, config, files, ledger.
//! Each version of each key is an object `keys/<purpose>/<key id>`, a JSON document:
//!
//! ```json
//! {"format":"backstop-data-key","format_version":1,"repository_id":"<uuid>",
//!  "purpose":"database","key_id":"database-v1-1a2b3c4d","version":1,
//!  "created_at":"2026-11-22T06:31:00Z","wrapped":"<base64: SIV tag || encrypted key>"}
//! ```
//!
//! `wrapped` is AES-256-SIV(wrap key, AD = ["backstop/v1/data-key", repository id (16 bytes),
//! purpose, key id, version (u32 big-endian)], the 64 key bytes): changing the purpose, id or
//! version of a stored key makes it fail to unwrap. Key ids are `<purpose>-v<version>-<8 hex>`;
//! the random suffix keeps ids unique even after an interrupted `init`. Rotation adds a new
//! version; older versions stay, so everything sealed with them stays readable. The newest
//! version of a purpose seals new data. Re-encryption (`crate::reencrypt`) re-seals backups
//! with the newest versions; a version nothing in the repository is sealed with any more is
//! then *retired*: the key object gains `"unused_since"` and later `"retired_at"` (both outside
//! the wrapping's associated data, so the wrapping stays valid). A retired version is kept and
//! still unwraps (a locked, overwritten object version may still need it); it is never deleted
//! by Backstop.
//!
//! # Key accesses
//! Every unwrap of a data key is reported, with the actor and the reason, to the
//! [`KeyAccessObserver`] the caller gave when opening the repository; the caller records each as
//! a `key.accessed` event. This crate does not depend on the ledger.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_512};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{RepoError, Result};

/// The environment variable holding the master key.
pub const MASTER_KEY_ENV: &str = "BACKSTOP_MASTER_KEY";

/// The master key. Its bytes are zeroed on drop and never printed by `Debug`.
pub struct MasterKey {
    bytes: Zeroizing<[u8; 64]>,
}

impl MasterKey {
    /// 64 bytes from the operating system's random generator.
    pub fn generate() -> MasterKey {
        let mut bytes = Zeroizing::new([0u8; 64]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        MasterKey { bytes }
    }

    pub fn from_bytes(bytes: [u8; 64]) -> MasterKey {
        MasterKey {
            bytes: Zeroizing::new(bytes),
        }
    }

    /// Parses base64 (any common alphabet, padded or not) or 128 hex digits.
    pub fn from_encoded(text: &str) -> Result<MasterKey> {
        let text = text.trim();
        let bad = || {
            RepoError::Config(
                "the master key must be 64 bytes encoded as base64 or 128 hex digits \
                 (a new repository's key comes from `backstop init --generate-key FILE`)"
                    .into(),
            )
        };
        let mut decoded: Option<Vec<u8>> = None;
        if text.len() == 128 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            decoded = hex::decode(text).ok();
        }
        if decoded.is_none() {
            for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                if let Ok(v) = engine.decode(text) {
                    decoded = Some(v);
                    break;
                }
            }
        }
        let mut v = decoded.ok_or_else(bad)?;
        if v.len() != 64 {
            v.zeroize();
            return Err(bad());
        }
        let mut bytes = Zeroizing::new([0u8; 64]);
        bytes.copy_from_slice(&v);
        v.zeroize();
        Ok(MasterKey { bytes })
    }

    /// The key in `BACKSTOP_MASTER_KEY`, or `None` when the variable is unset or empty.
    pub fn from_env() -> Result<Option<MasterKey>> {
        match std::env::var(MASTER_KEY_ENV) {
            Ok(v) if !v.trim().is_empty() => {
                let v = Zeroizing::new(v);
                MasterKey::from_encoded(&v)
                    .map(Some)
                    .map_err(|e| RepoError::Config(format!("{MASTER_KEY_ENV}: {e}")))
            }
            _ => Ok(None),
        }
    }

    /// A key file: the encoded key as text, or exactly 64 raw bytes. A file that its group or
    /// others may read is refused, with the `chmod` that fixes it: the master key opens every
    /// backup, so it must be readable by its owner only.
    pub fn from_file(path: &Path) -> Result<MasterKey> {
        refuse_shared(path)?;
        let raw = Zeroizing::new(std::fs::read(path).map_err(|e| {
            RepoError::io(
                format!("cannot read the master key file {}", path.display()),
                e,
            )
        })?);
        if raw.len() == 64 {
            let mut bytes = Zeroizing::new([0u8; 64]);
            bytes.copy_from_slice(&raw);
            return Ok(MasterKey { bytes });
        }
        let text = std::str::from_utf8(&raw).map_err(|_| {
            RepoError::Config(format!(
                "the master key file {} is neither 64 raw bytes nor text",
                path.display()
            ))
        })?;
        MasterKey::from_encoded(text)
            .map_err(|e| RepoError::Config(format!("master key file {}: {e}", path.display())))
    }

    /// The file if one is given, else `BACKSTOP_MASTER_KEY`; a clear error when neither is set.
    pub fn load(file: Option<&Path>) -> Result<MasterKey> {
        if let Some(p) = file {
            return MasterKey::from_file(p);
        }
        MasterKey::from_env()?.ok_or_else(|| {
            RepoError::Config(format!(
                "no master key: set {MASTER_KEY_ENV} or pass --master-key-file \
                 (for a new repository, `backstop init --generate-key FILE` makes one; keep it safe: \
                 without it the backups cannot be read)"
            ))
        })
    }

    /// Standard base64 of the key, for showing once to the operator at generation.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.bytes.as_ref()))
    }

    /// The derived wrapping key (see the module documentation).
    pub(crate) fn wrap_key(&self) -> Zeroizing<[u8; 64]> {
        let mut h = Sha3_512::new();
        h.update(b"backstop/v1/master-wrap");
        h.update(self.bytes.as_ref());
        let mut out = Zeroizing::new([0u8; 64]);
        out.copy_from_slice(&h.finalize());
        out
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// What a data key is for. Each purpose has its own key and its own rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPurpose {
    Database,
    Wal,
    Export,
    Config,
    Files,
    Ledger,
}

impl KeyPurpose {
    pub const ALL: [KeyPurpose; 6] = [
        KeyPurpose::Database,
        KeyPurpose::Wal,
        KeyPurpose::Export,
        KeyPurpose::Config,
        KeyPurpose::Files,
        KeyPurpose::Ledger,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            KeyPurpose::Database => "database",
            KeyPurpose::Wal => "wal",
            KeyPurpose::Export => "export",
            KeyPurpose::Config => "config",
            KeyPurpose::Files => "files",
            KeyPurpose::Ledger => "ledger",
        }
    }
}

impl FromStr for KeyPurpose {
    type Err = RepoError;
    fn from_str(s: &str) -> Result<Self> {
        KeyPurpose::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                RepoError::Config(format!(
                    "unknown key purpose {s:?}: expected database, wal, export, config, files or ledger"
                ))
            })
    }
}

impl fmt::Display for KeyPurpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Public facts about one data key version (no secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    pub purpose: KeyPurpose,
    pub key_id: String,
    pub version: u32,
    pub created_at: DateTime<Utc>,
}

impl KeyInfo {
    /// `keys/<purpose>/<key id>`.
    pub fn object_key(&self) -> String {
        format!("keys/{}/{}", self.purpose, self.key_id)
    }
}

/// An unwrapped data key. Zeroed on drop; `Debug` shows only its id.
pub struct DataKey {
    info: KeyInfo,
    secret: Zeroizing<[u8; 64]>,
}

impl DataKey {
    pub(crate) fn new(info: KeyInfo, secret: Zeroizing<[u8; 64]>) -> DataKey {
        DataKey { info, secret }
    }

    /// A data key from given bytes, for golden test vectors (`tests/vectors/`) that must seal
    /// the same bytes on every run. Production code unwraps keys from the repository instead.
    #[doc(hidden)]
    pub fn from_secret(info: KeyInfo, secret: [u8; 64]) -> DataKey {
        DataKey::new(info, Zeroizing::new(secret))
    }

    #[cfg(test)]
    pub(crate) fn for_tests(purpose: KeyPurpose, key_id: &str, secret: [u8; 64]) -> DataKey {
        DataKey {
            info: KeyInfo {
                purpose,
                key_id: key_id.to_string(),
                version: 1,
                created_at: Utc::now(),
            },
            secret: Zeroizing::new(secret),
        }
    }

    pub fn info(&self) -> &KeyInfo {
        &self.info
    }
    pub fn key_id(&self) -> &str {
        &self.info.key_id
    }
    pub fn purpose(&self) -> KeyPurpose {
        self.info.purpose
    }
    pub fn version(&self) -> u32 {
        self.info.version
    }
    pub(crate) fn secret(&self) -> &[u8; 64] {
        &self.secret
    }

    /// A keyed hash of `data`: SHA3-256(len(domain) as u64 big-endian || domain || key || data).
    /// SHA3 has no length extension, so a secret prefix makes it a MAC: without the key the
    /// hash reveals nothing about `data` (a configuration value cannot be guessed by hashing
    /// candidates), and the domain keeps hashes of one use from matching another's. Used by
    /// configuration backups' change detection (docs/FORMAT.md, "Configuration backups").
    pub fn keyed_hash(&self, domain: &str, data: &[u8]) -> [u8; 32] {
        let mut h = sha3::Sha3_256::new();
        h.update((domain.len() as u64).to_be_bytes());
        h.update(domain.as_bytes());
        h.update(self.secret.as_ref());
        h.update(data);
        h.finalize().into()
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey({}, <redacted>)", self.info.key_id)
    }
}

/// One unwrap of a data key: the caller records it as a `key.accessed` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAccess {
    pub purpose: KeyPurpose,
    pub key_id: String,
    pub version: u32,
    pub reason: String,
    /// Who asked: the label the caller gave (`worker:backup@host`, `operator:alice`).
    pub actor: String,
}

/// Receives every data-key unwrap. Called synchronously on the unwrapping task: keep it quick
/// (push to a channel or a buffer).
pub trait KeyAccessObserver: Send + Sync {
    fn key_accessed(&self, access: KeyAccess);
}

impl KeyAccessObserver for tokio::sync::mpsc::UnboundedSender<KeyAccess> {
    fn key_accessed(&self, access: KeyAccess) {
        if self.send(access.clone()).is_err() {
            tracing::warn!(key_id = %access.key_id, reason = %access.reason, "key access not recorded: its receiver is gone");
        }
    }
}

impl KeyAccessObserver for std::sync::mpsc::Sender<KeyAccess> {
    fn key_accessed(&self, access: KeyAccess) {
        if self.send(access.clone()).is_err() {
            tracing::warn!(key_id = %access.key_id, reason = %access.reason, "key access not recorded: its receiver is gone");
        }
    }
}

/// An observer that keeps the accesses in memory, for callers that record them in a batch
/// (and for tests).
#[derive(Default)]
pub struct KeyAccessLog {
    accesses: Mutex<Vec<KeyAccess>>,
}

impl KeyAccessLog {
    pub fn new() -> Self {
        Self::default()
    }
    /// Removes and returns the accesses recorded so far.
    pub fn take(&self) -> Vec<KeyAccess> {
        std::mem::take(&mut *self.accesses.lock().unwrap_or_else(|p| p.into_inner()))
    }
    pub fn snapshot(&self) -> Vec<KeyAccess> {
        self.accesses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl KeyAccessObserver for KeyAccessLog {
    fn key_accessed(&self, access: KeyAccess) {
        self.accesses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(access);
    }
}

/// The object `keys/<purpose>/<key id>` for the given key bytes, wrapped with `master`, as
/// `init` and key rotation store it (pretty JSON). For golden test vectors (`tests/vectors/`),
/// which need the same bytes on every run; repositories make their keys with fresh randomness.
#[doc(hidden)]
pub fn data_key_object(
    master: &MasterKey,
    repository_id: uuid::Uuid,
    info: KeyInfo,
    secret: &[u8; 64],
) -> Result<Vec<u8>> {
    let sk = StoredKey::wrap(&master.wrap_key(), repository_id, info, secret);
    serde_json::to_vec_pretty(&sk)
        .map_err(|e| RepoError::format(sk.info().object_key(), e.to_string()))
}

/// The stored form of a data key (see the module documentation).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct StoredKey {
    pub format: String,
    pub format_version: u32,
    pub repository_id: uuid::Uuid,
    pub purpose: KeyPurpose,
    pub key_id: String,
    pub version: u32,
    pub created_at: DateTime<Utc>,
    pub wrapped: String,
    /// When a retirement scan first found nothing in the repository sealed with this version
    /// (`crate::reencrypt`); cleared if a later scan finds something. Not part of the wrapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unused_since: Option<DateTime<Utc>>,
    /// When the version was retired: unused since `unused_since` and past any object-lock hold.
    /// A retired version still unwraps; nothing new is sealed with it. Not part of the wrapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<DateTime<Utc>>,
}

pub(crate) const STORED_KEY_FORMAT: &str = "backstop-data-key";

fn key_ad<'a>(
    repository_id: &'a uuid::Uuid,
    purpose: KeyPurpose,
    key_id: &'a str,
    version: &'a [u8; 4],
) -> [&'a [u8]; 5] {
    [
        b"backstop/v1/data-key",
        repository_id.as_bytes(),
        purpose.as_str().as_bytes(),
        key_id.as_bytes(),
        version,
    ]
}

impl StoredKey {
    /// Generates a new random data key and its wrapped form.
    pub(crate) fn generate(
        wrap_key: &[u8; 64],
        repository_id: uuid::Uuid,
        purpose: KeyPurpose,
        version: u32,
    ) -> StoredKey {
        StoredKey::generate_at(wrap_key, repository_id, purpose, version, crate::now())
    }

    /// The same, created at `created_at` (rotation takes its time from the caller's clock, so
    /// that the rotation schedule's age test reads one clock).
    pub(crate) fn generate_at(
        wrap_key: &[u8; 64],
        repository_id: uuid::Uuid,
        purpose: KeyPurpose,
        version: u32,
        created_at: DateTime<Utc>,
    ) -> StoredKey {
        let key_id = format!(
            "{}-v{}-{:08x}",
            purpose,
            version,
            rand::rngs::OsRng.next_u32()
        );
        let mut secret = Zeroizing::new([0u8; 64]);
        rand::rngs::OsRng.fill_bytes(secret.as_mut());
        StoredKey::wrap(
            wrap_key,
            repository_id,
            KeyInfo {
                purpose,
                key_id,
                version,
                created_at,
            },
            &secret,
        )
    }

    /// Wraps the given key bytes (see the module documentation).
    fn wrap(
        wrap_key: &[u8; 64],
        repository_id: uuid::Uuid,
        info: KeyInfo,
        secret: &[u8; 64],
    ) -> StoredKey {
        let v = info.version.to_be_bytes();
        let wrapped = crate::seal::siv_wrap(
            wrap_key,
            &key_ad(&repository_id, info.purpose, &info.key_id, &v),
            secret,
        );
        StoredKey {
            format: STORED_KEY_FORMAT.into(),
            format_version: 1,
            repository_id,
            purpose: info.purpose,
            key_id: info.key_id,
            version: info.version,
            created_at: info.created_at,
            wrapped: STANDARD.encode(wrapped),
            unused_since: None,
            retired_at: None,
        }
    }

    pub(crate) fn info(&self) -> KeyInfo {
        KeyInfo {
            purpose: self.purpose,
            key_id: self.key_id.clone(),
            version: self.version,
            created_at: self.created_at,
        }
    }

    pub(crate) fn unwrap_key(&self, wrap_key: &[u8; 64]) -> Result<DataKey> {
        let path = self.info().object_key();
        let sealed = STANDARD
            .decode(&self.wrapped)
            .map_err(|_| RepoError::damaged(&path, "the wrapped key is not base64"))?;
        let v = self.version.to_be_bytes();
        let plain = crate::seal::siv_unwrap(
            wrap_key,
            &key_ad(&self.repository_id, self.purpose, &self.key_id, &v),
            &sealed,
        )
        .map(Zeroizing::new)
        .ok_or_else(|| {
            RepoError::damaged(
                &path,
                "the data key does not unwrap with this master key: the key object was modified \
                 (its purpose, id or version changed) or was copied from another repository",
            )
        })?;
        if plain.len() != 64 {
            return Err(RepoError::damaged(&path, "the wrapped key is not 64 bytes"));
        }
        let mut secret = Zeroizing::new([0u8; 64]);
        secret.copy_from_slice(&plain);
        Ok(DataKey::new(self.info(), secret))
    }
}

/// Refuses a key file whose mode lets its group or others read or write it.
#[cfg(unix)]
fn refuse_shared(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o777,
        // Unreadable or missing: reading it says so, with the path.
        Err(_) => return Ok(()),
    };
    if mode & 0o077 != 0 {
        return Err(RepoError::Config(format!(
            "the master key file {} has mode {mode:o}: its group or others can read it, and it opens every backup. Run `chmod 600 {}` (and give it to the user that runs backstop, e.g. `chown postgres {}` on a database host)",
            path.display(),
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn refuse_shared(_path: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_hashes_depend_on_the_key_the_domain_and_the_data() {
        let a = DataKey::for_tests(KeyPurpose::Config, "config-v1-a", [1; 64]);
        let b = DataKey::for_tests(KeyPurpose::Config, "config-v1-b", [2; 64]);
        let h = a.keyed_hash("d", b"value");
        assert_eq!(h, a.keyed_hash("d", b"value"));
        assert_ne!(h, b.keyed_hash("d", b"value"));
        assert_ne!(h, a.keyed_hash("e", b"value"));
        assert_ne!(h, a.keyed_hash("d", b"value2"));
        // Not the plain hash of the data.
        assert_ne!(h.as_slice(), sha3::Sha3_256::digest(b"value").as_slice());
    }

    #[test]
    fn master_key_encodings() {
        let k = MasterKey::generate();
        let b64 = k.to_base64();
        let k2 = MasterKey::from_encoded(&b64).unwrap();
        assert_eq!(*k.bytes, *k2.bytes);
        let hexed = hex::encode(k.bytes.as_ref());
        assert_eq!(*MasterKey::from_encoded(&hexed).unwrap().bytes, *k.bytes);
        let url = URL_SAFE_NO_PAD.encode(k.bytes.as_ref());
        assert_eq!(*MasterKey::from_encoded(&url).unwrap().bytes, *k.bytes);
        assert!(MasterKey::from_encoded("c2hvcnQ=").is_err());
        assert!(MasterKey::from_encoded("not a key!").is_err());
        assert_eq!(format!("{k:?}"), "MasterKey(<redacted>)");
    }

    fn private(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn key_file() {
        let dir = tempfile::tempdir().unwrap();
        let k = MasterKey::generate();
        let p = dir.path().join("k");
        std::fs::write(&p, format!("{}\n", k.to_base64().as_str())).unwrap();
        private(&p);
        assert_eq!(*MasterKey::from_file(&p).unwrap().bytes, *k.bytes);
        std::fs::write(&p, k.bytes.as_ref()).unwrap();
        assert_eq!(*MasterKey::from_file(&p).unwrap().bytes, *k.bytes);
        assert!(MasterKey::from_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_key_file_its_group_or_others_can_read_is_refused_with_the_chmod_to_run() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let k = MasterKey::generate();
        let p = dir.path().join("master.key");
        std::fs::write(&p, k.to_base64().as_str()).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = MasterKey::from_file(&p).err().unwrap().to_string();
            assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
            assert!(e.contains(&format!("mode {mode:o}")), "{e}");
        }
        private(&p);
        assert_eq!(*MasterKey::from_file(&p).unwrap().bytes, *k.bytes);
    }

    #[test]
    fn wrapped_keys_bind_their_identity() {
        let wrap = MasterKey::generate().wrap_key();
        let repo = uuid::Uuid::new_v4();
        let sk = StoredKey::generate(&wrap, repo, KeyPurpose::Wal, 3);
        assert!(sk.key_id.starts_with("wal-v3-"));
        let dk = sk.unwrap_key(&wrap).unwrap();
        assert_eq!(dk.version(), 3);
        let mut moved = sk.clone();
        moved.purpose = KeyPurpose::Database;
        assert!(moved.unwrap_key(&wrap).is_err());
        let mut bumped = sk.clone();
        bumped.version = 4;
        assert!(bumped.unwrap_key(&wrap).is_err());
        let other = MasterKey::generate().wrap_key();
        assert!(sk.unwrap_key(&other).is_err());
    }

    #[test]
    fn purposes_parse() {
        for p in KeyPurpose::ALL {
            assert_eq!(p.as_str().parse::<KeyPurpose>().unwrap(), p);
        }
        assert!("nope".parse::<KeyPurpose>().is_err());
    }
}
