//! What keeps one client from hurting the server or the ledger: per-client token buckets for
//! refusals and sign-ins, the aggregation of refusals into few `access.denied` events, and the
//! server-side sign-in sessions.
//!
//! Invariants:
//! - A client is its peer IP address, or the address a trusted proxy (`api.trusted_proxies`)
//!   names in `X-Forwarded-For`; a known token's holder is counted apart from the anonymous
//!   callers of the same address, so the event's actor stays right.
//! - Refusals: each refused request takes a token from its client's bucket; once it is empty the
//!   client is answered 429 with `Retry-After`, before its credentials are even looked at, and
//!   nothing is written to the ledger. A request with a valid token is never throttled.
//! - Sign-ins take a token from their own, smaller bucket before the token is checked.
//! - `access.denied`: the first refusal of a client in a window (`api.denial_window_seconds`,
//!   default 60) is recorded at once with `count: 1`; the others of that window, 429s included,
//!   are counted in memory and recorded as ONE event with their `count` when the window ends
//!   (the next refusal after it, the periodic flush, or the shutdown). A flood of N refused
//!   requests therefore writes about two events per client per window, whose counts sum to N.
//! - Every map here is bounded ([`MAX_CLIENTS`], [`MAX_SESSIONS`]): an attacker with many
//!   addresses fills them, it does not exhaust memory (the overflow shares one bucket and one
//!   aggregate, `many clients`).
//! - Time comes from an injected [`Clock`], so tests run a window in microseconds.
//! - Sessions: sign-in hands out a random 256-bit id, never the token; the server keeps
//!   (id -> caller, expiry). A lost cookie is useless after its expiry or a sign-out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backstop_ops::schedule::clock::Clock;
use chrono::{DateTime, Utc};

use crate::auth::Role;

/// At most this many clients are tracked by each bucket map and by the denial aggregate.
pub const MAX_CLIENTS: usize = 20_000;
/// At most this many sign-in sessions are kept.
pub const MAX_SESSIONS: usize = 10_000;
/// The key the clients past [`MAX_CLIENTS`] share.
const OVERFLOW: &str = "many clients";

/// A rate: `per_minute` tokens a minute, and as many at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_minute: u32,
}

struct Bucket {
    tokens: f64,
    at: DateTime<Utc>,
}

/// A token bucket per client.
pub struct Buckets {
    rate: Rate,
    map: Mutex<HashMap<String, Bucket>>,
}

impl Buckets {
    pub fn new(rate: Rate) -> Buckets {
        Buckets {
            rate,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn per_sec(&self) -> f64 {
        f64::from(self.rate.per_minute.max(1)) / 60.0
    }

    fn refill(&self, b: &mut Bucket, now: DateTime<Utc>) {
        let burst = f64::from(self.rate.per_minute.max(1));
        let elapsed = (now - b.at).num_microseconds().unwrap_or(i64::MAX).max(0) as f64 / 1e6;
        b.tokens = (b.tokens + elapsed * self.per_sec()).min(burst);
        b.at = now;
    }

    /// Whether `client` has a token left, without taking it; else the seconds until it has.
    pub fn check(&self, client: &str, now: DateTime<Utc>) -> Result<(), u64> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(client) {
            None => Ok(()),
            Some(b) => {
                self.refill(b, now);
                if b.tokens >= 1.0 {
                    Ok(())
                } else {
                    Err(((1.0 - b.tokens) / self.per_sec()).ceil().max(1.0) as u64)
                }
            }
        }
    }

    /// Takes a token from `client`'s bucket; the seconds to wait when it is empty.
    pub fn take(&self, client: &str, now: DateTime<Utc>) -> Result<(), u64> {
        let burst = f64::from(self.rate.per_minute.max(1));
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(client) && map.len() >= MAX_CLIENTS {
            // Forget the clients whose buckets are full again: they are no different from new.
            let per_sec = self.per_sec();
            map.retain(|_, b| {
                let elapsed = (now - b.at).num_seconds().max(0) as f64;
                b.tokens + elapsed * per_sec < burst
            });
        }
        let key = if !map.contains_key(client) && map.len() >= MAX_CLIENTS {
            OVERFLOW
        } else {
            client
        };
        let b = map.entry(key.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        self.refill(b, now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / self.per_sec()).ceil().max(1.0) as u64)
        }
    }
}

/// One refusal, as the aggregate remembers the last of a window.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// `operator:NAME` for a known token's holder, else the API's own actor.
    pub operator: Option<String>,
    pub caller: String,
    pub role: Option<String>,
    pub method: String,
    pub path: String,
    pub reason: String,
}

/// What to record: a refusal standing for `count` of them over `window_seconds`.
#[derive(Clone, Debug)]
pub struct Aggregated {
    pub refusal: Refusal,
    pub count: u64,
    pub window_seconds: u64,
}

struct Window {
    started: DateTime<Utc>,
    pending: u64,
    last: Refusal,
}

/// Refusals per client and window (see the module documentation).
pub struct Denials {
    window: Duration,
    map: Mutex<HashMap<String, Window>>,
}

