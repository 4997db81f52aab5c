//! Retention decisions and the WAL window, table-driven. Expected sets are computed here by
//! plain calendar arithmetic, never by the algorithm under test.

use std::collections::{BTreeMap, BTreeSet};

use backstop_events::{BackupKind, BackupMethod};
use backstop_ops::retention::{
    self, BaseBackup, Candidate, Class, Decision, Policy, PolicyEntry, Reason, RetentionConfig,
    Verification, decide, wal_plan,
};
use backstop_ops::schedule::ConfigDuration;
use chrono::{DateTime, Datelike, Days, NaiveDate, TimeDelta, TimeZone, Utc};
use uuid::Uuid;

fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

fn candidate(source: &str, time: DateTime<Utc>) -> Candidate {
    Candidate {
        id: Uuid::now_v7(),
        source: source.into(),
        kind: BackupKind::Full,
        method: BackupMethod::Logical,
        time,
        parent: None,
        tags: Vec::new(),
        verification: Verification::Unverified,
    }
}

fn reasons(d: &Decision) -> Vec<String> {
    d.reasons.iter().map(ToString::to_string).collect()
}

fn by_id(decisions: &[Decision]) -> BTreeMap<Uuid, &Decision> {
    decisions.iter().map(|d| (d.id, d)).collect()
}

#[test]
fn two_years_of_daily_backups_keep_exactly_the_gfs_set() {
    let first = NaiveDate::from_ymd_opt(2024, 11, 5).unwrap();
    let last = NaiveDate::from_ymd_opt(2026, 11, 30).unwrap();
    let now = at(2026, 11, 30, 20);
    // One backup at 02:00 every day, and a second one at 14:00 on every seventh day: the newest
    // backup of a day is the 14:00 one when there is one.
    let mut backups = Vec::new();
    let mut newest_on: BTreeMap<NaiveDate, Uuid> = BTreeMap::new();
    let mut day = first;
    while day <= last {
        let c = candidate("main", day.and_hms_opt(2, 0, 0).unwrap().and_utc());
        newest_on.insert(day, c.id);
        backups.push(c);
        if day.ordinal0() % 7 == 3 {
            let extra = candidate("main", day.and_hms_opt(14, 0, 0).unwrap().and_utc());
            newest_on.insert(day, extra.id);
            backups.push(extra);
        }
        day = day.succ_opt().unwrap();
    }
    assert!(backups.len() > 2 * 365);

    // Expected, rule by rule: the day each period is represented by, and the period's label.
    let mut expected: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
    let mut keep = |day: NaiveDate, reason: String| {
        expected.entry(newest_on[&day]).or_default().push(reason);
    };
    for k in 0..30 {
        let d = last - Days::new(k);
        keep(d, format!("daily {}", d.format("%Y-%m-%d")));
    }
    for k in 0..12 {
        let d = last - Days::new(7 * k);
        let sunday = d + Days::new(6 - d.weekday().num_days_from_monday() as u64);
        let w = d.iso_week();
        keep(
            sunday.min(last),
            format!("weekly {}-W{:02}", w.year(), w.week()),
        );
    }
    for k in 0..12u32 {
        let months_back = last.year() * 12 + last.month0() as i32 - k as i32;
        let (y, m0) = (
            months_back.div_euclid(12),
            months_back.rem_euclid(12) as u32,
        );
        let first_of_next = if m0 == 11 {
            NaiveDate::from_ymd_opt(y + 1, 1, 1)
        } else {
            NaiveDate::from_ymd_opt(y, m0 + 2, 1)
        }
        .unwrap();
        let end_of_month = first_of_next.pred_opt().unwrap();
        keep(end_of_month.min(last), format!("monthly {y}-{:02}", m0 + 1));
    }
    // Seven yearly periods are allowed, but only 2024, 2025 and 2026 have backups.
    for y in [2026, 2025, 2024] {
        let dec31 = NaiveDate::from_ymd_opt(y, 12, 31).unwrap();
        keep(dec31.min(last), format!("yearly {y}"));
    }

    let policy = Policy::default();
    assert_eq!(
        (
            policy.keep_daily,
            policy.keep_weekly,
            policy.keep_monthly,
            policy.keep_yearly
        ),
        (30, 12, 12, 7)
    );
    let decisions = decide(&backups, &policy, now);
    assert_eq!(decisions.len(), backups.len());
    let got: BTreeMap<Uuid, Vec<String>> = decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| (d.id, reasons(d)))
        .collect();
    assert_eq!(got, expected);
    for d in decisions.iter().filter(|d| !d.keep) {
        assert_eq!(d.reason(), "no rule keeps it");
    }
    // Shuffling the input changes nothing but the order of the answer.
    let mut reversed = backups.clone();
    reversed.reverse();
    let again = decide(&reversed, &policy, now);
    let again: BTreeMap<Uuid, Vec<String>> = again
        .iter()
        .filter(|d| d.keep)
        .map(|d| (d.id, reasons(d)))
        .collect();
    assert_eq!(again, got);
}

