//! Golden vectors of the repository format (`tests/vectors/README.md`): a complete one-backup
//! repository under `tests/vectors/repository/`, made from a fixed master key, repository id,
//! chunk-id key, data key and times, so that every object is the same on every run (AES-SIV is
//! deterministic, and so is brotli at a fixed quality and window):
//!
//! - `config`: the repository config, with its key check and MAC;
//! - `keys/database/database-v1-00c0ffee`: the data key wrapped by the master key;
//! - `chunks/xx/<id>`: one sealed chunk (kind 1, brotli), addressed by its keyed chunk id;
//! - `manifests/<backup id>`: the sealed manifest (kind 2, brotli) that references it.
//!
//! Each object is compared byte for byte with the file (`BACKSTOP_WRITE_VECTORS=1` rewrites them
//! instead). Then the files are opened as a repository with the master key from
//! `master-key.hex`, exactly as `backstop` opens a bucket: config MAC and key check, key unwrap,
//! manifest, restore of the stream, and a full read-data check.

#[path = "../../../tests/vectors/support.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;

use backstop_events::BackupKind;
use backstop_repo::chunk::chunk_id;
use backstop_repo::config::{ChunkerParams, CompressionParams, RepoConfig, RepoParams};
use backstop_repo::keys::data_key_object;
use backstop_repo::seal::{self, Brotli, ObjectKind};
use backstop_repo::{
    ChunkRef, DataKey, Hash32, KeyAccessLog, KeyInfo, KeyPurpose, LocalBackend, Manifest,
    MasterKey, RepoError, Repository, StreamManifest, Totals, manifest_key,
};
use chrono::{DateTime, Utc};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

use support::{golden, hex};

const REPOSITORY_ID: &str = "01941f29-7c00-7000-8000-00000000a001";
const BACKUP_ID: &str = "01941f29-7c00-7000-8000-00000000b001";
const KEY_ID: &str = "database-v1-00c0ffee";
const STREAM: &str = "public.trades";

// Test keys, public by design: they protect nothing but these vectors.
fn master_bytes() -> [u8; 64] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(3))
}
fn chunk_id_key() -> [u8; 32] {
    std::array::from_fn(|i| 0x40 + i as u8)
}
fn data_key_bytes() -> [u8; 64] {
    std::array::from_fn(|i| 0x80 + i as u8)
}

fn time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("a fixed time")
        .with_timezone(&Utc)
}

fn repository_id() -> Uuid {
    REPOSITORY_ID.parse().expect("a fixed uuid")
}
fn backup_id() -> Uuid {
    BACKUP_ID.parse().expect("a fixed uuid")
}

/// Explicit, not `RepoParams::default()`: a changed default must not move the vectors.
fn params() -> RepoParams {
    RepoParams {
        chunker: ChunkerParams {
            min_size: 256 << 10,
            avg_size: 1 << 20,
            max_size: 4 << 20,
        },
        compression: CompressionParams {
            quality: 2,
            lgwin: 22,
        },
    }
}

fn brotli() -> Brotli {
    Brotli {
        quality: 2,
        lgwin: 22,
    }
}

fn key_info() -> KeyInfo {
    KeyInfo {
        purpose: KeyPurpose::Database,
        key_id: KEY_ID.into(),
        version: 1,
        created_at: time("2026-01-02T03:04:05.222222Z"),
    }
}

/// Rows of a COPY stream, compressible as table data is.
fn plaintext() -> Vec<u8> {
    (0..200u32)
        .map(|i| {
            format!(
                "{i}\tACME\t{}.{:02}\t{}\t2026-01-02 03:04:{:02}+00\n",
                100 + i % 17,
                (i * 37) % 100,
                (i * 13) % 500,
                i % 60
            )
        })
        .collect::<String>()
        .into_bytes()
}

struct Golden {
    config: RepoConfig,
    config_bytes: Vec<u8>,
    key_object: Vec<u8>,
    chunk_path: String,
    chunk: Vec<u8>,
    manifest: Manifest,
    sealed_manifest: Vec<u8>,
}

