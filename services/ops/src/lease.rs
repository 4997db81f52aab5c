//! Leases: no backup or restore stays "started" forever.
//!
//! A job's process can die without a word (`kill -9`, a power cut, an OOM kill), leaving
//! `backup.started` (or `recovery.started`) with nothing after it. So while a job runs, the
//! process running it holds a *lease* on it and renews it; `backstop serve` watches the leases
//! and records the end of every job whose lease lapsed.
//!
//! - **The heartbeat** ([`Heartbeat::beside`]) runs beside the job's work: it appends a
//!   `lease.renewed` {job, what, until, host, renewal} to the job's own stream (`backup-<id>`,
//!   `recovery-<id>`) at once and then every third of the lease period, each extending the lease
//!   to `now + lease`. It stops when the work ends. A renewal that fails is logged and never fails
//!   the job: the work matters more than its heartbeat.
//! - **The monitor** ([`LeaseMonitor`]) is a state machine fed with the ledger's events (a job
//!   requested, started, renewed, ended by `backup.completed|failed` or
//!   `recovery.completed|failed`) and asked which leases lapsed at an instant of an injected
//!   [`Clock`]. For each, it records `backup.failed` (through
//!   [`crate::backup::record_failure_to`]) or `recovery.failed` with the reason "... was
//!   abandoned: the process running it stopped renewing its lease at T (host H)".
//!   [`run_monitor`] drives it in `serve`: a catch-up subscription of the local ledger from
//!   position 1 (open jobs are all it keeps in memory) plus a periodic tick.
//!
//! Invariants:
//! - The lease lapses at the latest `until` renewed; a job started by a build without leases
//!   (no renewal ever) gets the monitor's lease period counted from its `started` event.
//! - A job is judged only once the monitor has read the ledger up to its head, so a completion
//!   already committed is never mistaken for silence.
//! - The failure a monitor records has the id the job's own process would have given its failure
//!   (derived from the job id, the request's time and the label `failed`, [`crate::record`]):
//!   two monitors (two `serve` processes), or a monitor and a process that was only slow, record
//!   one failure between them.
//! - Renewal ids derive from the job id, the start of the run and the renewal number: an append
//!   retried by the appender stores nothing twice, and a second run of the same job (a
//!   redelivered request) renews under ids of its own.
//! - Clocks: `until` is the job's host's clock and the monitor compares it with its own, so hosts
//!   must keep their clocks in step (NTP) to well within a third of the lease.
//!
//! **Verifications hold no lease**, on purpose. A verification is started by the verify worker
//! for a `backup.completed` event, and that event is redelivered until a worker finishes with it
//! (embedded: the consumer's cursor moves only after the handler returns; JetStream: after the
//! ack), so a killed verifier's verification is run again under the same ids and ends. And
//! "abandoned" is not a verdict on a backup: `verification.failed` means damaged data (critical
//! alert, quarantine, a new backup), which a dead verifier says nothing about.
//!
//! A job recorded as abandoned whose request is delivered again (a worker's backup after `serve`
//! restarted) may still run and complete; its `backup.completed` then follows the failure, and
//! the read models show the backup completed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backstop_events::{
    Actor, BackupRequested, Envelope, Event, LeaseRenewed, LeasedJob, NewEvent, RecoveryFailed,
    RecoveryStarted, Trigger, streams, uuid_v7_derived,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerError};
use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use crate::context::hostname;
use crate::error::OpsError;
use crate::record::record;
use crate::schedule::clock::{Clock, SystemClock};

/// The lease period when none is configured (`[workers] lease_seconds`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// The shortest lease accepted: renewals every third of it must still get through the ledger.
pub const MIN_LEASE: Duration = Duration::from_secs(1);

/// The name of the monitor's actor on the failures it records.
pub const MONITOR: &str = "lease-monitor";

static PROCESS_LEASE_MS: AtomicU64 = AtomicU64::new(DEFAULT_LEASE.as_millis() as u64);

