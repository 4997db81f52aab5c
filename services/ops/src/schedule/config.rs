//! Schedules as configured (`[[schedules]]`), validated into [`Schedule`]s.
//!
//! ```toml
//! [[schedules]]
//! name = "main-nightly"          # stream `schedule-main-nightly`; [A-Za-z0-9._-], at most 100
//! source = "main"
//! cron = "0 2 * * *"             # default; five fields, croner syntax (L, #, W, MON-FRI...)
//! zone = "America/New_York"      # default; any IANA zone name
//! kind = { full = "sun", differential = "wed" }  # default full = "sun"; other days incremental
//! # kind = "full"                # or one kind on every slot
//! method = "logical"             # default; or "physical"
//! grace = "6h"                   # default: how late a missed slot may still fire
//! job = "backup"                 # default; "export": a table export (tables = [...], all
//!                                # by default) instead of a backup; kind and method unused
//! [schedules.trading_hours]      # optional
//! days = "mon-fri"               # default
//! window = "09:30-16:00"         # local time in `zone`, start inclusive, end exclusive
//! jobs = 2                       # at most this many parallel jobs inside the window
//! bytes_per_second = 20971520    # bandwidth cap inside the window
//! ```
//!
//! Invariants: the kind of a slot is decided by the slot's weekday *in the schedule's zone* (a
//! Sunday 02:00 New York slot is a full backup although it is Sunday 06:00 or 07:00 in UTC);
//! firings come from croner, which moves a fixed-time slot that falls into a spring-forward gap
//! to the first instant after the gap and fires a slot in a repeated fall-back hour once, at its
//! first pass.

use std::fmt;
use std::str::FromStr;

use backstop_events::{BackupKind, BackupMethod};
use chrono::{DateTime, Datelike, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Serialize};

use super::ScheduleError;
use super::duration::ConfigDuration;

pub const DEFAULT_CRON: &str = "0 2 * * *";
pub const DEFAULT_ZONE: &str = "America/New_York";
pub const DEFAULT_GRACE: ConfigDuration = ConfigDuration::from_hours(6);
/// Longest schedule name: `schedule-` plus the name must stay a valid stream id, with room.
pub const MAX_NAME_LEN: usize = 100;

/// One `[[schedules]]` entry as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub name: String,
    pub source: String,
    #[serde(default = "default_cron")]
    pub cron: String,
    #[serde(default = "default_zone")]
    pub zone: String,
    #[serde(default)]
    pub kind: KindRule,
    #[serde(default)]
    pub method: BackupMethod,
    #[serde(default = "default_grace")]
    pub grace: ConfigDuration,
    #[serde(default)]
    pub trading_hours: Option<TradingHours>,
    /// What a slot runs (default: a backup).
    #[serde(default)]
    pub job: JobKind,
    /// `job = "export"`: the tables to export (default: every table).
    #[serde(default)]
    pub tables: Vec<String>,
}

/// `[[schedules]] job = ...`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    #[default]
    Backup,
    Export,
    /// A DR drill of the source: built from a `[[drills]]` entry ([`Schedule::drill`]), not
    /// written in `[[schedules]]`.
    Drill,
}

fn default_cron() -> String {
    DEFAULT_CRON.to_string()
}
fn default_zone() -> String {
    DEFAULT_ZONE.to_string()
}
fn default_grace() -> ConfigDuration {
    DEFAULT_GRACE
}

/// A set of weekdays, written `"sun"`, `"mon-fri"`, `"mon,wed,fri"` or a list of those.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WeekdaySet(u8);

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl WeekdaySet {
    pub const EMPTY: WeekdaySet = WeekdaySet(0);
    pub const MON_FRI: WeekdaySet = WeekdaySet(0b0001_1111);

    pub fn only(day: Weekday) -> WeekdaySet {
        WeekdaySet(1 << day.num_days_from_monday())
    }
    pub fn contains(&self, day: Weekday) -> bool {
        self.0 & (1 << day.num_days_from_monday()) != 0
    }
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
    pub fn union(self, other: WeekdaySet) -> WeekdaySet {
        WeekdaySet(self.0 | other.0)
    }
    pub fn intersects(&self, other: WeekdaySet) -> bool {
        self.0 & other.0 != 0
    }
    fn days(&self) -> impl Iterator<Item = &'static str> + '_ {
        (0..7)
            .filter(|i| self.0 & (1 << i) != 0)
            .map(|i| DAY_NAMES[i])
    }
}

