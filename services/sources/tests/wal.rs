//! `wal-push` and `wal-fetch` on real WAL segments from a real PostgreSQL 15 cluster: PostgreSQL
//! archiving a burst of segments through this test binary (acting as `backstop wal-push`),
//! idempotent and refused pushes, a push killed with SIGKILL halfway and re-run, the `.ready`
//! backlog pushed in parallel with markers for PostgreSQL's later calls, and fetch with
//! prefetch, end of archive, gaps and damage.

#[path = "wal_support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backstop_sources::pg::wal::{
    self, FETCH_FATAL_EXIT, FetchOptions, FetchOutcome, PushOptions, RECOVERY_FAILED_MARKER,
    WalError, WalFile, WalKind, WalStore,
};
use backstop_testkit::{Postgres, server_tempdir};
use support::DirWalStore;

/// Entry point for PostgreSQL's archive_command / restore_command (see `wal_support`).
#[test]
#[ignore = "run by PostgreSQL as archive_command / restore_command, not by hand"]
fn wal_helper() {
    support::helper_main();
}

/// A cluster that archived `n` segments into a fresh store.
fn cluster_with_segments(n: usize) -> (Postgres, tempfile::TempDir, DirWalStore) {
    let store_dir = server_tempdir().unwrap();
    let store = DirWalStore::new(store_dir.path());
    let pg = support::archiving_cluster(store_dir.path());
    pg.psql("postgres", "CREATE TABLE t (id int, pad text)")
        .unwrap();
    for i in 0..n {
        pg.psql(
            "postgres",
            &format!("INSERT INTO t VALUES ({i}, repeat('y', 500))"),
        )
        .unwrap();
        support::switch_and_wait(&pg);
    }
    (pg, store_dir, store)
}

