//! `backstop config import|show`: configuration backups (`kind = "config"` sources) written
//! back to a file, or listed by name and keyed hash (never by value); see
//! backstop_ops::config_backup.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::bail;
use backstop_events::{BackupMethod, RecoveryScope};
use backstop_ops::DataPath;
use backstop_ops::catalog::{self, Selector};
use backstop_ops::config_backup::{self, ImportFormat};
use backstop_ops::restore::Recovery;
use clap::{Subcommand, ValueEnum};

use crate::config::Config;
use crate::wiring::{Events, RepoArgs, open_repository, operator};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// The env file exactly as backed up (then variables read from the environment).
    Env,
    /// One JSON object: env, json_files, postgres_settings.
    Json,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Write a configuration backup to a new file (mode 0600): the env file exactly, all of it
    /// as JSON, or one JSON settings file exactly (--file).
    Import {
        #[command(flatten)]
        repo: RepoArgs,
        /// A backup id, or `latest` (the newest configuration backup of --source).
        id: String,
        #[arg(long)]
        source: Option<String>,
        /// The file to write; it must not exist.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "env", conflicts_with = "file")]
        format: Format,
        /// One of the backup's JSON settings files, by its path, written exactly.
        #[arg(long)]
        file: Option<String>,
    },
    /// List what a configuration backup holds: each item's kind, name and keyed hash (values
    /// are never shown).
    Show {
        #[command(flatten)]
        repo: RepoArgs,
        /// A backup id, or `latest` (with --source).
        id: String,
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: &Config, data_dir: &Path, cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    let (repo_args, id, source) = match &cmd {
        ConfigCommand::Import {
            repo, id, source, ..
        }
        | ConfigCommand::Show {
            repo, id, source, ..
        } => (repo, id.clone(), source.clone()),
    };
    if id == "latest" && source.is_none() {
        bail!("`latest` needs --source NAME (the configuration source)");
    }
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, repo_args, &mut events).await?;
    let resolved = catalog::resolve_backup(
        &repo,
        &id,
        &Selector {
            source: source.as_deref(),
            method: Some(BackupMethod::Config),
            // An import checks the document against its keyed hash; the newest configuration
            // is the one to bring back whether or not a verification has run on it yet.
            verified: None,
        },
    )
    .await;
    let manifest = match resolved {
        Ok(r) => r.manifest,
        Err(e) => {
            // The repository reports key accesses through the events: gone before they close.
            drop(repo);
            events.close().await;
            return Err(e.into());
        }
    };
    if catalog::method_of(&manifest) != BackupMethod::Config {
        drop(repo);
        events.close().await;
        bail!(
            "backup {} is a {} backup, not a configuration backup",
            manifest.backup_id,
            catalog::method_of(&manifest)
        );
    }
    let dp = DataPath {
        repo,
        appender: events.appender.clone(),
        sources: Vec::new(),
    };
    let result = match cmd {
        ConfigCommand::Show { json, .. } => show(&manifest, json),
        ConfigCommand::Import {
            out, format, file, ..
        } => {
            let format = match (file, format) {
                (Some(path), _) => ImportFormat::File(path),
                (None, Format::Env) => ImportFormat::Env,
                (None, Format::Json) => ImportFormat::Json,
            };
            let recovery = Recovery::new(
                &operator(),
                RecoveryScope {
                    target: out.display().to_string(),
                    tables: Vec::new(),
                    point_in_time: None,
                    dry_run: false,
                },
            );
            match config_backup::import(&dp, &manifest, &recovery, &format, &out).await {
                Ok(bytes) => {
                    println!(
                        "imported configuration backup {} of `{}` into {} ({bytes} bytes, mode 0600; checked against its keyed hash)",
                        manifest.backup_id,
                        manifest.source,
                        out.display()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
    };
    drop(dp);
    events.close().await;
    result
}

fn show(manifest: &backstop_repo::Manifest, json: bool) -> anyhow::Result<ExitCode> {
    let report = catalog::config_report(manifest)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "configuration backup {} of `{}` taken {}: {} items, keyed hash {} (key {})",
        manifest.backup_id,
        manifest.source,
        manifest.finished_at.format("%Y-%m-%d %H:%M:%S UTC"),
        report.items.len(),
        report.hash,
        report.hash_key_id
    );
    for i in &report.items {
        let kind = serde_json::to_value(i.kind)?;
        println!(
            "  {:<17} {:<40} {}",
            kind.as_str().unwrap_or("-"),
            i.name,
            &i.hash[..16.min(i.hash.len())]
        );
    }
    Ok(ExitCode::SUCCESS)
}
