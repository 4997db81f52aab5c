//! Schedules against a real ledger (sled on a temporary directory) and an injected clock: no
//! test here sleeps for real time.

use std::sync::Arc;

use backstop_events::{BackupKind, BackupMethod, Event, Trigger, streams};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};
use backstop_ops::schedule::{
    self, KindRule, ManualClock, Schedule, ScheduleConfig, ScheduleError, ScheduleLog, WeekdaySet,
};
use chrono::{DateTime, NaiveDate, TimeDelta, TimeZone, Timelike, Utc, Weekday};
use chrono_tz::America::New_York;

fn ny(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    New_York
        .with_ymd_and_hms(y, m, d, h, min, 0)
        .earliest()
        .expect("a time that exists in New York")
        .with_timezone(&Utc)
}

fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
}

fn config(toml_text: &str) -> ScheduleConfig {
    toml::from_str(toml_text).unwrap_or_else(|e| panic!("{toml_text}: {e}"))
}

fn schedule(cron: &str) -> Schedule {
    Schedule::new(config(&format!(
        "name = \"main-nightly\"\nsource = \"main\"\ncron = \"{cron}\""
    )))
    .unwrap()
}

async fn ledger(dir: &std::path::Path) -> Ledger {
    Ledger::open(&LedgerConfig::in_data_dir(dir)).unwrap()
}

/// Every `schedule.fired` of a schedule, with the `backup.requested` it led to.
fn firings(ledger: &Ledger, schedule: &Schedule) -> Vec<(DateTime<Utc>, BackupKind)> {
    let mut out = Vec::new();
    for env in ledger.read_stream(&schedule.stream(), 1).unwrap() {
        let Event::ScheduleFired(f) = env.event().unwrap() else {
            panic!("not a schedule.fired in {}", schedule.stream())
        };
        // The request exists, once, with the claim's kind and the schedule trigger.
        let backup_id = schedule::backup_id_for(schedule.name(), f.slot);
        let requested = ledger.read_stream(&streams::backup(backup_id), 1).unwrap();
        assert_eq!(
            requested.len(),
            1,
            "one backup.requested for slot {}",
            f.slot
        );
        let Event::BackupRequested(r) = requested[0].event().unwrap() else {
            panic!("not a backup.requested")
        };
        assert_eq!(r.kind, f.kind);
        assert_eq!(r.source, "main");
        assert_eq!(
            r.trigger,
            Trigger::Schedule {
                schedule: schedule.name().into()
            }
        );
        assert_eq!(requested[0].causation_id, Some(env.id));
        out.push((f.slot, f.kind));
    }
    out
}

/// Runs the scheduler loop(s) on `clock` until every one is parked past `until`.
async fn run_until(
    schedules: &[Schedule],
    ledger: &Ledger,
    clock: &ManualClock,
    until: DateTime<Utc>,
    schedulers: usize,
) {
    clock.set_horizon(Some(until));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let loops = futures::future::join_all(
        (0..schedulers).map(|_| schedule::run(schedules, ledger, ledger, clock, stopped.clone())),
    );
    let stopper = async {
        clock.wait_parked(schedulers).await;
        stop.send_replace(true);
    };
    tokio::join!(loops, stopper);
}

#[test]
fn config_defaults_and_forms() {
    let s = Schedule::new(config("name = \"n\"\nsource = \"main\"")).unwrap();
    assert_eq!(s.config().cron, "0 2 * * *");
    assert_eq!(s.zone(), New_York);
    assert_eq!(s.grace().to_string(), "6h");
    assert_eq!(s.method(), BackupMethod::Logical);
    assert_eq!(s.config().kind, KindRule::default());

    let table: &[(&str, KindRule)] = &[
        ("kind = \"full\"", KindRule::Fixed(BackupKind::Full)),
        (
            "kind = { differential = \"wed\" }",
            KindRule::Weekly {
                full: WeekdaySet::only(Weekday::Sun),
                differential: WeekdaySet::only(Weekday::Wed),
            },
        ),
        (
            "kind = { full = [\"sat\", \"sunday\"] }",
            KindRule::Weekly {
                full: WeekdaySet::only(Weekday::Sat).union(WeekdaySet::only(Weekday::Sun)),
                differential: WeekdaySet::EMPTY,
            },
        ),
    ];
    for (line, expected) in table {
        let c = config(&format!("name = \"n\"\nsource = \"main\"\n{line}"));
        assert_eq!(&c.kind, expected, "{line}");
    }
    let weekly = KindRule::Weekly {
        full: WeekdaySet::only(Weekday::Sun),
        differential: WeekdaySet::only(Weekday::Wed),
    };
    assert_eq!(weekly.kind_on(Weekday::Sun), BackupKind::Full);
    assert_eq!(weekly.kind_on(Weekday::Wed), BackupKind::Differential);
    assert_eq!(weekly.kind_on(Weekday::Thu), BackupKind::Incremental);
}

