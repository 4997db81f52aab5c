//! Offline copies (`backstop copy --to DIR|s3://...`): a self-contained, verified copy of
//! chosen backups for media taken offline (seed 003: the third location, against ransomware).
//!
//! A copy is a repository of its own: the primary's objects under the same keys, byte for byte
//! (sealed as they are: the same repository id, so the same master key opens it), copied by the
//! replicas' machinery ([`replicate::copy_objects`]). It holds `config`, `keys/`, the manifests
//! of the chosen backups and every chunk they reference, the WAL their recovery windows need,
//! and the ledger mirror segments; so `backstop --repo DIR check --read-data`, `restore` and
//! `ledger restore` work on it with nothing but the master key.
//!
//! # Invariants
//! - The destination is empty, or holds a copy of this repository (the same repository id in
//!   its `config`); anything else is refused before a byte is written.
//! - Order: `config`, `keys/`, chunks, WAL and ledger segments, the manifests, and the copy's
//!   description `copies/<copy id>` last. The description is written only once every object
//!   it lists was read back from the destination and its SHA3-256 matched the primary's (a
//!   chunk's: its manifest's), so a copy cut short or failed has no description of its own.
//! - A copy never deletes: objects of earlier copies stay (an offline copy is kept, whatever
//!   the primary's retention later removes). A second copy to the same destination writes only
//!   what is missing and reads the rest back (an object found different is rewritten).
//! - The description (`backstop-copy/1`, JSON, sealed as a blob with the `config` key, so
//!   authenticated by the master key) lists the backups, when and from where, and the size and
//!   SHA3-256 of every object of the copy: [`check_copy`] verifies a copy against it offline.
//! - Events on `copy-<copy id>`: `copy.started`, then `copy.completed` (after the description)
//!   or `copy.failed` with the reason; ids derive from the copy id and the label.

use std::collections::{BTreeMap, HashMap};

use backstop_events::{CopyCompleted, CopyFailed, CopyStarted, Event, streams};
use backstop_ledger::LedgerError;
use backstop_repo::{
    Hash32, KeyPurpose, Manifest, Problem, ProblemKind, RepoError, Repository, seal,
};
use backstop_sources::pg::wal::{WalFile, WalKind};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;

use crate::catalog::{method_of, physical_report};
use crate::record::record;
use crate::replicate::{self, CopyReport, Needed, Recorder, Replica, ReplicateError};
use crate::schedule::Clock;
use crate::wal::{WAL_PREFIX, parse_wal_object_key};

/// Where copy descriptions are: `copies/<copy id>`.
pub const COPIES_PREFIX: &str = "copies/";
/// The description's `format`.
pub const DESCRIPTION_FORMAT: &str = "backstop-copy/1";
/// Where the ledger mirror's segments are.
const LEDGER_PREFIX: &str = "ledger/";

/// Which backups a copy holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Every backup the repository holds (every one retention has kept).
    All,
    /// The newest backup of each source.
    NewestPerSource,
    /// These backups.
    Backups(Vec<Uuid>),
}

/// A backup in a copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CopiedBackup {
    pub backup_id: Uuid,
    pub source: String,
    /// `logical`, `physical`, `command`, `redis` or `files`.
    pub method: String,
    pub finished_at: DateTime<Utc>,
}

/// An object of a copy as it was read back from the destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopiedObject {
    pub key: String,
    pub size: u64,
    pub sha3: Hash32,
}

/// The description `copies/<copy id>` (format `backstop-copy/1`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CopyDescription {
    pub format: String,
    pub copy_id: Uuid,
    pub repository_id: Uuid,
    /// The repository copied (its location) and the destination as given.
    pub from: String,
    pub to: String,
    pub started_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
    pub backups: Vec<CopiedBackup>,
    /// Per source with a physical backup in the copy: the first WAL segment copied (the oldest
    /// such backup's start segment); WAL is copied from there to the end of the archive.
    #[serde(default)]
    pub wal_from: BTreeMap<String, String>,
    /// Every object of the copy but the description itself, in key order.
    pub objects: Vec<CopiedObject>,
}

