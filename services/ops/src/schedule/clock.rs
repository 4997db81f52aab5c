//! The clock the scheduler reads and sleeps on, injected so that tests run a week of slots, a
//! DST change or a three-day outage in milliseconds.
//!
//! - [`SystemClock`]: wall-clock time. It never sleeps more than [`MAX_NAP`] at once, so a wall
//!   clock stepped by NTP (or a suspended VM) is noticed within a minute: the scheduler decides
//!   from `now()` after every wake-up, never from how long it slept.
//! - [`ManualClock`]: time moves only when someone sleeps on it (it jumps to the instant asked
//!   for) or when the test moves it. A *horizon* bounds how far sleepers may move it: a sleep past
//!   the horizon parks until the test raises the horizon, and [`ManualClock::wait_parked`] tells
//!   the test when every scheduler has run out of work, without any real sleeping.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

/// The longest single sleep of [`SystemClock`].
pub const MAX_NAP: Duration = Duration::from_secs(60);

#[async_trait]
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
    /// Returns at `instant` or later. Callers re-read [`Clock::now`] afterwards: a clock may
    /// return early (the system clock naps at most [`MAX_NAP`]).
    async fn sleep_until(&self, instant: DateTime<Utc>);
}

/// The machine's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
    async fn sleep_until(&self, instant: DateTime<Utc>) {
        let left = (instant - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::time::sleep(left.min(MAX_NAP)).await;
    }
}

/// A clock for tests: see the module documentation.
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
    horizon: watch::Sender<Option<DateTime<Utc>>>,
    parked: watch::Sender<usize>,
}

impl ManualClock {
    /// A clock at `start` with no horizon (sleeps always return at once).
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock {
            now: Mutex::new(start),
            horizon: watch::Sender::new(None),
            parked: watch::Sender::new(0),
        }
    }

    /// Moves the clock to `instant` (never backwards).
    pub fn advance_to(&self, instant: DateTime<Utc>) {
        let mut now = self.lock();
        if instant > *now {
            *now = instant;
        }
    }

    /// Sleeps past `horizon` park until the horizon moves beyond them; `None` lets every sleep
    /// return at once.
    pub fn set_horizon(&self, horizon: Option<DateTime<Utc>>) {
        self.horizon.send_replace(horizon);
    }

    /// How many sleepers are parked at the horizon.
    pub fn parked(&self) -> usize {
        *self.parked.borrow()
    }

    /// Waits until at least `n` sleepers are parked at the horizon.
    pub async fn wait_parked(&self, n: usize) {
        let mut rx = self.parked.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|p| *p >= n).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DateTime<Utc>> {
        // A panic while holding this lock cannot leave a half-written instant behind.
        self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a parked sleeper for as long as it lives, even if its future is dropped.
struct Parked<'a>(&'a watch::Sender<usize>);

impl<'a> Parked<'a> {
    fn new(counter: &'a watch::Sender<usize>) -> Parked<'a> {
        counter.send_modify(|n| *n += 1);
        Parked(counter)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

#[async_trait]
impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.lock()
    }

    async fn sleep_until(&self, instant: DateTime<Utc>) {
        let mut horizon = self.horizon.subscribe();
        loop {
            let limit = *horizon.borrow_and_update();
            if limit.is_none_or(|h| instant <= h) {
                self.advance_to(instant);
                // Let the other tasks of a test run, as a real sleep would.
                tokio::task::yield_now().await;
                return;
            }
            let _parked = Parked::new(&self.parked);
            if horizon.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[tokio::test]
    async fn manual_clock_jumps_and_parks_at_the_horizon() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let clock = ManualClock::new(t0);
        clock.sleep_until(t0 + chrono::TimeDelta::hours(5)).await;
        assert_eq!(clock.now(), t0 + chrono::TimeDelta::hours(5));
        // Never backwards.
        clock.sleep_until(t0).await;
        assert_eq!(clock.now(), t0 + chrono::TimeDelta::hours(5));

        clock.set_horizon(Some(t0 + chrono::TimeDelta::hours(6)));
        let target = t0 + chrono::TimeDelta::hours(8);
        let sleeper = async {
            clock.sleep_until(target).await;
            clock.now()
        };
        let release = async {
            clock.wait_parked(1).await;
            assert_eq!(clock.now(), t0 + chrono::TimeDelta::hours(5));
            clock.set_horizon(None);
        };
        let (woke_at, ()) = tokio::join!(sleeper, release);
        assert_eq!(woke_at, target);
        assert_eq!(clock.parked(), 0);
    }
}
