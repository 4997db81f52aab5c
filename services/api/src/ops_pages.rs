//! The health and cost pages (`/health`, `/cost`) and their JSON (`/api/health`, `/api/cost`).
//!
//! - Health reads the projections: each endpoint's latest recorded check (`health_status`) and
//!   the recorded checks of the last days (`health_checks`) for the response-time chart. The
//!   monitor records state changes, failed and slow checks and one sample an hour
//!   (`backstop_ops::health`), so the chart has a point an hour and every bad one.
//! - Cost reads the usage samples from the projections (`storage_usage`) and prices them with
//!   `backstop_ops::cost` (the configured table from the [`crate::CostView`], else the built-in
//!   one); the retention recommendations come from the view, which reads the repository.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use backstop_ops::cost::{self, CostConfig, CostReport, UsageSample};
use backstop_projections::read::{HealthCheckRow, HealthRow};
use chrono::{DateTime, Duration, Utc};
use minijinja::{Value, context};
use serde::Serialize;

use crate::auth::Need;
use crate::error::{ApiError, PageError, escape};
use crate::pages::{page_auth, render};
use crate::params::Params;
use crate::{ApiState, Ctx};

#[derive(Serialize)]
pub struct HealthData {
    pub since: DateTime<Utc>,
    pub endpoints: Vec<HealthRow>,
    pub checks: Vec<HealthCheckRow>,
}

async fn health_data(state: &ApiState, days: i64) -> Result<HealthData, ApiError> {
    let p = state.projections()?;
    let since = Utc::now() - Duration::days(days);
    let (endpoints, checks) = tokio::try_join!(p.health_endpoints(), p.health_checks(since))?;
    Ok(HealthData {
        since,
        endpoints,
        checks,
    })
}

