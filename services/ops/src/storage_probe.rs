//! Storage probes: the repository backend's connectivity and its daily usage, as events on the
//! `storage` stream.
//!
//! - **Connectivity** ([`probe_connectivity`]): a cheap round trip through the
//!   [`backstop_repo::backend::Backend`] trait (a `head` of the repository's `config` object),
//!   every `every` (default 5 minutes). Like the health monitor, it records
//!   `storage.connectivity_checked` only when the answer changes (ok <-> failing), on every
//!   failure, and once an hour while it stays fine: a reachable bucket checked every five
//!   minutes would otherwise add 288 identical events a day.
//! - **Usage** ([`sample_usage`]): once a day, the sum of the sizes of every object listed in
//!   the repository (chunks, manifests, keys, WAL) and their count, as `storage.usage_sampled`
//!   {repository, region, storage_class, bytes, objects}. Region and class come from the
//!   configuration (see [`StorageSeries`]). Each replica's usage is sampled the same way
//!   ([`run_usage`], usage only), as a series of its own.
//!
//! Invariants: event ids derive from the slot (the check's regular slot, a multiple of `every`
//! since the epoch; the UTC day for usage) and the backend, and `occurred_at` is that slot, so a
//! retried append is stored once and two `serve` processes record one event per slot between
//! them (the second is refused as an id reused with other content, which counts as recorded;
//! see [`backstop_ledger::LedgerError::is_id_reused`]).

use std::sync::Arc;
use std::time::Duration;

use backstop_events::{
    Actor, Event, NewEvent, StorageConnectivityChecked, StorageUsageSampled, streams,
};
use backstop_ledger::Appender;
use backstop_repo::backend::Backend;
use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use crate::health::append_once;
use crate::schedule::Clock;

pub const PROBE: &str = "storage-probe";

/// What the usage of one repository is recorded as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageSeries {
    /// The repository's location, for people and as the series key.
    pub repository: String,
    /// The S3 region (`[repository] region`), or `local` for a directory.
    pub region: String,
    /// `[cost] storage_class`, default STANDARD.
    pub storage_class: String,
}

/// One round trip's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connectivity {
    pub latency: Duration,
    pub error: Option<String>,
}

/// A `head` of the repository's `config` object, timed on `clock`. A missing object is an
/// answer too (the backend is reachable).
pub async fn probe_connectivity(backend: &dyn Backend, clock: &dyn Clock) -> Connectivity {
    let start = clock.now();
    let r = backend.head("config").await;
    let latency = (clock.now() - start).to_std().unwrap_or(Duration::ZERO);
    Connectivity {
        latency,
        error: r.err().map(|e| e.to_string()),
    }
}

/// The sum of the sizes and the count of every object in the repository.
pub async fn usage(backend: &dyn Backend) -> Result<(u64, u64), backstop_repo::RepoError> {
    let objects = backend.list("").await?;
    Ok((objects.iter().map(|o| o.size).sum(), objects.len() as u64))
}

/// The id of an event of `kind` about `backend` at `slot`.
pub fn event_id(kind: &str, backend: &str, slot: DateTime<Utc>) -> Uuid {
    backstop_events::uuid_v7_derived(
        Uuid::nil(),
        slot,
        &format!("{kind}/{backend}/{}", slot.timestamp_millis()),
    )
}

fn event_at(kind: &str, backend: &str, slot: DateTime<Utc>, event: &Event) -> NewEvent {
    let mut e = NewEvent::new(streams::storage(), Actor::worker(PROBE), event)
        .with_id(event_id(kind, backend, slot));
    e.correlation_id = e.id;
    e.occurred_at = slot;
    e
}

/// The `storage.connectivity_checked` of a probe at `slot`.
pub fn connectivity_event(backend: &str, slot: DateTime<Utc>, c: &Connectivity) -> NewEvent {
    let event = Event::StorageConnectivityChecked(StorageConnectivityChecked {
        backend: backend.to_string(),
        ok: c.error.is_none(),
        latency_ms: u64::try_from(c.latency.as_millis()).unwrap_or(u64::MAX),
        error: c.error.clone(),
    });
    event_at("storage.connectivity_checked", backend, slot, &event)
}

/// Samples the usage and returns the `storage.usage_sampled` of `day` (its midnight is the
/// slot).
pub async fn sample_usage(
    backend: &dyn Backend,
    series: &StorageSeries,
    day: DateTime<Utc>,
) -> Result<NewEvent, backstop_repo::RepoError> {
    let (bytes, objects) = usage(backend).await?;
    let event = Event::StorageUsageSampled(StorageUsageSampled {
        region: series.region.clone(),
        storage_class: series.storage_class.clone(),
        bytes,
        objects,
        repository: series.repository.clone(),
    });
    Ok(event_at(
        "storage.usage_sampled",
        &series.repository,
        day,
        &event,
    ))
}

