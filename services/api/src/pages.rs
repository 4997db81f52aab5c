//! The dashboard's HTML pages: minijinja templates embedded in the binary (`templates/`),
//! rendered on the server with inline SVG charts, plus one small inline script for live updates.
//!
//! Sign-in: `/login` takes a token, checks it, and sets the `backstop_session` cookie to a random
//! session id the server keeps with an expiry (`api.session_hours`), never the token (HttpOnly,
//! SameSite=Strict, path /, and `Secure` over HTTPS: `api.secure_cookies`, or a trusted proxy's
//! `X-Forwarded-Proto`). The cookie authorizes reads only (see `auth`); `/logout` ends the
//! session on the server. Sign-in attempts are limited per client (`api.sign_ins_per_minute`).

use std::collections::HashMap;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use minijinja::{Environment, Value, context};
use serde::Deserialize;

use crate::auth::{Caller, Need};
use crate::charts;
use crate::error::{ApiError, PageError};
use crate::handlers::{audit_filter, backup_detail, overview_data};
use crate::params::Params;
use crate::{ApiState, Ctx};

pub const COOKIE: &str = "backstop_session";

pub fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    for (name, text) in [
        ("base.html", include_str!("templates/base.html")),
        ("overview.html", include_str!("templates/overview.html")),
        (
            "overview_body.html",
            include_str!("templates/overview_body.html"),
        ),
        ("backup.html", include_str!("templates/backup.html")),
        ("audit.html", include_str!("templates/audit.html")),
        ("login.html", include_str!("templates/login.html")),
        ("health.html", include_str!("templates/health.html")),
        (
            "report_weekly.html",
            include_str!("templates/report_weekly.html"),
        ),
        ("cost.html", include_str!("templates/cost.html")),
    ] {
        if let Err(e) = env.add_template(name, text) {
            // The templates are part of the binary: a syntax error is caught by the tests.
            tracing::error!(template = name, error = %e, "template does not parse");
        }
    }
    env.add_filter("bytes", |v: Value| -> String {
        match v.as_i64() {
            Some(n) => charts::bytes(n),
            None => "–".into(),
        }
    });
    env.add_filter("ms", |v: Value| -> String {
        match number(&v) {
            Some(n) => charts::duration_ms(n as i64),
            None => "–".into(),
        }
    });
    env.add_filter("usd", |v: Value| -> String {
        // A cent is the resolution of a bill; a smaller non-zero amount is not shown as free.
        number(&v)
            .map(|n| {
                if n > 0.0 && n < 0.005 {
                    "<0.01".to_string()
                } else {
                    format!("{n:.2}")
                }
            })
            .unwrap_or_default()
    });
    env.add_filter("usd_delta", |v: Value| -> String {
        number(&v).map(|n| format!("{n:+.2}")).unwrap_or_default()
    });
    env.add_filter("num1", |v: Value| -> String {
        number(&v).map(|n| format!("{n:.1}")).unwrap_or_default()
    });
    env.add_filter("ago", |v: Value| -> String {
        match v.as_i64() {
            Some(s) => format!("{} ago", charts::duration_ms(s.saturating_mul(1000))),
            None => "–".into(),
        }
    });
    env.add_filter("dt", |v: Value| -> String {
        match v
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        {
            Some(t) => t
                .with_timezone(&Utc)
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string(),
            None => "–".into(),
        }
    });
    env.add_filter("dts", |v: Value| -> String {
        match v
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        {
            Some(t) => t.with_timezone(&Utc).format("%m-%d %H:%M").to_string(),
            None => "–".into(),
        }
    });
    env.add_filter("short", |v: Value| -> String {
        v.as_str()
            .map(|s| s.chars().take(8).collect())
            .unwrap_or_else(|| v.to_string())
    });
    env.add_filter("json", |v: Value| -> String {
        serde_json::to_string_pretty(&v).unwrap_or_default()
    });
    env.add_filter("urlenc", |v: Value| -> String {
        let s = v
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string());
        url_encode(&s)
    });
    env
}

fn number(v: &Value) -> Option<f64> {
    v.as_i64()
        .map(|n| n as f64)
        .or_else(|| f64::try_from(v.clone()).ok())
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The sign-in cookie's session id, if any.
pub fn cookie_session(headers: &HeaderMap) -> Option<String> {
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split(';') {
            if let Some((k, val)) = part.trim().split_once('=')
                && k == COOKIE
                && !val.is_empty()
            {
                return Some(val.to_string());
            }
        }
    }
    None
}

pub(crate) fn render(state: &ApiState, name: &str, ctx: Value) -> Result<Html<String>, PageError> {
    let t = state
        .0
        .templates
        .get_template(name)
        .map_err(|e| ApiError::Internal(format!("template {name}: {e}")))?;
    // `anonymous`: the viewer of a public dashboard who has not signed in (no live stream).
    t.render(context! { anonymous => crate::redact::is_anonymous(), ..ctx })
        .map(Html)
        .map_err(|e| PageError(ApiError::Internal(format!("rendering {name}: {e:#}"))))
}

/// A 401 on a page sends a person to the sign-in form rather than to a JSON error.
pub(crate) async fn page_auth(state: &ApiState, ctx: &Ctx, need: Need) -> Result<Caller, Response> {
    match state.authorize(ctx, need).await {
        Ok(c) => Ok(c),
        Err(ApiError::Unauthorized(_)) if ctx.bearer().is_none() => {
            Err(Redirect::to("/login").into_response())
        }
        Err(e) => Err(PageError(e).into_response()),
    }
}

