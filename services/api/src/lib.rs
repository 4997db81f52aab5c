//! The dashboard, the JSON API, `/metrics` and the audit export, served by axum from the
//! projections (PostgreSQL) and the ledger.
//!
//! ```text
//!  browser ── GET /, /backups/ID, /audit ─────┐
//!  scripts ── GET /api/... POST /api/... ─────┼─► auth (tokens, roles) ─► projections (reads)
//!  Prometheus ── GET /metrics ────────────────┘                         ─► ledger (appends, SSE,
//!                                                                          audit export)
//! ```
//!
//! Invariants:
//! - Every error goes through [`error::ApiError`] (one mapping to status codes); malformed input
//!   is a 400 with a message, never a 500.
//! - Every refused request (401, 403) is recorded as an `access.denied` event before the answer
//!   is sent ([`auth`] has the role matrix).
//! - Without a projections database the API still serves `/healthz`, `/metrics` (ledger figures)
//!   and the live event stream; pages that need projections answer 503 with what to configure.
//! - Until the read models are ready ([`ReadModels`]: `serve` listens before the projections'
//!   migrations have run, and PostgreSQL may still be starting), pages that need projections
//!   answer 503 with the reason and `Retry-After`, never a 500 about a table that is not there
//!   yet.
//! - Live streams end when the shutdown watch fires, so a graceful shutdown never waits on a
//!   browser.

pub mod audit_export;
pub mod auth;
pub mod charts;
pub mod error;
mod handlers;
mod live;
mod metrics_text;
mod ops_pages;
mod pages;
pub mod params;
mod reports;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use axum::routing::{get, post};
use backstop_events::{AccessDenied, Actor, Event, NewEvent, streams};
use backstop_ledger::{Appender, ExpectedVersion, Ledger};
use backstop_projections::Projections;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::sync::watch;

pub use auth::{Need, Role, TokenEntry, Tokens};
pub use error::ApiError;

use auth::Caller;

/// A live check of the backup storage, supplied by whoever knows the repository (the CLI).
#[async_trait]
pub trait StorageProbe: Send + Sync {
    /// What is probed, for people: `s3://bucket/prefix at http://host:port`, `/var/backups/x`.
    fn describe(&self) -> String;
    /// Round-trips to the storage; the time it took, or what went wrong.
    async fn probe(&self) -> Result<Duration, String>;
}

/// Where the cost page learns the configured budget and prices, and the retention
/// recommendations computed from the repository's backups (supplied by the CLI, which holds the
/// repository; the usage samples themselves come from the projections).
#[async_trait]
pub trait CostView: Send + Sync {
    fn config(&self) -> backstop_ops::cost::CostConfig;
    /// None when the repository cannot be read here (the page says so).
    async fn recommendations(&self) -> Option<backstop_ops::cost::Recommendations>;
}

/// How the API behaves; from the `[api]` section of the configuration.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub tokens: Tokens,
    /// Serve the overview and backup pages (and their JSON) without a token.
    pub public_dashboard: bool,
    /// Serve `/metrics` without a token (the Prometheus convention on a private network).
    pub metrics_public: bool,
    /// Whether events are published to NATS (so the publication lag means something).
    pub publication: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            tokens: Tokens::default(),
            public_dashboard: false,
            metrics_public: true,
            publication: false,
        }
    }
}

/// Whether the read models can be queried yet; told to the API by whoever migrates them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadModels {
    /// The schema migrations are running (or waiting for another instance's to finish).
    Migrating,
    /// The projections database has not accepted the migrations yet; they are retried.
    Waiting { error: String },
    /// Migrated: queries find every table they read.
    Ready,
}

/// The next scheduled backup of a source, as the dashboard shows it.
#[derive(Clone, Debug, Serialize)]
pub struct NextRun {
    pub source: String,
    pub schedule: String,
    pub at: chrono::DateTime<chrono::Utc>,
    /// The same instant on the schedule's wall clock (`2026-12-02 02:00 -05:00 America/New_York`).
    pub local: String,
    pub kind: String,
    pub method: String,
}

/// Where the dashboard learns when each source is backed up next (the process's schedules).
pub trait ScheduleView: Send + Sync {
    /// The next run of every scheduled source after `now`, soonest first.
    fn next_runs(&self, now: chrono::DateTime<chrono::Utc>) -> Vec<NextRun>;
}

/// What a client is told to wait before asking again while the read models are not ready.
pub const READ_MODELS_RETRY_AFTER_SECS: u64 = 2;

