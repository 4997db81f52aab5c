//! `backstop projections rebuild|status`, and the read side of `backstop serve`: the projectors
//! and the API (dashboard, JSON API, `/metrics`, audit export).
//!
//! Projections need PostgreSQL: `projections.database_url` (or `--projections-url`,
//! `BACKSTOP_PROJECTIONS_URL`). Without it `serve` still runs the ledger, the workers and the API;
//! the API then answers the pages that need projections with a 503 that says what to configure,
//! and serves `/healthz`, `/metrics` (ledger figures), the live event stream and the audit
//! export, which read the ledger itself.
//!
//! The API listens on `api.listen` (default 127.0.0.1:8080). If that address was configured
//! explicitly, failing to bind it stops `serve`; the default address being taken (another
//! instance on the same machine) only logs a warning and serves no API.
//!
//! `serve` checks the read side's configuration ([`check_read_side`]: tokens, projections URL,
//! API address) before it starts any task, and only then spawns it ([`spawn_read_side`]), which
//! cannot fail. The API listens before the projections' migrations have run; until one has
//! succeeded it answers what needs the read models with 503, the reason and `Retry-After`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use backstop_api::{ApiConfig, ApiState, ReadModels, StorageProbe, TokenEntry, Tokens};
use backstop_ledger::{Appender, Ledger, LedgerError};
use backstop_projections::{Projections, projectors};
use clap::Subcommand;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// Empty the read models and replay the whole ledger into them (stop `serve` first).
    Rebuild {
        /// PostgreSQL URL of the projections (overrides projections.database_url).
        #[arg(long, env = "BACKSTOP_PROJECTIONS_URL")]
        projections_url: Option<String>,
        /// Only these projectors (comma-separated: audit, state); default all.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Events per transaction.
        #[arg(long, default_value_t = backstop_projections::DEFAULT_BATCH)]
        batch: usize,
    },
    /// Each projector's position against the ledger's head.
    Status {
        #[arg(long, env = "BACKSTOP_PROJECTIONS_URL")]
        projections_url: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// The projections URL from the flag, then the configuration.
pub fn database_url(config: &Config, flag: Option<String>) -> Option<String> {
    flag.or_else(|| config.projections.database_url.clone())
        .filter(|s| !s.trim().is_empty())
}

pub async fn run(
    config: &Config,
    data_dir: &Path,
    cmd: ProjectionsCommand,
) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        ProjectionsCommand::Rebuild {
            projections_url,
            only,
            batch,
        } => {
            let url = database_url(config, projections_url).context(
                "no projections database: set projections.database_url or pass --projections-url postgres://USER@HOST:PORT/DB",
            )?;
            let chosen: Vec<_> = projectors()
                .into_iter()
                .filter(|p| only.is_empty() || only.iter().any(|n| n == p.name()))
                .collect();
            if chosen.is_empty() {
                anyhow::bail!("--only names no projector; known: audit, state");
            }
            let ledger = open_ledger(config, data_dir)?;
            let projections = Projections::connect(&url).await?;
            projections.migrate().await?;
            let head = ledger.head().position;
            for p in &chosen {
                let started = std::time::Instant::now();
                let reached = projections
                    .rebuild(&ledger, p.as_ref(), batch.max(1))
                    .await?;
                let secs = started.elapsed().as_secs_f64();
                eprintln!(
                    "rebuilt `{}`: {reached} events in {secs:.1} s ({:.0} events/s)",
                    p.name(),
                    reached as f64 / secs.max(1e-9)
                );
                if reached != head {
                    anyhow::bail!(
                        "projector `{}` stopped at {reached}, the ledger's head is {head}",
                        p.name()
                    );
                }
            }
            projections.analyze().await?;
            ledger.close().await;
            Ok(std::process::ExitCode::SUCCESS)
        }
        ProjectionsCommand::Status {
            projections_url,
            json,
        } => {
            let url = database_url(config, projections_url).context(
                "no projections database: set projections.database_url or pass --projections-url",
            )?;
            let projections = Projections::connect(&url).await?;
            let positions = projections.positions().await?;
            let head = open_ledger(config, data_dir)
                .ok()
                .map(|l| l.head().position);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "ledger_head": head, "projectors": positions })
                );
            } else {
                if let Some(h) = head {
                    println!("ledger head   {h}");
                }
                for (name, pos) in positions {
                    match head {
                        Some(h) => println!("{name:<13} {pos} ({} behind)", h.saturating_sub(pos)),
                        None => println!("{name:<13} {pos}"),
                    }
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn open_ledger(config: &Config, data_dir: &Path) -> anyhow::Result<Ledger> {
    let lc = config.ledger_config(data_dir);
    if !lc.path.join("db").exists() {
        anyhow::bail!(
            "no ledger in {}: run `backstop serve` first, or pass --data-dir",
            lc.path.display()
        );
    }
    Ledger::open(&lc).with_context(|| format!("cannot open the ledger in {}", data_dir.display()))
}

/// The configured API tokens: `[[api.tokens]]` (hashes) and `api.tokens_file` (plain tokens).
pub fn tokens(config: &Config) -> anyhow::Result<Tokens> {
    let mut entries = Vec::new();
    for t in &config.api.tokens {
        let role = t
            .role
            .parse()
            .map_err(|e: String| anyhow::anyhow!("api.tokens `{}`: {e}", t.name))?;
        entries.push(TokenEntry::from_hash(&t.name, role, &t.sha3).map_err(anyhow::Error::msg)?);
    }
    if let Some(path) = &config.api.tokens_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read api.tokens_file {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(m) = std::fs::metadata(path)
                && m.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(path = %path.display(), "the tokens file is readable by other users; chmod 600 it");
            }
        }
        entries.extend(
            backstop_api::auth::parse_tokens_file(&text)
                .map_err(|e| anyhow::anyhow!("api.tokens_file {}: {e}", path.display()))?,
        );
    }
    let mut names = std::collections::HashSet::new();
    for e in &entries {
        if !names.insert(e.name.clone()) {
            anyhow::bail!("API token name `{}` is used twice", e.name);
        }
    }
    Ok(Tokens::new(entries))
}

