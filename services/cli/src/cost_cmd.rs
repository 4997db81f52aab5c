//! `backstop cost [--json]`: the monthly estimate from the sampled storage usage, each series,
//! the 90-day trend and the retention recommendations computed from the repository's backups
//! (`backstop_ops::cost`). Also what `serve` wires for the health monitor, the storage probe and
//! the dashboard's cost page.
//!
//! The samples are read from the ledger (here, or through the running serve's control socket).
//! With none yet (serve samples once a day), the usage is measured now and shown as such,
//! without being recorded.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backstop_ledger::Ledger;
use backstop_ops::cost::{self, CostReport, Recommendations, UsageSample};
use backstop_ops::forget::RetentionFacts;
use backstop_ops::replicate::PRIMARY;
use backstop_ops::schedule::SystemClock;
use backstop_ops::storage_probe::StorageSeries;
use backstop_repo::{Backend, Location, Repository};
use clap::Args;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{Config, ReplicaSection};
use crate::wiring::{Events, RepoArgs, location, open_repository, s3_settings};

const MEASURED_NOW: &str = "usage measured now";

#[derive(Args)]
pub struct CostArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    #[arg(long)]
    pub json: bool,
}

/// The series a repository's usage is recorded as: its location, the S3 region
/// (`[repository] region`, then AWS_REGION, then us-east-1) or `local`, and `[cost]
/// storage_class`.
pub fn series(config: &Config, loc: &Location) -> StorageSeries {
    let region = match loc {
        Location::Local(_) => "local".to_string(),
        Location::S3 { .. } => config
            .repository
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_string()),
    };
    StorageSeries {
        repository: loc.to_string(),
        region,
        storage_class: config.cost.storage_class(),
    }
}

/// The series a replica's usage is recorded as: its location, its region (`region`, else
/// `local` for a directory, else us-east-1) and its storage class (default `[cost]
/// storage_class`). None when its location does not parse (the replicate worker says so).
pub fn replica_series(config: &Config, r: &ReplicaSection) -> Option<StorageSeries> {
    let loc = Location::parse(&r.location).ok()?;
    let region = match (&loc, &r.region) {
        // A directory may be in another site (a mounted NAS): its `region` says which.
        (_, Some(region)) => region.clone(),
        (Location::Local(_), None) => "local".to_string(),
        (_, None) => "us-east-1".to_string(),
    };
    Some(StorageSeries {
        repository: loc.to_string(),
        region,
        storage_class: r
            .storage_class
            .as_deref()
            .map(str::to_ascii_uppercase)
            .unwrap_or_else(|| config.cost.storage_class()),
    })
}

/// Which copy each repository location is: `primary` and every replica's name (the cost
/// report's `copy`).
pub fn copy_names(config: &Config, primary: Option<&StorageSeries>) -> BTreeMap<String, String> {
    let mut names: BTreeMap<String, String> = config
        .repository
        .replicas
        .iter()
        .filter_map(|r| Some((replica_series(config, r)?.repository, r.name.clone())))
        .collect();
    if let Some(p) = primary {
        names.insert(p.repository.clone(), PRIMARY.to_string());
    }
    names
}

/// The repository's backend and series, if a repository exists (no local repository yet, an
/// unusable location or an unreachable bucket: None, logged).
pub async fn storage_target(
    config: &Config,
    data_dir: &Path,
) -> Option<(Arc<dyn Backend>, StorageSeries)> {
    let loc = location(config, data_dir, &RepoArgs::default()).ok()?;
    if let Location::Local(path) = &loc
        && !path.join("config").exists()
    {
        return None;
    }
    match loc.open(Some(s3_settings(config))).await {
        Ok(b) => Some((b, series(config, &loc))),
        Err(e) => {
            tracing::warn!(error = %e, "storage probe off: cannot open the repository backend");
            None
        }
    }
}

