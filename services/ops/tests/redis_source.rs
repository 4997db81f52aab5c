//! Redis sources against real Redis 7 servers (Debian's redis-server): 100,000 keys of every
//! type over two databases, snapshotted over the replication protocol, verified by the verify
//! use case in a throwaway server, restored as dump.rdb and loaded by a new server whose DBSIZE
//! per database and `DEBUG DIGEST` (of the whole dataset) equal the source's; a server killed
//! mid-snapshot leaves `backup.failed`, no manifest and a reason that says so.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use backstop_events::{Actor, BackupMethod, Event};
use backstop_ledger::{Ledger, LedgerConfig};
use backstop_ops::backup::{BackupOptions, run_backup};
use backstop_ops::restore::{Recovery, StreamTarget, restore_stream};
use backstop_ops::verify::{VerifyOutcome, verify_completed};
use backstop_ops::{DataPath, SourceKind, SourceSpec};
use backstop_sources::redis::RedisSource;
use backstop_testkit::Redis;

fn resp(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
}

/// 100,000 keys: db0 holds strings, hashes, lists, sets, sorted sets and streams (15,000 each,
/// 10,000 strings with expiry among them), db1 10,000 strings.
fn load(redis: &Redis) {
    let mut p = Vec::new();
    for i in 0..15_000 {
        let (i, v) = (i.to_string(), format!("value-{i}-{}", "x".repeat(i % 40)));
        resp(&mut p, &["SET", &format!("s:{i}"), &v]);
        resp(
            &mut p,
            &["HSET", &format!("h:{i}"), "a", &i, "b", &v, "c", "3"],
        );
        resp(&mut p, &["RPUSH", &format!("l:{i}"), "1", "2", &i, &v]);
        resp(&mut p, &["SADD", &format!("t:{i}"), "x", "y", &i]);
        resp(&mut p, &["ZADD", &format!("z:{i}"), "1.5", "a", &i, "b"]);
        resp(
            &mut p,
            &["XADD", &format!("x:{i}"), "*", "price", &i, "qty", "7"],
        );
    }
    for i in 0..10_000 {
        resp(&mut p, &["SET", &format!("e:{i}"), "soon", "EX", "86400"]);
    }
    resp(&mut p, &["SELECT", "1"]);
    for i in 0..10_000 {
        resp(&mut p, &["SET", &format!("db1:{i}"), &i.to_string()]);
    }
    redis.pipe(&p).unwrap();
}