/// A directory laid out like `pg_wal`, holding copies of archived segments marked `.ready`.
async fn fake_pg_wal(store: &DirWalStore, names: &[String]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let pg_wal = tmp.path().join("pg_wal");
    std::fs::create_dir_all(pg_wal.join("archive_status")).unwrap();
    for n in names {
        let s = store.get_segment(n).await.unwrap().unwrap();
        std::fs::write(pg_wal.join(n), &s.data).unwrap();
        std::fs::write(
            pg_wal.join("archive_status").join(format!("{n}.ready")),
            b"",
        )
        .unwrap();
    }
    (tmp, pg_wal)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_drains_a_backlog_through_wal_push_archiving_each_file_once() {
    let store_dir = server_tempdir().unwrap();
    let store = DirWalStore::new(store_dir.path());
    let pg = support::archiving_cluster(store_dir.path());
    pg.psql("postgres", "CREATE TABLE t (id int, pad text)")
        .unwrap();
    support::switch_and_wait(&pg);

    // A backlog: archiving fails while ten segments fill up, so they wait as .ready files.
    pg.psql(
        "postgres",
        "ALTER SYSTEM SET archive_command = 'false'; SELECT pg_reload_conf()",
    )
    .unwrap();
    let mut last = String::new();
    for i in 0..10 {
        pg.psql(
            "postgres",
            &format!("INSERT INTO t VALUES ({i}, repeat('y', 500))"),
        )
        .unwrap();
        last = pg
            .psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
            .unwrap();
    }
    let ready = std::fs::read_dir(pg.data_dir().join("pg_wal/archive_status"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".ready"))
        })
        .count();
    assert!(ready >= 10, "{ready} files waiting");

    // Archiving back: the first call pushes the backlog in parallel, the others are quick.
    pg.psql(
        "postgres",
        "ALTER SYSTEM RESET archive_command; SELECT pg_reload_conf()",
    )
    .unwrap();
    support::wait_archived(&pg, &last);
    let calls = store.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("push ") && !c.ends_with("extra=0")),
        "no call pushed ahead: {calls:?}"
    );
    assert!(
        calls.iter().filter(|c| c.starts_with("quick ")).count() >= 8,
        "PostgreSQL's calls for files pushed ahead should be quick: {calls:?}"
    );

    // Each file archived once, in the store and in the event log, and the archive intact.
    let events = store.events();
    let mut names: Vec<&str> = events
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    let total = names.len();
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        total,
        "a file was reported archived twice: {events:?}"
    );
    let segments = store.segments();
    assert!(segments.len() >= 11, "{segments:?}");
    for s in &segments {
        assert!(names.contains(&s.as_str()), "{s} has no event");
    }
    let v = wal::wal_verify(&store, &wal::WalVerifyOptions::default())
        .await
        .unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
    assert_eq!(v.segment_size, wal::DEFAULT_SEGMENT_SIZE);
    assert!(v.files_checked >= 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_is_idempotent_refuses_a_different_file_and_drains_the_ready_backlog() {
    let (_pg, _d, source) = cluster_with_segments(6);
    let segments = source.segments();
    let names: Vec<String> = segments[segments.len() - 5..].to_vec();
    let (_tmp, pg_wal) = fake_pg_wal(&source, &names).await;
    let target_dir = tempfile::tempdir().unwrap();
    let store = DirWalStore::new(target_dir.path());
    let opts = PushOptions::default();

    // The first call archives the requested file and the other four .ready ones in parallel.
    let first = pg_wal.join(&names[0]);
    assert!(wal::already_pushed(&first, &opts).await.unwrap().is_none());
    let report = wal::push(&first, &opts, &store).await.unwrap();
    assert!(report.requested.newly_stored);
    assert_eq!(report.requested.kind, WalKind::Segment);
    assert_eq!(report.requested.timeline, 1);
    assert_eq!(
        report.requested.object,
        format!("wal/00000001/{}", names[0])
    );
    assert_eq!(
        report
            .extra
            .iter()
            .map(|a| a.name.clone())
            .collect::<Vec<_>>(),
        names[1..].to_vec()
    );
    assert_eq!(report.newly_stored().count(), 5);
    assert_eq!(report.to_announce().len(), 5);
    assert_eq!(store.segments(), names);

    // PostgreSQL's own later calls are answered from the markers, without the store.
    let second = pg_wal.join(&names[1]);
    let quick = wal::already_pushed(&second, &opts)
        .await
        .unwrap()
        .expect("marker");
    assert!(quick.from_marker);
    assert!(!quick.requested.newly_stored);
    assert_eq!(quick.requested.sha3, report.extra[0].sha3);
    assert!(
        wal::already_pushed(&second, &opts).await.unwrap().is_none(),
        "marker consumed"
    );

    // The quick path trusts the file's stamp, not a second read: a file written again (the
    // same bytes, so the same checksum) no longer matches its marker and takes the slow path.
    let markers = pg_wal.join("backstop/pushed");
    let marker = std::fs::read_to_string(markers.join(&names[4])).unwrap();
    let lines: Vec<&str> = marker.split('\n').collect();
    assert_eq!(lines.len(), 5, "{marker:?}");
    assert_eq!(lines[3].split(' ').count(), 5, "a stamp: {marker:?}");
    let rewritten = std::fs::read(pg_wal.join(&names[3])).unwrap();
    std::fs::write(pg_wal.join(&names[3]), &rewritten).unwrap();
    assert!(
        wal::already_pushed(&pg_wal.join(&names[3]), &opts)
            .await
            .unwrap()
            .is_none(),
        "a rewritten file is not trusted by its stamp"
    );
    // A marker of an older build, without a stamp, is checked by hashing the file.
    std::fs::write(
        markers.join(&names[4]),
        format!("{}\n{}\n{}\n", lines[0], lines[1], lines[2]),
    )
    .unwrap();
    let hashed = wal::already_pushed(&pg_wal.join(&names[4]), &opts)
        .await
        .unwrap()
        .expect("a marker without a stamp still answers when the checksum matches");
    assert_eq!(hashed.requested.sha3, lines[0]);

    // Again, through the store: the same checksum is a success that stores nothing.
    assert!(quick.to_announce().is_empty());
    let again = wal::push(&second, &opts, &store).await.unwrap();
    assert!(!again.requested.newly_stored);
    assert_eq!(again.newly_stored().count(), 0);
    // Announced again with the same event key: the ledger keeps one event.
    assert_eq!(again.to_announce().len(), 1);
    assert_eq!(
        again.to_announce()[0].event_key(),
        report.extra[0].event_key()
    );

    // A different file under an archived name is refused, and nothing is overwritten.
    let before = std::fs::read(store.path_of(&names[2])).unwrap();
    let mut bytes = std::fs::read(pg_wal.join(&names[2])).unwrap();
    bytes[100_000] ^= 1;
    std::fs::write(pg_wal.join(&names[2]), &bytes).unwrap();
    let _ = std::fs::remove_file(pg_wal.join("backstop/pushed").join(&names[2]));
    let err = wal::push(&pg_wal.join(&names[2]), &opts, &store)
        .await
        .unwrap_err();
    assert!(matches!(err, WalError::Conflict { .. }), "{err}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(store.path_of(&names[2])).unwrap(), before);

    // Not a WAL file, or not a segment of this cluster: refused with a clear error.
    let junk = pg_wal.join("RECOVERYXLOG");
    std::fs::write(&junk, b"x").unwrap();
    assert!(matches!(
        wal::push(&junk, &opts, &store).await.unwrap_err(),
        WalError::NotWalName { .. }
    ));
    // (The marker written for names[3] speaks for the first store's scope only.)
    let other_cluster = PushOptions {
        expected_system_identifier: Some(42),
        marker_scope: "another repository".into(),
        ..PushOptions::default()
    };
    let fresh = tempfile::tempdir().unwrap();
    let err = wal::push(
        &pg_wal.join(&names[3]),
        &other_cluster,
        &DirWalStore::new(fresh.path()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, WalError::WrongCluster { .. }), "{err}");
}

fn helper(op: &str, store: &Path, p: &Path, f: Option<&str>, stall: Option<&str>) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "wal_helper",
        "--exact",
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env("BACKSTOP_TEST_WAL_OP", op)
    .env("BACKSTOP_TEST_WAL_STORE", store)
    .env("BACKSTOP_TEST_WAL_P", p)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if let Some(f) = f {
        cmd.env("BACKSTOP_TEST_WAL_F", f);
    }
    if let Some(s) = stall {
        cmd.env("BACKSTOP_TEST_WAL_STALL", s);
    }
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_killed_halfway_and_run_again_archives_the_segment_once_intact() {
    let (_pg, _d, source) = cluster_with_segments(2);
    let name = source.segments().last().unwrap().clone();
    let (_tmp, pg_wal) = fake_pg_wal(&source, std::slice::from_ref(&name)).await;
    let target = tempfile::tempdir().unwrap();
    let store = DirWalStore::new(target.path());
    let path = pg_wal.join(&name);

    // kill -9 while the upload is half written.
    let mut child = helper("push", target.path(), &path, None, Some(&name))
        .spawn()
        .unwrap();
    let start = Instant::now();
    while store.temp_files().is_empty() {
        assert!(
            start.elapsed() < backstop_testkit::deadline(),
            "the push never started writing"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        store.segments().is_empty(),
        "a half-written push must not be visible"
    );
    assert_eq!(store.temp_files().len(), 1);

    // Run again: archived, once, intact.
    let out = helper("push", target.path(), &path, None, None)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(store.segments(), vec![name.clone()]);
    let stored = store.get_segment(&name).await.unwrap().unwrap();
    stored.verify(&name).await.unwrap();
    assert_eq!(&stored.data[..], &std::fs::read(&path).unwrap()[..]);
    assert_eq!(store.events().len(), 1);
    assert!(store.events()[0].starts_with(&format!("wal.archived {name} {}", stored.sha3)));

    // And again, as PostgreSQL would after losing the first answer: success, no second event.
    let out = helper("push", target.path(), &path, None, None)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(store.events().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_prefetches_ends_quietly_and_fails_hard_on_gaps_and_damage() {
    let (_pg, _d, store) = cluster_with_segments(8);
    let segments = store.segments();
    let data_dir = tempfile::tempdir().unwrap();
    let pg_wal = data_dir.path().join("pg_wal");
    std::fs::create_dir_all(&pg_wal).unwrap();
    let dest = pg_wal.join("RECOVERYXLOG");
    let opts = FetchOptions {
        prefetch: 4,
        data_dir: Some(data_dir.path().to_path_buf()),
        ..FetchOptions::default()
    };

    // The first fetch brings the next three along; they are then served from the spool.
    let first = wal::fetch(&segments[0], &dest, &opts, &store)
        .await
        .unwrap();
    match &first {
        FetchOutcome::Restored {
            from_spool,
            prefetched,
            ..
        } => {
            assert!(!from_spool);
            assert_eq!(*prefetched, 3);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(first.exit_code(), 0);
    let s0 = store.get_segment(&segments[0]).await.unwrap().unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), &s0.data[..]);
    let second = wal::fetch(&segments[1], &dest, &opts, &store)
        .await
        .unwrap();
    assert!(
        matches!(
            second,
            FetchOutcome::Restored {
                from_spool: true,
                ..
            }
        ),
        "{second:?}"
    );
    let s1 = store.get_segment(&segments[1]).await.unwrap().unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), &s1.data[..]);
    let spool = pg_wal.join("backstop/prefetch");
    assert!(!spool.join(&segments[0]).exists() && !spool.join(&segments[1]).exists());

    // A spooled copy that went bad locally is fetched again from the archive.
    let spooled = spool.join(&segments[2]);
    let mut bytes = std::fs::read(&spooled).unwrap();
    bytes[9000] ^= 1;
    std::fs::write(&spooled, bytes).unwrap();
    let third = wal::fetch(&segments[2], &dest, &opts, &store)
        .await
        .unwrap();
    assert!(
        matches!(
            third,
            FetchOutcome::Restored {
                from_spool: false,
                ..
            }
        ),
        "{third:?}"
    );

    // The end of the archive: missing, exit 1, no marker. Same for an absent history file.
    let last = WalFile::parse(segments.last().unwrap()).unwrap();
    let beyond = wal::segment_name(
        1,
        last.segno(wal::DEFAULT_SEGMENT_SIZE) + 1,
        wal::DEFAULT_SEGMENT_SIZE,
    );
    let end = wal::fetch(&beyond, &dest, &opts, &store).await.unwrap();
    assert_eq!(
        end,
        FetchOutcome::Missing {
            name: beyond.clone()
        }
    );
    assert_eq!(end.exit_code(), 1);
    let hist = wal::fetch(
        "00000002.history",
        &pg_wal.join("RECOVERYHISTORY"),
        &opts,
        &store,
    )
    .await
    .unwrap();
    assert_eq!(hist.exit_code(), 1);
    assert!(!data_dir.path().join(RECOVERY_FAILED_MARKER).exists());

    // A gap: missing while later segments exist: fatal, with the marker.
    let no_prefetch = FetchOptions {
        prefetch: 1,
        ..opts.clone()
    };
    let gap = segments[5].clone();
    let saved = std::fs::read(store.path_of(&gap)).unwrap();
    std::fs::remove_file(store.path_of(&gap)).unwrap();
    let err = wal::fetch(&gap, &dest, &no_prefetch, &store)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code, FETCH_FATAL_EXIT);
    assert!(matches!(err.error, WalError::Gap { .. }), "{err}");
    let marker = std::fs::read_to_string(data_dir.path().join(RECOVERY_FAILED_MARKER)).unwrap();
    assert!(marker.contains(&gap), "{marker}");
    std::fs::write(store.path_of(&gap), saved).unwrap();
    std::fs::remove_file(data_dir.path().join(RECOVERY_FAILED_MARKER)).unwrap();

    // Damage: fatal, named, and the destination is not written.
    let victim = segments[6].clone();
    store.damage(&victim, 123_456);
    std::fs::remove_file(&dest).unwrap();
    let err = wal::fetch(&victim, &dest, &no_prefetch, &store)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code, FETCH_FATAL_EXIT);
    assert!(matches!(err.error, WalError::Damaged(_)), "{err}");
    assert!(err.to_string().contains(&victim), "{err}");
    assert!(!dest.exists());
    assert!(data_dir.path().join(RECOVERY_FAILED_MARKER).exists());

    // With a recovery target, damage is the end of the usable archive (exit 1, with the reason):
    // PostgreSQL then refuses to finish short of the target by itself.
    std::fs::write(
        data_dir.path().join("postgresql.auto.conf"),
        "recovery_target_time = '2030-01-01 00:00:00+00'\n",
    )
    .unwrap();
    let o = wal::fetch(&victim, &dest, &no_prefetch, &store)
        .await
        .unwrap();
    match &o {
        FetchOutcome::Unusable { name, reason } => {
            assert_eq!(name, &victim);
            assert!(
                reason.contains("damaged") && reason.contains("target"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(o.exit_code(), 1);
    assert!(!dest.exists());
    std::fs::remove_file(data_dir.path().join("postgresql.auto.conf")).unwrap();

    // In standby mode an unreadable archive is retried (exit 1), but damage stays fatal.
    std::fs::write(data_dir.path().join("standby.signal"), b"").unwrap();
    // (A store rooted at a plain file cannot be read: ENOTDIR, not "absent".)
    let not_a_dir = tempfile::NamedTempFile::new().unwrap();
    let broken = DirWalStore::new(not_a_dir.path());
    let _ = std::fs::remove_file(data_dir.path().join(RECOVERY_FAILED_MARKER));
    let err = wal::fetch(&segments[0], &dest, &no_prefetch, &broken)
        .await
        .unwrap_err();
    assert!(matches!(err.error, WalError::Store(_)), "{err}");
    assert_eq!(err.exit_code, 1, "{err}");
    assert!(!data_dir.path().join(RECOVERY_FAILED_MARKER).exists());
    // Outside standby mode the same failure aborts recovery.
    std::fs::remove_file(data_dir.path().join("standby.signal")).unwrap();
    let err = wal::fetch(&segments[0], &dest, &no_prefetch, &broken)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code, FETCH_FATAL_EXIT, "{err}");
    std::fs::write(data_dir.path().join("standby.signal"), b"").unwrap();
    let err = wal::fetch(&victim, &dest, &no_prefetch, &store)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code, FETCH_FATAL_EXIT);
}
