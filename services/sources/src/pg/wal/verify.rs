//! `backstop wal verify`: the archive's continuity per timeline, and every file's checksum.
//!
//! Continuity: each timeline must hold every segment from where it begins to the last segment
//! archived on it. A timeline begins at the start of the oldest base backup (for that backup's
//! timeline), at its switch point (for a timeline descending from it, as its history file says),
//! or at its first archived segment otherwise. A timeline that others branched from must also
//! reach the segment before each branch point, and each base backup's own WAL (start to stop)
//! must be there. Missing segments are reported as gaps, by name. A timeline after the first
//! without its history file is a problem too: recovery cannot follow it.
//!
//! Data: with `read_data`, every archived file is read, its SHA3-256 compared with the one
//! recorded at push time, and each segment's first page header checked against its name
//! (see [`super::check_segment_header`]).

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{
    DEFAULT_SEGMENT_SIZE, Lsn, WalError, WalFile, WalKind, WalStore, WalStoreError,
    check_segment_header, history_name, segment_name,
};

/// The WAL a base backup needs: from its start to its stop, on its timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupWalRange {
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
}

/// How to verify.
#[derive(Debug, Clone)]
pub struct WalVerifyOptions {
    /// The base backups kept (continuity starts at the oldest one's start). Empty: each timeline
    /// from its first archived segment.
    pub backups: Vec<BackupWalRange>,
    /// Read every file and check its checksum and header (default true); false checks presence.
    pub read_data: bool,
    /// Files read at once. Default 4.
    pub parallel: usize,
    /// The cluster's WAL segment size; default: the size of the first segment read.
    pub segment_size: Option<u64>,
}

impl Default for WalVerifyOptions {
    fn default() -> Self {
        WalVerifyOptions {
            backups: Vec::new(),
            read_data: true,
            parallel: 4,
            segment_size: None,
        }
    }
}

/// One line of a timeline history file: the timeline `parent` ended at `switch_lsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineHistory {
    pub parent: u32,
    pub switch_lsn: Lsn,
}

/// Parses a timeline history file (`parentTLI <tab> switchpoint <tab> reason` per line; `#`
/// comments and blank lines ignored). The lines are the timeline's ancestors, oldest first; the
/// last one is its immediate parent and where it begins.
pub fn parse_history(text: &str) -> Result<Vec<TimelineHistory>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(tli), Some(lsn)) = (fields.next(), fields.next()) else {
            return Err(format!("line {line:?} has no switch point"));
        };
        let parent: u32 = tli
            .parse()
            .map_err(|_| format!("line {line:?} does not start with a timeline number"))?;
        let switch_lsn: Lsn = lsn.parse()?;
        if out
            .last()
            .is_some_and(|p: &TimelineHistory| p.parent >= parent)
        {
            return Err(format!("timeline {parent} is out of order"));
        }
        out.push(TimelineHistory { parent, switch_lsn });
    }
    Ok(out)
}

/// A run of missing segments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalGap {
    pub timeline: u32,
    /// First and last missing segment (equal for a single one).
    pub first: String,
    pub last: String,
    pub count: u64,
}

/// One timeline of the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineReport {
    pub timeline: u32,
    /// The timeline it branched from and where (from its history file).
    pub parent: Option<u32>,
    pub begins_at: Option<Lsn>,
    /// First and last segment that must be there (`None`: nothing required).
    pub required_from: Option<String>,
    pub required_to: Option<String>,
    /// First and last segment archived.
    pub first: Option<String>,
    pub last: Option<String>,
    pub segments: u64,
    pub gaps: Vec<WalGap>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalProblemKind {
    /// Segments missing (a gap), named by `name` (first) and `detail`.
    Missing,
    /// The file is there but its content is wrong (checksum, authentication or header).
    Damaged,
    /// A timeline's history file is missing or unreadable.
    HistoryMissing,
    /// The store could not return the file.
    Unreadable,
}

/// Something wrong in the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalProblem {
    pub kind: WalProblemKind,
    pub name: String,
    pub detail: String,
}

/// The outcome of [`wal_verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalVerifyReport {
    pub segment_size: u64,
    pub timelines: Vec<TimelineReport>,
    pub problems: Vec<WalProblem>,
    /// Files listed in the archive.
    pub files: u64,
    /// Files read and checked (0 without `read_data`).
    pub files_checked: u64,
    pub bytes_checked: u64,
}

