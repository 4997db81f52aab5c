//! Replicas: copies of the repository in another place (another S3 endpoint, region and bucket,
//! or a directory), object for object.
//!
//! A replica holds the same objects under the same keys as the primary: `config`, `keys/`,
//! manifests and chunks are copied as they are sealed (no re-encryption), so the replica opens
//! with the same master key as a repository of its own, and a restore can be served from it.
//!
//! # Invariants
//! - [`replicate_backup`] copies what one backup needs in this order: `config`, `keys/`, the
//!   chunks, and the manifest last. A replica therefore never holds a manifest whose chunks it
//!   lacks: a copy cut short (`kill -9`, the store unreachable) leaves at most unreferenced
//!   chunks, and the next run copies the rest.
//! - Every object copied is read back from the replica and its SHA3-256 compared with the
//!   primary's (R14.2); a chunk's is also compared with the one its manifest records, so a chunk
//!   damaged on the primary is never copied as good.
//! - Objects the replica already has with the right size are not copied again (chunks are
//!   content-addressed and never rewritten); [`compare`] (`backstop check --replica`) reads
//!   both sides in full.
//! - Events: `replication.started`, then `replication.completed` or `replication.failed`, on the
//!   backup's stream, with ids derived from the backup, the replica's name and the label: a
//!   redelivered `backup.completed` appends nothing twice. `from_region` is `primary`,
//!   `to_region` the replica's name.
//! - Lag ([`measure_lag`]) is the age of the oldest backup the primary holds (a manifest) that
//!   the replica does not: 0 when the replica is up to date.
//! - WAL: `wal-push` writes each file to every replica as it is archived
//!   (`crate::wal_replicas`); a replica that was unreachable then lacks some, and
//!   [`replicate_wal`] copies the WAL files it lacks (with `config` and `keys/`, so the replica
//!   opens on its own), each authenticated on the primary (opened with its key, and its stored
//!   SHA3-256 checked) before it is copied, then read back and compared like every copy.
//!   [`compare`] includes every WAL file.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use backstop_events::{
    Actor, Envelope, Event, ReplicationCompleted, ReplicationFailed, ReplicationLagMeasured,
    ReplicationStarted, streams, uuid_v7_derived,
};
use backstop_ledger::{Appender, LedgerError};
use backstop_repo::{Backend, Hash32, RepoError, Repository, manifest_key, seal};
use backstop_sources::pg::wal::decode_stored;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use tracing::{info, warn};
use uuid::Uuid;

use crate::record::{record, uuid_time};
use crate::wal::{WAL_PREFIX, parse_wal_object_key};

/// Objects copied or compared at a time.
const CONCURRENCY: usize = 8;

/// The name of the primary in `from_region`.
pub const PRIMARY: &str = "primary";

/// A configured replica, opened.
#[derive(Clone)]
pub struct Replica {
    pub name: String,
    pub backend: Arc<dyn Backend>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error("storage: {0}")]
    Repo(#[from] RepoError),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    /// The object read back from the replica is not what was written.
    #[error(
        "{key}: the copy on replica {replica} has SHA3-256 {actual}, the primary's is {expected}"
    )]
    Mismatch {
        replica: String,
        key: String,
        expected: String,
        actual: String,
    },
    /// A WAL file on the primary does not open or fails its recorded checksum: not copied.
    #[error(
        "{key}: the primary's copy is damaged ({why}): run `backstop wal verify` on the primary"
    )]
    PrimaryWalDamaged { key: String, why: String },
    /// The primary's own copy does not match its manifest: it is not copied (nor healed from).
    #[error(
        "{key}: the primary's copy has SHA3-256 {actual}, its manifest records {expected}: run `backstop check --read-data` on the primary"
    )]
    PrimaryDamaged {
        key: String,
        expected: String,
        actual: String,
    },
}

