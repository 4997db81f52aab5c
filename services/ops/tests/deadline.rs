//! Backups have limits: a table lock held by someone else fails the dump after the lock wait,
//! with the reason; a backup stuck past its deadline is stopped, its `pg_dump` killed, and
//! recorded as failed. Real PostgreSQL; the waits are the server's (a second or so), not ours.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backstop_events::{BackupRequested, Event};
use backstop_ops::backup::{BackupOptions, run_backup};
use backstop_ops::{DataPath, OpsError};
use backstop_testkit::{Postgres, RecordingAppender};
use chrono::Utc;
use sqlx::Connection;

struct World {
    pg: Postgres,
    ledger: Arc<RecordingAppender>,
    dp: DataPath,
    /// Holds an ACCESS EXCLUSIVE lock on `trades` until dropped.
    locker: sqlx::PgConnection,
}

async fn world() -> World {
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE trades (id int PRIMARY KEY, px numeric); INSERT INTO trades SELECT g, g FROM generate_series(1, 100) g;",
    )
    .unwrap();
    let mut locker = sqlx::PgConnection::connect(&pg.conninfo("app"))
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE trades IN ACCESS EXCLUSIVE MODE;")
        .execute(&mut locker)
        .await
        .unwrap();
    let ledger = Arc::new(RecordingAppender::new());
    let dp = support::data_path(
        support::memory_repo().await,
        ledger.clone(),
        "app",
        pg.conninfo("app"),
    );
    World {
        pg,
        ledger,
        dp,
        locker,
    }
}

fn request() -> BackupRequested {
    support::logical_request("app")
}

fn failure_reason(ledger: &RecordingAppender) -> String {
    match ledger.of_type("backup.failed").first() {
        Some(Event::BackupFailed(f)) => f.reason.clone(),
        other => panic!("no backup.failed recorded: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_locked_by_someone_else_fails_the_dump_after_the_lock_wait() {
    let w = world().await;
    let opts = BackupOptions {
        lock_wait_timeout: Some(Duration::from_millis(500)),
        ..Default::default()
    };
    let actor = backstop_events::Actor::operator("alice");
    let opts = BackupOptions {
        failures: backstop_ops::backup::FailureRecording::Always,
        ..opts
    };
    let e = run_backup(&w.dp, &request(), Utc::now(), &actor, None, &opts)
        .await
        .expect_err("the lock is held");
    let reason = failure_reason(&w.ledger);
    // Typed: retried later, and the reason says what holds it up and where to look.
    assert!(e.is_transient(), "{e}");
    assert!(reason.contains("locked by another session"), "{reason}");
    assert!(
        reason.contains("lock_wait_timeout") && reason.contains("pg_locks"),
        "{reason}"
    );
    assert!(w.ledger.of_type("backup.completed").is_empty());
    drop(w.locker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_past_its_deadline_is_stopped_recorded_and_its_pg_dump_killed() {
    let w = world().await;
    // No lock wait limit: without the deadline this backup would wait as long as the lock.
    let opts = BackupOptions {
        deadline: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let actor = backstop_events::Actor::operator("alice");
    let t = Instant::now();
    let e = run_backup(&w.dp, &request(), Utc::now(), &actor, None, &opts)
        .await
        .expect_err("past the deadline");
    assert!(
        matches!(e, OpsError::DeadlineExceeded { limit_secs: 1, .. }),
        "{e}"
    );
    assert!(!e.is_transient());
    assert!(t.elapsed() < Duration::from_secs(30));
    let reason = failure_reason(&w.ledger);
    assert!(
        reason.contains("deadline") && reason.contains("job_deadline"),
        "{reason}"
    );
    assert!(w.ledger.of_type("backup.completed").is_empty());
    // The dump's sessions are gone: nothing of it still waits on the lock.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting = w
            .pg
            .psql(
                "app",
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND wait_event_type = 'Lock'",
            )
            .unwrap();
        if waiting.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still waiting on the lock: {waiting}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(w.locker);
}
