//! Sealed objects: the envelope of every encrypted object in the repository (chunks, manifests,
//! other blobs), and the AES-256-SIV helpers used for key wrapping and MACs.
//!
//! # Envelope format (version 1)
//!
//! ```text
//! offset  size  field
//! 0       3     magic "BKS"
//! 3       1     envelope version = 1
//! 4       1     object kind: 1 chunk, 2 manifest, 3 blob
//! 5       1     compression: 0 none, 1 brotli
//! 6       1     key id length L (1..=255)
//! 7       L     key id (ASCII), the data key that sealed the object
//! 7+L     16    AES-SIV synthetic IV (the authentication tag)
//! 23+L    n     ciphertext: AES-256-SIV(data key, AD, compressed plaintext), n = its length
//! ```
//!
//! The associated data (AES-SIV header vector, in this order, each item authenticated
//! separately) is:
//! 1. `"backstop/v1/object"` (domain separation);
//! 2. the repository id (16 bytes);
//! 3. the object's key in the repository (`chunks/ab/<chunk id hex>`, `manifests/<backup id>`):
//!    this binds the chunk id (it is in the key) and prevents swapping objects between paths;
//! 4. the key id;
//! 5. the 7+L header bytes above (kind, compression and key id cannot be altered).
//!
//! Anything modified (a bit of the header, the tag or the ciphertext), an object copied to
//! another path or repository, or a wrong key, fails authentication.
//!
//! Compression is brotli at the repository's quality and window (`lgwin`); an object whose
//! compressed form is not smaller than the plaintext is stored uncompressed (kind byte 0), so
//! incompressible data costs no expansion. An object smaller than the window is compressed with
//! the smallest window that holds all of it ([`window_bits`]): the output is the same size (no
//! match can reach further back than the object's start), but the encoder and the decoder
//! allocate and clear a ring buffer of that size per object instead of the full window (with
//! 256 KiB chunks and `lgwin` 22, clearing 4 MiB per chunk cost a tenth of the backup's CPU).
//! The window is in the brotli stream's own header, so readers need nothing else.
//!
//! AES-SIV is deterministic: the same key, AD and plaintext give the same object. That is
//! intended (it is what makes deduplication and idempotent re-uploads safe) and leaks only
//! equality of objects at the same path, which the path already reveals.

use aes_siv::aead::generic_array::GenericArray;
use aes_siv::siv::Aes256Siv;
use aes_siv::{KeyInit, Tag};
use brotli::enc::BrotliEncoderParams;
use sha3::{Digest, Sha3_256};
use uuid::Uuid;

use crate::error::{RepoError, Result};
use crate::keys::DataKey;

pub(crate) const MAGIC: &[u8; 3] = b"BKS";
pub(crate) const ENVELOPE_VERSION: u8 = 1;
const TAG_LEN: usize = 16;
const AD_DOMAIN: &[u8] = b"backstop/v1/object";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Chunk = 1,
    Manifest = 2,
    Blob = 3,
}

impl ObjectKind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(ObjectKind::Chunk),
            2 => Some(ObjectKind::Manifest),
            3 => Some(ObjectKind::Blob),
            _ => None,
        }
    }
}

/// Brotli settings for sealing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Brotli {
    pub quality: u32,
    pub lgwin: u32,
}

/// The parsed fixed part of an envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvelopeHeader {
    pub kind: ObjectKind,
    pub compressed: bool,
    pub key_id: String,
    /// Bytes before the tag (7 + key id length).
    pub len: usize,
}

/// SHA3-256 of `data`.
pub fn sha3(data: &[u8]) -> [u8; 32] {
    Sha3_256::digest(data).into()
}

pub(crate) fn siv(key: &[u8; 64]) -> Aes256Siv {
    Aes256Siv::new(GenericArray::from_slice(key))
}

/// A 16-byte MAC over `headers` (AES-SIV of an empty plaintext is S2V, a PRF over the headers).
pub(crate) fn siv_mac(key: &[u8; 64], headers: &[&[u8]]) -> [u8; 16] {
    let mut tag = [0u8; 16];
    // An empty plaintext and at most a handful of headers: this cannot fail.
    if let Ok(t) = siv(key).encrypt_in_place_detached(headers.iter(), &mut []) {
        tag.copy_from_slice(t.as_slice());
    }
    tag
}

pub(crate) fn siv_mac_ok(key: &[u8; 64], headers: &[&[u8]], mac: &[u8]) -> bool {
    if mac.len() != TAG_LEN {
        return false;
    }
    siv(key)
        .decrypt_in_place_detached(headers.iter(), &mut [], Tag::from_slice(mac))
        .is_ok()
}

