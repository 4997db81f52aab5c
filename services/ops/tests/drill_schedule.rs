//! Scheduled DR drills: a `[[drills]]` schedule fires monthly (first Sunday 03:00 in its zone,
//! across DST) on an injected clock, two schedulers request one drill per slot, and the drill
//! worker's use case runs the requested drill once against real PostgreSQL servers: a
//! redelivery restores nothing, a drill found started and never completed is recorded as
//! interrupted, and a request with no plan is recorded as a failed drill. No test sleeps.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backstop_events::{
    Actor, DrillRequested, DrillStarted, Event, NewEvent, ScheduledJob, Trigger, streams,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};
use backstop_ops::OpsError;
use backstop_ops::drill::{DEFAULT_SCHEDULE, DrillPlan};
use backstop_ops::drill_request::{RequestedOutcome, VerifiedBackups, run_requested};
use backstop_ops::schedule::{self, ManualClock, Schedule};
use backstop_testkit::Postgres;
use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
}

struct Verified(HashSet<Uuid>);

#[async_trait]
impl VerifiedBackups for Verified {
    async fn verified(&self) -> Result<HashSet<Uuid>, OpsError> {
        Ok(self.0.clone())
    }
}

#[test]
fn the_default_drill_schedule_is_the_first_sunday_at_three_in_its_zone_across_dst() {
    let s = Schedule::drill("main", DEFAULT_SCHEDULE, "America/New_York").unwrap();
    assert_eq!(s.name(), "drill-main");
    assert_eq!(s.stream(), "schedule-drill-main");
    assert_eq!(s.job(), ScheduledJob::Drill);
    let next: Vec<DateTime<Utc>> = s
        .next_firings(3, utc(2027, 9, 15, 0, 0))
        .unwrap()
        .into_iter()
        .map(|f| f.utc)
        .collect();
    // 3 October 2027 03:00 EDT (-4); 7 November 03:00 EST (-5): the clocks went back at 02:00
    // that very morning; 5 December 03:00 EST.
    assert_eq!(
        next,
        [
            utc(2027, 10, 3, 7, 0),
            utc(2027, 11, 7, 8, 0),
            utc(2027, 12, 5, 8, 0)
        ]
    );
    // Another zone, another cron.
    let s = Schedule::drill("main", "30 4 * * SAT#2", "Europe/London").unwrap();
    let f = s.next_firings(1, utc(2027, 3, 1, 0, 0)).unwrap();
    assert_eq!(f[0].utc, utc(2027, 3, 13, 4, 30));
    assert!(Schedule::drill("main", "0 3 * *", "UTC").is_err());
    assert!(Schedule::drill("main", DEFAULT_SCHEDULE, "Mars/Olympus").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_drill_is_requested_once_per_slot_and_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let drill_schedule = Schedule::drill("trading", DEFAULT_SCHEDULE, "America/New_York").unwrap();

    // Two schedulers look at the slot (7 November 2027, 03:00 EST) at the same instant.
    let slot = utc(2027, 11, 7, 8, 0);
    let clock = ManualClock::new(slot + chrono::TimeDelta::seconds(5));
    let (a, b) = tokio::join!(
        schedule::tick(&drill_schedule, &ledger, &ledger, &clock),
        schedule::tick(&drill_schedule, &ledger, &ledger, &clock)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        [a.fired.is_some(), b.fired.is_some()]
            .iter()
            .filter(|x| **x)
            .count(),
        1,
        "{a:?} {b:?}"
    );
    let drill_id = schedule::drill_id_for(drill_schedule.name(), slot);
    let fired = a.fired.or(b.fired).unwrap();
    assert_eq!(fired.backup_id, drill_id);
    // A third look later finds nothing to do.
    clock.advance_to(slot + chrono::TimeDelta::minutes(30));
    let c = schedule::tick(&drill_schedule, &ledger, &ledger, &clock)
        .await
        .unwrap();
    assert!(c.fired.is_none() && c.healed.is_none(), "{c:?}");
    let claims = ledger.read_stream(&drill_schedule.stream(), 1).unwrap();
    assert_eq!(claims.len(), 1);
    let requests = ledger.read_stream(&streams::drill(drill_id), 1).unwrap();
    assert_eq!(requests.len(), 1);
    let Event::DrillRequested(request) = requests[0].event().unwrap() else {
        panic!("not a drill.requested: {}", requests[0].event_type)
    };
    assert_eq!(request.source, "trading");
    assert_eq!(
        request.trigger,
        Trigger::Schedule {
            schedule: "drill-trading".into()
        }
    );
    assert_eq!(requests[0].causation_id, Some(claims[0].id));

    // The worker's use case runs it on real servers.
    let production = Postgres::start().unwrap();
    production.create_db("trading").unwrap();
    production
        .psql(
            "trading",
            "CREATE TABLE prices (id int PRIMARY KEY, price numeric); \
             INSERT INTO prices SELECT g, g * 1.5 FROM generate_series(1, 500) g;",
        )
        .unwrap();
    let staging = Postgres::start().unwrap();
    let appender: Arc<dyn Appender> = Arc::new(ledger.clone());
    let repo = support::memory_repo().await;
    let dp = support::data_path(
        repo,
        appender.clone(),
        "trading",
        production.conninfo("trading"),
    );
    let backup = support::back_up(&dp, "trading", &Actor::operator("test")).await;
    let verified = Verified(HashSet::from([backup.backup_id]));
    let plan = DrillPlan {
        rpo: Duration::from_secs(3600),
        jobs: 1,
        ..DrillPlan::logical("trading", &staging.conninfo("drill"), "unused")
    };
    let at = requests[0].occurred_at;
    let RequestedOutcome::Ran(report) = run_requested(&dp, Some(&plan), &verified, &request, at)
        .await
        .unwrap()
    else {
        panic!("the requested drill did not run")
    };
    assert!(report.passed, "{}", report.reason);
    assert_eq!(report.drill_id, drill_id);
    assert_eq!(report.backup_id, backup.backup_id);

    // Redelivered: nothing runs, nothing is recorded.
    let again = run_requested(&dp, Some(&plan), &verified, &request, at)
        .await
        .unwrap();
    assert!(
        matches!(
            again,
            RequestedOutcome::AlreadyStarted { interrupted: false }
        ),
        "{again:?}"
    );
    let stream = ledger.read_stream(&streams::drill(drill_id), 1).unwrap();
    let types: Vec<&str> = stream.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["drill.requested", "drill.started", "drill.completed"]
    );
    assert!(
        stream[1..]
            .iter()
            .all(|e| e.actor == Actor::worker("drill"))
    );

    // A drill whose process stopped after drill.started: the redelivery completes it failed.
    let lost = Uuid::now_v7();
    let lost_request = DrillRequested {
        drill_id: lost,
        source: "trading".into(),
        trigger: Trigger::Schedule {
            schedule: "drill-trading".into(),
        },
    };
    let s = streams::drill(lost);
    let req = NewEvent::new(
        &s,
        Actor::worker("scheduler"),
        &Event::DrillRequested(lost_request.clone()),
    );
    let started = NewEvent::new(
        &s,
        Actor::worker("drill"),
        &Event::DrillStarted(DrillStarted {
            drill_id: lost,
            backup_id: backup.backup_id,
            target: "x".into(),
            source: "trading".into(),
            method: "logical".into(),
        }),
    );
    ledger
        .append(&s, ExpectedVersion::NoStream, vec![req, started])
        .await
        .unwrap();
    let out = run_requested(&dp, Some(&plan), &verified, &lost_request, at)
        .await
        .unwrap();
    assert!(
        matches!(out, RequestedOutcome::AlreadyStarted { interrupted: true }),
        "{out:?}"
    );
    let last = ledger.read_stream(&s, 3).unwrap();
    let Event::DrillCompleted(c) = last[0].event().unwrap() else {
        panic!()
    };
    assert!(
        !c.passed && c.reason.contains("interrupted"),
        "{}",
        c.reason
    );

    // A request for a source with no [[drills]] entry: a failed drill with the reason.
    let orphan = DrillRequested {
        drill_id: Uuid::now_v7(),
        source: "ghost".into(),
        trigger: Trigger::Schedule {
            schedule: "drill-ghost".into(),
        },
    };
    let s = streams::drill(orphan.drill_id);
    ledger
        .append(
            &s,
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                &s,
                Actor::worker("scheduler"),
                &Event::DrillRequested(orphan.clone()),
            )],
        )
        .await
        .unwrap();
    let out = run_requested(&dp, None, &verified, &orphan, at)
        .await
        .unwrap();
    assert!(
        matches!(&out, RequestedOutcome::Refused(r) if r.contains("no [[drills]] entry")),
        "{out:?}"
    );
    let recorded: Vec<String> = ledger
        .read_stream(&s, 1)
        .unwrap()
        .iter()
        .map(|e| e.event_type.clone())
        .collect();
    assert_eq!(
        recorded,
        ["drill.requested", "drill.started", "drill.completed"]
    );
    drop(dp);
    drop(appender);
    ledger.close().await;
}
