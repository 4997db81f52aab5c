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

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use backstop_api::{ApiConfig, ApiState, StorageProbe, TokenEntry, Tokens};
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

/// What `serve` passes to [`spawn_read_side`].
pub struct ReadSide<'a> {
    pub config: &'a Config,
    pub ledger: &'a Ledger,
    pub appender: Arc<dyn Appender>,
    pub projections_url: Option<String>,
    pub listen: Option<String>,
    pub publication: bool,
    pub storage: Option<Arc<dyn StorageProbe>>,
}

/// Starts the projectors (if a database is configured) and the API on `tasks`, all stopping on
/// `shutdown`. Returns the address the API listens on, if any.
pub async fn spawn_read_side(
    side: ReadSide<'_>,
    tasks: &mut JoinSet<Result<(), LedgerError>>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let config = side.config;
    let projections = match database_url(config, side.projections_url) {
        None => {
            tracing::warn!(
                "projections are off: set projections.database_url (or --projections-url) to a PostgreSQL database to get the dashboard, the audit trail and backup metrics"
            );
            None
        }
        Some(url) => {
            let p = Projections::connect_lazy(&url)?;
            tracing::info!(url = %backstop_projections::redact(&url), "projections on");
            for projector in projectors() {
                let (p, ledger, shutdown) = (p.clone(), side.ledger.clone(), shutdown.clone());
                tasks.spawn(async move {
                    migrate_then_run(p, ledger, projector, shutdown).await;
                    Ok(())
                });
            }
            Some(p)
        }
    };

    let explicit = side.listen.clone().or_else(|| config.api.listen.clone());
    let addr = explicit
        .clone()
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) if explicit.is_none() => {
            tracing::warn!(%addr, error = %e, "cannot listen on the default API address; serving no API (set api.listen to choose another)");
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot listen on {addr} (api.listen): is another process using it?")
            });
        }
    };
    let local = listener.local_addr().ok();
    let tokens = tokens(config)?;
    if tokens.is_empty() && !config.api.public_dashboard.unwrap_or(false) {
        tracing::warn!(
            "no API token is configured: every API request will be refused (401); add [[api.tokens]] or api.tokens_file"
        );
    }
    let mut state = ApiState::new(
        ApiConfig {
            tokens,
            public_dashboard: config.api.public_dashboard.unwrap_or(false),
            metrics_public: config.api.metrics_public.unwrap_or(true),
            publication: side.publication,
        },
        side.ledger.clone(),
        side.appender,
        projections,
        shutdown.clone(),
    );
    if let Some(probe) = side.storage {
        state = state.with_storage(probe);
    }
    match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(handle) => state = state.with_prometheus(handle),
        Err(e) => {
            tracing::warn!(error = %e, "no process metrics recorder; /metrics shows projections and ledger figures only")
        }
    }
    tracing::info!(address = ?local, "API and dashboard listening");
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = backstop_api::serve(listener, state, shutdown).await {
            tracing::error!(error = %e, "the API server stopped");
        }
        Ok(())
    });
    Ok(local)
}

/// Applies the migrations (retrying while PostgreSQL is unreachable), then runs the projector.
async fn migrate_then_run(
    p: Projections,
    ledger: Ledger,
    projector: Arc<dyn backstop_projections::Projector>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut delay = std::time::Duration::from_millis(250);
    loop {
        match p.migrate().await {
            Ok(()) => break,
            Err(e) => {
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