impl Denials {
    pub fn new(window: Duration) -> Denials {
        Denials {
            window,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn window(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.window).unwrap_or(chrono::Duration::seconds(60))
    }

    /// Counts a refusal; returns what to record now, if anything.
    pub fn refused(&self, client: &str, r: Refusal, now: DateTime<Utc>) -> Option<Aggregated> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = if !map.contains_key(client) && map.len() >= MAX_CLIENTS {
            OVERFLOW
        } else {
            client
        };
        match map.get_mut(key) {
            Some(w) if now - w.started < self.window() => {
                w.pending += 1;
                w.last = r;
                None
            }
            Some(w) => {
                // The window is over: this refusal and the window's unrecorded ones, in one event.
                let out = Aggregated {
                    refusal: r.clone(),
                    count: w.pending + 1,
                    window_seconds: (now - w.started).num_seconds().max(0) as u64,
                };
                *w = Window {
                    started: now,
                    pending: 0,
                    last: r,
                };
                Some(out)
            }
            None => {
                map.insert(
                    key.to_string(),
                    Window {
                        started: now,
                        pending: 0,
                        last: r.clone(),
                    },
                );
                Some(Aggregated {
                    refusal: r,
                    count: 1,
                    window_seconds: 0,
                })
            }
        }
    }

    /// The windows over by `now` (all of them when `all`), as events to record; forgets them.
    pub fn flush(&self, now: DateTime<Utc>, all: bool) -> Vec<Aggregated> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.window();
        let mut out = Vec::new();
        map.retain(|_, w| {
            let over = all || now - w.started >= window;
            if over && w.pending > 0 {
                out.push(Aggregated {
                    refusal: w.last.clone(),
                    count: w.pending,
                    window_seconds: (now - w.started).num_seconds().max(0) as u64,
                });
            }
            !over
        });
        out
    }
}

/// A signed-in person.
#[derive(Clone, Debug)]
pub struct Session {
    pub name: String,
    pub role: Role,
    pub expires: DateTime<Utc>,
}

/// The server-side sign-in sessions, by their random id.
pub struct Sessions {
    ttl: Duration,
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Sessions {
        Sessions {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new session for `name`; its id (64 hex characters from the OS's random source).
    pub fn create(&self, name: &str, role: Role, now: DateTime<Utc>) -> String {
        use rand::RngCore;
        let mut id = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let id = hex::encode(id);
        let expires = now + chrono::Duration::from_std(self.ttl).unwrap_or_default();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.expires > now);
        }
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            id.clone(),
            Session {
                name: name.to_string(),
                role,
                expires,
            },
        );
        id
    }

    /// The session `id` names, unless it expired (then it is forgotten).
    pub fn get(&self, id: &str, now: DateTime<Utc>) -> Option<Session> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(id) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// The guards of one API server.
pub struct Guards {
    pub clock: Arc<dyn Clock>,
    pub refusals: Buckets,
    pub sign_ins: Buckets,
    pub denials: Denials,
    pub sessions: Sessions,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn a_bucket_empties_refills_and_says_how_long_to_wait() {
        let b = Buckets::new(Rate { per_minute: 6 });
        for _ in 0..6 {
            assert!(b.take("a", t(0)).is_ok());
        }
        assert_eq!(b.take("a", t(0)), Err(10), "one token every 10 s");
        assert!(b.take("other", t(0)).is_ok(), "clients are apart");
        assert!(b.check("a", t(9)).is_err());
        assert!(b.take("a", t(10)).is_ok());
    }

    #[test]
    fn refusals_of_a_window_are_one_event_with_their_count() {
        let d = Denials::new(Duration::from_secs(60));
        let r = |path: &str| Refusal {
            operator: None,
            caller: "anonymous (192.0.2.1)".into(),
            role: None,
            method: "GET".into(),
            path: path.into(),
            reason: "no token".into(),
        };
        let first = d.refused("192.0.2.1", r("/a"), t(0)).unwrap();
        assert_eq!(first.count, 1);
        for i in 0..99 {
            assert!(d.refused("192.0.2.1", r("/b"), t(i % 60)).is_none());
        }
        assert!(d.flush(t(59), false).is_empty(), "the window is not over");
        let rest = d.flush(t(60), false);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].count, 99);
        assert_eq!(rest[0].refusal.path, "/b");
        assert!(d.flush(t(200), true).is_empty(), "nothing left");
    }

    #[test]
    fn sessions_expire_and_sign_out() {
        let s = Sessions::new(Duration::from_secs(3600));
        let id = s.create("alice", Role::Operator, t(0));
        assert_eq!(id.len(), 64);
        assert_ne!(id, s.create("alice", Role::Operator, t(0)), "random ids");
        assert_eq!(s.get(&id, t(10)).unwrap().name, "alice");
        assert!(s.get(&id, t(3600)).is_none(), "expired");
        let id = s.create("alice", Role::Operator, t(0));
        s.remove(&id);
        assert!(s.get(&id, t(1)).is_none(), "signed out");
    }
}