/// The read side's configuration, checked by [`check_read_side`] before `serve` starts anything.
pub struct CheckedReadSide {
    tokens: Tokens,
    /// The projections database (connected lazily) and its URL for the logs.
    projections: Option<(Projections, String)>,
    /// The API's address, already bound; `None` when the default address was taken.
    listener: Option<tokio::net::TcpListener>,
    /// HTTPS (`api.tls_cert`, `api.tls_key`), loaded.
    tls: Option<backstop_api::TlsAcceptor>,
}

/// Checks what the read side is configured with, so that a mistake stops `serve` at once with its
/// message instead of surfacing after the ledger, the outbox and the workers have started: the API
/// tokens (every `[[api.tokens]]` entry, and `api.tokens_file` read and parsed), the projections
/// URL (parsed; the database itself may still be starting, the projectors wait for it), and the
/// API address (bound here, so that an explicit address that cannot be listened on is an error).
pub async fn check_read_side(
    config: &Config,
    projections_url: Option<String>,
    listen: Option<String>,
) -> anyhow::Result<CheckedReadSide> {
    let tokens = tokens(config)?;
    trusted_proxies(config)?;
    let tls = match (&config.api.tls_cert, &config.api.tls_key) {
        (Some(cert), Some(key)) => Some(backstop_api::tls_acceptor(cert, key)?),
        (None, None) => None,
        _ => anyhow::bail!(
            "api.tls_cert and api.tls_key go together: give both (PEM files) to serve HTTPS, or neither"
        ),
    };
    let projections = match database_url(config, projections_url) {
        None => None,
        Some(url) => {
            let p = Projections::connect_lazy(&url)
                .context("projections.database_url (or --projections-url) is not usable")?;
            Some((p, url))
        }
    };
    let explicit = listen.or_else(|| config.api.listen.clone());
    let addr = explicit
        .clone()
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => Some(l),
        Err(e) if explicit.is_none() => {
            tracing::warn!(%addr, error = %e, "cannot listen on the default API address; serving no API (set api.listen to choose another)");
            None
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(e).with_context(|| {
                format!("cannot listen on {addr} (api.listen or --listen): another process is using it; stop it or choose another address")
            });
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot listen on {addr} (api.listen or --listen): give a local HOST:PORT, e.g. 127.0.0.1:8080")
            });
        }
    };
    Ok(CheckedReadSide {
        tokens,
        projections,
        listener,
        tls,
    })
}

