//! Who may append from another machine: signed append requests, and the ledger's list of the
//! identities it accepts with what each may append.
//!
//! A worker or a database host holds an ed25519 key of its own (an *identity*: a name and a
//! 32-byte seed in a file only its owner can read). It signs every append request it sends over
//! NATS; the ledger knows each identity's public key and what it may append, and refuses
//! anything else before the request reaches the writer.
//!
//! # Wire format
//!
//! The request body is the JSON of [`crate::requests::AppendRequest`], unchanged. The signature
//! travels in NATS headers:
//!
//! ```text
//! Backstop-Identity:  <name>
//! Backstop-Signed-At: <microseconds since the Unix epoch, decimal>
//! Backstop-Append-Signature: <hex of the 64-byte ed25519 signature>
//! ```
//!
//! The signed bytes are [`statement`]: `"BKSTP-AR1"`, the name's length (u32 big-endian), the
//! name, the signing time (i64 big-endian, µs), and SHA3-256 of the body. The prefix keeps these
//! signatures apart from the ledger's own (checkpoints `BKSTP-CP`, statements `BKSTP-ST1`,
//! events `BKSTP-EV`): no signature made for one can pass for another.
//!
//! # Invariants
//!
//! - With at least one identity configured (or [`AppendPolicy::require_signatures`]), a request
//!   is appended only if: it names a listed identity; the signature over the body verifies with
//!   that identity's public key; it was signed within [`MAX_CLOCK_SKEW`] of the ledger's clock;
//!   and every event's type, the stream and every event's actor match the identity's grants.
//!   One event outside the grants refuses the whole request; nothing of it is written.
//! - A replayed request (the same body, the same signature) inside the window appends nothing
//!   new: appends are idempotent by event id, and a different body needs a new signature.
//! - Every refusal is answered with kind `denied` (a permanent refusal for the client) and
//!   counted; see [`DenialAggregate`] for how refusals become `access.denied` events without
//!   letting a flood of forged requests flood the ledger.
//! - With no identity configured the policy is *open*: unsigned requests are appended as before
//!   (a single-host or development setup). `serve` warns about it at start.

use std::collections::HashMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha3::{Digest as _, Sha3_256};

use crate::checkpoint::{shared_mode, write_private};
use crate::error::LedgerError;
use crate::requests::AppendRequest;

pub const IDENTITY_HEADER: &str = "Backstop-Identity";
pub const SIGNED_AT_HEADER: &str = "Backstop-Signed-At";
pub const SIGNATURE_HEADER: &str = "Backstop-Append-Signature";

/// How far a request's signing time may be from the ledger's clock, either way. Beyond it a
/// captured request cannot be replayed later (and within it a replay appends nothing new).
pub const MAX_CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);

const MAGIC: &[u8; 9] = b"BKSTP-AR1";

/// The bytes an identity signs for a request `body` sent at `signed_at_micros`.
pub fn statement(name: &str, signed_at_micros: i64, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(9 + 4 + name.len() + 8 + 32);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&signed_at_micros.to_be_bytes());
    b.extend_from_slice(&Sha3_256::digest(body));
    b
}

/// The headers' content: who signed, when, and the signature.
#[derive(Clone, Debug, PartialEq)]
pub struct SignedBy {
    pub identity: String,
    pub signed_at_micros: i64,
    pub signature_hex: String,
}

impl SignedBy {
    /// The three headers that carry it.
    pub fn to_headers(&self) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert(IDENTITY_HEADER, self.identity.as_str());
        h.insert(SIGNED_AT_HEADER, self.signed_at_micros.to_string().as_str());
        h.insert(SIGNATURE_HEADER, self.signature_hex.as_str());
        h
    }

    /// What a message's headers say; `None` when it carries none of the three. A missing or
    /// garbled time or signature is kept as one that fails verification, not as "unsigned".
    pub fn from_headers(headers: &async_nats::HeaderMap) -> Option<SignedBy> {
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        match (
            get(IDENTITY_HEADER),
            get(SIGNED_AT_HEADER),
            get(SIGNATURE_HEADER),
        ) {
            (None, None, None) => None,
            (identity, at, signature) => Some(SignedBy {
                identity: identity.unwrap_or_default(),
                signed_at_micros: at.and_then(|a| a.parse().ok()).unwrap_or(i64::MIN),
                signature_hex: signature.unwrap_or_default(),
            }),
        }
    }
}