impl ReplicateError {
    /// True when a later attempt may succeed (a store or the ledger unreachable).
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicateError::Repo(e) => e.is_transient(),
            ReplicateError::Ledger(e) => e.is_transient(),
            ReplicateError::Mismatch { .. }
            | ReplicateError::PrimaryDamaged { .. }
            | ReplicateError::PrimaryWalDamaged { .. } => false,
        }
    }
}

/// One object a backup needs, and the SHA3-256 of its sealed bytes when a manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Needed {
    pub key: String,
    pub expected: Option<Hash32>,
}

/// What a copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    /// Objects considered.
    pub objects: u64,
    /// The sealed bytes of those objects (what the replica holds for them once complete).
    pub total_bytes: u64,
    /// Objects copied this time (and read back intact), and their bytes.
    pub copied: u64,
    pub bytes: u64,
    /// Of those, objects that were there with the right size but another SHA3-256, rewritten
    /// (only when present objects are verified: [`copy_objects`]).
    #[serde(skip_serializing_if = "is_zero")]
    pub repaired: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An object as the destination holds it once it was read back: its size and SHA3-256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub key: String,
    pub size: u64,
    pub sha3: Hash32,
}

/// The objects backup `backup_id` needs, in copy order: `config`, `keys/`, its chunks, its
/// manifest last.
pub async fn needed_objects(
    primary: &Repository,
    backup_ids: &[Uuid],
) -> Result<Vec<Needed>, ReplicateError> {
    let mut out = vec![Needed {
        key: backstop_repo::config::CONFIG_KEY.to_string(),
        expected: None,
    }];
    for o in primary.backend().list("keys/").await? {
        out.push(Needed {
            key: o.key,
            expected: None,
        });
    }
    let mut chunks: HashMap<String, Hash32> = HashMap::new();
    let mut manifests = Vec::new();
    for id in backup_ids {
        let m = primary.load_manifest(*id).await?;
        for c in m.streams.iter().flat_map(|s| s.chunks.iter()) {
            chunks.insert(m.chunk_path(c), c.sealed_sha3);
        }
        manifests.push(Needed {
            key: manifest_key(id),
            expected: None,
        });
    }
    let mut chunks: Vec<Needed> = chunks
        .into_iter()
        .map(|(key, h)| Needed {
            key,
            expected: Some(h),
        })
        .collect();
    chunks.sort();
    out.extend(chunks);
    out.extend(manifests);
    Ok(out)
}

fn sha3(b: &[u8]) -> Hash32 {
    Hash32(seal::sha3(b))
}

/// The WAL files on the primary (every source), by object key.
pub async fn wal_objects(primary: &Repository) -> Result<Vec<Needed>, ReplicateError> {
    Ok(primary
        .backend()
        .list(WAL_PREFIX)
        .await?
        .into_iter()
        .filter(|o| parse_wal_object_key(&o.key).is_some())
        .map(|o| Needed {
            key: o.key,
            expected: None,
        })
        .collect())
}

/// Authenticates a WAL file's sealed bytes with the primary's keys and checks the SHA3-256
/// recorded in it when it was pushed (no manifest records a WAL file's sealed checksum).
async fn check_wal(primary: &Repository, key: &str, data: &Bytes) -> Result<(), ReplicateError> {
    let damaged = |why: String| ReplicateError::PrimaryWalDamaged {
        key: key.to_string(),
        why,
    };
    let Some((_, file)) = parse_wal_object_key(key) else {
        return Ok(());
    };
    let plain = match primary.open_sealed_blob(key, data.clone()).await {
        Ok(p) => p,
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => return Err(damaged(e.to_string())),
    };
    let stored = decode_stored(&file.name, plain).map_err(|e| damaged(e.to_string()))?;
    stored
        .verify(&file.name)
        .await
        .map_err(|e| damaged(e.to_string()))?;
    Ok(())
}

