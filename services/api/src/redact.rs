//! The public dashboard's redaction: with `api.public_dashboard = true`, an anonymous viewer sees
//! statuses, sizes, counts and ages, never who or where. Every field whose name is in
//! [`HIDDEN`] (hosts, operators and actors, endpoint addresses and storage targets, repository
//! locations, error and failure texts) is blanked, at any depth, in the JSON answers and in the
//! context the pages are rendered from. A signed-in caller sees everything. Names an operator
//! chose as labels (sources, health endpoints' names, schedules) stay: they are what a status is
//! about; the health endpoints' URLs never reach the dashboard at all.
//!
//! How a request is known to be anonymous: [`layer`] runs each request with a task-local flag
//! that `ApiState::authorize` raises when it lets an anonymous caller through on the public
//! dashboard; pages render through [`view`], and a JSON answer is rewritten by the layer when
//! the flag is up. Deny-listing names (rather than allow-listing) is safe here because the
//! dashboard's JSON shapes are this crate's own; a test walks every public endpoint for
//! the hidden values.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

/// Field names never shown to anonymous viewers.
pub const HIDDEN: &[&str] = &[
    "host",
    "hosts",
    "hostname",
    "requested_by",
    "operator",
    "actor",
    "caller",
    "target",
    "backend",
    "repository",
    "location",
    "url",
    "bucket",
    "prefix",
    "manifest",
    "error",
    "message",
    "subject",
    "reason",
    "failure_reason",
    "verification_reason",
    "deleted_reason",
    "scope",
    "detail",
    "details",
];

tokio::task_local! {
    static ANONYMOUS: Arc<AtomicBool>;
}

/// Marks the current request as an anonymous viewer's (called by `authorize`).
pub(crate) fn mark_anonymous() {
    let _ = ANONYMOUS.try_with(|f| f.store(true, Ordering::Release));
}

/// Whether the current request is an anonymous viewer's (see [`mark_anonymous`]).
pub(crate) fn is_anonymous() -> bool {
    ANONYMOUS
        .try_with(|f| f.load(Ordering::Acquire))
        .unwrap_or(false)
}

/// Blanks the hidden fields of `v`, at any depth.
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, x) in map.iter_mut() {
                if HIDDEN.contains(&k.as_str()) {
                    *x = match x {
                        Value::Null => Value::Null,
                        Value::String(_) => Value::String(String::new()),
                        Value::Array(_) => Value::Array(Vec::new()),
                        Value::Object(_) => Value::Object(Default::default()),
                        _ => Value::Null,
                    };
                } else {
                    redact(x);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// What a page renders from: `v` itself, redacted when the viewer is anonymous.
pub(crate) fn view<T: Serialize>(v: &T) -> Value {
    let mut json = serde_json::to_value(v).unwrap_or(Value::Null);
    if is_anonymous() {
        redact(&mut json);
    }
    json
}

/// The largest JSON answer the layer rewrites (the dashboard's are far smaller); a larger one
/// is refused rather than shown unredacted.
const MAX_REWRITE: usize = 16 << 20;

/// The layer: runs the request with the flag, and redacts a JSON answer to an anonymous viewer.
pub async fn layer(req: Request, next: Next) -> Response {
    let flag = Arc::new(AtomicBool::new(false));
    let resp = ANONYMOUS.scope(flag.clone(), next.run(req)).await;
    if !flag.load(Ordering::Acquire) {
        return resp;
    }
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_REWRITE).await else {
        return crate::ApiError::Internal("the answer was too large to redact".into())
            .into_response();
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) else {
        return crate::ApiError::Internal("the answer could not be redacted".into())
            .into_response();
    };
    redact(&mut v);
    let out = serde_json::to_vec(&v).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_fields_are_blanked_at_any_depth() {
        let mut v = serde_json::json!({
            "sources": [{"source": "trading", "latest": {"host": "db1.internal", "state": "completed", "failure_reason": null, "raw_bytes": 5}}],
            "storage": {"ok": false, "target": "s3://bucket/prefix", "error": "connection refused"},
        });
        redact(&mut v);
        let text = v.to_string();
        for secret in ["db1.internal", "s3://bucket", "connection refused"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert_eq!(v["sources"][0]["latest"]["state"], "completed");
        assert_eq!(v["sources"][0]["latest"]["raw_bytes"], 5);
        assert_eq!(v["storage"]["ok"], false);
    }
}
