//! Configuration backups (`kind = "config"` sources, R16): the source's canonical document
//! ([`backstop_sources::config`]) sealed with the `config` data key, backed up when it changed,
//! and imported back.
//!
//! # Change detection
//! A backup's manifest holds `extra.config` ([`ConfigReport`]): the keyed hash of the whole
//! document (`DataKey::keyed_hash` with the `config` key, domain [`HASH_DOMAIN`]), the id of the
//! key version that computed it, and each item's name with its own keyed hash (domain
//! [`ITEM_DOMAIN`]). [`check`] reads the source now and hashes it with the key version the
//! newest configuration backup of the source used: equal hashes mean unchanged, and no backup is
//! taken (`backstop backup` says so and requests nothing; a scheduled or API request is closed as
//! `backup.skipped` by [`skip_unchanged`]). A rotated key changes nothing here:
//! the older version still unwraps.
//!
//! # Invariants
//! - Values never leave the sealed document: the report, the events (`backup.*` carry only the
//!   source and figures), logs and errors hold names and keyed hashes only. Without the `config`
//!   key a hash reveals nothing (it is not the plain SHA3 of a value one could guess).
//! - An import checks the stored document against the manifest's hash before writing anything,
//!   writes a new file (mode 0600) and never overwrites one; it is recorded as a recovery.

use std::path::{Path, PathBuf};
use std::time::Instant;

use backstop_events::{
    Actor, BackupMethod, BackupRequested, BackupSkipped, Envelope, Event, TableCheck, Trigger,
    streams,
};
use backstop_repo::{DataKey, KeyPurpose, Manifest, Repository};
use backstop_sources::config::{self as source, ConfigDocument, ConfigSource, ItemKind};
use backstop_sources::pg::logical::DumpSink;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

use crate::catalog;
use crate::context::{DataPath, SourceKind};
use crate::error::OpsError;
use crate::record::record;
use crate::restore::Recovery;
use crate::verify::Verified;

/// The keyed hash's domain for a whole document.
pub const HASH_DOMAIN: &str = "backstop/v1/config-document";
/// The keyed hash's domain for one item (`kind NUL name NUL value`).
pub const ITEM_DOMAIN: &str = "backstop/v1/config-item";

/// `extra.config` of a configuration backup's manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigReport {
    /// The document's part ([`source::CONFIG_PART`]).
    pub part: String,
    /// The document's size.
    pub bytes: u64,
    /// The keyed hash of the document, lowercase hex.
    pub hash: String,
    /// The `config` key version the hashes were computed with.
    pub hash_key_id: String,
    /// Every item's name and keyed hash (never its value).
    pub items: Vec<ItemHash>,
}

/// One item of a configuration backup, as the report shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemHash {
    pub kind: ItemKind,
    pub name: String,
    pub hash: String,
}

fn document_hash(key: &DataKey, doc: &ConfigDocument) -> String {
    hex::encode(key.keyed_hash(HASH_DOMAIN, &doc.to_bytes()))
}

/// The report of `doc` under `key`.
pub fn report(key: &DataKey, doc: &ConfigDocument) -> Result<ConfigReport, OpsError> {
    let bytes = doc.to_bytes();
    let items = doc
        .items()?
        .into_iter()
        .map(|i| {
            let kind = serde_json::to_value(i.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let mut data = Vec::with_capacity(kind.len() + i.name.len() + i.value.len() + 2);
            data.extend_from_slice(kind.as_bytes());
            data.push(0);
            data.extend_from_slice(i.name.as_bytes());
            data.push(0);
            data.extend_from_slice(&i.value);
            ItemHash {
                kind: i.kind,
                name: i.name,
                hash: hex::encode(key.keyed_hash(ITEM_DOMAIN, &data)),
            }
        })
        .collect();
    Ok(ConfigReport {
        part: source::CONFIG_PART.to_string(),
        bytes: bytes.len() as u64,
        hash: hex::encode(key.keyed_hash(HASH_DOMAIN, &bytes)),
        hash_key_id: key.key_id().to_string(),
        items,
    })
}

/// Reads `config` and stores its document into `sink`: the backup's data path for a
/// configuration source (the writer seals it with the `config` key).
pub async fn backup(
    repo: &Repository,
    config: &ConfigSource,
    sink: &dyn DumpSink,
    actor: &Actor,
) -> Result<ConfigReport, OpsError> {
    let doc = source::read(config).await?;
    let key = repo
        .data_key(
            KeyPurpose::Config,
            "keyed hash of a configuration backup",
            &actor.to_string(),
        )
        .await?;
    let report = report(&key, &doc)?;
    source::store(&doc, sink).await?;
    tracing::info!(items = report.items.len(), hash = %report.hash, "configuration read (names and keyed hashes only)");
    Ok(report)
}

/// Whether a configuration source changed since its newest backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The document's keyed hash equals that of backup `since`.
    Unchanged { since: Uuid, hash: String },
    /// It differs from backup `previous` (none: no configuration backup of the source yet).
    Changed { previous: Option<Uuid> },
}

