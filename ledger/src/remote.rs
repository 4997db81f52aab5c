//! Appends from other machines: NATS request/reply to the process that owns the ledger.
//!
//! Wire format (JSON both ways) on subject `backstop.ledger.append` (queue group `ledger`):
//!
//! ```text
//! request: {"stream": "...", "expected": {"expect": "exact", "version": 3}, "events": [NewEvent, ...]}
//! reply:   {"ok": Appended} | {"error": {"kind": "conflict"|"invalid"|"malformed"|..., "message": "..."}}
//! ```
//!
//! A request may be signed by the sender's identity, in NATS headers (see [`crate::identity`]);
//! with identities configured, the ledger refuses (kind `denied`) and records anything unsigned
//! or outside the sender's grants before it reaches the writer.
//!
//! The shapes and the server-side handling are shared with the control socket
//! ([`crate::local`]) in [`crate::requests`]: the server validates everything a local append
//! validates; a malformed request gets an error reply and never reaches the writer. The client retries timeouts and transport errors with
//! the same event ids, which is safe because appends are idempotent by event id.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use backstop_events::{AccessDenied, Actor, Event, NewEvent, streams};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::error::LedgerError;
use crate::identity::{
    AppendPolicy, AppendSigner, Denial, DenialAggregate, DenialRecord, SignedBy,
};
pub use crate::requests::{AppendReply, AppendRequest};
use crate::{Appended, Appender, ExpectedVersion, Ledger, requests};

pub const APPEND_SUBJECT: &str = "backstop.ledger.append";
const QUEUE_GROUP: &str = "ledger";

/// How often the denial tallies are looked at, so a window's count is recorded soon after the
/// window ends even when no further refusal comes.
const DENIAL_FLUSH_EVERY: Duration = Duration::from_secs(15);

/// Serves remote appends until `shutdown` fires. Requests are handled concurrently (bounded), so
/// many remote workers share the writer's group commits. Each request is checked against
/// `policy` first (see [`crate::identity`]): a refused one never reaches the writer, is answered
/// `denied`, and is counted into `access.denied` events.
pub async fn serve(
    ledger: Ledger,
    client: async_nats::Client,
    policy: Arc<AppendPolicy>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), LedgerError> {
    let mut sub = client
        .queue_subscribe(APPEND_SUBJECT, QUEUE_GROUP.to_string())
        .await
        .map_err(|e| LedgerError::Nats(format!("subscribe to {APPEND_SUBJECT}: {e}")))?;
    if policy.is_open() {
        tracing::warn!(
            "remote appends are not authenticated: anyone who can publish to {APPEND_SUBJECT} can append any event; list the workers' and hosts' identities in [[ledger.identities]]"
        );
    }
    // 1024 requests in progress at most: beyond it the subscription's own buffer holds the rest,
    // so a burst cannot make this process spawn without bound.
    let limit = Arc::new(Semaphore::new(1024));
    let denials = Arc::new(Mutex::new(DenialAggregate::new(DENIAL_WINDOW)));
    let mut flush = tokio::time::interval(DENIAL_FLUSH_EVERY);
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => break },
            _ = shutdown.changed() => break,
            _ = flush.tick() => {
                let due = lock(&denials).flush(Utc::now(), false);
                record_denials(&ledger, due).await;
                continue;
            }
        };
        let Some(reply_to) = msg.reply.clone() else {
            tracing::warn!("remote append without a reply subject ignored");
            continue;
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let (ledger, client, policy, denials) = (
            ledger.clone(),
            client.clone(),
            policy.clone(),
            denials.clone(),
        );
        tokio::spawn(async move {
            let reply = match authorize(&policy, &msg, Utc::now()) {
                Ok(()) => requests::answer_bytes(&ledger, &msg.payload, "nats").await,
                Err(denial) => {
                    tracing::warn!(caller = %denial.caller, stream = %denial.stream, reason = %denial.reason, "remote append refused");
                    let reply = AppendReply::Error {
                        kind: "denied".into(),
                        message: format!("{}: {}", denial.caller, denial.reason),
                        actual: None,
                    };
                    let due = lock(&denials).note(denial, Utc::now());
                    record_denials(&ledger, due).await;
                    reply
                }
            };
            let body = serde_json::to_vec(&reply).unwrap_or_default();
            if let Err(e) = client.publish(reply_to, body.into()).await {
                tracing::warn!(error = %e, "could not answer a remote append");
            }
            drop(permit);
        });
    }
    let rest = lock(&denials).flush(Utc::now(), true);
    record_denials(&ledger, rest).await;
    Ok(())
}