/// Encrypts `plaintext` under `key` with `headers` as AD: returns tag || ciphertext.
pub(crate) fn siv_wrap(key: &[u8; 64], headers: &[&[u8]], plaintext: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; TAG_LEN + plaintext.len()];
    out[TAG_LEN..].copy_from_slice(plaintext);
    let (tag_out, body) = out.split_at_mut(TAG_LEN);
    if let Ok(tag) = siv(key).encrypt_in_place_detached(headers.iter(), body) {
        tag_out.copy_from_slice(tag.as_slice());
    }
    out
}

/// Reverses [`siv_wrap`]; `None` when authentication fails.
pub(crate) fn siv_unwrap(key: &[u8; 64], headers: &[&[u8]], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < TAG_LEN {
        return None;
    }
    let mut body = sealed[TAG_LEN..].to_vec();
    siv(key)
        .decrypt_in_place_detached(
            headers.iter(),
            &mut body,
            Tag::from_slice(&sealed[..TAG_LEN]),
        )
        .ok()?;
    Some(body)
}

/// Seals `plaintext` as an object stored at `path`. CPU-bound: call from a blocking thread.
pub fn seal_object(
    repository_id: &Uuid,
    path: &str,
    key: &DataKey,
    kind: ObjectKind,
    compression: Option<Brotli>,
    plaintext: &[u8],
) -> Vec<u8> {
    let key_id = key.key_id().as_bytes();
    let header_len = 7 + key_id.len();
    let mut out = Vec::with_capacity(
        header_len
            + TAG_LEN
            + brotli::enc::BrotliEncoderMaxCompressedSize(plaintext.len()).max(plaintext.len()),
    );
    out.extend_from_slice(MAGIC);
    out.push(ENVELOPE_VERSION);
    out.push(kind as u8);
    out.push(0);
    out.push(key_id.len() as u8);
    out.extend_from_slice(key_id);
    out.extend_from_slice(&[0u8; TAG_LEN]);
    let body_start = header_len + TAG_LEN;

    let mut compressed = false;
    if let Some(b) = compression {
        // Writing into a Vec cannot fail.
        let ok = compress_into(&brotli_params(b, plaintext.len()), plaintext, &mut out).is_ok();
        if ok && out.len() - body_start < plaintext.len() {
            compressed = true;
        } else {
            out.truncate(body_start);
        }
    }
    if !compressed {
        out.extend_from_slice(plaintext);
    }
    out[5] = compressed as u8;

    let (head, rest) = out.split_at_mut(header_len);
    let (tag_out, body) = rest.split_at_mut(TAG_LEN);
    let ad: [&[u8]; 5] = [
        AD_DOMAIN,
        repository_id.as_bytes(),
        path.as_bytes(),
        key_id,
        head,
    ];
    // Five headers (limit 126): encryption cannot fail.
    if let Ok(tag) = siv(key.secret()).encrypt_in_place_detached(ad.iter(), body) {
        tag_out.copy_from_slice(tag.as_slice());
    }
    out
}

/// The brotli window (`lgwin`) for an object of `len` bytes: the smallest whose window
/// (`2^lgwin - 16` bytes) holds the whole object, at least brotli's minimum of 10 and at most
/// `max` (the repository's `lgwin`).
pub fn window_bits(len: usize, max: u32) -> u32 {
    let mut bits = 10u32;
    while bits < max && (1usize << bits) - 16 < len {
        bits += 1;
    }
    bits.min(max.max(10))
}

/// How many bytes the encoder takes in and gives out at a time. `brotli::BrotliCompress` uses
/// 4 KiB. From quality 2 up the output does not depend on it (the encoder gathers its own
/// blocks), but qualities 0 and 1 compress each buffer of input as a fragment of its own, so
/// 4 KiB made them slower and larger. Measured on 16 MiB WAL segments of the trading dataset:
/// quality 1 went from 111 MB/s, ratio 3.18, to 221 MB/s, ratio 4.10 (quality 0: 75 to 209
/// MB/s, ratio 3.04 to 3.64); quality 2 stays at 150 MB/s, ratio 4.44, byte for byte the same.
pub(crate) const BROTLI_BUFFER: usize = 64 << 10;

/// Appends the brotli stream of `plaintext` to `out`, [`BROTLI_BUFFER`] bytes at a time.
pub(crate) fn compress_into(
    params: &BrotliEncoderParams,
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut input = vec![0u8; BROTLI_BUFFER.min(plaintext.len()).max(16)];
    let mut output = vec![0u8; BROTLI_BUFFER];
    brotli::BrotliCompressCustomAlloc(
        &mut &plaintext[..],
        out,
        &mut input,
        &mut output,
        params,
        brotli::enc::StandardAlloc::default(),
    )
}

