//! `backstop ledger ...`: tail, verify, stats, pubkey, append, identity new, restore.
//!
//! These open the ledger directly; while a `backstop serve` holds it, tail and append go through
//! its control socket (`crate::control`), and verify, stats and pubkey say to stop it. `restore`
//! rebuilds a lost ledger from the segments `serve` mirrors into the repository
//! (`backstop_ops::ledger_mirror`), into a data directory that holds no ledger.

use std::path::{Path, PathBuf};

use anyhow::Context;
use backstop_events::{Actor, Envelope, NewEvent, now_micros, uuid_v7};
use backstop_ledger::{Appender, ExpectedVersion, verify};
use clap::Subcommand;

use crate::config::Config;

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Show events, oldest first.
    Tail {
        /// Keep following new events.
        #[arg(long, short)]
        follow: bool,
        /// One JSON envelope per line.
        #[arg(long)]
        json: bool,
        /// First position to show (default: the last 20 events).
        #[arg(long)]
        from: Option<u64>,
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
    },
    /// Walk the whole chain and the signed checkpoints; exit 1 if anything is wrong.
    Verify {
        #[arg(long)]
        json: bool,
        /// The public key the checkpoints must be signed with (hex); default [ledger] public_key.
        #[arg(long)]
        pubkey: Option<String>,
    },
    /// Positions, streams, checkpoints, the publication and mirror cursors and their lags.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Print the public key that verifies this ledger's checkpoints (hex).
    Pubkey,
    /// Rebuild the ledger from the segments mirrored into the repository (after the data
    /// directory was lost): checks the chain and every signature, then writes a new ledger into
    /// --data-dir, which must hold none.
    Restore {
        #[command(flatten)]
        repo: crate::wiring::RepoArgs,
        /// The public key the checkpoints must be signed with (hex); default [ledger] public_key,
        /// else the key the segments name (with a warning).
        #[arg(long)]
        pubkey: Option<String>,
        #[arg(long)]
        json: bool,
        /// Who is restoring, recorded with the key access as operator:NAME.
        #[arg(long, default_value_t = crate::identity::operator())]
        operator: String,
    },
    /// Append identities for workers and database hosts: `ledger identity new NAME`.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Append one event by hand (operators and scripts).
    Append {
        #[arg(long)]
        stream: String,
        /// Event type, e.g. backup.requested.
        #[arg(long = "type")]
        event_type: String,
        /// The payload, a JSON object, or @FILE to read it from a file.
        #[arg(long)]
        payload: String,
        /// Expected stream version (default: any).
        #[arg(long)]
        expected: Option<u64>,
        /// Who is appending, recorded as operator:NAME (default: $BACKSTOP_OPERATOR, $USER, or the uid's login name).
        #[arg(long, default_value_t = crate::identity::operator())]
        operator: String,
    },
}

#[derive(clap::Subcommand)]
pub enum IdentityCommand {
    /// Make a new identity key (mode 0600) and print the config that lists it on the ledger and
    /// the config that uses it on the worker or host.
    New {
        /// Its name, as the ledger lists it and the events' denials name it.
        name: String,
        /// Where to write its private key; never overwritten.
        #[arg(long)]
        key_file: PathBuf,
        /// What it may append: `worker` (what `backstop worker` appends, as worker:*) or
        /// `wal-host` (wal.archived and its key accesses only, as worker:wal-push/wal-fetch).
        #[arg(long, default_value = "worker", value_parser = ["worker", "wal-host"])]
        role: String,
    },
}

/// The event types a `backstop worker` appends (everything but what only operators and the
/// ledger itself record: recovery requests, repository creation, access denials).
const WORKER_EVENT_TYPES: &[&str] = &[
    "backup.requested",
    "backup.started",
    "backup.completed",
    "backup.failed",
    "backup.skipped",
    "backup.deleted",
    "upload.verified",
    "verification.*",
    "retention.decided",
    "key.accessed",
    "key.created",
    "key.rotated",
    "reencryption.*",
    "recovery.started",
    "recovery.completed",
    "recovery.failed",
    "lease.renewed",
    "export.*",
    "replication.*",
    "wal.*",
    "schedule.fired",
    "alert.*",
    "notification.*",
    "health.checked",
    "storage.*",
    "report.generated",
    "drill.*",
    "git.*",
    "worker.dead_lettered",
    "consumer.refused",
];

fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

fn new_identity(name: &str, key_file: &Path, role: &str) -> anyhow::Result<()> {
    let signer = backstop_ledger::identity::AppendSigner::create(name, key_file)?;
    let (types, streams, actors): (&[&str], &[&str], &[&str]) = match role {
        "wal-host" => (
            &["wal.archived", "key.accessed"],
            &["wal-*", "keys-wal"],
            &["worker:wal-push", "worker:wal-fetch"],
        ),
        _ => (WORKER_EVENT_TYPES, &["*"], &["worker:*", "system"]),
    };
    println!(
        "# Identity {name}: its key is in {} (mode 0600; copy it to the {role} only).",
        key_file.display()
    );
    println!("# On the ledger (the serve's config), then restart serve:");
    println!("[[ledger.identities]]");
    println!("name = {name:?}");
    println!("public_key = \"{}\"", signer.public_key_hex());
    println!("event_types = {}", toml_list(types));
    println!("streams = {}", toml_list(streams));
    println!("actors = {}", toml_list(actors));
    println!();
    println!("# On the {role}, in [nats]:");
    println!("identity = {name:?}");
    println!("identity_key_file = {:?}", key_file.display().to_string());
    Ok(())
}

pub async fn run(
    config: &Config,
    data_dir: &Path,
    cmd: LedgerCommand,
) -> anyhow::Result<std::process::ExitCode> {
    if let LedgerCommand::Identity(IdentityCommand::New {
        name,
        key_file,
        role,
    }) = &cmd
    {
        new_identity(name, key_file, role)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if let LedgerCommand::Restore {
        repo,
        pubkey,
        json,
        operator,
    } = cmd
    {
        return restore(config, data_dir, &repo, pubkey, json, &operator).await;
    }
    let ledger_config = config.ledger_config(data_dir);
    if !ledger_config.path.join("db").exists() && !matches!(cmd, LedgerCommand::Append { .. }) {
        anyhow::bail!(
            "no ledger in {}: run `backstop serve` first, or pass --data-dir",
            ledger_config.path.display()
        );
    }
    let ledger = crate::control::open_ledger(&ledger_config, data_dir).await?;
    let code = match cmd {
        LedgerCommand::Tail {
            follow,
            json,
            from,
            stream,
        } => {
            tail(&ledger, follow, json, from, stream.as_deref()).await?;
            std::process::ExitCode::SUCCESS
        }
        LedgerCommand::Verify { json, pubkey } => {
            let opened = ledger.opened("verify")?;
            // A pinned key catches a signing key replaced along with re-signed checkpoints;
            // without one the ledger can only be checked against its own key.
            let pinned = pubkey.or_else(|| config.ledger.public_key.clone());
            let key = pinned.as_deref().unwrap_or(opened.public_key());
            if pinned.is_none() && !json {
                eprintln!(
                    "note: checked against the ledger's own signing key; pin it ([ledger] public_key, or --pubkey) so that a replaced key is caught"
                );
            }
            let report = verify::verify(opened.store(), key)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if report.ok() {
                println!(
                    "ledger intact: {} events, {} streams, {} signed checkpoints (last at {})",
                    report.events,
                    report.streams,
                    report.checkpoints,
                    report
                        .last_checkpoint
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "none".into())
                );
            } else {
                for p in &report.problems {
                    println!("position {}: {}", p.position, p.what);
                }
                if let Some(p) = report.first_problem() {
                    eprintln!(
                        "ledger damaged: first bad position {} ({} problems)",
                        p.position,
                        report.problems.len()
                    );
                }
            }
            if report.ok() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        LedgerCommand::Stats { json } => {
            let s = ledger.opened("stats")?.stats()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("head position       {}", s.head_position);
                println!("head hash           {}", s.head_hash);
                println!("streams             {}", s.streams);
                println!(
                    "checkpoints         {} (last at {})",
                    s.checkpoints,
                    s.last_checkpoint
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "none".into())
                );
                println!(
                    "publication cursor  {} (next position to publish)",
                    s.publication_cursor
                );
                println!("publication lag     {} events", s.publication_lag);
                println!(
                    "mirror cursor       {} (next position to mirror into the repository; lag {} events)",
                    s.mirror_cursor, s.mirror_lag
                );
                for (name, next) in &s.consumers {
                    println!(
                        "consumer {name:<12} next {next} (lag {})",
                        (s.head_position + 1).saturating_sub(*next)
                    );
                }
                println!("public key          {}", s.public_key);
            }
            std::process::ExitCode::SUCCESS
        }
        LedgerCommand::Pubkey => {
            println!("{}", ledger.opened("pubkey")?.public_key());
            std::process::ExitCode::SUCCESS
        }
        // Answered above, before the ledger is opened: they need none.
        LedgerCommand::Identity(_) | LedgerCommand::Restore { .. } => {
            std::process::ExitCode::SUCCESS
        }
        LedgerCommand::Append {
            stream,
            event_type,
            payload,
            expected,
            operator,
        } => {
            let payload = match payload.strip_prefix('@') {
                Some(file) => std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read the payload file {file}"))?,
                None => payload,
            };
            let payload: serde_json::Value =
                serde_json::from_str(&payload).context("--payload is not valid JSON")?;
            let id = uuid_v7();
            let schema_version = backstop_events::current_version(&event_type).unwrap_or(1);
            let e = NewEvent {
                id,
                stream: stream.clone(),
                event_type,
                schema_version,
                occurred_at: now_micros(),
                actor: Actor::operator(operator),
                correlation_id: id,
                causation_id: None,
                payload,
            };
            let expected = expected
                .map(ExpectedVersion::Exact)
                .unwrap_or(ExpectedVersion::Any);
            let appended = ledger.appender().append(&stream, expected, vec![e]).await?;
            println!(
                "appended at position {} (stream {stream} version {})",
                appended.last_position(),
                appended.stream_version
            );
            std::process::ExitCode::SUCCESS
        }
    };
    ledger.close().await;
    Ok(code)
}

