//! `backstop serve` and `backstop worker`: the long-running processes.
//!
//! `serve` owns the ledger, and serves `DATA_DIR/control.sock` so the CLI can append and follow
//! beside it (`backstop_ledger::local`). Embedded (no NATS URL) it runs every worker on an
//! in-process subscription. With NATS it also publishes every committed event to JetStream (the
//! outbox), answers remote appends and lookups (`backstop.ledger.contains`), and runs its own
//! workers as JetStream durable consumers, sharing the work with `backstop worker` processes that
//! use the same consumer names.
//!
//! Start-up checks the configuration before it starts any long-lived task, so a mistake in it
//! prints its message and exits non-zero at once. A task failing later stops the process: the
//! others are aborted and waited for only briefly, so the failure is never held back by one that
//! does not end.
//!
//! Shutdown (Ctrl-C or SIGTERM): the signal flips a watch; every task finishes the event in hand
//! and returns; then the ledger writer signs a last checkpoint and flushes.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use backstop_ledger::consumer::{self, Handler};
use backstop_ledger::local::{ControlServer, socket_path};
use backstop_ledger::{Appender, Ledger, lookup, outbox, remote};
use backstop_ops::schedule::SystemClock;
use clap::Args;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::runtime::{connect_nats, shutdown_signal};

