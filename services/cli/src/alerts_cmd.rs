//! `backstop alerts`: the open alerts, and an operator's resolution of one.
//!
//! Both read the ledger from the start (this process's own, or the running serve's through its
//! control socket: `wiring::each_event`) and fold it as the alert monitor does
//! (`backstop_ops::alerting::Facts`), so the list is exactly what the monitor considers open.

use std::path::Path;

use anyhow::Context;
use backstop_events::{Actor, AlertResolved, Event, NewEvent, streams};
use backstop_ledger::ExpectedVersion;
use backstop_ops::alerting::Facts;
use clap::Subcommand;

use crate::config::Config;
use crate::wiring::{Events, each_event};

#[derive(Subcommand)]
pub enum AlertsCommand {
    /// The open alerts, critical first, oldest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Close an open alert by its key (for conditions only a person can clear, such as a
    /// dead-lettered event); the monitor raises it again if its condition still holds.
    Resolve {
        key: String,
        /// Why it is resolved, recorded in the event.
        #[arg(long, default_value = "resolved by an operator")]
        reason: String,
    },
}

pub async fn run(
    config: &Config,
    data_dir: &Path,
    cmd: Option<AlertsCommand>,
) -> anyhow::Result<std::process::ExitCode> {
    let events = Events::open(config, data_dir).await?;
    let mut facts = Facts::default();
    let read = each_event(&events, data_dir, "the alerts are there", |e| {
        facts.observe(e)
    })
    .await;
    if let Err(e) = read {
        events.close().await;
        return Err(e);
    }
    let result = match cmd.unwrap_or(AlertsCommand::List { json: false }) {
        AlertsCommand::List { json } => list(&facts, json),
        AlertsCommand::Resolve { key, reason } => {
            let Some(open) = facts.open.get(&key) else {
                events.close().await;
                anyhow::bail!(
                    "no open alert has the key {key:?}; `backstop alerts list` shows the open ones"
                );
            };
            let resolved = AlertResolved {
                alert_id: open.alert_id,
                kind: open.kind.clone(),
                subject: open.subject.clone(),
                message: reason,
                key: key.clone(),
                source: open.source.clone(),
            };
            let operator = crate::wiring::operator();
            let e = NewEvent::new(
                streams::alerts(),
                Actor::operator(operator),
                &Event::AlertResolved(resolved),
            );
            match events
                .appender
                .append(&streams::alerts(), ExpectedVersion::Any, vec![e])
                .await
                .context("cannot record the resolution")
            {
                Ok(_) => {
                    println!("resolved {key}");
                    Ok(std::process::ExitCode::SUCCESS)
                }
                Err(e) => Err(e),
            }
        }
    };
    events.close().await;
    result
}

fn list(facts: &Facts, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let open = facts.open_by_urgency();
    if json {
        let rows: Vec<serde_json::Value> = open
            .iter()
            .map(|(key, a)| {
                serde_json::json!({
                    "key": key,
                    "alert_id": a.alert_id,
                    "severity": a.severity,
                    "kind": a.kind,
                    "subject": a.subject,
                    "source": a.source,
                    "raised_at": a.raised.at,
                    "message": a.message,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if open.is_empty() {
        println!("no open alerts");
    } else {
        for (key, a) in open {
            println!(
                "{:<8}  {}  {key}\n          {}",
                format!("{:?}", a.severity).to_lowercase(),
                a.raised.at.format("%Y-%m-%d %H:%M UTC"),
                a.message
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
