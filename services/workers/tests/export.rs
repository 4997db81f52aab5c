//! Scheduled table exports end to end without `serve`: an export schedule on a manual clock
//! fires `export.requested` through a real ledger, the export worker runs it against a real
//! PostgreSQL into an in-memory repository, and the exports' retention deletes it 90 days later.
//! Then the failures: a missing table, a source not configured here, and an unreachable server,
//! each recorded as `export.failed` (the last only once the consumer gives up).

use std::sync::Arc;

use backstop_events::{Envelope, Event, Trigger};
use backstop_ledger::consumer::{Handler, HandlerError};
use backstop_ledger::{Appender, Ledger, LedgerConfig};
use backstop_ops::export::list_exports;
use backstop_ops::export_lifecycle::{ORPHAN_GRACE, expire};
use backstop_ops::retention::RetentionConfig;
use backstop_ops::schedule::{ManualClock, Schedule, ScheduleConfig, tick};
use backstop_ops::{DataPath, SourceSpec};
use backstop_repo::{KeyAccessLog, MasterKey, RepoParams, Repository};
use backstop_testkit::{MemoryBackend, Postgres};
use backstop_workers::export::ExportWorker;
use bytes::Bytes;
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use uuid::Uuid;

fn utc(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

fn schedule(toml_text: &str) -> Schedule {
    let c: ScheduleConfig = toml::from_str(toml_text).unwrap();
    Schedule::new(c).unwrap()
}

async fn repo() -> Repository {
    Repository::init(
        Arc::new(MemoryBackend::new()),
        &MasterKey::from_bytes([5; 64]),
        RepoParams::default(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .unwrap()
}

fn of_type(ledger: &Ledger, t: &str) -> Vec<Envelope> {
    ledger
        .read(1, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == t)
        .collect()
}

/// Fires `s`'s slot due at `at` and returns its `export.requested`.
async fn fire(ledger: &Ledger, s: &Schedule, at: DateTime<Utc>) -> Envelope {
    let clock = ManualClock::new(at);
    let t = tick(s, ledger, ledger, &clock).await.unwrap();
    let fired = t.fired.expect("the slot is due");
    let stream = backstop_events::streams::export(fired.backup_id);
    let events = ledger.read_stream(&stream, 1).unwrap();
    assert_eq!(events.len(), 1, "one request per slot");
    events.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weekly_export_schedule_exports_records_and_expires_after_90_days() {
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE orders (id int PRIMARY KEY, v numeric); \
         INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(1, 5000) g; \
         CREATE TABLE audit (id int PRIMARY KEY, t text); \
         INSERT INTO audit SELECT g, md5(g::text) FROM generate_series(1, 300) g;",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let repo = repo().await;
    let dp = DataPath {
        repo: repo.clone(),
        appender: Arc::new(ledger.clone()),
        sources: vec![SourceSpec::postgres("app", pg.conninfo("app"), 1)],
    };
    let worker = ExportWorker {
        data_path: dp.clone(),
    };
    // Sundays 03:00 in New York; 2026-11-01 is a Sunday (EST from 02:00 that day: 08:00 UTC).
    let weekly = schedule(
        "name = \"orders-weekly\"\nsource = \"app\"\ncron = \"0 3 * * sun\"\njob = \"export\"\ntables = [\"orders\"]",
    );
    let request = fire(&ledger, &weekly, utc(2026, 11, 1, 8)).await;
    let Ok(Event::ExportRequested(r)) = request.event() else {
        panic!("{request:?}")
    };
    assert_eq!(r.tables, vec!["orders".to_string()]);
    assert!(matches!(r.trigger, Trigger::Schedule { ref schedule } if schedule == "orders-weekly"));
    // A second look in the same slot requests nothing more.
    let again = tick(
        &weekly,
        &ledger,
        &ledger,
        &ManualClock::new(utc(2026, 11, 1, 9)),
    )
    .await
    .unwrap();
    assert!(again.fired.is_none());

    assert!(worker.wants("export.requested"));
    worker.handle(&request, &ledger).await.unwrap();
    let done = of_type(&ledger, "export.completed");
    assert_eq!(done.len(), 1);
    let Ok(Event::ExportCompleted(c)) = done[0].event() else {
        panic!()
    };
    assert_eq!((c.export_id, c.tables, c.rows), (r.export_id, 1, 5000));
    assert!(c.sealed_bytes > 0);
    assert_eq!(done[0].causation_id, Some(request.id));
    // A redelivery records nothing twice and does not export again.
    let before = ledger.read(1, 10_000).unwrap().len();
    worker.handle(&request, &ledger).await.unwrap();
    assert_eq!(ledger.read(1, 10_000).unwrap().len(), before);
    let exports = list_exports(&repo).await.unwrap();
    assert_eq!(exports.len(), 1);
    assert_eq!(exports[0].export_id, r.export_id);

    // Retention, measured from the export's finish (real time, when the worker ran it).
    let finished = exports[0].finished_at;
    let actor = backstop_events::Actor::worker("retention");
    // No [[retention]] entry: the class default, 90 days.
    let defaults = RetentionConfig::new(Vec::new()).unwrap();
    // A source's own entry overrides it: keep_last keeps the newest export whatever its age.
    let keep_one: RetentionConfig = RetentionConfig::new(vec![
        toml::from_str("source = \"app\"\nclass = \"exports\"\nkeep_last = 1").unwrap(),
    ])
    .unwrap();
    let kept = expire(
        &repo,
        &ledger,
        &keep_one,
        finished + TimeDelta::days(400),
        &actor,
        true,
    )
    .await
    .unwrap();
    assert_eq!((kept.deleted.len(), kept.kept), (0, 1), "{kept:?}");
    let young = expire(
        &repo,
        &ledger,
        &defaults,
        finished + TimeDelta::days(89),
        &actor,
        false,
    )
    .await
    .unwrap();
    assert_eq!((young.deleted.len(), young.kept), (0, 1));
    // An orphan: pieces of an export that never got its index, with an id two days old.
    let orphan_id =
        backstop_events::uuid_v7_derived(Uuid::nil(), finished - ORPHAN_GRACE * 2, "orphan");
    let orphan = format!("exports/{orphan_id}/data/0000-000000");
    repo.backend()
        .put(&orphan, Bytes::from_static(b"left by a failed export"))
        .await
        .unwrap();
    let dry = expire(
        &repo,
        &ledger,
        &defaults,
        finished + TimeDelta::days(91),
        &actor,
        true,
    )
    .await
    .unwrap();
    assert_eq!((dry.deleted.len(), dry.orphan_objects), (1, 1));
    assert!(
        of_type(&ledger, "export.deleted").is_empty(),
        "a dry run records nothing"
    );
    assert_eq!(list_exports(&repo).await.unwrap().len(), 1);

    let old = expire(
        &repo,
        &ledger,
        &defaults,
        finished + TimeDelta::days(91),
        &actor,
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        (old.deleted.len(), old.orphan_objects, old.delete_failures),
        (1, 1, 0)
    );
    let deleted = of_type(&ledger, "export.deleted");
    assert_eq!(deleted.len(), 1);
    let Ok(Event::ExportDeleted(d)) = deleted[0].event() else {
        panic!()
    };
    assert_eq!((d.export_id, d.finished_at), (r.export_id, finished));
    assert!(
        repo.backend().list("exports/").await.unwrap().is_empty(),
        "every object of the expired export and the orphan is gone"
    );
    // A second pass finds nothing and records nothing.
    let n = ledger.read(1, 10_000).unwrap().len();
    let again = expire(
        &repo,
        &ledger,
        &defaults,
        finished + TimeDelta::days(92),
        &actor,
        false,
    )
    .await
    .unwrap();
    assert!(again.deleted.is_empty());
    assert_eq!(ledger.read(1, 10_000).unwrap().len(), n);

    // A foreground request is the operator's command's: the worker leaves it alone.
    let mut fg = r.clone();
    fg.export_id = Uuid::now_v7();
    fg.trigger = Trigger::Foreground { host: "h".into() };
    let fg_event = append_request(&ledger, &fg).await;
    worker.handle(&fg_event, &ledger).await.unwrap();
    assert!(list_exports(&repo).await.unwrap().is_empty());
}

async fn append_request(ledger: &Ledger, r: &backstop_events::ExportRequested) -> Envelope {
    let stream = backstop_events::streams::export(r.export_id);
    let e = backstop_events::NewEvent::new(
        &stream,
        backstop_events::Actor::operator("alice"),
        &Event::ExportRequested(r.clone()),
    );
    let id = e.id;
    ledger
        .append(&stream, backstop_ledger::ExpectedVersion::NoStream, vec![e])
        .await
        .unwrap();
    ledger
        .read_stream(&stream, 1)
        .unwrap()
        .into_iter()
        .find(|e| e.id == id)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_exports_are_recorded_with_their_reason() {
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    pg.psql("app", "CREATE TABLE a (id int PRIMARY KEY);")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let repo = repo().await;
    let dp = DataPath {
        repo: repo.clone(),
        appender: Arc::new(ledger.clone()),
        sources: vec![
            SourceSpec::postgres("app", pg.conninfo("app"), 1),
            SourceSpec::postgres("gone", "postgres://postgres@127.0.0.1:1/app", 1),
        ],
    };
    let worker = ExportWorker { data_path: dp };
    let request = |source: &str, tables: &[&str]| backstop_events::ExportRequested {
        export_id: Uuid::now_v7(),
        source: source.into(),
        tables: tables.iter().map(|t| t.to_string()).collect(),
        trigger: Trigger::Schedule {
            schedule: "s".into(),
        },
    };
    let reason = |ledger: &Ledger, id: Uuid| -> Option<String> {
        of_type(ledger, "export.failed")
            .into_iter()
            .find_map(|e| match e.event() {
                Ok(Event::ExportFailed(f)) if f.export_id == id => Some(f.reason),
                _ => None,
            })
    };

    // A missing table: permanent, recorded at once, the event done.
    let missing = request("app", &["nope"]);
    let ev = append_request(&ledger, &missing).await;
    worker.handle(&ev, &ledger).await.unwrap();
    let why = reason(&ledger, missing.export_id).expect("recorded");
    assert!(why.contains("nope") && why.contains("public.a"), "{why}");

    // A source this worker does not know: recorded, not retried.
    let unknown = request("elsewhere", &[]);
    let ev = append_request(&ledger, &unknown).await;
    worker.handle(&ev, &ledger).await.unwrap();
    let why = reason(&ledger, unknown.export_id).expect("recorded");
    assert!(why.contains("elsewhere"), "{why}");

    // An unreachable server: retried with nothing recorded, then recorded when the consumer
    // gives up.
    let down = request("gone", &[]);
    let ev = append_request(&ledger, &down).await;
    let err: HandlerError = worker.handle(&ev, &ledger).await.unwrap_err();
    assert!(err.retryable, "{}", err.message);
    assert!(reason(&ledger, down.export_id).is_none());
    worker.give_up(&ev, &err, &ledger).await.unwrap();
    let why = reason(&ledger, down.export_id).expect("recorded on giving up");
    assert!(why.contains("gave up"), "{why}");
    assert!(repo.backend().list("exports/").await.unwrap().is_empty());
    assert!(of_type(&ledger, "export.completed").is_empty());
}
