//! The envelope every event travels in, and the identity helpers it needs.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sha3::{Digest as _, Sha3_256};
use uuid::Uuid;

use crate::canonical;
use crate::vocabulary::Event;

/// The largest canonical payload the ledger accepts. Events describe actions; bulk data lives in
/// the repository. A payload this large is a bug in the appender, and refusing it keeps the
/// ledger, NATS messages (1 MiB by default) and projections small.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Errors about events themselves: decoding, unknown types, limits.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error(
        "unknown event type `{0}`: this build of Backstop does not know it (is the writer newer than the reader?)"
    )]
    UnknownType(String),
    #[error(
        "event type `{event_type}` has schema version {found}, newer than the {supported} this build reads; upgrade Backstop"
    )]
    FutureSchema {
        event_type: String,
        found: u16,
        supported: u16,
    },
    #[error("payload of `{event_type}` does not match its schema: {source}")]
    BadPayload {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("payload of `{event_type}` is {size} bytes; the limit is {MAX_PAYLOAD_BYTES} bytes")]
    PayloadTooLarge { event_type: String, size: usize },
    #[error("payload of `{0}` must be a JSON object")]
    PayloadNotObject(String),
    #[error("stream id must be 1 to 200 characters of [A-Za-z0-9._:-], got {0:?}")]
    BadStreamId(String),
    #[error("malformed digest {0:?}: expected 64 hex characters")]
    BadDigest(String),
    #[error("malformed actor {0:?}: expected system, worker:NAME or operator:NAME")]
    BadActor(String),
}

/// A SHA3-256 digest, shown as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub const ZERO: Digest = Digest([0; 32]);

    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha3_256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = EventError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s).map_err(|_| EventError::BadDigest(s.to_string()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| EventError::BadDigest(s.to_string()))?;
        Ok(Digest(arr))
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Who caused an event. Shown and stored as `system`, `worker:NAME` or `operator:NAME`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Actor {
    System,
    Worker(String),
    Operator(String),
}

impl Actor {
    pub fn worker(name: impl Into<String>) -> Actor {
        Actor::Worker(name.into())
    }
    pub fn operator(name: impl Into<String>) -> Actor {
        Actor::Operator(name.into())
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::System => f.write_str("system"),
            Actor::Worker(n) => write!(f, "worker:{n}"),
            Actor::Operator(n) => write!(f, "operator:{n}"),
        }
    }
}

impl FromStr for Actor {
    type Err = EventError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            None if s == "system" => Ok(Actor::System),
            Some(("worker", n)) if !n.is_empty() => Ok(Actor::Worker(n.to_string())),
            Some(("operator", n)) if !n.is_empty() => Ok(Actor::Operator(n.to_string())),
            _ => Err(EventError::BadActor(s.to_string())),
        }
    }
}

impl Serialize for Actor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Actor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The current time, truncated to whole microseconds (see the crate invariants).
pub fn now_micros() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A fresh UUIDv7: time-ordered, so ids sort roughly by creation.
pub fn uuid_v7() -> Uuid {
    Uuid::now_v7()
}

/// A UUIDv7 derived deterministically from a cause and a label.
///
/// Workers use it for the events they append in reaction to another event: a redelivered event
/// yields the same ids, and the ledger's idempotency by event id stores the result once. The
/// timestamp bits come from the cause's time so the id still sorts in time order.
pub fn uuid_v7_derived(cause: Uuid, at: DateTime<Utc>, label: &str) -> Uuid {
    let mut h = Sha3_256::new();
    h.update(cause.as_bytes());
    h.update(label.as_bytes());
    let digest = h.finalize();
    let mut random = [0u8; 10];
    random.copy_from_slice(&digest[..10]);
    let millis = at.timestamp_millis().max(0) as u64;
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// What an appender submits. The ledger adds position, stream version, recorded-at and hashes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    pub id: Uuid,
    pub stream: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: u16,
    pub occurred_at: DateTime<Utc>,
    pub actor: Actor,
    pub correlation_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    pub payload: serde_json::Value,
}

impl NewEvent {
    /// A new event with a fresh id that starts its own correlation.
    pub fn new(stream: impl Into<String>, actor: Actor, event: &Event) -> NewEvent {
        let id = uuid_v7();
        NewEvent {
            id,
            stream: stream.into(),
            event_type: event.type_name().to_string(),
            schema_version: event.schema_version(),
            occurred_at: now_micros(),
            actor,
            correlation_id: id,
            causation_id: None,
            payload: event.payload(),
        }
    }

    /// A new event caused by `cause`: it inherits the correlation id and names its cause.
    pub fn caused_by(
        cause: &Envelope,
        stream: impl Into<String>,
        actor: Actor,
        event: &Event,
    ) -> NewEvent {
        let mut e = NewEvent::new(stream, actor, event);
        e.correlation_id = cause.correlation_id;
        e.causation_id = Some(cause.id);
        e
    }

    /// The same event with a deterministic id derived from its cause (see [`uuid_v7_derived`]).
    pub fn with_derived_id(mut self, cause: &Envelope, label: &str) -> NewEvent {
        self.id = uuid_v7_derived(cause.id, cause.occurred_at, label);
        self
    }

    pub fn with_id(mut self, id: Uuid) -> NewEvent {
        self.id = id;
        self
    }

