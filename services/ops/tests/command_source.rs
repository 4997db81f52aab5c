//! Command sources against real programs: SQLite (`sqlite3 DB .dump` on standard output, restored
//! by `sqlite3` reading it, verified by `PRAGMA integrity_check` on the test-restored copy) and
//! InfluxDB 1.x (`influxd backup -portable` writing a directory, restored into a second server).
//! A failing command and a command past its timeout leave `backup.failed`, no manifest, and the
//! tail of standard error in the reason.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backstop_events::{Actor, BackupMethod, Event};
use backstop_ledger::{Ledger, LedgerConfig};
use backstop_ops::backup::{BackupOptions, run_backup};
use backstop_ops::restore::{Recovery, StreamTarget, restore_stream};
use backstop_ops::verify::{VerifyOutcome, verify_completed};
use backstop_ops::{DataPath, SourceKind, SourceSpec};
use backstop_sources::command::{CommandOutput, CommandSource};

fn command_source(name: &str, c: CommandSource) -> SourceSpec {
    SourceSpec {
        name: name.into(),
        kind: SourceKind::Command(c),
    }
}

fn sqlite(db: &std::path::Path, sql: &str) -> String {
    let out = std::process::Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("sqlite3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct World {
    dp: DataPath,
    ledger: Ledger,
    _dir: tempfile::TempDir,
}

async fn world(sources: Vec<SourceSpec>) -> World {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let dp = DataPath {
        repo: support::memory_repo().await,
        appender: Arc::new(ledger.clone()),
        sources,
    };
    World {
        dp,
        ledger,
        _dir: dir,
    }
}

fn types(ledger: &Ledger) -> Vec<String> {
    ledger
        .read(1, 10_000)
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_backs_up_verifies_and_restores_through_its_commands() {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("app.db");
    sqlite(
        &db,
        "CREATE TABLE trades (id INTEGER PRIMARY KEY, sym TEXT, qty REAL, note BLOB); \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) \
         INSERT INTO trades SELECT i, 'SYM' || (i % 97), i * 0.5, randomblob(16) FROM n; \
         CREATE INDEX trades_sym ON trades (sym);",
    );
    let source = CommandSource {
        backup: format!("sqlite3 '{}' .dump", db.display()),
        restore: Some("sqlite3 \"$BACKSTOP_TARGET\"".into()),
        verify: Some(
            "test \"$(sqlite3 \"$BACKSTOP_TARGET\" 'PRAGMA integrity_check')\" = ok".into(),
        ),
        output: CommandOutput::Stdout,
        timeout: Duration::from_secs(60),
        work_dir: None,
    };
    let w = world(vec![command_source("app-sqlite", source)]).await;
    let actor = Actor::operator("test");
    // A schedule asks for the default method: a command source takes its own.
    let request = support::logical_request("app-sqlite");
    let done = run_backup(
        &w.dp,
        &request,
        chrono::Utc::now(),
        &actor,
        None,
        &BackupOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(done.completed.method, BackupMethod::Command);
    let dump = sqlite(&db, ".dump");
    assert_eq!(done.completed.raw_bytes, dump.len() as u64);

    // The verify worker's use case: restore into a scratch file, integrity_check passes.
    let completed = w
        .ledger
        .read(1, 1000)
        .unwrap()
        .into_iter()
        .find(|e| e.event_type == "backup.completed")
        .unwrap();
    let Ok(Event::BackupCompleted(c)) = completed.event() else {
        unreachable!()
    };
    let settings = support::scratch_settings("postgres://unused@127.0.0.1:1/x".into(), false);
    let outcome = verify_completed(&w.dp, &settings, &completed, &c, &actor)
        .await
        .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert!(matches!(outcome, VerifyOutcome::Passed), "{outcome:?}");

    // `backstop restore ID --to FILE`: the restore command builds a new database.
    let manifest = w.dp.repo.load_manifest(request.backup_id).await.unwrap();
    let restored = data.path().join("restored.db");
    let recovery = Recovery::new(
        "test",
        backstop_events::RecoveryScope {
            target: restored.display().to_string(),
            tables: vec![],
            point_in_time: None,
            dry_run: false,
        },
    );
    restore_stream(
        &w.dp,
        manifest.clone(),
        &recovery,
        &StreamTarget::Command {
            target: restored.display().to_string(),
            command: None,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(
        sqlite(&restored, ".dump"),
        dump,
        "the restored database dumps the same"
    );
    assert_eq!(
        sqlite(&restored, "SELECT count(*) FROM trades").trim(),
        "20000"
    );

    // `--out FILE`: the raw stream, byte for byte.
    let out = data.path().join("app.sql");
    let recovery = Recovery::new(
        "test",
        backstop_events::RecoveryScope {
            target: out.display().to_string(),
            tables: vec![],
            point_in_time: None,
            dry_run: false,
        },
    );
    restore_stream(&w.dp, manifest, &recovery, &StreamTarget::File(out.clone()))
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), dump);
    let t = types(&w.ledger);
    assert!(
        t.iter().filter(|e| *e == "recovery.completed").count() == 2,
        "{t:?}"
    );
    assert!(t.contains(&"verification.passed".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_slow_command_leaves_no_completed_backup() {
    let failing = CommandSource {
        backup: "echo partial output; echo 'database is locked' >&2; exit 3".into(),
        restore: None,
        verify: None,
        output: CommandOutput::Stdout,
        timeout: Duration::from_secs(30),
        work_dir: None,
    };
    let slow = CommandSource {
        backup: "echo started >&2; sleep 31.7 | cat".into(),
        timeout: Duration::from_secs(1),
        ..failing.clone()
    };
    let dir_fail = CommandSource {
        backup: "echo x > \"$BACKSTOP_DIR/a\"; exit 1".into(),
        output: CommandOutput::Directory,
        ..failing.clone()
    };
    let w = world(vec![
        command_source("failing", failing),
        command_source("slow", slow),
        command_source("dir-fail", dir_fail),
    ])
    .await;
    let actor = Actor::operator("test");
    for (name, expect) in [
        ("failing", vec!["exit code 3", "database is locked"]),
        ("slow", vec!["did not finish within 1 s", "killed"]),
        ("dir-fail", vec!["exit code 1"]),
    ] {
        let started = Instant::now();
        let err = run_backup(
            &w.dp,
            &support::logical_request(name),
            chrono::Utc::now(),
            &actor,
            None,
            &BackupOptions::default(),
        )
        .await
        .expect_err(name)
        .chain();
        for e in expect {
            assert!(err.contains(e), "{name}: {err}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{name} took too long"
        );
    }
    let t = types(&w.ledger);
    assert_eq!(
        t.iter().filter(|e| *e == "backup.failed").count(),
        3,
        "{t:?}"
    );
    assert!(!t.contains(&"backup.completed".to_string()));
    assert!(
        w.dp.repo.list_backups().await.unwrap().is_empty(),
        "no manifest"
    );
    // The timed-out pipeline's `sleep` was killed with its group.
    let ps = std::process::Command::new("pgrep")
        .args(["-f", "^sleep 31.7$"])
        .output()
        .unwrap();
    assert!(ps.stdout.is_empty(), "a sleep survived: {:?}", ps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influxdb_portable_backup_directory_restores_into_a_new_server() {
    let source_db = backstop_testkit::Influx::start().unwrap();
    source_db.query("", "CREATE DATABASE metrics").unwrap();
    let mut lines = String::new();
    for i in 0..5000u64 {
        lines.push_str(&format!(
            "cpu,host=h{} value={} {}\n",
            i % 10,
            i as f64 * 0.25,
            1_600_000_000_000_000_000u64 + i * 1_000_000_000
        ));
    }
    source_db.write("metrics", &lines).unwrap();
    let influxd = backstop_testkit::require_tool("influxd").unwrap();
    let target_db = backstop_testkit::Influx::start().unwrap();
    let source = CommandSource {
        backup: format!(
            "'{}' backup -portable -host {} \"$BACKSTOP_DIR\"",
            influxd.display(),
            source_db.rpc_addr()
        ),
        restore: Some(format!(
            "'{}' restore -portable -host \"$BACKSTOP_TARGET\" \"$BACKSTOP_DIR\"",
            influxd.display()
        )),
        verify: None,
        output: CommandOutput::Directory,
        timeout: Duration::from_secs(60),
        work_dir: None,
    };
    let w = world(vec![command_source("influx", source)]).await;
    let actor = Actor::operator("test");
    let request = support::logical_request("influx");
    let done = run_backup(
        &w.dp,
        &request,
        chrono::Utc::now(),
        &actor,
        None,
        &BackupOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(done.completed.method, BackupMethod::Command);
    let manifest = w.dp.repo.load_manifest(request.backup_id).await.unwrap();
    let recovery = Recovery::new(
        "test",
        backstop_events::RecoveryScope {
            target: target_db.rpc_addr(),
            tables: vec![],
            point_in_time: None,
            dry_run: false,
        },
    );
    restore_stream(
        &w.dp,
        manifest,
        &recovery,
        &StreamTarget::Command {
            target: target_db.rpc_addr(),
            command: None,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{}", e.chain()));
    let count =
        |i: &backstop_testkit::Influx| i.query("metrics", "SELECT count(value) FROM cpu").unwrap();
    // influxd reopens the restored shard after `influxd restore` returns: until then a query
    // answers "engine is closed" or "shard is disabled".
    let started = Instant::now();
    let restored = loop {
        let r = count(&target_db);
        if !r.contains("\"error\"") || started.elapsed() > Duration::from_secs(30) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(restored.contains("5000"), "{restored}");
    assert_eq!(restored, count(&source_db));
}