#[test]
fn periods_are_counted_on_the_policy_zone_calendar() {
    // 03:00 and 06:00 UTC on 1 March are 22:00 (28 February) and 01:00 (1 March) in New York.
    let early = candidate("main", at(2026, 3, 1, 3));
    let late = candidate("main", at(2026, 3, 1, 6));
    let backups = vec![early.clone(), late.clone()];
    let now = at(2026, 3, 2, 0);
    let table = [
        ("UTC", vec![(late.id, "daily 2026-03-01")]),
        (
            "America/New_York",
            vec![
                (late.id, "daily 2026-03-01"),
                (early.id, "daily 2026-02-28"),
            ],
        ),
    ];
    for (zone, kept) in table {
        let mut policy = Policy::none("t");
        policy.keep_daily = 2;
        policy.zone = zone.parse().unwrap();
        let decisions = decide(&backups, &policy, now);
        let got: BTreeSet<(Uuid, String)> = decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| (d.id, d.reason()))
            .collect();
        let want: BTreeSet<(Uuid, String)> =
            kept.into_iter().map(|(i, r)| (i, r.to_string())).collect();
        assert_eq!(got, want, "{zone}");
    }
}

#[test]
fn keep_last_within_and_tags() {
    let now = at(2026, 6, 30, 12);
    // Backups 1..=10 days old.
    let mut backups: Vec<Candidate> = (1..=10)
        .map(|d| candidate("main", now - TimeDelta::days(d)))
        .collect();
    backups[7].tags = vec!["pre-deploy".into()]; // 8 days old
    backups[9].tags = vec!["pre-deploy".into(), "other".into()]; // 10 days old
    // (policy, the ages in days kept, with their reasons)
    let mut last3 = Policy::none("last");
    last3.keep_last = 3;
    let mut within = Policy::none("within");
    within.keep_within = Some("5d".parse().unwrap());
    let mut tags = Policy::none("tags");
    tags.keep_tags = BTreeMap::from([("pre-deploy".into(), "9d".parse().unwrap())]);
    type Case = (Policy, Vec<(i64, Vec<&'static str>)>);
    let table: Vec<Case> = vec![
        (
            last3,
            vec![
                (1, vec!["last 3"]),
                (2, vec!["last 3"]),
                (3, vec!["last 3"]),
            ],
        ),
        (within, (1..=5).map(|d| (d, vec!["within 5d"])).collect()),
        (tags, vec![(8, vec!["tag pre-deploy within 9d"])]),
    ];
    for (policy, want) in table {
        let decisions = decide(&backups, &policy, now);
        let got: Vec<(i64, Vec<String>)> = decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| ((now - d.time).num_days(), reasons(d)))
            .collect();
        let want: Vec<(i64, Vec<String>)> = want
            .into_iter()
            .map(|(d, r)| (d, r.into_iter().map(String::from).collect()))
            .collect();
        assert_eq!(got, want, "{}", policy.name);
    }
}

#[test]
fn the_newest_verified_backup_is_never_removed() {
    let now = at(2026, 6, 30, 12);
    let mut old_verified = candidate("main", at(2026, 6, 1, 2));
    old_verified.verification = Verification::Passed {
        at: at(2026, 6, 1, 5),
    };
    let mut older_verified = candidate("main", at(2026, 5, 1, 2));
    older_verified.verification = Verification::Passed {
        at: at(2026, 5, 1, 5),
    };
    let newest = candidate("main", at(2026, 6, 29, 2));
    let mut policy = Policy::none("last1");
    policy.keep_last = 1;
    let decisions = decide(
        &[older_verified.clone(), old_verified.clone(), newest.clone()],
        &policy,
        now,
    );
    let d = by_id(&decisions);
    assert_eq!(reasons(d[&newest.id]), ["last 1"]);
    assert_eq!(reasons(d[&old_verified.id]), ["newest verified"]);
    assert!(!d[&older_verified.id].keep);
    // With no rule at all, the guard rail alone keeps it.
    let decisions = decide(&[old_verified.clone()], &Policy::none("none"), now);
    assert!(decisions[0].keep);
}

#[test]
fn parents_of_kept_backups_are_kept_transitively() {
    let now = at(2026, 6, 30, 12);
    let unrelated = candidate("main", at(2026, 6, 1, 2));
    let full = candidate("main", at(2026, 6, 7, 2));
    let mut diff = candidate("main", at(2026, 6, 10, 2));
    diff.kind = BackupKind::Differential;
    diff.parent = Some(full.id);
    let mut incr = candidate("main", at(2026, 6, 11, 2));
    incr.kind = BackupKind::Incremental;
    incr.parent = Some(diff.id);
    let mut policy = Policy::none("last1");
    policy.keep_last = 1;
    let decisions = decide(
        &[incr.clone(), unrelated.clone(), full.clone(), diff.clone()],
        &policy,
        now,
    );
    let d = by_id(&decisions);
    assert_eq!(reasons(d[&incr.id]), ["last 1"]);
    assert_eq!(
        reasons(d[&diff.id]),
        [format!("parent of kept {}", incr.id)]
    );
    assert_eq!(
        reasons(d[&full.id]),
        [format!("parent of kept {}", diff.id)]
    );
    assert!(!d[&unrelated.id].keep);
}

#[test]
fn nothing_is_removed_while_the_newest_verification_failed() {
    let now = at(2026, 6, 30, 12);
    let mut good = candidate("main", at(2026, 6, 1, 2));
    good.verification = Verification::Passed {
        at: at(2026, 6, 1, 5),
    };
    let mut bad = candidate("main", at(2026, 6, 20, 2));
    bad.verification = Verification::Failed {
        at: at(2026, 6, 20, 5),
    };
    let old = candidate("main", at(2026, 5, 1, 2));
    // Another source is not held by main's failure.
    let other_old = candidate("other", at(2026, 5, 1, 2));
    let other_new = candidate("other", at(2026, 6, 29, 2));
    let mut policy = Policy::none("last1");
    policy.keep_last = 1;
    let all = [
        good.clone(),
        bad.clone(),
        old.clone(),
        other_old.clone(),
        other_new.clone(),
    ];
    let decisions = decide(&all, &policy, now);
    let d = by_id(&decisions);
    let held = format!(
        "held: the newest verification of this source failed (backup {})",
        bad.id
    );
    for id in [good.id, bad.id, old.id] {
        assert!(d[&id].keep, "{id}");
        assert!(reasons(d[&id]).contains(&held), "{:?}", d[&id]);
    }
    assert!(!d[&other_old.id].keep);
    assert_eq!(reasons(d[&other_new.id]), ["last 1"]);

    // A later verification that passed (of an older backup, re-verified) lifts the hold.
    let mut reverified = good.clone();
    reverified.verification = Verification::Passed {
        at: at(2026, 6, 21, 5),
    };
    let decisions = decide(&[reverified, bad.clone(), old.clone()], &policy, now);
    let d = by_id(&decisions);
    assert!(!d[&old.id].keep);
    assert!(d.values().all(|x| {
        !x.reasons
            .iter()
            .any(|r| matches!(r, Reason::VerificationFailed { .. }))
    }));
}

#[test]
fn the_wal_window_keeps_its_base_backup() {
    let now = at(2026, 6, 30, 12);
    let mut bases: Vec<Candidate> = [1, 8, 15, 22]
        .iter()
        .map(|d| {
            let mut c = candidate("main", at(2026, 6, *d, 2));
            c.method = BackupMethod::Physical;
            c
        })
        .collect();
    bases.push(candidate("main", at(2026, 6, 20, 2))); // logical: not a WAL base
    let mut policy = Policy::none("wal");
    policy.wal_window = Some(ConfigDuration::from_days(7));
    // The window starts on 23 June 12:00; the newest physical backup at or before it is 22 June.
    let decisions = decide(&bases, &policy, now);
    let kept: Vec<(DateTime<Utc>, String)> = decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| (d.time, d.reason()))
        .collect();
    assert_eq!(
        kept,
        vec![(at(2026, 6, 22, 2), "base of the 7d WAL window".to_string())]
    );
}