fn build() -> Golden {
    let master = MasterKey::from_bytes(master_bytes());
    let repo_id = repository_id();
    let config = RepoConfig::from_parts(
        &master,
        &params(),
        repo_id,
        time("2026-01-02T03:04:05.111111Z"),
        &chunk_id_key(),
    )
    .expect("the fixed config is valid");
    let config_bytes = config.to_bytes().expect("the config encodes");
    let key_object = data_key_object(&master, repo_id, key_info(), &data_key_bytes())
        .expect("the key object encodes");
    let key = DataKey::from_secret(key_info(), data_key_bytes());

    let plain = plaintext();
    let id = chunk_id(&chunk_id_key(), &plain);
    let chunk_path = id.chunk_key();
    let chunk = seal::seal_object(
        &repo_id,
        &chunk_path,
        &key,
        ObjectKind::Chunk,
        Some(brotli()),
        &plain,
    );
    let manifest = Manifest {
        format: "backstop-manifest".into(),
        format_version: 1,
        repository_id: repo_id,
        backup_id: backup_id(),
        kind: BackupKind::Full,
        parent: None,
        source: "main".into(),
        purpose: KeyPurpose::Database,
        started_at: time("2026-01-02T03:04:06Z"),
        finished_at: time("2026-01-02T03:04:06.5Z"),
        keys: vec![KEY_ID.into()],
        totals: Totals {
            raw_bytes: plain.len() as u64,
            stored_bytes: chunk.len() as u64,
            new_bytes: chunk.len() as u64,
            chunks: 1,
            new_chunks: 1,
        },
        streams: vec![
            StreamManifest {
                name: STREAM.into(),
                raw_bytes: plain.len() as u64,
                chunks: vec![ChunkRef {
                    id,
                    len: plain.len() as u32,
                    sealed_len: chunk.len() as u32,
                    sealed_sha3: Hash32(seal::sha3(&chunk)),
                    key: 0,
                    resealed: None,
                }],
            },
            StreamManifest {
                name: "empty.dat".into(),
                raw_bytes: 0,
                chunks: vec![],
            },
        ],
        extra: serde_json::json!({
            "server_version": "15.8",
            "tables": [{"schema": "public", "table": "trades", "rows": 200}],
        }),
        revisions: Vec::new(),
    };
    // As the backup writer encodes it: compact JSON, sealed as kind 2 with the database key.
    let json = serde_json::to_vec(&manifest).expect("the manifest encodes");
    let sealed_manifest = seal::seal_object(
        &repo_id,
        &manifest_key(&backup_id()),
        &key,
        ObjectKind::Manifest,
        Some(brotli()),
        &json,
    );
    Golden {
        config,
        config_bytes,
        key_object,
        chunk_path,
        chunk,
        manifest,
        sealed_manifest,
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a directory");
    for entry in std::fs::read_dir(from).expect("read the vectors") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a vector");
        }
    }
}

async fn open(
    dir: &Path,
    master: &MasterKey,
) -> (Result<Repository, RepoError>, Arc<KeyAccessLog>) {
    let log = Arc::new(KeyAccessLog::new());
    let backend = LocalBackend::new(dir).expect("a local backend");
    let repo = Repository::open(Arc::new(backend), master, log.clone()).await;
    (repo, log)
}

