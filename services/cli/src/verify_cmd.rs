//! `backstop verify`: what the verify worker does, by hand, recorded with the operator: every
//! object read and checked, or (`--restore`) a real test restore, logical or physical.

use std::path::Path;

use backstop_events::{Actor, BackupMethod, Event, NewEvent, streams, uuid_v7};
use backstop_ledger::ExpectedVersion;
use backstop_ops::catalog::{Selector, resolve_backup};
use backstop_ops::verify::{VerifySettings, test_restore};
use clap::Args;

use crate::config::Config;
use crate::wiring::{Events, RepoArgs, human, open_repository, operator, physical_verify_settings};

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// A backup id, or `latest`.
    pub backup: String,
    /// A real test restore into a scratch database (default: read and check every object).
    #[arg(long)]
    pub restore: bool,
    /// Scratch PostgreSQL for --restore (overrides verify.scratch).
    #[arg(long)]
    pub scratch: Option<String>,
}

/// `backstop verify`: what the verify worker does, by hand, recorded with the operator.
pub async fn verify(
    config: &Config,
    data_dir: &Path,
    args: VerifyArgs,
) -> anyhow::Result<std::process::ExitCode> {
    use backstop_events::{
        TableCheck, VerificationFailed, VerificationPassed, VerificationStarted, VerifyTier,
    };
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events).await?;
    let manifest = resolve_backup(&repo, &args.backup, &Selector::default())
        .await?
        .manifest;
    let backup_id = manifest.backup_id;
    let actor = Actor::operator(operator());
    let stream = streams::backup(backup_id);
    let verification_id = uuid_v7();
    let tier = if args.restore {
        VerifyTier::Restore
    } else {
        VerifyTier::Checksums
    };
    let append = |event: Event| {
        let e = NewEvent::new(&stream, actor.clone(), &event);
        let appender = events.appender.clone();
        let stream = stream.clone();
        async move {
            appender
                .append(&stream, ExpectedVersion::Any, vec![e])
                .await
        }
    };
    append(Event::VerificationStarted(VerificationStarted {
        verification_id,
        backup_id,
        tier: tier.clone(),
    }))
    .await?;
    type Verdict =
        Result<(u64, u64, Option<u64>, Option<f64>, Vec<TableCheck>), (String, Vec<TableCheck>)>;
    let verdict: Verdict = if args.restore {
        let method = backstop_ops::catalog::method_of(&manifest);
        let scratch = args
            .scratch
            .clone()
            .or_else(|| config.verify.scratch.clone());
        if method == BackupMethod::Logical && scratch.is_none() {
            anyhow::bail!(
                "--restore of a logical backup needs a scratch PostgreSQL: pass --scratch URL or set verify.scratch"
            );
        }
        let settings = VerifySettings {
            scratch,
            tolerance_percent: config.verify.tolerance_percent.unwrap_or(1.0),
            max_retries: 0,
            jobs: config.verify.jobs.unwrap_or(2),
            allow_superuser: config.verify.allow_superuser.unwrap_or(false),
            // A physical backup is test-restored as a temporary cluster (no scratch database).
            physical: Some(physical_verify_settings(config, data_dir, &args.repo)),
        };
        match test_restore(&repo, &settings, manifest.clone(), &actor).await {
            Ok(v) => {
                if let Some((restore, checked)) = &v.physical {
                    print_physical(&manifest, restore, checked);
                }
                Ok((
                    v.objects,
                    v.bytes,
                    Some(v.restore_ms),
                    Some(v.bytes_per_sec),
                    v.tables,
                ))
            }
            // Nothing about the backup is known when the environment failed: say so, record
            // nothing against it.
            Err(f) if !f.error.is_data() => {
                drop(repo);
                events.close().await;
                anyhow::bail!(
                    "the test restore could not run ({} failure; the backup is neither passed nor failed): {}",
                    f.error.class().as_str(),
                    f.error.chain()
                );
            }
            Err(f) => Err((f.error.chain(), f.tables)),
        }
    } else {
        let checker = repo.with_access(
            actor.to_string(),
            format!("verification of backup {backup_id}"),
        );
        let report = checker.check_backup(&manifest, Some(100.0)).await?;
        if report.is_ok() {
            Ok((
                report.objects_read,
                report.bytes_read,
                None,
                None,
                Vec::new(),
            ))
        } else {
            let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
            Err((problems.join("; "), Vec::new()))
        }
    };
    let code = match verdict {
        Ok((objects, bytes, restore_ms, speed, tables)) => {
            append(Event::VerificationPassed(VerificationPassed {
                verification_id,
                backup_id,
                tier,
                objects_checked: objects,
                bytes_checked: bytes,
                restore_ms,
                restore_bytes_per_sec: speed,
                tables,
            }))
            .await?;
            println!(
                "backup {backup_id} verified: {objects} objects, {} checked{}",
                human(bytes),
                restore_ms
                    .map(|ms| format!(", test restore in {:.1} s", ms as f64 / 1000.0))
                    .unwrap_or_default()
            );
            std::process::ExitCode::SUCCESS
        }
        Err((reason, tables)) => {
            append(Event::VerificationFailed(VerificationFailed {
                verification_id,
                backup_id,
                tier,
                reason: reason.clone(),
                tables,
            }))
            .await?;
            eprintln!("backup {backup_id} FAILED verification: {reason}");
            std::process::ExitCode::FAILURE
        }
    };
    drop(repo);
    events.close().await;
    Ok(code)
}

/// What a test restore of a physical backup found, for the operator.
fn print_physical(
    manifest: &backstop_repo::Manifest,
    restore: &backstop_sources::pg::physical::PhysicalRestoreReport,
    v: &backstop_sources::pg::physical::PhysicalVerifyReport,
) {
    println!(
        "test restore of physical backup {}: {} files laid out, consistent after {:.1} s of recovery (timeline {}, LSN {}); pg_amcheck: {}; {} rows in {} databases",
        manifest.backup_id,
        restore.files,
        v.recovery_ms as f64 / 1000.0,
        v.timeline,
        v.end_lsn,
        match v.amcheck_ok {
            Some(true) => "no corruption",
            _ => "not run",
        },
        v.total_rows,
        v.databases.len()
    );
    for d in &v.databases {
        for t in &d.tables {
            println!("  {}.{:<40} {:>12} rows", d.database, t.table, t.rows);
        }
    }
}