impl WalVerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Every missing segment's name (gaps expanded; for messages and tests).
    pub fn missing_segments(&self) -> Vec<String> {
        let mut out = Vec::new();
        for t in &self.timelines {
            for g in &t.gaps {
                let (Some(a), Some(b)) = (WalFile::parse(&g.first), WalFile::parse(&g.last)) else {
                    continue;
                };
                for s in a.segno(self.segment_size)..=b.segno(self.segment_size) {
                    out.push(segment_name(g.timeline, s, self.segment_size));
                }
            }
        }
        out
    }

    /// Names of files found damaged.
    pub fn damaged(&self) -> Vec<&str> {
        self.problems
            .iter()
            .filter(|p| p.kind == WalProblemKind::Damaged)
            .map(|p| p.name.as_str())
            .collect()
    }
}

/// Checks the archive's continuity and (with `read_data`) every file's checksum.
pub async fn wal_verify(
    store: &dyn WalStore,
    opts: &WalVerifyOptions,
) -> Result<WalVerifyReport, WalError> {
    let entries = store.list().await?;
    let files: Vec<WalFile> = entries
        .iter()
        .filter_map(|e| WalFile::parse(&e.name))
        .collect();
    let mut problems = Vec::new();

    // The segment size: given, or the length of the first segment.
    let segment_size = match opts.segment_size {
        Some(s) => s,
        None => match files.iter().find(|f| f.kind == WalKind::Segment) {
            Some(f) => match store.get_segment(&f.name).await {
                Ok(Some(s)) if (s.data.len() as u64).is_power_of_two() => s.data.len() as u64,
                _ => DEFAULT_SEGMENT_SIZE,
            },
            None => DEFAULT_SEGMENT_SIZE,
        },
    };
    let seg = |lsn: Lsn| lsn.segno(segment_size);

    let mut present: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    let mut history_files = BTreeSet::new();
    for f in &files {
        match f.kind {
            WalKind::Segment => {
                present
                    .entry(f.timeline)
                    .or_default()
                    .insert(f.segno(segment_size));
            }
            WalKind::History => {
                history_files.insert(f.timeline);
            }
            _ => {}
        }
    }

    // Histories: timeline -> ancestors (oldest first).
    let mut histories: BTreeMap<u32, Vec<TimelineHistory>> = BTreeMap::new();
    for &t in &history_files {
        let name = history_name(t);
        match store.get_segment(&name).await {
            Ok(Some(stored)) => match stored.verify(&name).await {
                Ok(_) => match parse_history(&String::from_utf8_lossy(&stored.data)) {
                    Ok(h) => {
                        histories.insert(t, h);
                    }
                    Err(why) => problems.push(WalProblem {
                        kind: WalProblemKind::Damaged,
                        name,
                        detail: format!("unreadable history: {why}"),
                    }),
                },
                Err(e) => problems.push(WalProblem {
                    kind: WalProblemKind::Damaged,
                    name,
                    detail: e.to_string(),
                }),
            },
            Ok(None) => {}
            Err(e) => problems.push(store_problem(&name, e)),
        }
    }

    let mut timelines: BTreeSet<u32> = present.keys().copied().collect();
    timelines.extend(history_files.iter().copied());
    timelines.extend(opts.backups.iter().map(|b| b.timeline));
    let oldest = opts
        .backups
        .iter()
        .min_by_key(|b| (b.start_lsn, b.timeline));

    // Segment each timeline's children need it to reach (the one before each branch point).
    let mut child_needs: BTreeMap<u32, u64> = BTreeMap::new();
    for h in histories.values() {
        if let Some(last) = h.last() {
            let need = seg(last.switch_lsn).saturating_sub(1);
            let e = child_needs.entry(last.parent).or_insert(need);
            *e = (*e).max(need);
        }
    }

    let mut reports = Vec::new();
    for &t in &timelines {
        let have = present.get(&t).cloned().unwrap_or_default();
        let history = histories.get(&t);
        let parent = history.and_then(|h| h.last()).map(|l| l.parent);
        let begins_at = history.and_then(|h| h.last()).map(|l| l.switch_lsn);
        if t > 1 && history.is_none() && !history_files.contains(&t) && !have.is_empty() {
            problems.push(WalProblem {
                kind: WalProblemKind::HistoryMissing,
                name: history_name(t),
                detail: format!(
                    "timeline {t} has archived segments but no history file: recovery cannot follow it"
                ),
            });
        }
        let descends_from =
            |ancestor: u32| history.is_some_and(|h| h.iter().any(|l| l.parent == ancestor));
        let mut begin: Option<u64> = match oldest {
            Some(o) if o.timeline == t => Some(seg(o.start_lsn)),
            Some(o) if descends_from(o.timeline) => begins_at.map(seg).or(have.first().copied()),
            _ => begins_at.map(seg).or(have.first().copied()),
        };
        let mut end: Option<u64> = have.last().copied();
        for b in opts.backups.iter().filter(|b| b.timeline == t) {
            begin = Some(begin.map_or(seg(b.start_lsn), |x| x.min(seg(b.start_lsn))));
            end = Some(end.map_or(seg(b.stop_lsn), |x| x.max(seg(b.stop_lsn))));
        }
        if let (Some(b), Some(&need)) = (begin, child_needs.get(&t))
            && b <= need
        {
            end = Some(end.map_or(need, |x| x.max(need)));
        }
        let mut gaps = Vec::new();
        let (mut required_from, mut required_to) = (None, None);
        if let (Some(b), Some(e)) = (begin, end)
            && b <= e
        {
            required_from = Some(segment_name(t, b, segment_size));
            required_to = Some(segment_name(t, e, segment_size));
            let mut expect = b;
            for &s in have.range(b..=e) {
                if s > expect {
                    gaps.push(gap(t, expect, s - 1, segment_size));
                }
                expect = s + 1;
            }
            if expect <= e {
                gaps.push(gap(t, expect, e, segment_size));
            }
        }
        for g in &gaps {
            problems.push(WalProblem {
                kind: WalProblemKind::Missing,
                name: g.first.clone(),
                detail: if g.count == 1 {
                    format!("segment {} of timeline {t} is missing", g.first)
                } else {
                    format!(
                        "{} segments of timeline {t} are missing: {} to {}",
                        g.count, g.first, g.last
                    )
                },
            });
        }
        reports.push(TimelineReport {
            timeline: t,
            parent,
            begins_at,
            required_from,
            required_to,
            first: have.first().map(|&s| segment_name(t, s, segment_size)),
            last: have.last().map(|&s| segment_name(t, s, segment_size)),
            segments: have.len() as u64,
            gaps,
        });
    }

    let (mut files_checked, mut bytes_checked) = (0u64, 0u64);
    if opts.read_data {
        let checks: Vec<Result<u64, WalProblem>> =
            futures::stream::iter(files.iter().map(|f| check_file(store, f)))
                .buffer_unordered(opts.parallel.max(1))
                .collect()
                .await;
        for c in checks {
            match c {
                Ok(bytes) => {
                    files_checked += 1;
                    bytes_checked += bytes;
                }
                Err(p) => problems.push(p),
            }
        }
    }
    problems.sort_by(|a, b| (&a.name, a.kind as u8).cmp(&(&b.name, b.kind as u8)));
    problems.dedup();
    Ok(WalVerifyReport {
        segment_size,
        timelines: reports,
        problems,
        files: files.len() as u64,
        files_checked,
        bytes_checked,
    })
}

