//! Appends from outside the ledger's process: the one request and reply shape, and the one
//! server-side path every such append takes, whatever carried it (NATS in [`crate::remote`], the
//! control socket in [`crate::local`]).
//!
//! ```text
//! request: {"stream": "...", "expected": {"expect": "exact", "version": 3}, "events": [NewEvent, ...]}
//! reply:   {"ok": Appended} | {"error": {"kind": "conflict"|"invalid"|"malformed"|..., "message": "...", "actual": 3}}
//! ```
//!
//! Invariants:
//! - A request reaches the writer only through [`answer`], which calls [`Ledger::append`]: the
//!   batch size, stream, type, schema and payload-size checks of a local append apply unchanged,
//!   and a refused request writes nothing.
//! - A request that does not decode is answered with kind `malformed` and never reaches the
//!   writer.
//! - `actual` is set on a `conflict` only, so a client can rebuild [`LedgerError::Conflict`].

use backstop_events::NewEvent;
use serde::{Deserialize, Serialize};

use crate::error::LedgerError;
use crate::{Appended, Appender, ExpectedVersion, Ledger};

#[derive(Serialize, Deserialize)]
pub struct AppendRequest {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "snake_case")]
pub enum AppendReply {
    Ok(Appended),
    Error {
        kind: String,
        message: String,
        /// The stream's version, on a conflict.
        #[serde(default)]
        actual: Option<u64>,
    },
}

impl AppendReply {
    /// The reply to bytes that are not an append request.
    pub fn malformed(why: impl std::fmt::Display) -> AppendReply {
        AppendReply::Error {
            kind: "malformed".into(),
            message: format!("the append request is not valid JSON of the expected shape: {why}"),
            actual: None,
        }
    }

    /// What the client's caller sees: the committed events, a rebuilt conflict, or the server's
    /// refusal with its kind.
    pub fn into_result(
        self,
        stream: &str,
        expected: ExpectedVersion,
    ) -> Result<Appended, LedgerError> {
        match self {
            AppendReply::Ok(a) => Ok(a),
            AppendReply::Error {
                kind,
                message,
                actual,
            } => Err(match (kind.as_str(), actual) {
                ("conflict", Some(actual)) => LedgerError::Conflict {
                    stream: stream.to_string(),
                    expected: expected.to_string(),
                    actual,
                },
                _ => refusal(kind, message),
            }),
        }
    }
}

/// The client-side error for a refusal of `kind`: the ledger's own trouble (its storage, a
/// shutdown) may pass and is transient; anything about the request itself is
/// [`LedgerError::Refused`], which no retry fixes.
pub fn refusal(kind: String, message: String) -> LedgerError {
    match kind.as_str() {
        "storage" | "closed" => LedgerError::Remote(format!("{kind}: {message}")),
        _ => LedgerError::Refused { kind, message },
    }
}

fn error_kind(e: &LedgerError) -> &'static str {
    match e {
        LedgerError::Conflict { .. } => "conflict",
        LedgerError::IdReused { .. } => "id_reused",
        LedgerError::Invalid(_) | LedgerError::BadBatch { .. } => "invalid",
        LedgerError::Closed => "closed",
        LedgerError::Failed { .. } => "failed",
        _ => "storage",
    }
}

/// Decodes a request and answers it (see [`answer`]). `via` names the transport in logs.
pub async fn answer_bytes(ledger: &Ledger, body: &[u8], via: &'static str) -> AppendReply {
    match serde_json::from_slice::<AppendRequest>(body) {
        Err(e) => {
            let reply = AppendReply::malformed(e);
            log_refusal(&reply, via);
            reply
        }
        Ok(req) => answer(ledger, req, via).await,
    }
}

/// Appends a decoded request through [`Ledger::append`] (every check of a local append) and
/// turns the outcome into a reply.
pub async fn answer(ledger: &Ledger, req: AppendRequest, via: &'static str) -> AppendReply {
    let reply = match ledger.append(&req.stream, req.expected, req.events).await {
        Ok(a) => AppendReply::Ok(a),
        Err(e) => AppendReply::Error {
            kind: error_kind(&e).into(),
            actual: match &e {
                LedgerError::Conflict { actual, .. } => Some(*actual),
                _ => None,
            },
            message: e.to_string(),
        },
    };
    log_refusal(&reply, via);
    reply
}

fn log_refusal(reply: &AppendReply, via: &'static str) {
    if let AppendReply::Error { kind, message, .. } = reply {
        tracing::warn!(%kind, %message, via, "append from outside the process refused");
    }
}

/// The client side: checks the events as a local append would (so a bad event fails fast with
/// the same error), then builds the request.
pub fn request(
    stream: &str,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> Result<AppendRequest, LedgerError> {
    for e in &events {
        e.validate()?;
    }
    Ok(AppendRequest {
        stream: stream.to_string(),
        expected,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_of_the_request_are_permanent_and_the_ledgers_trouble_transient() {
        for kind in ["invalid", "malformed", "denied", "id_reused", "failed"] {
            let e = refusal(kind.into(), "x".into());
            assert!(matches!(e, LedgerError::Refused { .. }), "{kind}");
            assert!(!e.is_transient(), "{kind}");
        }
        for kind in ["storage", "closed"] {
            assert!(refusal(kind.into(), "x".into()).is_transient(), "{kind}");
        }
    }
}