impl CopyDescription {
    pub fn bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Replicate(#[from] ReplicateError),
    #[error("storage: {0}")]
    Repo(#[from] RepoError),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error(
        "{to} holds another repository ({found}; this one is {ours}): copy into an empty directory or bucket prefix, or into an earlier copy of this repository"
    )]
    Foreign {
        to: String,
        found: String,
        ours: Uuid,
    },
    #[error(
        "{to} is not empty and holds no Backstop repository ({count} objects, e.g. {example}): copy into an empty directory or bucket prefix"
    )]
    NotEmpty {
        to: String,
        count: usize,
        example: String,
    },
    #[error("backup {0} is not in the repository: `backstop list` shows the backups it holds")]
    UnknownBackup(Uuid),
    #[error("backup {id}'s manifest cannot be read ({detail}): run `backstop check`")]
    BadManifest { id: Uuid, detail: String },
    #[error("the repository holds no backup to copy: take one with `backstop backup`")]
    NothingToCopy,
    #[error("copy description {key}: {detail}")]
    BadDescription { key: String, detail: String },
}

impl CopyError {
    /// True when a later attempt may succeed (a store or the ledger unreachable).
    pub fn is_transient(&self) -> bool {
        match self {
            CopyError::Replicate(e) => e.is_transient(),
            CopyError::Repo(e) => e.is_transient(),
            CopyError::Ledger(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// A copy to make.
pub struct CopyRequest<'a> {
    pub copy_id: Uuid,
    pub selection: &'a Selection,
    /// The destination as the operator named it (recorded, and in the description).
    pub to: String,
}

/// A finished copy.
#[derive(Clone, Debug)]
pub struct CopyOutcome {
    pub description: CopyDescription,
    /// Where the description is.
    pub description_key: String,
    pub report: CopyReport,
}

/// The description's key for `copy_id`.
pub fn description_key(copy_id: Uuid) -> String {
    format!("{COPIES_PREFIX}{copy_id}")
}

/// Makes a copy of the chosen backups at `dest`, recording `copy.started`, then `copy.completed`
/// or (before the error is returned) `copy.failed` with the reason.
pub async fn copy_to(
    rec: &Recorder<'_>,
    primary: &Repository,
    dest: &Replica,
    req: CopyRequest<'_>,
    clock: &dyn Clock,
) -> Result<CopyOutcome, CopyError> {
    let started_at = clock.now();
    let stream = streams::copy(req.copy_id);
    let from = primary.location();
    // The backups are resolved first so that `copy.started` names them; a selection that
    // cannot be resolved is still recorded as started and failed.
    let chosen = choose(primary, req.selection).await;
    let ids: Vec<Uuid> = chosen
        .as_ref()
        .map(|c| c.iter().map(|m| m.backup_id).collect())
        .unwrap_or_default();
    record(
        rec.appender,
        &stream,
        &rec.actor,
        rec.cause,
        started_at,
        "copy.started",
        req.copy_id,
        Event::CopyStarted(CopyStarted {
            copy_id: req.copy_id,
            from: from.clone(),
            to: req.to.clone(),
            backups: ids.clone(),
        }),
    )
    .await?;
    let result = async {
        let manifests = chosen?;
        make_copy(primary, dest, &req, &manifests, started_at, clock).await
    }
    .await;
    match result {
        Ok(outcome) => {
            let d = &outcome.description;
            record(
                rec.appender,
                &stream,
                &rec.actor,
                rec.cause,
                started_at,
                "copy.completed",
                req.copy_id,
                Event::CopyCompleted(CopyCompleted {
                    copy_id: req.copy_id,
                    from,
                    to: req.to.clone(),
                    backups: ids,
                    objects: d.objects.len() as u64,
                    bytes: d.bytes(),
                    copied: outcome.report.copied,
                    copied_bytes: outcome.report.bytes,
                    repaired: outcome.report.repaired,
                    description: outcome.description_key.clone(),
                    duration_ms: (d.completed_at - started_at).num_milliseconds().max(0) as u64,
                }),
            )
            .await?;
            info!(copy = %req.copy_id, to = %req.to, objects = d.objects.len(), copied = outcome.report.copied, "offline copy completed");
            Ok(outcome)
        }
        Err(e) => {
            warn!(copy = %req.copy_id, to = %req.to, error = %e, "offline copy failed");
            record(
                rec.appender,
                &stream,
                &rec.actor,
                rec.cause,
                started_at,
                "copy.failed",
                req.copy_id,
                Event::CopyFailed(CopyFailed {
                    copy_id: req.copy_id,
                    from,
                    to: req.to.clone(),
                    reason: e.to_string(),
                }),
            )
            .await?;
            Err(e)
        }
    }
}

/// The manifests of the chosen backups, oldest first.
async fn choose(primary: &Repository, selection: &Selection) -> Result<Vec<Manifest>, CopyError> {
    let listed = primary.list_backups().await?;
    let wanted: Option<Vec<Uuid>> = match selection {
        Selection::Backups(ids) => Some(ids.clone()),
        _ => None,
    };
    if let Some(ids) = &wanted {
        for id in ids {
            if !listed.iter().any(|l| l.backup_id == *id) {
                return Err(CopyError::UnknownBackup(*id));
            }
        }
    }
    let mut manifests = Vec::new();
    for l in listed {
        if wanted.as_ref().is_some_and(|w| !w.contains(&l.backup_id)) {
            continue;
        }
        match l.manifest {
            Ok(m) => manifests.push(m),
            Err(e) => {
                // A manifest named explicitly must be copied; with all of them, an unreadable
                // one is left out (said in the log), as `check` reports it.
                if wanted.is_some() {
                    return Err(CopyError::BadManifest {
                        id: l.backup_id,
                        detail: e.to_string(),
                    });
                }
                warn!(backup = %l.backup_id, error = %e, "unreadable manifest: not copied");
            }
        }
    }
    if *selection == Selection::NewestPerSource {
        let mut newest: HashMap<String, Manifest> = HashMap::new();
        for m in manifests {
            match newest.get(&m.source) {
                Some(n) if n.finished_at >= m.finished_at => {}
                _ => {
                    newest.insert(m.source.clone(), m);
                }
            }
        }
        manifests = newest.into_values().collect();
    }
    manifests.sort_by_key(|m| m.backup_id);
    if manifests.is_empty() {
        return Err(CopyError::NothingToCopy);
    }
    Ok(manifests)
}

/// Refuses a destination that holds anything but a copy of `primary`.
async fn check_destination(
    primary: &Repository,
    dest: &Replica,
    to: &str,
) -> Result<(), CopyError> {
    let objects = dest.backend.list("").await?;
    if objects.is_empty() {
        return Ok(());
    }
    let config = match dest.backend.get(backstop_repo::config::CONFIG_KEY).await {
        Ok(b) => b,
        Err(RepoError::NotFound { .. }) => {
            return Err(CopyError::NotEmpty {
                to: to.to_string(),
                count: objects.len(),
                example: objects[0].key.clone(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let found = serde_json::from_slice::<serde_json::Value>(&config)
        .ok()
        .and_then(|v| v.get("repository_id")?.as_str()?.parse::<Uuid>().ok());
    match found {
        Some(id) if id == primary.id() => Ok(()),
        Some(id) => Err(CopyError::Foreign {
            to: to.to_string(),
            found: format!("repository {id}"),
            ours: primary.id(),
        }),
        None => Err(CopyError::Foreign {
            to: to.to_string(),
            found: "a config object that is not a Backstop repository's".into(),
            ours: primary.id(),
        }),
    }
}

/// The WAL objects the physical backups among `manifests` need for their recovery windows:
/// per source, from the oldest one's start segment to the end of the archive, with every
/// timeline history file. Returns them and the first segment per source.
async fn wal_objects(
    primary: &Repository,
    manifests: &[Manifest],
) -> Result<(Vec<Needed>, BTreeMap<String, String>), CopyError> {
    let mut from: BTreeMap<String, (u32, u32, String)> = BTreeMap::new();
    for m in manifests {
        let Some(report) = physical_report(m) else {
            continue;
        };
        let Some(start) = WalFile::parse(&report.start_segment) else {
            continue;
        };
        let pos = (start.log, start.seg, report.start_segment.clone());
        match from.get(&m.source) {
            Some(p) if (p.0, p.1) <= (pos.0, pos.1) => {}
            _ => {
                from.insert(m.source.clone(), pos);
            }
        }
    }
    let mut out = Vec::new();
    if from.is_empty() {
        return Ok((out, BTreeMap::new()));
    }
    for o in primary.backend().list(WAL_PREFIX).await? {
        if wal_needed(&from, &o.key) {
            out.push(Needed {
                key: o.key,
                expected: None,
            });
        }
    }
    Ok((out, from.into_iter().map(|(s, (_, _, n))| (s, n)).collect()))
}

/// Whether the WAL object `key` is in a copy whose first segment per source is `from`: a
/// history file of such a source, or a file at or after its first segment (any timeline).
fn wal_needed(from: &BTreeMap<String, (u32, u32, String)>, key: &str) -> bool {
    let Some((source, file)) = parse_wal_object_key(key) else {
        return false;
    };
    let Some((log, seg, _)) = from.get(&source) else {
        return false;
    };
    file.kind == WalKind::History || (file.log, file.seg) >= (*log, *seg)
}

async fn make_copy(
    primary: &Repository,
    dest: &Replica,
    req: &CopyRequest<'_>,
    manifests: &[Manifest],
    started_at: DateTime<Utc>,
    clock: &dyn Clock,
) -> Result<CopyOutcome, CopyError> {
    check_destination(primary, dest, &req.to).await?;
    let ids: Vec<Uuid> = manifests.iter().map(|m| m.backup_id).collect();
    // config, keys, chunks, manifests (the replicas' order) ...
    let mut needed = replicate::needed_objects(primary, &ids).await?;
    // ... with the WAL and the ledger segments, which copy_objects writes before the manifests.
    let (wal, wal_from) = wal_objects(primary, manifests).await?;
    needed.extend(wal);
    needed.extend(
        primary
            .backend()
            .list(LEDGER_PREFIX)
            .await?
            .into_iter()
            .map(|o| Needed {
                key: o.key,
                expected: None,
            }),
    );
    let (report, held) = replicate::copy_objects(primary, dest, &needed, true).await?;
    let description = CopyDescription {
        format: DESCRIPTION_FORMAT.to_string(),
        copy_id: req.copy_id,
        repository_id: primary.id(),
        from: primary.location(),
        to: req.to.clone(),
        started_at,
        completed_at: clock.now(),
        backups: manifests
            .iter()
            .map(|m| CopiedBackup {
                backup_id: m.backup_id,
                source: m.source.clone(),
                method: method_of(m).to_string(),
                finished_at: m.finished_at,
            })
            .collect(),
        wal_from,
        objects: held
            .into_iter()
            .map(|h| CopiedObject {
                key: h.key,
                size: h.size,
                sha3: h.sha3,
            })
            .collect(),
    };
    let key = description_key(req.copy_id);
    let json = serde_json::to_vec_pretty(&description).map_err(|e| CopyError::BadDescription {
        key: key.clone(),
        detail: e.to_string(),
    })?;
    // Sealed with the primary's `config` key for the copy's path (the same repository id), then
    // stored at the destination and read back.
    primary
        .put_blob_in(
            dest.backend.as_ref(),
            &key,
            KeyPurpose::Config,
            Bytes::from(json),
        )
        .await?;
    Ok(CopyOutcome {
        description,
        description_key: key,
        report,
    })
}

/// What [`check_copy`] found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CopyCheck {
    pub copy_id: Uuid,
    pub from: String,
    pub completed_at: DateTime<Utc>,
    pub backups: usize,
    /// Objects the description lists, and those of them read and compared here.
    pub objects: u64,
    pub objects_read: u64,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
}

/// The newest copy description in `repo`, if it is a copy.
pub async fn newest_description(repo: &Repository) -> Result<Option<CopyDescription>, CopyError> {
    let Some(newest) = repo.backend().list(COPIES_PREFIX).await?.pop() else {
        return Ok(None);
    };
    let bytes = repo.get_blob(&newest.key, None).await?;
    let d: CopyDescription =
        serde_json::from_slice(&bytes).map_err(|e| CopyError::BadDescription {
            key: newest.key.clone(),
            detail: format!("does not decode: {e}"),
        })?;
    if d.format != DESCRIPTION_FORMAT {
        return Err(CopyError::BadDescription {
            key: newest.key,
            detail: format!(
                "format {:?}, this build reads {DESCRIPTION_FORMAT}: use a matching release",
                d.format
            ),
        });
    }
    if d.repository_id != repo.id() {
        return Err(CopyError::BadDescription {
            key: newest.key,
            detail: format!(
                "it describes repository {}, this is {}",
                d.repository_id,
                repo.id()
            ),
        });
    }
    Ok(Some(d))
}

/// Checks a copy against its newest description: every object listed is present with its
/// size; with `read_data`, every one but the chunks is read and its SHA3-256 compared (the
/// repository check reads the chunks against their manifests). `None` when `repo` is not a
/// copy (it has no description).
pub async fn check_copy(
    repo: &Repository,
    read_data: bool,
) -> Result<Option<CopyCheck>, CopyError> {
    let Some(d) = newest_description(repo).await? else {
        return Ok(None);
    };
    let sizes: HashMap<String, u64> = repo
        .backend()
        .list("")
        .await?
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    let mut check = CopyCheck {
        copy_id: d.copy_id,
        from: d.from.clone(),
        completed_at: d.completed_at,
        backups: d.backups.len(),
        objects: d.objects.len() as u64,
        objects_read: 0,
        bytes_read: 0,
        problems: Vec::new(),
    };
    let problem = |kind, key: &str, detail: String| Problem {
        kind,
        key: key.to_string(),
        backups: Vec::new(),
        detail,
    };
    for o in &d.objects {
        match sizes.get(&o.key) {
            None => check.problems.push(problem(
                ProblemKind::Missing,
                &o.key,
                format!("listed in copy {} but absent", d.copy_id),
            )),
            Some(s) if *s != o.size => check.problems.push(problem(
                ProblemKind::Size,
                &o.key,
                format!("{s} bytes, copy {} recorded {}", d.copy_id, o.size),
            )),
            Some(_) if read_data && !o.key.starts_with("chunks/") => {
                let data = repo.backend().get(&o.key).await?;
                check.objects_read += 1;
                check.bytes_read += data.len() as u64;
                let actual = Hash32(seal::sha3(&data));
                if actual != o.sha3 {
                    check.problems.push(problem(
                        ProblemKind::Corrupt,
                        &o.key,
                        format!(
                            "SHA3-256 {}, copy {} recorded {}",
                            actual.to_hex(),
                            d.copy_id,
                            o.sha3.to_hex()
                        ),
                    ));
                }
            }
            Some(_) => {}
        }
    }
    Ok(Some(check))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_from_the_oldest_start_segment_with_every_history_file() {
        let from: BTreeMap<String, (u32, u32, String)> = [(
            "main".to_string(),
            (0, 5, "000000010000000000000005".to_string()),
        )]
        .into();
        let needed = |k: &str| wal_needed(&from, k);
        assert!(!needed("wal/main/00000001/000000010000000000000004"));
        assert!(needed("wal/main/00000001/000000010000000000000005"));
        assert!(needed("wal/main/00000002/000000020000000100000000"));
        assert!(needed("wal/main/00000002/00000002.history"));
        assert!(needed(
            "wal/main/00000001/000000010000000000000005.00000028.backup"
        ));
        // Another source's WAL, and what is not a WAL object, are not copied.
        assert!(!needed("wal/other/00000001/000000010000000000000009"));
        assert!(!needed("wal/main/00000001/notes.txt"));
    }

    #[test]
    fn transient_by_variant() {
        assert!(!CopyError::NothingToCopy.is_transient());
        let e = CopyError::Repo(RepoError::Unreachable {
            what: "x".into(),
            detail: "down".into(),
            check: "c".into(),
        });
        assert!(e.is_transient());
    }
}
