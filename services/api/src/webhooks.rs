//! `POST /webhooks/NAME`: trading signals into the webhook log (`backstop_ops::webhook`).
//!
//! Invariants:
//! - 200 only once the signal is durable in the local log (fsync before the answer); the body
//!   names the sequence number it got. 503 when the log cannot take it (the sender retries).
//! - Each log has its own token (`Authorization: Bearer TOKEN`, or `?token=TOKEN` for senders
//!   that cannot set headers); API tokens do not open a log, nor a log's token the API. A
//!   wrong or missing token is a 401 counted with the API's other refusals in `access.denied`
//!   (and throttled with them: 429 past the client's refusal limit), the path without the query.
//! - An unknown log is a 404 (counted as a refusal too, so names cannot be probed for free).
//! - Bodies are bounded by `api.max_body_bytes` (413 beyond, before anything is written).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};

use crate::auth::Caller;
use crate::{ApiError, ApiState, Ctx};

pub(crate) async fn receive(
    State(state): State<ApiState>,
    ctx: Ctx,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Json<backstop_ops::webhook::Ack>, ApiError> {
    let log = state.0.webhooks.get(&name);
    let token = ctx.bearer().or_else(|| {
        query.as_deref().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("token="))
                .map(str::to_string)
        })
    });
    let refusal = match (&log, &token) {
        (Some(log), Some(t)) if log.token_matches(t) => None,
        (None, _) => Some(ApiError::NotFound(format!(
            "no webhook log named {name:?} is configured on this server ([[webhooks]] in the configuration)"
        ))),
        (Some(_), None) => Some(ApiError::Unauthorized(
            "no token given: send this webhook log's token as `Authorization: Bearer TOKEN` or `?token=TOKEN`".into(),
        )),
        (Some(_), Some(_)) => Some(ApiError::Unauthorized(
            "the token is not this webhook log's".into(),
        )),
    };
    if let Some(refusal) = refusal {
        let caller = match &token {
            Some(t) => crate::auth::identify(&crate::auth::Tokens::default(), Some(t.as_str())),
            None => Caller::Anonymous,
        };
        return Err(state.refuse(&ctx, &caller, refusal).await);
    }
    let Some(log) = log else {
        return Err(ApiError::Internal("webhook log vanished".into()));
    };
    match log.append(body.to_vec()).await {
        Ok(ack) => Ok(Json(ack)),
        Err(e) => {
            tracing::error!(log = %name, error = %e, "a webhook signal was not stored");
            Err(ApiError::Unavailable(e.to_string()))
        }
    }
}
