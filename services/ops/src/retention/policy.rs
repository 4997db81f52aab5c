//! Retention policies as configured (`[[retention]]`) and as resolved for one source and class.
//!
//! ```toml
//! [[retention]]                  # every source's backups (no `source`)
//! keep_daily = 30                # a rule left out takes its class default; 0 turns it off
//! zone = "America/New_York"      # the zone whose days, weeks, months and years count (UTC)
//!
//! [[retention]]
//! source = "main"
//! keep_last = 3
//! keep_tags = { pre-deploy = "30d", release = "365d" }
//! wal_window = "14d"
//!
//! [[retention]]
//! class = "exports"              # backups (default), exports or configuration
//! keep_within = "120d"
//! ```
//!
//! Resolution for (source, class), each later layer overriding the rules it sets: the class
//! defaults, then the entry for the class without a source, then the entry for the class and the
//! source. Class defaults (seeds 000 R13, 003, 004): backups keep daily 30, weekly 12, monthly
//! 12, yearly 7, the `pre-deploy` tag 30 days and a 7-day WAL window; exports are kept 90 days
//! and configuration 180 days (`keep_within`) plus its newest backup (`keep_last = 1`: an
//! unchanged configuration takes no new backup). A configuration source's backups (method
//! `config`) are the configuration class; every other source's are backups.

use std::collections::BTreeMap;
use std::fmt;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::RetentionError;
use crate::schedule::ConfigDuration;

/// What a policy governs.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Database backups, logical and physical, of every kind.
    #[default]
    Backups,
    /// Compliance and audit exports.
    Exports,
    /// Configuration snapshots.
    Configuration,
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::Backups => "backups",
            Class::Exports => "exports",
            Class::Configuration => "configuration",
        })
    }
}

/// One `[[retention]]` entry as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyEntry {
    /// The source it applies to; every source when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default)]
    pub class: Class,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    /// Keep everything younger than this (measured from now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<ConfigDuration>,
    /// Keep a backup with the tag while it is younger than the tag's period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_tags: Option<BTreeMap<String, ConfigDuration>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// How far back any moment must stay restorable from physical backups and archived WAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_window: Option<ConfigDuration>,
}

/// A resolved policy: what [`super::decide`] applies. A count of 0 turns its rule off.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Policy {
    /// Names the policy in `retention.decided` and `backup.deleted`: `backups/main`, or
    /// `backups/*` for one that applies to every source.
    pub name: String,
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    pub keep_within: Option<ConfigDuration>,
    pub keep_tags: BTreeMap<String, ConfigDuration>,
    #[serde(serialize_with = "zone_name")]
    pub zone: Tz,
    pub wal_window: Option<ConfigDuration>,
}

fn zone_name<S: serde::Serializer>(z: &Tz, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(z.name())
}

pub const DEFAULT_WAL_WINDOW: ConfigDuration = ConfigDuration::from_days(7);
pub const PRE_DEPLOY_TAG: &str = "pre-deploy";

impl Policy {
    /// A policy with no rule at all (only the guard rails keep anything), to build on.
    pub fn none(name: impl Into<String>) -> Policy {
        Policy {
            name: name.into(),
            keep_last: 0,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
            keep_yearly: 0,
            keep_within: None,
            keep_tags: BTreeMap::new(),
            zone: Tz::UTC,
            wal_window: None,
        }
    }

    /// The class defaults from the seeds (see the module documentation).
    pub fn class_default(class: Class) -> Policy {
        let none = Policy::none(format!("{class}/*"));
        match class {
            Class::Backups => Policy {
                keep_daily: 30,
                keep_weekly: 12,
                keep_monthly: 12,
                keep_yearly: 7,
                keep_tags: BTreeMap::from([(
                    PRE_DEPLOY_TAG.to_string(),
                    ConfigDuration::from_days(30),
                )]),
                wal_window: Some(DEFAULT_WAL_WINDOW),
                ..none
            },
            Class::Exports => Policy {
                keep_within: Some(ConfigDuration::from_days(90)),
                ..none
            },
            // An unchanged configuration takes no new backup, so its newest backup may be older
            // than 180 days and must stay: the last one is always kept.
            Class::Configuration => Policy {
                keep_within: Some(ConfigDuration::from_days(180)),
                keep_last: 1,
                ..none
            },
        }
    }

