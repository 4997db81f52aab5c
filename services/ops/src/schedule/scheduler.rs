//! Firing slots exactly once through the ledger, however many schedulers run.
//!
//! A firing is two appends:
//!
//! 1. **The claim**: `schedule.fired {schedule, slot, source, kind, physical}` appended to the
//!    stream `schedule-<name>` with the expected version this scheduler read. Two schedulers that
//!    read the same version race; the ledger's optimistic concurrency lets exactly one append
//!    and gives the other [`LedgerError::Conflict`], after which it does nothing for that slot.
//! 2. **The request**: `backup.requested` (trigger `schedule`) on `backup-<backup_id>`, where the
//!    backup id and the event id are derived from the schedule's name and the slot, and every
//!    other field from the claim (its id as correlation and causation, its time as occurred-at).
//!    Anyone can therefore rebuild the identical event from the claim alone, and the ledger's
//!    idempotency by event id stores it once. An export schedule (`job = "export"`, recorded in
//!    the claim) requests `export.requested` on `export-<export_id>` the same way, and a drill
//!    schedule (`[[drills]]`, job `drill`) `drill.requested` on `drill-<drill_id>`.
//!
//! A crash between the two appends is healed by whoever reads the stream next (the same
//! scheduler after a restart, or another one at its next look, and at once by a scheduler that
//! lost the race): if the last claim's request is missing and the slot is still within the
//! grace, it appends it. A claim older than the grace is not requested any more (that would be a
//! catch-up backup); it is logged as an error instead.
//!
//! Lateness: `schedule.fired` has no `late` field, so a late firing is the one whose envelope
//! `occurred_at` is more than [`super::ON_TIME`] after its `slot`; [`Tick::fired`] says so too.

use async_trait::async_trait;
use backstop_events::{
    Actor, BackupMethod, BackupRequested, DrillRequested, Event, ExportRequested, NewEvent,
    ScheduleFired, ScheduledJob, Trigger, streams, uuid_v7_derived,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerError};
use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

use super::ScheduleError;
use super::clock::Clock;
use super::config::Schedule;
use super::slot::{Plan, plan};

/// The actor of every event the scheduler appends.
pub const SCHEDULER_ACTOR: &str = "scheduler";
/// How soon a schedule is looked at again after a transient failure (ledger busy, NATS down).
pub const RETRY_TRANSIENT: TimeDelta = TimeDelta::seconds(30);
/// How soon after any other failure (an unreadable record): it is logged each time.
pub const RETRY_BROKEN: TimeDelta = TimeDelta::minutes(5);

/// What a scheduler reads from the ledger. [`Ledger`] implements it in-process; a scheduler on
/// another machine implements it over whatever read path it has (the API, a JetStream replay).
#[async_trait]
pub trait ScheduleLog: Send + Sync {
    /// The stream's current version and its newest `schedule.fired`. The version must be read
    /// no earlier than that event, so that an append expecting it fails if anything came after.
    async fn last_firing(&self, stream: &str) -> Result<StreamState, ScheduleError>;
    /// Whether an event with this id is in the ledger.
    async fn contains(&self, event_id: Uuid) -> Result<bool, ScheduleError>;
}

/// A schedule stream as a scheduler last read it.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamState {
    pub version: u64,
    pub last: Option<RecordedFiring>,
}

/// A claimed slot, as recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedFiring {
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub fired: ScheduleFired,
}

#[async_trait]
impl ScheduleLog for Ledger {
    async fn last_firing(&self, stream: &str) -> Result<StreamState, ScheduleError> {
        let store = self.store();
        let version = store.stream_version(stream)?;
        // Only `schedule.fired` belongs in a schedule stream, but walk back past anything else
        // rather than lose track of the last slot.
        let mut v = version;
        while v > 0 {
            let Some(env) = store.stream(stream, v, 1)?.into_iter().next() else {
                return Err(ScheduleError::BadRecord {
                    stream: stream.to_string(),
                    version: v,
                    why: "the stream index names a version with no event".into(),
                });
            };
            if env.event_type == "schedule.fired" {
                return match env.event() {
                    Ok(Event::ScheduleFired(fired)) => Ok(StreamState {
                        version,
                        last: Some(RecordedFiring {
                            event_id: env.id,
                            occurred_at: env.occurred_at,
                            fired,
                        }),
                    }),
                    Ok(_) => unreachable_type(stream, v),
                    Err(e) => Err(ScheduleError::BadRecord {
                        stream: stream.to_string(),
                        version: v,
                        why: e.to_string(),
                    }),
                };
            }
            v -= 1;
        }
        Ok(StreamState {
            version,
            last: None,
        })
    }

    async fn contains(&self, event_id: Uuid) -> Result<bool, ScheduleError> {
        Ok(self.store().position_of(event_id)?.is_some())
    }
}