/// Sets the lease period of the jobs this process runs (the binary calls it once, from the
/// configuration); at least [`MIN_LEASE`].
pub fn set_period(lease: Duration) {
    let ms = lease.max(MIN_LEASE).as_millis() as u64;
    PROCESS_LEASE_MS.store(ms, Ordering::Relaxed);
}

/// The lease period of the jobs this process runs ([`DEFAULT_LEASE`] unless [`set_period`]).
pub fn period() -> Duration {
    Duration::from_millis(PROCESS_LEASE_MS.load(Ordering::Relaxed))
}

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

static SYSTEM_CLOCK: SystemClock = SystemClock;

/// The lease of one running job, renewed while its work runs ([`Heartbeat::beside`]).
pub struct Heartbeat<'a> {
    appender: &'a dyn Appender,
    what: LeasedJob,
    job: Uuid,
    actor: &'a Actor,
    cause: Option<&'a Envelope>,
    lease: Duration,
    clock: &'a dyn Clock,
    host: String,
}

impl<'a> Heartbeat<'a> {
    /// The lease of `job`, renewed through `appender` by `actor` for [`period`] at a time, on
    /// the wall clock.
    pub fn new(
        appender: &'a dyn Appender,
        what: LeasedJob,
        job: Uuid,
        actor: &'a Actor,
        cause: Option<&'a Envelope>,
    ) -> Heartbeat<'a> {
        Heartbeat {
            appender,
            what,
            job,
            actor,
            cause,
            lease: period(),
            clock: &SYSTEM_CLOCK,
            host: hostname(),
        }
    }

    /// Renews for `lease` at a time instead of the process's [`period`].
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(MIN_LEASE);
        self
    }

    /// Reads and sleeps on `clock` instead of the wall clock.
    pub fn with_clock(mut self, clock: &'a dyn Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Runs `work`, renewing the lease beside it until it ends; returns what the work returned.
    /// The renewals run on the caller's task (they borrow the appender) and stop the moment the
    /// work ends: a renewal in flight then is dropped, which appenders allow (an event is stored
    /// whole or not at all).
    pub async fn beside<F: Future>(self, work: F) -> F::Output {
        let renewals = self.renew_forever();
        tokio::pin!(work, renewals);
        tokio::select! {
            biased;
            out = &mut work => out,
            never = &mut renewals => match never {},
        }
    }

    async fn renew_forever(self) -> std::convert::Infallible {
        let run = self.clock.now();
        let every = delta(self.lease / 3);
        let mut renewal = 0u64;
        loop {
            let now = self.clock.now();
            let until = (now + delta(self.lease)).trunc_subsecs(6);
            if let Err(e) = self.renew(run, renewal, now, until).await {
                tracing::warn!(job = %self.job, what = %self.what, renewal, error = %e, "could not renew the lease; the job goes on");
            }
            renewal += 1;
            let next = now + every;
            // A clock may return early (the system clock naps at most a minute).
            while self.clock.now() < next {
                self.clock.sleep_until(next).await;
            }
        }
    }

    async fn renew(
        &self,
        run: DateTime<Utc>,
        renewal: u64,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        let stream = job_stream(self.what, self.job);
        let event = Event::LeaseRenewed(LeaseRenewed {
            job: self.job,
            what: self.what,
            until,
            host: self.host.clone(),
            renewal,
        });
        let mut e = match self.cause {
            Some(c) => NewEvent::caused_by(c, &stream, self.actor.clone(), &event),
            None => NewEvent::new(&stream, self.actor.clone(), &event),
        };
        e.occurred_at = now.trunc_subsecs(6);
        e.id = renewal_id(self.job, run, renewal);
        self.appender
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await
            .map(drop)
    }
}