/// The result of a storage probe, as shown and cached.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeResult {
    pub configured: bool,
    pub target: Option<String>,
    pub ok: bool,
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
    pub checked_at: chrono::DateTime<chrono::Utc>,
}

struct Inner {
    config: ApiConfig,
    projections: Option<Projections>,
    ledger: Ledger,
    appender: Arc<dyn Appender>,
    storage: Option<Arc<dyn StorageProbe>>,
    schedules: Option<Arc<dyn ScheduleView>>,
    cost: Option<Arc<dyn CostView>>,
    prometheus: Option<PrometheusHandle>,
    /// Signs the audit export's coverage statement: the ledger's checkpoint key.
    export_signer: Option<Arc<backstop_ledger::CheckpointSigner>>,
    /// The weekly summary's zone and prices ([`ApiState::with_reports`]).
    report_zone: chrono_tz::Tz,
    report_cost: Option<backstop_ops::alerting::CostEstimator>,
    report_cache: tokio::sync::Mutex<Option<(Instant, backstop_ops::report::WeeklyReport)>>,
    templates: minijinja::Environment<'static>,
    probe_cache: Mutex<Option<(Instant, ProbeResult)>>,
    /// A background probe is running.
    probing: std::sync::atomic::AtomicBool,
    /// The overview, computed at most once per [`OVERVIEW_TTL`]: under load every request in
    /// that window shares one computation (the lock also keeps them from computing it at once).
    overview_cache: tokio::sync::Mutex<Option<(Instant, Arc<handlers::Overview>)>>,
    /// Ready unless [`ApiState::with_read_models`] says otherwise.
    read_models: watch::Receiver<ReadModels>,
    shutdown: watch::Receiver<bool>,
}

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct ApiState(Arc<Inner>);

/// How long a storage probe result is reused: the overview under load must not hammer S3.
const PROBE_TTL: Duration = Duration::from_secs(10);

/// How long a computed overview is reused. Live updates refresh after a longer pause, so a
/// person never sees a stale one.
const OVERVIEW_TTL: Duration = Duration::from_secs(1);

impl ApiState {
    pub fn new(
        config: ApiConfig,
        ledger: Ledger,
        appender: Arc<dyn Appender>,
        projections: Option<Projections>,
        shutdown: watch::Receiver<bool>,
    ) -> ApiState {
        ApiState(Arc::new(Inner {
            config,
            projections,
            ledger,
            appender,
            storage: None,
            schedules: None,
            cost: None,
            prometheus: None,
            export_signer: None,
            report_zone: chrono_tz::America::New_York,
            report_cost: None,
            report_cache: tokio::sync::Mutex::new(None),
            templates: pages::templates(),
            probe_cache: Mutex::new(None),
            probing: std::sync::atomic::AtomicBool::new(false),
            overview_cache: tokio::sync::Mutex::new(None),
            // A receiver keeps the last value after its sender is gone: ready for good.
            read_models: watch::channel(ReadModels::Ready).1,
            shutdown,
        }))
    }

