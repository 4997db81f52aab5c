//! Projections against a real PostgreSQL 15 and a real ledger: the incremental build equals a
//! rebuild, a projector interrupted mid-batch resumes with nothing applied twice, and two
//! projectors of the same name serialize instead of double-applying.

use std::sync::Arc;
use std::time::Duration;

use backstop_events::{BackupKind, NewEvent};
use backstop_ledger::{Appender, ExpectedVersion, Ledger, LedgerConfig};
use backstop_projections::sample::{self, BackupSpec};
use backstop_projections::{Projections, Projector, projectors};
use backstop_testkit::Postgres;
use chrono::Utc;

struct Env {
    _pg: Postgres,
    _dir: tempfile::TempDir,
    ledger: Ledger,
    projections: Projections,
}

async fn env(db: &str) -> Env {
    let pg = Postgres::start().expect("start PostgreSQL");
    pg.create_db(db).expect("create db");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = LedgerConfig::in_data_dir(dir.path());
    cfg.checkpoint_every = 100;
    let ledger = Ledger::open(&cfg).expect("open ledger");
    let projections = Projections::connect(&pg.conninfo(db))
        .await
        .expect("connect");
    projections.migrate().await.expect("migrate");
    Env {
        _pg: pg,
        _dir: dir,
        ledger,
        projections,
    }
}

async fn append_all(ledger: &Ledger, events: Vec<NewEvent>) {
    // Group consecutive events of one stream into one append, as a worker would.
    let mut group: Vec<NewEvent> = Vec::new();
    for e in events {
        if group.first().is_some_and(|g| g.stream != e.stream) {
            let stream = group[0].stream.clone();
            ledger
                .append(&stream, ExpectedVersion::Any, std::mem::take(&mut group))
                .await
                .expect("append");
        }
        group.push(e);
    }
    if let Some(first) = group.first() {
        let stream = first.stream.clone();
        ledger
            .append(&stream, ExpectedVersion::Any, group)
            .await
            .expect("append");
    }
}

/// A day of activity: backups of two sources, one failed verification, storage samples, key
/// accesses, an alert.
fn activity(day: i64) -> Vec<NewEvent> {
    let base = Utc::now() - chrono::Duration::days(10 - day);
    let mut out = Vec::new();
    for (i, source) in ["trading", "reference"].iter().enumerate() {
        let mut spec = BackupSpec::new(
            source,
            base + chrono::Duration::minutes(i as i64),
            1_000_000 * (day as u64 + 1),
        );
        spec.kind = if day % 7 == 0 {
            BackupKind::Full
        } else {
            BackupKind::Incremental
        };
        spec.verified = match (day, i) {
            (3, 0) => Some(false),
            (_, 1) if day % 2 == 1 => None,
            _ => Some(true),
        };
        out.extend(sample::backup(&spec).1);
        out.push(sample::key_access("database", "backup"));
    }
    out.push(sample::health_check(
        base,
        "platform",
        40 + day as u64,
        if day == 4 {
            backstop_events::HealthState::Down
        } else {
            backstop_events::HealthState::Up
        },
    ));
    out.push(sample::storage_sample(
        base,
        10_000_000 * day as u64,
        100 * day as u64,
    ));
    if day == 3 {
        out.push(sample::alert(
            "verification_failed",
            "trading",
            "row counts differ",
        ));
    }
    out
}

/// Every projector's tables, dumped as sorted JSON lines, table by table.
async fn dump(p: &Projections) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for proj in projectors() {
        for table in proj.tables() {
            let text: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '') \
                 FROM (SELECT to_jsonb(t) AS x FROM {table} t) s"
            )))
            .fetch_one(p.pool())
            .await
            .expect("dump");
            out.push((table.to_string(), text));
        }
    }
    out
}

async fn total_counted(p: &Projections) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(events), 0)::bigint FROM event_counts")
        .fetch_one(p.pool())
        .await
        .expect("sum")
}

