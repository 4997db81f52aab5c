//! Walks the whole chain and every checkpoint, and reports the first thing that is wrong.
//!
//! Checks, in position order: positions are gapless from 1 (a removed event shows as a gap);
//! each stored event decodes and sits under its own position; its `prev_hash` is the previous
//! event's hash; its hash is SHA3-256 of its canonical encoding (a changed byte shows here);
//! stream versions are gapless per stream; the id index points back at it. Then the head record
//! matches the last event, and every checkpoint's signature holds for the ledger's public key and
//! its hash matches the event at its position.

use std::collections::HashMap;

use backstop_events::Digest;
use serde::Serialize;

use crate::checkpoint::{Checkpoint, verify_checkpoint};
use crate::error::LedgerError;
use crate::store::{Store, read_u64};

#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub position: u64,
    pub what: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub events: u64,
    pub head_position: u64,
    pub streams: usize,
    pub checkpoints: usize,
    pub last_checkpoint: Option<u64>,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn first_problem(&self) -> Option<&Problem> {
        self.problems.first()
    }
}

/// Verifies the ledger against the public key (hex) of its checkpoint signer.
pub fn verify(store: &Store, public_key: &str) -> Result<VerifyReport, LedgerError> {
    let mut problems = Vec::new();
    let mut expected_position = 1u64;
    let mut prev_hash = Digest::ZERO;
    let mut hashes: HashMap<u64, Digest> = HashMap::new();
    let mut stream_versions: HashMap<String, u64> = HashMap::new();
    let mut events = 0u64;
    for item in store.events.iter() {
        let (k, v) = item?;
        let Some(position) = read_u64(&k) else {
            problems.push(Problem {
                position: expected_position,
                what: "an event key is not an 8-byte position".into(),
            });
            continue;
        };
        events += 1;
        if position != expected_position {
            problems.push(Problem {
                position: expected_position,
                what: if position > expected_position {
                    format!(
                        "event {expected_position} is missing: the chain jumps from {} to {position}",
                        expected_position - 1
                    )
                } else {
                    format!("position {position} is out of order")
                },
            });
        }
        expected_position = position + 1;
        let env = match crate::store::decode_envelope(position, &v) {
            Ok(env) => env,
            Err(e) => {
                problems.push(Problem {
                    position,
                    what: e.to_string(),
                });
                prev_hash = Digest::ZERO;
                continue;
            }
        };
        if env.position != position {
            problems.push(Problem {
                position,
                what: format!(
                    "the event stored here says it is at position {}",
                    env.position
                ),
            });
        }
        if env.prev_hash != prev_hash {
            problems.push(Problem {
                position,
                what: format!(
                    "previous-hash link broken: it names {} but the event before hashes to {}",
                    env.prev_hash, prev_hash
                ),
            });
        }
        let computed = env.compute_hash();
        if computed != env.hash {
            problems.push(Problem {
                position,
                what: format!(
                    "content changed: its hash is recorded as {} but its content hashes to {computed}",
                    env.hash
                ),
            });
        }
        let last = stream_versions.entry(env.stream.clone()).or_insert(0);
        if env.version != *last + 1 {
            problems.push(Problem {
                position,
                what: format!(
                    "stream `{}` jumps from version {} to {}",
                    env.stream, last, env.version
                ),
            });
        }
        *last = env.version;
        match store.position_of(env.id)? {
            Some(p) if p == position => {}
            other => problems.push(Problem {
                position,
                what: format!("the id index maps event {} to {:?}", env.id, other),
            }),
        }
        hashes.insert(position, env.hash);
        prev_hash = env.hash;
    }

    let head = store.head()?;
    if head.position != expected_position - 1 {
        problems.push(Problem {
            position: head.position.max(expected_position - 1),
            what: format!(
                "the head record says the last event is {} but the last stored event is {}",
                head.position,
                expected_position - 1
            ),
        });
    } else if head.position > 0 && head.hash != prev_hash {
        problems.push(Problem {
            position: head.position,
            what: "the head record's hash differs from the last event's hash".into(),
        });
    }

    let mut checkpoints = 0usize;
    let mut last_checkpoint = None;
    for item in store.checkpoints.iter() {
        let (k, v) = item?;
        checkpoints += 1;
        let position = read_u64(&k).unwrap_or(0);
        let cp: Checkpoint = match serde_json::from_slice(&v) {
            Ok(cp) => cp,
            Err(e) => {
                problems.push(Problem {
                    position,
                    what: format!("checkpoint does not decode: {e}"),
                });
                continue;
            }
        };
        if let Err(why) = verify_checkpoint(&cp, public_key) {
            problems.push(Problem {
                position,
                what: format!("checkpoint signature invalid: {why}"),
            });
        }
        match hashes.get(&cp.position) {
            Some(h) if *h == cp.hash => last_checkpoint = Some(cp.position),
            Some(h) => problems.push(Problem {
                position: cp.position,
                what: format!(
                    "the signed checkpoint says the hash here is {} but the event hashes to {h}",
                    cp.hash
                ),
            }),
            None => problems.push(Problem {
                position: cp.position,
                what: "a signed checkpoint covers this position but the event is missing".into(),
            }),
        }
    }
    problems.sort_by_key(|p| p.position);
    Ok(VerifyReport {
        events,
        head_position: head.position,
        streams: stream_versions.len(),
        checkpoints,
        last_checkpoint,
        problems,
    })
}