#[derive(Args)]
pub struct ServeArgs {
    /// NATS URL(s), comma-separated; overrides nats.url. Absent: embedded mode.
    #[arg(long, env = "BACKSTOP_NATS")]
    nats: Option<String>,
    /// Do not run workers in this process (they run as `backstop worker` elsewhere).
    #[arg(long)]
    no_workers: bool,
    /// Run only these workers (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// PostgreSQL URL for the read models; overrides projections.database_url.
    #[arg(long, env = "BACKSTOP_PROJECTIONS_URL")]
    projections_url: Option<String>,
    /// Address of the API and dashboard; overrides api.listen (default 127.0.0.1:8080).
    #[arg(long, env = "BACKSTOP_LISTEN")]
    listen: Option<String>,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// NATS URL(s), comma-separated; overrides nats.url.
    #[arg(long, env = "BACKSTOP_NATS")]
    nats: Option<String>,
    /// Run only these workers (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

pub async fn serve(
    config: &Config,
    data_dir: &Path,
    args: ServeArgs,
) -> anyhow::Result<std::process::ExitCode> {
    // The configuration first: a mistake in it (a short API token, an address that cannot be
    // listened on, a malformed projections URL) stops `serve` here with its message, before any
    // long-lived task exists that would have to be stopped.
    let read_side = crate::projections_cmd::check_read_side(
        config,
        args.projections_url.clone(),
        args.listen.clone(),
    )
    .await?;
    let schedules = crate::wiring::schedules(config)?;
    let shutdown = shutdown_signal();
    let ledger = Ledger::open(&config.ledger_config(data_dir))
        .with_context(|| format!("cannot open the ledger in {}", data_dir.display()))?;
    if let Some(pinned) = &config.ledger.public_key
        && !pinned.eq_ignore_ascii_case(ledger.public_key())
    {
        let actual = ledger.public_key().to_string();
        ledger.close().await;
        anyhow::bail!(
            "the ledger's signing key (public key {actual}) is not the pinned [ledger] public_key {pinned}: the key file was replaced or the wrong one is configured; restore the right key file, or pin the new key deliberately"
        );
    }
    tracing::info!(
        data_dir = %data_dir.display(),
        head = ledger.head().position,
        public_key = ledger.public_key(),
        "ledger open"
    );
    let control = ControlServer::bind(&socket_path(data_dir), ledger.clone())
        .context("cannot create the control socket (the CLI's way to this serve)")?;
    let (mut context, storage) = crate::serve_context::worker_context(
        config,
        data_dir,
        Arc::new(ledger.clone()),
        &schedules,
    )
    .await;
    let maintenance = crate::serve_context::retention(config, &ledger, &mut context)?;
    // Only with workers: the notifier's lookup is a ledger handle, and an unused context lives
    // until the end of this function, past `ledger.close()`, which waits for every handle.
    if !args.no_workers {
        context.notify = crate::serve_context::notify(config, Arc::new(ledger.clone()))?;
        context.drills = crate::serve_context::drills(config, data_dir, &ledger)?;
    }
    // Archived WAL that wal-push could not record itself (see wal_cmd) is recorded here.
    let wal_repo = context.data_path.as_ref().map(|dp| dp.repo.clone());
    // Webhook logs (`[[webhooks]]`): a local log is recovered (a torn tail that was never
    // acknowledged cut, acknowledged damage refused here) and what it holds that is not yet in
    // the repository is queued for upload before the API accepts anything (ops::webhook).
    let (webhooks, webhook_tasks) = backstop_ops::webhook::open(
        data_dir,
        &config.webhooks,
        wal_repo
            .clone()
            .map(|repo| backstop_ops::webhook::Uploading {
                repo,
                appender: Arc::new(ledger.clone()),
            }),
        Arc::new(SystemClock),
        shutdown.clone(),
    )
    .context("cannot open the webhook logs")?;
    // The cost page's recommendations read the same repository (cost_cmd::CostSource).
    let cost_view: Arc<dyn backstop_api::CostView> = Arc::new(crate::cost_cmd::CostSource::new(
        config.clone(),
        wal_repo.clone(),
        crate::wiring::location(config, data_dir, &crate::wiring::RepoArgs::default())
            .ok()
            .map(|loc| crate::cost_cmd::series(config, &loc)),
        ledger.clone(),
    ));
    // The git sources serve polls, and the data path they are synced through (taken before
    // the context goes to the workers; none without workers or git sources).
    let git_sources: Vec<(String, std::time::Duration)> = config
        .sources
        .iter()
        .filter_map(|s| match &s.kind {
            crate::config::SourceKindSection::Git(g) => Some((s.name.clone(), g.poll())),
            _ => None,
        })
        .collect();
    let git_dp = context
        .data_path
        .clone()
        .filter(|_| !args.no_workers && !git_sources.is_empty());
    let handlers = if args.no_workers {
        // Dropped here: its handles on the ledger (the data path's appender) would otherwise
        // live to the end of this function, past `ledger.close()`, which waits for them.
        drop(context);
        Vec::new()
    } else {
        backstop_workers::handlers(&args.only, context).map_err(anyhow::Error::msg)?
    };
    let policy = config.retry_policy();
    let mut tasks = JoinSet::new();
    tasks.spawn(control.run(shutdown.clone()));
    for t in webhook_tasks {
        tasks.spawn(async move {
            let _ = t.await;
            Ok(())
        });
    }
    // A writer that met a storage error refuses every append: stop rather than serve on.
    {
        let (ledger, shutdown) = (ledger.clone(), shutdown.clone());
        tasks.spawn(async move { ledger.failed(shutdown).await });
    }
    // The ledger survives its machine: committed events are mirrored into the repository as
    // sealed segments every [ledger] mirror_seconds and at shutdown (ops::ledger_mirror);
    // `backstop ledger restore` rebuilds the ledger from them.
    let mirror_every = config
        .ledger
        .mirror_seconds
        .map(std::time::Duration::from_secs)
        .unwrap_or(backstop_ops::ledger_mirror::DEFAULT_EVERY);
    match &wal_repo {
        Some(repo) if !mirror_every.is_zero() => {
            let repo = repo.with_access(
                backstop_events::Actor::worker("ledger-mirror").to_string(),
                "mirroring the ledger into the repository",
            );
            tasks.spawn(backstop_ops::ledger_mirror::run(
                ledger.clone(),
                repo,
                mirror_every,
                shutdown.clone(),
            ));
        }
        Some(_) => tracing::warn!(
            "[ledger] mirror_seconds = 0: the ledger is not mirrored into the repository, and losing the data directory loses its history"
        ),
        None => tracing::warn!(
            "no repository open: the ledger is not mirrored, and losing the data directory loses its history"
        ),
    }
    // Keys: the database and files keys are rotated when older than [keys] rotate_after_days
    // (90), and every backup re-encrypted under the new versions (ops::rotation); with the other
    // maintenance, only where workers run.
    match (&wal_repo, config.keys.rotate_after()) {
        (Some(repo), Some(after)) if !args.no_workers => {
            let (repo, appender, shutdown) =
                (repo.clone(), Arc::new(ledger.clone()), shutdown.clone());
            tasks.spawn(async move {
                backstop_ops::rotation::run_schedule(repo, appender, after, &SystemClock, shutdown)
                    .await;
                Ok(())
            });
        }
        (Some(_), None) => tracing::info!(
            "[keys] rotate_after_days = 0: keys are rotated only by `backstop key rotate`"
        ),
        _ => {}
    }
    if let Some(repo) = wal_repo {
        let every = std::time::Duration::from_secs(60);
        tasks.spawn(backstop_ops::wal::wal_catch_up_loop(
            repo,
            ledger.clone(),
            every,
            shutdown.clone(),
        ));
    }
    // Git sources: each synced every poll_seconds (ops::git::poll): mirrored, the hashes
    // compared on both sides, bundled when its refs changed; only where workers run.
    if let Some(dp) = git_dp {
        let mut opts = backstop_ops::backup::BackupOptions::default();
        config.job_limits().apply(&mut opts);
        let shutdown = shutdown.clone();
        tracing::info!(sources = git_sources.len(), "git polling running");
        tasks.spawn(async move {
            backstop_ops::git::poll(
                dp,
                git_sources,
                Arc::new(SystemClock),
                backstop_events::Actor::worker("git"),
                opts,
                shutdown,
            )
            .await
        });
    }
    if let Some(m) = maintenance.filter(|_| !args.no_workers) {
        // Daily: forget for every source, prune, extend object locks (workers::retention).
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            backstop_workers::retention::run_maintenance(&m, &SystemClock, shutdown).await;
            Ok(())
        });
    }
    // Alerts: conditions recomputed from the ledger and the clock, raised and resolved once
    // each (ops::alerting); the notify worker delivers them.
    {
        let (ledger, thresholds, shutdown) = (
            ledger.clone(),
            crate::wiring::alert_thresholds(config),
            shutdown.clone(),
        );
        let cost = crate::wiring::cost_estimator(config);
        tasks.spawn(async move {
            backstop_ops::alerting::run_monitor(ledger, thresholds, cost, &SystemClock, shutdown)
                .await
        });
    }
    let sources = crate::wiring::source_specs(config);
    if !sources.is_empty() {
        // pg_stat_archiver of each source, for the WAL-archiving alert (ops::archiver).
        let (ledger, shutdown) = (ledger.clone(), shutdown.clone());
        tasks.spawn(async move {
            backstop_ops::archiver::run_probe(sources, &ledger, &SystemClock, shutdown).await
        });
    }
    if config.reports.weekly.unwrap_or(true) {
        // The weekly summary as `report.generated`, once per week whichever serve composes it.
        let (ledger, zone, shutdown) = (ledger.clone(), config.reports.zone()?, shutdown.clone());
        let cost = crate::wiring::cost_estimator(config);
        tasks.spawn(async move {
            backstop_ops::report::run_weekly(ledger, zone, cost, &SystemClock, shutdown).await
        });
    }
    // The health monitor and the storage probe record what they see (ops::health,
    // ops::storage_probe); the alert rules judge it.
    crate::cost_cmd::spawn_monitors(config, data_dir, &ledger, &mut tasks, &shutdown).await;
    // Jobs whose process died are recorded as abandoned once their lease lapses (ops::lease).
    tasks.spawn(backstop_ops::lease::run_monitor(
        ledger.clone(),
        config.lease_period(),
        shutdown.clone(),
    ));
    let schedule_view: Option<Arc<dyn backstop_api::ScheduleView>> =
        (!schedules.is_empty()).then(|| {
            Arc::new(crate::serve_context::NextRuns(schedules.clone()))
                as Arc<dyn backstop_api::ScheduleView>
        });
    if !schedules.is_empty() {
        // The scheduler claims each slot by an append with an expected version: it can run in
        // every process that has the ledger at hand, and a slot still fires once.
        tracing::info!(schedules = schedules.len(), "scheduler running");
        let (ledger, shutdown) = (ledger.clone(), shutdown.clone());
        tasks.spawn(async move {
            backstop_ops::schedule::run(&schedules, &ledger, &ledger, &SystemClock, shutdown).await;
            Ok(())
        });
    }
    let nats_url = args.nats.or_else(|| config.nats.url.clone());
    let publication = nats_url.is_some();
    match nats_url {
        None => {
            tracing::info!(
                workers = handlers.len(),
                "embedded mode: workers subscribe to the ledger in-process"
            );
            for h in handlers {
                tasks.spawn(consumer::run_embedded(
                    ledger.clone(),
                    h,
                    policy.clone(),
                    shutdown.clone(),
                ));
            }
        }
        Some(url) => {
            let client = connect_nats(&url, &config.nats).await?;
            let js = async_nats::jetstream::new(client.clone());
            let outbox_config = config.outbox_config();
            outbox::ensure_stream(&js, &outbox_config).await?;
            tracing::info!(%url, stream = %outbox_config.stream, "publishing to NATS JetStream");
            tasks.spawn(outbox::run(
                ledger.clone(),
                js.clone(),
                outbox_config.clone(),
                shutdown.clone(),
                None,
            ));
            let append_policy = Arc::new(config.append_policy()?);
            tasks.spawn(remote::serve(
                ledger.clone(),
                client.clone(),
                append_policy,
                shutdown.clone(),
            ));
            // Workers elsewhere ask "already done?" of the ledger itself (ledger::lookup).
            tasks.spawn(lookup::serve(ledger.clone(), client, shutdown.clone()));
            let appender: Arc<dyn Appender> = Arc::new(ledger.clone());
            spawn_jetstream_workers(
                &mut tasks,
                &js,
                &outbox_config.stream,
                appender,
                handlers,
                &policy,
                &shutdown,
            );
        }
    }
    // The read side: projectors into PostgreSQL and the API (see projections_cmd).
    crate::projections_cmd::spawn_read_side(
        crate::projections_cmd::ReadSide {
            config,
            data_dir,
            ledger: &ledger,
            appender: Arc::new(ledger.clone()),
            checked: read_side,
            publication,
            storage,
            schedules: schedule_view,
            cost: Some(cost_view),
            webhooks,
        },
        &mut tasks,
        &shutdown,
    );
    let code = wait(tasks, shutdown).await;
    if code != std::process::ExitCode::SUCCESS {
        // A task failed and the others were aborted; one left behind may still hold a handle.
        if tokio::time::timeout(ABORT_GRACE, ledger.close())
            .await
            .is_err()
        {
            tracing::warn!("the ledger writer did not finish its last flush in time");
        }
        return Ok(code);
    }
    ledger.close().await;
    tracing::info!("stopped cleanly");
    Ok(code)
}

