//! A scheduled backup of a configuration source closed as `backup.skipped` (unchanged since its
//! newest backup) against a real PostgreSQL and ledger: the request's row goes, so it is neither
//! pending nor failed and the backups list shows only the real backup.

use backstop_events::{
    Actor, BackupKind, BackupMethod, BackupRequested, BackupSkipped, Event, NewEvent, Trigger,
    streams, uuid_v7,
};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};
use backstop_projections::{Projections, projectors, sample};
use backstop_testkit::Postgres;

async fn rebuild(p: &Projections, ledger: &Ledger) {
    for proj in projectors() {
        p.rebuild(ledger, proj.as_ref(), 7).await.expect("rebuild");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_request_is_neither_pending_nor_failed_nor_listed() {
    let pg = Postgres::start().expect("start PostgreSQL");
    pg.create_db("skipped").expect("create db");
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).expect("open ledger");
    let p = Projections::connect(&pg.conninfo("skipped"))
        .await
        .expect("connect");
    p.migrate().await.expect("migrate");

    // A completed backup of `cfg`, then a scheduled request skipped against it.
    let (first, events) = sample::backup(&sample::BackupSpec::new("cfg", chrono::Utc::now(), 100));
    for e in events {
        ledger
            .append(&e.stream.clone(), ExpectedVersion::Any, vec![e])
            .await
            .expect("append");
    }
    let skipped = uuid_v7();
    let stream = streams::backup(skipped);
    let actor = Actor::worker("backup");
    let requested = NewEvent::new(
        &stream,
        actor.clone(),
        &Event::BackupRequested(BackupRequested {
            backup_id: skipped,
            source: "cfg".into(),
            kind: BackupKind::Full,
            method: BackupMethod::Config,
            trigger: Trigger::Schedule {
                schedule: "cfg-on-change".into(),
            },
            attempt: 1,
        }),
    );
    ledger
        .append(&stream, ExpectedVersion::NoStream, vec![requested])
        .await
        .expect("append");
    rebuild(&p, &ledger).await;
    assert_eq!(
        p.backup(skipped).await.expect("read").map(|r| r.state),
        Some("requested".to_string()),
        "pending until it is handled"
    );
    let skip = NewEvent::new(
        &stream,
        actor,
        &Event::BackupSkipped(BackupSkipped {
            backup_id: skipped,
            source: "cfg".into(),
            unchanged_since: first,
            reason: format!("configuration unchanged since backup {first}"),
        }),
    );
    ledger
        .append(&stream, ExpectedVersion::Any, vec![skip])
        .await
        .expect("append");
    rebuild(&p, &ledger).await;
    assert!(p.backup(skipped).await.expect("read").is_none());
    let listed: Vec<_> = p
        .backups(Some("cfg"), None, 100)
        .await
        .expect("list")
        .into_iter()
        .map(|r| (r.backup_id, r.state))
        .collect();
    assert_eq!(listed, vec![(first, "completed".to_string())]);
    ledger.close().await;
}
