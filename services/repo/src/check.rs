//! Repository consistency checks (`backstop check`, and the checksum tiers of verification).
//!
//! Tiers:
//! - structure (always): every manifest decodes and authenticates; every object it references
//!   is listed with the recorded sealed size; key objects parse;
//! - data (`read_data_percent`): every referenced chunk (100%) or a random sample is read, its
//!   SHA3-256 compared with the manifest, authenticated, decompressed and its chunk id
//!   recomputed.
//!
//! A check reports problems instead of stopping at the first one, each naming the object and
//! every backup that references it. Only a storage failure (unreachable store) aborts a check:
//! it cannot conclude anything then.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::chunk::Hash32;
use crate::error::{RepoError, Result};
use crate::manifest::{ChunkRef, Manifest};
use crate::reader::decode_chunk;
use crate::repository::{Repository, join_err};

#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Read and verify this share (0..=100) of the referenced chunks; `None` reads nothing.
    pub read_data_percent: Option<f64>,
    /// Objects read at once.
    pub concurrency: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            read_data_percent: None,
            concurrency: 8,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A manifest is missing, truncated, edited or undecryptable.
    Manifest,
    /// A referenced object is absent.
    Missing,
    /// A referenced object has another size than recorded.
    Size,
    /// A referenced object's SHA3-256 differs from the recorded one.
    Corrupt,
    /// An object fails authentication, decompression or its chunk-id check.
    Damaged,
    /// A key object cannot be read.
    Key,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The object concerned.
    pub key: String,
    /// Backups that reference it (or the backup whose manifest it is).
    pub backups: Vec<Uuid>,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backups: Vec<String> = self.backups.iter().map(|b| b.to_string()).collect();
        write!(
            f,
            "{:?}: {} (backups: {}): {}",
            self.kind,
            self.key,
            backups.join(", "),
            self.detail
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    pub manifests: u64,
    pub manifests_ok: u64,
    /// Distinct chunks referenced by readable manifests.
    pub chunks_referenced: u64,
    pub objects_read: u64,
    pub bytes_read: u64,
    /// Chunks no readable manifest references (left by killed backups; collectable).
    pub unreferenced_chunks: u64,
    pub unreferenced_bytes: u64,
    pub problems: Vec<Problem>,
    pub duration_ms: u64,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A chunk to check, with the key id that sealed it and the backups referencing it.
struct Target {
    cref: ChunkRef,
    /// Where the object is (a re-sealed chunk has a path of its own).
    path: String,
    key_id: String,
    backups: Vec<Uuid>,
}

fn add_refs(targets: &mut HashMap<String, Target>, m: &Manifest) {
    for c in m.streams.iter().flat_map(|s| s.chunks.iter()) {
        let path = m.chunk_path(c);
        let t = targets.entry(path.clone()).or_insert_with(|| Target {
            cref: *c,
            path,
            key_id: m.keys[c.key as usize].clone(),
            backups: Vec::new(),
        });
        if t.backups.last() != Some(&m.backup_id) {
            t.backups.push(m.backup_id);
        }
    }
}

fn problem_from(err: &RepoError, key: String, backups: Vec<Uuid>) -> Problem {
    let kind = match err {
        RepoError::NotFound { .. } => ProblemKind::Missing,
        RepoError::Corrupt { .. } => ProblemKind::Corrupt,
        _ => ProblemKind::Damaged,
    };
    Problem {
        kind,
        key,
        backups,
        detail: err.to_string(),
    }
}

impl Repository {
    /// Checks the whole repository; `read_data_percent` as in [`CheckOptions`].
    pub async fn check(&self, read_data_percent: Option<f64>) -> Result<CheckReport> {
        self.check_with(CheckOptions {
            read_data_percent,
            ..Default::default()
        })
        .await
    }

    pub async fn check_with(&self, opts: CheckOptions) -> Result<CheckReport> {
        let started = Instant::now();
        let mut report = CheckReport::default();
        for (key, detail) in self.damaged_keys() {
            report.problems.push(Problem {
                kind: ProblemKind::Key,
                key,
                backups: vec![],
                detail,
            });
        }
        let listed = self.list_backups().await?;
        report.manifests = listed.len() as u64;
        let mut targets: HashMap<String, Target> = HashMap::new();
        for b in &listed {
            match &b.manifest {
                Ok(m) => {
                    report.manifests_ok += 1;
                    add_refs(&mut targets, m);
                }
                Err(e) => report.problems.push(Problem {
                    kind: ProblemKind::Manifest,
                    key: b.manifest_key.clone(),
                    backups: vec![b.backup_id],
                    detail: e.to_string(),
                }),
            }
        }
        self.check_targets(targets, &opts, &mut report, true)
            .await?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Checks one backup's objects (presence and sizes; with `read_data_percent`, contents).
    pub async fn check_backup(
        &self,
        manifest: &Manifest,
        read_data_percent: Option<f64>,
    ) -> Result<CheckReport> {
        let started = Instant::now();
        let mut report = CheckReport {
            manifests: 1,
            manifests_ok: 1,
            ..Default::default()
        };
        let mut targets = HashMap::new();
        add_refs(&mut targets, manifest);
        let opts = CheckOptions {
            read_data_percent,
            ..Default::default()
        };
        self.check_targets(targets, &opts, &mut report, false)
            .await?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    async fn check_targets(
        &self,
        targets: HashMap<String, Target>,
        opts: &CheckOptions,
        report: &mut CheckReport,
        count_unreferenced: bool,
    ) -> Result<()> {
        report.chunks_referenced = targets.len() as u64;
        let present: HashMap<String, u64> = self
            .backend()
            .list("chunks/")
            .await?
            .into_iter()
            .filter(|o| {
                Hash32::from_chunk_key(&o.key).is_some()
                    || Hash32::from_resealed_chunk_key(&o.key).is_some()
            })
            .map(|o| (o.key, o.size))
            .collect();
        if count_unreferenced {
            for (path, size) in &present {
                if !targets.contains_key(path) {
                    report.unreferenced_chunks += 1;
                    report.unreferenced_bytes += size;
                }
            }
        }
        let mut readable = Vec::new();
        let mut ordered: Vec<Target> = targets.into_values().collect();
        ordered.sort_by(|a, b| a.path.cmp(&b.path));
        for t in ordered {
            let key = t.path.clone();
            match present.get(&t.path) {
                None => report.problems.push(Problem {
                    kind: ProblemKind::Missing,
                    key,
                    backups: t.backups,
                    detail: "the object is missing".into(),
                }),
                Some(&size) if size != t.cref.sealed_len as u64 => report.problems.push(Problem {
                    kind: ProblemKind::Size,
                    key,
                    backups: t.backups,
                    detail: format!(
                        "the object is {size} bytes, the manifest records {}",
                        t.cref.sealed_len
                    ),
                }),
                Some(_) => readable.push(t),
            }
        }

        let Some(percent) = opts.read_data_percent else {
            return Ok(());
        };
        let percent = percent.clamp(0.0, 100.0);
        if percent <= 0.0 || readable.is_empty() {
            return Ok(());
        }
        let mut sample: Vec<Target> = if percent >= 100.0 {
            readable
        } else {
            let mut rng = rand::thread_rng();
            let p = percent / 100.0;
            let mut chosen = Vec::new();
            let mut rest = Vec::new();
            for t in readable {
                if rng.gen_bool(p) {
                    chosen.push(t);
                } else {
                    rest.push(t);
                }
            }
            if chosen.is_empty() {
                // A sample of a small repository still reads something.
                let i = rng.gen_range(0..rest.len());
                chosen.push(rest.swap_remove(i));
            }
            chosen
        };
        sample.sort_by_key(|t| t.cref.id);

        // Keys first (each unwrapped once for this check, and reported).
        let mut keys = HashMap::new();
        for t in &sample {
            if !keys.contains_key(&t.key_id) {
                match self.key_by_id(&t.key_id).await {
                    Ok(k) => {
                        keys.insert(t.key_id.clone(), Some(k));
                    }
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) => {
                        report.problems.push(Problem {
                            kind: ProblemKind::Key,
                            key: format!("keys/*/{}", t.key_id),
                            backups: vec![],
                            detail: e.to_string(),
                        });
                        keys.insert(t.key_id.clone(), None);
                    }
                }
            }
        }
        let repo_id = self.id();
        let cid_key = Arc::new(*self.inner.chunk_id_key);
        let results: Vec<(Target, Result<u64>)> = futures::stream::iter(sample)
            .map(|t| {
                let key = keys.get(&t.key_id).cloned().flatten();
                let backend = self.backend().clone();
                let cid_key = cid_key.clone();
                async move {
                    let Some(key) = key else {
                        return (t, Ok(0));
                    };
                    let obj = match backend.get(&t.path).await {
                        Ok(o) => o,
                        Err(e) => return (t, Err(e)),
                    };
                    let cref = t.cref;
                    let path = t.path.clone();
                    let res = tokio::task::spawn_blocking(move || {
                        let n = obj.len() as u64;
                        decode_chunk(&repo_id, &cid_key, &key, &cref, &path, &obj, true).map(|_| n)
                    })
                    .await
                    .map_err(join_err)
                    .and_then(|r| r);
                    (t, res)
                }
            })
            .buffer_unordered(opts.concurrency.max(1))
            .collect()
            .await;
        for (t, res) in results {
            match res {
                Ok(n) => {
                    if n > 0 {
                        report.objects_read += 1;
                        report.bytes_read += n;
                    }
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    report.objects_read += 1;
                    report
                        .problems
                        .push(problem_from(&e, t.path.clone(), t.backups))
                }
            }
        }
        Ok(())
    }
}
