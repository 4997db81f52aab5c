//! `backstop report weekly`: the weekly summary of the last full week (or the week before a
//! given date), read from the ledger as `serve` composes it (`backstop_ops::report`).

use std::path::Path;

use backstop_ops::report::{ReportBuilder, last_full_week};
use chrono::{NaiveDate, TimeZone, Utc};
use clap::Subcommand;

use crate::config::Config;
use crate::wiring::{Events, each_event};

#[derive(Subcommand)]
pub enum ReportCommand {
    /// Success rate, verifications, storage and cost, slowest backups, open alerts.
    Weekly {
        /// The last full week ending on or before this date (YYYY-MM-DD, in reports.zone);
        /// default today.
        #[arg(long)]
        before: Option<NaiveDate>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(
    config: &Config,
    data_dir: &Path,
    cmd: ReportCommand,
) -> anyhow::Result<std::process::ExitCode> {
    let ReportCommand::Weekly { before, json } = cmd;
    let zone = config.reports.zone()?;
    let now = match before {
        Some(d) => {
            let naive = d.and_hms_opt(0, 0, 0).unwrap_or_default();
            zone.from_local_datetime(&naive)
                .earliest()
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_else(|| Utc.from_utc_datetime(&naive))
        }
        None => Utc::now(),
    };
    let (start, end) = last_full_week(now, zone);
    let events = Events::open(config, data_dir).await?;
    let mut builder = ReportBuilder::new(start, end, zone);
    let read = each_event(&events, data_dir, "the summary is made from it", |e| {
        builder.observe(e)
    })
    .await;
    events.close().await;
    read?;
    let report = builder.finish(crate::wiring::cost_estimator(config).as_ref());
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(std::process::ExitCode::SUCCESS)
}
