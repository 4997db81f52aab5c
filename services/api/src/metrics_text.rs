//! `/metrics` in the Prometheus text format, rendered from the projections and the ledger at
//! scrape time (so every process serving the API reports the same figures), followed by what the
//! process-wide Prometheus recorder holds (HTTP request metrics; worker redeliveries and anything
//! else other crates record with the `metrics` macros).
//!
//! Families (all gauges unless noted):
//! - `backstop_last_backup_success{source}` (0 when the newest attempt failed),
//!   `backstop_backup_running_seconds{source}`
//! - `backstop_last_success_timestamp_seconds{source,kind}`, `..._duration_seconds`,
//!   `backstop_last_success_bytes{source,kind,size="raw|stored|new"}`
//! - `backstop_backups{state}`, `backstop_verifications_total{result}` (counter),
//!   `backstop_alerts_open{severity}`, `backstop_dead_letters_total{consumer}` (counter),
//!   `backstop_events_total{type}` (counter)
//! - `backstop_ledger_head_position`, `backstop_ledger_publication_lag_events` (with NATS),
//!   `backstop_projection_position{projector}`, `backstop_projection_lag_events{projector}`,
//!   `backstop_projections_up`
//! - `backstop_storage_up`, `backstop_storage_probe_seconds` (the cached live probe)

use std::fmt::Write as _;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::Need;
use crate::error::ApiError;
use crate::{ApiState, Ctx};

