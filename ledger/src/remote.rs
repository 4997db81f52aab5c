//! Appends from other machines: NATS request/reply to the process that owns the ledger.
//!
//! Wire format (JSON both ways) on subject `backstop.ledger.append` (queue group `ledger`):
//!
//! ```text
//! request: {"stream": "...", "expected": {"expect": "exact", "version": 3}, "events": [NewEvent, ...]}
//! reply:   {"ok": Appended} | {"error": {"kind": "conflict"|"invalid"|"malformed"|..., "message": "..."}}
//! ```
//!
//! The shapes and the server-side handling are shared with the control socket
//! ([`crate::local`]) in [`crate::requests`]: the server validates everything a local append
//! validates; a malformed request gets an error reply and never reaches the writer. The client retries timeouts and transport errors with
//! the same event ids, which is safe because appends are idempotent by event id.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backstop_events::NewEvent;
use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::error::LedgerError;
pub use crate::requests::{AppendReply, AppendRequest};
use crate::{Appended, Appender, ExpectedVersion, Ledger, requests};

pub const APPEND_SUBJECT: &str = "backstop.ledger.append";
const QUEUE_GROUP: &str = "ledger";

/// Serves remote appends until `shutdown` fires. Requests are handled concurrently (bounded), so
/// many remote workers share the writer's group commits.
pub async fn serve(
    ledger: Ledger,
    client: async_nats::Client,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), LedgerError> {
    let mut sub = client
        .queue_subscribe(APPEND_SUBJECT, QUEUE_GROUP.to_string())
        .await
        .map_err(|e| LedgerError::Nats(format!("subscribe to {APPEND_SUBJECT}: {e}")))?;
    let limit = Arc::new(Semaphore::new(1024));
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
            _ = shutdown.changed() => return Ok(()),
        };
        let Some(reply_to) = msg.reply.clone() else {
            tracing::warn!("remote append without a reply subject ignored");
            continue;
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return Ok(());
        };
        let ledger = ledger.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let reply = requests::answer_bytes(&ledger, &msg.payload, "nats").await;
            let body = serde_json::to_vec(&reply).unwrap_or_default();
            if let Err(e) = client.publish(reply_to, body.into()).await {
                tracing::warn!(error = %e, "could not answer a remote append");
            }
            drop(permit);
        });
    }
}

/// An [`Appender`] that appends through the ledger-owning process over NATS.
#[derive(Clone)]
pub struct RemoteLedger {
    client: async_nats::Client,
    timeout: Duration,
    attempts: u32,
}

impl RemoteLedger {
    pub fn new(client: async_nats::Client) -> RemoteLedger {
        RemoteLedger {
            client,
            timeout: Duration::from_secs(10),
            attempts: 5,
        }
    }

    /// Sends raw bytes as an append request (for tests of malformed input).
    pub async fn request_raw(&self, body: Vec<u8>) -> Result<AppendReply, LedgerError> {
        let reply = tokio::time::timeout(
            self.timeout,
            self.client.request(APPEND_SUBJECT, body.into()),
        )
        .await
        .map_err(|_| LedgerError::Remote("no answer from the ledger within the timeout".into()))?
        .map_err(|e| {
            LedgerError::Remote(format!(
                "request failed: {e} (is `backstop serve --nats` running?)"
            ))
        })?;
        serde_json::from_slice(&reply.payload)
            .map_err(|e| LedgerError::Remote(format!("malformed reply from the ledger: {e}")))
    }
}

#[async_trait]
impl Appender for RemoteLedger {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, LedgerError> {
        let body = serde_json::to_vec(&requests::request(stream, expected, events)?)
            .map_err(|e| LedgerError::Remote(format!("cannot encode request: {e}")))?;
        let mut delay = Duration::from_millis(200);
        let mut last = None;
        for _ in 0..self.attempts {
            match self.request_raw(body.clone()).await {
                Ok(reply) => return reply.into_result(stream, expected),
                Err(e) => {
                    tracing::warn!(error = %e, "remote append failed; retrying");
                    last = Some(e);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        Err(last.unwrap_or(LedgerError::Remote("no attempt made".into())))
    }
}