fn seg(timeline: u32, n: u32) -> String {
    format!("{timeline:08X}{:08X}{n:08X}", 0)
}

fn base(day: u32, start: String, end: Option<String>, kept: bool) -> BaseBackup {
    BaseBackup {
        id: Uuid::now_v7(),
        time: at(2026, 6, day, 2),
        start_segment: start,
        end_segment: end,
        kept,
    }
}

#[test]
fn wal_window_keeps_from_the_window_base_and_what_kept_bases_need() {
    let now = at(2026, 6, 30, 12);
    let window = ConfigDuration::from_days(7);
    // Weekly base backups on timeline 1; the monthly one of 1 June is kept by retention, 8 June
    // is not, 15 and 22 June are, 29 June is.
    let monthly = base(1, seg(1, 0x10), Some(seg(1, 0x12)), true);
    let dropped = base(8, seg(1, 0x40), Some(seg(1, 0x41)), false);
    let b15 = base(15, seg(1, 0x70), Some(seg(1, 0x71)), true);
    let b22 = base(22, seg(1, 0xA0), Some(seg(1, 0xA1)), true);
    let b29 = base(29, seg(1, 0xD0), None, true);
    let bases = vec![
        b29.clone(),
        monthly.clone(),
        dropped.clone(),
        b15.clone(),
        b22.clone(),
    ];
    let plan = wal_plan(&bases, window, now).unwrap();
    assert_eq!(plan.window_base, Some(b22.id));
    assert!(plan.covered);
    assert_eq!(plan.keep_from.get(&1), Some(&seg(1, 0x10)));
    // (segment, kept)
    let table = [
        (seg(1, 0x0F), false),
        (seg(1, 0x10), true), // the monthly base's own WAL
        (seg(1, 0x12), true),
        (seg(1, 0x13), false),
        (seg(1, 0x40), false), // the dropped base needs nothing
        (seg(1, 0x70), true),  // 15 June's base
        (seg(1, 0x71), true),
        (seg(1, 0x72), false),
        (seg(1, 0x9F), false),
        (seg(1, 0xA0), true), // the window base: everything from here
        (seg(1, 0xC3), true),
        (seg(1, 0xFFF), true),
        (seg(2, 0x05), true), // a later timeline branches after the base
        ("00000002.history".to_string(), true),
        (format!("{}.00000028.backup", seg(1, 0x01)), true),
        ("not-wal".to_string(), true),
    ];
    for (name, kept) in table {
        assert_eq!(plan.keeps(&name), kept, "{name}");
    }

    // A kept base whose end is unknown keeps everything after its start.
    let unknown_end = base(1, seg(1, 0x10), None, true);
    let plan = wal_plan(&[unknown_end, b22.clone()], window, now).unwrap();
    assert!(plan.keeps(&seg(1, 0x50)));
    assert!(!plan.keeps(&seg(1, 0x0F)));

    // All kept bases younger than the window: the oldest one is the base, and the window's
    // start is not covered.
    let plan = wal_plan(std::slice::from_ref(&b29), window, now).unwrap();
    assert_eq!(plan.window_base, Some(b29.id));
    assert!(!plan.covered);
    assert!(!plan.keeps(&seg(1, 0xCF)));
    assert!(plan.keeps(&seg(1, 0xD0)));

    // No kept base at all: nothing is deleted.
    let plan = wal_plan(std::slice::from_ref(&dropped), window, now).unwrap();
    assert_eq!(plan.window_base, None);
    assert!(plan.keeps(&seg(1, 0x00)));

    // A damaged segment name is refused with the backup named.
    let mut broken = b22.clone();
    broken.start_segment = "0000000100000000000000a0".into();
    let err = wal_plan(&[broken], window, now).unwrap_err();
    assert!(
        matches!(err, retention::RetentionError::BadSegment { .. }),
        "{err}"
    );
}