/// `backstop ledger restore` (module docs; docs/RUNBOOK.md, "The ledger's machine is lost, or its files are damaged").
async fn restore(
    config: &Config,
    data_dir: &Path,
    repo_args: &crate::wiring::RepoArgs,
    pubkey: Option<String>,
    json: bool,
    operator: &str,
) -> anyhow::Result<std::process::ExitCode> {
    use backstop_ops::ledger_mirror;
    let ledger_config = config.ledger_config(data_dir);
    ledger_mirror::check_target(&ledger_config.path)?;
    // The restored ledger goes on signing with the key that signed it: check it is here before
    // downloading anything (and never make a new one, as opening a ledger would).
    let key_path = &ledger_config.signing_key;
    if !key_path.exists() {
        anyhow::bail!(
            "the ledger's signing key is not at {}: copy the key file that signed the lost ledger there (mode 0600; it is kept outside the data directory, e.g. with the master key's copy), then run the restore again; nothing was restored",
            key_path.display()
        );
    }
    let signer = backstop_ledger::CheckpointSigner::load_or_create(key_path)?;
    let pinned = pubkey.or_else(|| config.ledger.public_key.clone());
    let master = crate::wiring::master_key(config, repo_args)?;
    let loc = crate::wiring::location(config, data_dir, repo_args)?;
    let backend = loc
        .open(Some(crate::wiring::s3_settings(config)))
        .await
        .with_context(|| format!("cannot reach the repository {loc}"))?;
    let (tx, mut accesses) = tokio::sync::mpsc::unbounded_channel::<backstop_repo::KeyAccess>();
    let repo = backstop_repo::Repository::open(backend, &master, std::sync::Arc::new(tx))
        .await?
        .with_access(
            Actor::operator(operator).to_string(),
            "restoring the ledger from its mirror (ledger restore)",
        );
    let staged = ledger_mirror::restore(&repo, &ledger_config.path, pinned.as_deref()).await?;
    if !staged
        .report
        .public_key
        .eq_ignore_ascii_case(&signer.public_key_hex())
    {
        anyhow::bail!(
            "the signing key at {} (public key {}) is not the one that signed the mirrored ledger ({}): copy that key file there and run the restore again; nothing was restored",
            key_path.display(),
            signer.public_key_hex(),
            staged.report.public_key
        );
    }
    let report = staged.commit()?;
    drop(repo);
    // The restore's unwrap of the ledger key, recorded in the ledger it rebuilt.
    let ledger = backstop_ledger::Ledger::open(&ledger_config)?;
    let mut recorded = 0u64;
    while let Ok(access) = accesses.try_recv() {
        let e = backstop_ops::keys::key_access_event(&access);
        let stream = e.stream.clone();
        ledger
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await?;
        recorded += 1;
    }
    let head = ledger.head().position;
    ledger.close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if !report.pinned {
        eprintln!(
            "warning: the signatures were checked against the key the segments name ({}); pin it ([ledger] public_key, or --pubkey) so that segments re-signed with another key are caught",
            report.public_key
        );
    }
    println!(
        "ledger restored from {} segments of {loc}: every event up to position {} (hash {}), chain verified",
        report.segments, report.last_position, report.last_hash
    );
    match report.last_checkpoint {
        Some(c) => println!(
            "signed checkpoints verified: {}, the last at position {c}; every segment's signature verified",
            report.checkpoints
        ),
        None => println!("no checkpoint in the segments; every segment's signature verified"),
    }
    if recorded > 0 {
        println!("the restore's key access recorded at position {head}");
    }
    println!(
        "anything committed after the last mirrored segment was lost with the machine; start `backstop serve` to go on from position {}",
        head + 1
    );
    Ok(std::process::ExitCode::SUCCESS)
}

