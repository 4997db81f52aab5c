//! Sealed objects: the envelope header parse, authentication, decryption and decompression of
//! `backstop_repo::seal::open_object` with a fixed test key (the golden vectors' data key, so
//! the seeds from tests/vectors/repository open). Garbage must be refused with a typed error.
//!
//! Input: the first byte picks the mode. Even: the rest is a sealed object, opened as the
//! golden manifest. Odd: the rest is a plaintext, sealed with the test key, then opened back
//! (it must round-trip) and, after flipping one byte chosen by the plaintext's length, refused.
#![no_main]

use backstop_repo::seal::{self, Brotli, ObjectKind};
use backstop_repo::{DataKey, KeyInfo, KeyPurpose};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

const REPOSITORY_ID: Uuid = Uuid::from_u128(0x01941f29_7c00_7000_8000_00000000a001);
const PATH: &str = "manifests/01941f29-7c00-7000-8000-00000000b001";

fn key() -> DataKey {
    // Test key, public by design (tests/vectors/README.md).
    let info = KeyInfo {
        purpose: KeyPurpose::Database,
        key_id: "database-v1-00c0ffee".into(),
        version: 1,
        created_at: chrono::DateTime::UNIX_EPOCH,
    };
    DataKey::from_secret(info, std::array::from_fn(|i| 0x80 + i as u8))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let key = key();
    if mode % 2 == 0 {
        let _ = seal::parse_header(PATH, rest);
        let _ = seal::open_object(&REPOSITORY_ID, PATH, &key, rest, Some(rest.len()));
        return;
    }
    let compression = (mode & 2 != 0).then_some(Brotli {
        quality: 2,
        lgwin: 22,
    });
    let mut sealed = seal::seal_object(
        &REPOSITORY_ID,
        PATH,
        &key,
        ObjectKind::Manifest,
        compression,
        rest,
    );
    match seal::open_object(&REPOSITORY_ID, PATH, &key, &sealed, None) {
        Ok((_, plain)) => assert_eq!(plain, rest, "a sealed object opens to its plaintext"),
        Err(e) => panic!("a freshly sealed object does not open: {e}"),
    }
    let at = rest.len() % sealed.len();
    sealed[at] ^= 0x01;
    assert!(
        seal::open_object(&REPOSITORY_ID, PATH, &key, &sealed, None).is_err(),
        "a sealed object with byte {at} flipped still opens"
    );
});
