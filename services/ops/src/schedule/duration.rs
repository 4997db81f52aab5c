//! Durations as written in the configuration: `6h`, `30d`, `1h30m`, `2w`.
//!
//! Units: `s`, `m` (minutes), `h`, `d` (24 hours), `w` (7 days). There is no month or year unit
//! on purpose: their length varies, and a retention period that silently means 365 or 366 days
//! is a surprise; write `365d`. A duration prints back in the same notation (largest units
//! first, days rather than weeks), so a configuration read and written again keeps its meaning.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A non-negative duration in whole seconds, read from and written as `30d`, `6h`, `1h30m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigDuration {
    seconds: u64,
}

const UNITS: [(char, u64); 5] = [
    ('w', 7 * 86_400),
    ('d', 86_400),
    ('h', 3_600),
    ('m', 60),
    ('s', 1),
];

impl ConfigDuration {
    pub const fn from_secs(seconds: u64) -> ConfigDuration {
        ConfigDuration { seconds }
    }
    pub const fn from_hours(hours: u64) -> ConfigDuration {
        ConfigDuration::from_secs(hours * 3_600)
    }
    pub const fn from_days(days: u64) -> ConfigDuration {
        ConfigDuration::from_secs(days * 86_400)
    }
    pub fn as_secs(&self) -> u64 {
        self.seconds
    }
    pub fn as_std(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.seconds)
    }
    /// As a chrono duration, for arithmetic on instants. Saturates at chrono's range (about
    /// 292 million years), which no configuration reaches.
    pub fn as_chrono(&self) -> chrono::TimeDelta {
        i64::try_from(self.seconds)
            .ok()
            .and_then(chrono::TimeDelta::try_seconds)
            .unwrap_or(chrono::TimeDelta::MAX)
    }
}

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {why}; write a number and a unit, such as 45s, 30m, 6h, 30d, 2w or 1h30m"
)]
pub struct DurationError {
    pub input: String,
    pub why: &'static str,
}

impl FromStr for ConfigDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| DurationError {
            input: s.to_string(),
            why,
        };
        let text = s.trim();
        if text.is_empty() {
            return Err(err("it is empty"));
        }
        let mut seconds: u64 = 0;
        let mut digits = String::new();
        for c in text.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let Some((_, unit)) = UNITS.iter().find(|(u, _)| *u == c) else {
                return Err(err("unknown unit (units are s, m, h, d and w)"));
            };
            if digits.is_empty() {
                return Err(err("a unit without a number before it"));
            }
            let n: u64 = digits.parse().map_err(|_| err("number too large"))?;
            seconds = n
                .checked_mul(*unit)
                .and_then(|v| seconds.checked_add(v))
                .ok_or_else(|| err("too large"))?;
            digits.clear();
        }
        if !digits.is_empty() {
            return Err(err("a number without a unit after it"));
        }
        Ok(ConfigDuration { seconds })
    }
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.seconds == 0 {
            return f.write_str("0s");
        }
        // Never in weeks: `7d` and `30d` print as written, not `1w` and `4w2d`.
        let mut rest = self.seconds;
        for (unit, size) in &UNITS[1..] {
            if rest >= *size {
                write!(f, "{}{unit}", rest / size)?;
                rest %= *size;
            }
        }
        Ok(())
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_back() {
        for (text, secs, printed) in [
            ("6h", 6 * 3600, "6h"),
            ("30d", 30 * 86_400, "30d"),
            ("1h30m", 5400, "1h30m"),
            ("90m", 5400, "1h30m"),
            ("2w", 14 * 86_400, "14d"),
            ("45s", 45, "45s"),
            ("0s", 0, "0s"),
        ] {
            let d: ConfigDuration = text.parse().unwrap();
            assert_eq!(d.as_secs(), secs, "{text}");
            assert_eq!(d.to_string(), printed, "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for bad in ["", "6", "h", "6y", "1.5h", "-3d", "99999999999999999999d"] {
            assert!(bad.parse::<ConfigDuration>().is_err(), "{bad:?} accepted");
        }
    }
}