fn parse_day(s: &str) -> Option<u8> {
    let lower = s.trim().to_ascii_lowercase();
    let prefix = lower.get(..3)?;
    let i = DAY_NAMES.iter().position(|d| *d == prefix)?;
    // Accept `sun` and `sunday`, not `sunflower`.
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    (lower.len() == 3 || lower == FULL[i]).then_some(i as u8)
}

impl FromStr for WeekdaySet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |part: &str| {
            format!(
                "invalid weekday {part:?} in {s:?}: write days as mon, tue, ... sun, ranges as mon-fri, lists as mon,wed"
            )
        };
        let mut set = 0u8;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (
                        parse_day(a).ok_or_else(|| bad(part))?,
                        parse_day(b).ok_or_else(|| bad(part))?,
                    );
                    // A range may wrap over the week's end: `sat-mon`.
                    let mut i = a;
                    loop {
                        set |= 1 << i;
                        if i == b {
                            break;
                        }
                        i = (i + 1) % 7;
                    }
                }
                None => set |= 1 << parse_day(part).ok_or_else(|| bad(part))?,
            }
        }
        Ok(WeekdaySet(set))
    }
}

impl fmt::Display for WeekdaySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days: Vec<_> = self.days().collect();
        f.write_str(&days.join(","))
    }
}

impl fmt::Debug for WeekdaySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WeekdaySet({self})")
    }
}

impl Serialize for WeekdaySet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WeekdaySet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(String),
            Many(Vec<String>),
        }
        let joined = match Form::deserialize(d)
            .map_err(|_| serde::de::Error::custom("weekdays must be a string such as \"mon-fri\" or a list such as [\"sat\", \"sun\"]"))?
        {
            Form::One(s) => s,
            Form::Many(v) => v.join(","),
        };
        joined.parse().map_err(serde::de::Error::custom)
    }
}

/// Which kind of backup a slot takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KindRule {
    /// Every slot takes this kind (`kind = "full"`).
    Fixed(BackupKind),
    /// By the slot's weekday in the schedule's zone: `full` days, `differential` days, and
    /// incremental on the others (`kind = { full = "sun", differential = "wed" }`).
    Weekly {
        full: WeekdaySet,
        differential: WeekdaySet,
    },
}

impl Default for KindRule {
    fn default() -> Self {
        KindRule::Weekly {
            full: WeekdaySet::only(Weekday::Sun),
            differential: WeekdaySet::EMPTY,
        }
    }
}

