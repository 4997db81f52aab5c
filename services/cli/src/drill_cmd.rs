//! `backstop drill`: a DR drill of one source onto a staging database (backstop_ops::drill),
//! its report written as JSON, Markdown and HTML. Exits 0 when the drill passed, 1 when it
//! failed (the reason is in the report and on `drill.completed`). Also the plans and schedules
//! of the `[[drills]]` entries that `serve` runs (backstop_ops::drill_request).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use backstop_ops::DataPath;
use backstop_ops::drill::{self, DrillMethod, DrillPlan, PhysicalStaging};
use backstop_ops::drill_request::write_reports;
use backstop_ops::schedule::config::DEFAULT_ZONE;
use backstop_ops::schedule::{ConfigDuration, Schedule};
use clap::Args;

use crate::config::Config;
use crate::wiring::{
    Events, RepoArgs, open_repository, operator, physical_verify_settings, source_specs,
    verified_backups,
};

#[derive(Args, Default)]
pub struct DrillArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The source to drill (a configured PostgreSQL source).
    #[arg(long)]
    pub source: String,
    /// The staging database of a logical drill (postgres://HOST[:PORT]/DATABASE; dropped and
    /// recreated). Default: the `[[drills]]` entry of the source.
    #[arg(long)]
    pub staging: Option<String>,
    /// physical (the newest verified base backup plus WAL replayed to the latest archived
    /// point), logical, or auto: physical where the source archives WAL and has a verified base
    /// backup, logical otherwise. Default the `[[drills]]` entry's, else auto.
    #[arg(long)]
    pub method: Option<DrillMethod>,
    /// A physical drill's staging data directory (absent or empty; kept, with the server
    /// stopped, afterwards). Default the `[[drills]]` entry's, else a temporary directory
    /// removed afterwards.
    #[arg(long)]
    pub staging_dir: Option<PathBuf>,
    /// The loopback port a physical drill's staging server listens on while the checks run
    /// (the restored cluster's own passwords apply). Default a free port.
    #[arg(long)]
    pub staging_port: Option<u16>,
    /// The RTO target (e.g. 5m, 2h); default the `[[drills]]` entry's, else 5m.
    #[arg(long)]
    pub rto_target: Option<ConfigDuration>,
    /// The RPO (e.g. 1h, 24h); default the `[[drills]]` entry's, else 24h.
    #[arg(long)]
    pub rpo: Option<ConfigDuration>,
    /// An endpoint that must answer 2xx after the restore (repeatable); default the
    /// `[[drills]]` entry's, else the `[[health.endpoints]]` URLs.
    #[arg(long = "endpoint")]
    pub endpoints: Vec<String>,
    /// Where the reports go (drill-ID.json, .md, .html); default DATA_DIR/drills.
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    /// Parallel COPY connections of the restore.
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Drill the newest backup even if it has not passed verification.
    #[arg(long)]
    pub allow_unverified: bool,
}

/// The plan of the drill `args` asks for: each flag given, else the source's `[[drills]]`
/// entry, else the defaults (endpoints: the `[[health.endpoints]]` URLs).
fn plan_of(config: &Config, args: &DrillArgs) -> anyhow::Result<DrillPlan> {
    let entry = config.drills.iter().find(|d| d.source == args.source);
    let method = args
        .method
        .or(entry.and_then(|e| e.method))
        .unwrap_or_default();
    let staging = args
        .staging
        .clone()
        .or_else(|| entry.map(|e| e.staging.clone()).filter(|s| !s.is_empty()));
    if staging.is_none() && method != DrillMethod::Physical {
        anyhow::bail!(
            "say where the drill restores: --staging postgres://HOST/DB (or a [[drills]] entry with source = {:?} and staging), or --method physical for a throwaway server on a staging data directory",
            args.source
        );
    }
    let secs = |d: Option<ConfigDuration>| d.map(|d| Duration::from_secs(d.as_secs()));
    let rto_target = secs(args.rto_target)
        .or_else(|| secs(entry.and_then(|e| e.rto_target)))
        .unwrap_or(drill::DEFAULT_RTO_TARGET);
    let rpo = secs(args.rpo)
        .or_else(|| secs(entry.and_then(|e| e.rpo)))
        .unwrap_or(drill::DEFAULT_RPO);
    let endpoints = if !args.endpoints.is_empty() {
        args.endpoints.clone()
    } else if let Some(e) = entry.filter(|e| !e.endpoints.is_empty()) {
        e.endpoints.clone()
    } else {
        config
            .health
            .endpoints
            .iter()
            .map(|e| e.url.clone())
            .collect()
    };
    Ok(DrillPlan {
        source: args.source.clone(),
        staging: staging.unwrap_or_default(),
        rto_target,
        rpo,
        endpoints,
        jobs: args.jobs.or(entry.and_then(|e| e.jobs)).unwrap_or(2),
        operator: operator(),
        method,
        // Set by the caller that can start a server (physical_staging).
        physical: None,
    })
}

