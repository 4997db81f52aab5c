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
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Hash32>(&json).unwrap(), a);
    }
}
