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
//! - Every refused request (401, 403, and the 429s past a client's refusal limit) is counted in
//!   an `access.denied` event: the first of a client's window at once, the rest of the window as
//!   one event with their count ([`guard`]; [`auth`] has the role matrix). A flood of refusals
//!   writes a few events, never one per request.
//! - Limits, each a tower layer in [`router`]: request bodies of at most `api.max_body_bytes`
//!   (413), an answer within `api.request_timeout_seconds` (408), at most
//!   `api.max_concurrent_requests` requests in progress (the others wait for a slot).
//! - An anonymous viewer of a public dashboard never sees hosts, operators, endpoints, storage
//!   locations or error texts ([`redact`]).
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
pub mod guard;
mod handlers;
mod live;
mod metrics_text;
mod ops_pages;
mod pages;
pub mod params;
pub mod redact;
mod reports;
mod webhooks;

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
pub use tokio_rustls::TlsAcceptor;

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
    /// Which copy each repository location is (`primary`, a replica's name), for the cost
    /// per region; empty: the series are shown by location only.
    fn copy_names(&self) -> std::collections::BTreeMap<String, String> {
        std::collections::BTreeMap::new()
    }
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
    /// The largest request body accepted (413 beyond); `api.max_body_bytes`, default 64 KiB.
    pub max_body_bytes: usize,
    /// The longest a request may take to be answered (408 beyond; a stream's body is not
    /// counted); `api.request_timeout_seconds`, default 30.
    pub request_timeout: Duration,
    /// Requests in progress at once; `api.max_concurrent_requests`, default 256.
    pub max_concurrent_requests: usize,
    /// Refused requests a client may make per minute before it gets 429s (and as many at once);
    /// `api.refusals_per_minute`, default 30.
    pub refusals_per_minute: u32,
    /// Sign-in attempts per client and minute; `api.sign_ins_per_minute`, default 10.
    pub sign_ins_per_minute: u32,
    /// A client's refusals within this window are recorded as one event with their count;
    /// `api.denial_window_seconds`, default 60.
    pub denial_window: Duration,
    /// How long a sign-in session lasts; `api.session_hours`, default 12.
    pub session_ttl: Duration,
    /// Mark the sign-in cookie `Secure` (always); `api.secure_cookies`. When false it is still
    /// marked when a trusted proxy says the request came over HTTPS.
    pub secure_cookies: bool,
    /// Proxies whose `X-Forwarded-For` and `X-Forwarded-Proto` are believed;
    /// `api.trusted_proxies`, default none.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            tokens: Tokens::default(),
            public_dashboard: false,
            metrics_public: true,
            publication: false,
            max_body_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 256,
            refusals_per_minute: 30,
            sign_ins_per_minute: 10,
            denial_window: Duration::from_secs(60),
            session_ttl: Duration::from_secs(12 * 3600),
            secure_cookies: false,
            trusted_proxies: Vec::new(),
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
    guards: guard::Guards,
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
    /// The webhook logs `POST /webhooks/NAME` appends to ([`ApiState::with_webhooks`]).
    webhooks: backstop_ops::webhook::WebhookLogs,
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
        let guards = guard::Guards {
            clock: Arc::new(backstop_ops::schedule::clock::SystemClock),
            refusals: guard::Buckets::new(guard::Rate {
                per_minute: config.refusals_per_minute,
            }),
            sign_ins: guard::Buckets::new(guard::Rate {
                per_minute: config.sign_ins_per_minute,
            }),
            denials: guard::Denials::new(config.denial_window),
            sessions: guard::Sessions::new(config.session_ttl),
        };
        ApiState(Arc::new(Inner {
            guards,
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
            webhooks: backstop_ops::webhook::WebhookLogs::default(),
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

    /// Replaces the clock the limits, the denial windows and the sessions read (call before
    /// serving; tests pass a `ManualClock`).
    pub fn with_clock(mut self, clock: Arc<dyn backstop_ops::schedule::clock::Clock>) -> ApiState {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.guards.clock = clock;
        }
        self
    }

    /// Adds the webhook logs that `POST /webhooks/NAME` appends to (call before serving).
    pub fn with_webhooks(mut self, logs: backstop_ops::webhook::WebhookLogs) -> ApiState {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.webhooks = logs;
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

    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.0.guards.clock.now()
    }

    /// Who is calling: the bearer token's holder, or (on reads) the sign-in session's.
    pub(crate) fn caller(&self, ctx: &Ctx) -> Caller {
        if let Some(token) = ctx.bearer() {
            return auth::identify(&self.0.config.tokens, Some(&token));
        }
        if (ctx.method == Method::GET || ctx.method == Method::HEAD)
            && let Some(id) = pages::cookie_session(&ctx.headers)
            && let Some(s) = self.0.guards.sessions.get(&id, self.now())
        {
            return Caller::Known {
                name: s.name,
                role: s.role,
            };
        }
        Caller::Anonymous
    }

    /// The client a request comes from, for its limits: the peer address, or the address a
    /// trusted proxy names (the last of `X-Forwarded-For`).
    pub(crate) fn client_ip(&self, ctx: &Ctx) -> String {
        let Some(peer) = ctx.peer else {
            return "unknown address".into();
        };
        if self.0.config.trusted_proxies.contains(&peer.ip())
            && let Some(forwarded) = ctx
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok())
        {
            return forwarded.to_string();
        }
        peer.ip().to_string()
    }

    /// Whether the request came over HTTPS, as far as this server can tell: `secure_cookies` on,
    /// or a trusted proxy saying so in `X-Forwarded-Proto`.
    pub(crate) fn https(&self, ctx: &Ctx) -> bool {
        self.0.config.secure_cookies
            || ctx.over_tls()
            || ctx.peer.is_some_and(|p| {
                self.0.config.trusted_proxies.contains(&p.ip())
                    && ctx
                        .headers
                        .get("x-forwarded-proto")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
            })
    }

    /// The sign-in sessions.
    pub(crate) fn sessions(&self) -> &guard::Sessions {
        &self.0.guards.sessions
    }

    /// Takes a sign-in attempt from the client's bucket (before the token is checked); a 429
    /// once the client has used its attempts, counted as a refusal but not written on its own.
    pub(crate) async fn sign_in_attempt(&self, ctx: &Ctx) -> Result<(), ApiError> {
        let client = self.client_ip(ctx);
        if let Err(secs) = self.0.guards.sign_ins.take(&client, self.now()) {
            let refusal = ApiError::TooManyRequests {
                retry_after: secs,
                what: "too many sign-in attempts from your address".into(),
            };
            self.count_refusal(ctx, &client, &Caller::Anonymous, &refusal)
                .await;
            return Err(refusal);
        }
        Ok(())
    }

    /// Decides whether the request may proceed; counts a refusal in the `access.denied` events
    /// (see [`guard`]). A client past its refusal limit is answered 429 before its credentials
    /// are looked at; a valid token is never throttled.
    pub(crate) async fn authorize(&self, ctx: &Ctx, need: Need) -> Result<Caller, ApiError> {
        let caller = self.caller(ctx);
        match (&caller, need) {
            (Caller::Known { role, .. }, need) if need.allows(*role) => return Ok(caller),
            (Caller::Anonymous, Need::Dashboard) if self.0.config.public_dashboard => {
                redact::mark_anonymous();
                return Ok(caller);
            }
            _ => {}
        }
        let client = self.client_ip(ctx);
        let refusal = if let Err(secs) = self.0.guards.refusals.take(&client, self.now()) {
            ApiError::TooManyRequests {
                retry_after: secs,
                what: "too many refused requests from your address".into(),
            }
        } else {
            match (&caller, need) {
                (Caller::Anonymous, _) => {
                    ApiError::Unauthorized(if self.0.config.tokens.is_empty() {
                        "no token given, and no API token is configured on this server: add [[api.tokens]] (name, role, sha3) or api.tokens_file to the configuration, then send `Authorization: Bearer TOKEN`".into()
                    } else {
                        "no token given: send `Authorization: Bearer TOKEN` (or sign in at /login for the dashboard)".into()
                    })
                }
                (Caller::UnknownToken { .. }, _) => ApiError::Unauthorized(
                    "the token is not valid on this server (unknown or revoked)".into(),
                ),
                (Caller::Known { role, .. }, need) => ApiError::Forbidden(format!(
                    "{}; your token has the {role} role",
                    need.describe()
                )),
            }
        };
        self.count_refusal(ctx, &client, &caller, &refusal).await;
        Err(refusal)
    }

    /// Refuses a request that is not about API tokens (a webhook log's own token): a 429 once
    /// the client is past its refusal limit, else `refusal`; counted like every refusal.
    pub(crate) async fn refuse(&self, ctx: &Ctx, caller: &Caller, refusal: ApiError) -> ApiError {
        let client = self.client_ip(ctx);
        let refusal = match self.0.guards.refusals.take(&client, self.now()) {
            Err(secs) => ApiError::TooManyRequests {
                retry_after: secs,
                what: "too many refused requests from your address".into(),
            },
            Ok(_) => refusal,
        };
        self.count_refusal(ctx, &client, caller, &refusal).await;
        refusal
    }

    /// Counts a refusal in its client's window; records what the window says to record now.
    async fn count_refusal(&self, ctx: &Ctx, client: &str, caller: &Caller, refusal: &ApiError) {
        let operator = match caller {
            Caller::Known { name, .. } => Some(name.clone()),
            _ => None,
        };
        // A known token's holder is counted apart, so the aggregate's actor stays right.
        let key = match &operator {
            Some(name) => format!("{client} {name}"),
            None => client.to_string(),
        };
        let r = guard::Refusal {
            operator,
            caller: caller.describe(&ctx.peer()),
            role: caller.role().map(|r| r.to_string()),
            method: ctx.method.to_string(),
            path: ctx.path.chars().take(512).collect(),
            reason: refusal.to_string(),
        };
        if let Some(a) = self.0.guards.denials.refused(&key, r, self.now()) {
            self.record_denial(a).await;
        }
    }

    /// Records the refusals of the windows that are over (all of them when `all`, at shutdown).
    /// `serve` calls it every window; tests call it after moving their clock.
    pub async fn flush_denials(&self, all: bool) {
        for a in self.0.guards.denials.flush(self.now(), all) {
            self.record_denial(a).await;
        }
    }

    async fn record_denial(&self, a: guard::Aggregated) {
        let r = a.refusal;
        let actor = match &r.operator {
            Some(name) => Actor::operator(name.clone()),
            None => Actor::worker("api"),
        };
        let event = Event::AccessDenied(AccessDenied {
            caller: r.caller,
            role: r.role,
            method: r.method,
            path: r.path,
            reason: r.reason,
            count: a.count,
            window_seconds: a.window_seconds,
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
    /// The request came over this server's own TLS.
    pub tls: bool,
}

impl Ctx {
    fn over_tls(&self) -> bool {
        self.tls
    }

    fn peer(&self) -> String {
        self.peer
            .map(|p| p.ip().to_string())
            .unwrap_or_else(|| "unknown address".into())
    }

    /// The bearer token of the `Authorization` header, if there is one.
    pub(crate) fn bearer(&self) -> Option<String> {
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
            tls: parts.extensions.get::<OverTls>().is_some(),
        })
    }
}

/// The routes. See [`auth`] for who may call what.
pub fn router(state: ApiState) -> Router {
    let limits = state.0.config.clone();
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
        .route("/api/reencryption", get(handlers::reencryption))
        .route("/api/audit", get(handlers::audit))
        .route("/api/audit/export", get(handlers::audit_export))
        .route("/api/events/stream", get(live::stream))
        .route("/webhooks/{name}", post(webhooks::receive))
        .fallback(handlers::not_found)
        // Innermost first: the answers to anonymous viewers are redacted after the handler;
        .layer(axum::middleware::from_fn(redact::layer))
        // a body past the limit is refused with 413 before a handler buffers it;
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            limits.max_body_bytes,
        ))
        // at most this many requests run at once; the others wait for a slot. The API's work is
        // PostgreSQL queries, ledger reads and appends: past a few hundred in flight they only
        // queue up in the pool and the writer, each holding its memory meanwhile, so a burst
        // waits here, where waiting costs nothing, rather than inside. One semaphore for all
        // routes (the `Global` layer: `Router::layer` wraps each route on its own);
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            limits.max_concurrent_requests.max(1),
        ))
        // and a request waiting for a slot or for its answer past the time limit gets a 408
        // (a live stream's or an export's body, sent after the answer starts, is not counted).
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
        .layer(axum::middleware::from_fn(metrics_text::track))
        .with_state(state)
}

