//! A recording appender: an in-memory ledger for handler and use-case tests that need no
//! server. It keeps the ledger's append contract (expected stream versions with
//! [`LedgerError::Conflict`], idempotency by event id, gapless positions, events sealed with
//! their hash chain), records every envelope in order, and can be told to fail the next appends
//! with a transient error, so a test can check that a retried handler records nothing twice.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use backstop_events::{Digest, Envelope, Event, NewEvent};
use backstop_ledger::{Appended, Appender, Committed, ExpectedVersion, LedgerError};

#[derive(Default)]
struct State {
    events: Vec<Envelope>,
    versions: HashMap<String, u64>,
    positions: HashMap<uuid::Uuid, (u64, u64)>,
    fail_next: u32,
}

#[derive(Default)]
pub struct RecordingAppender {
    state: Mutex<State>,
}

impl RecordingAppender {
    pub fn new() -> RecordingAppender {
        RecordingAppender::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a test panicked while holding it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every envelope appended, in position order.
    pub fn envelopes(&self) -> Vec<Envelope> {
        self.lock().events.clone()
    }

    /// The type names of every event appended, in order.
    pub fn types(&self) -> Vec<String> {
        self.lock()
            .events
            .iter()
            .map(|e| e.event_type.clone())
            .collect()
    }

    /// The decoded events of one type.
    pub fn of_type(&self, event_type: &str) -> Vec<Event> {
        self.lock()
            .events
            .iter()
            .filter(|e| e.event_type == event_type)
            .filter_map(|e| e.event().ok())
            .collect()
    }

    /// The next `n` appends fail with a transient [`LedgerError::Remote`] and write nothing.
    pub fn fail_next(&self, n: u32) {
        self.lock().fail_next = n;
    }
}

#[async_trait]
impl Appender for RecordingAppender {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, LedgerError> {
        let mut st = self.lock();
        if st.fail_next > 0 {
            st.fail_next -= 1;
            return Err(LedgerError::Remote("injected failure".into()));
        }
        for e in &events {
            e.validate()?;
        }
        let mut version = st.versions.get(stream).copied().unwrap_or(0);
        // Idempotent by id: an append whose events are all stored already answers with them.
        if !events.is_empty() && events.iter().all(|e| st.positions.contains_key(&e.id)) {
            let committed = events
                .iter()
                .map(|e| {
                    let (position, version) = st.positions[&e.id];
                    Committed {
                        id: e.id,
                        position,
                        version,
                        duplicate: true,
                    }
                })
                .collect();
            return Ok(Appended {
                events: committed,
                stream_version: version,
            });
        }
        let ok = match expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => version == 0,
            ExpectedVersion::Exact(v) => version == v,
        };
        if !ok {
            return Err(LedgerError::Conflict {
                stream: stream.to_string(),
                expected: expected.to_string(),
                actual: version,
            });
        }
        let mut committed = Vec::new();
        for e in events {
            if let Some(&(position, v)) = st.positions.get(&e.id) {
                committed.push(Committed {
                    id: e.id,
                    position,
                    version: v,
                    duplicate: true,
                });
                continue;
            }
            version += 1;
            let position = st.events.len() as u64 + 1;
            let prev = st.events.last().map(|p| p.hash).unwrap_or(Digest::ZERO);
            let env = Envelope::seal(e, position, version, backstop_events::now_micros(), prev);
            st.positions.insert(env.id, (position, version));
            committed.push(Committed {
                id: env.id,
                position,
                version,
                duplicate: false,
            });
            st.events.push(env);
        }
        st.versions.insert(stream.to_string(), version);
        Ok(Appended {
            events: committed,
            stream_version: version,
        })
    }
}