/// The id of renewal number `renewal` of the run of `job` that began at `run`.
pub fn renewal_id(job: Uuid, run: DateTime<Utc>, renewal: u64) -> Uuid {
    uuid_v7_derived(
        job,
        run,
        &format!("lease:{}:{renewal}", run.timestamp_micros()),
    )
}

fn job_stream(what: LeasedJob, job: Uuid) -> String {
    match what {
        LeasedJob::Backup => streams::backup(job),
        LeasedJob::Recovery => streams::recovery(job),
    }
}

/// What a job's request said, kept until the job ends (its failure repeats it).
#[derive(Clone, Debug)]
enum Request {
    Backup(BackupRequested),
    /// A recovery's failure repeats its start's payload; only the request's time is needed.
    Recovery,
}

#[derive(Clone, Debug)]
struct Requested {
    request: Request,
    at: DateTime<Utc>,
}

/// A job whose lease lapsed: what [`LeaseMonitor::expired`] returns and
/// [`LeaseMonitor::record`] records.
#[derive(Clone, Debug)]
pub struct Lapsed {
    pub what: LeasedJob,
    pub job: Uuid,
    /// The last sign of life: the last renewal, or the start when there was none.
    pub last_seen: DateTime<Utc>,
    /// When the lease lapsed.
    pub until: DateTime<Utc>,
    /// The host that last held the lease (empty when no event named it).
    pub host: String,
    /// Whether the job ever renewed (false: a build without leases, or a process killed at once).
    pub renewed: bool,
    requested: Option<Requested>,
    started: Envelope,
}

impl Lapsed {
    /// The error recorded as the job's failure reason.
    pub fn error(&self) -> OpsError {
        let host = if self.host.is_empty() {
            "unknown"
        } else {
            &self.host
        };
        OpsError::Abandoned {
            what: format!("{} {}", self.what, self.job),
            why: format!(
                "the process running it stopped renewing its lease at {} (host {host})",
                self.last_seen
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
        }
    }
}

#[derive(Clone, Debug)]
struct Running {
    started: Envelope,
    requested: Option<Requested>,
    host: String,
    last_seen: DateTime<Utc>,
    until: DateTime<Utc>,
    renewed: bool,
}

/// The leases of every open job, from the ledger's events (see the module docs).
#[derive(Debug)]
pub struct LeaseMonitor {
    lease: TimeDelta,
    requested: HashMap<(LeasedJob, Uuid), Requested>,
    running: HashMap<(LeasedJob, Uuid), Running>,
}

impl LeaseMonitor {
    /// A monitor that gives jobs without renewals `lease` from their start.
    pub fn new(lease: Duration) -> LeaseMonitor {
        LeaseMonitor {
            lease: delta(lease.max(MIN_LEASE)),
            requested: HashMap::new(),
            running: HashMap::new(),
        }
    }

    /// How many jobs are running (started, not ended).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Feeds one committed event, in ledger order. Events of other types, and events that do
    /// not decode, change nothing.
    pub fn observe(&mut self, envelope: &Envelope) {
        let Ok(event) = envelope.event() else {
            return;
        };
        let at = envelope.occurred_at;
        match event {
            Event::BackupRequested(r) => {
                self.requested.insert(
                    (LeasedJob::Backup, r.backup_id),
                    Requested {
                        request: Request::Backup(r),
                        at,
                    },
                );
            }
            Event::RecoveryRequested(r) => {
                self.requested.insert(
                    (LeasedJob::Recovery, r.recovery_id),
                    Requested {
                        request: Request::Recovery,
                        at,
                    },
                );
            }
            Event::BackupStarted(s) => {
                self.start(LeasedJob::Backup, s.backup_id, envelope, s.host);
            }
            Event::RecoveryStarted(s) => {
                self.start(LeasedJob::Recovery, s.recovery_id, envelope, String::new());
            }
            Event::LeaseRenewed(r) => {
                // A renewal of a job that is not running (ended, or recorded as abandoned) keeps
                // nothing alive.
                if let Some(job) = self.running.get_mut(&(r.what, r.job)) {
                    job.until = job.until.max(r.until);
                    job.last_seen = job.last_seen.max(at);
                    if !r.host.is_empty() {
                        job.host = r.host;
                    }
                    job.renewed = true;
                }
            }
            Event::BackupCompleted(e) => self.end(LeasedJob::Backup, e.backup_id),
            Event::BackupFailed(e) => self.end(LeasedJob::Backup, e.backup_id),
            // A skipped request (configuration unchanged) is closed, never abandoned.
            Event::BackupSkipped(e) => self.end(LeasedJob::Backup, e.backup_id),
            Event::RecoveryCompleted(e) => self.end(LeasedJob::Recovery, e.recovery_id),
            Event::RecoveryFailed(e) => self.end(LeasedJob::Recovery, e.recovery_id),
            _ => {}
        }
    }