#[test]
fn bad_configurations_say_what_is_wrong() {
    // (entry, a fragment the message must contain)
    let table = [
        ("cron = \"0 2 * *\"", "cron expression"),
        ("cron = \"0 0 2 * * *\"", "cron expression"),
        ("cron = \"0 2 30 2 *\"", "never fires"),
        ("zone = \"America/Gotham\"", "unknown time zone"),
        (
            "[trading_hours]\nwindow = \"16:00-09:30\"\njobs = 1",
            "ends before it starts",
        ),
        ("[trading_hours]\nwindow = \"09:30-16:00\"", "neither"),
        ("[trading_hours]\nwindow = \"9.30-16\"\njobs = 1", "HH:MM"),
    ];
    for (line, fragment) in table {
        let c = config(&format!("name = \"n\"\nsource = \"main\"\n{line}"));
        let err = Schedule::new(c).expect_err(line).to_string();
        assert!(err.contains(fragment), "{line}: {err}");
    }
    // Refused while reading the file (with its location), not later.
    for (line, fragment) in [
        ("kind = \"weekly\"", "unknown backup kind"),
        ("kind = { full = \"sun\", differential = \"sun\" }", "both"),
        ("kind = { full = \"funday\" }", "invalid weekday"),
        ("grace = \"6 hours\"", "invalid duration"),
        ("method = \"snapshot\"", "unknown variant"),
        ("cronn = \"0 2 * * *\"", "unknown field"),
    ] {
        let text = format!("name = \"n\"\nsource = \"main\"\n{line}");
        let err = toml::from_str::<ScheduleConfig>(&text)
            .expect_err(line)
            .to_string();
        assert!(err.contains(fragment), "{line}: {err}");
    }
    let bad_name = Schedule::new(config("name = \"main nightly\"\nsource = \"main\""));
    assert!(matches!(bad_name, Err(ScheduleError::BadName { .. })));
    let twice = [
        config("name = \"a\"\nsource = \"main\""),
        config("name = \"a\"\nsource = \"other\""),
    ];
    assert!(matches!(
        Schedule::all(&twice),
        Err(ScheduleError::DuplicateName { .. })
    ));
}

#[test]
fn next_firings_in_the_zone_and_in_utc_across_spring_forward() {
    let s = schedule("0 2 * * *");
    let firings = s.next_firings(5, ny(2026, 3, 6, 12, 0)).unwrap();
    let shown: Vec<(String, String, BackupKind)> = firings
        .iter()
        .map(|f| (f.local.to_rfc3339(), f.utc.to_rfc3339(), f.kind))
        .collect();
    let expected = [
        (
            "2026-03-07T02:00:00-05:00",
            "2026-03-07T07:00:00+00:00",
            BackupKind::Incremental,
        ),
        // 02:00 does not exist on 8 March: the slot moves to the end of the gap.
        (
            "2026-03-08T03:00:00-04:00",
            "2026-03-08T07:00:00+00:00",
            BackupKind::Full,
        ),
        (
            "2026-03-09T02:00:00-04:00",
            "2026-03-09T06:00:00+00:00",
            BackupKind::Incremental,
        ),
        (
            "2026-03-10T02:00:00-04:00",
            "2026-03-10T06:00:00+00:00",
            BackupKind::Incremental,
        ),
        (
            "2026-03-11T02:00:00-04:00",
            "2026-03-11T06:00:00+00:00",
            BackupKind::Incremental,
        ),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|(l, u, k)| (l.to_string(), u.to_string(), *k))
        .collect();
    assert_eq!(shown, expected);
    assert!(firings.iter().all(|f| f.zone == "America/New_York"));
}