fn gap(timeline: u32, first: u64, last: u64, segment_size: u64) -> WalGap {
    WalGap {
        timeline,
        first: segment_name(timeline, first, segment_size),
        last: segment_name(timeline, last, segment_size),
        count: last - first + 1,
    }
}

fn store_problem(name: &str, e: WalStoreError) -> WalProblem {
    match e {
        e @ WalStoreError::Corrupt { .. } => WalProblem {
            kind: WalProblemKind::Damaged,
            name: name.to_string(),
            detail: e.to_string(),
        },
        e => WalProblem {
            kind: WalProblemKind::Unreadable,
            name: name.to_string(),
            detail: e.to_string(),
        },
    }
}

async fn check_file(store: &dyn WalStore, f: &WalFile) -> Result<u64, WalProblem> {
    let stored = match store.get_segment(&f.name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(WalProblem {
                kind: WalProblemKind::Unreadable,
                name: f.name.clone(),
                detail: "listed but gone when read".into(),
            });
        }
        Err(e) => return Err(store_problem(&f.name, e)),
    };
    if let Err(e) = stored.verify(&f.name).await {
        return Err(store_problem(&f.name, e));
    }
    if matches!(f.kind, WalKind::Segment | WalKind::Partial)
        && let Err(why) = check_segment_header(f, &stored.data)
    {
        return Err(WalProblem {
            kind: WalProblemKind::Damaged,
            name: f.name.clone(),
            detail: why,
        });
    }
    Ok(stored.data.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_parses() {
        let h = parse_history(
            "1\t0/5000060\tno recovery target specified\n\n2\t0/7000000\tat restore point \"x\"\n",
        )
        .unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].parent, 2);
        assert_eq!(h[1].switch_lsn, Lsn(0x7000000));
        assert!(parse_history("2\t0/1\n1\t0/2\n").is_err());
        assert!(parse_history("x\t0/1\n").is_err());
    }
}