async fn tail(
    ledger: &crate::control::LedgerAccess,
    follow: bool,
    json: bool,
    from: Option<u64>,
    stream: Option<&str>,
) -> anyhow::Result<()> {
    let head = ledger.head().await?;
    let from = from.unwrap_or_else(|| head.saturating_sub(19).max(1));
    let print = |e: &Envelope| -> anyhow::Result<()> {
        if stream.is_some_and(|s| s != e.stream) {
            return Ok(());
        }
        if json {
            println!("{}", serde_json::to_string(e)?);
        } else {
            println!(
                "{:>8}  {}  {:<28} {:<26} {:<18} {}",
                e.position,
                e.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
                format!("{}@{}", e.stream, e.version),
                e.event_type,
                e.actor.to_string(),
                summary(&e.payload)
            );
        }
        Ok(())
    };
    if !follow && from > head {
        return Ok(());
    }
    // Without --follow, the events up to the head as it was when the command started.
    let mut events = ledger.follow(from).await?;
    let mut shutdown = crate::runtime::shutdown_signal();
    loop {
        let batch = tokio::select! {
            b = events.next_batch() => b?,
            _ = shutdown.changed() => return Ok(()),
        };
        if batch.is_empty() {
            return Ok(());
        }
        for e in &batch {
            if !follow && e.position > head {
                return Ok(());
            }
            print(e)?;
        }
        if !follow && batch.last().is_some_and(|e| e.position >= head) {
            return Ok(());
        }
    }
}

/// A one-line summary of a payload: its scalar fields, shortened.
fn summary(payload: &serde_json::Value) -> String {
    let Some(map) = payload.as_object() else {
        return String::new();
    };
    let mut parts = Vec::new();
    for (k, v) in map {
        let s = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => continue,
        };
        let s: String = s.chars().take(40).collect();
        parts.push(format!("{k}={s}"));
    }
    let line = parts.join(" ");
    line.chars().take(160).collect()
}