    fn start(&mut self, what: LeasedJob, job: Uuid, envelope: &Envelope, host: String) {
        let key = (what, job);
        if self.running.contains_key(&key) {
            return;
        }
        let requested = self.requested.remove(&key);
        self.running.insert(
            key,
            Running {
                started: envelope.clone(),
                requested,
                host,
                last_seen: envelope.occurred_at,
                until: envelope.occurred_at + self.lease,
                renewed: false,
            },
        );
    }

    fn end(&mut self, what: LeasedJob, job: Uuid) {
        self.requested.remove(&(what, job));
        self.running.remove(&(what, job));
    }

    /// Every running job whose lease lapsed at or before `now`, oldest lapse first. Nothing
    /// changes until the failure is recorded ([`Self::record`]) or its event observed.
    pub fn expired(&self, now: DateTime<Utc>) -> Vec<Lapsed> {
        let mut lapsed: Vec<Lapsed> = self
            .running
            .iter()
            .filter(|(_, r)| r.until <= now)
            .map(|(&(what, job), r)| Lapsed {
                what,
                job,
                last_seen: r.last_seen,
                until: r.until,
                host: r.host.clone(),
                renewed: r.renewed,
                requested: r.requested.clone(),
                started: r.started.clone(),
            })
            .collect();
        lapsed.sort_by_key(|l| (l.until, l.job));
        lapsed
    }

    /// The earliest instant at which a running job's lease lapses.
    pub fn next_lapse(&self) -> Option<DateTime<Utc>> {
        self.running.values().map(|r| r.until).min()
    }

    /// Records the end of a job whose lease lapsed (`backup.failed` or `recovery.failed`, the
    /// reason from [`Lapsed::error`]) and stops watching it.
    pub async fn record(
        &mut self,
        appender: &dyn Appender,
        lapsed: &Lapsed,
    ) -> Result<(), OpsError> {
        let actor = Actor::worker(MONITOR);
        let error = lapsed.error();
        let cause = Some(&lapsed.started);
        match lapsed.what {
            LeasedJob::Backup => {
                let (request, at) = match &lapsed.requested {
                    Some(Requested {
                        request: Request::Backup(r),
                        at,
                    }) => (r.clone(), *at),
                    _ => (
                        backup_request_from_start(&lapsed.started)?,
                        lapsed.started.occurred_at,
                    ),
                };
                crate::backup::record_failure_to(appender, &request, at, &actor, cause, &error)
                    .await?;
            }
            LeasedJob::Recovery => {
                let Ok(Event::RecoveryStarted(started)) = lapsed.started.event() else {
                    return Err(not_a_start(&lapsed.started));
                };
                let at = match &lapsed.requested {
                    Some(r) => r.at,
                    None => lapsed.started.occurred_at,
                };
                let reason = error.chain();
                tracing::error!(recovery = %lapsed.job, %reason, "recovery failed");
                record(
                    appender,
                    &streams::recovery(lapsed.job),
                    &actor,
                    cause,
                    at,
                    // The label of the failure the restore's own process records.
                    "failed",
                    lapsed.job,
                    Event::RecoveryFailed(recovery_failed(started, reason)),
                )
                .await?;
            }
        }
        self.end(lapsed.what, lapsed.job);
        Ok(())
    }

