//! The weekly summary at `/reports/weekly` (a page) and `/api/reports/weekly` (JSON).
//!
//! The summary is folded from the ledger itself (`backstop_ops::report`), the same computation
//! `serve` records weekly as `report.generated` and `backstop report weekly` prints, so the
//! three never disagree. A fold reads every event, so the result is kept for [`REPORT_TTL`] and
//! computed off the async threads (sled reads block).

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use backstop_ops::report::{WeeklyReport, last_full_week, weekly_of_ledger};
use chrono::{NaiveDate, TimeZone, Utc};
use minijinja::context;

use crate::auth::Need;
use crate::error::{ApiError, PageError};
use crate::pages::{page_auth, render};
use crate::params::Params;
use crate::{ApiState, Ctx};

/// How long a computed summary is reused.
pub const REPORT_TTL: Duration = Duration::from_secs(60);

async fn weekly(state: &ApiState, before: Option<NaiveDate>) -> Result<WeeklyReport, ApiError> {
    let zone = state.0.report_zone;
    let now = match before {
        Some(d) => zone
            .from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default())
            .earliest()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(Utc::now),
        None => Utc::now(),
    };
    let period = last_full_week(now, zone);
    {
        let cache = state.0.report_cache.lock().await;
        if let Some((at, r)) = cache.as_ref()
            && at.elapsed() < REPORT_TTL
            && r.period_start == period.0
        {
            return Ok(r.clone());
        }
    }
    let ledger = state.0.ledger.clone();
    let cost = state.0.report_cost.clone();
    let report =
        tokio::task::spawn_blocking(move || weekly_of_ledger(&ledger, period, zone, cost.as_ref()))
            .await
            .map_err(|e| ApiError::Internal(format!("the weekly summary's task failed: {e}")))?
            .map_err(|e| {
                ApiError::Internal(format!("reading the ledger for the weekly summary: {e}"))
            })?;
    *state.0.report_cache.lock().await = Some((Instant::now(), report.clone()));
    Ok(report)
}

fn before_param(params: &Params) -> Result<Option<NaiveDate>, ApiError> {
    params
        .short("before", 10)?
        .map(|s| {
            NaiveDate::parse_from_str(&s, "%Y-%m-%d").map_err(|_| {
                ApiError::BadRequest(format!("before: {s:?} is not a date (YYYY-MM-DD)"))
            })
        })
        .transpose()
}

pub async fn weekly_json(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<WeeklyReport>, ApiError> {
    params.only(&["before"])?;
    let before = before_param(&params)?;
    state.authorize(&ctx, Need::Dashboard).await?;
    Ok(Json(weekly(&state, before).await?))
}

pub async fn weekly_page(State(state): State<ApiState>, ctx: Ctx, params: Params) -> Response {
    let before = match params
        .only(&["before"])
        .and_then(|()| before_param(&params))
    {
        Ok(b) => b,
        Err(e) => return PageError(e).into_response(),
    };
    if let Err(r) = page_auth(&state, &ctx, Need::Dashboard).await {
        return r;
    }
    let report = match weekly(&state, before).await {
        Ok(r) => r,
        Err(e) => return PageError(e).into_response(),
    };
    let ctx = context! {
        title => report.title(),
        text => report.text(),
        report => minijinja::Value::from_serialize(crate::redact::view(&report)),
    };
    match render(&state, "report_weekly.html", ctx) {
        Ok(html) => html.into_response(),
        Err(e) => e.into_response(),
    }
}