/// Spawns the health monitor (when `[[health.endpoints]]` are configured) and the storage probe
/// (when a repository exists) on the wall clock.
pub async fn spawn_monitors(
    config: &Config,
    data_dir: &Path,
    ledger: &Ledger,
    tasks: &mut JoinSet<Result<(), backstop_ledger::LedgerError>>,
    shutdown: &watch::Receiver<bool>,
) {
    if !config.health.endpoints.is_empty() {
        let (health, ledger, shutdown) = (config.health.clone(), ledger.clone(), shutdown.clone());
        tasks.spawn(async move {
            backstop_ops::health::run(&health, Some(&ledger), &ledger, &SystemClock, shutdown)
                .await;
            Ok(())
        });
    }
    // Each replica's usage too, once a day: its cost is counted in its own region (R14.5).
    for r in &config.repository.replicas {
        let Some(series) = replica_series(config, r) else {
            continue;
        };
        match crate::replica_cmd::open_replica(r).await {
            Ok(replica) => {
                let (ledger, shutdown) = (ledger.clone(), shutdown.clone());
                tasks.spawn(async move {
                    backstop_ops::storage_probe::run_usage(
                        replica.backend,
                        series,
                        &ledger,
                        &SystemClock,
                        shutdown,
                    )
                    .await;
                    Ok(())
                });
            }
            Err(e) => {
                tracing::warn!(replica = %r.name, error = %format!("{e:#}"), "replica usage not sampled: cannot open it")
            }
        }
    }
    if let Some((backend, series)) = storage_target(config, data_dir).await {
        let (every, ledger, shutdown) = (
            config.health.storage_every(),
            ledger.clone(),
            shutdown.clone(),
        );
        tasks.spawn(async move {
            backstop_ops::storage_probe::run(
                backend,
                series,
                every,
                &ledger,
                &SystemClock,
                shutdown,
            )
            .await;
            Ok(())
        });
    }
}

/// The recommendations over `repo`'s backups under the configured retention, priced at the
/// series' price (None without a price).
pub async fn recommendations(
    config: &Config,
    repo: &Repository,
    series: &StorageSeries,
    facts: &RetentionFacts,
) -> anyhow::Result<(Option<Recommendations>, Vec<String>)> {
    let retention = config.retention_config()?;
    let mut notes = Vec::new();
    let Some(price) = config
        .cost
        .price_table()
        .lookup(&series.storage_class, &series.region)
    else {
        notes.push(format!(
            "no price for {} in {}: no recommendations",
            series.storage_class, series.region
        ));
        return Ok((None, notes));
    };
    let (backups, unreadable) = cost::stored_backups(repo, facts)
        .await
        .map_err(|e| anyhow::anyhow!(e.chain()))?;
    if unreadable > 0 {
        notes.push(format!(
            "{unreadable} backup manifest(s) could not be read and are left out of the recommendations"
        ));
    }
    Ok((
        Some(cost::recommend(
            &backups,
            &retention,
            price,
            chrono::Utc::now(),
        )),
        notes,
    ))
}

