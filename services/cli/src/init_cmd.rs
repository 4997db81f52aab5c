//! `backstop init`: a new, self-describing repository (and, on request, a new master key).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use backstop_events::{Actor, Event, KeyCreated, NewEvent, RepositoryInitialized, streams};
use backstop_ledger::ExpectedVersion;
use backstop_repo::{KeyAccess, MasterKey, RepoParams, Repository};
use tokio::sync::mpsc::unbounded_channel;

use crate::config::Config;
use crate::wiring::{Events, RepoArgs, location, master_key, operator, s3_settings};

pub async fn init(
    config: &Config,
    data_dir: &Path,
    args: RepoArgs,
    generate_key: Option<PathBuf>,
    chunk_avg_kib: Option<usize>,
) -> anyhow::Result<std::process::ExitCode> {
    let chunk_avg_kib = chunk_avg_kib.or(config.repository.chunk_avg_kib);
    // Everything that can be refused is checked before a new master key is written, so that a
    // refused init leaves no key file behind that belongs to no repository.
    let mut params = RepoParams::default();
    if let Some(q) = config.repository.brotli_quality {
        params.compression.quality = q;
    }
    if let Some(kib) = chunk_avg_kib {
        if !kib.is_power_of_two() || !(64..=16384).contains(&kib) {
            bail!(
                "the average chunk size must be a power of two between 64 and 16384 KiB, got {kib}"
            );
        }
        let avg = (kib * 1024) as u32;
        params.chunker = backstop_repo::ChunkerParams {
            min_size: avg / 4,
            avg_size: avg,
            max_size: avg * 4,
        };
    }
    let loc = location(config, data_dir, &args)?;
    let backend = loc.open(Some(s3_settings(config))).await?;
    if let Some(path) = &generate_key
        && path.exists()
    {
        bail!(
            "{} exists; refusing to overwrite a master key",
            path.display()
        );
    }
    let master = match &generate_key {
        Some(path) => {
            let key = MasterKey::generate();
            write_secret(path, key.to_base64().as_str())?;
            eprintln!(
                "A new master key is in {} (mode 0600). Keep a copy OFF this machine: without it no backup can be restored.",
                path.display()
            );
            key
        }
        None => master_key(config, &args)?,
    };
    let mut events = Events::open(config, data_dir).await?;
    let (tx, rx) = unbounded_channel::<KeyAccess>();
    let repo = match Repository::init(backend, &master, params, Arc::new(tx)).await {
        Ok(repo) => repo,
        Err(e) => {
            // The key was made for this repository only: a refused init takes it back.
            if let Some(path) = &generate_key {
                let _ = std::fs::remove_file(path);
                eprintln!(
                    "(the new master key {} was removed: no repository uses it)",
                    path.display()
                );
            }
            return Err(e.into());
        }
    };
    events.key_recorder = Some(tokio::spawn(backstop_ops::keys::record_key_accesses(
        rx,
        events.appender.clone(),
    )));
    let actor = Actor::operator(operator());
    let stream = streams::repository();
    let e = NewEvent::new(
        &stream,
        actor.clone(),
        &Event::RepositoryInitialized(RepositoryInitialized {
            repository_id: repo.id(),
            location: loc.to_string(),
            format_version: repo.config().format_version,
        }),
    );
    events
        .appender
        .append(&stream, ExpectedVersion::Any, vec![e])
        .await?;
    for key in repo.keys() {
        let stream = streams::keys(key.purpose.as_str());
        let e = NewEvent::new(
            &stream,
            actor.clone(),
            &Event::KeyCreated(KeyCreated {
                purpose: key.purpose.as_str().to_string(),
                key_id: key.key_id.clone(),
                version: key.version,
            }),
        );
        events
            .appender
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await?;
    }
    println!("initialized repository {} at {loc}", repo.id());
    drop(repo);
    events.close().await;
    Ok(std::process::ExitCode::SUCCESS)
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}
