//! Which backups a policy keeps: a pure function of the backups, the policy and now.
//!
//! Rules (restic's `forget` semantics for the counted ones): the backups of a source are walked
//! newest first. `keep_last n` keeps the first n. Each period rule (hourly, daily, weekly by ISO
//! week, monthly, yearly; periods on the policy zone's calendar) keeps a backup whenever its
//! period differs from the last period *that rule* kept, until the rule has kept n periods: so
//! each kept period is represented by its newest backup, and periods without a backup do not
//! count. `keep_within d` keeps what is at most d old; a tag rule keeps a tagged backup at most
//! its period old (both measured from now, unlike restic's newest-snapshot reference: a source
//! whose backups stopped still loses its old ones, within the guard rails below). The WAL window
//! keeps the newest physical backup at or before `now - window`: the base from which the oldest
//! moment of the window is reached.
//!
//! Guard rails, applied after the rules, per source:
//! - the newest backup that passed verification is kept;
//! - a kept backup's parent is kept, transitively (an incremental or differential is useless
//!   without its chain);
//! - while the source's newest verification (by time of verification) failed, nothing of the
//!   source is removed: deleting good history during an incident is how data is lost.
//!
//! Every decision lists every reason that keeps it; a removal has none.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use backstop_events::{BackupKind, BackupMethod};
use chrono::{DateTime, Datelike, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::policy::Policy;
use crate::schedule::ConfigDuration;

/// The newest verification of a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Verification {
    Unverified,
    Passed { at: DateTime<Utc> },
    Failed { at: DateTime<Utc> },
}

/// A completed backup retention may keep or remove.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    pub id: Uuid,
    pub source: String,
    pub kind: BackupKind,
    pub method: BackupMethod,
    /// When the backup was taken (its snapshot time).
    pub time: DateTime<Utc>,
    pub parent: Option<Uuid>,
    pub tags: Vec<String>,
    pub verification: Verification,
}

/// Why a backup is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    Last {
        n: u32,
    },
    Hourly {
        period: String,
    },
    Daily {
        period: String,
    },
    Weekly {
        period: String,
    },
    Monthly {
        period: String,
    },
    Yearly {
        period: String,
    },
    Within {
        period: ConfigDuration,
    },
    Tag {
        tag: String,
        period: ConfigDuration,
    },
    WalWindow {
        window: ConfigDuration,
    },
    NewestVerified,
    ParentOf {
        child: Uuid,
    },
    /// Held: the source's newest verification (of backup `backup`) failed.
    VerificationFailed {
        backup: Uuid,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Last { n } => write!(f, "last {n}"),
            Reason::Hourly { period } => write!(f, "hourly {period}"),
            Reason::Daily { period } => write!(f, "daily {period}"),
            Reason::Weekly { period } => write!(f, "weekly {period}"),
            Reason::Monthly { period } => write!(f, "monthly {period}"),
            Reason::Yearly { period } => write!(f, "yearly {period}"),
            Reason::Within { period } => write!(f, "within {period}"),
            Reason::Tag { tag, period } => write!(f, "tag {tag} within {period}"),
            Reason::WalWindow { window } => write!(f, "base of the {window} WAL window"),
            Reason::NewestVerified => f.write_str("newest verified"),
            Reason::ParentOf { child } => write!(f, "parent of kept {child}"),
            Reason::VerificationFailed { backup } => write!(
                f,
                "held: the newest verification of this source failed (backup {backup})"
            ),
        }
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Keep or remove one backup, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub id: Uuid,
    pub source: String,
    pub time: DateTime<Utc>,
    pub keep: bool,
    pub reasons: Vec<Reason>,
}

impl Decision {
    /// The reasons as one line, as `retention.decided` and `backup.deleted` record them.
    pub fn reason(&self) -> String {
        if self.reasons.is_empty() {
            "no rule keeps it".to_string()
        } else {
            self.reasons
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        }
    }
}

#[derive(Clone, Copy)]
enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    fn label(self, policy: &Policy, t: DateTime<Utc>) -> String {
        let l = t.with_timezone(&policy.zone);
        match self {
            Period::Hour => format!("{}T{}", l.format("%Y-%m-%d"), l.format("%H")),
            Period::Day => l.format("%Y-%m-%d").to_string(),
            Period::Week => {
                let w = l.iso_week();
                format!("{}-W{:02}", w.year(), w.week())
            }
            Period::Month => l.format("%Y-%m").to_string(),
            Period::Year => l.format("%Y").to_string(),
        }
    }

    fn reason(self, period: String) -> Reason {
        match self {
            Period::Hour => Reason::Hourly { period },
            Period::Day => Reason::Daily { period },
            Period::Week => Reason::Weekly { period },
            Period::Month => Reason::Monthly { period },
            Period::Year => Reason::Yearly { period },
        }
    }
}

