//! The `keys` and `reencryption_jobs` read models against a real PostgreSQL and ledger: a
//! rotation adds the new version and leaves the old one unretired (it still opens what it
//! sealed), `key.retired` is what marks it retired; a re-encryption job's progress across a
//! failed run and its resumption, as the dashboard shows it.

use backstop_events::{
    Actor, Event, KeyCreated, KeyRetired, KeyRotated, NewEvent, ReencryptionCompleted,
    ReencryptionFailed, ReencryptionProgressed, ReencryptionStarted, streams,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};
use backstop_projections::{Projections, projectors};
use backstop_testkit::Postgres;

async fn append(ledger: &Ledger, event: Event) {
    let e = NewEvent::new(streams::keys("database"), Actor::System, &event);
    ledger
        .append(&e.stream.clone(), ExpectedVersion::Any, vec![e])
        .await
        .expect("append");
}

async fn rebuild(p: &Projections, ledger: &Ledger) {
    for proj in projectors() {
        p.rebuild(ledger, proj.as_ref(), 7).await.expect("rebuild");
    }
}

async fn retired(p: &Projections, key_id: &str) -> Option<bool> {
    sqlx::query_scalar("SELECT retired_at IS NOT NULL FROM keys WHERE key_id = $1")
        .bind(key_id)
        .fetch_optional(p.pool())
        .await
        .expect("query")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_version_is_retired_only_by_key_retired() {
    let pg = Postgres::start().expect("start PostgreSQL");
    pg.create_db("keys").expect("create db");
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).expect("open ledger");
    let p = Projections::connect(&pg.conninfo("keys"))
        .await
        .expect("connect");
    p.migrate().await.expect("migrate");

    append(
        &ledger,
        Event::KeyCreated(KeyCreated {
            purpose: "database".into(),
            key_id: "database-v1-00000001".into(),
            version: 1,
        }),
    )
    .await;
    append(
        &ledger,
        Event::KeyRotated(KeyRotated {
            purpose: "database".into(),
            old_key_id: "database-v1-00000001".into(),
            new_key_id: "database-v2-00000002".into(),
            version: 2,
        }),
    )
    .await;
    rebuild(&p, &ledger).await;
    assert_eq!(retired(&p, "database-v1-00000001").await, Some(false));
    assert_eq!(retired(&p, "database-v2-00000002").await, Some(false));

    append(
        &ledger,
        Event::KeyRetired(KeyRetired {
            purpose: "database".into(),
            key_id: "database-v1-00000001".into(),
            version: 1,
        }),
    )
    .await;
    rebuild(&p, &ledger).await;
    assert_eq!(retired(&p, "database-v1-00000001").await, Some(true));
    assert_eq!(retired(&p, "database-v2-00000002").await, Some(false));
    ledger.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reencryption_job_shows_its_progress_through_a_failed_run_to_completion() {
    let pg = Postgres::start().expect("start PostgreSQL");
    pg.create_db("jobs").expect("create db");
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).expect("open ledger");
    let p = Projections::connect(&pg.conninfo("jobs"))
        .await
        .expect("connect");
    p.migrate().await.expect("migrate");
    let job = uuid::Uuid::now_v7();
    let progressed = |n: u64, objects: u64| {
        Event::ReencryptionProgressed(ReencryptionProgressed {
            job_id: job,
            backup_id: uuid::Uuid::now_v7(),
            objects,
            bytes: objects * 1000,
            manifest_sha3: "ab".repeat(32),
            backups_done: n,
            backups_total: 3,
        })
    };
    append(
        &ledger,
        Event::ReencryptionStarted(ReencryptionStarted {
            job_id: job,
            purpose: "database,files".into(),
            from_key_id: "database-v1-00000001".into(),
            to_key_id: "database-v2-00000002".into(),
            backups: 3,
        }),
    )
    .await;
    append(&ledger, progressed(1, 40)).await;
    append(
        &ledger,
        Event::ReencryptionFailed(ReencryptionFailed {
            job_id: job,
            reason: "the store is unreachable".into(),
        }),
    )
    .await;
    rebuild(&p, &ledger).await;
    let rows = p.reencryption_jobs(10).await.expect("jobs");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].state.as_str(),
            rows[0].backups_done,
            rows[0].backups_total
        ),
        ("failed", 1, 3)
    );
    assert_eq!(rows[0].reason.as_deref(), Some("the store is unreachable"));

    // Resumed: progress makes it running again, completion closes it.
    append(&ledger, progressed(2, 5)).await;
    rebuild(&p, &ledger).await;
    let rows = p.reencryption_jobs(10).await.expect("jobs");
    assert_eq!(
        (rows[0].state.as_str(), rows[0].backups_done),
        ("running", 2)
    );
    assert_eq!(rows[0].reason, None);
    append(&ledger, progressed(3, 5)).await;
    append(
        &ledger,
        Event::ReencryptionCompleted(ReencryptionCompleted {
            job_id: job,
            objects: 10,
            bytes: 10_000,
            backups: 3,
        }),
    )
    .await;
    rebuild(&p, &ledger).await;
    let rows = p.reencryption_jobs(10).await.expect("jobs");
    assert_eq!(rows[0].state, "completed");
    assert_eq!((rows[0].backups_done, rows[0].backups_total), (3, 3));
    assert_eq!((rows[0].objects, rows[0].bytes), (50, 50_000));
    assert_eq!(rows[0].to_key_id, "database-v2-00000002");
    ledger.close().await;
}