fn unreachable_type(stream: &str, version: u64) -> Result<StreamState, ScheduleError> {
    Err(ScheduleError::BadRecord {
        stream: stream.to_string(),
        version,
        why: "an event typed schedule.fired decoded as another type".into(),
    })
}

/// A slot this scheduler claimed and requested.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fired {
    pub slot: DateTime<Utc>,
    pub late: bool,
    /// The backup requested (or, for an export schedule, the export).
    pub backup_id: Uuid,
    pub claim_id: Uuid,
}

/// What one look at a schedule did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tick {
    pub plan: Plan,
    /// This scheduler won the slot and requested its backup.
    pub fired: Option<Fired>,
    /// Another scheduler claimed this slot first; this one did nothing for it.
    pub lost: Option<DateTime<Utc>>,
    /// A backup this look requested for a claim whose request was missing (a crash between the
    /// two appends, or the race's winner not yet done).
    pub healed: Option<Uuid>,
}

/// The backup id a schedule's slot requests: the same for every scheduler.
pub fn backup_id_for(schedule: &str, slot: DateTime<Utc>) -> Uuid {
    uuid_v7_derived(
        Uuid::nil(),
        slot,
        &format!("schedule:{schedule}:{}:backup", slot.to_rfc3339()),
    )
}

/// The export id a schedule's slot requests (`job = "export"`): the same for every scheduler.
pub fn export_id_for(schedule: &str, slot: DateTime<Utc>) -> Uuid {
    uuid_v7_derived(
        Uuid::nil(),
        slot,
        &format!("schedule:{schedule}:{}:export", slot.to_rfc3339()),
    )
}

/// The drill id a drill schedule's slot requests (`[[drills]]`): the same for every scheduler.
pub fn drill_id_for(schedule: &str, slot: DateTime<Utc>) -> Uuid {
    uuid_v7_derived(
        Uuid::nil(),
        slot,
        &format!("schedule:{schedule}:{}:drill", slot.to_rfc3339()),
    )
}

/// The request a recorded claim stands for (`backup.requested`, or `export.requested` for an
/// export schedule), identical whoever builds it, with the id of the backup or export.
pub fn request_for(claim: &RecordedFiring) -> (Uuid, NewEvent) {
    let f = &claim.fired;
    let trigger = Trigger::Schedule {
        schedule: f.schedule.clone(),
    };
    let (job_id, stream, event, step) = match &f.job {
        ScheduledJob::Backup => {
            let backup_id = backup_id_for(&f.schedule, f.slot);
            let event = Event::BackupRequested(BackupRequested {
                backup_id,
                source: f.source.clone(),
                kind: f.kind,
                method: if f.physical {
                    BackupMethod::Physical
                } else {
                    BackupMethod::Logical
                },
                trigger,
                attempt: 1,
            });
            (
                backup_id,
                streams::backup(backup_id),
                event,
                "backup.requested",
            )
        }
        ScheduledJob::Export { tables } => {
            let export_id = export_id_for(&f.schedule, f.slot);
            let event = Event::ExportRequested(ExportRequested {
                export_id,
                source: f.source.clone(),
                tables: tables.clone(),
                trigger,
            });
            (
                export_id,
                streams::export(export_id),
                event,
                "export.requested",
            )
        }
        ScheduledJob::Drill => {
            let drill_id = drill_id_for(&f.schedule, f.slot);
            let event = Event::DrillRequested(DrillRequested {
                drill_id,
                source: f.source.clone(),
                trigger,
            });
            (drill_id, streams::drill(drill_id), event, "drill.requested")
        }
    };
    let mut e = NewEvent::new(stream, Actor::worker(SCHEDULER_ACTOR), &event);
    e.id = uuid_v7_derived(job_id, f.slot, step);
    e.occurred_at = claim.occurred_at;
    e.correlation_id = claim.event_id;
    e.causation_id = Some(claim.event_id);
    (job_id, e)
}

async fn append_request(
    appender: &dyn Appender,
    claim: &RecordedFiring,
) -> Result<Uuid, ScheduleError> {
    let (backup_id, e) = request_for(claim);
    let stream = e.stream.clone();
    appender
        .append(&stream, ExpectedVersion::NoStream, vec![e])
        .await?;
    Ok(backup_id)
}

/// Appends the request of the last claim if it is missing and its slot is within the grace.
async fn heal(
    schedule: &Schedule,
    appender: &dyn Appender,
    log: &dyn ScheduleLog,
    claim: &RecordedFiring,
    now: DateTime<Utc>,
) -> Result<Option<Uuid>, ScheduleError> {
    let (backup_id, e) = request_for(claim);
    if log.contains(e.id).await? {
        return Ok(None);
    }
    if now - claim.fired.slot > schedule.grace().as_chrono() {
        tracing::error!(
            schedule = schedule.name(), slot = %claim.fired.slot, %backup_id,
            "a claimed slot never had its backup requested, and it is past the grace; not requesting it now"
        );
        return Ok(None);
    }
    append_request(appender, claim).await?;
    tracing::warn!(
        schedule = schedule.name(), slot = %claim.fired.slot, %backup_id,
        "requested the backup of a slot claimed without its request (a scheduler stopped between the two appends)"
    );
    Ok(Some(backup_id))
}

