//! Signed checkpoints: an ed25519 signature over (position, hash, time) of the chain head.
//!
//! A checkpoint lets anyone holding only the public key confirm that the chain up to its
//! position is the one the ledger had when it signed: an attacker who rewrites history would
//! have to recompute every hash after the change and forge the signature.
//!
//! Signed bytes (big-endian): `"BKSTP-CP1"`, position u64, hash 32 bytes, signed-at i64
//! (microseconds since the epoch).
//!
//! The signing key is a 32-byte ed25519 seed, hex-encoded in a file with mode 0600, kept apart
//! from the ledger data so that a copy of the ledger does not carry the means to re-sign it. This
//! crate's default ([`default_key_path`], `DATA_DIR/keys/ledger-signing.key`) is beside the
//! ledger directory, not inside it; the `backstop` binary defaults to `ledger-signing.key` beside
//! its configuration file, outside the data directory altogether, and keeps using a key found at
//! the old path (with a warning giving the `mv`).

use std::path::{Path, PathBuf};

use backstop_events::{Digest, now_micros};
use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::LedgerError;

const MAGIC: &[u8; 9] = b"BKSTP-CP1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub position: u64,
    pub hash: Digest,
    pub signed_at: DateTime<Utc>,
    /// The public key that signed, hex.
    pub public_key: String,
    /// The ed25519 signature, hex.
    pub signature: String,
}

fn signed_bytes(position: u64, hash: &Digest, at: &DateTime<Utc>) -> Vec<u8> {
    let mut b = Vec::with_capacity(57);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&position.to_be_bytes());
    b.extend_from_slice(&hash.0);
    b.extend_from_slice(&at.timestamp_micros().to_be_bytes());
    b
}

/// The key the ledger signs checkpoints with.
pub struct CheckpointSigner {
    key: SigningKey,
}

impl CheckpointSigner {
    /// Loads the key at `path`, or creates one there (mode 0600) if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<CheckpointSigner, LedgerError> {
        let err = |why: String| LedgerError::SigningKey {
            path: path.to_path_buf(),
            why,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                if let Some(mode) = shared_mode(path) {
                    return Err(err(format!(
                        "its mode {mode:o} lets its group or others read it, and whoever holds it can sign checkpoints: run `chmod 600 {}`",
                        path.display()
                    )));
                }
                let bytes = hex::decode(text.trim())
                    .map_err(|_| err("not a hex-encoded ed25519 seed".into()))?;
                let seed: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| err("the seed must be 32 bytes (64 hex characters)".into()))?;
                Ok(CheckpointSigner {
                    key: SigningKey::from_bytes(&seed),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::generate(&mut rand::rngs::OsRng);
                write_private(path, &hex::encode(key.to_bytes()))
                    .map_err(|e| err(format!("cannot create it: {e}")))?;
                tracing::info!(path = %path.display(), "created a new checkpoint signing key");
                Ok(CheckpointSigner { key })
            }
            Err(e) => Err(err(format!("cannot read it: {e}"))),
        }
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, position: u64, hash: Digest) -> Checkpoint {
        let signed_at = now_micros();
        let sig = self.key.sign(&signed_bytes(position, &hash, &signed_at));
        Checkpoint {
            position,
            hash,
            signed_at,
            public_key: self.public_key_hex(),
            signature: hex::encode(sig.to_bytes()),
        }
    }
}

/// The prefix of a signed statement (the audit export's coverage statement), so that no
/// statement's signature can ever pass for a checkpoint's and the other way round.
const STATEMENT_MAGIC: &[u8; 9] = b"BKSTP-ST1";

impl CheckpointSigner {
    /// Signs a statement that is not a checkpoint (the audit export's signed coverage), hex.
    /// The signed bytes are `BKSTP-ST1` followed by `statement`.
    pub fn sign_statement(&self, statement: &[u8]) -> String {
        let mut b = STATEMENT_MAGIC.to_vec();
        b.extend_from_slice(statement);
        hex::encode(self.key.sign(&b).to_bytes())
    }
}

/// Checks a signature made by [`CheckpointSigner::sign_statement`]. Returns what is wrong.
pub fn verify_statement(
    statement: &[u8],
    signature_hex: &str,
    public_key_hex: &str,
) -> Result<(), String> {
    let key_bytes: [u8; 32] = hex::decode(public_key_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("the public key is not 32 hex-encoded bytes")?;
    let key = VerifyingKey::from_bytes(&key_bytes).map_err(|e| format!("bad public key: {e}"))?;
    let sig_bytes: [u8; 64] = hex::decode(signature_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("the signature is not 64 hex-encoded bytes")?;
    let mut b = STATEMENT_MAGIC.to_vec();
    b.extend_from_slice(statement);
    key.verify(&b, &Signature::from_bytes(&sig_bytes))
        .map_err(|_| "the signature does not match".to_string())
}

/// The file's mode when its group or others may read or write it.
pub(crate) fn shared_mode(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

pub(crate) fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Checks a checkpoint's signature against a public key (hex). Returns what is wrong, if anything.
pub fn verify_checkpoint(cp: &Checkpoint, public_key_hex: &str) -> Result<(), String> {
    let key_bytes: [u8; 32] = hex::decode(public_key_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("the public key is not 32 hex-encoded bytes")?;
    let key = VerifyingKey::from_bytes(&key_bytes).map_err(|e| format!("bad public key: {e}"))?;
    if cp.public_key != public_key_hex {
        return Err(format!(
            "signed by key {}, not the expected {}",
            cp.public_key, public_key_hex
        ));
    }
    let sig_bytes: [u8; 64] = hex::decode(&cp.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("the signature is not 64 hex-encoded bytes")?;
    let sig = Signature::from_bytes(&sig_bytes);
    key.verify(&signed_bytes(cp.position, &cp.hash, &cp.signed_at), &sig)
        .map_err(|_| "the signature does not match".to_string())
}

/// Where the signing key lives by default, given the data directory.
pub fn default_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys").join("ledger-signing.key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let signer = CheckpointSigner::load_or_create(&path).unwrap();
        let again = CheckpointSigner::load_or_create(&path).unwrap();
        assert_eq!(signer.public_key_hex(), again.public_key_hex());
        let cp = signer.sign(42, Digest::of(b"head"));
        assert!(verify_checkpoint(&cp, &signer.public_key_hex()).is_ok());
        let mut bad = cp.clone();
        bad.position = 43;
        assert!(verify_checkpoint(&bad, &signer.public_key_hex()).is_err());
        let other = CheckpointSigner::load_or_create(&dir.path().join("k2")).unwrap();
        assert!(verify_checkpoint(&cp, &other.public_key_hex()).is_err());
    }

    fn write_with_mode(path: &Path, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_malformed_key_file_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_with_mode(&path, "not hex", 0o600);
        let e = CheckpointSigner::load_or_create(&path).err().unwrap();
        assert!(e.to_string().contains("hex"), "{e}");
    }

    #[test]
    fn a_signing_key_others_can_read_is_refused_with_the_chmod_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let good = CheckpointSigner::load_or_create(&path).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            write_with_mode(&path, &hex::encode(good.key.to_bytes()), mode);
            let e = CheckpointSigner::load_or_create(&path)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(&format!("chmod 600 {}", path.display())), "{e}");
            assert!(e.contains(&format!("{mode:o}")), "{e}");
        }
        write_with_mode(&path, &hex::encode(good.key.to_bytes()), 0o600);
        let again = CheckpointSigner::load_or_create(&path).unwrap();
        assert_eq!(again.public_key_hex(), good.public_key_hex());
    }
}