fn overview_context(state: &ApiState, o: &crate::handlers::Overview) -> Value {
    let now = Utc::now();
    context! {
        refresh => "/partials/overview",
        ledger_head => state.0.ledger.head().position,
        sizes_chart => Value::from_safe_string(charts::sizes(&o.sizes)),
        storage_chart => Value::from_safe_string(charts::storage(&o.storage_series, o.chart_since, now)),
        verification_strip => Value::from_safe_string(charts::verification_strip(&o.verification_days, now, 7)),
        ..Value::from_serialize(crate::redact::view(o))
    }
}

pub async fn overview(State(state): State<ApiState>, ctx: Ctx, params: Params) -> Response {
    if let Err(e) = params.only(&[]) {
        return PageError(e).into_response();
    }
    if let Err(r) = page_auth(&state, &ctx, Need::Dashboard).await {
        return r;
    }
    let o = match overview_data(&state).await {
        Ok(o) => o,
        Err(e) => return PageError(e).into_response(),
    };
    render(&state, "overview.html", overview_context(&state, &o)).into_response()
}

pub async fn overview_partial(
    State(state): State<ApiState>,
    ctx: Ctx,
) -> Result<Html<String>, PageError> {
    state.authorize(&ctx, Need::Dashboard).await?;
    let o = overview_data(&state).await?;
    let t = state
        .0
        .templates
        .get_template("overview_body.html")
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    t.render(overview_context(&state, &o))
        .map(Html)
        .map_err(|e| PageError(ApiError::Internal(format!("rendering the overview: {e:#}"))))
}

pub async fn backup(State(state): State<ApiState>, ctx: Ctx, Path(id): Path<String>) -> Response {
    if let Err(r) = page_auth(&state, &ctx, Need::Dashboard).await {
        return r;
    }
    let d = match backup_detail(&state, &id).await {
        Ok(d) => d,
        Err(e) => return PageError(e).into_response(),
    };
    render(
        &state,
        "backup.html",
        context! {
            ledger_head => state.0.ledger.head().position,
            b => Value::from_serialize(crate::redact::view(&d.backup)),
            tables => Value::from_serialize(crate::redact::view(&d.tables)),
            verifications => Value::from_serialize(crate::redact::view(&d.verifications)),
        },
    )
    .into_response()
}

pub async fn audit(State(state): State<ApiState>, ctx: Ctx, params: Params) -> Response {
    let filter = match audit_filter(&params) {
        Ok(f) => f,
        Err(e) => return PageError(e).into_response(),
    };
    if let Err(r) = page_auth(&state, &ctx, Need::Read).await {
        return r;
    }
    let rows = match state.projections() {
        Ok(p) => match p.audit(&filter).await {
            Ok(r) => r,
            Err(e) => return PageError(e.into()).into_response(),
        },
        Err(e) => return PageError(e).into_response(),
    };
    let next_query = if rows.len() == filter.limit as usize {
        rows.last().map(|last| {
            let mut q: Vec<String> = ["type", "actor", "stream", "from", "to", "limit"]
                .iter()
                .filter_map(|k| params.text(k).map(|v| format!("{k}={}", url_encode(&v))))
                .collect();
            q.push(format!("before={}", last.position));
            q.join("&")
        })
    } else {
        None
    };
    let f: HashMap<&str, String> = ["type", "actor", "stream", "from", "to"]
        .iter()
        .map(|k| (*k, params.text(k).unwrap_or_default()))
        .chain(std::iter::once(("limit", filter.limit.to_string())))
        .collect();
    render(
        &state,
        "audit.html",
        context! {
            ledger_head => state.0.ledger.head().position,
            events => Value::from_serialize(&rows),
            f => Value::from_serialize(&f),
            next_query => next_query,
        },
    )
    .into_response()
}

pub async fn login_form(State(state): State<ApiState>) -> Result<Html<String>, PageError> {
    render(
        &state,
        "login.html",
        context! { ledger_head => state.0.ledger.head().position },
    )
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

pub async fn login(
    State(state): State<ApiState>,
    mut ctx: Ctx,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return PageError(ApiError::bad("the sign-in form needs a `token` field")).into_response();
    };
    // Each attempt takes one of the client's few sign-in tokens before the token is checked, so
    // guessing is throttled however the guesses fare.
    if let Err(e) = state.sign_in_attempt(&ctx).await {
        return PageError(e).into_response();
    }
    let token = form.token.trim().to_string();
    // Checked as if sent in the header, so that a wrong token is refused and recorded.
    ctx.headers.insert(
        header::AUTHORIZATION,
        match format!("Bearer {token}").parse() {
            Ok(v) => v,
            Err(_) => {
                return PageError(ApiError::bad(
                    "the token has characters a token cannot have",
                ))
                .into_response();
            }
        },
    );
    match state.authorize(&ctx, Need::Read).await {
        Ok(Caller::Known { name, role }) => {
            // The cookie holds a random session id the server maps to the caller, never the
            // token: a stolen cookie dies with the session, and the token is never in a browser.
            let sessions = state.sessions();
            let id = sessions.create(&name, role, state.0.guards.clock.now());
            let secure = if state.https(&ctx) { "; Secure" } else { "" };
            let cookie = format!(
                "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
                sessions.ttl().as_secs()
            );
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Ok(_) => PageError(ApiError::Unauthorized("a token is required".into())).into_response(),
        Err(e) => {
            let status = e.status();
            let page = render(
                &state,
                "login.html",
                context! { ledger_head => state.0.ledger.head().position, error => e.to_string() },
            );
            (status, page).into_response()
        }
    }
}

pub async fn logout(State(state): State<ApiState>, ctx: Ctx) -> Response {
    if let Some(id) = cookie_session(&ctx.headers) {
        state.sessions().remove(&id);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}
