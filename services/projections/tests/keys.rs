//! The `keys` read model against a real PostgreSQL and ledger: a rotation adds the new version
//! and leaves the old one current-until-retired (it still opens what it sealed); `key.retired`
//! is what marks it retired.

use backstop_events::{Actor, Event, KeyCreated, KeyRetired, KeyRotated, NewEvent, streams};
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