/// Reads configuration source `name` now and compares it with its newest backup (see the module
/// docs). Reads only: nothing is recorded but the key access.
pub async fn check(dp: &DataPath, name: &str, actor: &Actor) -> Result<Change, OpsError> {
    let spec = dp.source(name)?;
    let SourceKind::Config(config) = &spec.kind else {
        return Err(OpsError::Invalid(format!(
            "source `{name}` is a {} source, not a configuration source",
            spec.kind.name()
        )));
    };
    let doc = source::read(config).await?;
    let Some(newest) = newest_backup(&dp.repo, name).await? else {
        return Ok(Change::Changed { previous: None });
    };
    let previous = catalog::config_report(&newest)?;
    let key = dp
        .repo
        .data_key_by_id(
            &previous.hash_key_id,
            &format!("configuration change check of `{name}`"),
            &actor.to_string(),
        )
        .await?;
    if document_hash(&key, &doc) == previous.hash {
        Ok(Change::Unchanged {
            since: newest.backup_id,
            hash: previous.hash,
        })
    } else {
        Ok(Change::Changed {
            previous: Some(newest.backup_id),
        })
    }
}

/// Closes `request` as `backup.skipped` instead of taking it when its source is a configuration
/// source that has not changed since its newest backup; returns that backup's id. Only scheduled
/// and API (`manual`) requests are skipped: a foreground `backstop backup` checks for itself
/// (`--force` takes one anyway) and a retry after a failed verification must retake the backup.
/// Not a configuration source, changed, or a failed check (logged): `None`, and the caller takes
/// the backup, which records its own failure if the source cannot be read.
pub async fn skip_unchanged(
    dp: &DataPath,
    request: &BackupRequested,
    requested_at: DateTime<Utc>,
    actor: &Actor,
    cause: Option<&Envelope>,
) -> Result<Option<Uuid>, OpsError> {
    if !matches!(request.trigger, Trigger::Schedule { .. } | Trigger::Manual) {
        return Ok(None);
    }
    match dp.source(&request.source) {
        Ok(spec) if matches!(spec.kind, SourceKind::Config(_)) => {}
        _ => return Ok(None),
    }
    let (since, hash) = match check(dp, &request.source, actor).await {
        Ok(Change::Unchanged { since, hash }) => (since, hash),
        Ok(Change::Changed { .. }) => return Ok(None),
        Err(e) => {
            tracing::warn!(source = %request.source, error = %e.chain(), "configuration change check failed; backing up");
            return Ok(None);
        }
    };
    // The id derives from the request, so a redelivered request records the skip once.
    record(
        dp.appender.as_ref(),
        &streams::backup(request.backup_id),
        actor,
        cause,
        requested_at,
        "skipped",
        request.backup_id,
        Event::BackupSkipped(BackupSkipped {
            backup_id: request.backup_id,
            source: request.source.clone(),
            unchanged_since: since,
            reason: format!("configuration unchanged since backup {since} (keyed hash {hash})"),
        }),
    )
    .await?;
    tracing::info!(backup = %request.backup_id, source = %request.source, %since, "configuration unchanged: backup skipped");
    Ok(Some(since))
}

/// The newest configuration backup of `source` in the repository.
pub async fn newest_backup(repo: &Repository, source: &str) -> Result<Option<Manifest>, OpsError> {
    Ok(repo
        .list_backups()
        .await?
        .into_iter()
        .filter_map(|l| l.manifest.ok())
        .filter(|m| m.source == source && catalog::method_of(m) == BackupMethod::Config)
        .max_by_key(|m| (m.finished_at, m.backup_id)))
}

/// The stored document of a configuration backup, checked against the manifest's keyed hash
/// (every chunk is checked on the way too).
pub async fn load(
    repo: &Repository,
    manifest: &Manifest,
    actor: &Actor,
    why: &str,
) -> Result<ConfigDocument, OpsError> {
    let report = catalog::config_report(manifest)?;
    let repo = repo.with_access(actor.to_string(), why.to_string());
    let mut stream = Box::pin(repo.open_stream(manifest, &report.part).await?);
    let mut bytes = Vec::with_capacity(report.bytes as usize);
    stream
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| OpsError::io("reading the configuration document from the repository", e))?;
    let doc = ConfigDocument::from_bytes(&bytes)?;
    let key = repo
        .data_key_by_id(&report.hash_key_id, why, &actor.to_string())
        .await?;
    if bytes.len() as u64 != report.bytes || document_hash(&key, &doc) != report.hash {
        return Err(OpsError::BadManifest {
            backup: manifest.backup_id,
            what: "configuration document",
            why: "the stored document does not match the manifest's keyed hash".into(),
        });
    }
    Ok(doc)
}

