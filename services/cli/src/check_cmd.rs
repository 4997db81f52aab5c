//! `backstop check`: the repository's consistency; with `--read-data`, every object read back.

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
    let report = repo.check(percent).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            println!("{p}");
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
