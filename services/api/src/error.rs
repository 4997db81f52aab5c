//! Every error the API returns, mapped to a status code in ONE place.
//!
//! Wire format (JSON): `{"error": "<what is wrong and what to do>", "status": <code>}`. HTML pages
//! wrap the same error in a page ([`PageError`]). Nothing user-caused is a 500: malformed
//! parameters are 400, unknown ids 404; a 500 means a bug or a broken database, and its message
//! says which. A 503 for something that will pass by itself (the read models still being
//! prepared at start-up) carries `Retry-After` in seconds, on JSON and HTML answers alike.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A dependency is absent or down (projections not configured, database unreachable).
    #[error("{0}")]
    Unavailable(String),
    /// Not ready yet, and will be without anyone doing anything (the read models are being
    /// migrated at start-up): 503 with `Retry-After`.
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Internal(String),
    /// A request body past `api.max_body_bytes`: 413.
    #[error("{0}")]
    TooLarge(String),
    /// A client past one of its limits (refusals, sign-ins): 429 with `Retry-After`.
    #[error("{what}; retry in {retry_after} s")]
    TooManyRequests { retry_after: u64, what: String },
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) | ApiError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    pub fn bad(msg: impl Into<String>) -> ApiError {
        ApiError::BadRequest(msg.into())
    }

    /// Seconds a client should wait before retrying, for errors that pass by themselves.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::NotReady(_) => Some(crate::READ_MODELS_RETRY_AFTER_SECS),
            ApiError::TooManyRequests { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Adds `Retry-After` when the error passes by itself.
    fn add_retry_after(&self, resp: &mut Response) {
        if let Some(secs) = self.retry_after() {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Not being ready at start-up is expected; logging every refused request would flood
        // the log while a dashboard polls.
        if status.is_server_error() && !matches!(self, ApiError::NotReady(_)) {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        }
        let mut resp = (
            status,
            Json(serde_json::json!({"error": self.to_string(), "status": status.as_u16()})),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"backstop\""),
            );
        }
        self.add_retry_after(&mut resp);
        resp
    }
}

impl From<backstop_projections::ProjectionError> for ApiError {
    fn from(e: backstop_projections::ProjectionError) -> Self {
        if e.is_transient() {
            ApiError::Unavailable(format!(
                "the projections database is not answering: {e}; the dashboard will recover when it is back"
            ))
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl From<backstop_ledger::LedgerError> for ApiError {
    fn from(e: backstop_ledger::LedgerError) -> Self {
        use backstop_ledger::LedgerError as L;
        match e {
            L::Invalid(_) | L::BadBatch { .. } | L::Refused { .. } => {
                ApiError::BadRequest(e.to_string())
            }
            L::Conflict { .. } | L::IdReused { .. } => ApiError::Conflict(e.to_string()),
            L::Closed => ApiError::Unavailable(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// An [`ApiError`] shown as an HTML page (for the dashboard's pages).
pub struct PageError(pub ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError(e)
    }
}

impl From<backstop_projections::ProjectionError> for PageError {
    fn from(e: backstop_projections::ProjectionError) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let login = if status == StatusCode::UNAUTHORIZED {
            "<p><a href=\"/login\">Sign in with an API token</a></p>"
        } else {
            ""
        };
        let body = format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Backstop: {code}</title>\
             <style>body{{font:15px system-ui,sans-serif;margin:3em;color:#1d2330}}\
             .box{{border-left:4px solid #c0392b;padding:.5em 1em;background:#fbeeee}}</style></head>\
             <body><h1>{code} {reason}</h1><div class=\"box\" id=\"error\">{msg}</div>{login}\
             <p><a href=\"/\">Overview</a></p></body></html>",
            code = status.as_u16(),
            reason = status.canonical_reason().unwrap_or(""),
            msg = escape(&self.0.to_string()),
        );
        let mut resp = (status, Html(body)).into_response();
        self.0.add_retry_after(&mut resp);
        resp
    }
}

/// Minimal HTML escaping for text placed in element content or quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