/// `api.trusted_proxies`, parsed.
fn trusted_proxies(config: &Config) -> anyhow::Result<Vec<std::net::IpAddr>> {
    config
        .api
        .trusted_proxies
        .iter()
        .map(|p| {
            p.trim().parse().with_context(|| {
                format!("api.trusted_proxies: {p:?} is not an IP address (give the proxy's address, e.g. \"127.0.0.1\")")
            })
        })
        .collect()
}

/// What `serve` passes to [`spawn_read_side`].
pub struct ReadSide<'a> {
    pub config: &'a Config,
    /// Where the ledger's signing key is by default (it signs the audit export's statement).
    pub data_dir: &'a Path,
    pub ledger: &'a Ledger,
    pub appender: Arc<dyn Appender>,
    pub checked: CheckedReadSide,
    pub publication: bool,
    pub storage: Option<Arc<dyn StorageProbe>>,
    pub schedules: Option<Arc<dyn backstop_api::ScheduleView>>,
    /// The cost page's prices and recommendations (`cost_cmd::CostSource`).
    pub cost: Option<Arc<dyn backstop_api::CostView>>,
    /// The webhook logs `POST /webhooks/NAME` appends to.
    pub webhooks: backstop_ops::webhook::WebhookLogs,
}

/// Starts the projectors (if a database is configured) and the API on `tasks`, all stopping on
/// `shutdown`. Returns the address the API listens on, if any. Nothing here can fail: what could
/// was checked by [`check_read_side`]. Until the projections' migrations have run, the API
/// answers what needs them with 503 and the reason (`backstop_api::ReadModels`).
pub fn spawn_read_side(
    side: ReadSide<'_>,
    tasks: &mut JoinSet<Result<(), LedgerError>>,
    shutdown: &watch::Receiver<bool>,
) -> Option<std::net::SocketAddr> {
    let config = side.config;
    let CheckedReadSide {
        tokens,
        projections,
        listener,
        tls,
    } = side.checked;
    let (read_models, read_models_rx) = watch::channel(ReadModels::Migrating);
    let read_models = Arc::new(read_models);
    let projections = match projections {
        None => {
            tracing::warn!(
                "projections are off: set projections.database_url (or --projections-url) to a PostgreSQL database to get the dashboard, the audit trail and backup metrics"
            );
            None
        }
        Some((p, url)) => {
            tracing::info!(url = %backstop_projections::redact(&url), "projections on");
            for projector in projectors() {
                let (p, ledger, shutdown) = (p.clone(), side.ledger.clone(), shutdown.clone());
                let read_models = read_models.clone();
                tasks.spawn(async move {
                    migrate_then_run(p, ledger, projector, &read_models, shutdown).await;
                    Ok(())
                });
            }
            Some(p)
        }
    };

    let listener = listener?;
    let local = listener.local_addr().ok();
    if tokens.is_empty() && !config.api.public_dashboard.unwrap_or(false) {
        tracing::warn!(
            "no API token is configured: every API request will be refused (401); add [[api.tokens]] or api.tokens_file"
        );
    }
    let defaults = ApiConfig::default();
    let mut state = ApiState::new(
        ApiConfig {
            tokens,
            public_dashboard: config.api.public_dashboard.unwrap_or(false),
            metrics_public: config.api.metrics_public.unwrap_or(true),
            publication: side.publication,
            max_body_bytes: config.api.max_body_bytes.unwrap_or(defaults.max_body_bytes),
            request_timeout: config
                .api
                .request_timeout_seconds
                .map(std::time::Duration::from_secs)
                .unwrap_or(defaults.request_timeout),
            max_concurrent_requests: config
                .api
                .max_concurrent_requests
                .unwrap_or(defaults.max_concurrent_requests),
            refusals_per_minute: config
                .api
                .refusals_per_minute
                .unwrap_or(defaults.refusals_per_minute),
            sign_ins_per_minute: config
                .api
                .sign_ins_per_minute
                .unwrap_or(defaults.sign_ins_per_minute),
            denial_window: config
                .api
                .denial_window_seconds
                .map(std::time::Duration::from_secs)
                .unwrap_or(defaults.denial_window),
            session_ttl: config
                .api
                .session_hours
                .map(|h| std::time::Duration::from_secs(h * 3600))
                .unwrap_or(defaults.session_ttl),
            secure_cookies: config.api.secure_cookies.unwrap_or(false),
            // Checked by `check_read_side`.
            trusted_proxies: trusted_proxies(config).unwrap_or_default(),
        },
        side.ledger.clone(),
        side.appender,
        projections,
        shutdown.clone(),
    )
    .with_read_models(read_models_rx)
    // The zone was checked when the configuration was loaded.
    .with_reports(
        config
            .reports
            .zone()
            .unwrap_or(chrono_tz::America::New_York),
        crate::wiring::cost_estimator(config),
    );
    if let Some(probe) = side.storage {
        state = state.with_storage(probe);
    }
    // The ledger opened (or created) this key already; the export signs its statement with it.
    let key_path = config.ledger_config(side.data_dir).signing_key;
    match backstop_ledger::CheckpointSigner::load_or_create(&key_path) {
        Ok(signer) => state = state.with_export_signer(Arc::new(signer)),
        Err(e) => {
            tracing::warn!(error = %e, "the audit export is off: it cannot sign without the ledger's key")
        }
    }
    if let Some(view) = side.schedules {
        state = state.with_schedules(view);
    }
    if let Some(view) = side.cost {
        state = state.with_cost(view);
    }
    state = state.with_webhooks(side.webhooks);
    match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(handle) => state = state.with_prometheus(handle),
        Err(e) => {
            tracing::warn!(error = %e, "no process metrics recorder; /metrics shows projections and ledger figures only")
        }
    }
    tracing::info!(address = ?local, https = tls.is_some(), "API and dashboard listening");
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        let served = match tls {
            Some(acceptor) => backstop_api::serve_tls(listener, acceptor, state, shutdown).await,
            None => backstop_api::serve(listener, state, shutdown).await,
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "the API server stopped");
        }
        Ok(())
    });
    local
}

/// Applies the migrations (retrying while PostgreSQL is unreachable), tells the API the read
/// models are ready, then runs the projector.
async fn migrate_then_run(
    p: Projections,
    ledger: Ledger,
    projector: Arc<dyn backstop_projections::Projector>,
    read_models: &watch::Sender<ReadModels>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut delay = std::time::Duration::from_millis(250);
    loop {
        match p.migrate().await {
            Ok(()) => {
                read_models.send_replace(ReadModels::Ready);
                break;
            }
            Err(e) => {
                // Every projector migrates; once one has succeeded the read models stay ready.
                read_models.send_if_modified(|state| {
                    let waiting = *state != ReadModels::Ready;
                    if waiting {
                        *state = ReadModels::Waiting {
                            error: e.to_string(),
                        };
                    }
                    waiting
                });
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "projections database not ready");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return,
                }
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
    backstop_projections::run(p, ledger, projector, shutdown).await;
}
