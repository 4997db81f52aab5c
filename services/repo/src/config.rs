//! The repository config: the object `config` at the repository root, which makes the bucket
//! describe itself.
//!
//! # Format (format version 1)
//! A JSON document, readable without the master key so that an operator can see what a bucket
//! holds:
//!
//! ```json
//! {
//!   "format": "backstop-repository",
//!   "format_version": 1,
//!   "repository_id": "0193...",
//!   "created_at": "2026-11-22T06:31:00.123456Z",
//!   "chunker": {"algorithm": "fastcdc-v2020", "normalization": 1,
//!               "min_size": 262144, "avg_size": 1048576, "max_size": 4194304},
//!   "compression": {"algorithm": "brotli", "quality": 1, "lgwin": 22},
//!   "chunk_id": {"algorithm": "sha3-256(key || plaintext)", "wrapped_key": "<base64>"},
//!   "seal": {"algorithm": "aes-256-siv", "envelope_version": 1},
//!   "key_check": "<base64, 16 bytes>",
//!   "mac": "<base64, 16 bytes>"
//! }
//! ```
//!
//! - `key_check` = S2V tag of AES-256-SIV(wrap key, AD = ["backstop/v1/key-check",
//!   repository id], empty plaintext). `open` verifies it first: a wrong master key is reported
//!   as such, before anything is read further or written.
//! - `mac` = the same construction over AD = ["backstop/v1/config", canonical JSON of the
//!   document without `mac`] (canonical: object keys sorted by byte order, no whitespace,
//!   serde_json's escaping and number forms: `backstop_events::canonical::json_bytes`, the one
//!   canonical JSON of the workspace, shared with the ledger). Changing any field, including the
//!   chunker parameters, is detected at open.
//! - `chunk_id.wrapped_key` = AES-256-SIV(wrap key, AD = ["backstop/v1/chunk-id-key",
//!   repository id], 32 random bytes): the key of the keyed chunk-id hash.
//!
//! Invariants: chunker sizes are powers of two with min < avg < max inside fastcdc's limits;
//! brotli quality 0..=11 and lgwin 10..=24. A repository never changes its chunker parameters
//! (deduplication depends on them); compression settings only affect new objects, since every
//! sealed object records whether it is compressed.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::{RepoError, Result};
use crate::seal::{siv_mac, siv_mac_ok, siv_unwrap, siv_wrap};

pub const CONFIG_KEY: &str = "config";
pub const FORMAT_NAME: &str = "backstop-repository";
pub const FORMAT_VERSION: u32 = 1;

/// Content-defined chunking sizes, in bytes (powers of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min_size: 256 << 10,
            avg_size: 1 << 20,
            max_size: 4 << 20,
        }
    }
}

impl ChunkerParams {
    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let (min, avg, max) = (
            self.min_size as usize,
            self.avg_size as usize,
            self.max_size as usize,
        );
        let ok = [min, avg, max].iter().all(|v| v.is_power_of_two())
            && min < avg
            && avg < max
            && (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max);
        if ok {
            Ok(())
        } else {
            Err(RepoError::Config(format!(
                "chunk sizes {min}/{avg}/{max}: they must be powers of two with min < avg < max, \
                 min in {MINIMUM_MIN}..={MINIMUM_MAX}, avg in {AVERAGE_MIN}..={AVERAGE_MAX}, \
                 max in {MAXIMUM_MIN}..={MAXIMUM_MAX}"
            )))
        }
    }
}

/// Brotli settings for new objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressionParams {
    pub quality: u32,
    pub lgwin: u32,
}

impl Default for CompressionParams {
    fn default() -> Self {
        CompressionParams {
            quality: 2,
            lgwin: 22,
        }
    }
}

impl CompressionParams {
    pub fn validate(&self) -> Result<()> {
        if self.quality > 11 || !(10..=24).contains(&self.lgwin) {
            return Err(RepoError::Config(format!(
                "brotli quality {} / lgwin {}: quality must be 0..=11 and lgwin 10..=24",
                self.quality, self.lgwin
            )));
        }
        Ok(())
    }
}