impl KindRule {
    pub fn kind_on(&self, day: Weekday) -> BackupKind {
        match self {
            KindRule::Fixed(k) => *k,
            KindRule::Weekly { full, .. } if full.contains(day) => BackupKind::Full,
            KindRule::Weekly { differential, .. } if differential.contains(day) => {
                BackupKind::Differential
            }
            KindRule::Weekly { .. } => BackupKind::Incremental,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeeklyForm {
    #[serde(default = "sunday")]
    full: WeekdaySet,
    #[serde(default)]
    differential: WeekdaySet,
}

fn sunday() -> WeekdaySet {
    WeekdaySet::only(Weekday::Sun)
}

impl Serialize for KindRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            KindRule::Fixed(k) => k.serialize(s),
            KindRule::Weekly { full, differential } => WeeklyForm {
                full: *full,
                differential: *differential,
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for KindRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = KindRule;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a kind (\"full\", \"incremental\" or \"differential\") or a table such as { full = \"sun\", differential = \"wed\" }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<KindRule, E> {
                s.parse().map(KindRule::Fixed).map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<KindRule, A::Error> {
                let w = WeeklyForm::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                if w.full.intersects(w.differential) {
                    return Err(serde::de::Error::custom(format!(
                        "the kind rule names {} both as full and as differential days; give each day one kind",
                        WeekdaySet(w.full.0 & w.differential.0)
                    )));
                }
                Ok(KindRule::Weekly {
                    full: w.full,
                    differential: w.differential,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Limits during trading hours (seed 000 R10.3): fewer jobs and a bandwidth cap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TradingHours {
    #[serde(default = "mon_fri")]
    pub days: WeekdaySet,
    /// `HH:MM-HH:MM`, local time in the schedule's zone; start inclusive, end exclusive.
    pub window: String,
    #[serde(default)]
    pub jobs: Option<u32>,
    #[serde(default)]
    pub bytes_per_second: Option<u64>,
}

fn mon_fri() -> WeekdaySet {
    WeekdaySet::MON_FRI
}

/// What a backup running at an instant inside trading hours must respect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// At most this many parallel jobs (`None`: no limit on jobs).
    pub jobs: Option<u32>,
    /// At most this many bytes per second to and from the store (`None`: no cap).
    pub bytes_per_second: Option<u64>,
}

#[derive(Clone, Debug)]
struct Window {
    days: WeekdaySet,
    start: NaiveTime,
    end: NaiveTime,
    limits: Limits,
}

/// A validated schedule: its cron parsed, its zone resolved.
#[derive(Clone, Debug)]
pub struct Schedule {
    config: ScheduleConfig,
    cron: Cron,
    zone: Tz,
    window: Option<Window>,
}

/// One firing of a schedule, as `backstop schedule list` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Firing {
    pub schedule: String,
    pub source: String,
    /// The slot as an instant: the identity of the firing in the ledger.
    pub utc: DateTime<Utc>,
    /// The same instant on the schedule's wall clock, with its offset (`-05:00` or `-04:00`).
    pub local: DateTime<chrono::FixedOffset>,
    pub zone: String,
    pub kind: BackupKind,
    pub method: BackupMethod,
}

impl Schedule {
    /// Validates one entry: name, cron expression, zone and trading hours.
    pub fn new(config: ScheduleConfig) -> Result<Schedule, ScheduleError> {
        let name = config.name.clone();
        let name_ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !name_ok {
            return Err(ScheduleError::BadName { name });
        }
        if config.source.trim().is_empty() {
            return Err(ScheduleError::Config {
                schedule: name,
                why: "`source` is empty; name the source this schedule backs up".into(),
            });
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(&config.cron)
            .map_err(|e| ScheduleError::BadCron {
                schedule: name.clone(),
                cron: config.cron.clone(),
                why: e.to_string(),
            })?;
        let zone: Tz = config
            .zone
            .parse()
            .map_err(|_| ScheduleError::UnknownZone {
                schedule: name.clone(),
                zone: config.zone.clone(),
            })?;
        if config.job == JobKind::Backup && !config.tables.is_empty() {
            return Err(ScheduleError::Config {
                schedule: name,
                why: "`tables` is for exports; add `job = \"export\"` or remove `tables`".into(),
            });
        }
        if config.job == JobKind::Export && config.trading_hours.is_some() {
            return Err(ScheduleError::Config {
                schedule: name,
                why: "trading hours limit backups; an export schedule has none (remove `[schedules.trading_hours]`)".into(),
            });
        }
        if config.job == JobKind::Drill
            && (!config.tables.is_empty() || config.trading_hours.is_some())
        {
            return Err(ScheduleError::Config {
                schedule: name,
                why: "a drill schedule takes neither `tables` nor trading hours".into(),
            });
        }
        let window = match &config.trading_hours {
            None => None,
            Some(t) => Some(parse_window(&name, t)?),
        };
        let schedule = Schedule {
            config,
            cron,
            zone,
            window,
        };
        // A pattern such as `0 2 30 2 *` (30 February) parses but never fires: say so now
        // rather than leaving a schedule that silently does nothing.
        schedule.next_after(Utc::now())?;
        Ok(schedule)
    }

    /// The schedule of a `[[drills]]` entry: named `drill-<source>` (its stream
    /// `schedule-drill-<source>`), firing `cron` in `zone` with the default grace; each slot
    /// requests one drill of `source`.
    pub fn drill(source: &str, cron: &str, zone: &str) -> Result<Schedule, ScheduleError> {
        Schedule::new(ScheduleConfig {
            name: format!("drill-{source}"),
            source: source.to_string(),
            cron: cron.to_string(),
            zone: zone.to_string(),
            kind: KindRule::Fixed(BackupKind::Full),
            method: BackupMethod::Logical,
            grace: DEFAULT_GRACE,
            trading_hours: None,
            job: JobKind::Drill,
            tables: Vec::new(),
        })
    }

    /// Validates every entry, refusing two schedules with the same name (they would share one
    /// stream and claim each other's slots).
    pub fn all(configs: &[ScheduleConfig]) -> Result<Vec<Schedule>, ScheduleError> {
        let mut out: Vec<Schedule> = Vec::with_capacity(configs.len());
        for c in configs {
            if out.iter().any(|s| s.name() == c.name) {
                return Err(ScheduleError::DuplicateName {
                    name: c.name.clone(),
                });
            }
            out.push(Schedule::new(c.clone())?);
        }
        Ok(out)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }
    pub fn source(&self) -> &str {
        &self.config.source
    }
    pub fn zone(&self) -> Tz {
        self.zone
    }
    pub fn method(&self) -> BackupMethod {
        self.config.method
    }
    /// What this schedule's slots run.
    pub fn job(&self) -> backstop_events::ScheduledJob {
        match self.config.job {
            JobKind::Backup => backstop_events::ScheduledJob::Backup,
            JobKind::Export => backstop_events::ScheduledJob::Export {
                tables: self.config.tables.clone(),
            },
            JobKind::Drill => backstop_events::ScheduledJob::Drill,
        }
    }
    pub fn grace(&self) -> ConfigDuration {
        self.config.grace
    }
    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// The ledger stream whose version claims this schedule's slots.
    pub fn stream(&self) -> String {
        backstop_events::streams::schedule(self.name())
    }

    /// The kind a slot takes, by its weekday in the schedule's zone.
    pub fn kind_at(&self, slot: DateTime<Utc>) -> BackupKind {
        self.config
            .kind
            .kind_on(slot.with_timezone(&self.zone).weekday())
    }

    /// The first slot strictly after `instant`.
    pub fn next_after(&self, instant: DateTime<Utc>) -> Result<DateTime<Utc>, ScheduleError> {
        self.search(instant, false)
    }

    /// The first slot at or after `instant`.
    pub(crate) fn next_from(&self, instant: DateTime<Utc>) -> Result<DateTime<Utc>, ScheduleError> {
        self.search(instant, true)
    }

    fn search(
        &self,
        instant: DateTime<Utc>,
        inclusive: bool,
    ) -> Result<DateTime<Utc>, ScheduleError> {
        let local = instant.with_timezone(&self.zone);
        self.cron
            .find_next_occurrence(&local, inclusive)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| ScheduleError::NoFiring {
                schedule: self.name().to_string(),
                cron: self.config.cron.clone(),
                why: e.to_string(),
            })
    }

    /// The next `n` firings strictly after `after`, each in the schedule's zone and in UTC.
    pub fn next_firings(
        &self,
        n: usize,
        after: DateTime<Utc>,
    ) -> Result<Vec<Firing>, ScheduleError> {
        let mut out = Vec::with_capacity(n);
        let mut cursor = after;
        for _ in 0..n {
            cursor = self.next_after(cursor)?;
            out.push(self.firing(cursor));
        }
        Ok(out)
    }

    /// Describes the firing of one slot.
    pub fn firing(&self, slot: DateTime<Utc>) -> Firing {
        Firing {
            schedule: self.name().to_string(),
            source: self.source().to_string(),
            utc: slot,
            local: slot.with_timezone(&self.zone).fixed_offset(),
            zone: self.zone.name().to_string(),
            kind: self.kind_at(slot),
            method: self.method(),
        }
    }

    /// The limits in force at `instant`: `Some` inside the trading-hours window, else `None`.
    pub fn limits_at(&self, instant: DateTime<Utc>) -> Option<Limits> {
        let w = self.window.as_ref()?;
        let local = self.zone.from_utc_datetime(&instant.naive_utc());
        let t = local.time();
        (w.days.contains(local.weekday()) && t >= w.start && t < w.end).then_some(w.limits)
    }
}

fn parse_window(schedule: &str, t: &TradingHours) -> Result<Window, ScheduleError> {
    let bad = |why: String| ScheduleError::Config {
        schedule: schedule.to_string(),
        why,
    };
    let (a, b) = t.window.split_once('-').ok_or_else(|| {
        bad(format!(
            "trading_hours.window {:?} is not HH:MM-HH:MM (for example 09:30-16:00)",
            t.window
        ))
    })?;
    let time = |s: &str| {
        NaiveTime::parse_from_str(s.trim(), "%H:%M").map_err(|_| {
            bad(format!(
                "trading_hours.window {:?}: {s:?} is not a time HH:MM",
                t.window
            ))
        })
    };
    let (start, end) = (time(a)?, time(b)?);
    if start >= end {
        return Err(bad(format!(
            "trading_hours.window {:?} ends before it starts; a window within one day is expected",
            t.window
        )));
    }
    if t.days.is_empty() {
        return Err(bad("trading_hours.days names no day".into()));
    }
    if t.jobs.is_none() && t.bytes_per_second.is_none() {
        return Err(bad(
            "trading_hours sets neither `jobs` nor `bytes_per_second`; set at least one limit or remove the section".into(),
        ));
    }
    if t.jobs == Some(0) || t.bytes_per_second == Some(0) {
        return Err(bad(
            "a trading-hours limit of 0 would stop backups; use at least 1 job and 1 byte per second".into(),
        ));
    }
    Ok(Window {
        days: t.days,
        start,
        end,
        limits: Limits {
            jobs: t.jobs,
            bytes_per_second: t.bytes_per_second,
        },
    })
}
