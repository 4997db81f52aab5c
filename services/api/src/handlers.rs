//! The JSON API. Each handler: parse and check parameters (400), authorize (401/403, recorded),
//! then read the projections or append to the ledger.

use std::io::Write;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use backstop_events::{
    Actor, BackupKind, BackupMethod, BackupRequested, Event, NewEvent, RecoveryRequested,
    RecoveryScope, Trigger, streams, uuid_v7,
};
use backstop_ledger::ExpectedVersion;
use backstop_projections::read::{
    AlertRow, AuditFilter, BackupRow, RecoveryEstimate, SizePoint, SourceSummary, StoragePoint,
    VerificationDay, VerificationRow,
};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::audit_export::{self, ExportRange, Format};
use crate::auth::{Caller, Need};
use crate::error::ApiError;
use crate::params::{JsonBody, Params, path_uuid};
use crate::{ApiState, Ctx, ProbeResult};

/// A backup is "stale" when its source has had no success for this long (the brief's alert).
pub const STALE_AFTER_HOURS: i64 = 25;

#[derive(Serialize)]
pub struct SourceView {
    #[serde(flatten)]
    pub summary: SourceSummary,
    /// Seconds since the last successful backup completed.
    pub age_seconds: Option<i64>,
    /// ok | stale | failing | never
    pub status: &'static str,
    /// The source's next scheduled backup, when a schedule covers it.
    pub next_run: Option<crate::NextRun>,
}

/// A replica on the overview: as projected, with its lag now.
#[derive(Serialize)]
pub struct ReplicaView {
    #[serde(flatten)]
    pub row: backstop_projections::read::ReplicaRow,
    /// The lag now: a replica that lacked a backup when measured lacks it still, so its lag
    /// grows with the time since the measurement (0 stays 0 until the next backup).
    pub lag_now_seconds: Option<i64>,
    /// The lag is past the `replication_lagging` alert's threshold (2 h).
    pub lagging: bool,
}

#[derive(Serialize)]
pub struct ProjectorView {
    pub name: String,
    pub position: u64,
    pub lag: u64,
}

#[derive(Serialize)]
pub struct Overview {
    pub generated_at: DateTime<Utc>,
    pub ledger_head: u64,
    pub projectors: Vec<ProjectorView>,
    pub sources: Vec<SourceView>,
    pub recent: Vec<BackupRow>,
    pub verification_days: Vec<VerificationDay>,
    pub verifications: Vec<VerificationRow>,
    pub verified_passed_7d: i64,
    pub verified_failed_7d: i64,
    pub estimate: Option<RecoveryEstimate>,
    pub storage: ProbeResult,
    pub alerts: Vec<AlertRow>,
    /// The newest re-encryption jobs (key rotation), with their progress.
    pub reencryption: Vec<backstop_projections::read::ReencryptionJobRow>,
    /// The newest DR drills, newest first (the panel's list and RTO trend).
    pub drills: Vec<backstop_projections::read::DrillRow>,
    /// Each replica's lag, newest replication and last replicated time (R14.4).
    pub replicas: Vec<ReplicaView>,
    pub sizes: Vec<SizePoint>,
    pub storage_series: Vec<StoragePoint>,
    pub chart_since: DateTime<Utc>,
    /// Every scheduled source's next run, soonest first.
    pub next_runs: Vec<crate::NextRun>,
}

/// The overview, from the cache when it is younger than `OVERVIEW_TTL`.
pub(crate) async fn overview_data(state: &ApiState) -> Result<Arc<Overview>, ApiError> {
    let p = state.projections()?;
    let mut cache = state.0.overview_cache.lock().await;
    if let Some((at, o)) = cache.as_ref()
        && at.elapsed() < crate::OVERVIEW_TTL
    {
        return Ok(o.clone());
    }
    let o = Arc::new(compute_overview(state, p).await?);
    *cache = Some((std::time::Instant::now(), o.clone()));
    Ok(o)
}

