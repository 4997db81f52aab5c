//! Content-defined chunking and chunk ids.
//!
//! # Chunking
//! fastcdc 5.0.0's v2020 algorithm (gear hash, normalization level 1, the crate's default gear
//! table), with the repository's power-of-two min/avg/max sizes. The cut-point function is
//! called directly over our own buffer, so chunking reads an `AsyncRead` without a blocking
//! thread. Cut points depend only on the bytes (never on how reads were split), so the same
//! stream always gives the same chunks, and an edit only changes the chunks around it.
//!
//! Memory: one read buffer of `2 * max_size` bytes per stream, allocated once. Each chunk is
//! copied out into its own exact-size allocation (a memcpy, about 1% of the CPU the chunk costs
//! downstream) so that a chunk in flight holds only its own bytes, never a whole read buffer:
//! a stream's memory is the buffer plus the chunks it has in flight.
//!
//! # Chunk ids
//! `id = SHA3-256(chunk-id key || plaintext)`, with the 32-byte per-repository chunk-id key.
//! SHA3 is not subject to length extension, so this prefix-keyed construction is a PRF (a MAC),
//! as KMAC is: ids reveal nothing about the content to someone without the key, and cannot be
//! forged. Objects are stored at `chunks/<first 2 hex digits>/<64 hex digits>`.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use fastcdc::v2020::{Normalization, cut, select_masks};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha3::{Digest, Sha3_256};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ChunkerParams;

/// A 32-byte digest, shown and serialized as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash32(pub [u8; 32]);

/// A chunk's id: the keyed SHA3-256 of its plaintext.
pub type ChunkId = Hash32;

impl Hash32 {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The object key of the chunk with this id: `chunks/ab/ab12...`.
    pub fn chunk_key(&self) -> String {
        let h = self.to_hex();
        format!("chunks/{}/{}", &h[..2], h)
    }

    /// Parses `chunks/ab/<64 hex>`; `None` for anything else.
    pub fn from_chunk_key(key: &str) -> Option<Hash32> {
        let rest = key.strip_prefix("chunks/")?;
        let (dir, name) = rest.split_once('/')?;
        if dir.len() != 2 || !name.starts_with(dir) {
            return None;
        }
        name.parse().ok()
    }

    /// The object key of this chunk re-sealed by re-encryption: `chunks/ab/ab12....<seal>`,
    /// where `seal` is `<key id>.<job tag, 8 hex>` ([`resealed_suffix`]). A path of its own, so
    /// the re-sealed object is written beside the original, never over it, and each
    /// re-encryption job writes paths no earlier job wrote (see `crate::reencrypt`).
    pub fn resealed_chunk_key(&self, seal: &str) -> String {
        format!("{}.{seal}", self.chunk_key())
    }

    /// Parses `chunks/ab/<64 hex>.<key id>.<8 hex>` into the chunk id and the seal suffix;
    /// `None` for anything else (a backup's own `chunks/ab/<64 hex>` included).
    pub fn from_resealed_chunk_key(key: &str) -> Option<(Hash32, &str)> {
        let rest = key.strip_prefix("chunks/")?;
        let (dir, name) = rest.split_once('/')?;
        if dir.len() != 2 || name.len() < 66 || !name.is_char_boundary(64) {
            return None;
        }
        let (hex_id, tail) = name.split_at(64);
        let seal = tail.strip_prefix('.')?;
        let (key_id, tag) = seal.rsplit_once('.')?;
        let key_ok = !key_id.is_empty()
            && key_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let tag_ok = tag.len() == 8 && tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !key_ok || !tag_ok {
            return None;
        }
        let id: Hash32 = hex_id.parse().ok()?;
        (id.to_hex() == hex_id && hex_id.starts_with(dir)).then_some((id, seal))
    }

    /// The id garbage collection uses for a re-sealed chunk object: the chunk id's first byte (so
    /// it falls in the same `chunks/<xx>/` bucket), then 31 bytes of SHA3-256 over the seal
    /// suffix and the chunk id. It differs from every chunk id (but with negligible
    /// probability), so a re-sealed object and the original are judged separately.
    pub fn resealed_ref_id(&self, seal: &str) -> Hash32 {
        let mut h = Sha3_256::new();
        h.update(b"backstop/v1/resealed-chunk");
        h.update((seal.len() as u32).to_be_bytes());
        h.update(seal.as_bytes());
        h.update(self.0);
        let mut out: [u8; 32] = h.finalize().into();
        out[0] = self.0[0];
        Hash32(out)
    }
}

/// The suffix of a re-sealed chunk's path: `<key id>.<tag as 8 lowercase hex digits>`.
pub fn resealed_suffix(key_id: &str, tag: u32) -> String {
    format!("{key_id}.{tag:08x}")
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash32({})", self.to_hex())
    }
}

impl FromStr for Hash32 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| format!("not a 64-digit hex digest: {e}"))?;
        Ok(Hash32(out))
    }
}