pub async fn run(
    config: &Config,
    data_dir: &Path,
    args: CostArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let mut events = Events::open(config, data_dir).await?;
    let mut samples = Vec::new();
    let mut facts = RetentionFacts::default();
    crate::wiring::each_event(&events, data_dir, "the usage samples are there", |env| {
        if let Some(s) = UsageSample::from_envelope(env) {
            samples.push(s);
        }
        facts.observe(env);
    })
    .await?;
    let mut notes = Vec::new();
    let loc = location(config, data_dir, &args.repo)?;
    let series = series(config, &loc);
    let recs = match open_repository(config, data_dir, &args.repo, &mut events).await {
        Ok(repo) => {
            if samples.is_empty() {
                match backstop_ops::storage_probe::usage(repo.backend().as_ref()).await {
                    Ok((bytes, objects)) => {
                        notes.push(format!(
                            "{MEASURED_NOW} (not recorded): no sample in the ledger yet"
                        ));
                        samples.push(UsageSample {
                            repository: series.repository.clone(),
                            region: series.region.clone(),
                            storage_class: series.storage_class.clone(),
                            bytes,
                            objects,
                            sampled_at: chrono::Utc::now(),
                        });
                    }
                    Err(e) => notes.push(format!("cannot measure the usage now: {e}")),
                }
            }
            let r = recommendations(config, &repo, &series, &facts).await;
            drop(repo);
            match r {
                Ok((r, n)) => {
                    notes.extend(n);
                    r
                }
                Err(e) => {
                    notes.push(format!("no recommendations: {e:#}"));
                    None
                }
            }
        }
        Err(e) => {
            notes.push(format!(
                "no recommendations: cannot open the repository: {e:#}"
            ));
            None
        }
    };
    events.close().await;
    // A replica with no sample yet is measured now, as the primary is above.
    for r in &config.repository.replicas {
        let Some(rs) = replica_series(config, r) else {
            continue;
        };
        if samples.iter().any(|s| s.repository == rs.repository) {
            continue;
        }
        let measured = match crate::replica_cmd::open_replica(r).await {
            Ok(replica) => backstop_ops::storage_probe::usage(replica.backend.as_ref())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("{e:#}")),
        };
        match measured {
            Ok((bytes, objects)) => {
                notes.push(format!(
                    "{MEASURED_NOW} for replica `{}` (not recorded): no sample in the ledger yet",
                    r.name
                ));
                samples.push(UsageSample {
                    repository: rs.repository,
                    region: rs.region,
                    storage_class: rs.storage_class,
                    bytes,
                    objects,
                    sampled_at: chrono::Utc::now(),
                });
            }
            Err(e) => notes.push(format!("cannot measure replica `{}` now: {e}", r.name)),
        }
    }
    let mut report = cost::report(
        &samples,
        &config.cost,
        recs,
        chrono::Utc::now().date_naive(),
    );
    report.name_copies(&copy_names(config, Some(&series)));
    if notes.iter().any(|n| n.starts_with(MEASURED_NOW)) {
        // "Measured now" replaces the report's own "no sample yet".
        report
            .notes
            .retain(|n| !n.starts_with("no storage usage sampled yet"));
    }
    report.notes.extend(notes);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_report(r: &CostReport) {
    println!(
        "estimated monthly cost: ${:.2} (budget ${:.2}{})",
        r.estimate.total_usd,
        r.budget_usd,
        if r.over_budget { ", OVER BUDGET" } else { "" }
    );
    for s in &r.estimate.series {
        println!(
            "  {}{} {} {}: {} in {} objects at ${}/GiB-month = ${:.2}/month (sampled {})",
            s.copy
                .as_ref()
                .map(|c| format!("[{c}] "))
                .unwrap_or_default(),
            s.repository,
            s.region,
            s.storage_class,
            cost::human_bytes(s.bytes),
            s.objects,
            s.usd_per_gib_month,
            s.monthly_usd,
            s.sampled_at.format("%Y-%m-%d %H:%M UTC"),
        );
    }
    if r.regions.len() > 1 {
        println!("per region:");
        for g in &r.regions {
            println!(
                "  {}: {} ({}) = ${:.2}/month{}",
                g.region,
                cost::human_bytes(g.bytes),
                g.copies.join(", "),
                g.monthly_usd,
                if g.priced { "" } else { " (a series unpriced)" }
            );
        }
    }
    if let (Some(first), Some(last)) = (r.trend.first(), r.trend.last()) {
        println!(
            "trend: {} ${:.2}/month -> {} ${:.2}/month ({} days)",
            first.day,
            first.monthly_usd,
            last.day,
            last.monthly_usd,
            r.trend.len()
        );
    }
    if let Some(rec) = &r.recommendations {
        println!(
            "retention ({} backups, ${}/GiB-month):",
            rec.backups, rec.usd_per_gib_month
        );
        for p in &rec.policies {
            println!(
                "  {:<40} keeps {:>4} backups, {:>10}: ${:.2}/month{}",
                if p.current {
                    format!("current ({})", p.rules)
                } else {
                    p.name.clone()
                },
                p.backups_kept,
                cost::human_bytes(p.stored_bytes),
                p.monthly_usd,
                if p.current {
                    String::new()
                } else {
                    format!(" ({:+.2})", p.delta_usd)
                }
            );
        }
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}

/// The dashboard's cost page source: the configured prices and budget, and recommendations
/// from the repository, recomputed at most every [`RECOMMENDATIONS_TTL`] (listing every
/// manifest is not free).
pub struct CostSource {
    pub config: Config,
    pub repo: Option<Repository>,
    pub series: Option<StorageSeries>,
    pub ledger: Ledger,
    cache: tokio::sync::Mutex<Option<(Instant, Option<Recommendations>)>>,
}

pub const RECOMMENDATIONS_TTL: Duration = Duration::from_secs(600);

impl CostSource {
    pub fn new(
        config: Config,
        repo: Option<Repository>,
        series: Option<StorageSeries>,
        ledger: Ledger,
    ) -> CostSource {
        CostSource {
            config,
            repo,
            series,
            ledger,
            cache: tokio::sync::Mutex::new(None),
        }
    }
}

#[async_trait::async_trait]
impl backstop_api::CostView for CostSource {
    fn config(&self) -> cost::CostConfig {
        self.config.cost.clone()
    }

    fn copy_names(&self) -> BTreeMap<String, String> {
        copy_names(&self.config, self.series.as_ref())
    }

    async fn recommendations(&self) -> Option<Recommendations> {
        let mut cache = self.cache.lock().await;
        if let Some((at, r)) = cache.as_ref()
            && at.elapsed() < RECOMMENDATIONS_TTL
        {
            return r.clone();
        }
        let (repo, series) = (self.repo.as_ref()?, self.series.as_ref()?);
        let facts = RetentionFacts::from_ledger(&self.ledger).ok()?;
        let r = match recommendations(&self.config, repo, series, &facts).await {
            Ok((r, _)) => r,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot compute retention recommendations");
                None
            }
        };
        *cache = Some((Instant::now(), r.clone()));
        r
    }
}
