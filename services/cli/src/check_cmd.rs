//! `backstop check`: the repository's consistency; with `--read-data`, every object read back.
//! On an offline copy (`backstop copy`), also every object its description lists.

use std::path::Path;

use crate::config::Config;
use crate::wiring::{Events, RepoArgs, human, open_repository};

pub async fn check(
    config: &Config,
    data_dir: &Path,
    args: RepoArgs,
    read_data: bool,
    subset: Option<f64>,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args, &mut events).await?;
    let percent = read_data.then(|| subset.unwrap_or(100.0));
    let mut report = repo.check(percent).await?;
    // An offline copy (`backstop copy`) is also checked against its description: the WAL and
    // ledger segments it lists, which no manifest references.
    let copy = backstop_ops::copy::check_copy(&repo, read_data).await?;
    if let Some(c) = &copy {
        report.objects_read += c.objects_read;
        report.bytes_read += c.bytes_read;
        report.problems.extend(c.problems.iter().cloned());
    }
    if json {
        let mut v = serde_json::to_value(&report)?;
        if let (Some(c), Some(o)) = (&copy, v.as_object_mut()) {
            o.insert("copy".into(), serde_json::to_value(c)?);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for p in &report.problems {
            println!("{p}");
        }
        if let Some(c) = &copy {
            println!(
                "offline copy {} of {} made {}: {} backups, {} objects listed{}",
                c.copy_id,
                c.from,
                c.completed_at.format("%Y-%m-%d %H:%M:%S UTC"),
                c.backups,
                c.objects,
                if read_data {
                    ", every one checked against its SHA3-256"
                } else {
                    " (presence and size checked; --read-data compares SHA3-256)"
                }
            );
        }
        if report.is_ok() {
            println!(
                "repository consistent: {} manifests, {} chunks referenced, {} objects read ({}), {} unreferenced chunks ({}) in {:.1} s",
                report.manifests,
                report.chunks_referenced,
                report.objects_read,
                human(report.bytes_read),
                report.unreferenced_chunks,
                human(report.unreferenced_bytes),
                report.duration_ms as f64 / 1000.0
            );
        } else {
            eprintln!("repository has {} problems", report.problems.len());
        }
    }
    drop(repo);
    events.close().await;
    Ok(if report.is_ok() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