    /// Follows the read models' readiness (call before serving): until it turns
    /// [`ReadModels::Ready`], whatever needs the projections answers 503 with the reason.
    pub fn with_read_models(mut self, readiness: watch::Receiver<ReadModels>) -> ApiState {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.read_models = readiness;
        }
        self
    }

    /// Adds the live storage check (call before serving).
    pub fn with_storage(mut self, probe: Arc<dyn StorageProbe>) -> ApiState {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.storage = Some(probe);
        }
        self
    }

    /// Adds the schedules, for the next run per source (call before serving).
    pub fn with_schedules(mut self, view: Arc<dyn ScheduleView>) -> ApiState {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.schedules = Some(view);
        }
        self
    }

    /// Adds the cost page's budget, prices and recommendations (call before serving).
    pub fn with_cost(mut self, view: Arc<dyn CostView>) -> ApiState {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.cost = Some(view);
        }
        self
    }

    /// Adds the ledger's checkpoint key, which signs the audit export's coverage statement
    /// (call before serving; without it the export answers 503).
    pub fn with_export_signer(
        mut self,
        signer: Arc<backstop_ledger::CheckpointSigner>,
    ) -> ApiState {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.export_signer = Some(signer);
        }
        self
    }

    /// The next scheduled runs, soonest first (none when no schedule is configured).
    pub(crate) fn next_runs(&self, now: chrono::DateTime<chrono::Utc>) -> Vec<NextRun> {
        self.0
            .schedules
            .as_ref()
            .map(|s| s.next_runs(now))
            .unwrap_or_default()
    }

    /// The zone of the weekly summary's weeks and the prices of its cost line (call before
    /// serving; default America/New_York, no prices).
    pub fn with_reports(
        mut self,
        zone: chrono_tz::Tz,
        cost: Option<backstop_ops::alerting::CostEstimator>,
    ) -> ApiState {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.report_zone = zone;
            inner.report_cost = cost;
        }
        self
    }

    /// Adds a Prometheus recorder whose metrics `/metrics` appends (HTTP request metrics, and any
    /// `metrics::counter!` other crates record, such as worker redeliveries).
    pub fn with_prometheus(mut self, handle: PrometheusHandle) -> ApiState {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.prometheus = Some(handle);
        }
        self
    }

    /// The projections, once they are configured and their read models ready.
    fn projections(&self) -> Result<&Projections, ApiError> {
        let projections = self.0.projections.as_ref().ok_or_else(|| {
            ApiError::Unavailable(
                "projections are not configured: set projections.database_url (or --projections-url / BACKSTOP_PROJECTIONS_URL) to a PostgreSQL database Backstop may create tables in, and restart `backstop serve`".into(),
            )
        })?;
        match &*self.0.read_models.borrow() {
            ReadModels::Ready => Ok(projections),
            ReadModels::Migrating => Err(ApiError::NotReady(
                "the read models are not ready yet: `backstop serve` is applying the projections' database migrations; retry in a few seconds".into(),
            )),
            ReadModels::Waiting { error } => Err(ApiError::NotReady(format!(
                "the read models are not ready yet: the projections database has not accepted the migrations ({error}); `backstop serve` keeps retrying, check that the database is up and projections.database_url is right"
            ))),
        }
    }

    /// The storage status for pages and metrics: the last probe's result, refreshed in the
    /// background once it is older than [`PROBE_TTL`], so a storage outage (probes timing out)
    /// never slows a page down. Only the very first call waits for a probe.
    pub async fn storage_status(&self, fresh: bool) -> ProbeResult {
        if fresh {
            return self.probe_now().await;
        }
        let cached = self
            .0
            .probe_cache
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|(at, r)| (at.elapsed(), r.clone())));
        match cached {
            Some((age, r)) if age < PROBE_TTL => r,
            Some((_, r)) => {
                if !self
                    .0
                    .probing
                    .swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.probe_now().await;
                        me.0.probing
                            .store(false, std::sync::atomic::Ordering::Release);
                    });
                }
                r
            }
            None => self.probe_now().await,
        }
    }

    /// Runs the storage probe now (5 s at most) and caches the result.
    async fn probe_now(&self) -> ProbeResult {
        let now = backstop_events::now_micros();
        let result = match &self.0.storage {
            None => ProbeResult {
                configured: false,
                target: None,
                ok: false,
                latency_ms: None,
                error: Some("no storage probe is configured in this process".into()),
                checked_at: now,
            },
            Some(p) => {
                let target = Some(p.describe());
                match tokio::time::timeout(Duration::from_secs(5), p.probe()).await {
                    Ok(Ok(d)) => ProbeResult {
                        configured: true,
                        target,
                        ok: true,
                        latency_ms: Some(d.as_secs_f64() * 1000.0),
                        error: None,
                        checked_at: now,
                    },
                    Ok(Err(e)) => ProbeResult {
                        configured: true,
                        target,
                        ok: false,
                        latency_ms: None,
                        error: Some(e),
                        checked_at: now,
                    },
                    Err(_) => ProbeResult {
                        configured: true,
                        target,
                        ok: false,
                        latency_ms: None,
                        error: Some("no answer within 5 s".into()),
                        checked_at: now,
                    },
                }
            }
        };
        if let Ok(mut cache) = self.0.probe_cache.lock() {
            *cache = Some((Instant::now(), result.clone()));
        }
        result
    }

    /// Decides whether the request may proceed; records a refusal as an `access.denied` event.
    pub(crate) async fn authorize(&self, ctx: &Ctx, need: Need) -> Result<Caller, ApiError> {
        let token = ctx.token();
        let caller = auth::identify(&self.0.config.tokens, token.as_deref());
        let refusal = match (&caller, need) {
            (Caller::Known { role, .. }, need) if need.allows(*role) => return Ok(caller),
            (Caller::Anonymous, Need::Dashboard) if self.0.config.public_dashboard => {
                return Ok(caller);
            }
            (Caller::Anonymous, _) => ApiError::Unauthorized(if self.0.config.tokens.is_empty() {
                "no token given, and no API token is configured on this server: add [[api.tokens]] (name, role, sha3) or api.tokens_file to the configuration, then send `Authorization: Bearer TOKEN`".into()
            } else {
                "no token given: send `Authorization: Bearer TOKEN` (or sign in at /login for the dashboard)".into()
            }),
            (Caller::UnknownToken { .. }, _) => ApiError::Unauthorized(
                "the token is not valid on this server (unknown or revoked)".into(),
            ),
            (Caller::Known { role, .. }, need) => ApiError::Forbidden(format!(
                "{}; your token has the {role} role",
                need.describe()
            )),
        };
        self.record_denial(ctx, &caller, &refusal).await;
        Err(refusal)
    }

    async fn record_denial(&self, ctx: &Ctx, caller: &Caller, refusal: &ApiError) {
        let actor = match caller {
            Caller::Known { name, .. } => Actor::operator(name.clone()),
            _ => Actor::worker("api"),
        };
        let event = Event::AccessDenied(AccessDenied {
            caller: caller.describe(&ctx.peer()),
            role: caller.role().map(|r| r.to_string()),
            method: ctx.method.to_string(),
            path: ctx.path.chars().take(512).collect(),
            reason: refusal.to_string(),
            count: 1,
            window_seconds: 0,
        });
        let stream = streams::access();
        let e = NewEvent::new(stream.clone(), actor, &event);
        let append = self
            .0
            .appender
            .append(&stream, ExpectedVersion::Any, vec![e]);
        match tokio::time::timeout(Duration::from_secs(5), append).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not record a refused request"),
            Err(_) => tracing::error!("recording a refused request timed out"),
        }
    }
}

