//! Which slot is due: a pure function of the schedule, the last slot recorded and now.
//!
//! Rules, in order:
//! - A slot is an instant the cron expression gives in the schedule's zone. Slots at or before
//!   the last recorded one have fired (or were deliberately skipped) and are never considered.
//! - Of the slots after the last recorded one and at or before now, only the **newest** can
//!   fire, and only if it is at most `grace` old; it fires once, marked late when more than
//!   [`ON_TIME`] has passed since the slot. Every older missed slot is skipped and reported, so a
//!   scheduler back after downtime never fires a burst of catch-up backups.
//! - A schedule with no recorded slot (new, or a fresh ledger) starts on time: a slot fires only
//!   if it is at most [`ON_TIME`] old, so adding a schedule does not start a backup at once.

use chrono::{DateTime, TimeDelta, Utc};
use serde::Serialize;

use super::ScheduleError;
use super::config::Schedule;

/// How long after its slot a firing still counts as on time. The scheduler wakes at the slot,
/// so anything later than this means it was not running (or the machine was stalled).
pub const ON_TIME: TimeDelta = TimeDelta::minutes(2);

/// A slot that should fire now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DueSlot {
    pub slot: DateTime<Utc>,
    /// More than [`ON_TIME`] after the slot: the scheduler was down or stalled when it came.
    pub late: bool,
}

/// Missed slots that will never fire: from `first` (inclusive) up to `before` (exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub first: DateTime<Utc>,
    pub before: DateTime<Utc>,
}

/// What a scheduler should do at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub due: Option<DueSlot>,
    pub skipped: Option<Skipped>,
    /// The next slot after now (and after the last recorded slot): when to look again.
    pub next: DateTime<Utc>,
}

/// Decides which slot (if any) is due at `now`, given the last recorded slot.
pub fn plan(
    schedule: &Schedule,
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<Plan, ScheduleError> {
    let grace = schedule.grace().as_chrono();
    // Slots strictly after `floor` are candidates.
    let floor = last.unwrap_or(now - ON_TIME);
    let next = schedule.next_after(now.max(floor))?;
    let first_missed = schedule.next_after(floor)?;
    if first_missed > now {
        return Ok(Plan {
            due: None,
            skipped: None,
            next,
        });
    }
    // The newest candidate within the grace. Walking forward from the grace's start bounds the
    // walk by the number of slots in the grace, however long the downtime was.
    let window = if last.is_some() {
        grace
    } else {
        ON_TIME.min(grace)
    };
    let oldest_allowed = now - window;
    let mut cursor = if floor >= oldest_allowed {
        schedule.next_after(floor)?
    } else {
        schedule.next_from(oldest_allowed)?
    };
    let mut newest = None;
    while cursor <= now {
        newest = Some(cursor);
        cursor = schedule.next_after(cursor)?;
    }
    let due = newest.map(|slot| DueSlot {
        slot,
        late: now - slot > ON_TIME,
    });
    let skip_until = newest.unwrap_or(next);
    let skipped = (first_missed < skip_until).then_some(Skipped {
        first: first_missed,
        before: skip_until,
    });
    Ok(Plan { due, skipped, next })
}