fn keyspace(r: &Redis) -> String {
    r.cli(&["INFO", "keyspace"])
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("db"))
        .map(|l| l.split(",expires").next().unwrap_or_default().to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

async fn world(url: String) -> (DataPath, Ledger, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&LedgerConfig::in_data_dir(dir.path())).unwrap();
    let dp = DataPath {
        repo: support::memory_repo().await,
        appender: Arc::new(ledger.clone()),
        sources: vec![SourceSpec {
            name: "cache".into(),
            kind: SourceKind::Redis(RedisSource {
                url,
                timeout: Duration::from_secs(60),
            }),
        }],
    };
    (dp, ledger, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_every_type_restores_into_a_new_server() {
    let source = Redis::start().unwrap();
    load(&source);
    assert_eq!(keyspace(&source), "db0:keys=100000 db1:keys=10000");
    let (dp, ledger, _dir) = world(source.url()).await;
    let actor = Actor::operator("test");
    let request = support::logical_request("cache");
    let done = run_backup(
        &dp,
        &request,
        chrono::Utc::now(),
        &actor,
        None,
        &BackupOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert_eq!(done.completed.method, BackupMethod::Redis);

    // The verify use case: a throwaway redis-server loads it; DBSIZE per database compared.
    let completed = ledger
        .read(1, 1000)
        .unwrap()
        .into_iter()
        .find(|e| e.event_type == "backup.completed")
        .unwrap();
    let Ok(Event::BackupCompleted(c)) = completed.event() else {
        unreachable!()
    };
    let settings = support::scratch_settings("postgres://unused@127.0.0.1:1/x".into(), false);
    let outcome = verify_completed(&dp, &settings, &completed, &c, &actor)
        .await
        .unwrap_or_else(|e| panic!("{}", e.chain()));
    assert!(matches!(outcome, VerifyOutcome::Passed), "{outcome:?}");
    let passed = ledger
        .read(1, 1000)
        .unwrap()
        .into_iter()
        .find_map(|e| match e.event() {
            Ok(Event::VerificationPassed(p)) => Some(p),
            _ => None,
        })
        .unwrap();
    let dbs: Vec<_> = passed
        .tables
        .iter()
        .map(|t| (t.table.clone(), t.expected, t.restored))
        .collect();
    assert_eq!(
        dbs,
        vec![
            ("db0".to_string(), 100_000, 100_000),
            ("db1".to_string(), 10_000, 10_000)
        ]
    );

    // restore --out dump.rdb, then a new server on it.
    let out_dir = tempfile::tempdir().unwrap();
    let rdb = out_dir.path().join("dump.rdb");
    let manifest = dp.repo.load_manifest(request.backup_id).await.unwrap();
    let recovery = Recovery::new(
        "test",
        backstop_events::RecoveryScope {
            target: rdb.display().to_string(),
            tables: vec![],
            point_in_time: None,
            dry_run: false,
        },
    );
    restore_stream(&dp, manifest, &recovery, &StreamTarget::File(rdb.clone()))
        .await
        .unwrap_or_else(|e| panic!("{}", e.chain()));
    let restored = Redis::start_with(Some(&rdb), &[]).unwrap();
    assert_eq!(keyspace(&restored), keyspace(&source));
    for db in ["0", "1"] {
        let digest = |r: &Redis| r.cli(&["-n", db, "DEBUG", "DIGEST"]).unwrap();
        assert_eq!(
            digest(&restored),
            digest(&source),
            "dataset digest of db{db}"
        );
    }
    // Serialized values are equal, except a small set's, whose members' order is free.
    for key in ["s:77", "h:77", "l:77", "z:77", "x:77"] {
        let dump = |r: &Redis| r.cli(&["DUMP", key]).unwrap();
        assert_eq!(dump(&restored), dump(&source), "{key}");
    }
    let members = |r: &Redis| {
        let mut m: Vec<String> = r
            .cli(&["SMEMBERS", "t:77"])
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        m.sort();
        m
    };
    assert_eq!(members(&restored), vec!["77", "x", "y"]);
    assert_eq!(members(&restored), members(&source));
    assert_eq!(
        restored.cli(&["HGET", "h:12", "b"]).unwrap().trim(),
        format!("value-12-{}", "x".repeat(12))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_snapshot_leaves_no_completed_backup() {
    // Each key takes 500 µs to save: the snapshot of 20,000 keys streams for about 10 s.
    let mut source = Redis::start_with(None, &["--rdb-key-save-delay", "500"]).unwrap();
    let mut p = Vec::new();
    for i in 0..20_000 {
        resp(&mut p, &["SET", &format!("k:{i}"), &"v".repeat(200)]);
    }
    source.pipe(&p).unwrap();
    let (dp, ledger, _dir) = world(source.url()).await;
    let request = support::logical_request("cache");
    let backup = {
        let dp = dp.clone();
        let request = request.clone();
        tokio::spawn(async move {
            run_backup(
                &dp,
                &request,
                chrono::Utc::now(),
                &Actor::operator("test"),
                None,
                &BackupOptions::default(),
            )
            .await
        })
    };
    // Kill the server once its snapshot is being streamed (its fork is saving).
    let started = Instant::now();
    loop {
        let info = source.cli(&["INFO", "persistence"]).unwrap_or_default();
        if info.contains("rdb_bgsave_in_progress:1") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no snapshot started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    source.kill();
    let err = backup.await.unwrap().expect_err("a killed server").chain();
    assert!(
        err.contains("killed mid-snapshot") || err.contains("before it sent the snapshot"),
        "{err}"
    );
    let types: Vec<String> = ledger
        .read(1, 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert!(types.contains(&"backup.failed".to_string()), "{types:?}");
    assert!(
        !types.contains(&"backup.completed".to_string()),
        "{types:?}"
    );
    assert!(
        dp.repo.list_backups().await.unwrap().is_empty(),
        "no manifest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_based_sync_is_read_by_its_length() {
    // With diskless sync off, the server writes the RDB to its disk and sends `$<len>`.
    let source = Redis::start_with(None, &["--repl-diskless-sync", "no"]).unwrap();
    let mut p = Vec::new();
    for i in 0..5_000 {
        resp(&mut p, &["HSET", &format!("h:{i}"), "f", &i.to_string()]);
    }
    source.pipe(&p).unwrap();
    let (dp, _ledger, _dir) = world(source.url()).await;
    let request = support::logical_request("cache");
    let done = run_backup(
        &dp,
        &request,
        chrono::Utc::now(),
        &Actor::operator("test"),
        None,
        &BackupOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", e.chain()));
    let backstop_ops::backup::SourceReport::Redis(report) = &done.report else {
        panic!("not a Redis report: {:?}", done.report)
    };
    assert!(!report.diskless, "the server wrote the RDB to disk first");
    let out_dir = tempfile::tempdir().unwrap();
    let rdb = out_dir.path().join("dump.rdb");
    let manifest = dp.repo.load_manifest(request.backup_id).await.unwrap();
    let recovery = Recovery::new(
        "test",
        backstop_events::RecoveryScope {
            target: rdb.display().to_string(),
            tables: vec![],
            point_in_time: None,
            dry_run: false,
        },
    );
    restore_stream(&dp, manifest, &recovery, &StreamTarget::File(rdb.clone()))
        .await
        .unwrap();
    let copy = Redis::start_with(Some(&rdb), &[]).unwrap();
    assert_eq!(
        copy.cli(&["DEBUG", "DIGEST"]).unwrap(),
        source.cli(&["DEBUG", "DIGEST"]).unwrap()
    );
}
