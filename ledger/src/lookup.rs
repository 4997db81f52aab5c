//! Whether the ledger holds an event, asked over NATS by processes that do not own it.
//!
//! Wire format (JSON both ways) on subject `backstop.ledger.contains` (queue group `ledger`),
//! answered by the process that owns the ledger (`backstop serve`):
//!
//! ```text
//! request: {"id": "<event id, a UUID>"}
//! reply:   {"found": true|false} | {"error": "..."}
//! ```
//!
//! Why ask the ledger rather than read JetStream's copy: the answer must be exact at the moment
//! it is asked. A worker checks "was this already done?" before doing work it cannot take back
//! (sending a notification), and the copy in the stream lags the ledger by the publication delay,
//! which grows to seconds while a NATS node is lost and the stream elects a new leader; a scan of
//! the stream also needs a consumer, which a cluster that has just lost a node may fail to place.
//! A request goes to whichever node the client is connected to and reaches serve through the
//! cluster's routes, so it keeps working with one node down.
//!
//! The answer reveals only whether an id exists, never an event's content; the `worker` user of
//! deploy/nats/auth.conf may ask it.

use std::time::Duration;

use futures::StreamExt;
use uuid::Uuid;

use crate::Ledger;
use crate::error::LedgerError;

pub const CONTAINS_SUBJECT: &str = "backstop.ledger.contains";
const QUEUE_GROUP: &str = "ledger";

#[derive(serde::Serialize, serde::Deserialize)]
struct ContainsRequest {
    id: Uuid,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum ContainsReply {
    Found(bool),
    Error(String),
}

/// Answers lookups until `shutdown` fires (a sled read each, answered in order).
pub async fn serve(
    ledger: Ledger,
    client: async_nats::Client,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), LedgerError> {
    let mut sub = client
        .queue_subscribe(CONTAINS_SUBJECT, QUEUE_GROUP.to_string())
        .await
        .map_err(|e| LedgerError::Nats(format!("subscribe to {CONTAINS_SUBJECT}: {e}")))?;
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
            _ = shutdown.changed() => return Ok(()),
        };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let reply = match serde_json::from_slice::<ContainsRequest>(&msg.payload) {
            Ok(req) => match ledger.store().position_of(req.id) {
                Ok(p) => ContainsReply::Found(p.is_some()),
                Err(e) => ContainsReply::Error(e.to_string()),
            },
            Err(e) => ContainsReply::Error(format!("malformed lookup: {e}")),
        };
        let body = serde_json::to_vec(&reply).unwrap_or_default();
        if let Err(e) = client.publish(reply_to, body.into()).await {
            tracing::warn!(error = %e, "could not answer a ledger lookup");
        }
    }
}

/// Asks the ledger-owning process whether an event id is stored.
#[derive(Clone)]
pub struct RemoteLookup {
    client: async_nats::Client,
    timeout: Duration,
}

impl RemoteLookup {
    pub fn new(client: async_nats::Client) -> RemoteLookup {
        RemoteLookup {
            client,
            timeout: Duration::from_secs(10),
        }
    }

    /// Whether the ledger holds an event with this id. A timeout or transport error is
    /// [`LedgerError::Remote`] (transient: ask again later), never a guess.
    pub async fn contains(&self, id: Uuid) -> Result<bool, LedgerError> {
        let body = serde_json::to_vec(&ContainsRequest { id })
            .map_err(|e| LedgerError::Remote(format!("encode lookup: {e}")))?;
        let reply = tokio::time::timeout(
            self.timeout,
            self.client.request(CONTAINS_SUBJECT, body.into()),
        )
        .await
        .map_err(|_| LedgerError::Remote("no answer to a ledger lookup within the timeout".into()))?
        .map_err(|e| LedgerError::Remote(format!("ledger lookup: {e}")))?;
        match serde_json::from_slice::<ContainsReply>(&reply.payload) {
            Ok(ContainsReply::Found(found)) => Ok(found),
            Ok(ContainsReply::Error(e)) => Err(LedgerError::Remote(format!("ledger lookup: {e}"))),
            Err(e) => Err(LedgerError::Remote(format!(
                "unreadable answer to a ledger lookup: {e}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_is_the_documented_one() {
        let id = Uuid::nil();
        assert_eq!(
            serde_json::to_string(&ContainsRequest { id }).unwrap(),
            r#"{"id":"00000000-0000-0000-0000-000000000000"}"#
        );
        assert_eq!(
            serde_json::to_string(&ContainsReply::Found(true)).unwrap(),
            r#"{"found":true}"#
        );
        assert_eq!(
            serde_json::to_string(&ContainsReply::Error("x".into())).unwrap(),
            r#"{"error":"x"}"#
        );
    }
}
