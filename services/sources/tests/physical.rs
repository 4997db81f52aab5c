//! Physical backups and point-in-time recovery against real PostgreSQL 15 clusters: base backups
//! streamed into a directory-backed part store, WAL archived by PostgreSQL itself through this
//! test binary acting as `backstop wal-push` / `wal-fetch` (see `wal_support`), restores started
//! on real servers.

#[path = "wal_support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use backstop_sources::pg::physical::{
    self, BaseBackupOptions, BaseBackupReport, PhysicalError, PhysicalRestoreOptions,
    PhysicalVerifyOptions, RecoveryTarget,
};
use backstop_sources::pg::wal::{self, WalProblemKind, WalVerifyOptions};
use backstop_testkit::{Postgres, PostgresOptions, server_tempdir, server_user};
use support::{DirParts, DirWalStore};

/// Entry point for PostgreSQL's archive_command / restore_command (see `wal_support`).
#[test]
#[ignore = "run by PostgreSQL as archive_command / restore_command, not by hand"]
fn wal_helper() {
    support::helper_main();
}

fn ids(pg: &Postgres, table: &str) -> Vec<i64> {
    let out = pg
        .psql("postgres", &format!("SELECT id FROM {table} ORDER BY id"))
        .expect("select ids");
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

async fn backup(pg: &Postgres, parts: &DirParts) -> BaseBackupReport {
    physical::base_backup(
        &pg.conninfo("postgres"),
        parts,
        &BaseBackupOptions::default(),
    )
    .await
    .expect("base backup")
}

fn restore_opts(store: &Path, target: RecoveryTarget) -> PhysicalRestoreOptions {
    let mut o = PhysicalRestoreOptions::new(support::restore_command(store));
    o.target = target;
    o.owner = server_user().expect("server user");
    o
}

fn verify_opts() -> PhysicalVerifyOptions {
    PhysicalVerifyOptions {
        timeout: backstop_testkit::deadline() * 3,
        ..PhysicalVerifyOptions::default()
    }
}

/// Starts a server on a restored directory and waits for recovery to finish.
fn start_restored(dir: &Path) -> Postgres {
    let pg = Postgres::from_data_dir(dir, PostgresOptions::new()).expect("start restored cluster");
    pg.wait_promoted().unwrap();
    pg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_a_time_between_two_inserts_holds_exactly_the_earlier_rows() {
    let store_dir = server_tempdir().unwrap();
    let store = DirWalStore::new(store_dir.path());
    let pg = support::archiving_cluster(store_dir.path());
    pg.psql(
        "postgres",
        "CREATE TABLE ticks (id int PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(), pad text)",
    )
    .unwrap();
    let parts = DirParts::new();
    let report = backup(&pg, &parts).await;
    assert_eq!(report.part, physical::BASE_PART);
    assert!(report.has_manifest);
    assert!(report.stop_lsn >= report.start_lsn);
    assert_eq!(report.timeline, 1);
    assert!(report.files > 100, "{report:?}");
    assert!(
        store.segments().contains(&report.stop_segment),
        "the base backup returned before its last segment was archived: {:?}",
        store.segments()
    );

    // Six commits over a few seconds, with WAL switches between them, and the server's clock
    // read after each commit and before each insert.
    let mut after = Vec::new();
    let mut before = Vec::new();
    for i in 1..=6 {
        before.push(support::server_now(&pg));
        pg.psql(
            "postgres",
            &format!("INSERT INTO ticks (id, pad) VALUES ({i}, repeat('x', 1000))"),
        )
        .unwrap();
        after.push(support::server_now(&pg));
        if i % 2 == 0 {
            support::switch_and_wait(&pg);
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    support::switch_and_wait(&pg);

    // T: between the third commit and the fourth insert.
    let t = after[2] + (before[3] - after[2]) / 2;
    assert!(after[2] < t && t < before[3]);

    let target_dir = server_tempdir().unwrap();
    let dir = target_dir.path().join("data");
    let restored = physical::restore_physical(
        &parts,
        &report,
        &dir,
        &restore_opts(store_dir.path(), RecoveryTarget::Time(t)),
    )
    .await
    .expect("restore to T");
    assert!(restored.manifest_verified);
    assert!(restored.settings.contains("recovery_target_time"));
    assert!(dir.join("recovery.signal").exists());
    {
        let copy = start_restored(&dir);
        assert_eq!(ids(&copy, "ticks"), vec![1, 2, 3], "restore to {t}");
    }

    // The latest point: every committed row, verified on a temporary cluster (amcheck, counts).
    let latest_dir = server_tempdir().unwrap();
    let dir = latest_dir.path().join("data");
    physical::restore_physical(
        &parts,
        &report,
        &dir,
        &restore_opts(store_dir.path(), RecoveryTarget::Latest),
    )
    .await
    .expect("restore latest");
    // The restored cluster asks to preload a library (its owners' choice, and missing here):
    // the verification server loads none, so it starts and verifies.
    {
        use std::io::Write;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("postgresql.auto.conf"))
            .unwrap();
        writeln!(
            conf,
            "shared_preload_libraries = 'backstop_no_such_library'"
        )
        .unwrap();
    }
    let verified = physical::verify_restored(&dir, &verify_opts())
        .await
        .expect("verification of the latest restore");
    assert_eq!(verified.amcheck_ok, Some(true));
    assert!(!verified.paused);
    assert_eq!(verified.timeline, 2, "promotion opens a new timeline");
    let counts = verified.row_counts();
    assert_eq!(counts["postgres"]["public.ticks"], 6, "{counts:?}");
    assert!(!dir.exists(), "verification removes the directory");

    // The window: from the end of the backup to the last commit archived.
    let window = physical::list_window(std::slice::from_ref(&report), &store, None)
        .await
        .unwrap();
    let earliest = window.earliest.expect("earliest");
    assert_eq!(earliest.lsn, report.stop_lsn);
    let latest = window.latest.expect("latest");
    let last_commit = latest.time.expect("last commit time");
    assert!(
        last_commit >= after[5] - chrono::Duration::seconds(1) && last_commit <= after[5],
        "last commit {last_commit} vs the sixth insert {}",
        after[5]
    );
    assert_eq!(latest.timeline, 1);

    // A target before the backup: refused up front.
    let early = server_tempdir().unwrap();
    let err = physical::restore_physical(
        &parts,
        &report,
        &early.path().join("data"),
        &restore_opts(
            store_dir.path(),
            RecoveryTarget::Time(report.started_at - chrono::Duration::hours(1)),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, PhysicalError::NoBackupForTarget { .. }),
        "{err}"
    );
    assert!(!early.path().join("data").exists());

    // A non-empty target directory: refused, nothing written.
    let busy = server_tempdir().unwrap();
    std::fs::write(busy.path().join("keep.txt"), b"mine").unwrap();
    let err = physical::restore_physical(
        &parts,
        &report,
        busy.path(),
        &restore_opts(store_dir.path(), RecoveryTarget::Latest),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PhysicalError::TargetNotEmpty { .. }), "{err}");
    assert_eq!(std::fs::read_dir(busy.path()).unwrap().count(), 1);

    // The archive is continuous and intact.
    let v = wal::wal_verify(
        &store,
        &WalVerifyOptions {
            backups: vec![report.wal_range()],
            ..WalVerifyOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
    assert!(v.files_checked >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_promotion_restores_follow_the_new_timeline() {
    let store_dir = server_tempdir().unwrap();
    let store = DirWalStore::new(store_dir.path());
    let pg = support::archiving_cluster(store_dir.path());
    pg.psql("postgres", "CREATE TABLE ticks (id int PRIMARY KEY)")
        .unwrap();
    let parts = DirParts::new();
    let report = backup(&pg, &parts).await;

    pg.psql("postgres", "INSERT INTO ticks VALUES (1)").unwrap();
    pg.psql("postgres", "INSERT INTO ticks VALUES (2)").unwrap();
    support::switch_and_wait(&pg);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = support::server_now(&pg);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The "bad deploy": rows after T on timeline 1.
    pg.psql("postgres", "INSERT INTO ticks VALUES (3)").unwrap();
    pg.psql("postgres", "INSERT INTO ticks VALUES (4)").unwrap();
    support::switch_and_wait(&pg);

    // Recover to T and keep archiving, as an operator does after a wrong DELETE: the promoted
    // copy writes timeline 2 into the same archive.
    let first = server_tempdir().unwrap();
    let dir = first.path().join("data");
    let mut opts = restore_opts(store_dir.path(), RecoveryTarget::Time(t));
    opts.keep_archiving = true;
    physical::restore_physical(&parts, &report, &dir, &opts)
        .await
        .expect("restore to T");
    let copy = start_restored(&dir);
    assert_eq!(ids(&copy, "ticks"), vec![1, 2]);
    let tli = copy
        .psql(
            "postgres",
            "SELECT timeline_id FROM pg_control_checkpoint()",
        )
        .unwrap();
    copy.psql("postgres", "CHECKPOINT").unwrap();
    copy.psql("postgres", "INSERT INTO ticks VALUES (100), (101)")
        .unwrap();
    let last_tl2 = support::switch_and_wait(&copy);
    assert!(
        last_tl2.starts_with("00000002"),
        "{last_tl2} (timeline {tli})"
    );
    assert!(
        store
            .list_blocking()
            .contains(&"00000002.history".to_string())
    );

    // Latest from the same base backup follows timeline 2: 1, 2, 100, 101 and not 3, 4.
    let second = server_tempdir().unwrap();
    let dir2 = second.path().join("data");
    physical::restore_physical(
        &parts,
        &report,
        &dir2,
        &restore_opts(store_dir.path(), RecoveryTarget::Latest),
    )
    .await
    .expect("restore latest");
    {
        let again = start_restored(&dir2);
        assert_eq!(ids(&again, "ticks"), vec![1, 2, 100, 101]);
        let file = again
            .psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())")
            .unwrap();
        assert!(
            file.starts_with("00000003"),
            "promoted from timeline 2: {file}"
        );
    }

    // Pinned to timeline 1, the same backup still reaches the rows of the bad deploy.
    let third = server_tempdir().unwrap();
    let dir3 = third.path().join("data");
    let mut pinned = restore_opts(store_dir.path(), RecoveryTarget::Latest);
    pinned.timeline = physical::RecoveryTimeline::Current;
    physical::restore_physical(&parts, &report, &dir3, &pinned)
        .await
        .expect("restore latest on timeline 1");
    {
        let old = start_restored(&dir3);
        assert_eq!(ids(&old, "ticks"), vec![1, 2, 3, 4]);
    }

    // wal verify sees both timelines, linked, without gaps.
    let v = wal::wal_verify(
        &store,
        &WalVerifyOptions {
            backups: vec![report.wal_range()],
            ..WalVerifyOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
    let tl2 = v
        .timelines
        .iter()
        .find(|t| t.timeline == 2)
        .expect("timeline 2");
    assert_eq!(tl2.parent, Some(1));
    assert!(tl2.segments >= 1);

    // The window now ends on timeline 2.
    let window = physical::list_window(std::slice::from_ref(&report), &store, None)
        .await
        .unwrap();
    assert_eq!(window.latest.unwrap().timeline, 2);
    drop(copy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_missing_segment_is_named_and_stops_recovery() {
    let store_dir = server_tempdir().unwrap();
    let store = DirWalStore::new(store_dir.path());
    let pg = support::archiving_cluster(store_dir.path());
    pg.psql("postgres", "CREATE TABLE ticks (id int PRIMARY KEY)")
        .unwrap();
    let parts = DirParts::new();
    let report = backup(&pg, &parts).await;
    for i in 1..=4 {
        pg.psql("postgres", &format!("INSERT INTO ticks VALUES ({i})"))
            .unwrap();
        support::switch_and_wait(&pg);
    }
    let opts = WalVerifyOptions {
        backups: vec![report.wal_range()],
        ..WalVerifyOptions::default()
    };
    assert!(wal::wal_verify(&store, &opts).await.unwrap().is_ok());

    // A segment well after the backup (the end of the backup also reads the segment after its
    // last one), with later ones archived.
    let segments = store.segments();
    let victim = segments
        .iter()
        .filter(|s| **s > report.stop_segment)
        .nth(1)
        .cloned()
        .expect("segments after the backup");
    assert!(segments.last().unwrap() > &victim);

    // Damaged: named by wal verify; recovery aborts instead of stopping early.
    store.damage(&victim, 5000);
    let v = wal::wal_verify(&store, &opts).await.unwrap();
    assert_eq!(v.damaged(), vec![victim.as_str()], "{:?}", v.problems);
    let presence_only = wal::wal_verify(
        &store,
        &WalVerifyOptions {
            read_data: false,
            ..opts.clone()
        },
    )
    .await
    .unwrap();
    assert!(presence_only.is_ok(), "presence alone cannot see damage");

    let d1 = server_tempdir().unwrap();
    let dir = d1.path().join("data");
    physical::restore_physical(
        &parts,
        &report,
        &dir,
        &restore_opts(store_dir.path(), RecoveryTarget::Latest),
    )
    .await
    .unwrap();
    let err = physical::verify_restored(&dir, &verify_opts())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PhysicalError::Recovery { .. }), "{msg}");
    assert!(msg.contains(&victim) && msg.contains("damaged"), "{msg}");

    // Missing: a gap, named; recovery aborts.
    store.damage(&victim, 5000); // undo
    std::fs::remove_file(store.path_of(&victim)).unwrap();
    let v = wal::wal_verify(&store, &opts).await.unwrap();
    assert_eq!(
        v.missing_segments(),
        vec![victim.clone()],
        "{:?}",
        v.problems
    );
    assert!(
        v.problems
            .iter()
            .any(|p| p.kind == WalProblemKind::Missing && p.name == victim)
    );
    let d2 = server_tempdir().unwrap();
    let dir = d2.path().join("data");
    physical::restore_physical(
        &parts,
        &report,
        &dir,
        &restore_opts(store_dir.path(), RecoveryTarget::Latest),
    )
    .await
    .unwrap();
    let err = physical::verify_restored(&dir, &verify_opts())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&victim) && msg.contains("gap"), "{msg}");

    // A target beyond the gap: PostgreSQL refuses to finish short of it.
    let d4 = server_tempdir().unwrap();
    let dir = d4.path().join("data");
    physical::restore_physical(
        &parts,
        &report,
        &dir,
        &restore_opts(
            store_dir.path(),
            RecoveryTarget::Time(support::server_now(&pg)),
        ),
    )
    .await
    .unwrap();
    let err = physical::verify_restored(&dir, &verify_opts())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("recovery ended before configured recovery target was reached")
            && msg.contains(&victim),
        "{msg}"
    );

    // A restore to a point before the gap still works.
    let d3 = server_tempdir().unwrap();
    let dir = d3.path().join("data");
    physical::restore_physical(
        &parts,
        &report,
        &dir,
        &restore_opts(store_dir.path(), RecoveryTarget::Immediate),
    )
    .await
    .unwrap();
    let ok = physical::verify_restored(&dir, &verify_opts())
        .await
        .unwrap();
    assert_eq!(ok.row_counts()["postgres"]["public.ticks"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_backups_refuse_servers_whose_backups_could_not_be_restored() {
    let parts = DirParts::new();
    // No WAL archiving: a base backup without its WAL restores nothing.
    let plain = Postgres::start().unwrap();
    let err = physical::base_backup(
        &plain.conninfo("postgres"),
        &parts,
        &BaseBackupOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PhysicalError::NotArchiving { .. }), "{err}");
    assert!(err.to_string().contains("archive_mode is off"), "{err}");

    // A tablespace outside the data directory: refused by name.
    let store_dir = server_tempdir().unwrap();
    let pg = support::archiving_cluster(store_dir.path());
    let space = server_tempdir().unwrap();
    pg.psql(
        "postgres",
        &format!(
            "CREATE TABLESPACE hot_space LOCATION '{}'",
            space.path().display()
        ),
    )
    .unwrap();
    let err = physical::base_backup(
        &pg.conninfo("postgres"),
        &parts,
        &BaseBackupOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PhysicalError::Tablespaces { .. }), "{err}");
    assert!(err.to_string().contains("hot_space"), "{err}");
    assert!(!parts.path(physical::BASE_PART).exists(), "nothing stored");
}
