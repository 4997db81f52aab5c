//! Catch-up subscriptions: replay from a position, then follow new commits live.
//!
//! A subscription reads sled directly and waits on the writer's head watch when it has caught
//! up. There is no in-memory queue that could overflow or drop events: a slow subscriber simply
//! reads further behind, and only ever sees flushed (acknowledged) events.

use backstop_events::Envelope;
use tokio::sync::watch;

use crate::Ledger;
use crate::error::LedgerError;
use crate::store::{Head, Store};

pub struct Subscription {
    store: Store,
    head: watch::Receiver<Head>,
    next: u64,
}

impl Ledger {
    /// Events from `from` (inclusive) onwards, then live.
    pub fn subscribe(&self, from: u64) -> Subscription {
        Subscription {
            store: self.store().clone(),
            head: self.watch_head(),
            next: from.max(1),
        }
    }
}

impl Subscription {
    /// The next position this subscription will return.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Up to `max` events; waits while there are none. `Ok(empty)` means the ledger closed.
    pub async fn next_batch(&mut self, max: usize) -> Result<Vec<Envelope>, LedgerError> {
        loop {
            let committed = self.head.borrow_and_update().position;
            if committed >= self.next {
                let limit = max.min((committed - self.next + 1) as usize);
                let batch = self.store.range(self.next, limit)?;
                if let Some(last) = batch.last() {
                    self.next = last.position + 1;
                    return Ok(batch);
                }
            }
            if self.head.changed().await.is_err() {
                return Ok(Vec::new());
            }
        }
    }
}
