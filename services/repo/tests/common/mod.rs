//! Shared helpers for the repository's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use backstop_events::BackupKind;
use backstop_repo::{
    Backend, BackupMeta, BackupResult, ChunkerParams, KeyAccessLog, LocalBackend, Manifest,
    MasterKey, RepoParams, Repository,
};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

/// Deterministic test data: runs of pseudo-random bytes mixed with runs of repeated text, as a
/// database dump mixes incompressible and repetitive content.
pub fn test_data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let run = 1000 + (next() % 20_000) as usize;
        if next() % 2 == 0 {
            for _ in 0..run {
                out.push(next() as u8);
            }
        } else {
            let row = format!(
                "{}\t{}\tACME\tBUY\t{}.{:02}\n",
                next() % 1_000_000,
                next() % 86_400,
                next() % 1000,
                next() % 100
            );
            for b in row.bytes().cycle().take(run) {
                out.push(b);
            }
        }
    }
    out.truncate(len);
    out
}

/// Small chunks so that tests see many of them.
pub fn small_chunks() -> RepoParams {
    RepoParams {
        chunker: ChunkerParams {
            min_size: 16 << 10,
            avg_size: 64 << 10,
            max_size: 256 << 10,
        },
        ..Default::default()
    }
}

pub struct TestRepo {
    pub dir: tempfile::TempDir,
    pub backend: Arc<dyn Backend>,
    pub master: MasterKey,
    pub log: Arc<KeyAccessLog>,
    pub repo: Repository,
}

impl TestRepo {
    pub async fn new(params: RepoParams) -> TestRepo {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> =
            Arc::new(LocalBackend::new(dir.path().join("repo")).unwrap());
        let master = MasterKey::generate();
        let log = Arc::new(KeyAccessLog::new());
        let repo = Repository::init(backend.clone(), &master, params, log.clone())
            .await
            .unwrap();
        TestRepo {
            dir,
            backend,
            master,
            log,
            repo,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("repo")
    }
}

pub fn meta(kind: BackupKind) -> BackupMeta {
    let mut m = BackupMeta::new(Uuid::now_v7(), kind, "test-source");
    m.actor = "worker:test".into();
    m
}

/// One backup of named streams, added concurrently.
pub async fn backup(repo: &Repository, streams: &[(&str, &[u8])]) -> BackupResult {
    backup_meta(repo, meta(BackupKind::Full), streams).await
}

pub async fn backup_meta(
    repo: &Repository,
    meta: BackupMeta,
    streams: &[(&str, &[u8])],
) -> BackupResult {
    let w = repo.start_backup(meta).await.unwrap();
    let mut tasks = Vec::new();
    for (name, data) in streams {
        let w = w.clone();
        let name = name.to_string();
        let data = data.to_vec();
        tasks.push(tokio::spawn(async move {
            w.add_stream(&name, std::io::Cursor::new(data)).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    w.finish(serde_json::json!({"tables": [{"schema": "public", "table": "trades", "rows": 42}]}))
        .await
        .unwrap()
}

pub async fn read_stream(repo: &Repository, m: &Manifest, name: &str) -> std::io::Result<Vec<u8>> {
    let mut r = repo.open_stream(m, name).await.unwrap();
    let mut out = Vec::new();
    r.read_to_end(&mut out).await?;
    Ok(out)
}

/// Every file under `root` with its size and modification time.
pub fn snapshot(root: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), md.len(), md.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Paths of the chunk objects under a local repository.
pub fn chunk_files(root: &Path) -> Vec<PathBuf> {
    snapshot(&root.join("chunks"))
        .into_iter()
        .map(|(p, _, _)| p)
        .collect()
}