/// Reads `key` from the primary and checks it against what its manifest records.
async fn read_primary(primary: &dyn Backend, n: &Needed) -> Result<Bytes, ReplicateError> {
    let data = primary.get(&n.key).await?;
    if let Some(expected) = n.expected {
        let actual = sha3(&data);
        if actual != expected {
            return Err(ReplicateError::PrimaryDamaged {
                key: n.key.clone(),
                expected: expected.to_hex(),
                actual: actual.to_hex(),
            });
        }
    }
    Ok(data)
}

/// Writes `data` to the replica, reads it back and compares SHA3-256 on both sides; the hash.
async fn write_verified(
    replica: &Replica,
    key: &str,
    data: Bytes,
) -> Result<Hash32, ReplicateError> {
    let expected = sha3(&data);
    replica.backend.put(key, data).await?;
    let back = replica.backend.get(key).await?;
    let actual = sha3(&back);
    if actual != expected {
        return Err(ReplicateError::Mismatch {
            replica: replica.name.clone(),
            key: key.to_string(),
            expected: expected.to_hex(),
            actual: actual.to_hex(),
        });
    }
    Ok(expected)
}

/// What [`place`] did with one object.
struct Placed {
    held: Held,
    written: bool,
    repaired: bool,
}

/// Puts one object at the replica: copies it (`there` false), or reads the replica's copy and
/// compares it with the primary's SHA3-256 (the manifest's for a chunk, else the primary's
/// object read), rewriting it when it differs.
async fn place(
    src: &dyn Backend,
    replica: &Replica,
    n: Needed,
    there: bool,
) -> Result<Placed, ReplicateError> {
    let mut repaired = false;
    let data = if there {
        let back = replica.backend.get(&n.key).await?;
        let actual = sha3(&back);
        let (expected, from_primary) = match n.expected {
            Some(h) => (h, None),
            None => {
                let p = read_primary(src, &n).await?;
                (sha3(&p), Some(p))
            }
        };
        if actual == expected {
            return Ok(Placed {
                held: Held {
                    key: n.key,
                    size: back.len() as u64,
                    sha3: actual,
                },
                written: false,
                repaired: false,
            });
        }
        warn!(key = %n.key, replica = %replica.name, "the copy differs from the primary: rewritten");
        repaired = true;
        match from_primary {
            Some(p) => p,
            None => read_primary(src, &n).await?,
        }
    } else {
        read_primary(src, &n).await?
    };
    let size = data.len() as u64;
    let hash = write_verified(replica, &n.key, data).await?;
    Ok(Placed {
        held: Held {
            key: n.key,
            size,
            sha3: hash,
        },
        written: true,
        repaired,
    })
}

/// Copies the objects of `needed` the replica lacks (absent, or of another size), in order,
/// chunks a few at a time; the manifests (last) only once every chunk is there.
pub async fn copy_missing(
    primary: &Repository,
    replica: &Replica,
    needed: &[Needed],
) -> Result<CopyReport, ReplicateError> {
    Ok(copy_objects(primary, replica, needed, false).await?.0)
}

