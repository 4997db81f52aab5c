//! Records every data-key unwrap as a `key.accessed` event.
//!
//! The repository reports unwraps to an observer (it knows nothing of the ledger); the process
//! hands it the sending side of a channel and runs [`record_key_accesses`] on the other side. The
//! event's actor is the one the repository handle was opened for (`worker:backup`,
//! `operator:alice`), and its reason says why (`backup <id> of main`).

use std::sync::Arc;

use backstop_events::{Actor, Event, KeyAccessed, NewEvent, streams};
use backstop_ledger::{Appender, ExpectedVersion};
use backstop_repo::KeyAccess;
use tokio::sync::mpsc::UnboundedReceiver;

pub fn key_access_event(access: &KeyAccess) -> NewEvent {
    let actor = access.actor.parse().unwrap_or(Actor::System);
    let purpose = access.purpose.as_str();
    NewEvent::new(
        streams::keys(purpose),
        actor,
        &Event::KeyAccessed(KeyAccessed {
            purpose: purpose.to_string(),
            key_id: access.key_id.clone(),
            reason: access.reason.clone(),
        }),
    )
}

/// Appends a `key.accessed` event for each access until the channel closes. An append that
/// fails is retried: an access must not go unrecorded.
pub async fn record_key_accesses(
    mut rx: UnboundedReceiver<KeyAccess>,
    appender: Arc<dyn Appender>,
) {
    while let Some(access) = rx.recv().await {
        let e = key_access_event(&access);
        let stream = e.stream.clone();
        let mut delay = std::time::Duration::from_millis(100);
        loop {
            match appender
                .append(&stream, ExpectedVersion::Any, vec![e.clone()])
                .await
            {
                Ok(_) => break,
                Err(err) if err.is_transient() => {
                    tracing::warn!(error = %err, "cannot record a key access yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
                Err(err) => {
                    tracing::error!(error = %err, key_id = %access.key_id, "key access could not be recorded");
                    break;
                }
            }
        }
    }
}
