//! `backstop notify test`: one test message to every channel in `[notify]`, whatever its
//! routing, each attempt recorded as `notification.sent` or `notification.failed` (in the local
//! ledger, or through the running `serve`: see `wiring::Events`). Prints one line per channel;
//! exits non-zero if any channel failed.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use backstop_events::Actor;
use backstop_ops::notify::{Notifier, Outcome};
use clap::Subcommand;

use crate::config::Config;
use crate::wiring::{Events, operator};

#[derive(Subcommand)]
pub enum NotifyCommand {
    /// Send a test message to every configured channel.
    Test {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: &Config, data_dir: &Path, cmd: NotifyCommand) -> anyhow::Result<ExitCode> {
    let NotifyCommand::Test { json } = cmd;
    let notify = config
        .notify
        .clone()
        .filter(|n| !n.channels.is_empty())
        .context("no channels: add [[notify.channels]] to the configuration (see README.md)")?;
    let notifier = Notifier::new(notify).map_err(|e| anyhow::anyhow!("[notify]: {e}"))?;
    let events = Events::open(config, data_dir).await?;
    let actor = Actor::operator(operator());
    let results = notifier.test_all(&actor, events.appender.as_ref()).await;
    events.close().await;
    let mut failed = false;
    let mut rows = Vec::new();
    for (channel, r) in results {
        let (ok, detail) = match r {
            Ok(Outcome::Sent { attempt }) => (true, format!("ok (attempt {attempt})")),
            Ok(Outcome::AlreadySent) => (true, "ok".to_string()),
            Ok(Outcome::Failed {
                attempts, reason, ..
            }) => (
                false,
                format!("FAILED after {attempts} attempt(s): {reason}"),
            ),
            Err(e) => (false, format!("sent state unknown: cannot record it: {e}")),
        };
        failed |= !ok;
        rows.push((channel, ok, detail));
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(c, ok, d)| serde_json::json!({"channel": c, "ok": ok, "detail": d}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (c, _, d) in &rows {
            println!("{c}: {d}");
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