#[test]
fn trading_hours_limits_apply_inside_the_window_only() {
    let s = Schedule::new(config(
        "name = \"n\"\nsource = \"main\"\n[trading_hours]\nwindow = \"09:30-16:00\"\njobs = 2\nbytes_per_second = 1048576",
    ))
    .unwrap();
    let limits = schedule::Limits {
        jobs: Some(2),
        bytes_per_second: Some(1_048_576),
    };
    // 2026-06-01 is a Monday; 2026-06-06 a Saturday. Times are New York's.
    let table = [
        (ny(2026, 6, 1, 9, 29), None),
        (ny(2026, 6, 1, 9, 30), Some(limits)),
        (ny(2026, 6, 1, 15, 59), Some(limits)),
        (ny(2026, 6, 1, 16, 0), None),
        (ny(2026, 6, 5, 12, 0), Some(limits)),
        (ny(2026, 6, 6, 12, 0), None),
        // 14:00 UTC is 10:00 in New York (EDT) on a weekday: inside.
        (utc(2026, 6, 2, 14, 0), Some(limits)),
        // 14:00 UTC in January is 09:00 EST: outside.
        (utc(2026, 1, 6, 14, 0), None),
    ];
    for (at, expected) in table {
        assert_eq!(s.limits_at(at), expected, "at {at}");
    }
    assert_eq!(schedule("0 2 * * *").limits_at(ny(2026, 6, 1, 12, 0)), None);
}

#[tokio::test]
async fn a_week_fires_seven_times_full_on_sunday() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = ledger(dir.path()).await;
    let s = schedule("0 2 * * *");
    // Wednesday 2026-06-03 noon to the next Wednesday noon.
    let start = ny(2026, 6, 3, 12, 0);
    let clock = ManualClock::new(start);
    run_until(
        std::slice::from_ref(&s),
        &ledger,
        &clock,
        start + TimeDelta::days(7),
        1,
    )
    .await;
    let fired = firings(&ledger, &s);
    let expected: Vec<(DateTime<Utc>, BackupKind)> = (4..=10)
        .map(|d| {
            let slot = ny(2026, 6, d, 2, 0);
            let sunday = slot.with_timezone(&New_York).date_naive()
                == NaiveDate::from_ymd_opt(2026, 6, 7).unwrap();
            let kind = if sunday {
                BackupKind::Full
            } else {
                BackupKind::Incremental
            };
            (slot, kind)
        })
        .collect();
    assert_eq!(fired, expected);
    // On time: each claim was recorded at its slot.
    for env in ledger.read_stream(&s.stream(), 1).unwrap() {
        let Event::ScheduleFired(f) = env.event().unwrap() else {
            unreachable!()
        };
        assert!(env.occurred_at - f.slot <= schedule::ON_TIME, "{env:?}");
    }
}