    /// Records every lapsed lease at `now`; a failure to record is logged and tried again at the
    /// next call. Returns how many were recorded.
    pub async fn record_expired(&mut self, appender: &dyn Appender, now: DateTime<Utc>) -> usize {
        let mut recorded = 0;
        for lapsed in self.expired(now) {
            tracing::warn!(job = %lapsed.job, what = %lapsed.what, host = %lapsed.host, last_seen = %lapsed.last_seen, until = %lapsed.until, "lease lapsed: recording the job as abandoned");
            match self.record(appender, &lapsed).await {
                Ok(()) => recorded += 1,
                Err(e) => {
                    tracing::warn!(job = %lapsed.job, what = %lapsed.what, error = %e.chain(), "could not record the abandoned job; trying again at the next tick");
                }
            }
        }
        recorded
    }
}

fn not_a_start(e: &Envelope) -> OpsError {
    OpsError::Invalid(format!(
        "event {} at position {} is not a readable start of a job",
        e.id, e.position
    ))
}

/// The request of a backup whose `backup.requested` the monitor never saw, rebuilt from its start
/// (the failure needs its source and attempt).
fn backup_request_from_start(started: &Envelope) -> Result<BackupRequested, OpsError> {
    let Ok(Event::BackupStarted(s)) = started.event() else {
        return Err(not_a_start(started));
    };
    Ok(BackupRequested {
        backup_id: s.backup_id,
        source: s.source,
        kind: s.kind,
        method: s.method,
        trigger: Trigger::Manual,
        attempt: 1,
    })
}

fn recovery_failed(started: RecoveryStarted, reason: String) -> RecoveryFailed {
    RecoveryFailed {
        recovery_id: started.recovery_id,
        backup_id: started.backup_id,
        operator: started.operator,
        scope: started.scope,
        reason,
    }
}

/// How often [`run_monitor`] looks at the leases: a quarter of the lease, within 100 ms..15 s.
fn tick(lease: Duration) -> Duration {
    (lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(15))
}

/// `serve`'s lease monitor on its own ledger and the wall clock, until `shutdown` (see
/// [`run_monitor_with`]).
pub async fn run_monitor(
    ledger: Ledger,
    lease: Duration,
    shutdown: watch::Receiver<bool>,
) -> Result<(), LedgerError> {
    let appender = ledger.clone();
    run_monitor_with(ledger, &appender, lease, &SYSTEM_CLOCK, shutdown).await
}

/// Follows `ledger` from its first event, and whenever it has read up to the head, records
/// every lapsed lease through `appender` at `clock`'s time; looks again every quarter of the
/// lease and when the next lease lapses. Returns when `shutdown` fires or the ledger closes; an
/// error reading the ledger is returned.
pub async fn run_monitor_with(
    ledger: Ledger,
    appender: &dyn Appender,
    lease: Duration,
    clock: &dyn Clock,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LedgerError> {
    let mut monitor = LeaseMonitor::new(lease);
    let mut sub = ledger.subscribe(1);
    let every = delta(tick(lease));
    tracing::info!(lease_seconds = lease.as_secs_f64(), "lease monitor running");
    loop {
        let caught_up = sub.position() > ledger.head().position;
        let now = clock.now();
        if caught_up {
            monitor.record_expired(appender, now).await;
        }
        let wake = match monitor.next_lapse() {
            Some(lapse) if lapse > now => lapse.min(now + every),
            _ => now + every,
        };
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            batch = sub.next_batch(1024) => {
                let batch = batch?;
                if batch.is_empty() {
                    return Ok(());
                }
                for e in &batch {
                    monitor.observe(e);
                }
            }
            _ = clock.sleep_until(wake) => {}
        }
    }
}