/// [`copy_missing`], and with `verify_present` every object the replica already has with the
/// right size is read back as well and compared with the primary's SHA3-256 (a chunk's with its
/// manifest's), one that differs being rewritten (`repaired`). Returns what the replica holds of
/// `needed` once done (with `verify_present`: every object, in key order; else those copied).
pub async fn copy_objects(
    primary: &Repository,
    replica: &Replica,
    needed: &[Needed],
    verify_present: bool,
) -> Result<(CopyReport, Vec<Held>), ReplicateError> {
    let present: HashMap<String, u64> = replica
        .backend
        .list("")
        .await?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    let primary_sizes: HashMap<String, u64> = primary
        .backend()
        .list("")
        .await?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    let mut report = CopyReport {
        objects: needed.len() as u64,
        total_bytes: needed
            .iter()
            .filter_map(|n| primary_sizes.get(&n.key))
            .sum(),
        ..Default::default()
    };
    // Owned values (the object and whether the replica has it with the right size): borrowed
    // ones in the futures make the caller's future not `Send` for every lifetime (the workers
    // need `Send`).
    let todo: Vec<(Needed, bool)> = needed
        .iter()
        .filter_map(|n| {
            let there =
                present.contains_key(&n.key) && present.get(&n.key) == primary_sizes.get(&n.key);
            (!there || verify_present).then(|| (n.clone(), there))
        })
        .collect();
    // Manifests after everything else (the order of `needed`), so copy in two waves.
    let (manifests, rest): (Vec<_>, Vec<_>) = todo
        .into_iter()
        .partition(|(n, _)| n.key.starts_with("manifests/"));
    let mut held = Vec::new();
    for wave in [rest, manifests] {
        let mut results = futures::stream::iter(wave)
            .map(|(n, there)| {
                let src = primary.backend().clone();
                let replica = replica.clone();
                async move { place(src.as_ref(), &replica, n, there).await }
            })
            .buffer_unordered(CONCURRENCY);
        while let Some(r) = results.next().await {
            let placed = r?;
            if placed.written {
                report.copied += 1;
                report.bytes += placed.held.size;
            }
            report.repaired += u64::from(placed.repaired);
            held.push(placed.held);
        }
    }
    held.sort_by(|a, b| a.key.cmp(&b.key));
    Ok((report, held))
}

/// Who records, and where the events go.
pub struct Recorder<'a> {
    pub appender: &'a dyn Appender,
    pub actor: Actor,
    pub cause: Option<&'a Envelope>,
}

/// Replicates one backup to `replica`, recording `replication.started` then `.completed` (or
/// `.failed`, with the reason, before the error is returned).
pub async fn replicate_backup(
    rec: &Recorder<'_>,
    primary: &Repository,
    replica: &Replica,
    backup_id: Uuid,
) -> Result<CopyReport, ReplicateError> {
    let at = uuid_time(backup_id);
    let stream = streams::backup(backup_id);
    let label = |step: &str| format!("{step}/{}", replica.name);
    let replication_id = uuid_v7_derived(backup_id, at, &label("replication"));
    let from_region = PRIMARY.to_string();
    let to_region = replica.name.clone();
    record(
        rec.appender,
        &stream,
        &rec.actor,
        rec.cause,
        at,
        &label("replication.started"),
        backup_id,
        Event::ReplicationStarted(ReplicationStarted {
            replication_id,
            backup_id,
            from_region: from_region.clone(),
            to_region: to_region.clone(),
        }),
    )
    .await?;
    let result = async {
        let needed = needed_objects(primary, &[backup_id]).await?;
        copy_missing(primary, replica, &needed).await
    }
    .await;
    match result {
        Ok(report) => {
            record(
                rec.appender,
                &stream,
                &rec.actor,
                rec.cause,
                at,
                &label("replication.completed"),
                backup_id,
                Event::ReplicationCompleted(ReplicationCompleted {
                    replication_id,
                    backup_id,
                    from_region,
                    to_region,
                    // Not what this run copied: the payload must be the same on every run, so
                    // that a backup replicated again appends nothing (same id, same content).
                    objects: report.objects,
                    bytes: report.total_bytes,
                }),
            )
            .await?;
            info!(backup = %backup_id, replica = %replica.name, copied = report.copied, bytes = report.bytes, "backup replicated");
            Ok(report)
        }
        Err(e) => {
            warn!(backup = %backup_id, replica = %replica.name, error = %e, transient = e.is_transient(), "replication failed");
            let recorded = record(
                rec.appender,
                &stream,
                &rec.actor,
                rec.cause,
                at,
                &label("replication.failed"),
                backup_id,
                Event::ReplicationFailed(ReplicationFailed {
                    replication_id,
                    backup_id,
                    from_region,
                    to_region,
                    reason: e.to_string(),
                }),
            )
            .await;
            match recorded {
                // A failure of this backup to this replica is already on record (with the first
                // reason); the error is still returned.
                Err(le) if le.is_id_reused() => {}
                other => other?,
            }
            Err(e)
        }
    }
}