    /// Checks what the ledger checks before it accepts an event from anyone: a known type and
    /// schema version, a payload that decodes, a valid stream id, and the size limit.
    pub fn validate(&self) -> Result<(), EventError> {
        validate_stream_id(&self.stream)?;
        if !self.payload.is_object() {
            return Err(EventError::PayloadNotObject(self.event_type.clone()));
        }
        let size = canonical::json_len(&self.payload);
        if size > MAX_PAYLOAD_BYTES {
            return Err(EventError::PayloadTooLarge {
                event_type: self.event_type.clone(),
                size,
            });
        }
        Event::decode(&self.event_type, self.schema_version, &self.payload)?;
        Ok(())
    }
}

fn validate_stream_id(s: &str) -> Result<(), EventError> {
    let ok = !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(EventError::BadStreamId(s.to_string()))
    }
}

/// A committed event as the ledger stores, publishes and exports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Global position, gapless, starting at 1.
    pub position: u64,
    pub id: Uuid,
    pub stream: String,
    /// Version of the event within its stream, gapless, starting at 1.
    pub version: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub schema_version: u16,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub actor: Actor,
    pub correlation_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    pub payload: serde_json::Value,
    pub prev_hash: Digest,
    pub hash: Digest,
}

impl Envelope {
    /// Seals a new event at a position: computes its hash over the canonical encoding.
    pub fn seal(
        e: NewEvent,
        position: u64,
        version: u64,
        recorded_at: DateTime<Utc>,
        prev_hash: Digest,
    ) -> Envelope {
        let mut env = Envelope {
            position,
            id: e.id,
            stream: e.stream,
            version,
            event_type: e.event_type,
            schema_version: e.schema_version,
            occurred_at: e.occurred_at.trunc_subsecs(6),
            recorded_at: recorded_at.trunc_subsecs(6),
            actor: e.actor,
            correlation_id: e.correlation_id,
            causation_id: e.causation_id,
            payload: e.payload,
            prev_hash,
            hash: Digest::ZERO,
        };
        env.hash = env.compute_hash();
        env
    }

    /// The hash this envelope should have: SHA3-256 of its canonical encoding.
    pub fn compute_hash(&self) -> Digest {
        Digest::of(&canonical::encode(self))
    }

    /// The typed payload, upgraded from older schema versions where needed.
    pub fn event(&self) -> Result<Event, EventError> {
        Event::decode(&self.event_type, self.schema_version, &self.payload)
    }

    /// Reads the envelope's `NewEvent` part back, for re-submission or comparison.
    pub fn as_new_event(&self) -> NewEvent {
        NewEvent {
            id: self.id,
            stream: self.stream.clone(),
            event_type: self.event_type.clone(),
            schema_version: self.schema_version,
            occurred_at: self.occurred_at,
            actor: self.actor.clone(),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            payload: self.payload.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocabulary::*;

    fn sample() -> NewEvent {
        NewEvent::new(
            "source-main",
            Actor::operator("alice"),
            &Event::BackupRequested(BackupRequested {
                backup_id: uuid_v7(),
                source: "main".into(),
                kind: BackupKind::Full,
                method: BackupMethod::Logical,
                trigger: Trigger::Manual,
                attempt: 1,
            }),
        )
    }

    #[test]
    fn seal_then_recompute_matches_and_any_change_breaks_it() {
        let env = Envelope::seal(sample(), 1, 1, now_micros(), Digest::ZERO);
        assert_eq!(env.compute_hash(), env.hash);
        let mut changed = env.clone();
        changed.payload["source"] = "other".into();
        assert_ne!(changed.compute_hash(), env.hash);
        let mut moved = env.clone();
        moved.position = 2;
        assert_ne!(moved.compute_hash(), env.hash);
    }

    #[test]
    fn json_round_trip_keeps_the_hash() {
        let env = Envelope::seal(sample(), 7, 3, now_micros(), Digest::of(b"x"));
        let json = serde_json::to_string(&env).unwrap();
        let back: Envelope = serde_json::from_str(&json).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.compute_hash(), env.hash);
    }

    #[test]
    fn validation_rejects_what_the_ledger_must_not_store() {
        let mut e = sample();
        e.event_type = "backup.teleported".into();
        assert!(matches!(e.validate(), Err(EventError::UnknownType(_))));
        let mut e = sample();
        e.stream = "has space".into();
        assert!(matches!(e.validate(), Err(EventError::BadStreamId(_))));
        let mut e = sample();
        e.payload["source"] = serde_json::Value::String("x".repeat(MAX_PAYLOAD_BYTES));
        assert!(matches!(
            e.validate(),
            Err(EventError::PayloadTooLarge { .. })
        ));
        let mut e = sample();
        e.payload = serde_json::json!({"backup_id": 5});
        assert!(matches!(e.validate(), Err(EventError::BadPayload { .. })));
        let mut e = sample();
        e.schema_version = 99;
        assert!(matches!(e.validate(), Err(EventError::FutureSchema { .. })));
        assert!(sample().validate().is_ok());
    }

    #[test]
    fn derived_ids_are_stable_and_distinct_per_label() {
        let cause = uuid_v7();
        let at = now_micros();
        assert_eq!(
            uuid_v7_derived(cause, at, "a"),
            uuid_v7_derived(cause, at, "a")
        );
        assert_ne!(
            uuid_v7_derived(cause, at, "a"),
            uuid_v7_derived(cause, at, "b")
        );
        assert_eq!(uuid_v7_derived(cause, at, "a").get_version_num(), 7);
    }

    #[test]
    fn actors_parse_and_print() {
        for s in ["system", "worker:verify", "operator:alice"] {
            assert_eq!(s.parse::<Actor>().unwrap().to_string(), s);
        }
        assert!("root".parse::<Actor>().is_err());
        assert!("operator:".parse::<Actor>().is_err());
    }
}