    fn apply(&mut self, e: &PolicyEntry) -> Result<(), RetentionError> {
        let set = |field: &mut u32, v: Option<u32>| {
            if let Some(v) = v {
                *field = v;
            }
        };
        set(&mut self.keep_last, e.keep_last);
        set(&mut self.keep_hourly, e.keep_hourly);
        set(&mut self.keep_daily, e.keep_daily);
        set(&mut self.keep_weekly, e.keep_weekly);
        set(&mut self.keep_monthly, e.keep_monthly);
        set(&mut self.keep_yearly, e.keep_yearly);
        if e.keep_within.is_some() {
            self.keep_within = e.keep_within;
        }
        if let Some(tags) = &e.keep_tags {
            self.keep_tags = tags.clone();
        }
        if let Some(z) = &e.zone {
            self.zone = parse_zone(z)?;
        }
        if e.wal_window.is_some() {
            self.wal_window = e.wal_window;
        }
        Ok(())
    }

    /// A one-line description of the rules in force, for logs and `backstop forget`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (n, rule) in [
            (self.keep_last, "last"),
            (self.keep_hourly, "hourly"),
            (self.keep_daily, "daily"),
            (self.keep_weekly, "weekly"),
            (self.keep_monthly, "monthly"),
            (self.keep_yearly, "yearly"),
        ] {
            if n > 0 {
                parts.push(format!("{rule} {n}"));
            }
        }
        if let Some(w) = self.keep_within {
            parts.push(format!("within {w}"));
        }
        for (tag, period) in &self.keep_tags {
            parts.push(format!("tag {tag} {period}"));
        }
        if let Some(w) = self.wal_window {
            parts.push(format!("WAL window {w}"));
        }
        if parts.is_empty() {
            parts.push("no rule (only the guard rails keep backups)".into());
        }
        format!("{}: {} ({})", self.name, parts.join(", "), self.zone.name())
    }
}

impl Default for Policy {
    fn default() -> Policy {
        Policy::class_default(Class::Backups)
    }
}

fn parse_zone(z: &str) -> Result<Tz, RetentionError> {
    z.parse().map_err(|_| RetentionError::UnknownZone {
        zone: z.to_string(),
    })
}

/// Every `[[retention]]` entry, validated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetentionConfig {
    entries: Vec<PolicyEntry>,
}

impl RetentionConfig {
    /// Validates the entries: zones exist, one entry per (source, class), and a WAL window only
    /// on backups.
    pub fn new(entries: Vec<PolicyEntry>) -> Result<RetentionConfig, RetentionError> {
        for (i, e) in entries.iter().enumerate() {
            if let Some(z) = &e.zone {
                parse_zone(z)?;
            }
            if e.wal_window.is_some() && e.class != Class::Backups {
                return Err(RetentionError::Config {
                    why: format!(
                        "a [[retention]] entry for {} sets wal_window; the WAL window belongs to backups",
                        e.class
                    ),
                });
            }
            if entries[..i]
                .iter()
                .any(|o| o.source == e.source && o.class == e.class)
            {
                return Err(RetentionError::Config {
                    why: format!(
                        "two [[retention]] entries for {} of {}; merge them into one",
                        e.class,
                        e.source.as_deref().unwrap_or("every source")
                    ),
                });
            }
        }
        Ok(RetentionConfig { entries })
    }

    pub fn entries(&self) -> &[PolicyEntry] {
        &self.entries
    }

    /// The policy in force for `source`'s `class`.
    pub fn policy(&self, source: &str, class: Class) -> Policy {
        let mut p = Policy::class_default(class);
        let general = self
            .entries
            .iter()
            .find(|e| e.class == class && e.source.is_none());
        let specific = self
            .entries
            .iter()
            .find(|e| e.class == class && e.source.as_deref() == Some(source));
        for e in [general, specific].into_iter().flatten() {
            // Zones were checked in `new`.
            let _ = p.apply(e);
        }
        if specific.is_some() {
            p.name = format!("{class}/{source}");
        }
        p
    }
}
