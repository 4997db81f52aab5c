//! `backstop key`: the repository's data keys.
//!
//! - `key list`: every version of every purpose's key, the current one (which seals new data)
//!   marked, with its creation time. Needs the master key (the key objects are read and their
//!   wrapping checked by opening the repository); prints no secret.
//! - `key export --purpose wal --out FILE`: a purpose-key file for a database host (see
//!   `backstop_repo::purpose_key` and docs/FORMAT.md, "Purpose-key files"). The file can seal
//!   and open WAL and nothing else: it holds no master key, no wrap key, no chunk-id key and no
//!   other purpose's key. Written with mode 0600, never over an existing file.
//!
//! Other subcommands of this group (rotation, re-encryption) live here too.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::bail;
use backstop_events::{Actor, now_micros};
use backstop_repo::purpose_key::{EXPORTABLE, PurposeKeyFile};
use backstop_repo::{KeyAccessLog, KeyPurpose, Repository};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::config::Config;
use crate::wiring::{self, Events, RepoArgs};

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Every key version per purpose, the current one marked, with its creation time.
    List(KeyListArgs),
    /// Export one purpose's key to a file for a host that needs only it (today: `wal`, for a
    /// database host's wal-push and wal-fetch). The file cannot open backups.
    Export(KeyExportArgs),
    /// Make new key versions (default: database and files) and re-seal every backup with them.
    Rotate(crate::key_rotate_cmd::KeyRotateArgs),
    /// Run the re-encryption job to its end, resuming the unfinished one (`--status`: show it).
    Reencrypt(crate::key_rotate_cmd::KeyReencryptArgs),
    /// Retire the key versions nothing in the repository is sealed with any more.
    Retire(crate::key_rotate_cmd::KeyRetireArgs),
}

#[derive(Args)]
pub struct KeyListArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct KeyExportArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The purpose whose key to export (only `wal` can be exported).
    #[arg(long)]
    pub purpose: String,
    /// The file to write (mode 0600; an existing file is never overwritten).
    #[arg(long)]
    pub out: PathBuf,
}

pub async fn run(config: &Config, data_dir: &Path, cmd: KeyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeyCommand::List(args) => list(config, data_dir, args).await,
        KeyCommand::Export(args) => export(config, data_dir, args).await,
        KeyCommand::Rotate(args) => crate::key_rotate_cmd::rotate_cmd(config, data_dir, args).await,
        KeyCommand::Reencrypt(args) => {
            crate::key_rotate_cmd::reencrypt_cmd(config, data_dir, args).await
        }
        KeyCommand::Retire(args) => crate::key_rotate_cmd::retire_cmd(config, data_dir, args).await,
    }
}

/// Opens the repository with the master key. Listing unwraps no data key, so the observer
/// only guards against a future change that would: such an unwrap would be logged.
async fn open_for_listing(
    config: &Config,
    data_dir: &Path,
    args: &RepoArgs,
) -> anyhow::Result<Repository> {
    let master = wiring::master_key(config, args)?;
    let loc = wiring::location(config, data_dir, args)?;
    let backend = loc.open(Some(wiring::s3_settings(config))).await?;
    Ok(Repository::open(backend, &master, Arc::new(KeyAccessLog::new())).await?)
}

/// One row of `key list`.
#[derive(Serialize)]
struct ListedKey {
    purpose: KeyPurpose,
    key_id: String,
    version: u32,
    created_at: DateTime<Utc>,
    current: bool,
}

async fn list(config: &Config, data_dir: &Path, args: KeyListArgs) -> anyhow::Result<ExitCode> {
    let repo = open_for_listing(config, data_dir, &args.repo).await?;
    let mut rows = Vec::new();
    for info in repo.keys() {
        let current = repo
            .current_key(info.purpose)
            .is_ok_and(|c| c.key_id == info.key_id);
        rows.push(ListedKey {
            purpose: info.purpose,
            key_id: info.key_id,
            version: info.version,
            created_at: info.created_at,
            current,
        });
    }
    let damaged = repo.damaged_keys();
    if args.json {
        let v = serde_json::json!({
            "repository_id": repo.id(),
            "keys": rows,
            "damaged": damaged
                .iter()
                .map(|(k, why)| serde_json::json!({"object": k, "problem": why}))
                .collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("repository {}", repo.id());
        println!(
            "{:<9} {:>7}  {:<24} {:<20} current",
            "purpose", "version", "key id", "created"
        );
        for r in &rows {
            println!(
                "{:<9} {:>7}  {:<24} {:<20} {}",
                r.purpose.as_str(),
                r.version,
                r.key_id,
                r.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
                if r.current { "*" } else { "" }
            );
        }
        for (k, why) in &damaged {
            eprintln!("DAMAGED {k}: {why}");
        }
    }
    Ok(if damaged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn export(config: &Config, data_dir: &Path, args: KeyExportArgs) -> anyhow::Result<ExitCode> {
    let purpose: KeyPurpose = args.purpose.parse()?;
    if !EXPORTABLE.contains(&purpose) {
        bail!(
            "the {purpose} key cannot be exported: it opens backups or the audit trail, and stays behind the master key (exportable: {})",
            EXPORTABLE.map(|p| p.as_str()).join(", ")
        );
    }
    // Refuse before opening anything: the file is never overwritten.
    if args.out.symlink_metadata().is_ok() {
        bail!(
            "{} exists: a key file is never overwritten; remove it first, or choose another path",
            args.out.display()
        );
    }
    let mut events = Events::open(config, data_dir).await?;
    let operator = Actor::operator(wiring::operator()).to_string();
    let result = async {
        let repo = wiring::open_repository(config, data_dir, &args.repo, &mut events).await?;
        let reason = format!("exported to the key file {}", args.out.display());
        let file = PurposeKeyFile::export(&repo, purpose, &operator, &reason, now_micros()).await?;
        file.write_new(&args.out)?;
        anyhow::Ok(file)
    }
    .await;
    // The unwraps are recorded as key.accessed events (one per exported version).
    events.close().await;
    let file = result?;
    println!(
        "wrote {} (mode 0600): the {purpose} key of repository {}, versions {}, sealing with {}",
        args.out.display(),
        file.repository_id(),
        file.key_infos()
            .iter()
            .map(|k| k.key_id.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        file.sealing_key().key_id
    );
    println!(
        "It seals and opens WAL and nothing else. On the database host, install it readable by PostgreSQL's user only and configure:\n  [wal]\n  key_file = \"/etc/backstop/{}\"\n(no master_key_file on that host). After the {purpose} key is rotated, export it again: until then the host keeps sealing with {}.",
        args.out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "wal.key".into()),
        file.sealing_key().key_id
    );
    Ok(ExitCode::SUCCESS)
}