/// Records request counts and latencies per route (the matched pattern, not the raw path, so
/// ids do not explode the label space).
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("backstop_http_requests_total", "route" => route.clone(), "method" => method, "status" => status).increment(1);
    metrics::histogram!("backstop_http_request_duration_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub async fn metrics(State(state): State<ApiState>, ctx: Ctx) -> Result<Response, ApiError> {
    if !state.0.config.metrics_public {
        state.authorize(&ctx, Need::Read).await?;
    }
    let mut out = String::with_capacity(4096);
    let head = state.0.ledger.head().position;
    family(
        &mut out,
        "backstop_ledger_head_position",
        "gauge",
        "Position of the last committed ledger event.",
    );
    let _ = writeln!(out, "backstop_ledger_head_position {head}");
    if state.0.config.publication {
        let cursor = state.0.ledger.store().publication_cursor().unwrap_or(1);
        family(
            &mut out,
            "backstop_ledger_publication_lag_events",
            "gauge",
            "Committed events not yet published to NATS JetStream.",
        );
        let _ = writeln!(
            out,
            "backstop_ledger_publication_lag_events {}",
            (head + 1).saturating_sub(cursor)
        );
    }
    let storage = state.storage_status(false).await;
    if storage.configured {
        family(
            &mut out,
            "backstop_storage_up",
            "gauge",
            "1 if the last storage probe succeeded.",
        );
        let _ = writeln!(out, "backstop_storage_up {}", u8::from(storage.ok));
        if let Some(ms) = storage.latency_ms {
            family(
                &mut out,
                "backstop_storage_probe_seconds",
                "gauge",
                "Duration of the last storage probe.",
            );
            let _ = writeln!(out, "backstop_storage_probe_seconds {:.6}", ms / 1000.0);
        }
    }
    family(
        &mut out,
        "backstop_projections_up",
        "gauge",
        "1 if the projections database answered this scrape.",
    );
    // Not configured, or its read models not ready yet (start-up): nothing to read.
    match state.projections().ok() {
        None => {
            let _ = writeln!(out, "backstop_projections_up 0");
        }
        Some(p) => match projection_metrics(p, head).await {
            Ok(text) => {
                let _ = writeln!(out, "backstop_projections_up 1");
                out.push_str(&text);
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: projections unavailable");
                let _ = writeln!(out, "backstop_projections_up 0");
            }
        },
    }
    if let Some(h) = &state.0.prometheus {
        out.push_str(&h.render());
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}

async fn projection_metrics(
    p: &backstop_projections::Projections,
    head: u64,
) -> Result<String, backstop_projections::ProjectionError> {
    let (sources, last, verifications, dead, events, states, alerts, positions, drills, lags) = tokio::try_join!(
        p.sources(),
        p.last_successes(),
        p.verification_counts(),
        p.dead_letter_counts(),
        p.event_counts(),
        p.backup_state_counts(),
        p.open_alert_counts(),
        p.positions(),
        p.last_drills(),
        p.replication_lags(),
    )?;
    let mut out = String::with_capacity(4096);
    // Per source, the newest DR drill (backstop drill): its measured RTO and verdict.
    family(
        &mut out,
        "backstop_drill_last_rto_seconds",
        "gauge",
        "The measured RTO of the newest DR drill of a source.",
    );
    for d in &drills {
        if let Some(ms) = d.recovery_ms {
            let _ = writeln!(
                out,
                "backstop_drill_last_rto_seconds{{source=\"{}\"}} {:.3}",
                esc(&d.source),
                ms as f64 / 1000.0
            );
        }
    }
    family(
        &mut out,
        "backstop_drill_last_passed",
        "gauge",
        "1 if the newest DR drill of a source passed, else 0.",
    );
    for d in &drills {
        let _ = writeln!(
            out,
            "backstop_drill_last_passed{{source=\"{}\"}} {}",
            esc(&d.source),
            u8::from(d.passed == Some(true))
        );
    }
    family(
        &mut out,
        "backstop_drill_last_timestamp_seconds",
        "gauge",
        "When the newest DR drill of a source finished (Unix time).",
    );
    for d in &drills {
        if let Some(at) = d.finished_at {
            let _ = writeln!(
                out,
                "backstop_drill_last_timestamp_seconds{{source=\"{}\"}} {}",
                esc(&d.source),
                at.timestamp()
            );
        }
    }
    // Per replica, its newest measured lag (the replication_lagging alert fires past 2 h).
    family(
        &mut out,
        "backstop_replication_lag_seconds",
        "gauge",
        "Age of the oldest backup a replica lacks, as last measured (0: up to date).",
    );
    for l in &lags {
        let _ = writeln!(
            out,
            "backstop_replication_lag_seconds{{replica=\"{}\"}} {}",
            esc(&l.replica),
            l.lag_seconds
        );
    }
    family(
        &mut out,
        "backstop_replication_lag_measured_timestamp_seconds",
        "gauge",
        "When a replica's lag was last measured (Unix time).",
    );
    for l in &lags {
        let _ = writeln!(
            out,
            "backstop_replication_lag_measured_timestamp_seconds{{replica=\"{}\"}} {}",
            esc(&l.replica),
            l.measured_at.timestamp()
        );
    }
    // Per source, for deploy/prometheus's BackupFailure and BackupLatency rules.
    family(
        &mut out,
        "backstop_last_backup_success",
        "gauge",
        "1 unless the newest backup attempt of a source failed (then 0).",
    );
    for s in &sources {
        let ok = u8::from(s.latest.state != "failed");
        let _ = writeln!(
            out,
            "backstop_last_backup_success{{source=\"{}\"}} {ok}",
            esc(&s.source)
        );
    }
    family(
        &mut out,
        "backstop_backup_running_seconds",
        "gauge",
        "How long the newest backup of a source has been running (0 when none runs).",
    );
    let now = chrono::Utc::now();
    for s in &sources {
        let running = match (s.latest.state.as_str(), s.latest.started_at) {
            ("started", Some(at)) => (now - at).num_milliseconds().max(0) as f64 / 1000.0,
            _ => 0.0,
        };
        let _ = writeln!(
            out,
            "backstop_backup_running_seconds{{source=\"{}\"}} {running}",
            esc(&s.source)
        );
    }
    family(
        &mut out,
        "backstop_last_success_timestamp_seconds",
        "gauge",
        "When the last successful backup of a source and kind completed (Unix time).",
    );
    for l in &last {
        let _ = writeln!(
            out,
            "backstop_last_success_timestamp_seconds{{source=\"{}\",kind=\"{}\"}} {}",
            esc(&l.source),
            esc(&l.kind),
            l.completed_at.timestamp()
        );
    }
    family(
        &mut out,
        "backstop_last_success_duration_seconds",
        "gauge",
        "How long the last successful backup of a source and kind took.",
    );
    for l in &last {
        if let Some(ms) = l.duration_ms {
            let _ = writeln!(
                out,
                "backstop_last_success_duration_seconds{{source=\"{}\",kind=\"{}\"}} {:.3}",
                esc(&l.source),
                esc(&l.kind),
                ms as f64 / 1000.0
            );
        }
    }
    family(
        &mut out,
        "backstop_last_success_bytes",
        "gauge",
        "Sizes of the last successful backup: raw (read from the source), stored (referenced in the repository), new (added by it).",
    );
    for l in &last {
        for (size, v) in [
            ("raw", l.raw_bytes),
            ("stored", l.stored_bytes),
            ("new", l.new_bytes),
        ] {
            if let Some(v) = v {
                let _ = writeln!(
                    out,
                    "backstop_last_success_bytes{{source=\"{}\",kind=\"{}\",size=\"{size}\"}} {v}",
                    esc(&l.source),
                    esc(&l.kind)
                );
            }
        }
    }
    family(&mut out, "backstop_backups", "gauge", "Backups by state.");
    for c in &states {
        let _ = writeln!(
            out,
            "backstop_backups{{state=\"{}\"}} {}",
            esc(&c.label),
            c.n
        );
    }
    family(
        &mut out,
        "backstop_verifications_total",
        "counter",
        "Verifications by result (passed, failed, running).",
    );
    for c in &verifications {
        let _ = writeln!(
            out,
            "backstop_verifications_total{{result=\"{}\"}} {}",
            esc(&c.label),
            c.n
        );
    }
    family(
        &mut out,
        "backstop_alerts_open",
        "gauge",
        "Open alerts by severity.",
    );
    for c in &alerts {
        let _ = writeln!(
            out,
            "backstop_alerts_open{{severity=\"{}\"}} {}",
            esc(&c.label),
            c.n
        );
    }
    family(
        &mut out,
        "backstop_dead_letters_total",
        "counter",
        "Events a worker gave up on after its bounded redeliveries.",
    );
    for c in &dead {
        let _ = writeln!(
            out,
            "backstop_dead_letters_total{{consumer=\"{}\"}} {}",
            esc(&c.label),
            c.n
        );
    }
    family(
        &mut out,
        "backstop_events_total",
        "counter",
        "Ledger events by type (as projected).",
    );
    for c in &events {
        let _ = writeln!(
            out,
            "backstop_events_total{{type=\"{}\"}} {}",
            esc(&c.label),
            c.n
        );
    }
    family(
        &mut out,
        "backstop_projection_position",
        "gauge",
        "Last ledger position applied by each projector.",
    );
    for (name, pos) in &positions {
        let _ = writeln!(
            out,
            "backstop_projection_position{{projector=\"{}\"}} {pos}",
            esc(name)
        );
    }
    family(
        &mut out,
        "backstop_projection_lag_events",
        "gauge",
        "Ledger events not yet applied by each projector.",
    );
    for (name, pos) in &positions {
        let _ = writeln!(
            out,
            "backstop_projection_lag_events{{projector=\"{}\"}} {}",
            esc(name),
            head.saturating_sub(*pos)
        );
    }
    Ok(out)
}