pub(crate) fn brotli_params(b: Brotli, size_hint: usize) -> BrotliEncoderParams {
    BrotliEncoderParams {
        quality: b.quality as i32,
        lgwin: window_bits(size_hint, b.lgwin) as i32,
        size_hint,
        ..Default::default()
    }
}

/// Parses the envelope header of an object read from `path`.
pub fn parse_header(path: &str, object: &[u8]) -> Result<EnvelopeHeader> {
    let bad = |d: &str| RepoError::damaged(path, d.to_string());
    if object.len() < 7 {
        return Err(bad("truncated: shorter than the envelope header"));
    }
    if &object[..3] != MAGIC {
        return Err(bad("not a Backstop sealed object (bad magic)"));
    }
    if object[3] != ENVELOPE_VERSION {
        return Err(RepoError::format(
            path,
            format!(
                "envelope version {} (this build reads version {ENVELOPE_VERSION}; upgrade backstop)",
                object[3]
            ),
        ));
    }
    let kind = ObjectKind::from_u8(object[4]).ok_or_else(|| bad("unknown object kind"))?;
    let compressed = match object[5] {
        0 => false,
        1 => true,
        _ => return Err(bad("unknown compression")),
    };
    let l = object[6] as usize;
    let len = 7 + l;
    if l == 0 || object.len() < len + TAG_LEN {
        return Err(bad("truncated: shorter than its header and tag"));
    }
    let key_id = std::str::from_utf8(&object[7..len])
        .map_err(|_| bad("key id is not text"))?
        .to_string();
    Ok(EnvelopeHeader {
        kind,
        compressed,
        key_id,
        len,
    })
}