/// What the handlers need to know about a request for authorization and auditing.
pub(crate) struct Ctx {
    pub headers: HeaderMap,
    pub method: Method,
    pub path: String,
    pub peer: Option<SocketAddr>,
}

impl Ctx {
    fn peer(&self) -> String {
        self.peer
            .map(|p| p.ip().to_string())
            .unwrap_or_else(|| "unknown address".into())
    }

    /// The bearer token, or the sign-in cookie on reads.
    fn token(&self) -> Option<String> {
        if let Some(v) = self.headers.get(axum::http::header::AUTHORIZATION) {
            let v = v.to_str().unwrap_or("");
            let t = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .unwrap_or("")
                .trim();
            // A malformed header counts as a token that matches nothing (401, recorded).
            return Some(t.to_string());
        }
        if self.method == Method::GET || self.method == Method::HEAD {
            return pages::cookie_token(&self.headers);
        }
        None
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Ctx {
            headers: parts.headers.clone(),
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            peer: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        })
    }
}

/// The routes. See [`auth`] for who may call what.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/partials/overview", get(pages::overview_partial))
        .route("/backups/{id}", get(pages::backup))
        .route("/audit", get(pages::audit))
        .route("/health", get(ops_pages::health_page))
        .route("/cost", get(ops_pages::cost_page))
        .route("/api/health", get(ops_pages::health))
        .route("/api/cost", get(ops_pages::cost))
        .route("/reports/weekly", get(reports::weekly_page))
        .route("/api/reports/weekly", get(reports::weekly_json))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(metrics_text::metrics))
        .route("/api/overview", get(handlers::overview))
        .route(
            "/api/backups",
            get(handlers::backups).post(handlers::request_backup),
        )
        .route("/api/backups/{id}", get(handlers::backup))
        .route("/api/restores", post(handlers::request_restore))
        .route("/api/charts/sizes", get(handlers::size_chart))
        .route("/api/charts/storage", get(handlers::storage_chart))
        .route("/api/verifications", get(handlers::verifications))
        .route("/api/storage/connectivity", get(handlers::connectivity))
        .route("/api/recovery-estimate", get(handlers::recovery_estimate))
        .route("/api/alerts", get(handlers::alerts))
        .route("/api/audit", get(handlers::audit))
        .route("/api/audit/export", get(handlers::audit_export))
        .route("/api/events/stream", get(live::stream))
        .fallback(handlers::not_found)
        .layer(axum::middleware::from_fn(metrics_text::track))
        .with_state(state)
}

/// Serves the router on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}
