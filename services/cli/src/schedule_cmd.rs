//! `backstop schedule list`: each configured schedule's next five firings, in its zone and in
//! UTC, with the kind and method each will take. The scheduler itself runs inside
//! `backstop serve` (see `backstop_ops::schedule`).

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;

#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// The next firings of every configured schedule.
    List {
        /// Firings per schedule.
        #[arg(long, default_value_t = 5)]
        count: usize,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(config: &Config, cmd: ScheduleCommand) -> anyhow::Result<ExitCode> {
    let ScheduleCommand::List { count, json } = cmd;
    let schedules = crate::wiring::schedules(config)?;
    let now = backstop_events::now_micros();
    let mut all = Vec::new();
    for s in &schedules {
        all.push((s, s.next_firings(count, now)?));
    }
    if json {
        let v: Vec<_> = all
            .iter()
            .map(|(s, firings)| {
                serde_json::json!({
                    "schedule": s.name(),
                    "source": s.source(),
                    "cron": s.config().cron,
                    "zone": s.zone().name(),
                    "method": s.method(),
                    "job": s.job(),
                    "grace": s.grace().to_string(),
                    "next": firings,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if schedules.is_empty() {
        println!(
            "no schedules configured; add [[schedules]] entries (name, source, cron, zone) to the configuration file"
        );
        return Ok(ExitCode::SUCCESS);
    }
    for (s, firings) in &all {
        let what = match s.job() {
            backstop_events::ScheduledJob::Drill => "DR drills".to_string(),
            _ => format!("{} backups", s.method()),
        };
        println!(
            "{} (source `{}`, {what}, cron \"{}\" in {}, grace {}):",
            s.name(),
            s.source(),
            s.config().cron,
            s.zone().name(),
            s.grace()
        );
        for f in firings {
            let limited = s
                .limits_at(f.utc)
                .map(|_| "  (inside trading hours: limited)")
                .unwrap_or_default();
            let line = format!(
                "  {}  {}  {:<12}{limited}",
                f.local.format("%a %Y-%m-%d %H:%M %:z"),
                f.utc.format("%Y-%m-%d %H:%M UTC"),
                if matches!(s.job(), backstop_events::ScheduledJob::Drill) {
                    "drill"
                } else {
                    f.kind.as_str()
                },
            );
            println!("{}", line.trim_end());
        }
    }
    Ok(ExitCode::SUCCESS)
}
