//! `backstop key rotate`, `key reencrypt` and `key retire`: rotation with re-encryption
//! (`backstop_ops::rotation`, `backstop_repo::reencrypt`).
//!
//! - `key rotate [--purpose P]... [--no-reencrypt]`: a new version of each purpose's key
//!   (default: database and files, the keys backups are sealed with), recorded as
//!   `key.rotated`; then the re-encryption job re-seals every backup with it.
//! - `key reencrypt [--status]`: runs the job to its end, resuming the unfinished one from its
//!   checkpoint (after a crash or `kill -9`); `--status` prints the unfinished job's state and
//!   exits 0 (none) or 3 (one is unfinished).
//! - `key retire [--hold DURATION]`: retires the versions nothing is sealed with; with
//!   `[repository] object_lock` the hold defaults to that period (a version is retired only that
//!   long after a scan first found it unused, when every lock on what it sealed has ended).

use std::path::Path;
use std::process::ExitCode;

use backstop_events::{Actor, now_micros};
use backstop_ops::rotation::{SCHEDULED_PURPOSES, reencrypt, retire, rotate};
use backstop_ops::schedule::ConfigDuration;
use backstop_repo::{KeyPurpose, ReencryptOptions, RetireOptions};
use clap::Args;

use crate::config::Config;
use crate::wiring::{self, Events, RepoArgs};

#[derive(Args)]
pub struct KeyRotateArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// A purpose to rotate (repeatable; default: database and files).
    #[arg(long = "purpose")]
    pub purposes: Vec<String>,
    /// Only make the new versions; re-seal later with `backstop key reencrypt`.
    #[arg(long)]
    pub no_reencrypt: bool,
}

#[derive(Args)]
pub struct KeyReencryptArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Print the unfinished job's state instead of running it.
    #[arg(long)]
    pub status: bool,
}

#[derive(Args)]
pub struct KeyRetireArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// How long a version must have been unused before it is retired (e.g. "30d"; default:
    /// `[repository] object_lock`, else 0).
    #[arg(long)]
    pub hold: Option<ConfigDuration>,
}

fn operator() -> Actor {
    Actor::operator(wiring::operator())
}

pub async fn rotate_cmd(
    config: &Config,
    data_dir: &Path,
    args: KeyRotateArgs,
) -> anyhow::Result<ExitCode> {
    let purposes: Vec<KeyPurpose> = if args.purposes.is_empty() {
        SCHEDULED_PURPOSES.to_vec()
    } else {
        args.purposes
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, _>>()?
    };
    let mut events = Events::open(config, data_dir).await?;
    let result = async {
        let repo = wiring::open_repository(config, data_dir, &args.repo, &mut events).await?;
        let now = now_micros();
        for r in rotate(&repo, events.appender.as_ref(), &purposes, &operator(), now).await? {
            println!(
                "{}: {} -> {} (version {})",
                r.purpose, r.old.key_id, r.new.key_id, r.new.version
            );
        }
        if args.no_reencrypt {
            println!("not re-sealed yet: run `backstop key reencrypt`");
            return anyhow::Ok(());
        }
        run_job(&repo, &events, now).await
    }
    .await;
    events.close().await;
    result.map(|()| ExitCode::SUCCESS)
}

async fn run_job(
    repo: &backstop_repo::Repository,
    events: &Events,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    let opts = ReencryptOptions::new(backstop_events::uuid_v7(), now);
    let r = reencrypt(repo, events.appender.clone(), &operator(), &opts).await?;
    println!(
        "re-encryption {}: {} backups, {} re-sealed ({} chunks, {}), {} already on the new keys",
        r.job_id,
        r.backups_total,
        r.backups_reencrypted,
        r.chunks_resealed,
        wiring::human(r.bytes_resealed),
        r.backups_current
    );
    for (b, why) in &r.skipped {
        eprintln!("NOT RE-SEALED {b}: {why}");
    }
    if !r.skipped.is_empty() {
        anyhow::bail!(
            "{} backups could not be re-sealed (their data is damaged; `backstop check` tells more); the old key versions stay",
            r.skipped.len()
        );
    }
    println!(
        "the originals go with the next prunes (after their grace); then `backstop key retire`"
    );
    Ok(())
}

pub async fn reencrypt_cmd(
    config: &Config,
    data_dir: &Path,
    args: KeyReencryptArgs,
) -> anyhow::Result<ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let result = async {
        let repo = wiring::open_repository(config, data_dir, &args.repo, &mut events).await?;
        if args.status {
            return match repo.reencryption_state().await? {
                None => {
                    println!("no unfinished re-encryption");
                    anyhow::Ok(ExitCode::SUCCESS)
                }
                Some(st) => {
                    println!(
                        "re-encryption {} started {}: {}/{} backups done, {} chunks ({}) re-sealed, targets {}",
                        st.job_id,
                        st.started_at.format("%Y-%m-%dT%H:%M:%SZ"),
                        st.done.len(),
                        st.backups_total,
                        st.chunks_resealed,
                        wiring::human(st.bytes_resealed),
                        st.targets.values().cloned().collect::<Vec<_>>().join(", ")
                    );
                    Ok(ExitCode::from(3))
                }
            };
        }
        run_job(&repo, &events, now_micros()).await?;
        Ok(ExitCode::SUCCESS)
    }
    .await;
    events.close().await;
    result
}

pub async fn retire_cmd(
    config: &Config,
    data_dir: &Path,
    args: KeyRetireArgs,
) -> anyhow::Result<ExitCode> {
    let hold = args
        .hold
        .or(config.repository.object_lock)
        .map(|d| chrono::Duration::seconds(d.as_secs() as i64))
        .unwrap_or_else(chrono::Duration::zero);
    let mut events = Events::open(config, data_dir).await?;
    let result = async {
        let repo = wiring::open_repository(config, data_dir, &args.repo, &mut events).await?;
        let opts = RetireOptions {
            now: now_micros(),
            hold,
        };
        let r = retire(&repo, events.appender.as_ref(), &operator(), &opts).await?;
        for k in &r.retired {
            println!("retired {} (nothing is sealed with it)", k.key_id);
        }
        for (k, until) in &r.waiting {
            println!(
                "{} is unused; retired at the first run after {} (object-lock hold)",
                k.key_id,
                until.format("%Y-%m-%dT%H:%M:%SZ")
            );
        }
        for (k, n) in &r.in_use {
            println!("{} still seals {n} objects", k.key_id);
        }
        anyhow::Ok(ExitCode::SUCCESS)
    }
    .await;
    events.close().await;
    result
}