#[test]
fn policies_resolve_per_source_and_class_with_the_seed_defaults() {
    let entries: Vec<PolicyEntry> = toml::from_str::<BTreeMap<String, Vec<PolicyEntry>>>(
        r#"
        [[retention]]
        keep_daily = 14
        zone = "America/New_York"

        [[retention]]
        source = "main"
        keep_last = 3
        keep_tags = { pre-deploy = "60d" }

        [[retention]]
        class = "exports"
        source = "main"
        keep_within = "120d"
        "#,
    )
    .unwrap()
    .remove("retention")
    .unwrap();
    let config = RetentionConfig::new(entries).unwrap();

    let main = config.policy("main", Class::Backups);
    assert_eq!(main.name, "backups/main");
    assert_eq!(
        (
            main.keep_last,
            main.keep_daily,
            main.keep_weekly,
            main.keep_monthly,
            main.keep_yearly
        ),
        (3, 14, 12, 12, 7)
    );
    assert_eq!(main.zone.name(), "America/New_York");
    assert_eq!(main.keep_tags["pre-deploy"].to_string(), "60d");
    assert_eq!(main.wal_window, Some(ConfigDuration::from_days(7)));

    let other = config.policy("other", Class::Backups);
    assert_eq!(other.name, "backups/*");
    assert_eq!((other.keep_last, other.keep_daily), (0, 14));
    assert_eq!(other.keep_tags["pre-deploy"].to_string(), "30d");

    let table = [
        ("main", Class::Exports, "120d"),
        ("other", Class::Exports, "90d"),
        ("main", Class::Configuration, "180d"),
    ];
    for (source, class, within) in table {
        let p = config.policy(source, class);
        assert_eq!(
            p.keep_within.map(|d| d.to_string()).as_deref(),
            Some(within),
            "{source} {class}"
        );
        assert_eq!(p.keep_daily, 0, "{source} {class}: no GFS on {class}");
    }
    assert!(main.describe().contains("daily 14"), "{}", main.describe());

    // Refused: unknown zones, duplicates, a WAL window on exports, unknown keys.
    let bad = |text: &str| -> String {
        match toml::from_str::<BTreeMap<String, Vec<PolicyEntry>>>(text) {
            Err(e) => e.to_string(),
            Ok(mut m) => RetentionConfig::new(m.remove("retention").unwrap())
                .unwrap_err()
                .to_string(),
        }
    };
    for (text, fragment) in [
        (
            "[[retention]]\nzone = \"Mars/Olympus\"",
            "unknown time zone",
        ),
        (
            "[[retention]]\nkeep_daily = 1\n[[retention]]\nkeep_weekly = 1",
            "merge them",
        ),
        (
            "[[retention]]\nclass = \"exports\"\nwal_window = \"7d\"",
            "WAL window",
        ),
        ("[[retention]]\nkeep_dayly = 3", "unknown field"),
        (
            "[[retention]]\nkeep_within = \"3 months\"",
            "invalid duration",
        ),
    ] {
        let err = bad(text);
        assert!(err.contains(fragment), "{text}: {err}");
    }
}