async fn wait_caught_up(p: &Projections, head: u64) {
    for _ in 0..600 {
        let positions = p.positions().await.expect("positions");
        if positions.len() == 2 && positions.iter().all(|(_, pos)| *pos >= head) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("projectors did not reach {head}: {:?}", p.positions().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_incremental_build_equals_a_rebuild_from_position_1() {
    let env = env("incremental").await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for proj in projectors() {
        tasks.push(tokio::spawn(backstop_projections::run(
            env.projections.clone(),
            env.ledger.clone(),
            proj,
            stop.clone(),
        )));
    }
    // Appended in bursts while the projectors follow live, so they see many small batches.
    for day in 0..10 {
        append_all(&env.ledger, activity(day)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let head = env.ledger.head().position;
    wait_caught_up(&env.projections, head).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        t.await.expect("projector task");
    }

    let incremental = dump(&env.projections).await;
    assert_eq!(total_counted(&env.projections).await, head as i64);

    // What the read models say is right, not only consistent.
    let sources = env.projections.sources().await.expect("sources");
    assert_eq!(sources.len(), 2);
    let trading = sources
        .iter()
        .find(|s| s.source == "trading")
        .expect("trading");
    let last = trading.last_success.as_ref().expect("a success");
    assert_eq!(last.state, "completed");
    assert_eq!(last.raw_bytes, Some(10_000_000));
    assert_eq!(last.verification_state, "passed");
    assert_eq!(trading.completed, 10);
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM backups WHERE verification_state = 'failed'")
            .fetch_one(env.projections.pool())
            .await
            .unwrap();
    assert_eq!(failed, 1);
    let audit: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(env.projections.pool())
        .await
        .unwrap();
    assert_eq!(audit, head as i64);
    let est = env
        .projections
        .recovery_estimate(Some("trading"))
        .await
        .unwrap()
        .expect("an estimate");
    assert!(est.estimated_seconds.unwrap() > 0.0);

    for proj in projectors() {
        env.projections
            .rebuild(&env.ledger, proj.as_ref(), 7)
            .await
            .expect("rebuild");
    }
    let rebuilt = dump(&env.projections).await;
    for ((table, a), (_, b)) in incremental.iter().zip(rebuilt.iter()) {
        assert!(
            !a.is_empty()
                || table == "storage_connectivity"
                || table == "health_status"
                || table == "recoveries"
                || table == "reencryption_jobs"
                || table == "keys"
                || table == "drills"
                || table == "dead_letters"
                || table == "replication_lag"
                || table == "replication_status",
            "table {table} is empty"
        );
        assert_eq!(
            a, b,
            "table {table} differs between the incremental build and the rebuild"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_interrupted_mid_batch_resumes_with_nothing_applied_twice() {
    let env = env("interrupted").await;
    for day in 0..10 {
        append_all(&env.ledger, activity(day)).await;
    }
    let head = env.ledger.head().position;
    let state: Arc<dyn Projector> = Arc::new(backstop_projections::state::StateProjector);
    let audit: Arc<dyn Projector> = Arc::new(backstop_projections::audit::AuditProjector);

    // 1. A batch applied inside a transaction that is dropped before its commit, as when the
    //    process dies between the row writes and the commit.
    let events = env.ledger.read(1, 40).unwrap();
    for proj in [&state, &audit] {
        let mut tx = env.projections.pool().begin().await.unwrap();
        proj.apply(&mut tx, &events).await.unwrap();
        drop(tx);
    }
    assert_eq!(total_counted(&env.projections).await, 0);

    // 2. Projector tasks aborted at arbitrary points, many times, each resuming from what the
    //    database committed.
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    for round in 0..25u64 {
        let mut tasks = Vec::new();
        for proj in [&state, &audit] {
            tasks.push(tokio::spawn(backstop_projections::run(
                env.projections.clone(),
                env.ledger.clone(),
                proj.clone(),
                stop.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(3 + round % 7)).await;
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }
    let mid = env.projections.position(state.name()).await.unwrap();
    assert_eq!(total_counted(&env.projections).await, mid as i64);

    // 3. Finish; every event counted exactly once, and the tables equal a clean rebuild.
    for proj in [&state, &audit] {
        env.projections
            .catch_up(&env.ledger, proj.as_ref(), 13)
            .await
            .unwrap();
    }
    assert_eq!(total_counted(&env.projections).await, head as i64);
    let resumed = dump(&env.projections).await;
    for proj in [&state, &audit] {
        env.projections
            .rebuild(&env.ledger, proj.as_ref(), 1000)
            .await
            .unwrap();
    }
    assert_eq!(total_counted(&env.projections).await, head as i64);
    assert_eq!(resumed, dump(&env.projections).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_of_one_projector_serialize_instead_of_double_applying() {
    let env = env("racing").await;
    for day in 0..10 {
        append_all(&env.ledger, activity(day)).await;
    }
    let head = env.ledger.head().position;
    let state = backstop_projections::state::StateProjector;
    let (a, b) = tokio::join!(
        env.projections.catch_up(&env.ledger, &state, 5),
        env.projections.catch_up(&env.ledger, &state, 9),
    );
    assert_eq!(a.unwrap(), head);
    assert_eq!(b.unwrap(), head);
    assert_eq!(total_counted(&env.projections).await, head as i64);
}