#[tokio::test]
async fn dst_days_in_new_york_fire_once() {
    // (cron, the DST day, the local wall-clock time of its one firing)
    type Case = (&'static str, (i32, u32, u32), (u32, u32));
    let table: &[Case] = &[
        ("30 2 * * *", (2026, 3, 8), (3, 0)),
        ("30 1 * * *", (2026, 3, 8), (1, 30)),
        ("30 2 * * *", (2026, 11, 1), (2, 30)),
        ("30 1 * * *", (2026, 11, 1), (1, 30)),
    ];
    for &(cron, (y, m, d), (hour, minute)) in table {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger(dir.path()).await;
        let s = schedule(cron);
        let day = NaiveDate::from_ymd_opt(y, m, d).unwrap();
        let start = ny(y, m, d, 0, 0) - TimeDelta::days(1);
        let clock = ManualClock::new(start);
        run_until(
            std::slice::from_ref(&s),
            &ledger,
            &clock,
            start + TimeDelta::days(3),
            1,
        )
        .await;
        let fired = firings(&ledger, &s);
        let local_days: Vec<NaiveDate> = fired
            .iter()
            .map(|(slot, _)| slot.with_timezone(&New_York).date_naive())
            .collect();
        assert_eq!(
            local_days,
            vec![day.pred_opt().unwrap(), day, day.succ_opt().unwrap()],
            "{cron} around {day}: one firing a day"
        );
        let on_day = fired[1].0;
        // The instant croner gives for the day, and its wall-clock time.
        let croner_instant = s.next_after(ny(y, m, d, 0, 0)).unwrap();
        assert_eq!(on_day, croner_instant, "{cron} on {day}");
        let local = on_day.with_timezone(&New_York);
        assert_eq!(
            (local.hour(), local.minute()),
            (hour, minute),
            "{cron} on {day}: fired at {local}"
        );
        // On the fall-back day 01:30 happens twice; a scheduler looking at the second pass
        // (an hour after the first) fires nothing.
        if (m, hour) == (11, 1) {
            let second_pass = on_day + TimeDelta::hours(1);
            assert_eq!(second_pass.with_timezone(&New_York).hour(), 1);
            // A fresh ledger view of the same stream: the first pass is recorded.
            let clock_at = ManualClock::new(second_pass);
            let t = schedule::tick(&s, &ledger, &ledger, &clock_at)
                .await
                .unwrap();
            assert_eq!(t.fired, None, "{cron}: the repeated hour fired again");
        }
    }
}

#[tokio::test]
async fn restart_after_downtime_fires_a_missed_slot_once_within_the_grace() {
    // The scheduler fired the 2026-06-09 02:00 slot, stopped at 2026-06-10 01:59 New York, and
    // is started again at `up`. (up, slot expected to fire at once, late)
    let slot_10 = ny(2026, 6, 10, 2, 0);
    type Case = (DateTime<Utc>, Option<(DateTime<Utc>, bool)>);
    let table: &[Case] = &[
        (ny(2026, 6, 10, 2, 1), Some((slot_10, false))),
        (ny(2026, 6, 10, 5, 0), Some((slot_10, true))),
        (ny(2026, 6, 10, 7, 59), Some((slot_10, true))),
        (ny(2026, 6, 10, 8, 1), None),
        // Three days later: none of the three missed slots fires.
        (ny(2026, 6, 13, 1, 59), None),
    ];
    for &(up, expected) in table {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ledger(dir.path()).await;
        let s = schedule("0 2 * * *");
        let before = ManualClock::new(ny(2026, 6, 9, 2, 0));
        let t = schedule::tick(&s, &ledger, &ledger, &before).await.unwrap();
        assert!(t.fired.is_some());

        let clock = ManualClock::new(up);
        let t = schedule::tick(&s, &ledger, &ledger, &clock).await.unwrap();
        assert_eq!(
            t.fired.as_ref().map(|f| (f.slot, f.late)),
            expected,
            "up at {up}"
        );
        if expected.is_none() {
            let skipped = t.plan.skipped.expect("the missed slots are reported");
            assert_eq!(skipped.first, slot_10, "up at {up}");
        }
        // Looking again at once fires nothing more (never a burst).
        let again = schedule::tick(&s, &ledger, &ledger, &clock).await.unwrap();
        assert_eq!(again.fired, None, "up at {up}");
        // The next slot after coming back fires on time, as usual.
        run_until(
            std::slice::from_ref(&s),
            &ledger,
            &clock,
            t.plan.next + TimeDelta::minutes(1),
            1,
        )
        .await;
        let fired: Vec<DateTime<Utc>> = firings(&ledger, &s).into_iter().map(|f| f.0).collect();
        let mut want = vec![ny(2026, 6, 9, 2, 0)];
        want.extend(expected.map(|e| e.0));
        want.push(t.plan.next);
        assert_eq!(fired, want, "up at {up}");
    }
}

#[tokio::test]
async fn a_new_schedule_starts_with_its_next_slot() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = ledger(dir.path()).await;
    let s = schedule("0 2 * * *");
    let clock = ManualClock::new(ny(2026, 6, 10, 3, 0));
    let t = schedule::tick(&s, &ledger, &ledger, &clock).await.unwrap();
    assert_eq!(t.fired, None);
    assert_eq!(t.plan.next, ny(2026, 6, 11, 2, 0));
}

#[tokio::test]
async fn two_schedulers_on_one_ledger_fire_each_slot_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = ledger(dir.path()).await;
    let s = schedule("0 2 * * *");

    // Racing on the same read: both look at the same slot at once, every day for a week.
    let mut wins = 0;
    for d in 1..=7 {
        let clock = ManualClock::new(ny(2026, 6, d, 2, 0));
        let (a, b) = tokio::join!(
            schedule::tick(&s, &ledger, &ledger, &clock),
            schedule::tick(&s, &ledger, &ledger, &clock),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(
            [&a, &b].iter().filter(|t| t.fired.is_some()).count(),
            1,
            "{a:?} {b:?}"
        );
        let loser = if a.fired.is_some() { &b } else { &a };
        assert_eq!(loser.lost, Some(ny(2026, 6, d, 2, 0)), "{loser:?}");
        wins += 1;
    }
    assert_eq!(firings(&ledger, &s).len(), wins);

    // Two whole scheduler loops sharing the ledger and the clock for another week.
    let start = ny(2026, 6, 7, 12, 0);
    let clock = ManualClock::new(start);
    run_until(
        std::slice::from_ref(&s),
        &ledger,
        &clock,
        start + TimeDelta::days(7),
        2,
    )
    .await;
    let slots: Vec<DateTime<Utc>> = firings(&ledger, &s).into_iter().map(|f| f.0).collect();
    let want: Vec<DateTime<Utc>> = (1..=14).map(|d| ny(2026, 6, d, 2, 0)).collect();
    assert_eq!(slots, want);
}