#[tokio::test]
async fn repository_config_data_key_sealed_chunk_and_manifest() {
    let g = build();
    let master_file = golden(
        "master-key.hex",
        format!("{}\n", hex(&master_bytes())).as_bytes(),
    );
    let config = golden("repository/config", &g.config_bytes);
    let key_object = golden(&format!("repository/keys/database/{KEY_ID}"), &g.key_object);
    let chunk = golden(&format!("repository/{}", g.chunk_path), &g.chunk);
    let sealed_manifest = golden(
        &format!("repository/{}", manifest_key(&backup_id())),
        &g.sealed_manifest,
    );

    // Open the files on disk as a repository, with the key file as an operator would give it.
    let master = MasterKey::from_encoded(std::str::from_utf8(&master_file).expect("UTF-8"))
        .expect("master-key.hex is a master key");
    let dir = tempfile::tempdir().expect("a temporary directory");
    copy_dir(&support::vectors_dir().join("repository"), dir.path());
    let (repo, log) = open(dir.path(), &master).await;
    let repo = repo.expect("the golden repository opens: key check and config MAC hold");
    assert_eq!(repo.id(), repository_id());
    assert_eq!(
        repo.config(),
        &g.config,
        "the config reads back as it was made"
    );
    assert_eq!(repo.keys(), vec![key_info()], "the key object is read");
    assert!(repo.damaged_keys().is_empty());

    // The wrapped data key unwraps with the master key, and the unwrap is reported.
    let key = repo
        .data_key(KeyPurpose::Database, "golden vectors", "operator:test")
        .await
        .expect("the data key unwraps");
    assert_eq!(key.info(), &key_info());
    let accesses = log.take();
    assert_eq!(accesses.len(), 1);
    assert_eq!(
        (accesses[0].key_id.as_str(), accesses[0].actor.as_str()),
        (KEY_ID, "operator:test")
    );

    // The sealed chunk opens with that key, to the plaintext its id is the keyed hash of.
    let (header, plain) = seal::open_object(&repo.id(), &g.chunk_path, &key, &chunk, None)
        .expect("the sealed chunk opens");
    assert_eq!(plain, plaintext());
    assert!(header.compressed, "the chunk vector covers brotli");
    assert_eq!(
        (header.kind, header.key_id.as_str()),
        (ObjectKind::Chunk, KEY_ID)
    );
    assert_eq!(chunk_id(&chunk_id_key(), &plain).chunk_key(), g.chunk_path);
    assert_eq!(&chunk[..3], b"BKS");

    // The sealed manifest opens through the reader, and its stream restores.
    let manifest_path = manifest_key(&backup_id());
    let (header, json) =
        seal::open_object(&repo.id(), &manifest_path, &key, &sealed_manifest, None)
            .expect("the sealed manifest opens");
    assert_eq!(header.kind, ObjectKind::Manifest);
    let decoded: Manifest = serde_json::from_slice(&json).expect("the manifest is JSON");
    assert_eq!(decoded, g.manifest);
    let manifest = repo
        .load_manifest(backup_id())
        .await
        .expect("the reader loads the manifest");
    assert_eq!(manifest, g.manifest);
    let mut restored = Vec::new();
    repo.open_stream(&manifest, STREAM)
        .await
        .expect("the stream opens")
        .read_to_end(&mut restored)
        .await
        .expect("the stream restores");
    assert_eq!(restored, plaintext());
    let report = repo.check(Some(100.0)).await.expect("the check runs");
    assert!(
        report.is_ok(),
        "check --read-data finds nothing wrong: {report:?}"
    );

    // What the key must and must not open.
    let other = MasterKey::from_bytes([0x55; 64]);
    assert!(matches!(
        open(dir.path(), &other).await.0,
        Err(RepoError::WrongKey { .. })
    ));
    for at in 0..chunk.len() {
        let mut bad = chunk.clone();
        bad[at] ^= 0x01;
        assert!(
            seal::open_object(&repo.id(), &g.chunk_path, &key, &bad, None).is_err(),
            "a flipped bit at byte {at} of the sealed chunk is detected"
        );
    }
    let elsewhere = format!("{}x", &g.chunk_path[..g.chunk_path.len() - 1]);
    assert!(seal::open_object(&repo.id(), &elsewhere, &key, &chunk, None).is_err());

    // An edited config fails its MAC; an edited key object fails to unwrap.
    let text = String::from_utf8(config).expect("UTF-8");
    let edited = text.replace("\"quality\": 2", "\"quality\": 5");
    assert_ne!(edited, text);
    std::fs::write(dir.path().join("config"), &edited).expect("write the edited config");
    assert!(matches!(
        open(dir.path(), &master).await.0,
        Err(RepoError::Damaged { .. })
    ));
    std::fs::write(dir.path().join("config"), &text).expect("restore the config");
    let key_text = String::from_utf8(key_object).expect("UTF-8");
    let key_path = dir.path().join(format!("keys/database/{KEY_ID}"));
    let relabelled = key_text.replace("\"version\": 1", "\"version\": 2");
    assert_ne!(relabelled, key_text);
    std::fs::write(&key_path, &relabelled).expect("write the edited key");
    let repo = open(dir.path(), &master)
        .await
        .0
        .expect("the config still opens");
    assert!(
        repo.data_key(KeyPurpose::Database, "golden vectors", "operator:test")
            .await
            .is_err(),
        "a key object whose version was changed does not unwrap"
    );
}