/// How a physical drill of `args` makes its staging server: the verify worker's settings
/// (`wal-fetch` through this binary, the postgres programs found as it finds them), and the
/// directory and port of the flags, else of the source's `[[drills]]` entry.
pub fn physical_staging(config: &Config, data_dir: &Path, args: &DrillArgs) -> PhysicalStaging {
    let entry = config.drills.iter().find(|d| d.source == args.source);
    PhysicalStaging {
        settings: physical_verify_settings(config, data_dir, &args.repo),
        dir: args
            .staging_dir
            .clone()
            .or_else(|| entry.and_then(|e| e.staging_dir.clone())),
        port: args.staging_port.or(entry.and_then(|e| e.staging_port)),
    }
}

/// The plan of every `[[drills]]` entry, as `serve`'s drill worker runs them (physical ones
/// too: their staging server as `backstop drill` starts it).
pub fn configured_plans(config: &Config, data_dir: &Path) -> anyhow::Result<Vec<DrillPlan>> {
    config
        .drills
        .iter()
        .map(|e| {
            let args = DrillArgs {
                source: e.source.clone(),
                ..DrillArgs::default()
            };
            let mut plan = plan_of(config, &args)?;
            plan.physical = Some(physical_staging(config, data_dir, &args));
            Ok(plan)
        })
        .collect()
}

/// The schedules of the `[[drills]]` entries (`schedule`, default monthly; `"off"`: none).
pub fn drill_schedules(config: &Config) -> anyhow::Result<Vec<Schedule>> {
    let mut out = Vec::new();
    for e in &config.drills {
        let cron = e.schedule.as_deref().unwrap_or(drill::DEFAULT_SCHEDULE);
        if cron.trim().eq_ignore_ascii_case("off") {
            continue;
        }
        let zone = e.zone.as_deref().unwrap_or(DEFAULT_ZONE);
        out.push(
            Schedule::drill(&e.source, cron, zone)
                .with_context(|| format!("[[drills]] entry of source {:?}", e.source))?,
        );
    }
    Ok(out)
}

pub async fn run(config: &Config, data_dir: &Path, args: DrillArgs) -> anyhow::Result<ExitCode> {
    let mut plan = plan_of(config, &args)?;
    plan.physical = Some(physical_staging(config, data_dir, &args));
    let mut events = Events::open(config, data_dir).await?;
    let repo = open_repository(config, data_dir, &args.repo, &mut events).await?;
    let verified = if args.allow_unverified {
        None
    } else {
        Some(verified_backups(&events, data_dir).await?)
    };
    let dp = DataPath {
        repo,
        appender: events.appender.clone(),
        sources: source_specs(config),
    };
    let outcome = drill::run_drill(&dp, &plan, verified.as_ref()).await;
    drop(dp);
    events.close().await;
    let report = outcome.map_err(|e| anyhow::anyhow!(e.chain()))?;
    let dir = args
        .report_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("drills"));
    let base = write_reports(&report, &dir).map_err(|e| anyhow::anyhow!(e.chain()))?;
    print!("{}", report.markdown());
    println!("\nreports: {}.{{json,md,html}}", base.display());
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn config(drills: &str) -> Config {
        Config::parse(
            &format!("[[sources]]\nname = \"main\"\npostgres = \"postgres://db/main\"\n\n{drills}"),
            Path::new("backstop.toml"),
        )
        .unwrap()
    }

    #[test]
    fn each_drills_entry_is_a_monthly_schedule_unless_off() {
        let c =
            config("[[drills]]\nsource = \"main\"\nstaging = \"postgres://stage/main_drill\"\n");
        let s = crate::wiring::schedules(&c).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name(), "drill-main");
        assert_eq!(s[0].config().cron, backstop_ops::drill::DEFAULT_SCHEDULE);
        assert_eq!(s[0].zone().name(), "America/New_York");

        let off = config(
            "[[drills]]\nsource = \"main\"\nstaging = \"postgres://stage/d\"\nschedule = \"off\"\n",
        );
        assert!(crate::wiring::schedules(&off).unwrap().is_empty());

        let zoned = config(
            "[[drills]]\nsource = \"main\"\nstaging = \"postgres://stage/d\"\nschedule = \"0 4 * * SAT#1\"\nzone = \"Europe/London\"\n",
        );
        let s = crate::wiring::schedules(&zoned).unwrap();
        assert_eq!(s[0].zone().name(), "Europe/London");

        // A [[schedules]] entry may not take a drill's name, nor run drills itself.
        let clash = config(
            "[[schedules]]\nname = \"drill-main\"\nsource = \"main\"\n\n[[drills]]\nsource = \"main\"\nstaging = \"postgres://stage/d\"\n",
        );
        let e = format!("{:#}", crate::wiring::schedules(&clash).unwrap_err());
        assert!(e.contains("rename the schedule"), "{e}");
        let job = config("[[schedules]]\nname = \"x\"\nsource = \"main\"\njob = \"drill\"\n");
        let e = format!("{:#}", crate::wiring::schedules(&job).unwrap_err());
        assert!(e.contains("[[drills]] entry"), "{e}");
        let bad = config(
            "[[drills]]\nsource = \"main\"\nstaging = \"postgres://stage/d\"\nzone = \"Mars/Base\"\n",
        );
        assert!(crate::wiring::schedules(&bad).is_err());
    }
}