/// Copies the WAL files (every source) the replica lacks (absent, or of another size), with
/// `config` and `keys/` first so that the replica opens on its own; each is authenticated on
/// the primary before it is copied and read back after.
pub async fn replicate_wal(
    primary: &Repository,
    replica: &Replica,
) -> Result<CopyReport, ReplicateError> {
    let mut report = copy_missing(primary, replica, &needed_objects(primary, &[]).await?).await?;
    let present: HashMap<String, u64> = replica
        .backend
        .list(WAL_PREFIX)
        .await?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    let wal: Vec<(String, u64)> = primary
        .backend()
        .list(WAL_PREFIX)
        .await?
        .into_iter()
        .filter(|o| parse_wal_object_key(&o.key).is_some())
        .map(|o| (o.key, o.size))
        .collect();
    report.objects += wal.len() as u64;
    report.total_bytes += wal.iter().map(|(_, n)| n).sum::<u64>();
    let todo: Vec<String> = wal
        .into_iter()
        .filter(|(k, n)| present.get(k) != Some(n))
        .map(|(k, _)| k)
        .collect();
    let mut results = futures::stream::iter(todo)
        .map(|key| {
            let primary = primary.clone();
            let replica = replica.clone();
            async move {
                let data = primary.backend().get(&key).await?;
                check_wal(&primary, &key, &data).await?;
                let len = data.len() as u64;
                write_verified(&replica, &key, data).await?;
                Ok::<u64, ReplicateError>(len)
            }
        })
        .buffer_unordered(CONCURRENCY);
    while let Some(r) = results.next().await {
        report.bytes += r?;
        report.copied += 1;
    }
    if report.copied > 0 {
        info!(replica = %replica.name, copied = report.copied, bytes = report.bytes, "WAL replicated");
    }
    Ok(report)
}

/// The WAL files on the primary that the replica lacks, by object key.
pub async fn missing_wal(
    primary: &Repository,
    replica: &Replica,
) -> Result<Vec<String>, ReplicateError> {
    let on_replica: BTreeSet<String> = replica
        .backend
        .list(WAL_PREFIX)
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    Ok(wal_objects(primary)
        .await?
        .into_iter()
        .map(|n| n.key)
        .filter(|k| !on_replica.contains(k))
        .collect())
}

/// Backups with a manifest on the primary that the replica has no manifest for, oldest first.
pub async fn missing_backups(
    primary: &Repository,
    replica: &Replica,
) -> Result<Vec<Uuid>, ReplicateError> {
    let on_replica: BTreeSet<String> = replica
        .backend
        .list("manifests/")
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    Ok(primary
        .backup_ids()
        .await?
        .into_iter()
        .filter(|id| !on_replica.contains(&manifest_key(id)))
        .collect())
}

/// The replica's lag at `now`: the age of the oldest backup the primary holds and the replica
/// lacks (by its id's time, which is when it started), 0 when none.
pub async fn measure_lag(
    primary: &Repository,
    replica: &Replica,
    now: DateTime<Utc>,
) -> Result<u64, ReplicateError> {
    let missing = missing_backups(primary, replica).await?;
    Ok(missing
        .first()
        .map(|id| (now - uuid_time(*id)).num_seconds().max(0) as u64)
        .unwrap_or(0))
}

/// Records `replication.lag_measured` for `replica` (stream `storage`; the id derives from the
/// replica and `now`).
pub async fn record_lag(
    rec: &Recorder<'_>,
    replica: &str,
    lag_seconds: u64,
    now: DateTime<Utc>,
) -> Result<(), ReplicateError> {
    let subject = uuid_v7_derived(Uuid::nil(), now, &format!("replica/{replica}"));
    record(
        rec.appender,
        &streams::storage(),
        &rec.actor,
        rec.cause,
        now,
        "replication.lag_measured",
        subject,
        Event::ReplicationLagMeasured(ReplicationLagMeasured {
            region: replica.to_string(),
            lag_seconds,
        }),
    )
    .await?;
    Ok(())
}