/// Decides keep or remove for every candidate, in the order given. Sources are independent;
/// call it with all of a source's completed backups (a subset would move the rules' periods).
pub fn decide(backups: &[Candidate], policy: &Policy, now: DateTime<Utc>) -> Vec<Decision> {
    let mut reasons: Vec<Vec<Reason>> = vec![Vec::new(); backups.len()];
    let mut by_source: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, c) in backups.iter().enumerate() {
        by_source.entry(&c.source).or_default().push(i);
    }
    for (_, mut group) in by_source {
        // Newest first; ties broken by id so the outcome does not depend on input order.
        group.sort_by(|&a, &b| {
            (backups[b].time, backups[b].id).cmp(&(backups[a].time, backups[a].id))
        });
        decide_source(backups, &group, policy, now, &mut reasons);
    }
    backups
        .iter()
        .zip(reasons)
        .map(|(c, reasons)| Decision {
            id: c.id,
            source: c.source.clone(),
            time: c.time,
            keep: !reasons.is_empty(),
            reasons,
        })
        .collect()
}

fn decide_source(
    backups: &[Candidate],
    newest_first: &[usize],
    policy: &Policy,
    now: DateTime<Utc>,
    reasons: &mut [Vec<Reason>],
) {
    for &i in newest_first.iter().take(policy.keep_last as usize) {
        reasons[i].push(Reason::Last {
            n: policy.keep_last,
        });
    }
    for (period, count) in [
        (Period::Hour, policy.keep_hourly),
        (Period::Day, policy.keep_daily),
        (Period::Week, policy.keep_weekly),
        (Period::Month, policy.keep_monthly),
        (Period::Year, policy.keep_yearly),
    ] {
        let mut kept = 0;
        let mut last: Option<String> = None;
        for &i in newest_first {
            if kept >= count {
                break;
            }
            let label = period.label(policy, backups[i].time);
            if last.as_ref() != Some(&label) {
                last = Some(label.clone());
                kept += 1;
                reasons[i].push(period.reason(label));
            }
        }
    }
    for &i in newest_first {
        let c = &backups[i];
        let age = now - c.time;
        if let Some(w) = policy.keep_within
            && age <= w.as_chrono()
        {
            reasons[i].push(Reason::Within { period: w });
        }
        for (tag, period) in &policy.keep_tags {
            if c.tags.iter().any(|t| t == tag) && age <= period.as_chrono() {
                reasons[i].push(Reason::Tag {
                    tag: tag.clone(),
                    period: *period,
                });
            }
        }
    }
    if let Some(window) = policy.wal_window {
        let start = now - window.as_chrono();
        if let Some(&i) = newest_first
            .iter()
            .find(|&&i| backups[i].method == BackupMethod::Physical && backups[i].time <= start)
        {
            reasons[i].push(Reason::WalWindow { window });
        }
    }

    // Guard rails.
    if let Some(&i) = newest_first
        .iter()
        .find(|&&i| matches!(backups[i].verification, Verification::Passed { .. }))
    {
        reasons[i].push(Reason::NewestVerified);
    }
    let index: HashMap<Uuid, usize> = newest_first.iter().map(|&i| (backups[i].id, i)).collect();
    // Parents are older than their children, so one newest-first pass is transitive; loop to
    // a fixed point anyway, so equal times or odd clocks cannot drop a link of a chain.
    loop {
        let mut changed = false;
        for &i in newest_first {
            if reasons[i].is_empty() {
                continue;
            }
            let child = backups[i].id;
            if let Some(&p) = backups[i].parent.as_ref().and_then(|p| index.get(p)) {
                let r = Reason::ParentOf { child };
                if !reasons[p].contains(&r) {
                    reasons[p].push(r);
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    let newest_verification = newest_first
        .iter()
        .filter_map(|&i| match backups[i].verification {
            Verification::Unverified => None,
            Verification::Passed { at } => Some((at, false, backups[i].id)),
            Verification::Failed { at } => Some((at, true, backups[i].id)),
        })
        .max_by_key(|(at, _, _)| *at);
    if let Some((_, true, failed)) = newest_verification {
        for &i in newest_first {
            reasons[i].push(Reason::VerificationFailed { backup: failed });
        }
    }
}
