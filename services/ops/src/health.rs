//! The health monitor: configured HTTP endpoints checked on a fixed cadence, judged Up, Degraded
//! or Down, and recorded as `health.checked` events (seed 000 R4).
//!
//! # The judgement ([`EndpointHealth`], pure)
//! A check *fails* when the request errs (connection refused, timeout, TLS) or the status is not
//! the expected one (default 200). A check that answers as expected but took longer than the
//! slow threshold (default 3 s) is *slow*.
//! - `failures_for_down` (default 2) consecutive failures make the endpoint **Down**. After a
//!   failure that does not yet make it Down, the next check is a confirming re-check
//!   `recheck_after` (default 30 s) later instead of at the next regular slot, so two consecutive
//!   failures are known within a minute of the first (R4.2), not ten minutes later.
//! - `slow_for_degraded` (default 3) consecutive slow answers make it **Degraded** (R4.4).
//! - An answer in time makes it **Up** again (R4.5); an answer after Down is Up too (answering),
//!   Degraded only once it has been slow often enough.
//!
//! # What is recorded: state changes plus periodic samples, not every check
//! A `health.checked` event is recorded when (a) the state changes, (b) the check failed or was
//! slow, (c) it is the first check of a sample period (`sample_every`, default 1 h) of an
//! endpoint, or the first check after start. Why: one endpoint checked every 5 minutes is 288
//! events a day, almost all identical "up, 40 ms"; a dozen endpoints would add thousands of
//! events a day to an append-only ledger that is kept forever and replayed by every projection.
//! What the alert rules and a person need is every transition and every bad answer (each is
//! recorded, with its latency and error), and enough healthy points for the response-time chart
//! (one an hour). The state is carried in every event (`state`), so a reader never has to replay
//! the unrecorded checks.
//!
//! # Invariants
//! - Checks run on *slots*: regular slots are multiples of `interval` since the Unix epoch (so
//!   every process has the same ones), a confirming re-check's slot is the failed slot plus
//!   `recheck_after`. An event's id derives from (endpoint, slot) ([`event_id`]) and its
//!   `occurred_at` is the slot, so a retried append is stored once, and two `serve` processes
//!   checking the same endpoint record one event per slot between them: the second is refused
//!   by the ledger as an id reused with other content (its latency differs), which the monitor
//!   takes as "already recorded" ([`LedgerError::is_id_reused`]).
//! - Latency is measured on the injected [`Clock`] (wall time in `serve`), so tests drive slow
//!   answers by moving a [`crate::schedule::ManualClock`] rather than by waiting.
//! - A restarted monitor resumes each endpoint from its last recorded check
//!   ([`EndpointHealth::resume`]): an endpoint Down before the restart stays Down (no
//!   healthy-looking first failure is recorded in between), and a period already sampled is not
//!   sampled again.
//! - The monitor never raises alerts itself: the alert rules follow these events.

use std::time::Duration;

use backstop_events::{Actor, Event, HealthChecked, HealthState, NewEvent, streams};
use backstop_ledger::{Appender, ExpectedVersion, Ledger};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use crate::schedule::{Clock, ConfigDuration};

/// The actor of the monitor's events.
pub const MONITOR: &str = "health-monitor";

/// The `[health]` section of the configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between regular checks (default 5m).
    pub interval: Option<ConfigDuration>,
    /// Delay of the confirming re-check after a failure (default 30s).
    pub recheck_after: Option<ConfigDuration>,
    /// An answer slower than this is slow (default 3s).
    pub slow_threshold: Option<ConfigDuration>,
    /// Consecutive failures that make an endpoint Down (default 2).
    pub failures_for_down: Option<u32>,
    /// Consecutive slow answers that make an endpoint Degraded (default 3).
    pub slow_for_degraded: Option<u32>,
    /// One sample of a healthy endpoint is recorded per period (default 1h).
    pub sample_every: Option<ConfigDuration>,
    /// Time between connectivity checks of the repository's storage (default 5m; see
    /// [`crate::storage_probe`]).
    pub storage_every: Option<ConfigDuration>,
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
}