/// What `init` is given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepoParams {
    pub chunker: ChunkerParams,
    pub compression: CompressionParams,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerConfig {
    pub algorithm: String,
    pub normalization: u32,
    #[serde(flatten)]
    pub sizes: ChunkerParams,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressionConfig {
    pub algorithm: String,
    #[serde(flatten)]
    pub params: CompressionParams,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkIdConfig {
    pub algorithm: String,
    pub wrapped_key: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealConfig {
    pub algorithm: String,
    pub envelope_version: u32,
}

/// The decoded `config` object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    pub format: String,
    pub format_version: u32,
    pub repository_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub chunker: ChunkerConfig,
    pub compression: CompressionConfig,
    pub chunk_id: ChunkIdConfig,
    pub seal: SealConfig,
    pub key_check: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
}

fn mac_input(doc: &Value) -> Vec<u8> {
    let mut without = doc.clone();
    if let Value::Object(m) = &mut without {
        m.remove("mac");
    }
    backstop_events::canonical::json_bytes(&without)
}

fn key_check(wrap_key: &[u8; 64], repository_id: &Uuid) -> [u8; 16] {
    siv_mac(
        wrap_key,
        &[b"backstop/v1/key-check", repository_id.as_bytes()],
    )
}

fn chunk_id_key_ad(repository_id: &Uuid) -> [&[u8]; 2] {
    [b"backstop/v1/chunk-id-key", repository_id.as_bytes()]
}

impl RepoConfig {
    /// A new config with a fresh repository id and chunk-id key, MACed with `wrap_key`.
    pub(crate) fn create(wrap_key: &[u8; 64], params: &RepoParams) -> Result<RepoConfig> {
        let mut chunk_id_key = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, chunk_id_key.as_mut());
        RepoConfig::build(
            wrap_key,
            params,
            Uuid::now_v7(),
            crate::now(),
            &chunk_id_key,
        )
    }

    /// A config from given parts instead of fresh randomness and the clock, MACed with the wrap
    /// key of `master`: for golden test vectors (`tests/vectors/`), which need the same bytes on
    /// every run. Repositories are created by `Repository::init`.
    #[doc(hidden)]
    pub fn from_parts(
        master: &crate::keys::MasterKey,
        params: &RepoParams,
        repository_id: Uuid,
        created_at: DateTime<Utc>,
        chunk_id_key: &[u8; 32],
    ) -> Result<RepoConfig> {
        RepoConfig::build(
            &master.wrap_key(),
            params,
            repository_id,
            created_at,
            chunk_id_key,
        )
    }

    fn build(
        wrap_key: &[u8; 64],
        params: &RepoParams,
        repository_id: Uuid,
        created_at: DateTime<Utc>,
        chunk_id_key: &[u8; 32],
    ) -> Result<RepoConfig> {
        params.chunker.validate()?;
        params.compression.validate()?;
        let wrapped = siv_wrap(wrap_key, &chunk_id_key_ad(&repository_id), chunk_id_key);
        let mut cfg = RepoConfig {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            repository_id,
            created_at,
            chunker: ChunkerConfig {
                algorithm: "fastcdc-v2020".into(),
                normalization: 1,
                sizes: params.chunker,
            },
            compression: CompressionConfig {
                algorithm: "brotli".into(),
                params: params.compression,
            },
            chunk_id: ChunkIdConfig {
                algorithm: "sha3-256(key || plaintext)".into(),
                wrapped_key: STANDARD.encode(wrapped),
            },
            seal: SealConfig {
                algorithm: "aes-256-siv".into(),
                envelope_version: crate::seal::ENVELOPE_VERSION as u32,
            },
            key_check: STANDARD.encode(key_check(wrap_key, &repository_id)),
            mac: String::new(),
        };
        let doc = serde_json::to_value(&cfg)
            .map_err(|e| RepoError::format(CONFIG_KEY, format!("cannot encode: {e}")))?;
        cfg.mac = STANDARD.encode(siv_mac(
            wrap_key,
            &[b"backstop/v1/config", &mac_input(&doc)],
        ));
        Ok(cfg)
    }

    /// The bytes stored in the `config` object (pretty JSON, for humans).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut v = serde_json::to_vec_pretty(self)
            .map_err(|e| RepoError::format(CONFIG_KEY, format!("cannot encode: {e}")))?;
        v.push(b'\n');
        Ok(v)
    }

    /// Parses and authenticates a stored config: format, then key check (wrong master key),
    /// then MAC (tampering), then the parameters. Returns the config and the chunk-id key.
    pub(crate) fn open(
        bytes: &[u8],
        wrap_key: &[u8; 64],
    ) -> Result<(RepoConfig, Zeroizing<[u8; 32]>)> {
        let fmt_err = |d: String| RepoError::format(CONFIG_KEY, d);
        let doc: Value = serde_json::from_slice(bytes).map_err(|e| {
            fmt_err(format!(
                "not JSON ({e}): this location does not hold a Backstop repository config"
            ))
        })?;
        if doc.get("format").and_then(Value::as_str) != Some(FORMAT_NAME) {
            return Err(fmt_err(format!(
                "the \"format\" field is not {FORMAT_NAME:?}: this is not a Backstop repository"
            )));
        }
        let version = doc
            .get("format_version")
            .and_then(Value::as_u64)
            .ok_or_else(|| fmt_err("no format_version".into()))?;
        if version != FORMAT_VERSION as u64 {
            return Err(fmt_err(format!(
                "format version {version}; this build reads version {FORMAT_VERSION}: use a matching backstop release"
            )));
        }
        let repository_id: Uuid = doc
            .get("repository_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| fmt_err("no valid repository_id".into()))?;
        let check = doc
            .get("key_check")
            .and_then(Value::as_str)
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or_else(|| fmt_err("no valid key_check".into()))?;
        if !siv_mac_ok(
            wrap_key,
            &[b"backstop/v1/key-check", repository_id.as_bytes()],
            &check,
        ) {
            return Err(RepoError::WrongKey {
                detail: format!(
                    "the key check of repository {repository_id} failed (or its config was edited)"
                ),
            });
        }
        let mac = doc
            .get("mac")
            .and_then(Value::as_str)
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or_else(|| fmt_err("no valid mac".into()))?;
        if !siv_mac_ok(wrap_key, &[b"backstop/v1/config", &mac_input(&doc)], &mac) {
            return Err(RepoError::damaged(
                CONFIG_KEY,
                "the config was modified: its MAC does not match (restore it from a copy of the bucket)",
            ));
        }
        let cfg: RepoConfig =
            serde_json::from_value(doc).map_err(|e| fmt_err(format!("invalid field: {e}")))?;
        cfg.chunker.sizes.validate()?;
        cfg.compression.params.validate()?;
        if cfg.chunker.algorithm != "fastcdc-v2020" || cfg.chunker.normalization != 1 {
            return Err(fmt_err(format!(
                "unsupported chunker {} (normalization {})",
                cfg.chunker.algorithm, cfg.chunker.normalization
            )));
        }
        let wrapped = STANDARD
            .decode(&cfg.chunk_id.wrapped_key)
            .map_err(|_| fmt_err("chunk_id.wrapped_key is not base64".into()))?;
        let plain = siv_unwrap(wrap_key, &chunk_id_key_ad(&repository_id), &wrapped)
            .map(Zeroizing::new)
            .filter(|p| p.len() == 32)
            .ok_or_else(|| RepoError::damaged(CONFIG_KEY, "the chunk-id key does not unwrap"))?;
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&plain);
        Ok((cfg, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;

    #[test]
    fn config_round_trip_and_tamper() {
        let mk = MasterKey::generate();
        let wk = mk.wrap_key();
        let cfg = RepoConfig::create(&wk, &RepoParams::default()).unwrap();
        let bytes = cfg.to_bytes().unwrap();
        let (back, _k) = RepoConfig::open(&bytes, &wk).unwrap();
        assert_eq!(back, cfg);

        let other = MasterKey::generate().wrap_key();
        assert!(matches!(
            RepoConfig::open(&bytes, &other),
            Err(RepoError::WrongKey { .. })
        ));

        let text = String::from_utf8(bytes.clone()).unwrap();
        let quality = RepoParams::default().compression.quality;
        let edited = text.replace(
            &format!("\"quality\": {quality}"),
            &format!("\"quality\": {}", quality + 3),
        );
        assert_ne!(edited, text);
        assert!(matches!(
            RepoConfig::open(edited.as_bytes(), &wk),
            Err(RepoError::Damaged { .. })
        ));
        assert!(matches!(
            RepoConfig::open(b"{\"x\":1}", &wk),
            Err(RepoError::Format { .. })
        ));
        assert!(matches!(
            RepoConfig::open(&bytes[..bytes.len() / 2], &wk),
            Err(RepoError::Format { .. })
        ));
    }

    #[test]
    fn params_are_validated() {
        assert!(ChunkerParams::default().validate().is_ok());
        let bad = ChunkerParams {
            min_size: 300_000,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = ChunkerParams {
            min_size: 1 << 20,
            avg_size: 1 << 20,
            max_size: 4 << 20,
        };
        assert!(bad.validate().is_err());
        assert!(
            CompressionParams {
                quality: 12,
                lgwin: 22
            }
            .validate()
            .is_err()
        );
    }
}
