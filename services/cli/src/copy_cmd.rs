//! `backstop copy --to DIR|s3://BUCKET/PREFIX`: an offline copy of the repository's backups
//! (backstop_ops::copy), verified object for object, for media taken offline. The copy is a
//! repository: `backstop check --repo DIR --read-data` and `backstop restore --repo DIR` use it
//! with the master key alone.

use std::path::Path;

use anyhow::Context;
use backstop_events::Actor;
use backstop_ops::copy::{self, CopyRequest, Selection};
use backstop_ops::replicate::{Recorder, Replica};
use backstop_ops::schedule::SystemClock;
use backstop_repo::Location;
use clap::Args;
use uuid::Uuid;

use crate::config::Config;
use crate::wiring::{self, Events, RepoArgs, human, operator};

#[derive(Args)]
pub struct CopyArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Where: a directory (an external drive, a tape staging area) or s3://BUCKET/PREFIX (with
    /// the endpoint and credentials of [repository]). Empty, or an earlier copy of this
    /// repository (then only what is missing is copied).
    #[arg(long)]
    pub to: String,
    /// Only these backups (repeat the flag; default: every backup the repository holds).
    #[arg(long = "backup")]
    pub backups: Vec<Uuid>,
    /// Only the newest backup of each source.
    #[arg(long, conflicts_with = "backups")]
    pub newest: bool,
    #[arg(long)]
    pub json: bool,
}

/// The same place, as far as can be told: equal locations, or directories that resolve alike.
fn same_place(a: &Location, b: &Location) -> bool {
    match (a, b) {
        (Location::Local(x), Location::Local(y)) => {
            let resolve = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            resolve(x) == resolve(y)
        }
        _ => a == b,
    }
}

pub async fn run(
    config: &Config,
    data_dir: &Path,
    args: CopyArgs,
) -> anyhow::Result<std::process::ExitCode> {
    // A directory is recorded (events, description) by its absolute path: the media is found
    // again from another working directory.
    let to = match Location::parse(&args.to).context("--to")? {
        Location::Local(p) => Location::Local(std::path::absolute(&p).unwrap_or(p)),
        other => other,
    };
    if same_place(&to, &wiring::location(config, data_dir, &args.repo)?) {
        anyhow::bail!(
            "--to {to} is the repository itself: give another directory or bucket prefix (an offline copy lives apart from the repository)"
        );
    }
    let mut settings = wiring::s3_settings(config);
    // A copy destination is not locked by the primary's object-lock setting: media taken
    // offline, or a bucket of its own with its own rules.
    settings.object_lock = None;
    let backend = to
        .open(Some(settings))
        .await
        .with_context(|| format!("cannot open the copy's destination {to}"))?;
    let dest = Replica {
        name: to.to_string(),
        backend,
    };
    let selection = if args.newest {
        Selection::NewestPerSource
    } else if !args.backups.is_empty() {
        Selection::Backups(args.backups.clone())
    } else {
        Selection::All
    };
    let mut events = Events::open(config, data_dir).await?;
    let primary = wiring::open_repository(config, data_dir, &args.repo, &mut events).await?;
    let rec = Recorder {
        appender: events.appender.as_ref(),
        actor: Actor::operator(operator()),
        cause: None,
    };
    let copy_id = Uuid::now_v7();
    let result = copy::copy_to(
        &rec,
        &primary,
        &dest,
        CopyRequest {
            copy_id,
            selection: &selection,
            to: to.to_string(),
        },
        &SystemClock,
    )
    .await;
    drop(primary);
    events.close().await;
    let outcome = result.with_context(|| format!("copy {copy_id} to {to} failed"))?;
    let d = &outcome.description;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "copy_id": d.copy_id,
                "to": d.to,
                "description": outcome.description_key,
                "backups": d.backups,
                "objects": d.objects.len(),
                "bytes": d.bytes(),
                "copied": outcome.report.copied,
                "copied_bytes": outcome.report.bytes,
                "repaired": outcome.report.repaired,
            }))?
        );
    } else {
        println!(
            "copy {} to {to}: {} backups, {} objects ({}) verified; {} copied ({}){}",
            d.copy_id,
            d.backups.len(),
            d.objects.len(),
            human(d.bytes()),
            outcome.report.copied,
            human(outcome.report.bytes),
            if outcome.report.repaired > 0 {
                format!(
                    ", {} found different and rewritten",
                    outcome.report.repaired
                )
            } else {
                String::new()
            }
        );
        println!(
            "restorable with the master key alone: backstop check --repo {to} --read-data; backstop restore --repo {to} ..."
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}