/// Authenticates, decrypts and decompresses an object read from `path`. `size_hint` is the
/// expected plaintext length (for the allocation), when known. CPU-bound.
pub fn open_object(
    repository_id: &Uuid,
    path: &str,
    key: &DataKey,
    object: &[u8],
    size_hint: Option<usize>,
) -> Result<(EnvelopeHeader, Vec<u8>)> {
    let header = parse_header(path, object)?;
    if header.key_id != key.key_id() {
        return Err(RepoError::Usage(format!(
            "object {path} is sealed with key {}, not {}",
            header.key_id,
            key.key_id()
        )));
    }
    let head = &object[..header.len];
    let tag = Tag::clone_from_slice(&object[header.len..header.len + TAG_LEN]);
    let mut body = object[header.len + TAG_LEN..].to_vec();
    let ad: [&[u8]; 5] = [
        AD_DOMAIN,
        repository_id.as_bytes(),
        path.as_bytes(),
        header.key_id.as_bytes(),
        head,
    ];
    siv(key.secret())
        .decrypt_in_place_detached(ad.iter(), &mut body, &tag)
        .map_err(|_| {
            RepoError::damaged(
                path,
                format!(
                    "authentication failed with key {}: the object was modified, truncated, or copied from another path or repository",
                    header.key_id
                ),
            )
        })?;
    if !header.compressed {
        return Ok((header, body));
    }
    let mut out = Vec::with_capacity(size_hint.unwrap_or(body.len() * 4));
    brotli::BrotliDecompress(&mut &body[..], &mut out).map_err(|e| {
        RepoError::damaged(path, format!("authenticated but does not decompress: {e}"))
    })?;
    Ok((header, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{DataKey, KeyPurpose};

    fn key(id: &str) -> DataKey {
        DataKey::for_tests(KeyPurpose::Database, id, [7u8; 64])
    }

    /// 2.5 MB of short numbered lines: compressible, and larger than one encoder buffer.
    fn numbered_lines() -> Vec<u8> {
        (0..300_000u32)
            .map(|i| format!("{i}\t{}\n", i % 977))
            .collect::<String>()
            .into_bytes()
    }

    #[test]
    fn round_trip_and_tamper() {
        let repo = Uuid::new_v4();
        let k = key("database-v1-00000000");
        let data: Vec<u8> = b"hello world "
            .iter()
            .cycle()
            .take(100_000)
            .copied()
            .collect();
        let b = Some(Brotli {
            quality: 1,
            lgwin: 22,
        });
        let obj = seal_object(&repo, "chunks/ab/x", &k, ObjectKind::Chunk, b, &data);
        assert!(obj.len() < data.len() / 10, "compressed");
        let (h, back) = open_object(&repo, "chunks/ab/x", &k, &obj, Some(data.len())).unwrap();
        assert!(h.compressed);
        assert_eq!(back, data);
        // Another path, another repository, a flipped bit: all fail.
        assert!(open_object(&repo, "chunks/ab/y", &k, &obj, None).is_err());
        assert!(open_object(&Uuid::new_v4(), "chunks/ab/x", &k, &obj, None).is_err());
        for pos in [5usize, 20, obj.len() / 2, obj.len() - 1] {
            let mut bad = obj.clone();
            bad[pos] ^= 1;
            assert!(
                open_object(&repo, "chunks/ab/x", &k, &bad, None).is_err(),
                "flip at {pos}"
            );
        }
        // A different key with the same id fails too.
        let k2 = DataKey::for_tests(KeyPurpose::Database, "database-v1-00000000", [8u8; 64]);
        assert!(open_object(&repo, "chunks/ab/x", &k2, &obj, None).is_err());
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let repo = Uuid::new_v4();
        let k = key("k1");
        let data: Vec<u8> = (0..50_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let obj = seal_object(
            &repo,
            "p",
            &k,
            ObjectKind::Blob,
            Some(Brotli {
                quality: 1,
                lgwin: 22,
            }),
            &data,
        );
        let (h, back) = open_object(&repo, "p", &k, &obj, None).unwrap();
        assert_eq!(back, data);
        assert!(obj.len() <= data.len() + 7 + 2 + 16);
        let _ = h;
        // Empty plaintext works.
        let obj = seal_object(&repo, "p", &k, ObjectKind::Blob, None, b"");
        assert_eq!(open_object(&repo, "p", &k, &obj, None).unwrap().1, b"");
    }

    #[test]
    fn window_fits_the_object() {
        assert_eq!(window_bits(0, 22), 10);
        assert_eq!(window_bits(1008, 22), 10);
        assert_eq!(window_bits(1009, 22), 11);
        assert_eq!(window_bits((1 << 20) - 16, 22), 20);
        assert_eq!(window_bits(1 << 20, 22), 21);
        assert_eq!(window_bits(64 << 20, 22), 22);
        assert_eq!(window_bits(64 << 20, 24), 24);
        // A smaller window than the repository's compresses an object that fits it to the same
        // bytes' worth, and any reader opens it.
        let repo = Uuid::new_v4();
        let k = key("k1");
        let data = numbered_lines();
        let small = seal_object(
            &repo,
            "p",
            &k,
            ObjectKind::Chunk,
            Some(Brotli {
                quality: 2,
                lgwin: 22,
            }),
            &data,
        );
        let mut full = Vec::new();
        let params = BrotliEncoderParams {
            quality: 2,
            lgwin: 22,
            size_hint: data.len(),
            ..Default::default()
        };
        brotli::BrotliCompress(&mut &data[..], &mut full, &params).unwrap();
        let body = small.len() - (7 + 2 + TAG_LEN);
        assert!(
            body <= full.len() + full.len() / 100,
            "{body} vs {}",
            full.len()
        );
        assert_eq!(open_object(&repo, "p", &k, &small, None).unwrap().1, data);
    }

    /// Quality 1 compresses each input buffer as a fragment: the seal's larger buffers must
    /// beat `BrotliCompress`'s 4 KiB ones there, and the stream stays standard brotli.
    #[test]
    fn quality_1_compresses_whole_buffers_not_4_kib_fragments() {
        let repo = Uuid::new_v4();
        let k = key("k1");
        let data = numbered_lines();
        let quality = 1;
        let b = Brotli { quality, lgwin: 22 };
        let sealed = seal_object(&repo, "p", &k, ObjectKind::Chunk, Some(b), &data);
        let mut small_buffers = Vec::new();
        brotli::BrotliCompress(
            &mut &data[..],
            &mut small_buffers,
            &brotli_params(b, data.len()),
        )
        .unwrap();
        let body = sealed.len() - (7 + 2 + TAG_LEN);
        assert!(
            body * 10 < small_buffers.len() * 9,
            "quality {quality}: {body} bytes sealed vs {} with 4 KiB buffers",
            small_buffers.len()
        );
        assert_eq!(open_object(&repo, "p", &k, &sealed, None).unwrap().1, data);
    }

    #[test]
    fn macs() {
        let k = [3u8; 64];
        let m = siv_mac(&k, &[b"a", b"b"]);
        assert!(siv_mac_ok(&k, &[b"a", b"b"], &m));
        assert!(!siv_mac_ok(&k, &[b"a", b"c"], &m));
        assert!(!siv_mac_ok(&[4u8; 64], &[b"a", b"b"], &m));
        let w = siv_wrap(&k, &[b"x"], b"secret");
        assert_eq!(siv_unwrap(&k, &[b"x"], &w).unwrap(), b"secret");
        assert!(siv_unwrap(&k, &[b"y"], &w).is_none());
    }
}