fn floor_to(t: DateTime<Utc>, step: TimeDelta) -> DateTime<Utc> {
    let step = step.num_milliseconds().max(1);
    DateTime::from_timestamp_millis(t.timestamp_millis().div_euclid(step) * step).unwrap_or(t)
}

/// Decides which connectivity probes are recorded (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct ConnectivityRecorder {
    last_ok: Option<bool>,
    last_slot: Option<DateTime<Utc>>,
}

impl ConnectivityRecorder {
    /// Whether the probe at `slot` is recorded: a change, a failure, or the first of an hour.
    pub fn record(&mut self, slot: DateTime<Utc>, ok: bool) -> bool {
        let hour = |t: DateTime<Utc>| floor_to(t, TimeDelta::hours(1));
        let changed = self.last_ok != Some(ok);
        let new_hour = self.last_slot.is_none_or(|l| hour(l) != hour(slot));
        self.last_ok = Some(ok);
        self.last_slot = Some(slot);
        changed || !ok || new_hour
    }
}

/// Probes connectivity every `every` and samples usage once a UTC day (the first slot of each
/// day), until `shutdown`.
pub async fn run(
    backend: Arc<dyn Backend>,
    series: StorageSeries,
    every: Duration,
    appender: &dyn Appender,
    clock: &dyn Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    let step = TimeDelta::from_std(every).unwrap_or(TimeDelta::minutes(5));
    let name = backend.describe();
    let mut recorder = ConnectivityRecorder::default();
    let mut sampled_day: Option<chrono::NaiveDate> = None;
    tracing::info!(backend = %name, every_seconds = every.as_secs(), "storage probe running");
    loop {
        if *shutdown.borrow() {
            return;
        }
        let now = clock.now();
        let slot = floor_to(now, step);
        let c = probe_connectivity(backend.as_ref(), clock).await;
        if c.error.is_some() {
            tracing::warn!(backend = %name, error = ?c.error, "storage unreachable");
        }
        if recorder.record(slot, c.error.is_none()) {
            append_once(appender, connectivity_event(&name, slot, &c)).await;
        }
        let today = slot.date_naive();
        if c.error.is_none() && sampled_day != Some(today) {
            let midnight = floor_to(slot, TimeDelta::days(1));
            match sample_usage(backend.as_ref(), &series, midnight).await {
                Ok(e) => {
                    if append_once(appender, e).await {
                        sampled_day = Some(today);
                    }
                }
                Err(e) => {
                    tracing::warn!(backend = %name, error = %e, "could not sample the storage usage")
                }
            }
        }
        let next = slot + step;
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            _ = async { while clock.now() < next { clock.sleep_until(next).await } } => {}
        }
    }
}

/// Samples only the usage, once a UTC day (at start, then after each midnight), until
/// `shutdown`: for a replica, whose cost is counted (R14.5) but whose connectivity is the
/// replicate worker's to report. A failed sample is tried again after [`USAGE_RETRY`].
pub async fn run_usage(
    backend: Arc<dyn Backend>,
    series: StorageSeries,
    appender: &dyn Appender,
    clock: &dyn Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = backend.describe();
    tracing::info!(backend = %name, region = %series.region, "usage sampling running");
    loop {
        if *shutdown.borrow() {
            return;
        }
        let now = clock.now();
        let midnight = floor_to(now, TimeDelta::days(1));
        let next = match sample_usage(backend.as_ref(), &series, midnight).await {
            Ok(e) => {
                if append_once(appender, e).await {
                    midnight + TimeDelta::days(1)
                } else {
                    now + USAGE_RETRY
                }
            }
            Err(e) => {
                tracing::warn!(backend = %name, error = %e, "could not sample the storage usage");
                now + USAGE_RETRY
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            _ = async { while clock.now() < next { clock.sleep_until(next).await } } => {}
        }
    }
}

/// How soon [`run_usage`] tries again after a failed sample.
pub const USAGE_RETRY: TimeDelta = TimeDelta::minutes(15);

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn connectivity_is_recorded_on_change_failure_and_hourly() {
        let t0 = Utc.with_ymd_and_hms(2026, 3, 2, 10, 0, 0).unwrap();
        let mut r = ConnectivityRecorder::default();
        let at = |m: i64| t0 + TimeDelta::minutes(m);
        assert!(r.record(at(0), true));
        assert!(!r.record(at(5), true));
        assert!(r.record(at(10), false));
        assert!(r.record(at(15), false));
        assert!(r.record(at(20), true));
        assert!(!r.record(at(25), true));
        assert!(r.record(at(60), true));
    }
}