/// Shares a cached overview as a JSON body.
pub struct SharedOverview(pub Arc<Overview>);

impl Serialize for SharedOverview {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

async fn compute_overview(
    state: &ApiState,
    p: &backstop_projections::Projections,
) -> Result<Overview, ApiError> {
    let now = Utc::now();
    let week = now - Duration::days(7);
    let month = now - Duration::days(30);
    let (
        sources,
        recent,
        days,
        verifications,
        estimate,
        alerts,
        reencryption,
        sizes,
        series,
        positions,
        drills,
        replicas,
    ) = tokio::try_join!(
        p.sources(),
        p.backups(None, None, 15),
        p.verification_days(week),
        p.verifications_since(week, 20),
        p.recovery_estimate(None),
        p.alerts_panel(10),
        p.reencryption_jobs(3),
        p.size_series(None, month, 60),
        p.storage_series(month, true),
        p.positions(),
        p.drills(12),
        p.replicas(),
    )?;
    let storage = state.storage_status(false).await;
    let head = state.0.ledger.head().position;
    let next_runs = state.next_runs(now);
    let sources = sources
        .into_iter()
        .map(|s| {
            let age = s
                .last_success
                .as_ref()
                .and_then(|b| b.completed_at)
                .map(|t| (now - t).num_seconds().max(0));
            let status = match (&s.last_success, age) {
                (None, _) => "never",
                _ if s.latest.state == "failed" => "failing",
                (Some(b), _) if b.verification_state == "failed" => "failing",
                (_, Some(a)) if a > STALE_AFTER_HOURS * 3600 => "stale",
                _ => "ok",
            };
            SourceView {
                next_run: next_runs.iter().find(|r| r.source == s.source).cloned(),
                summary: s,
                age_seconds: age,
                status,
            }
        })
        .collect();
    Ok(Overview {
        generated_at: now,
        ledger_head: head,
        projectors: positions
            .into_iter()
            .map(|(name, position)| ProjectorView {
                lag: head.saturating_sub(position),
                name,
                position,
            })
            .collect(),
        sources,
        recent,
        verified_passed_7d: days.iter().map(|d| d.passed).sum(),
        verified_failed_7d: days.iter().map(|d| d.failed).sum(),
        verification_days: days,
        verifications,
        estimate,
        storage,
        alerts,
        reencryption,
        drills,
        replicas: replicas
            .into_iter()
            .map(|row| {
                let lag_now_seconds = match (row.lag_seconds, row.measured_at) {
                    (Some(0), _) => Some(0),
                    (Some(l), Some(at)) => Some(l + (now - at).num_seconds().max(0)),
                    (l, _) => l,
                };
                let lagging = lag_now_seconds.is_some_and(|l| {
                    l >= backstop_ops::alerting::rules::REPLICATION_LAG_AFTER.num_seconds()
                });
                ReplicaView {
                    row,
                    lag_now_seconds,
                    lagging,
                }
            })
            .collect(),
        sizes,
        storage_series: series,
        chart_since: month,
        next_runs,
    })
}

pub async fn healthz(State(state): State<ApiState>) -> Response {
    let projections = match state.0.projections.as_ref() {
        None => "not configured",
        Some(_) if *state.0.read_models.borrow() != crate::ReadModels::Ready => "starting",
        Some(p) => match sqlx::query("SELECT 1").execute(p.pool()).await {
            Ok(_) => "ok",
            Err(_) => "unreachable",
        },
    };
    let body = serde_json::json!({
        "status": "ok",
        "ledger_head": state.0.ledger.head().position,
        "projections": projections,
    });
    (StatusCode::OK, Json(body)).into_response()
}

pub async fn not_found(ctx: Ctx) -> ApiError {
    ApiError::NotFound(format!(
        "no such page or endpoint: {} {}",
        ctx.method, ctx.path
    ))
}

pub async fn overview(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<SharedOverview>, ApiError> {
    params.only(&[])?;
    state.authorize(&ctx, Need::Dashboard).await?;
    Ok(Json(SharedOverview(overview_data(&state).await?)))
}

pub async fn backups(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<serde_json::Value>, ApiError> {
    params.only(&["source", "limit", "before"])?;
    let source = params.short("source", 200)?;
    let limit = params.uint("limit", 50, 1, 1000)? as u32;
    let before = params.opt_uint("before", 1, i64::MAX as u64)?;
    state.authorize(&ctx, Need::Dashboard).await?;
    let rows = state
        .projections()?
        .backups(source.as_deref(), before.map(|b| b as i64), limit)
        .await?;
    let next = if rows.len() == limit as usize {
        rows.last().map(|r| r.last_position)
    } else {
        None
    };
    Ok(Json(
        serde_json::json!({ "backups": rows, "next_before": next }),
    ))
}

#[derive(Serialize)]
pub struct BackupDetail {
    pub backup: BackupRow,
    pub tables: Vec<backstop_projections::read::TableRow>,
    pub verifications: Vec<VerificationRow>,
}

pub(crate) async fn backup_detail(state: &ApiState, id: &str) -> Result<BackupDetail, ApiError> {
    let id = path_uuid(id, "the backup id")?;
    let p = state.projections()?;
    let backup = p
        .backup(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no backup {id} in the projections")))?;
    let (tables, verifications) =
        tokio::try_join!(p.backup_tables(id), p.backup_verifications(id))?;
    Ok(BackupDetail {
        backup,
        tables,
        verifications,
    })
}

pub async fn backup(
    State(state): State<ApiState>,
    ctx: Ctx,
    Path(id): Path<String>,
    params: Params,
) -> Result<Json<BackupDetail>, ApiError> {
    params.only(&[])?;
    state.authorize(&ctx, Need::Dashboard).await?;
    Ok(Json(backup_detail(&state, &id).await?))
}

pub async fn size_chart(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<Vec<SizePoint>>, ApiError> {
    params.only(&["source", "days", "limit"])?;
    let source = params.short("source", 200)?;
    let days = params.uint("days", 30, 1, 3650)? as i64;
    let limit = params.uint("limit", 200, 1, 5000)? as u32;
    state.authorize(&ctx, Need::Dashboard).await?;
    Ok(Json(
        state
            .projections()?
            .size_series(source.as_deref(), Utc::now() - Duration::days(days), limit)
            .await?,
    ))
}

pub async fn storage_chart(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<Vec<StoragePoint>>, ApiError> {
    params.only(&["days", "bucket"])?;
    let days = params.uint("days", 90, 1, 3650)? as i64;
    let daily = match params.text("bucket").as_deref() {
        None | Some("day") => true,
        Some("hour") => false,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "`bucket` must be hour or day, got {other:?}"
            )));
        }
    };
    state.authorize(&ctx, Need::Dashboard).await?;
    Ok(Json(
        state
            .projections()?
            .storage_series(Utc::now() - Duration::days(days), daily)
            .await?,
    ))
}

pub async fn verifications(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<serde_json::Value>, ApiError> {
    params.only(&["days", "limit"])?;
    let days = params.uint("days", 7, 1, 365)? as i64;
    let limit = params.uint("limit", 100, 1, 1000)? as u32;
    state.authorize(&ctx, Need::Dashboard).await?;
    let p = state.projections()?;
    let since = Utc::now() - Duration::days(days);
    let (per_day, runs) = tokio::try_join!(
        p.verification_days(since),
        p.verifications_since(since, limit)
    )?;
    Ok(Json(
        serde_json::json!({ "days": per_day, "verifications": runs }),
    ))
}

pub async fn connectivity(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<serde_json::Value>, ApiError> {
    params.only(&[])?;
    state.authorize(&ctx, Need::Dashboard).await?;
    let live = state.storage_status(true).await;
    let recorded = match state.0.projections.as_ref() {
        Some(p) => p.connectivity().await.unwrap_or_default(),
        None => Vec::new(),
    };
    Ok(Json(
        serde_json::json!({ "live": live, "recorded": recorded }),
    ))
}

pub async fn recovery_estimate(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<Option<RecoveryEstimate>>, ApiError> {
    params.only(&["source"])?;
    let source = params.short("source", 200)?;
    state.authorize(&ctx, Need::Dashboard).await?;
    Ok(Json(
        state
            .projections()?
            .recovery_estimate(source.as_deref())
            .await?,
    ))
}

pub async fn alerts(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<Vec<AlertRow>>, ApiError> {
    params.only(&["limit"])?;
    let limit = params.uint("limit", 100, 1, 1000)? as u32;
    state.authorize(&ctx, Need::Dashboard).await?;
    Ok(Json(state.projections()?.open_alerts(limit).await?))
}

/// Re-encryption jobs and their progress (`reencryption.*`), newest first. On the public
/// dashboard the failure `reason` is blanked like every error text.
pub async fn reencryption(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<Vec<backstop_projections::read::ReencryptionJobRow>>, ApiError> {
    params.only(&["limit"])?;
    let limit = params.uint("limit", 20, 1, 1000)? as u32;
    state.authorize(&ctx, Need::Dashboard).await?;
    Ok(Json(state.projections()?.reencryption_jobs(limit).await?))
}

/// The audit filter from query parameters (shared by the JSON API and the audit page).
pub(crate) fn audit_filter(params: &Params) -> Result<AuditFilter, ApiError> {
    params.only(&["type", "actor", "stream", "from", "to", "before", "limit"])?;
    let types: Vec<String> = params
        .short("type", 2000)?
        .map(|t| {
            t.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    for t in &types {
        let ok = t.len() <= 100
            && t.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'*')
            });
        if !ok {
            return Err(ApiError::bad(format!(
                "`type` {t:?} is not an event type (like backup.completed, or a prefix like verification.*)"
            )));
        }
    }
    let f = AuditFilter {
        types,
        actor: params.short("actor", 200)?,
        stream: params.short("stream", 200)?,
        from: params.time("from")?,
        to: params.time("to")?,
        before: params.opt_uint("before", 1, i64::MAX as u64)?,
        limit: params.uint("limit", 50, 1, 1000)? as u32,
    };
    if let (Some(a), Some(b)) = (f.from, f.to)
        && a >= b
    {
        return Err(ApiError::bad("`from` must be before `to`"));
    }
    Ok(f)
}

pub async fn audit(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<serde_json::Value>, ApiError> {
    let filter = audit_filter(&params)?;
    state.authorize(&ctx, Need::Read).await?;
    let rows = state.projections()?.audit(&filter).await?;
    let next = if rows.len() == filter.limit as usize {
        rows.last().map(|r| r.position)
    } else {
        None
    };
    Ok(Json(
        serde_json::json!({ "events": rows, "next_before": next }),
    ))
}

/// `Write` into a channel that feeds a streaming response body.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

pub async fn audit_export(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Response, ApiError> {
    params.only(&["from", "to", "from_position", "to_position", "format"])?;
    let range = ExportRange {
        from: params.time("from")?,
        to: params.time("to")?,
        from_position: params.opt_uint("from_position", 1, i64::MAX as u64)?,
        to_position: params.opt_uint("to_position", 1, i64::MAX as u64)?,
    };
    let format: Format = params
        .text("format")
        .unwrap_or_else(|| "jsonl".into())
        .parse()
        .map_err(ApiError::BadRequest)?;
    let caller = state.authorize(&ctx, Need::AuditExport).await?;
    let signer = state.0.export_signer.clone().ok_or_else(|| {
        ApiError::Unavailable(
            "the audit export needs the ledger's signing key in this process (ledger.signing_key); this server was started without it".into(),
        )
    })?;
    let store = state.0.ledger.store().clone();
    let key = signer.public_key_hex();
    let plan = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || audit_export::plan(&store, &key, &range))
            .await
            .map_err(|e| ApiError::Internal(format!("export task failed: {e}")))?
    };
    let plan = plan.map_err(|e| match e {
        audit_export::ExportError::Empty { .. } => ApiError::NotFound(e.to_string()),
        audit_export::ExportError::NoCheckpoint { .. } => ApiError::Conflict(e.to_string()),
        audit_export::ExportError::BadRange(m) => ApiError::BadRequest(m),
        other => ApiError::Internal(other.to_string()),
    })?;
    if let Caller::Known { name, .. } = &caller {
        tracing::info!(auditor = %name, first = plan.header.first_position, last = plan.header.last_position, "audit export");
    }
    let filename = format!(
        "backstop-audit-{}-{}.{}",
        plan.header.first_position,
        plan.header.last_position,
        match format {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        }
    );
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::new(),
        };
        if let Err(e) = audit_export::write(&store, &plan, &signer, format, &mut w) {
            tracing::warn!(error = %e, "audit export stopped");
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                match format {
                    Format::Jsonl => "application/x-ndjson".to_string(),
                    Format::Csv => "text/csv; charset=utf-8".to_string(),
                },
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        body,
    )
        .into_response())
}

fn operator_name(caller: &Caller) -> Result<String, ApiError> {
    match caller {
        Caller::Known { name, .. } => Ok(name.clone()),
        _ => Err(ApiError::Unauthorized("a token is required".into())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    pub source: String,
    #[serde(default)]
    pub kind: Option<String>,
    /// `logical` (the default) or `physical`.
    #[serde(default)]
    pub method: Option<String>,
    /// Older clients' spelling of `"method": "physical"`.
    #[serde(default)]
    pub physical: bool,
}

fn check_source_name(s: &str) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= 100
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "`source` must be 1 to 100 characters of [A-Za-z0-9._-], got {s:?}"
        )))
    }
}

/// `POST /api/backups {"source": "...", "kind": "full"}`: records `backup.requested`.
pub async fn request_backup(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
    body: Result<JsonBody<BackupRequest>, ApiError>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    params.only(&[])?;
    let caller = state.authorize(&ctx, Need::RequestBackup).await?;
    let JsonBody(req) = body?;
    check_source_name(&req.source)?;
    let kind: BackupKind = req
        .kind
        .as_deref()
        .unwrap_or("full")
        .parse()
        .map_err(ApiError::BadRequest)?;
    let method: BackupMethod = match (req.method.as_deref(), req.physical) {
        (None, false) => BackupMethod::Logical,
        (None, true) => BackupMethod::Physical,
        (Some(m), physical) => {
            let m: BackupMethod = m.parse().map_err(ApiError::BadRequest)?;
            if physical && m != BackupMethod::Physical {
                return Err(ApiError::bad(
                    "`physical: true` contradicts `method`; send `method` alone",
                ));
            }
            m
        }
    };
    let name = operator_name(&caller)?;
    let backup_id = uuid_v7();
    let stream = streams::backup(backup_id);
    let e = NewEvent::new(
        stream.clone(),
        Actor::operator(name.clone()),
        &Event::BackupRequested(BackupRequested {
            backup_id,
            source: req.source.clone(),
            kind,
            method,
            trigger: Trigger::Manual,
            attempt: 1,
        }),
    );
    let appended = state
        .0
        .appender
        .append(&stream, ExpectedVersion::NoStream, vec![e])
        .await?;
    let position = appended.events.first().map(|c| c.position);
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "backup_id": backup_id, "source": req.source, "kind": kind, "method": method,
            "requested_by": name, "position": position,
        })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// A backup id, or `latest` (with `source`, or across sources).
    pub backup: String,
    #[serde(default)]
    pub source: Option<String>,
    /// Where to restore: a connection string without a password, or a directory.
    pub target: String,
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub point_in_time: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    /// With `latest`: the newest completed backup even if it has not passed verification
    /// (default: the newest verified one).
    #[serde(default)]
    pub allow_unverified: bool,
}

