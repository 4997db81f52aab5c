//! Live updates: `GET /api/events/stream`, server-sent events fed by a ledger subscription.
//!
//! Each committed event is sent as `event: ledger`, `id: <position>`, and a JSON summary
//! (position, type, stream, actor, recorded_at), never the payload. It needs a token or a sign-in
//! session (any role), even on a public dashboard: the stream is for "something
//! changed, refresh", and the audit trail is where payloads are read. A browser that reconnects
//! sends `Last-Event-ID` and resumes after it; `?from=POSITION` starts elsewhere. Without either
//! the stream starts at the next event. The stream ends when the server shuts down.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};

use crate::auth::Need;
use crate::error::ApiError;
use crate::params::Params;
use crate::{ApiState, Ctx};

pub async fn stream(
    State(state): State<ApiState>,
    ctx: Ctx,
    params: Params,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    params.only(&["from"])?;
    let from = params.opt_uint("from", 1, i64::MAX as u64)?;
    let last_seen = match ctx.headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad("Last-Event-ID must be a ledger position"))?,
        ),
    };
    // The stream names streams and actors: it needs a token or a sign-in session, even on a
    // public dashboard (whose anonymous viewers refresh on a timer instead).
    state.authorize(&ctx, Need::Read).await?;
    let start = match (last_seen, from) {
        (Some(p), _) => p + 1,
        (None, Some(f)) => f,
        (None, None) => state.0.ledger.head().position + 1,
    };
    let sub = state.0.ledger.subscribe(start);
    let mut shutdown = state.0.shutdown.clone();
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    let events = futures::stream::unfold(sub, |mut sub| async move {
        match sub.next_batch(256).await {
            Ok(batch) if !batch.is_empty() => Some((batch, sub)),
            _ => None,
        }
    })
    .flat_map(move |batch| {
        futures::stream::iter(batch.into_iter().map(move |e| {
            let summary = serde_json::json!({
                "position": e.position,
                "type": e.event_type,
                "stream": e.stream,
                "actor": e.actor.to_string(),
                "recorded_at": e.recorded_at,
            });
            Ok(Event::default()
                .event("ledger")
                .id(e.position.to_string())
                .data(summary.to_string()))
        }))
    })
    .take_until(Box::pin(stop));
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
