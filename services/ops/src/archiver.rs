//! The WAL archiver probe: each source's `pg_stat_archiver`, so a failing `archive_command` is
//! an alert before the RPO is lost, not a surprise at restore time.
//!
//! `wal.archived` events say what reached the repository; they cannot say that PostgreSQL is
//! trying and failing (a wrong key path, a full disk, a repository that refuses writes): only
//! the server knows. So every [`PROBE_EVERY`] `serve` reads `pg_stat_archiver` of every
//! configured source whose `archive_mode` is not `off`, and records `wal.archiver_checked`:
//!
//! - when the source's state changes (failing: its newest failure is newer than its newest
//!   success), and
//! - once per [`SAMPLE_EVERY`] otherwise, so the ledger shows the archiver was watched without
//!   growing by a check every five minutes.
//!
//! Event ids derive from the source and the probe's slot (the check time floored to
//! [`PROBE_EVERY`]), so two `serve` processes probing the same source in the same slot record
//! one event. A source that cannot be reached is logged and skipped: its backups fail and raise
//! their own alerts.

use std::collections::HashMap;
use std::time::Duration;

use backstop_events::{Actor, Event, NewEvent, WalArchiverChecked, streams, uuid_v7_derived};
use backstop_ledger::{Appender, ExpectedVersion};
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::Connection;
use tokio::sync::watch;
use uuid::Uuid;

use crate::SourceSpec;
use crate::schedule::Clock;

pub const PROBE_EVERY: Duration = Duration::from_secs(300);
pub const SAMPLE_EVERY: Duration = Duration::from_secs(3600);
/// How long one probe may take (connect and query).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ArchiverError {
    #[error("cannot read pg_stat_archiver of source `{source_name}`: {source}")]
    Query {
        source_name: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("reading pg_stat_archiver of source `{source_name}` took longer than {seconds} s")]
    Timeout { source_name: String, seconds: u64 },
}

impl ArchiverError {
    /// Every probe failure is worth trying again at the next probe.
    pub fn is_transient(&self) -> bool {
        true
    }
}

/// `archive_mode`, then `pg_stat_archiver`'s counts, last archived WAL and time, last failed WAL
/// and time.
type ArchiverRow = (
    String,
    i64,
    i64,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<DateTime<Utc>>,
);

/// One reading of `pg_stat_archiver`, or None when archiving is off.
pub async fn read_status(source: &SourceSpec) -> Result<Option<WalArchiverChecked>, ArchiverError> {
    // Only PostgreSQL sources archive WAL.
    let crate::context::SourceKind::Postgres(pg) = &source.kind else {
        return Ok(None);
    };
    let query = async {
        let mut conn = sqlx::PgConnection::connect(&pg.conninfo).await?;
        let row: ArchiverRow = sqlx::query_as(
            "SELECT current_setting('archive_mode'), archived_count, failed_count, \
                   last_archived_wal, last_archived_time, last_failed_wal, last_failed_time \
                 FROM pg_stat_archiver",
        )
        .fetch_one(&mut conn)
        .await?;
        let _ = conn.close().await;
        Ok::<_, sqlx::Error>(row)
    };
    let row = tokio::time::timeout(PROBE_TIMEOUT, query)
        .await
        .map_err(|_| ArchiverError::Timeout {
            source_name: source.name.clone(),
            seconds: PROBE_TIMEOUT.as_secs(),
        })?
        .map_err(|e| ArchiverError::Query {
            source_name: source.name.clone(),
            source: e,
        })?;
    let (mode, archived, failed, last_wal, last_at, failed_wal, failed_at) = row;
    if mode == "off" {
        return Ok(None);
    }
    Ok(Some(WalArchiverChecked {
        source: source.name.clone(),
        failing: failing(last_at, failed_at),
        archived_count: u64::try_from(archived).unwrap_or(0),
        failed_count: u64::try_from(failed).unwrap_or(0),
        last_archived_wal: last_wal,
        last_archived_at: last_at,
        last_failed_wal: failed_wal,
        last_failed_at: failed_at,
    }))
}

/// The archiver's newest attempt failed.
pub fn failing(last_archived: Option<DateTime<Utc>>, last_failed: Option<DateTime<Utc>>) -> bool {
    match (last_archived, last_failed) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(ok), Some(bad)) => bad > ok,
    }
}

/// Which readings to record (see the module doc): per source, the state and time last recorded.
#[derive(Default)]
pub struct Recorder {
    last: HashMap<String, (bool, DateTime<Utc>)>,
}

impl Recorder {
    /// Whether to record `check` taken at `now`; remembers it if so.
    pub fn take(&mut self, check: &WalArchiverChecked, now: DateTime<Utc>) -> bool {
        let sample = TimeDelta::from_std(SAMPLE_EVERY).unwrap_or(TimeDelta::hours(1));
        let record = match self.last.get(&check.source) {
            None => true,
            Some((was, at)) => *was != check.failing || now - *at >= sample,
        };
        if record {
            self.last.insert(check.source.clone(), (check.failing, now));
        }
        record
    }
}

/// The probe's slot: `now` floored to [`PROBE_EVERY`].
fn slot(now: DateTime<Utc>) -> DateTime<Utc> {
    let every = PROBE_EVERY.as_secs() as i64;
    let floored = now.timestamp().div_euclid(every) * every;
    DateTime::from_timestamp(floored, 0).unwrap_or(now)
}

/// The event for a check taken at `now`.
pub fn event(check: WalArchiverChecked, now: DateTime<Utc>) -> NewEvent {
    let at = slot(now);
    let id = uuid_v7_derived(Uuid::nil(), at, &format!("archiver:{}", check.source));
    let mut e = NewEvent::new(
        streams::source(&check.source),
        Actor::worker("archiver-probe"),
        &Event::WalArchiverChecked(check),
    )
    .with_id(id);
    e.occurred_at = now;
    e
}

/// `serve`'s probe loop over `sources` until `shutdown`.
pub async fn run_probe(
    sources: Vec<SourceSpec>,
    appender: &dyn Appender,
    clock: &dyn Clock,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), backstop_ledger::LedgerError> {
    let mut recorder = Recorder::default();
    let every = TimeDelta::from_std(PROBE_EVERY).unwrap_or(TimeDelta::minutes(5));
    loop {
        let now = clock.now();
        for source in &sources {
            match read_status(source).await {
                Ok(None) => {}
                Ok(Some(check)) => {
                    if !recorder.take(&check, now) {
                        continue;
                    }
                    let e = event(check, now);
                    let stream = e.stream.clone();
                    if let Err(err) = appender
                        .append(&stream, ExpectedVersion::Any, vec![e])
                        .await
                        // Another `serve` recorded this slot first, with its own reading.
                        && !err.is_id_reused()
                    {
                        tracing::warn!(source = %source.name, error = %err, "cannot record the archiver's state; it is probed again in 5 minutes");
                        // Not recorded: forget it, so the next probe records it.
                        recorder.last.remove(&source.name);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, transient = e.is_transient(), "WAL archiver probe failed")
                }
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            _ = clock.sleep_until(now + every) => {}
        }
    }
}
