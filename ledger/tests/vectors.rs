//! Golden vector of a signed checkpoint (`tests/vectors/README.md`): an ed25519 signature, by a
//! key from a fixed seed, over the head of the three-event ledger excerpt that
//! `events/tests/vectors.rs` pins.
//!
//! The test signs the bytes `docs/FORMAT.md` documents (`"BKSTP-CP1"`, position u64, hash,
//! signed-at i64 microseconds, big-endian) itself, because the ledger's signer always signs at
//! the current time; ed25519 signatures are deterministic, so the vector is reproducible. The
//! ledger's own verifier must then accept the file: a change to the signed bytes or to the
//! stored JSON fails here. `BACKSTOP_WRITE_VECTORS=1` rewrites the files instead of comparing.

#[path = "../../tests/vectors/support.rs"]
mod support;

use backstop_events::{Digest, Envelope};
use backstop_ledger::Checkpoint;
use backstop_ledger::CheckpointSigner;
use backstop_ledger::checkpoint::verify_checkpoint;
use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::{Signer, SigningKey};

use support::{golden, hex, unhex};

/// A test key, public by design: it signs nothing but these vectors.
fn seed() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

fn signed_at() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-02T03:04:08.000001Z")
        .expect("a fixed time")
        .with_timezone(&Utc)
}

fn excerpt_head() -> Envelope {
    let text = String::from_utf8(support::read("ledger-excerpt.jsonl")).expect("UTF-8");
    let last = text.lines().last().expect("the excerpt has events");
    serde_json::from_str(last).expect("an envelope")
}

fn checkpoint_bytes(position: u64, hash: &Digest, at: &DateTime<Utc>) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"BKSTP-CP1");
    b.extend_from_slice(&position.to_be_bytes());
    b.extend_from_slice(&hash.0);
    b.extend_from_slice(&at.timestamp_micros().to_be_bytes());
    b
}

#[test]
fn signed_checkpoint_over_the_excerpt_head() {
    // The seed as the signer's key file holds it: 64 hex digits and a newline.
    let seed_file = golden(
        "checkpoint-signing.seed",
        format!("{}\n", hex(&seed())).as_bytes(),
    );
    let head = excerpt_head();
    let key = SigningKey::from_bytes(&seed());
    let public_key = hex(&key.verifying_key().to_bytes());
    let at = signed_at();
    let signature = key.sign(&checkpoint_bytes(head.position, &head.hash, &at));
    let produced = Checkpoint {
        position: head.position,
        hash: head.hash,
        signed_at: at,
        public_key: public_key.clone(),
        signature: hex(&signature.to_bytes()),
    };
    // Exactly the value the ledger stores in its `checkpoints` tree (no trailing newline).
    let stored = golden(
        "checkpoint.json",
        &serde_json::to_vec(&produced).expect("a checkpoint encodes"),
    );

    // The seed file loads as the ledger's signing key, and it is the key that signed.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let key_path = dir.path().join("ledger-signing.key");
    std::fs::write(&key_path, &seed_file).expect("write the key file");
    // Only its owner may read a signing key (a shared one is refused).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod 600");
    }
    let signer = CheckpointSigner::load_or_create(&key_path).expect("the seed file loads");
    assert_eq!(
        unhex(std::str::from_utf8(&seed_file).expect("UTF-8")),
        seed()
    );

    let cp: Checkpoint = serde_json::from_slice(&stored).expect("the file is a checkpoint");
    assert_eq!(cp.public_key, signer.public_key_hex());
    verify_checkpoint(&cp, &signer.public_key_hex()).expect("the ledger verifies the vector");
    assert_eq!(
        (cp.position, cp.hash),
        (3, head.hash),
        "it signs the head of the excerpt"
    );

    // Every signed field matters.
    let mut later = cp.clone();
    later.signed_at = cp.signed_at + Duration::microseconds(1);
    assert!(verify_checkpoint(&later, &cp.public_key).is_err());
    let mut moved = cp.clone();
    moved.position = 2;
    assert!(verify_checkpoint(&moved, &cp.public_key).is_err());
    let mut rehashed = cp.clone();
    rehashed.hash = Digest::of(b"another head");
    assert!(verify_checkpoint(&rehashed, &cp.public_key).is_err());
    let other = hex(&SigningKey::from_bytes(&[9; 32]).verifying_key().to_bytes());
    assert!(verify_checkpoint(&cp, &other).is_err());
}
