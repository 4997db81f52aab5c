//! Shared by every golden-vector test (`events`, `ledger`, `services/repo`, `services/api`):
//! each includes this file with `#[path = ".../tests/vectors/support.rs"] mod support;`.
//!
//! [`golden`] compares bytes a test produced with the checked-in file, byte for byte, and returns
//! the file's bytes so that the test then decodes and verifies what is on disk (not what it just
//! produced). With `BACKSTOP_WRITE_VECTORS=1` it writes the produced bytes instead: that is how
//! the vectors are (re)generated, and a change to a vector is a format change (see
//! `tests/vectors/README.md`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The environment variable that makes [`golden`] write the vectors instead of comparing.
pub const WRITE_ENV: &str = "BACKSTOP_WRITE_VECTORS";

/// `tests/vectors/` at the workspace root, found from the crate that includes this file.
pub fn vectors_dir() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir
        .ancestors()
        .map(|p| p.join("tests").join("vectors"))
        .find(|p| p.join("README.md").is_file())
        .unwrap_or_else(|| {
            panic!(
                "no tests/vectors/README.md above {}: the golden vectors are missing",
                crate_dir.display()
            )
        })
}

pub fn writing() -> bool {
    std::env::var(WRITE_ENV).is_ok_and(|v| v == "1")
}

/// Reads a vector file (for vectors produced by another crate's test).
pub fn read(name: &str) -> Vec<u8> {
    let path = vectors_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the golden vector {}: {e} (regenerate with {WRITE_ENV}=1, see tests/vectors/README.md)",
            path.display()
        )
    })
}

/// Compares `produced` with the vector `name` (a path under `tests/vectors/`) byte for byte, or
/// writes it when regenerating. Returns the bytes of the file.
pub fn golden(name: &str, produced: &[u8]) -> Vec<u8> {
    let path = vectors_dir().join(name);
    if writing() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        std::fs::write(&path, produced)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        eprintln!("wrote golden vector {}", path.display());
        return produced.to_vec();
    }
    let stored = read(name);
    if stored != produced {
        let at = stored
            .iter()
            .zip(produced)
            .position(|(a, b)| a != b)
            .unwrap_or(stored.len().min(produced.len()));
        let window = |b: &[u8]| {
            let from = at.saturating_sub(16);
            let to = (at + 16).min(b.len());
            format!("{:?}", String::from_utf8_lossy(&b[from.min(to)..to]))
        };
        panic!(
            "golden vector {name} changed: the file has {} bytes, this build produces {}; first \
             difference at byte {at}\n  file:  ...{}...\n  build: ...{}...\n\
             A vector is a format that existing ledgers, exports and repositories rely on: \
             if the change is intended, it is a new format version (tests/vectors/README.md).",
            stored.len(),
            produced.len(),
            window(&stored),
            window(produced),
        );
    }
    stored
}

/// Lowercase hex, for vectors that hold binary data as text.
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

pub fn unhex(text: &str) -> Vec<u8> {
    ::hex::decode(text.trim()).unwrap_or_else(|e| panic!("not hex ({e}): {text:?}"))
}