/// Marks a request that came over this server's own TLS (`api.tls_cert`): its cookie is `Secure`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OverTls;

/// Why the TLS certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// The TLS configuration from PEM files: `cert` holds the certificate chain (leaf first), `key`
/// the private key (PKCS#8, PKCS#1 or SEC1). TLS 1.2 and 1.3, rustls's safe defaults, ALPN for
/// HTTP/2 and HTTP/1.1.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError(format!("api.tls_cert {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "api.tls_cert {}: no certificate in the file (expected PEM `BEGIN CERTIFICATE` blocks)",
            cert.display()
        )));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError(format!("api.tls_key {}: {e}", key.display())))?;
    // The provider is named: with more than one compiled in, rustls will not pick one itself.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| {
            TlsError(format!(
                "api.tls_cert and api.tls_key do not make a usable pair: {e}"
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// How long a client may take to finish the TLS handshake: one that connects and says nothing
/// would otherwise hold a task for good.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the router over TLS on `listener` until `shutdown` turns true; then stops accepting and
/// waits for the connections in progress (live streams end with the same watch).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: ApiState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt as _;
    let flusher = spawn_denial_flusher(&state, shutdown.clone());
    let app = router(state);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, usually: the next accept may succeed.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => break,
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper::service::service_fn(
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    req.extensions_mut().insert(OverTls);
                    app.clone().oneshot(req)
                },
            );
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    let _ = flusher.await;
    Ok(())
}

/// The refusals of each denial window are recorded when it ends, even if the client went quiet;
/// what is left is recorded at shutdown.
fn spawn_denial_flusher(
    state: &ApiState,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let state = state.clone();
    let mut stop = shutdown;
    tokio::spawn(async move {
        let window = chrono::Duration::from_std(state.0.config.denial_window)
            .unwrap_or(chrono::Duration::seconds(60));
        loop {
            let next = state.now() + window;
            tokio::select! {
                _ = state.0.guards.clock.sleep_until(next) => state.flush_denials(false).await,
                _ = async { stop.wait_for(|s| *s).await.is_ok() } => break,
            }
        }
        state.flush_denials(true).await;
    })
}

/// Serves the router on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let flusher = spawn_denial_flusher(&state, shutdown.clone());
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
    let _ = flusher.await;
    served
}