/// Looks at one schedule once: heals the last claim, then claims and requests the due slot if
/// there is one. Safe to call from any number of schedulers at once.
pub async fn tick(
    schedule: &Schedule,
    appender: &dyn Appender,
    log: &dyn ScheduleLog,
    clock: &dyn Clock,
) -> Result<Tick, ScheduleError> {
    let now = clock.now().trunc_subsecs(6);
    let stream = schedule.stream();
    let state = log.last_firing(&stream).await?;
    let mut healed = None;
    if let Some(claim) = &state.last {
        healed = heal(schedule, appender, log, claim, now).await?;
    }
    let plan = plan(schedule, state.last.as_ref().map(|c| c.fired.slot), now)?;
    if let Some(s) = plan.skipped {
        tracing::warn!(
            schedule = schedule.name(), first = %s.first, before = %s.before,
            grace = %schedule.grace(),
            "missed slots skipped: they are older than the grace (no catch-up backups)"
        );
    }
    let mut tick = Tick {
        plan,
        fired: None,
        lost: None,
        healed,
    };
    let Some(due) = plan.due else {
        return Ok(tick);
    };
    let fired = ScheduleFired {
        schedule: schedule.name().to_string(),
        slot: due.slot,
        source: schedule.source().to_string(),
        kind: schedule.kind_at(due.slot),
        physical: schedule.method() == BackupMethod::Physical,
        job: schedule.job(),
    };
    let mut claim = NewEvent::new(
        &stream,
        Actor::worker(SCHEDULER_ACTOR),
        &Event::ScheduleFired(fired.clone()),
    );
    claim.occurred_at = now;
    let expected = match state.version {
        0 => ExpectedVersion::NoStream,
        v => ExpectedVersion::Exact(v),
    };
    match appender
        .append(&stream, expected, vec![claim.clone()])
        .await
    {
        Ok(_) => {
            let recorded = RecordedFiring {
                event_id: claim.id,
                occurred_at: claim.occurred_at,
                fired,
            };
            let backup_id = append_request(appender, &recorded).await?;
            if due.late {
                tracing::warn!(
                    schedule = schedule.name(), slot = %due.slot, %backup_id,
                    late_by = %(now - due.slot), "missed slot fired late (within the grace)"
                );
            } else {
                tracing::info!(schedule = schedule.name(), slot = %due.slot, %backup_id, "slot fired");
            }
            tick.fired = Some(Fired {
                slot: due.slot,
                late: due.late,
                backup_id,
                claim_id: claim.id,
            });
        }
        Err(LedgerError::Conflict { .. }) => {
            tracing::debug!(schedule = schedule.name(), slot = %due.slot, "slot claimed by another scheduler");
            tick.lost = Some(due.slot);
            // The winner may stop before its request: make sure it exists.
            if let Some(claim) = log.last_firing(&stream).await?.last {
                tick.healed = heal(schedule, appender, log, &claim, now).await?;
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(tick)
}

/// Runs every schedule until `shutdown` turns true (or its sender is dropped).
///
/// Each schedule is looked at when its next slot comes (and once at start, which heals a claim
/// left without its request and fires a missed slot within the grace). Failures are logged and
/// the schedule is looked at again later ([`RETRY_TRANSIENT`], [`RETRY_BROKEN`]); they never stop
/// the other schedules.
pub async fn run(
    schedules: &[Schedule],
    appender: &dyn Appender,
    log: &dyn ScheduleLog,
    clock: &dyn Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    if schedules.is_empty() {
        return;
    }
    let mut next: Vec<DateTime<Utc>> = vec![clock.now(); schedules.len()];
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        let now = clock.now();
        for (i, schedule) in schedules.iter().enumerate() {
            if next[i] > now {
                continue;
            }
            next[i] = match tick(schedule, appender, log, clock).await {
                Ok(t) => t.plan.next,
                Err(e) if e.is_transient() => {
                    tracing::warn!(schedule = schedule.name(), error = %e, "schedule look failed; retrying");
                    now + RETRY_TRANSIENT
                }
                Err(e) => {
                    tracing::error!(schedule = schedule.name(), error = %e, "schedule look failed");
                    now + RETRY_BROKEN
                }
            };
        }
        let wake = next.iter().copied().min().unwrap_or(now + RETRY_BROKEN);
        tokio::select! {
            _ = clock.sleep_until(wake) => {}
            changed = shutdown.changed() => if changed.is_err() { return },
        }
    }
}