/// One `[[health.endpoints]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub name: String,
    pub url: String,
    /// The status a healthy endpoint answers (default 200).
    pub expected_status: Option<u16>,
    /// How long a check waits for the answer (default 10s).
    pub timeout: Option<ConfigDuration>,
}

/// Why a `[health]` section was refused; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthConfigError {
    #[error("{0}")]
    Invalid(String),
}

/// The thresholds of the judgement, resolved from [`HealthConfig`] with the seeds' defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub interval: TimeDelta,
    pub recheck_after: TimeDelta,
    pub slow: Duration,
    pub failures_for_down: u32,
    pub slow_for_degraded: u32,
    pub sample_every: TimeDelta,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            interval: TimeDelta::minutes(5),
            recheck_after: TimeDelta::seconds(30),
            slow: Duration::from_secs(3),
            failures_for_down: 2,
            slow_for_degraded: 3,
            sample_every: TimeDelta::hours(1),
        }
    }
}

impl HealthConfig {
    /// Checks every endpoint (a name, an http(s) URL, a sane status) and every threshold.
    pub fn validate(&self) -> Result<(), HealthConfigError> {
        let bad = |s: String| Err(HealthConfigError::Invalid(format!("health.endpoints: {s}")));
        let mut names = std::collections::HashSet::new();
        for e in &self.endpoints {
            if e.name.trim().is_empty() {
                return bad(format!("an endpoint with url {:?} has no name", e.url));
            }
            if !names.insert(e.name.as_str()) {
                return bad(format!("the name {:?} is used twice", e.name));
            }
            match reqwest::Url::parse(&e.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                Ok(_) => {
                    return bad(format!(
                        "{}: url {:?} must be an http:// or https:// URL with a host",
                        e.name, e.url
                    ));
                }
                Err(why) => {
                    return bad(format!("{}: url {:?} is not a URL ({why})", e.name, e.url));
                }
            }
            if let Some(s) = e.expected_status
                && !(100..=599).contains(&s)
            {
                return bad(format!(
                    "{}: expected_status {s} is not an HTTP status (100..599)",
                    e.name
                ));
            }
            if e.timeout.is_some_and(|t| t.as_secs() == 0) {
                return bad(format!("{}: timeout must be at least 1s", e.name));
            }
        }
        let t = |v: Option<ConfigDuration>, key: &str| match v {
            Some(d) if d.as_secs() == 0 => Err(HealthConfigError::Invalid(format!(
                "health.{key} must be at least 1s"
            ))),
            _ => Ok(()),
        };
        t(self.interval, "interval")?;
        t(self.recheck_after, "recheck_after")?;
        t(self.slow_threshold, "slow_threshold")?;
        t(self.sample_every, "sample_every")?;
        t(self.storage_every, "storage_every")?;
        if self.failures_for_down == Some(0) || self.slow_for_degraded == Some(0) {
            return Err(HealthConfigError::Invalid(
                "health.failures_for_down and health.slow_for_degraded must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Time between connectivity checks of the repository's storage.
    pub fn storage_every(&self) -> Duration {
        self.storage_every
            .map_or(Duration::from_secs(300), |d| d.as_std())
    }

    pub fn thresholds(&self) -> Thresholds {
        let d = Thresholds::default();
        Thresholds {
            interval: self.interval.map_or(d.interval, |v| v.as_chrono()),
            recheck_after: self
                .recheck_after
                .map_or(d.recheck_after, |v| v.as_chrono()),
            slow: self.slow_threshold.map_or(d.slow, |v| v.as_std()),
            failures_for_down: self.failures_for_down.unwrap_or(d.failures_for_down),
            slow_for_degraded: self.slow_for_degraded.unwrap_or(d.slow_for_degraded),
            sample_every: self.sample_every.map_or(d.sample_every, |v| v.as_chrono()),
        }
    }
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    /// The HTTP status, if an answer came.
    pub status: Option<u16>,
    pub latency: Duration,
    /// What went wrong: the request's error or an unexpected status.
    pub error: Option<String>,
}

impl CheckResult {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// What the judgement says after one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    pub state: HealthState,
    pub changed: bool,
    /// Whether this check is to be recorded (see the module documentation).
    pub record: bool,
    /// The slot of the next check.
    pub next: DateTime<Utc>,
}

/// The pure state machine of one endpoint: feed it each check with its slot.
#[derive(Clone, Debug)]
pub struct EndpointHealth {
    thresholds: Thresholds,
    state: HealthState,
    failures: u32,
    slow: u32,
    last_slot: Option<DateTime<Utc>>,
}

impl EndpointHealth {
    pub fn new(thresholds: Thresholds) -> EndpointHealth {
        EndpointHealth {
            thresholds,
            state: HealthState::Up,
            failures: 0,
            slow: 0,
            last_slot: None,
        }
    }

    /// Resumes from the last recorded check of the endpoint (a restarted `serve`), so a restart
    /// neither forgets that an endpoint is Down nor records a healthy-looking first failure:
    /// the run counts are what the recorded state implies (at least one failure after a
    /// failure, enough for Down after Down; likewise for slow answers), and the sample period
    /// of that check counts as sampled.
    pub fn resume(thresholds: Thresholds, at: DateTime<Utc>, last: &HealthChecked) -> Self {
        let slow = last.ok && u128::from(last.latency_ms) > thresholds.slow.as_millis();
        EndpointHealth {
            thresholds,
            state: last.state,
            failures: match (last.ok, last.state) {
                (true, _) => 0,
                (false, HealthState::Down) => thresholds.failures_for_down,
                (false, _) => 1,
            },
            slow: match (slow, last.state) {
                (false, _) => 0,
                (true, HealthState::Degraded) => thresholds.slow_for_degraded,
                (true, _) => 1,
            },
            last_slot: Some(at),
        }
    }

    pub fn state(&self) -> HealthState {
        self.state
    }

    /// The first regular slot at or after `t` (a multiple of the interval since the epoch).
    pub fn regular_slot_at_or_after(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let step = self.thresholds.interval.num_milliseconds().max(1);
        let ms = t.timestamp_millis();
        let slot = ms.div_euclid(step) * step;
        let slot = if slot < ms { slot + step } else { slot };
        DateTime::from_timestamp_millis(slot).unwrap_or(t)
    }

    /// Judges the check made at `slot`.
    pub fn observe(&mut self, slot: DateTime<Utc>, check: &CheckResult) -> Observation {
        let th = self.thresholds;
        let before = self.state;
        let bad;
        if !check.ok() {
            self.failures += 1;
            self.slow = 0;
            if self.failures >= th.failures_for_down {
                self.state = HealthState::Down;
            }
            bad = true;
        } else if check.latency > th.slow {
            self.failures = 0;
            self.slow += 1;
            // Degraded stays Degraded while the answers stay slow.
            self.state = if self.slow >= th.slow_for_degraded || before == HealthState::Degraded {
                HealthState::Degraded
            } else {
                HealthState::Up
            };
            bad = true;
        } else {
            self.failures = 0;
            self.slow = 0;
            self.state = HealthState::Up;
            bad = false;
        }
        let changed = self.state != before;
        let period = |t: DateTime<Utc>| {
            t.timestamp_millis()
                .div_euclid(th.sample_every.num_milliseconds().max(1))
        };
        let new_period = self
            .last_slot
            .is_none_or(|last| period(last) != period(slot));
        self.last_slot = Some(slot);
        let next = if !check.ok() && self.state != HealthState::Down {
            slot + th.recheck_after
        } else {
            self.regular_slot_at_or_after(slot + TimeDelta::milliseconds(1))
        };
        Observation {
            state: self.state,
            changed,
            record: changed || bad || new_period,
            next,
        }
    }
}

/// The id of the event of `endpoint`'s check at `slot` (see the module invariants).
pub fn event_id(endpoint: &str, slot: DateTime<Utc>) -> Uuid {
    backstop_events::uuid_v7_derived(
        Uuid::nil(),
        slot,
        &format!("health.checked/{endpoint}/{}", slot.timestamp_millis()),
    )
}

/// The `health.checked` event of a check (not yet appended).
pub fn checked_event(
    endpoint: &str,
    slot: DateTime<Utc>,
    check: &CheckResult,
    state: HealthState,
) -> NewEvent {
    let event = Event::HealthChecked(HealthChecked {
        endpoint: endpoint.to_string(),
        ok: check.ok(),
        status: check.status,
        latency_ms: u64::try_from(check.latency.as_millis()).unwrap_or(u64::MAX),
        error: check.error.clone(),
        state,
    });
    let mut e = NewEvent::new(streams::health(endpoint), Actor::worker(MONITOR), &event)
        .with_id(event_id(endpoint, slot));
    e.correlation_id = e.id;
    e.occurred_at = slot;
    e
}

/// Appends `event`, treating "already recorded by another monitor" as done. A failure is
/// logged; the monitor goes on (a lost sample is not worth stopping for).
pub async fn append_once(appender: &dyn Appender, event: NewEvent) -> bool {
    let stream = event.stream.clone();
    match appender
        .append(&stream, ExpectedVersion::Any, vec![event])
        .await
    {
        Ok(_) => true,
        Err(e) if e.is_id_reused() => {
            tracing::debug!(%stream, "slot already recorded by another monitor");
            true
        }
        Err(e) => {
            tracing::warn!(%stream, error = %e, "could not record a check");
            false
        }
    }
}

/// One HTTP check of `endpoint`, its latency measured on `clock`.
pub async fn check(
    client: &reqwest::Client,
    endpoint: &EndpointConfig,
    clock: &dyn Clock,
) -> CheckResult {
    let timeout = endpoint
        .timeout
        .map_or(Duration::from_secs(10), |t| t.as_std());
    let expected = endpoint.expected_status.unwrap_or(200);
    let start = clock.now();
    let answer = client.get(&endpoint.url).timeout(timeout).send().await;
    let latency = (clock.now() - start).to_std().unwrap_or(Duration::ZERO);
    match answer {
        Ok(r) => {
            let status = r.status().as_u16();
            // The body is not looked at; reading it lets the connection be reused.
            let _ = r.bytes().await;
            CheckResult {
                status: Some(status),
                latency,
                error: (status != expected)
                    .then(|| format!("answered {status}, expected {expected}")),
            }
        }
        Err(e) => CheckResult {
            status: None,
            latency,
            error: Some(error_chain(&e)),
        },
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The last recorded check of `endpoint` in `ledger`, with its slot.
pub fn last_recorded(ledger: &Ledger, endpoint: &str) -> Option<(DateTime<Utc>, HealthChecked)> {
    let stream = streams::health(endpoint);
    let store = ledger.store();
    let version = store.stream_version(&stream).ok()?;
    if version == 0 {
        return None;
    }
    let last = store.stream(&stream, version, 1).ok()?.pop()?;
    match last.event() {
        Ok(Event::HealthChecked(h)) if h.endpoint == endpoint => Some((last.occurred_at, h)),
        _ => None,
    }
}

/// Runs the monitor of every configured endpoint until `shutdown` fires, resuming each from
/// its last recorded check in `history` ([`EndpointHealth::resume`]).
pub async fn run(
    config: &HealthConfig,
    history: Option<&Ledger>,
    appender: &dyn Appender,
    clock: &dyn Clock,
    shutdown: watch::Receiver<bool>,
) {
    let client = match reqwest::Client::builder()
        .user_agent(concat!("backstop-health/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the health monitor's HTTP client");
            return;
        }
    };
    let th = config.thresholds();
    tracing::info!(
        endpoints = config.endpoints.len(),
        interval_seconds = th.interval.num_seconds(),
        "health monitor running"
    );
    let runs = config.endpoints.iter().map(|e| {
        let health = match history.and_then(|l| last_recorded(l, &e.name)) {
            Some((at, last)) => EndpointHealth::resume(th, at, &last),
            None => EndpointHealth::new(th),
        };
        run_endpoint(&client, e, health, appender, clock, shutdown.clone())
    });
    futures::future::join_all(runs).await;
}

async fn run_endpoint(
    client: &reqwest::Client,
    endpoint: &EndpointConfig,
    mut health: EndpointHealth,
    appender: &dyn Appender,
    clock: &dyn Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut next = health.regular_slot_at_or_after(clock.now());
    loop {
        if *shutdown.borrow() {
            return;
        }
        if clock.now() >= next {
            let slot = next;
            let result = check(client, endpoint, clock).await;
            let obs = health.observe(slot, &result);
            if obs.changed {
                tracing::warn!(endpoint = %endpoint.name, state = ?obs.state, error = ?result.error, "endpoint state changed");
            }
            if obs.record {
                append_once(
                    appender,
                    checked_event(&endpoint.name, slot, &result, obs.state),
                )
                .await;
            }
            next = obs.next;
            // A check that took longer than a whole interval skips the slots it overran.
            let now = clock.now();
            if next < now {
                next = health.regular_slot_at_or_after(now);
            }
            continue;
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            _ = clock.sleep_until(next) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn answer(ms: u64) -> CheckResult {
        CheckResult {
            status: Some(200),
            latency: Duration::from_millis(ms),
            error: None,
        }
    }
    fn failure() -> CheckResult {
        CheckResult {
            status: Some(503),
            latency: Duration::from_millis(5),
            error: Some("answered 503, expected 200".into()),
        }
    }

    #[test]
    fn two_failures_down_three_slow_degraded_then_up_recording_only_what_matters() {
        let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap();
        let mut h = EndpointHealth::new(Thresholds::default());
        assert_eq!(h.regular_slot_at_or_after(t0), t0);

        // The first check after start is recorded (a sample), healthy.
        let o = h.observe(t0, &answer(40));
        assert_eq!(
            (o.state, o.changed, o.record),
            (HealthState::Up, false, true)
        );
        assert_eq!(o.next, t0 + TimeDelta::minutes(5));

        // A healthy check in the same hour: not recorded.
        let o = h.observe(o.next, &answer(40));
        assert!(!o.record);

        // First failure: recorded, still Up, a confirming re-check 30 s later.
        let f1 = t0 + TimeDelta::minutes(10);
        let o = h.observe(f1, &failure());
        assert_eq!(
            (o.state, o.changed, o.record),
            (HealthState::Up, false, true)
        );
        assert_eq!(o.next, f1 + TimeDelta::seconds(30));

        // Second failure: Down, within a minute of the first; the next check is a regular slot.
        let f2 = o.next;
        let o = h.observe(f2, &failure());
        assert_eq!(
            (o.state, o.changed, o.record),
            (HealthState::Down, true, true)
        );
        assert!(f2 - f1 < TimeDelta::minutes(1));
        assert_eq!(o.next, t0 + TimeDelta::minutes(15));

        // Still failing: recorded, stays Down, no re-check (it is judged already).
        let o = h.observe(o.next, &failure());
        assert_eq!(
            (o.state, o.changed, o.record),
            (HealthState::Down, false, true)
        );
        assert_eq!(o.next, t0 + TimeDelta::minutes(20));

        // Answers, slowly: Up (answering), then Degraded at the third slow answer.
        let o = h.observe(o.next, &answer(3_500));
        assert_eq!(
            (o.state, o.changed, o.record),
            (HealthState::Up, true, true)
        );
        let o = h.observe(o.next, &answer(4_000));
        assert_eq!(
            (o.state, o.changed, o.record),
            (HealthState::Up, false, true)
        );
        let o = h.observe(o.next, &answer(3_001));
        assert_eq!(
            (o.state, o.changed, o.record),
            (HealthState::Degraded, true, true)
        );
        // Exactly at the threshold is not slow: recovered.
        let o = h.observe(o.next, &answer(3_000));
        assert_eq!(
            (o.state, o.changed, o.record),
            (HealthState::Up, true, true)
        );
        let o = h.observe(o.next, &answer(30));
        assert!(!o.record);
        // A new hour: one sample.
        let o = h.observe(t0 + TimeDelta::hours(1), &answer(30));
        assert_eq!(
            (o.state, o.changed, o.record),
            (HealthState::Up, false, true)
        );
    }

    #[test]
    fn a_single_failure_between_answers_is_not_down() {
        let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap();
        let mut h = EndpointHealth::new(Thresholds::default());
        h.observe(t0, &answer(10));
        let o = h.observe(t0 + TimeDelta::minutes(5), &failure());
        assert_eq!(o.state, HealthState::Up);
        let o = h.observe(o.next, &answer(10));
        assert_eq!(
            (o.state, o.changed, o.record),
            (HealthState::Up, false, false)
        );
        // Slow answers interrupted by a fast one start counting again.
        for _ in 0..2 {
            h.observe(t0 + TimeDelta::minutes(10), &answer(5_000));
        }
        h.observe(t0 + TimeDelta::minutes(20), &answer(5));
        let o = h.observe(t0 + TimeDelta::minutes(25), &answer(5_000));
        assert_eq!(o.state, HealthState::Up);
    }

    #[test]
    fn a_resumed_monitor_keeps_down_and_a_first_failure() {
        let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap();
        let th = Thresholds::default();
        let recorded = |ok: bool, latency_ms: u64, state: HealthState| HealthChecked {
            endpoint: "web".into(),
            ok,
            status: Some(if ok { 200 } else { 503 }),
            latency_ms,
            error: (!ok).then(|| "answered 503, expected 200".into()),
            state,
        };
        // Down before the restart, still failing: no change, no "up" in between.
        let mut h = EndpointHealth::resume(th, t0, &recorded(false, 5, HealthState::Down));
        let o = h.observe(t0 + TimeDelta::minutes(5), &failure());
        assert_eq!((o.state, o.changed), (HealthState::Down, false));
        let o = h.observe(o.next, &answer(20));
        assert_eq!(
            (o.state, o.changed, o.record),
            (HealthState::Up, true, true)
        );
        // One failure before the restart: the next one makes it Down.
        let mut h = EndpointHealth::resume(th, t0, &recorded(false, 5, HealthState::Up));
        let o = h.observe(t0 + TimeDelta::seconds(30), &failure());
        assert_eq!((o.state, o.changed), (HealthState::Down, true));
        // Degraded before: still slow stays Degraded; the hour's sample was taken.
        let mut h = EndpointHealth::resume(th, t0, &recorded(true, 4000, HealthState::Degraded));
        let o = h.observe(t0 + TimeDelta::minutes(5), &answer(3500));
        assert_eq!((o.state, o.changed), (HealthState::Degraded, false));
        let mut h = EndpointHealth::resume(th, t0, &recorded(true, 30, HealthState::Up));
        assert!(!h.observe(t0 + TimeDelta::minutes(5), &answer(30)).record);
    }

    #[test]
    fn ids_derive_from_endpoint_and_slot() {
        let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap();
        assert_eq!(event_id("web", t0), event_id("web", t0));
        assert_ne!(event_id("web", t0), event_id("api", t0));
        assert_ne!(
            event_id("web", t0),
            event_id("web", t0 + TimeDelta::seconds(30))
        );
        let e = checked_event("web", t0, &answer(12), HealthState::Up);
        assert_eq!(e.occurred_at, t0);
        assert_eq!(e.stream, "health-web");
        e.validate().expect("a valid event");
    }

    #[test]
    fn config_errors_name_the_key() {
        let cfg = HealthConfig {
            endpoints: vec![EndpointConfig {
                name: "web".into(),
                url: "ftp://x".into(),
                expected_status: None,
                timeout: None,
            }],
            ..HealthConfig::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("health.endpoints") && e.contains("ftp://x"),
            "{e}"
        );
        let cfg = HealthConfig {
            endpoints: vec![EndpointConfig {
                name: "web".into(),
                url: "not a url".into(),
                expected_status: None,
                timeout: None,
            }],
            ..HealthConfig::default()
        };
        assert!(cfg.validate().is_err());
    }
}