/// One `access.denied` event per client and window (see [`DenialAggregate`]).
const DENIAL_WINDOW: Duration = Duration::from_secs(60);

fn lock(m: &Mutex<DenialAggregate>) -> std::sync::MutexGuard<'_, DenialAggregate> {
    // A panic while holding the tally loses counts, not the ledger's consistency: go on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The request's signature headers, and the policy's verdict on them and on its body.
fn authorize(
    policy: &AppendPolicy,
    msg: &async_nats::Message,
    now: DateTime<Utc>,
) -> Result<(), Denial> {
    if policy.is_open() {
        return Ok(());
    }
    let signed = msg.headers.as_ref().and_then(SignedBy::from_headers);
    // The grants need the decoded request; a body that does not decode is refused here only if
    // its signature fails, else it is answered `malformed` by the usual path.
    match serde_json::from_slice::<AppendRequest>(&msg.payload) {
        Ok(req) => policy.check(signed.as_ref(), &msg.payload, &req, now),
        Err(_) => {
            let empty = AppendRequest {
                stream: String::new(),
                expected: ExpectedVersion::Any,
                events: Vec::new(),
            };
            policy.check(signed.as_ref(), &msg.payload, &empty, now)
        }
    }
}

async fn record_denials(ledger: &Ledger, records: Vec<DenialRecord>) {
    if records.is_empty() {
        return;
    }
    let stream = streams::access();
    let events = records
        .into_iter()
        .map(|r| {
            let event = Event::AccessDenied(AccessDenied {
                caller: r.denial.caller,
                role: None,
                method: "append".into(),
                path: if r.denial.stream.is_empty() {
                    APPEND_SUBJECT.to_string()
                } else {
                    format!("{APPEND_SUBJECT} {}", r.denial.stream)
                },
                reason: r.denial.reason,
                count: r.count,
                window_seconds: r.window_seconds,
            });
            NewEvent::new(stream.clone(), Actor::worker("ledger"), &event)
        })
        .collect();
    match tokio::time::timeout(
        Duration::from_secs(5),
        ledger.append(&stream, ExpectedVersion::Any, events),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "could not record refused remote appends"),
        Err(_) => tracing::error!("recording refused remote appends timed out"),
    }
}

/// An [`Appender`] that appends through the ledger-owning process over NATS.
#[derive(Clone)]
pub struct RemoteLedger {
    client: async_nats::Client,
    timeout: Duration,
    attempts: u32,
    /// Signs every request when set (see [`crate::identity`]).
    signer: Option<Arc<AppendSigner>>,
}

impl RemoteLedger {
    pub fn new(client: async_nats::Client) -> RemoteLedger {
        RemoteLedger {
            client,
            timeout: Duration::from_secs(10),
            attempts: 5,
            signer: None,
        }
    }

    /// Signs every request as `signer`'s identity.
    pub fn signed_by(mut self, signer: Arc<AppendSigner>) -> RemoteLedger {
        self.signer = Some(signer);
        self
    }

    /// Sends raw bytes as an append request (for tests of malformed input), signed when this
    /// client has an identity. Each attempt is signed afresh, so a retry after an outage is not
    /// refused as a replay.
    pub async fn request_raw(&self, body: Vec<u8>) -> Result<AppendReply, LedgerError> {
        let headers = self
            .signer
            .as_ref()
            .map(|s| s.sign(&body, Utc::now()).to_headers());
        let request = async {
            match headers {
                Some(h) => {
                    self.client
                        .request_with_headers(APPEND_SUBJECT, h, body.into())
                        .await
                }
                None => self.client.request(APPEND_SUBJECT, body.into()).await,
            }
        };
        let reply = tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| {
                LedgerError::Remote("no answer from the ledger within the timeout".into())
            })?
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
