//! `backstop list` and `backstop show`: the backups in the repository, with their verification.

use std::path::Path;

use backstop_events::streams;
use backstop_ledger::Ledger;

use crate::config::Config;
use crate::wiring::{Events, RepoArgs, human, open_repository};

/// Verification state of a backup from its ledger stream, when the ledger is readable here.
fn verification_state(ledger: Option<&Ledger>, backup_id: uuid::Uuid) -> String {
    let Some(ledger) = ledger else {
        return "unknown (ledger busy)".into();
    };
    let Ok(events) = ledger.read_stream(&streams::backup(backup_id), 1) else {
        return "unknown".into();
    };
    let mut state = "not verified".to_string();
    for e in events {
        match e.event_type.as_str() {
            "verification.passed" => {
                state = format!("verified {}", e.recorded_at.format("%Y-%m-%d %H:%M"))
            }
            "verification.failed" => {
                state = format!(
                    "FAILED verification {}",
                    e.recorded_at.format("%Y-%m-%d %H:%M")
                )
            }
            _ => {}
        }
    }
    state
}

pub async fn list(
    config: &Config,
    data_dir: &Path,
    args: RepoArgs,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args, &mut events).await?;
    let mut rows = Vec::new();
    for listed in repo.list_backups().await? {
        match listed.manifest {
            Ok(m) => rows.push(Ok(m)),
            Err(e) => rows.push(Err((listed.backup_id, e.to_string()))),
        }
    }
    rows.sort_by_key(|r| match r {
        Ok(m) => m.finished_at,
        Err(_) => chrono::DateTime::<chrono::Utc>::MIN_UTC,
    });
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| match r {
                Ok(m) => serde_json::json!({
                    "backup_id": m.backup_id, "source": m.source, "kind": m.kind, "parent": m.parent,
                    "finished_at": m.finished_at, "totals": m.totals,
                    "verification": verification_state(events.ledger.as_ref(), m.backup_id),
                }),
                Err((id, e)) => serde_json::json!({"backup_id": id, "error": e}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<36}  {:<10} {:<12} {:<19} {:>10} {:>10} {:>10} {:>8}  verification",
            "backup", "source", "kind", "finished (UTC)", "raw", "stored", "new", "secs",
        );
        for r in &rows {
            match r {
                Ok(m) => println!(
                    "{:<36}  {:<10} {:<12} {:<19} {:>10} {:>10} {:>10} {:>8.1}  {}",
                    m.backup_id,
                    m.source,
                    m.kind.as_str(),
                    m.finished_at.format("%Y-%m-%d %H:%M:%S"),
                    human(m.totals.raw_bytes),
                    human(m.totals.stored_bytes),
                    human(m.totals.new_bytes),
                    m.duration().num_milliseconds() as f64 / 1000.0,
                    verification_state(events.ledger.as_ref(), m.backup_id)
                ),
                Err((id, e)) => println!("{id:<36}  UNREADABLE: {e}"),
            }
        }
    }
    drop(repo);
    events.close().await;
    Ok(std::process::ExitCode::SUCCESS)
}

pub async fn show(
    config: &Config,
    data_dir: &Path,
    args: RepoArgs,
    which: String,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args, &mut events).await?;
    let m = backstop_ops::catalog::resolve_backup(
        &repo,
        &which,
        &backstop_ops::catalog::Selector::default(),
    )
    .await?
    .manifest;
    let report = backstop_ops::catalog::dump_report(&m).ok();
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!("backup        {}", m.backup_id);
        println!("source        {}", m.source);
        println!("kind          {}", m.kind);
        println!(
            "parent        {}",
            m.parent
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into())
        );
        println!("started       {}", m.started_at);
        println!("finished      {}", m.finished_at);
        println!(
            "duration      {:.1} s",
            m.duration().num_milliseconds() as f64 / 1000.0
        );
        println!("raw           {}", human(m.totals.raw_bytes));
        println!("stored        {}", human(m.totals.stored_bytes));
        println!("new           {}", human(m.totals.new_bytes));
        println!(
            "verification  {}",
            verification_state(events.ledger.as_ref(), m.backup_id)
        );
        println!("method        {}", backstop_ops::catalog::method_of(&m));
        if let Ok(r) = backstop_ops::catalog::command_report(&m) {
            println!("command       {}", r.backup_command);
            println!(
                "stream        {} ({}), SHA3-256 {}",
                r.part,
                human(r.bytes),
                r.sha3
            );
            println!(
                "restore with  {}",
                r.restore_command
                    .as_deref()
                    .unwrap_or("- (restore --out FILE)")
            );
        }
        if let Ok(r) = backstop_ops::catalog::redis_report(&m) {
            println!(
                "redis         {} (Redis {}), RDB {}, SHA3-256 {}",
                r.server,
                r.redis_version,
                human(r.bytes),
                r.sha3
            );
            for d in &r.keyspace {
                println!("  db{:<37} {:>12} keys", d.db, d.keys);
            }
        }
        if let Some(r) = report {
            println!(
                "database      {} (PostgreSQL {})",
                r.database, r.server_version
            );
            println!("tables (row counts in the backup's snapshot):");
            for t in r.tables.iter().filter(|t| t.part.is_some()) {
                println!(
                    "  {:<40} {:>12} rows  {:>10}",
                    t.table.to_string(),
                    t.rows,
                    human(t.bytes)
                );
            }
        }
        if let Ok(tree) = backstop_ops::catalog::files_report(&m) {
            println!(
                "files         {} files, {} (roots: {})",
                tree.files,
                human(tree.bytes),
                tree.roots.join(", ")
            );
            for e in &tree.entries {
                use backstop_sources::files::EntryKind;
                let what = match e.kind {
                    EntryKind::Dir => "dir ".to_string(),
                    EntryKind::File => format!("{:>10}", human(e.size)),
                    EntryKind::Symlink => "link".to_string(),
                };
                let arrow = e
                    .target
                    .as_deref()
                    .map(|t| format!(" -> {t}"))
                    .unwrap_or_default();
                println!("  {:04o} {what:>10}  {}{arrow}", e.mode, e.path);
            }
        }
    }
    drop(repo);
    events.close().await;
    Ok(std::process::ExitCode::SUCCESS)
}