/// What `config import` writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImportFormat {
    /// The env file exactly (then variables read from the environment, if any).
    Env,
    /// Everything as one JSON object.
    Json,
    /// One stored JSON settings file exactly, by its path.
    File(String),
}

/// Writes backup `manifest`'s configuration to the new file `out` (mode 0600), recorded as a
/// recovery of the operator; returns the bytes written.
pub async fn import(
    dp: &DataPath,
    manifest: &Manifest,
    recovery: &Recovery,
    format: &ImportFormat,
    out: &Path,
) -> Result<u64, OpsError> {
    let backup_id = manifest.backup_id;
    recovery.begin(dp.appender.as_ref(), backup_id).await?;
    let started = Instant::now();
    let work = async {
        let why = format!(
            "configuration import of backup {backup_id} by {}",
            recovery.operator
        );
        let doc = load(&dp.repo, manifest, &recovery.actor, &why).await?;
        let bytes = render(&doc, format, backup_id)?;
        write_new(out, &bytes).await?;
        Ok::<u64, OpsError>(bytes.len() as u64)
    };
    let outcome = work.await;
    let ended = match &outcome {
        Ok(n) => Ok((started.elapsed().as_millis() as u64, *n, Vec::new())),
        Err(e) => Err(e),
    };
    recovery
        .end(dp.appender.as_ref(), backup_id, None, ended)
        .await?;
    outcome
}

fn render(doc: &ConfigDocument, format: &ImportFormat, id: Uuid) -> Result<Vec<u8>, OpsError> {
    Ok(match format {
        ImportFormat::Env => {
            if doc.env_file.is_none() && doc.env_vars.is_empty() {
                return Err(OpsError::Invalid(format!(
                    "backup {id} holds no environment variables; use --format json or --file PATH"
                )));
            }
            doc.to_env()?
        }
        ImportFormat::Json => {
            let mut v = serde_json::to_vec_pretty(&doc.to_json()?)
                .map_err(|e| OpsError::Invalid(e.to_string()))?;
            v.push(b'\n');
            v
        }
        ImportFormat::File(path) => doc
            .json_files
            .iter()
            .find(|f| &f.path == path)
            .map(|f| f.bytes.clone())
            .ok_or_else(|| {
                OpsError::Invalid(format!(
                    "backup {id} holds no file {path:?}; `backstop config show {id}` lists what it holds"
                ))
            })?,
    })
}

/// Writes `bytes` to `out`, which must not exist: to `OUT.backstop-partial` (mode 0600), then
/// renamed into place, so a half-written secret file never carries the final name.
async fn write_new(out: &Path, bytes: &[u8]) -> Result<(), OpsError> {
    use tokio::io::AsyncWriteExt;
    if tokio::fs::symlink_metadata(out).await.is_ok() {
        return Err(OpsError::Invalid(format!(
            "{} exists already; import into a new file (nothing was written)",
            out.display()
        )));
    }
    let mut partial = PathBuf::from(out);
    partial.as_mut_os_string().push(".backstop-partial");
    let io = |e| OpsError::io(format!("writing {}", partial.display()), e);
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .await
        .map_err(io)?;
    f.write_all(bytes).await.map_err(io)?;
    f.sync_all().await.map_err(io)?;
    drop(f);
    tokio::fs::rename(&partial, out).await.map_err(io)?;
    Ok(())
}

/// The verify worker's test restore of a configuration backup: the document read back (every
/// chunk checked), matched against the manifest's keyed hash, and its items counted against the
/// report's.
pub async fn test_restore(
    repo: &Repository,
    manifest: Manifest,
    actor: &Actor,
) -> Result<Verified, OpsError> {
    let started = Instant::now();
    let report = catalog::config_report(&manifest)?;
    let why = format!("test restore of backup {}", manifest.backup_id);
    let doc = load(repo, &manifest, actor, &why).await?;
    let restored = doc.items()?.len() as u64;
    let restore_ms = started.elapsed().as_millis() as u64;
    Ok(Verified {
        tables: vec![TableCheck {
            schema: "config".into(),
            table: "items".into(),
            expected: report.items.len() as u64,
            restored,
        }],
        objects: manifest.distinct_chunks().len() as u64 + 1,
        bytes: manifest.totals.stored_bytes,
        restore_ms,
        bytes_per_sec: report.bytes as f64 / (restore_ms as f64 / 1000.0).max(0.001),
        physical: None,
    })
}