impl Serialize for Hash32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `SHA3-256(key || data)`. CPU-bound (about 350 MB/s per core).
pub fn chunk_id(key: &[u8; 32], data: &[u8]) -> ChunkId {
    let mut h = Sha3_256::new();
    h.update(key);
    h.update(data);
    Hash32(h.finalize().into())
}

/// Splits an `AsyncRead` into content-defined chunks.
pub struct Chunker<R> {
    reader: R,
    /// `2 * max` bytes; the unchunked data is `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    /// Bytes returned so far.
    offset: u64,
}

impl<R: AsyncRead + Unpin> Chunker<R> {
    pub fn new(reader: R, params: &ChunkerParams) -> Self {
        let avg = params.avg_size as usize;
        let (mask_s, mask_l) = select_masks(avg, Normalization::Level1);
        Chunker {
            reader,
            buf: Vec::new(),
            start: 0,
            end: 0,
            eof: false,
            min: params.min_size as usize,
            avg,
            max: params.max_size as usize,
            mask_s,
            mask_l,
            offset: 0,
        }
    }

    /// Bytes returned in chunks so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next chunk, or `None` at the end of the stream.
    pub async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; 2 * self.max];
        }
        while !self.eof && self.end - self.start < self.max {
            if self.buf.len() - self.end < self.max - (self.end - self.start) {
                // Move the unchunked tail (< max bytes) to the front to make room.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = self.reader.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                self.eof = true;
            }
            self.end += n;
        }
        let pending = &self.buf[self.start..self.end];
        if pending.is_empty() {
            self.buf = Vec::new();
            return Ok(None);
        }
        let (_, mut n) = cut(
            pending,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        if n == 0 {
            n = pending.len().min(self.max);
        }
        let chunk = Bytes::copy_from_slice(&pending[..n]);
        self.start += n;
        self.offset += n as u64;
        Ok(Some(chunk))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ChunkerParams {
        ChunkerParams {
            min_size: 4 << 10,
            avg_size: 16 << 10,
            max_size: 64 << 10,
        }
    }

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    async fn chunks_of(d: &[u8], read_size: usize) -> Vec<Bytes> {
        // A reader that returns at most `read_size` bytes per read, as pipes do.
        let (mut w, r) = tokio::io::duplex(read_size);
        let owned = d.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            w.write_all(&owned).await.unwrap();
        });
        let mut c = Chunker::new(r, &params());
        let mut out = Vec::new();
        while let Some(ch) = c.next_chunk().await.unwrap() {
            out.push(ch);
        }
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn chunks_cover_the_stream_and_match_fastcdc() {
        let d = data(1_000_000, 42);
        let ours = chunks_of(&d, 7_001).await;
        let joined: Vec<u8> = ours.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(joined, d);
        // Same cut points as the crate's own in-memory chunker, whatever the read sizes.
        let p = params();
        let reference: Vec<usize> = fastcdc::v2020::FastCDC::new(
            &d,
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
        )
        .map(|c| c.length)
        .collect();
        let lens: Vec<usize> = ours.iter().map(|c| c.len()).collect();
        assert_eq!(lens, reference);
        let other = chunks_of(&d, 65_536).await;
        assert_eq!(other.iter().map(|c| c.len()).collect::<Vec<_>>(), lens);
        assert!(lens.iter().all(|&l| l <= p.max_size as usize));
    }

    #[tokio::test]
    async fn empty_stream_has_no_chunks() {
        assert!(chunks_of(&[], 10).await.is_empty());
    }

    #[test]
    fn ids_and_keys() {
        let k = [1u8; 32];
        let a = chunk_id(&k, b"abc");
        assert_ne!(a, chunk_id(&[2u8; 32], b"abc"));
        let key = a.chunk_key();
        assert!(key.starts_with(&format!("chunks/{}/", &a.to_hex()[..2])));
        assert_eq!(Hash32::from_chunk_key(&key), Some(a));
        assert_eq!(Hash32::from_chunk_key("chunks/zz/abc"), None);
        let seal = resealed_suffix("database-v2-0a1b2c3d", 0xfeed);
        assert_eq!(seal, "database-v2-0a1b2c3d.0000feed");
        let resealed = a.resealed_chunk_key(&seal);
        assert_eq!(
            Hash32::from_resealed_chunk_key(&resealed),
            Some((a, seal.as_str()))
        );
        assert_eq!(Hash32::from_resealed_chunk_key(&key), None);
        assert_eq!(Hash32::from_chunk_key(&resealed), None);
        assert_eq!(
            Hash32::from_resealed_chunk_key(&format!("{key}.x.0000feed")),
            Some((a, "x.0000feed"))
        );
        assert_eq!(
            Hash32::from_resealed_chunk_key(&format!("{key}.X.0000feed")),
            None
        );
        assert_eq!(
            Hash32::from_resealed_chunk_key(&format!("{key}.x.feed")),
            None
        );
        let r = a.resealed_ref_id(&seal);
        assert_eq!(r.0[0], a.0[0]);
        assert_ne!(r, a);
        assert_ne!(r, a.resealed_ref_id("database-v2-0a1b2c3d.0000beef"));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Hash32>(&json).unwrap(), a);
    }
}
