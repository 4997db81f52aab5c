//! Fault injection for the crash tests, off unless an environment variable asks for it.
//!
//! `BACKSTOP_FAULT_PAUSE_BEFORE_ACK_MS=N` makes a handler sleep N ms after it appended its results
//! and before it returns (so before the event is acknowledged). The end-to-end test uses it to
//! kill a worker at the worst moment and check that the redelivered event's result is stored
//! once. Nothing in normal operation sets it.

use std::time::Duration;

pub async fn pause_before_ack() {
    if let Some(ms) = std::env::var("BACKSTOP_FAULT_PAUSE_BEFORE_ACK_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tracing::warn!(ms, "fault injection: pausing before ack");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}
