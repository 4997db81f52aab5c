//! The WAL window: which archived WAL files retention keeps.
//!
//! Point-in-time recovery to a moment M replays WAL from a base backup taken at or before M. So
//! to reach every moment of the window `[now - window, now]`, WAL is kept from the start segment
//! of the **window base**: the newest kept base backup at or before `now - window` (or, if every
//! kept base is younger, the oldest kept one, and the window is then not fully covered). On the
//! base's timeline every segment from its start is kept, and every segment of a later timeline
//! (a promotion branches from the base's history, so its WAL is needed to follow the branch).
//!
//! A kept base backup older than the window base still needs the WAL that makes it consistent:
//! `[start, end]` on its timeline when its end segment is known; when it is not, everything from
//! its start, as for the window base (keeping too much is the only safe guess). Timeline history
//! files and backup history files are always kept: they are tiny and recovery reads them to
//! choose a timeline. Without any kept base backup nothing is deleted: there is nothing to
//! measure the window from, and a first base backup may be running.

use std::collections::BTreeMap;

use backstop_sources::pg::wal::{WalFile, WalKind};
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::RetentionError;
use crate::schedule::ConfigDuration;

/// A physical (base) backup, as the WAL window sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseBackup {
    pub id: Uuid,
    pub time: DateTime<Utc>,
    /// The first WAL segment the backup needs (its start LSN's segment).
    pub start_segment: String,
    /// The last segment it needs to become consistent (its stop LSN's segment), when known.
    pub end_segment: Option<String>,
    /// Whether retention keeps the backup.
    pub kept: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    timeline: u32,
    log: u32,
    seg: u32,
}

impl Position {
    fn of(f: &WalFile) -> Position {
        Position {
            timeline: f.timeline,
            log: f.log,
            seg: f.seg,
        }
    }
    fn same_timeline_at_or_after(&self, other: &Position) -> bool {
        self.timeline == other.timeline && (self.log, self.seg) >= (other.log, other.seg)
    }
}

/// What [`wal_plan`] decided.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WalPlan {
    pub window_start: DateTime<Utc>,
    /// The base backup WAL is kept from; `None` when no base backup is kept (nothing deleted).
    pub window_base: Option<Uuid>,
    /// Whether the window's start is reachable: a kept base backup exists at or before it.
    pub covered: bool,
    /// Per timeline, the oldest segment kept. Timelines after the window base's are kept whole.
    pub keep_from: BTreeMap<u32, String>,
    #[serde(skip)]
    open_from: Vec<Position>,
    #[serde(skip)]
    ranges: Vec<(Position, Position)>,
}

fn segment(name: &str, base: Uuid) -> Result<WalFile, RetentionError> {
    match WalFile::parse(name) {
        Some(f) if f.kind == WalKind::Segment => Ok(f),
        _ => Err(RetentionError::BadSegment {
            backup: base,
            name: name.to_string(),
        }),
    }
}

/// Decides which WAL the window needs, given every physical backup of a source.
pub fn wal_plan(
    bases: &[BaseBackup],
    window: ConfigDuration,
    now: DateTime<Utc>,
) -> Result<WalPlan, RetentionError> {
    let window_start = now - window.as_chrono();
    let mut kept: Vec<&BaseBackup> = bases.iter().filter(|b| b.kept).collect();
    kept.sort_by_key(|b| (b.time, b.id));
    let mut plan = WalPlan {
        window_start,
        window_base: None,
        covered: false,
        keep_from: BTreeMap::new(),
        open_from: Vec::new(),
        ranges: Vec::new(),
    };
    let window_base = kept
        .iter()
        .rev()
        .find(|b| b.time <= window_start)
        .or(kept.first())
        .copied();
    let Some(window_base) = window_base else {
        return Ok(plan);
    };
    plan.window_base = Some(window_base.id);
    plan.covered = window_base.time <= window_start;
    for b in &kept {
        let start = Position::of(&segment(&b.start_segment, b.id)?);
        let end = match &b.end_segment {
            Some(e) => Some(Position::of(&segment(e, b.id)?)),
            None => None,
        };
        if let Some(end) = end
            && (end.timeline != start.timeline || end < start)
        {
            return Err(RetentionError::BadSegment {
                backup: b.id,
                name: format!(
                    "{}..{} (the end segment is not after the start on the same timeline)",
                    b.start_segment,
                    b.end_segment.as_deref().unwrap_or_default()
                ),
            });
        }
        match end {
            // The window base, and anything at or after it, needs everything from its start.
            _ if b.time >= window_base.time => plan.open_from.push(start),
            None => plan.open_from.push(start),
            Some(end) => plan.ranges.push((start, end)),
        }
        let name = b.start_segment.clone();
        plan.keep_from
            .entry(start.timeline)
            .and_modify(|n| {
                if let Some(f) = WalFile::parse(n)
                    && Position::of(&f) > start
                {
                    *n = name.clone();
                }
            })
            .or_insert(name);
    }
    Ok(plan)
}

impl WalPlan {
    /// Whether an archived WAL file must be kept. Names that are not WAL files are kept: only
    /// what is known to be unneeded is deleted.
    pub fn keeps(&self, name: &str) -> bool {
        if self.window_base.is_none() {
            return true;
        }
        let Some(f) = WalFile::parse(name) else {
            return true;
        };
        if matches!(f.kind, WalKind::History | WalKind::Backup) {
            return true;
        }
        let p = Position::of(&f);
        self.open_from
            .iter()
            .any(|s| p.timeline > s.timeline || p.same_timeline_at_or_after(s))
            || self
                .ranges
                .iter()
                .any(|(s, e)| p.same_timeline_at_or_after(s) && p <= *e)
    }
}