/// One difference between the primary and a replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub key: String,
    /// `missing` (absent on the replica) or `differs` (another SHA3-256).
    pub kind: &'static str,
    /// Set when `heal` rewrote it from the primary (read back intact).
    pub healed: bool,
}

/// What [`compare`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompareReport {
    pub replica: String,
    pub objects: u64,
    pub bytes_read: u64,
    pub differences: Vec<Difference>,
}

impl CompareReport {
    /// True when every difference found was healed (or there were none).
    pub fn is_ok(&self) -> bool {
        self.differences.iter().all(|d| d.healed)
    }
}

/// Compares, object for object, what every backup on the primary needs, and every WAL file,
/// with the replica's copy (presence and SHA3-256 of both sides, read in full). With `heal`, a
/// missing or different object is rewritten from the primary after the primary's copy is
/// checked (chunks against their manifest's SHA3-256; WAL files opened and checked against
/// their recorded checksum; manifests, `config` and keys are authenticated by the primary's
/// opening and [`Repository::load_manifest`]), then read back.
pub async fn compare(
    primary: &Repository,
    replica: &Replica,
    heal: bool,
) -> Result<CompareReport, ReplicateError> {
    let ids = primary.backup_ids().await?;
    let mut needed = needed_objects(primary, &ids).await?;
    needed.extend(wal_objects(primary).await?);
    let mut report = CompareReport {
        replica: replica.name.clone(),
        objects: needed.len() as u64,
        ..Default::default()
    };
    let mut results = futures::stream::iter(needed)
        .map(|n| {
            let primary = primary.clone();
            let replica = replica.clone();
            async move {
                let p = read_primary(primary.backend().as_ref(), &n).await?;
                if n.key.starts_with(WAL_PREFIX) {
                    check_wal(&primary, &n.key, &p).await?;
                }
                let r = match replica.backend.get(&n.key).await {
                    Ok(b) => Some(b),
                    Err(RepoError::NotFound { .. }) => None,
                    Err(e) => return Err(ReplicateError::from(e)),
                };
                let read = p.len() as u64 + r.as_ref().map_or(0, |b| b.len() as u64);
                let kind = match &r {
                    None => Some("missing"),
                    Some(b) if sha3(b) != sha3(&p) => Some("differs"),
                    Some(_) => None,
                };
                let Some(kind) = kind else {
                    return Ok((read, None));
                };
                let mut healed = false;
                if heal {
                    if let Some(id) = n
                        .key
                        .strip_prefix("manifests/")
                        .and_then(|s| s.parse::<Uuid>().ok())
                    {
                        // Authenticates the primary's manifest before it is copied.
                        primary.load_manifest(id).await?;
                    }
                    write_verified(&replica, &n.key, p).await?;
                    healed = true;
                    info!(key = %n.key, replica = %replica.name, "healed from the primary");
                }
                Ok((
                    read,
                    Some(Difference {
                        key: n.key.clone(),
                        kind,
                        healed,
                    }),
                ))
            }
        })
        .buffer_unordered(CONCURRENCY);
    while let Some(r) = results.next().await {
        let (read, diff) = r?;
        report.bytes_read += read;
        report.differences.extend(diff);
    }
    report.differences.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_by_variant() {
        let e = ReplicateError::Repo(RepoError::Unreachable {
            what: "x".into(),
            detail: "down".into(),
            check: "c".into(),
        });
        assert!(e.is_transient());
        let e = ReplicateError::Mismatch {
            replica: "r".into(),
            key: "k".into(),
            expected: "a".into(),
            actual: "b".into(),
        };
        assert!(!e.is_transient());
    }
}