#[tokio::test]
async fn a_claim_without_its_request_is_healed_by_the_next_look() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = ledger(dir.path()).await;
    let s = schedule("0 2 * * *");
    let slot = ny(2026, 6, 7, 2, 0);
    // A scheduler claimed the slot and died before requesting the backup.
    let claim = backstop_events::NewEvent::new(
        s.stream(),
        backstop_events::Actor::worker("scheduler"),
        &Event::ScheduleFired(backstop_events::ScheduleFired {
            schedule: s.name().into(),
            slot,
            source: "main".into(),
            kind: BackupKind::Full,
            physical: false,
            job: Default::default(),
        }),
    );
    ledger
        .append(&s.stream(), ExpectedVersion::NoStream, vec![claim])
        .await
        .unwrap();
    let backup_stream = streams::backup(schedule::backup_id_for(s.name(), slot));
    assert!(ledger.read_stream(&backup_stream, 1).unwrap().is_empty());

    let clock = ManualClock::new(slot + TimeDelta::minutes(30));
    let t = schedule::tick(&s, &ledger, &ledger, &clock).await.unwrap();
    assert_eq!(t.fired, None, "the slot is claimed: it does not fire again");
    assert_eq!(t.healed, Some(schedule::backup_id_for(s.name(), slot)));
    let again = schedule::tick(&s, &ledger, &ledger, &clock).await.unwrap();
    assert_eq!(again.healed, None);
    assert_eq!(firings(&ledger, &s), vec![(slot, BackupKind::Full)]);

    // Past the grace, a claim left alone is not requested any more (that would be catching up).
    let late_slot = ny(2026, 6, 8, 2, 0);
    let state = ScheduleLog::last_firing(&ledger, &s.stream())
        .await
        .unwrap();
    let claim = backstop_events::NewEvent::new(
        s.stream(),
        backstop_events::Actor::worker("scheduler"),
        &Event::ScheduleFired(backstop_events::ScheduleFired {
            schedule: s.name().into(),
            slot: late_slot,
            source: "main".into(),
            kind: BackupKind::Incremental,
            physical: false,
            job: Default::default(),
        }),
    );
    ledger
        .append(
            &s.stream(),
            ExpectedVersion::Exact(state.version),
            vec![claim],
        )
        .await
        .unwrap();
    let clock = ManualClock::new(late_slot + TimeDelta::hours(7));
    let t = schedule::tick(&s, &ledger, &ledger, &clock).await.unwrap();
    assert_eq!(t.healed, None);
    let missing = streams::backup(schedule::backup_id_for(s.name(), late_slot));
    assert!(ledger.read_stream(&missing, 1).unwrap().is_empty());
}

#[tokio::test]
async fn physical_schedules_request_physical_backups() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(ledger(dir.path()).await);
    let s = Schedule::new(config(
        "name = \"base\"\nsource = \"main\"\nmethod = \"physical\"\nkind = \"full\"\ncron = \"0 3 * * *\"\nzone = \"UTC\"",
    ))
    .unwrap();
    let clock = ManualClock::new(utc(2026, 6, 10, 3, 0));
    let t = schedule::tick(&s, &*ledger, &*ledger, &clock)
        .await
        .unwrap();
    let fired = t.fired.expect("on time");
    let env = &ledger
        .read_stream(&streams::backup(fired.backup_id), 1)
        .unwrap()[0];
    let Event::BackupRequested(r) = env.event().unwrap() else {
        unreachable!()
    };
    assert_eq!(r.method, BackupMethod::Physical);
    assert_eq!(r.kind, BackupKind::Full);
    let Event::ScheduleFired(f) = ledger.read_stream(&s.stream(), 1).unwrap()[0]
        .event()
        .unwrap()
    else {
        unreachable!()
    };
    assert!(f.physical);
}
