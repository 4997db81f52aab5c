//! Workers: one handler per concern, each reacting to events and appending its results.
//!
//! Every handler implements [`backstop_ledger::consumer::Handler`] and runs unchanged in both
//! modes: embedded (subscribed to the local ledger) and distributed (a JetStream durable consumer,
//! appending through NATS). Handlers are idempotent: the events they append carry ids derived
//! from the event that caused them, so a redelivery stores nothing twice.

pub mod alerts;
pub mod backup;
pub mod fault;
pub mod keys;

use std::sync::Arc;

use backstop_ledger::consumer::Handler;

/// The names of the workers `backstop worker --only` accepts.
pub const KINDS: &[&str] = &[alerts::NAME];

/// The handlers to run, all of them or the named ones.
pub fn handlers(only: &[String]) -> Result<Vec<Arc<dyn Handler>>, String> {
    for name in only {
        if !KINDS.contains(&name.as_str()) {
            return Err(format!(
                "unknown worker `{name}`; known workers: {}",
                KINDS.join(", ")
            ));
        }
    }
    let all: Vec<Arc<dyn Handler>> = vec![Arc::new(alerts::AlertWorker)];
    Ok(all
        .into_iter()
        .filter(|h| only.is_empty() || only.iter().any(|n| n == h.name()))
        .collect())
}