pub async fn health(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<HealthData>, ApiError> {
    params.only(&["days"])?;
    let days = params.uint("days", 7, 1, 90)? as i64;
    state.authorize(&ctx, Need::Dashboard).await?;
    Ok(Json(health_data(&state, days).await?))
}

pub async fn health_page(State(state): State<ApiState>, ctx: Ctx, params: Params) -> Response {
    if let Err(e) = params.only(&[]) {
        return PageError(e).into_response();
    }
    if let Err(r) = page_auth(&state, &ctx, Need::Dashboard).await {
        return r;
    }
    let d = match health_data(&state, 7).await {
        Ok(d) => d,
        Err(e) => return PageError(e).into_response(),
    };
    let now = Utc::now();
    let endpoints: Vec<Value> = d
        .endpoints
        .iter()
        .map(|e| {
            let points: Vec<(DateTime<Utc>, f64, &str)> = d
                .checks
                .iter()
                .filter(|c| c.endpoint == e.endpoint)
                .map(|c| (c.checked_at, c.latency_ms as f64, c.state.as_str()))
                .collect();
            context! {
                chart => Value::from_safe_string(line_chart(
                    &format!("Response time of {}", e.endpoint),
                    &points,
                    d.since,
                    now,
                    |v| format!("{v:.0} ms"),
                )),
                checks => points.len(),
                ..Value::from_serialize(crate::redact::view(e))
            }
        })
        .collect();
    render(
        &state,
        "health.html",
        context! {
            ledger_head => state.0.ledger.head().position,
            endpoints => endpoints,
        },
    )
    .into_response()
}

async fn cost_report(state: &ApiState) -> Result<CostReport, ApiError> {
    let p = state.projections()?;
    let now = Utc::now();
    let since = now - Duration::days(i64::from(cost::TREND_DAYS));
    let samples: Vec<UsageSample> = p
        .usage_samples(since)
        .await?
        .into_iter()
        .map(|r| UsageSample {
            repository: r.repository,
            region: r.region,
            storage_class: r.storage_class,
            bytes: r.bytes.max(0) as u64,
            objects: r.objects.max(0) as u64,
            sampled_at: r.sampled_at,
        })
        .collect();
    let (config, recommendations, names) = match &state.0.cost {
        Some(v) => (v.config(), v.recommendations().await, v.copy_names()),
        None => (CostConfig::default(), None, Default::default()),
    };
    let mut report = cost::report(&samples, &config, recommendations, now.date_naive());
    report.name_copies(&names);
    if report.recommendations.is_none() {
        report.notes.push(
            "no retention recommendations: the repository cannot be read by this process".into(),
        );
    }
    Ok(report)
}

pub async fn cost(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Json<CostReport>, ApiError> {
    params.only(&[])?;
    state.authorize(&ctx, Need::Dashboard).await?;
    Ok(Json(cost_report(&state).await?))
}

pub async fn cost_page(State(state): State<ApiState>, ctx: Ctx, params: Params) -> Response {
    if let Err(e) = params.only(&[]) {
        return PageError(e).into_response();
    }
    if let Err(r) = page_auth(&state, &ctx, Need::Dashboard).await {
        return r;
    }
    let r = match cost_report(&state).await {
        Ok(r) => r,
        Err(e) => return PageError(e).into_response(),
    };
    let now = Utc::now();
    let points: Vec<(DateTime<Utc>, f64, &str)> = r
        .trend
        .iter()
        .filter_map(|d| {
            let t = d.day.and_hms_opt(12, 0, 0)?.and_utc();
            Some((t, d.monthly_usd, "cost"))
        })
        .collect();
    let chart = line_chart(
        "Estimated monthly cost, last 90 days",
        &points,
        now - Duration::days(i64::from(cost::TREND_DAYS)),
        now,
        |v| format!("${v:.2}"),
    );
    let summary = r
        .recommendations
        .as_ref()
        .map(|x| x.summary())
        .unwrap_or_default();
    render(
        &state,
        "cost.html",
        context! {
            ledger_head => state.0.ledger.head().position,
            trend_chart => Value::from_safe_string(chart),
            summary => summary,
            total => format!("{:.2}", r.estimate.total_usd),
            budget => format!("{:.2}", r.budget_usd),
            ..Value::from_serialize(crate::redact::view(&r))
        },
    )
    .into_response()
}

const W: f64 = 720.0;
const H: f64 = 200.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 28.0;

/// A line over time with a point per value; each point's class is its label (an endpoint's
/// state, or `cost`) and carries `data-at` and `data-value`, so tests read the figures.
fn line_chart(
    title: &str,
    points: &[(DateTime<Utc>, f64, &str)],
    since: DateTime<Utc>,
    now: DateTime<Utc>,
    fmt: impl Fn(f64) -> String,
) -> String {
    let title = escape(title);
    if points.is_empty() {
        return format!(
            "<svg class=\"chart\" viewBox=\"0 0 {W} 60\" role=\"img\" aria-label=\"{title}\"><text x=\"{LEFT}\" y=\"34\">Nothing recorded yet</text></svg>"
        );
    }
    let max = points.iter().map(|p| p.1).fold(0.0f64, f64::max);
    let max = if max <= 0.0 { 1.0 } else { max * 1.15 };
    let span = (now - since).num_seconds().max(1) as f64;
    let x = |t: DateTime<Utc>| {
        LEFT + ((t - since).num_seconds() as f64 / span).clamp(0.0, 1.0) * (W - LEFT - RIGHT)
    };
    let y = |v: f64| TOP + (1.0 - v / max) * (H - TOP - BOTTOM);
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{title}\"><title>{title}</title>"
    );
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let yy = y(v);
        svg.push_str(&format!(
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            escape(&fmt(v))
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{LEFT}\" y=\"{}\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        H - 8.0,
        since.format("%Y-%m-%d"),
        W - RIGHT,
        H - 8.0,
        now.format("%Y-%m-%d")
    ));
    let path: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
        .collect();
    svg.push_str(&format!(
        "<polyline class=\"line\" points=\"{}\"/>",
        path.join(" ")
    ));
    for p in points {
        svg.push_str(&format!(
            "<circle class=\"point {}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" data-at=\"{}\" data-value=\"{}\"><title>{} {}</title></circle>",
            escape(p.2),
            x(p.0),
            y(p.1),
            p.0.to_rfc3339(),
            p.1,
            p.0.format("%Y-%m-%d %H:%M"),
            escape(&fmt(p.1)),
        ));
    }
    svg.push_str("</svg>");
    svg
}
