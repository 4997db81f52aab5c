//! A `backup.completed` delivered again after its verification was recorded (a verifier killed
//! before its ack) is verified again and ends quietly: the ledger, which compares a re-offered
//! event's content, refuses the second pass (its timings differ) and the use case counts the
//! pass as recorded, instead of dead-lettering the event. Real PostgreSQL, a real ledger.

mod support;

use std::sync::Arc;

use backstop_events::{Actor, Event};
use backstop_ledger::{Ledger, LedgerConfig};
use backstop_ops::verify::{VerifyOutcome, verify_completed};
use backstop_testkit::Postgres;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_completion_after_a_recorded_pass_ends_quietly() {
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 50);",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let dp = support::data_path(
        support::memory_repo().await,
        Arc::new(ledger.clone()),
        "app",
        pg.conninfo("app"),
    );
    let actor = Actor::worker("verify");
    support::back_up(&dp, "app", &actor).await;
    let completed = ledger
        .read(1, 1000)
        .unwrap()
        .into_iter()
        .find(|e| e.event_type == "backup.completed")
        .expect("the backup completed");
    let Ok(Event::BackupCompleted(done)) = completed.event() else {
        unreachable!()
    };
    let settings = support::scratch_settings(pg.scratch_role().unwrap(), false);
    for delivery in 0..2 {
        let outcome = verify_completed(&dp, &settings, &completed, &done, &actor)
            .await
            .unwrap_or_else(|e| panic!("delivery {delivery}: {}", e.chain()));
        assert!(
            matches!(outcome, VerifyOutcome::Passed),
            "delivery {delivery}"
        );
    }
    let passes = ledger
        .read(1, 1000)
        .unwrap()
        .iter()
        .filter(|e| e.event_type == "verification.passed")
        .count();
    assert_eq!(passes, 1, "one pass recorded for two deliveries");
    drop(dp);
    ledger.close().await;
}