pub async fn worker(
    config: &Config,
    data_dir: &Path,
    args: WorkerArgs,
) -> anyhow::Result<std::process::ExitCode> {
    let shutdown = shutdown_signal();
    let url = args
        .nats
        .or_else(|| config.nats.url.clone())
        .context("`backstop worker` needs NATS: pass --nats nats://HOST:PORT or set nats.url")?;
    let schedules = crate::wiring::schedules(config)?;
    let client = connect_nats(&url, &config.nats).await?;
    let js = async_nats::jetstream::new(client.clone());
    let appender: Arc<dyn Appender> =
        Arc::new(crate::runtime::remote_ledger(config, client.clone())?);
    let (mut context, _) =
        crate::serve_context::worker_context(config, data_dir, appender.clone(), &schedules).await;
    // Whether a notification was already sent is asked of the ledger (serve answers; see
    // ledger::lookup): JetStream's copy lags it, most of all while a NATS node is lost.
    context.notify =
        crate::serve_context::notify(config, Arc::new(lookup::RemoteLookup::new(client.clone())))?;
    let handlers = backstop_workers::handlers(&args.only, context).map_err(anyhow::Error::msg)?;
    let mut tasks = JoinSet::new();
    if !schedules.is_empty() && (args.only.is_empty() || args.only.iter().any(|o| o == "scheduler"))
    {
        // Beside the serve's scheduler: slots are claimed by appends with an expected version,
        // read from JetStream here (see backstop_ops::schedule::jetstream), so each fires once.
        let log = backstop_ops::schedule::jetstream::JetStreamScheduleLog::new(
            js.clone(),
            config.outbox_config().stream,
        );
        let (appender, shutdown) = (appender.clone(), shutdown.clone());
        tasks.spawn(async move {
            backstop_ops::schedule::run(
                &schedules,
                appender.as_ref(),
                &log,
                &SystemClock,
                shutdown,
            )
            .await;
            Ok(())
        });
    }
    let names: Vec<String> = handlers.iter().map(|h| h.name().to_string()).collect();
    spawn_jetstream_workers(
        &mut tasks,
        &js,
        &config.outbox_config().stream,
        appender,
        handlers,
        &config.retry_policy(),
        &shutdown,
    );
    tracing::info!(%url, workers = ?names, "worker running");
    Ok(wait(tasks, shutdown).await)
}

