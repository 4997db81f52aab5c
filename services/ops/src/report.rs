//! The weekly summary (seed 000 R17.5): success rate, verification results, storage and cost,
//! the slowest backups and the open alerts, over a period of the ledger.
//!
//! A [`ReportBuilder`] is fed the ledger's events in order and keeps only counters, the five
//! slowest backups and the alert facts, so a ledger of millions of events is summarised in one
//! pass with constant memory. Events after the period's end are ignored; the open alerts and the
//! storage figures are those at the end of the period.
//!
//! The same summary is served at `/reports/weekly`, printed by `backstop report weekly`, and
//! composed every week by `serve` as a `report.generated` event (id derived from the period, so
//! two `serve` processes compose it once), which the notify worker emails.

use std::collections::BTreeMap;

use backstop_events::{
    Actor, Envelope, Event, NewEvent, ReportGenerated, streams, uuid_v7_derived,
};
use chrono::{DateTime, Datelike, TimeDelta, TimeZone, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::alerting::{CostEstimator, Facts};

/// The report's name in `report.generated`.
pub const WEEKLY: &str = "weekly";

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SourceSummary {
    pub completed: u64,
    pub failed: u64,
    pub verified: u64,
    pub verification_failed: u64,
    pub raw_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SlowBackup {
    pub backup_id: Uuid,
    pub source: String,
    pub duration_ms: u64,
    pub completed_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpenAlertLine {
    pub key: String,
    pub severity: String,
    pub since: DateTime<Utc>,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StorageLine {
    pub repository: String,
    pub bytes: u64,
    pub monthly_usd: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeeklyReport {
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// The zone whose local days the period covers (its dates are printed in it).
    pub zone: String,
    pub backups_completed: u64,
    pub backups_failed: u64,
    /// Completed over completed plus failed, in percent; None when nothing ran.
    pub success_rate: Option<f64>,
    pub verifications_passed: u64,
    pub verifications_failed: u64,
    pub sources: BTreeMap<String, SourceSummary>,
    pub slowest: Vec<SlowBackup>,
    pub storage: Vec<StorageLine>,
    pub open_alerts: Vec<OpenAlertLine>,
}

/// Folds events into a [`WeeklyReport`] for `[start, end)`.
pub struct ReportBuilder {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    facts: Facts,
    report: WeeklyReport,
}

const SLOWEST: usize = 5;

impl ReportBuilder {
    pub fn new(start: DateTime<Utc>, end: DateTime<Utc>, zone: chrono_tz::Tz) -> ReportBuilder {
        ReportBuilder {
            start,
            end,
            facts: Facts::default(),
            report: WeeklyReport {
                period_start: start,
                period_end: end,
                zone: zone.name().to_string(),
                backups_completed: 0,
                backups_failed: 0,
                success_rate: None,
                verifications_passed: 0,
                verifications_failed: 0,
                sources: BTreeMap::new(),
                slowest: Vec::new(),
                storage: Vec::new(),
                open_alerts: Vec::new(),
            },
        }
    }

    pub fn observe(&mut self, e: &Envelope) {
        if e.occurred_at >= self.end {
            return;
        }
        self.facts.observe(e);
        if e.occurred_at < self.start {
            return;
        }
        let counted = matches!(
            e.event_type.as_str(),
            "backup.completed" | "backup.failed" | "verification.passed" | "verification.failed"
        );
        if !counted {
            return;
        }
        let Ok(event) = e.event() else { return };
        let r = &mut self.report;
        match event {
            Event::BackupCompleted(c) => {
                r.backups_completed += 1;
                let s = r.sources.entry(c.source.clone()).or_default();
                s.completed += 1;
                s.raw_bytes += c.raw_bytes;
                r.slowest.push(SlowBackup {
                    backup_id: c.backup_id,
                    source: c.source,
                    duration_ms: c.duration_ms,
                    completed_at: e.occurred_at,
                });
                r.slowest.sort_by_key(|b| std::cmp::Reverse(b.duration_ms));
                r.slowest.truncate(SLOWEST);
            }
            Event::BackupFailed(f) => {
                r.backups_failed += 1;
                r.sources.entry(f.source).or_default().failed += 1;
            }
            Event::VerificationPassed(v) => {
                r.verifications_passed += 1;
                if let Some(src) = self.facts.backup_sources.get(&v.backup_id) {
                    r.sources.entry(src.clone()).or_default().verified += 1;
                }
            }
            Event::VerificationFailed(v) => {
                r.verifications_failed += 1;
                if let Some(src) = self.facts.backup_sources.get(&v.backup_id) {
                    r.sources
                        .entry(src.clone())
                        .or_default()
                        .verification_failed += 1;
                }
            }
            _ => {}
        }
    }

    pub fn finish(mut self, cost: Option<&CostEstimator>) -> WeeklyReport {
        let r = &mut self.report;
        let ran = r.backups_completed + r.backups_failed;
        r.success_rate = (ran > 0).then(|| r.backups_completed as f64 / ran as f64 * 100.0);
        for (repo, series) in &self.facts.usage {
            r.storage.push(StorageLine {
                repository: repo.clone(),
                bytes: series.values().map(|u| u.bytes).sum(),
                monthly_usd: cost.map(|c| {
                    series
                        .values()
                        .map(|u| c(&u.storage_class, &u.region, u.bytes))
                        .sum()
                }),
            });
        }
        r.open_alerts = self
            .facts
            .open_by_urgency()
            .into_iter()
            .map(|(key, a)| OpenAlertLine {
                key: key.clone(),
                severity: format!("{:?}", a.severity).to_lowercase(),
                since: a.raised.at,
                message: a.message.clone(),
            })
            .collect();
        self.report
    }
}

impl WeeklyReport {
    pub fn title(&self) -> String {
        let rate = match self.success_rate {
            Some(r) => format!("{r:.1}% of backups succeeded"),
            None => "no backups ran".into(),
        };
        let zone: chrono_tz::Tz = self.zone.parse().unwrap_or(chrono_tz::UTC);
        let last_day = self.period_end - TimeDelta::seconds(1);
        format!(
            "Backstop weekly summary {} to {}: {rate}, {} open alert{}",
            self.period_start.with_timezone(&zone).format("%Y-%m-%d"),
            last_day.with_timezone(&zone).format("%Y-%m-%d"),
            self.open_alerts.len(),
            if self.open_alerts.len() == 1 { "" } else { "s" }
        )
    }

    /// Plain text, for email bodies and the terminal.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let _ = writeln!(t, "{}\n", self.title());
        let rate = self
            .success_rate
            .map(|r| format!("{r:.1}%"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            t,
            "Backups: {} completed, {} failed (success rate {rate})",
            self.backups_completed, self.backups_failed
        );
        let _ = writeln!(
            t,
            "Verifications: {} passed, {} failed",
            self.verifications_passed, self.verifications_failed
        );
        if !self.sources.is_empty() {
            let _ = writeln!(t, "\nPer source:");
            for (name, s) in &self.sources {
                let _ = writeln!(
                    t,
                    "  {name}: {} completed, {} failed, {} verified, {} failed verification, {} bytes read",
                    s.completed, s.failed, s.verified, s.verification_failed, s.raw_bytes
                );
            }
        }
        if !self.storage.is_empty() {
            let _ = writeln!(t, "\nStorage:");
            for s in &self.storage {
                let cost = s
                    .monthly_usd
                    .map(|c| format!(", about ${c:.2} a month"))
                    .unwrap_or_default();
                let _ = writeln!(t, "  {}: {} bytes{cost}", s.repository, s.bytes);
            }
        }
        if !self.slowest.is_empty() {
            let _ = writeln!(t, "\nSlowest backups:");
            for b in &self.slowest {
                let _ = writeln!(
                    t,
                    "  {:.1} s  {}  {} ({})",
                    b.duration_ms as f64 / 1000.0,
                    b.source,
                    b.backup_id,
                    b.completed_at.format("%Y-%m-%d %H:%M UTC")
                );
            }
        }
        let _ = writeln!(t, "\nOpen alerts: {}", self.open_alerts.len());
        for a in &self.open_alerts {
            let _ = writeln!(
                t,
                "  [{}] {} (since {}): {}",
                a.severity,
                a.key,
                a.since.format("%Y-%m-%d %H:%M UTC"),
                a.message
            );
        }
        t
    }

    /// The `report.generated` event for this report, with its id derived from the period.
    pub fn event(&self) -> NewEvent {
        let id = report_id(WEEKLY, self.period_start);
        let summary = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        let e = Event::ReportGenerated(ReportGenerated {
            report: WEEKLY.into(),
            period_start: self.period_start,
            period_end: self.period_end,
            title: self.title(),
            text: self.text(),
            summary,
        });
        let mut n = NewEvent::new(streams::reports(), Actor::worker("reports"), &e).with_id(id);
        n.correlation_id = id;
        n
    }
}

/// The id of a report for a period: the same in every process.
pub fn report_id(report: &str, period_start: DateTime<Utc>) -> Uuid {
    uuid_v7_derived(Uuid::nil(), period_start, &format!("report:{report}"))
}

/// The weekly period that ended last at or before `now`: from Monday 00:00 to the next Monday
/// 00:00 in `zone` (DST-correct: a week is seven local days, not 168 hours).
pub fn last_full_week(now: DateTime<Utc>, zone: chrono_tz::Tz) -> (DateTime<Utc>, DateTime<Utc>) {
    let local = now.with_timezone(&zone).date_naive();
    let monday = local - TimeDelta::days(i64::from(local.weekday().num_days_from_monday()));
    let at_midnight = |d: chrono::NaiveDate| {
        let naive = d.and_hms_opt(0, 0, 0).unwrap_or_default();
        zone.from_local_datetime(&naive)
            .earliest()
            // Midnight skipped by a DST change: the first instant of the day.
            .unwrap_or_else(|| zone.from_utc_datetime(&naive))
            .with_timezone(&Utc)
    };
    let end = at_midnight(monday);
    let start = at_midnight(monday - TimeDelta::days(7));
    (start, end)
}

/// The report of `[start, end)` from every event of a ledger, read in order.
pub fn weekly_from<'a>(
    events: impl IntoIterator<Item = &'a Envelope>,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    zone: chrono_tz::Tz,
    cost: Option<&CostEstimator>,
) -> WeeklyReport {
    let mut b = ReportBuilder::new(start, end, zone);
    for e in events {
        b.observe(e);
    }
    b.finish(cost)
}

/// Reads the whole ledger in order into a report of `[start, end)`.
pub fn weekly_of_ledger(
    ledger: &backstop_ledger::Ledger,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    zone: chrono_tz::Tz,
    cost: Option<&CostEstimator>,
) -> Result<WeeklyReport, backstop_ledger::LedgerError> {
    let mut b = ReportBuilder::new(start, end, zone);
    let mut from = 1;
    loop {
        let batch = ledger.read(from, 10_000)?;
        let Some(last) = batch.last() else { break };
        from = last.position + 1;
        for e in &batch {
            b.observe(e);
        }
    }
    Ok(b.finish(cost))
}

/// `serve`'s weekly composer: whenever the last full week (Monday to Monday in `zone`) has no
/// `report.generated` yet, and the ledger's history began before that week ended, composes it
/// from the ledger and records it. Looks again at the next
/// week's end, and at least hourly (a clock stepped forward is noticed). A failure is logged and
/// tried again an hour later: a report is late, never lost or doubled.
pub async fn run_weekly(
    ledger: backstop_ledger::Ledger,
    zone: chrono_tz::Tz,
    cost: Option<CostEstimator>,
    clock: &dyn crate::schedule::Clock,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), backstop_ledger::LedgerError> {
    use backstop_ledger::{Appender, ExpectedVersion};
    let mut done: Option<DateTime<Utc>> = None;
    loop {
        let now = clock.now();
        let (start, end) = last_full_week(now, zone);
        if done != Some(start) {
            let id = report_id(WEEKLY, start);
            let recorded = ledger.store().position_of(id)?.is_some();
            // A week that ended before the ledger's first event is not summarised: a new
            // installation's first email is not a summary of the week before it existed.
            let first = ledger.read(1, 1)?.into_iter().next().map(|e| e.occurred_at);
            let before_history = first.is_none_or(|f| f >= end);
            let outcome = if recorded || before_history {
                Ok(())
            } else {
                match weekly_of_ledger(&ledger, (start, end), zone, cost.as_ref()) {
                    Ok(report) => ledger
                        .append(
                            &streams::reports(),
                            ExpectedVersion::Any,
                            vec![report.event()],
                        )
                        .await
                        .map(|_| tracing::info!(%start, %end, "weekly summary composed")),
                    Err(e) => Err(e),
                }
            };
            match outcome {
                Ok(()) => done = Some(start),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot compose the weekly summary; trying again in an hour")
                }
            }
        }
        let next_end = last_full_week(end + TimeDelta::days(8), zone).1;
        let wake = next_end.min(now + TimeDelta::hours(1));
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            _ = clock.sleep_until(wake) => {}
        }
    }
}