/// An identity's private half: its name and its ed25519 key.
pub struct AppendSigner {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for AppendSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendSigner")
            .field("name", &self.name)
            .field("public_key", &self.public_key_hex())
            .finish_non_exhaustive()
    }
}

impl AppendSigner {
    pub fn from_seed(name: impl Into<String>, seed: [u8; 32]) -> AppendSigner {
        AppendSigner {
            name: name.into(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Loads the identity `name` from its key file (a hex-encoded 32-byte seed, mode 0600).
    /// Unlike the checkpoint key, a missing file is an error: a new identity is made with
    /// [`AppendSigner::create`] and its public key listed in the ledger's config first.
    pub fn load(name: &str, path: &Path) -> Result<AppendSigner, LedgerError> {
        check_name(name)?;
        let err = |why: String| LedgerError::SigningKey {
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(format!(
                "cannot read the identity key: {e} (make one with `backstop ledger identity new {name} --key-file {}`)",
                path.display()
            ))
        })?;
        if let Some(mode) = shared_mode(path) {
            return Err(err(format!(
                "its mode {mode:o} lets its group or others read it, and whoever holds it can append as {name}: run `chmod 600 {}`",
                path.display()
            )));
        }
        let seed: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| err("not a hex-encoded 32-byte ed25519 seed".into()))?;
        Ok(AppendSigner::from_seed(name, seed))
    }

    /// Makes a new identity key at `path` (mode 0600; an existing file is never overwritten).
    pub fn create(name: &str, path: &Path) -> Result<AppendSigner, LedgerError> {
        check_name(name)?;
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        write_private(path, &hex::encode(key.to_bytes())).map_err(|e| LedgerError::SigningKey {
            path: path.to_path_buf(),
            why: if e.kind() == std::io::ErrorKind::AlreadyExists {
                "the file exists; an identity key is never overwritten (choose another path, or remove it if that identity is retired)".into()
            } else {
                format!("cannot create it: {e}")
            },
        })?;
        Ok(AppendSigner {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// Signs `body` as sent at `now`.
    pub fn sign(&self, body: &[u8], now: DateTime<Utc>) -> SignedBy {
        let at = now.timestamp_micros();
        let sig = self.key.sign(&statement(&self.name, at, body));
        SignedBy {
            identity: self.name.clone(),
            signed_at_micros: at,
            signature_hex: hex::encode(sig.to_bytes()),
        }
    }
}

fn check_name(name: &str) -> Result<(), LedgerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(LedgerError::BadIdentity(format!(
            "identity name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// A grant pattern: an exact value, `*` for anything, or a prefix ending in `*` (`backup.*`,
/// `wal-*`, `worker:*`).
#[derive(Clone, Debug, PartialEq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(p: impl Into<String>) -> Pattern {
        Pattern(p.into())
    }

    pub fn matches(&self, value: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => value.starts_with(prefix),
            None => self.0 == value,
        }
    }
}

fn any_matches(patterns: &[Pattern], value: &str) -> bool {
    patterns.iter().any(|p| p.matches(value))
}

/// What one identity may append.
#[derive(Clone, Debug)]
pub struct Grant {
    pub name: String,
    pub public_key: VerifyingKey,
    pub event_types: Vec<Pattern>,
    pub streams: Vec<Pattern>,
    pub actors: Vec<Pattern>,
}

impl Grant {
    /// A grant from its configuration: `public_key` is 64 hex digits.
    pub fn new(
        name: &str,
        public_key_hex: &str,
        event_types: &[String],
        streams: &[String],
        actors: &[String],
    ) -> Result<Grant, LedgerError> {
        check_name(name)?;
        let bad = |why: &str| LedgerError::BadIdentity(format!("identity {name}: {why}"));
        let bytes: [u8; 32] = hex::decode(public_key_hex.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                bad("public_key must be 64 hex digits (`backstop ledger identity new` prints it)")
            })?;
        let public_key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| bad("public_key is not a valid ed25519 public key"))?;
        for (field, list) in [
            ("event_types", event_types),
            ("streams", streams),
            ("actors", actors),
        ] {
            if list.is_empty() {
                return Err(bad(&format!(
                    "{field} is empty, so it could append nothing: list what it may append, or [\"*\"]"
                )));
            }
        }
        let patterns = |l: &[String]| l.iter().map(Pattern::new).collect();
        Ok(Grant {
            name: name.to_string(),
            public_key,
            event_types: patterns(event_types),
            streams: patterns(streams),
            actors: patterns(actors),
        })
    }

    /// Why `request` is outside this grant, if it is.
    fn outside(&self, request: &AppendRequest) -> Option<String> {
        if !any_matches(&self.streams, &request.stream) {
            return Some(format!(
                "{} may not append to stream {}",
                self.name, request.stream
            ));
        }
        for e in &request.events {
            if !any_matches(&self.event_types, &e.event_type) {
                return Some(format!(
                    "{} may not append {} events",
                    self.name, e.event_type
                ));
            }
            let actor = e.actor.to_string();
            if !any_matches(&self.actors, &actor) {
                return Some(format!("{} may not append as {actor}", self.name));
            }
        }
        None
    }
}

/// Why a request was refused: the part that goes into the `access.denied` event and the reply.
#[derive(Clone, Debug, PartialEq)]
pub struct Denial {
    /// Who the request claims to be: `identity NAME`, `identity NAME (bad signature)`,
    /// `unsigned`.
    pub caller: String,
    /// The stream the request was for (empty when the body did not decode).
    pub stream: String,
    pub reason: String,
}

/// The identities the ledger accepts appends from.
#[derive(Clone, Debug, Default)]
pub struct AppendPolicy {
    grants: HashMap<String, Grant>,
    require: bool,
}

impl AppendPolicy {
    /// Accepts unsigned requests: the policy when no identity is configured.
    pub fn open() -> AppendPolicy {
        AppendPolicy::default()
    }

    pub fn new(grants: Vec<Grant>) -> Result<AppendPolicy, LedgerError> {
        let mut map = HashMap::new();
        for g in grants {
            let name = g.name.clone();
            if map.insert(name.clone(), g).is_some() {
                return Err(LedgerError::BadIdentity(format!(
                    "identity {name} is listed twice"
                )));
            }
        }
        let require = !map.is_empty();
        Ok(AppendPolicy {
            grants: map,
            require,
        })
    }

    /// Refuses unsigned requests even with no identity listed (nothing is then accepted over
    /// NATS: a ledger that takes appends from its own process and control socket only).
    pub fn require_signatures(mut self) -> AppendPolicy {
        self.require = true;
        self
    }

    pub fn is_open(&self) -> bool {
        !self.require
    }

    /// Checks a request's signature and grants. `signed` is what its headers say (None when
    /// they are absent); `body` the bytes as received; `request` the decoded body.
    pub fn check(
        &self,
        signed: Option<&SignedBy>,
        body: &[u8],
        request: &AppendRequest,
        now: DateTime<Utc>,
    ) -> Result<(), Denial> {
        if !self.require {
            return Ok(());
        }
        let deny = |caller: String, reason: String| Denial {
            caller,
            stream: request.stream.clone(),
            reason,
        };
        let Some(signed) = signed else {
            return Err(deny(
                "unsigned".into(),
                "the request is not signed: configure [nats] identity and identity_key_file on the sender, and list its public key in the ledger's [[ledger.identities]]".into(),
            ));
        };
        let claimed = format!("identity {}", signed.identity);
        let Some(grant) = self.grants.get(&signed.identity) else {
            return Err(deny(
                claimed,
                "no such identity in the ledger's [[ledger.identities]]".into(),
            ));
        };
        let signature = hex::decode(&signed.signature_hex)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(|b| Signature::from_bytes(&b));
        let valid = signature.is_some_and(|sig| {
            grant
                .public_key
                .verify(
                    &statement(&signed.identity, signed.signed_at_micros, body),
                    &sig,
                )
                .is_ok()
        });
        if !valid {
            return Err(deny(
                format!("{claimed} (bad signature)"),
                "the signature does not match the request and the identity's public key".into(),
            ));
        }
        let skew = now.timestamp_micros() - signed.signed_at_micros;
        if skew.unsigned_abs() > MAX_CLOCK_SKEW.num_microseconds().unwrap_or(i64::MAX) as u64 {
            return Err(deny(
                claimed,
                format!(
                    "signed {}s away from the ledger's clock (at most {}s): a replayed request, or a clock to fix with NTP",
                    skew / 1_000_000,
                    MAX_CLOCK_SKEW.num_seconds()
                ),
            ));
        }
        match grant.outside(request) {
            Some(reason) => Err(deny(claimed, reason)),
            None => Ok(()),
        }
    }
}

/// A window's tally for one (caller, reason) pair.
struct Tally {
    opened: DateTime<Utc>,
    /// Refusals since the last event recorded for this pair.
    pending: u64,
}

/// At most this many (caller, reason) pairs are tallied; the rest share one tally.
pub const MAX_TALLIES: usize = 10_000;
const OVERFLOW_CALLER: &str = "many callers";

/// An `access.denied` event to record: `count` refusals of `caller` over `window_seconds`.
#[derive(Clone, Debug, PartialEq)]
pub struct DenialRecord {
    pub denial: Denial,
    pub count: u64,
    pub window_seconds: u64,
}

/// Turns refusals into few events: the first refusal of a (caller, reason) pair in a window is
/// recorded at once (count 1); the others of the window are counted and recorded as one event
/// with their count when the window ends (the next refusal after it, or [`Self::flush`]). N
/// forged requests thus write about two events per pair and window, whose counts sum to N.
/// The map is bounded by [`MAX_TALLIES`]: forging many identity names fills it; it does not
/// exhaust memory. Time is passed in, so tests run windows without waiting.
pub struct DenialAggregate {
    window: chrono::Duration,
    tallies: HashMap<(String, String), (Tally, Denial)>,
}

impl DenialAggregate {
    pub fn new(window: std::time::Duration) -> DenialAggregate {
        DenialAggregate {
            window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::seconds(60)),
            tallies: HashMap::new(),
        }
    }

    fn window_seconds(&self) -> u64 {
        self.window.num_seconds().max(0) as u64
    }

    /// Counts one refusal; returns the events to record now.
    pub fn note(&mut self, denial: Denial, now: DateTime<Utc>) -> Vec<DenialRecord> {
        let mut key = (denial.caller.clone(), denial.reason.clone());
        let mut denial = denial;
        if !self.tallies.contains_key(&key) && self.tallies.len() >= MAX_TALLIES {
            key = (OVERFLOW_CALLER.into(), String::new());
            denial = Denial {
                caller: OVERFLOW_CALLER.into(),
                stream: String::new(),
                reason: "refusals of more callers than are tallied one by one".into(),
            };
        }
        let window_seconds = self.window_seconds();
        let mut out = Vec::new();
        match self.tallies.get_mut(&key) {
            Some((tally, last)) if now - tally.opened < self.window => {
                tally.pending += 1;
                *last = denial;
            }
            Some((tally, last)) => {
                if tally.pending > 0 {
                    out.push(DenialRecord {
                        denial: last.clone(),
                        count: tally.pending,
                        window_seconds,
                    });
                }
                *tally = Tally {
                    opened: now,
                    pending: 0,
                };
                *last = denial.clone();
                out.push(DenialRecord {
                    denial,
                    count: 1,
                    window_seconds: 0,
                });
            }
            None => {
                self.tallies.insert(
                    key,
                    (
                        Tally {
                            opened: now,
                            pending: 0,
                        },
                        denial.clone(),
                    ),
                );
                out.push(DenialRecord {
                    denial,
                    count: 1,
                    window_seconds: 0,
                });
            }
        }
        out
    }

    /// The counts of windows that have ended by `now` (all of them with `all`, at shutdown);
    /// pairs with nothing pending are forgotten.
    pub fn flush(&mut self, now: DateTime<Utc>, all: bool) -> Vec<DenialRecord> {
        let window = self.window;
        let window_seconds = self.window_seconds();
        let mut out = Vec::new();
        self.tallies.retain(|_, (tally, last)| {
            let ended = all || now - tally.opened >= window;
            if !ended {
                return true;
            }
            if tally.pending > 0 {
                out.push(DenialRecord {
                    denial: last.clone(),
                    count: tally.pending,
                    window_seconds,
                });
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExpectedVersion;
    use backstop_events::{Actor, Event, NewEvent, WalArchived};

    fn wal_event(actor: Actor) -> NewEvent {
        NewEvent::new(
            "wal-1",
            actor,
            &Event::WalArchived(WalArchived {
                timeline: 1,
                segment: "000000010000000000000001".into(),
                sha3: "00".repeat(32),
                bytes: 16,
                object: "wal/main/00000001/000000010000000000000001".into(),
            }),
        )
    }

    fn request(stream: &str, events: Vec<NewEvent>) -> (AppendRequest, Vec<u8>) {
        let req = AppendRequest {
            stream: stream.into(),
            expected: ExpectedVersion::Any,
            events,
        };
        let body = serde_json::to_vec(&req).unwrap();
        (req, body)
    }

    fn policy(signer: &AppendSigner) -> AppendPolicy {
        AppendPolicy::new(vec![
            Grant::new(
                signer.name(),
                &signer.public_key_hex(),
                &["wal.archived".into()],
                &["wal-*".into()],
                &["worker:wal-*".into()],
            )
            .unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn the_statement_is_pinned() {
        // A golden vector (computed independently with Python's hashlib): the signed bytes must
        // never change, or every deployed host's requests would be refused.
        let s = statement("db1", 1_700_000_000_000_000, b"{}");
        assert_eq!(
            hex::encode(s),
            "424b5354502d4152310000000364623100060a24181e4000\
             840eb7aa2a9935de63366bacbe9d97e978a859e93dc792a0334de60ed52f8e99"
        );
    }

    #[test]
    fn a_signed_request_inside_its_grant_passes() {
        let signer = AppendSigner::from_seed("db1", [7; 32]);
        let now = Utc::now();
        let (req, body) = request("wal-1", vec![wal_event(Actor::worker("wal-push"))]);
        let signed = signer.sign(&body, now);
        assert_eq!(
            policy(&signer).check(Some(&signed), &body, &req, now),
            Ok(())
        );
    }

    fn other_event(actor: Actor) -> NewEvent {
        NewEvent::new(
            "wal-1",
            actor,
            &Event::StorageUsageSampled(backstop_events::StorageUsageSampled {
                region: "r".into(),
                storage_class: "STANDARD".into(),
                bytes: 1,
                objects: 1,
                repository: String::new(),
            }),
        )
    }

    fn denied(
        policy: &AppendPolicy,
        signed: Option<&SignedBy>,
        body: &[u8],
        req: &AppendRequest,
        now: DateTime<Utc>,
    ) -> Denial {
        policy
            .check(signed, body, req, now)
            .expect_err("the request should be refused")
    }

    #[test]
    fn every_way_of_getting_in_without_the_key_or_outside_the_grant_is_refused() {
        let signer = AppendSigner::from_seed("db1", [7; 32]);
        let policy = policy(&signer);
        let now = Utc::now();
        let (req, body) = request("wal-1", vec![wal_event(Actor::worker("wal-push"))]);

        let d = denied(&policy, None, &body, &req, now);
        assert_eq!(d.caller, "unsigned");
        assert!(d.reason.contains("not signed"), "{}", d.reason);

        let stranger = AppendSigner::from_seed("db2", [8; 32]);
        let d = denied(&policy, Some(&stranger.sign(&body, now)), &body, &req, now);
        assert_eq!(d.caller, "identity db2");
        assert!(d.reason.contains("no such identity"), "{}", d.reason);

        // Someone else's key, claiming db1's name.
        let forger = AppendSigner::from_seed("db1", [9; 32]);
        let d = denied(&policy, Some(&forger.sign(&body, now)), &body, &req, now);
        assert_eq!(d.caller, "identity db1 (bad signature)");

        // A genuine signature over another body.
        let (other_req, other_body) = request("wal-1", vec![wal_event(Actor::worker("wal-push"))]);
        let signed_other = signer.sign(&other_body, now);
        let d = denied(&policy, Some(&signed_other), &body, &req, now);
        assert_eq!(d.caller, "identity db1 (bad signature)");
        assert_eq!(
            policy.check(Some(&signed_other), &other_body, &other_req, now),
            Ok(())
        );

        // A garbled signature.
        let mut garbled = signer.sign(&body, now);
        garbled.signature_hex = "zz".into();
        let d = denied(&policy, Some(&garbled), &body, &req, now);
        assert_eq!(d.caller, "identity db1 (bad signature)");

        // A captured request replayed after the window.
        let old = signer.sign(&body, now - chrono::Duration::minutes(6));
        let d = denied(&policy, Some(&old), &body, &req, now);
        assert!(d.reason.contains("replayed"), "{}", d.reason);
        let future = signer.sign(&body, now + chrono::Duration::minutes(6));
        denied(&policy, Some(&future), &body, &req, now);
        let recent = signer.sign(&body, now - chrono::Duration::minutes(4));
        assert_eq!(policy.check(Some(&recent), &body, &req, now), Ok(()));

        // Inside the signature, outside the grant: another type, actor or stream.
        let (req, body) = request(
            "wal-1",
            vec![
                wal_event(Actor::worker("wal-push")),
                other_event(Actor::worker("wal-push")),
            ],
        );
        let d = denied(&policy, Some(&signer.sign(&body, now)), &body, &req, now);
        assert_eq!(d.caller, "identity db1");
        assert!(
            d.reason.contains("may not append storage.usage_sampled"),
            "{}",
            d.reason
        );
        let (req, body) = request("wal-1", vec![wal_event(Actor::operator("alice"))]);
        let d = denied(&policy, Some(&signer.sign(&body, now)), &body, &req, now);
        assert!(d.reason.contains("as operator:alice"), "{}", d.reason);
        let (req, body) = request("recovery-1", vec![wal_event(Actor::worker("wal-push"))]);
        let d = denied(&policy, Some(&signer.sign(&body, now)), &body, &req, now);
        assert!(d.reason.contains("stream recovery-1"), "{}", d.reason);
        assert_eq!(d.stream, "recovery-1");
    }

    #[test]
    fn an_open_policy_takes_unsigned_requests_and_a_required_one_takes_none() {
        let (req, body) = request("wal-1", vec![wal_event(Actor::worker("wal-push"))]);
        let now = Utc::now();
        assert!(AppendPolicy::open().is_open());
        assert_eq!(AppendPolicy::open().check(None, &body, &req, now), Ok(()));
        let closed = AppendPolicy::open().require_signatures();
        assert!(!closed.is_open());
        let signer = AppendSigner::from_seed("db1", [7; 32]);
        let d = denied(&closed, Some(&signer.sign(&body, now)), &body, &req, now);
        assert!(d.reason.contains("no such identity"), "{}", d.reason);
    }

    #[test]
    fn grants_and_names_are_checked_when_configured() {
        let signer = AppendSigner::from_seed("db1", [7; 32]);
        let star = vec!["*".to_string()];
        assert!(Grant::new("db1", "abcd", &star, &star, &star).is_err());
        let e = Grant::new("db1", &signer.public_key_hex(), &[], &star, &star).unwrap_err();
        assert!(e.to_string().contains("event_types is empty"), "{e}");
        assert!(Grant::new("db 1", &signer.public_key_hex(), &star, &star, &star).is_err());
        let g = Grant::new("db1", &signer.public_key_hex(), &star, &star, &star).unwrap();
        let e = AppendPolicy::new(vec![g.clone(), g]).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
        assert!(Pattern::new("backup.*").matches("backup.completed"));
        assert!(!Pattern::new("backup.*").matches("backups"));
        assert!(Pattern::new("wal.archived").matches("wal.archived"));
        assert!(!Pattern::new("wal.archived").matches("wal.archived2"));
    }

    #[test]
    fn identity_key_files_are_created_private_loaded_and_refused_when_shared() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db1.key");
        let made = AppendSigner::create("db1", &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = AppendSigner::create("db1", &path).unwrap_err();
        assert!(e.to_string().contains("never overwritten"), "{e}");
        let loaded = AppendSigner::load("db1", &path).unwrap();
        assert_eq!(loaded.public_key_hex(), made.public_key_hex());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = AppendSigner::load("db1", &path).unwrap_err().to_string();
        assert!(e.contains(&format!("chmod 600 {}", path.display())), "{e}");
        let e = AppendSigner::load("db1", &dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backstop ledger identity new db1"), "{e}");
    }

    fn denial(caller: &str) -> Denial {
        Denial {
            caller: caller.into(),
            stream: "wal-1".into(),
            reason: "no such identity".into(),
        }
    }

    #[test]
    fn a_flood_of_refusals_becomes_few_events_whose_counts_add_up() {
        let mut agg = DenialAggregate::new(std::time::Duration::from_secs(60));
        let t0 = Utc::now();
        let mut records = Vec::new();
        for i in 0..100 {
            records.extend(agg.note(denial("identity x"), t0 + chrono::Duration::milliseconds(i)));
        }
        assert_eq!(records.len(), 1, "only the first is recorded at once");
        assert!(
            agg.flush(t0 + chrono::Duration::seconds(30), false)
                .is_empty()
        );
        records.extend(agg.flush(t0 + chrono::Duration::seconds(61), false));
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].count, 99);
        assert_eq!(records[1].window_seconds, 60);
        assert_eq!(records.iter().map(|r| r.count).sum::<u64>(), 100);

        // A refusal after the window opens a new one and closes the old one's count.
        let t1 = t0 + chrono::Duration::seconds(200);
        agg.note(denial("identity y"), t1);
        agg.note(denial("identity y"), t1);
        let out = agg.note(denial("identity y"), t1 + chrono::Duration::seconds(61));
        assert_eq!(out.iter().map(|r| r.count).collect::<Vec<_>>(), vec![1, 1]);
        let rest = agg.flush(t1, true);
        assert!(
            rest.is_empty(),
            "nothing pending after the new window's first"
        );
    }

    #[test]
    fn forging_many_names_fills_a_bounded_tally() {
        let mut agg = DenialAggregate::new(std::time::Duration::from_secs(60));
        let now = Utc::now();
        let mut recorded = 0;
        for i in 0..(MAX_TALLIES + 500) {
            recorded += agg.note(denial(&format!("identity n{i}")), now).len();
        }
        assert!(agg.tallies.len() <= MAX_TALLIES + 1);
        // The overflow shares one tally: its first is recorded, the rest counted.
        assert_eq!(recorded, MAX_TALLIES + 1);
        let flushed = agg.flush(now, true);
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0].denial.caller, "many callers");
        assert_eq!(flushed[0].count, 499);
    }
}
