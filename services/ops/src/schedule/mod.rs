//! Schedules: when backups run, of which kind, under which limits, and exactly once.
//!
//! - [`config`]: `[[schedules]]` entries ([`ScheduleConfig`]) validated into [`Schedule`]s:
//!   cron in a zone (croner + chrono-tz, DST-correct), the kind rule, the method, the grace,
//!   trading-hours [`Limits`]; [`Schedule::next_firings`] for `backstop schedule list`.
//! - [`slot`]: the pure decision of which slot is due ([`plan`]): on time, late within the
//!   grace (once), or skipped (never a burst of catch-ups).
//! - A `[[drills]]` entry is a schedule too ([`Schedule::drill`], job `drill`): its slots
//!   request `drill.requested`, which the drill worker runs.
//! - [`scheduler`]: the claim through the ledger (`schedule.fired` with an expected version on
//!   `schedule-<name>`), the `backup.requested` that follows, healing of a claim left without its
//!   request, and the [`run`] loop.
//! - [`clock`]: the injected [`Clock`] ([`SystemClock`], [`ManualClock`] for tests).
//! - [`jetstream`]: the schedule streams read from JetStream, for schedulers in `backstop worker`.
//! - [`duration`]: durations as configured (`6h`, `30d`), shared with retention.
//!
//! Invariants: a slot is identified by its UTC instant; at most one `schedule.fired` per slot
//! and schedule, and at most one backup per slot (its id derives from the schedule's name and
//! the slot); slots are claimed in increasing order, so the stream's last event is the newest
//! slot.

pub mod clock;
pub mod config;
pub mod duration;
pub mod jetstream;
pub mod scheduler;
pub mod slot;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    Firing, JobKind, KindRule, Limits, Schedule, ScheduleConfig, TradingHours, WeekdaySet,
};
pub use duration::ConfigDuration;
pub use scheduler::{
    Fired, RecordedFiring, ScheduleLog, StreamState, Tick, backup_id_for, drill_id_for,
    request_for, run, tick,
};
pub use slot::{DueSlot, ON_TIME, Plan, Skipped, plan};

use backstop_ledger::LedgerError;

/// Why a schedule could not be loaded or looked at.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "schedule name {name:?} is not usable: use 1 to 100 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
    )]
    BadName { name: String },
    #[error(
        "two schedules are named {name:?}; give each a unique name (each name is its own ledger stream)"
    )]
    DuplicateName { name: String },
    #[error("schedule {schedule}: {why}")]
    Config { schedule: String, why: String },
    #[error(
        "schedule {schedule}: cron expression {cron:?} is invalid: {why}; write five fields (minute hour day-of-month month day-of-week), such as \"0 2 * * *\""
    )]
    BadCron {
        schedule: String,
        cron: String,
        why: String,
    },
    #[error(
        "schedule {schedule}: unknown time zone {zone:?}; use an IANA zone name such as America/New_York, Europe/London or UTC"
    )]
    UnknownZone { schedule: String, zone: String },
    #[error(
        "schedule {schedule}: cron expression {cron:?} never fires ({why}); check its day-of-month and month fields"
    )]
    NoFiring {
        schedule: String,
        cron: String,
        why: String,
    },
    #[error("stream {stream} holds an unreadable event at version {version}: {why}")]
    BadRecord {
        stream: String,
        version: u64,
        why: String,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl ScheduleError {
    /// Whether looking again later may succeed (the ledger or the network was unavailable).
    pub fn is_transient(&self) -> bool {
        match self {
            ScheduleError::Ledger(e) => e.is_transient(),
            _ => false,
        }
    }
}