/// `POST /api/restores`: records `recovery.requested` with the recovery lead's identity.
pub async fn request_restore(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
    body: Result<JsonBody<RestoreRequest>, ApiError>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    params.only(&[])?;
    let caller = state.authorize(&ctx, Need::Restore).await?;
    let JsonBody(req) = body?;
    let target = req.target.trim();
    if target.is_empty() || target.len() > 1000 {
        return Err(ApiError::bad(
            "`target` must be a connection string or a directory (1 to 1000 characters)",
        ));
    }
    let lower = target.to_lowercase();
    if lower.contains("password=") || has_url_password(target) {
        return Err(ApiError::bad(
            "`target` must not carry a password: it is recorded in the ledger; the restore worker takes credentials from its own environment (PGPASSFILE or .pgpass)",
        ));
    }
    if let Some(s) = &req.source {
        check_source_name(s)?;
    }
    for t in &req.tables {
        if t.is_empty() || t.len() > 200 || t.contains(char::is_whitespace) {
            return Err(ApiError::bad(format!(
                "table {t:?} must be schema.table or table, without spaces"
            )));
        }
    }
    if let Some(pit) = &req.point_in_time {
        crate::params::parse_time(pit)
            .map_err(|why| ApiError::bad(format!("`point_in_time`: {why}")))?;
    }
    let (backup_id, chosen) = if req.backup == "latest" {
        let p = state.projections()?;
        let source = req.source.as_deref();
        let verified = p.latest_verified(source).await?;
        let newest = p.latest_completed(source).await?;
        let scope = match &req.source {
            Some(s) => format!("backup of `{s}`"),
            None => "backup".to_string(),
        };
        match (verified, newest, req.allow_unverified) {
            (_, Some(n), true) => (
                n.backup_id,
                format!("the newest completed {scope} (unverified allowed)"),
            ),
            (Some(v), Some(n), false) if n.backup_id != v.backup_id => (
                v.backup_id,
                format!(
                    "the newest {scope} that passed verification (newer {} is {}; send allow_unverified to restore it)",
                    n.backup_id, n.verification_state
                ),
            ),
            (Some(v), _, false) => (v.backup_id, format!("the newest {scope}, verified")),
            (None, Some(n), false) => {
                return Err(ApiError::Conflict(format!(
                    "no completed {scope} has passed verification (the newest, {}, is {}); verify it, or send \"allow_unverified\": true",
                    n.backup_id, n.verification_state
                )));
            }
            (_, None, _) => {
                return Err(ApiError::NotFound(format!(
                    "there is no completed {scope} to restore"
                )));
            }
        }
    } else {
        (
            path_uuid(&req.backup, "`backup`")?,
            "named by its id".to_string(),
        )
    };
    let name = operator_name(&caller)?;
    let recovery_id = uuid_v7();
    let stream = streams::recovery(recovery_id);
    let scope = RecoveryScope {
        target: target.to_string(),
        tables: req.tables.clone(),
        point_in_time: req.point_in_time.clone(),
        dry_run: req.dry_run,
    };
    let e = NewEvent::new(
        stream.clone(),
        Actor::operator(name.clone()),
        &Event::RecoveryRequested(RecoveryRequested {
            recovery_id,
            backup_id,
            operator: name.clone(),
            scope,
        }),
    );
    let appended = state
        .0
        .appender
        .append(&stream, ExpectedVersion::NoStream, vec![e])
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "recovery_id": recovery_id, "backup_id": backup_id, "operator": name,
            "chosen": chosen,
            "position": appended.events.first().map(|c| c.position),
        })),
    ))
}

fn has_url_password(s: &str) -> bool {
    match (s.find("://"), s.rfind('@')) {
        (Some(i), Some(at)) if at > i => s[i + 3..at].contains(':'),
        _ => false,
    }
}
