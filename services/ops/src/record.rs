//! Appending a use case's events idempotently.
//!
//! Invariant: the id of every event a use case records is derived from the id of what it is
//! about (a backup, a recovery), a label naming the step, and the time of the request, never the
//! time of the attempt. So a retried step, a redelivered request, or a second worker doing the
//! same work appends an event the ledger already holds, which it stores once.

use backstop_events::{Actor, Envelope, Event, NewEvent};
use backstop_ledger::{Appender, ExpectedVersion, LedgerError};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Appends one event to `stream` with an id derived from `(subject, at, label)`.
#[allow(clippy::too_many_arguments)]
pub async fn record(
    appender: &dyn Appender,
    stream: &str,
    actor: &Actor,
    cause: Option<&Envelope>,
    at: DateTime<Utc>,
    label: &str,
    subject: Uuid,
    event: Event,
) -> Result<(), LedgerError> {
    let mut e = match cause {
        Some(c) => NewEvent::caused_by(c, stream, actor.clone(), &event),
        None => NewEvent::new(stream, actor.clone(), &event),
    };
    e.id = backstop_events::uuid_v7_derived(subject, at, label);
    appender
        .append(stream, ExpectedVersion::Any, vec![e])
        .await?;
    Ok(())
}

/// The time inside a UUIDv7 (a backup or recovery id's creation time), for ids derived from it
/// when no request time is at hand.
pub fn uuid_time(id: Uuid) -> DateTime<Utc> {
    id.get_timestamp()
        .and_then(|ts| {
            let (secs, nanos) = ts.to_unix();
            DateTime::<Utc>::from_timestamp(secs as i64, nanos)
        })
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}