fn spawn_jetstream_workers(
    tasks: &mut JoinSet<Result<(), backstop_ledger::LedgerError>>,
    js: &async_nats::jetstream::Context,
    stream: &str,
    appender: Arc<dyn Appender>,
    handlers: Vec<Arc<dyn Handler>>,
    policy: &consumer::RetryPolicy,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) {
    for h in handlers {
        tasks.spawn(consumer::run_jetstream(
            js.clone(),
            stream.to_string(),
            appender.clone(),
            h,
            policy.clone(),
            shutdown.clone(),
        ));
    }
}

/// Waits for shutdown or for a task to fail; a failed task stops the process (non-zero exit)
/// rather than leaving it half-working.
async fn wait(
    mut tasks: JoinSet<Result<(), backstop_ledger::LedgerError>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::process::ExitCode {
    let mut code = std::process::ExitCode::SUCCESS;
    loop {
        tokio::select! {
            done = tasks.join_next(), if !tasks.is_empty() => match done {
                None => continue,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    tracing::error!(error = %e, "a task failed; stopping");
                    code = std::process::ExitCode::FAILURE;
                    break;
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "a task panicked; stopping");
                    code = std::process::ExitCode::FAILURE;
                    break;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    if code != std::process::ExitCode::SUCCESS {
        abort_all(tasks).await;
        return code;
    }
    // Tasks watch the same shutdown signal; give them time to finish the event in hand.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(30), drain)
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop within 30 s; aborting them");
    }
    code
}

/// How long stopping after a failure may take: the failure is what the operator must see, and
/// nothing the aborted tasks were doing is worth holding it back for.
const ABORT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Aborts every task and waits for them at most [`ABORT_GRACE`]. An abort only lands when a task
/// next yields, so one stuck in a blocking call would make an unbounded wait (`JoinSet::shutdown`)
/// hang the process with its error unprinted; what is left is dropped with the runtime.
async fn abort_all(mut tasks: JoinSet<Result<(), backstop_ledger::LedgerError>>) {
    tasks.abort_all();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(ABORT_GRACE, drain).await.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "tasks did not stop within {ABORT_GRACE:?} of being aborted; leaving them"
        );
    }
}
