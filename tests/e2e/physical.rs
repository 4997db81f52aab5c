//! Point-in-time recovery end to end: the `backstop` binary as PostgreSQL 15's `archive_command`
//! and `restore_command`, physical base backups into a local repository, restores to a moment
//! between two commits and to the latest archived point (each started as a real server), the
//! restorable window, a restored copy that becomes the new production (timeline 2) and a later
//! restore that follows it, `wal verify` on an intact and on a damaged archive, and a restore that
//! needs a missing segment stopping with the reason instead of ending early.
//!
//! When the tests run as root, PostgreSQL (and so `wal-push` / `wal-fetch`) runs as the
//! `postgres` user: the configuration, the master key and the repository live in a directory
//! handed to that user.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use backstop_testkit::{Postgres, PostgresOptions, give_to_server_user, server_tempdir};
use support::{TwoBatches, bin, later_rows, query, stderr, stdout, switch_and_wait, two_batches};

/// A repository, its key, a ledger and a configuration file naming them, all reachable by the
/// PostgreSQL user.
struct Site {
    tmp: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        let tmp = server_tempdir().unwrap();
        let site = Site { tmp };
        std::fs::write(
            site.config(),
            format!(
                "data_dir = {:?}\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n",
                site.path("ledger-data"),
                site.path("repo"),
                site.path("master.key"),
            ),
        )
        .unwrap();
        let out = site.run(&[
            "init",
            "--generate-key",
            site.path("master.key").to_str().unwrap(),
            "--chunk-avg-kib",
            "64",
        ]);
        assert!(out.status.success(), "init: {}", stderr(&out));
        // PostgreSQL's user runs wal-push and wal-fetch: it reads the config and the key and
        // writes WAL into the repository.
        give_to_server_user(site.tmp.path()).unwrap();
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn config(&self) -> PathBuf {
        self.path("backstop.toml")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(self.config())
            .args(args)
            .env("BACKSTOP_LOG", "info")
            .env("BACKSTOP_OPERATOR", "dr-lead");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run backstop")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "backstop {args:?} failed:\n{}\n{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    fn archive_command(&self) -> String {
        support::archive_command(&self.config(), "main")
    }

    /// The sealed object of an archived WAL file.
    fn wal_object(&self, name: &str) -> PathBuf {
        self.path("repo")
            .join("wal/main")
            .join(&name[..8])
            .join(name)
    }

    fn events(&self, event_type: &str) -> Vec<serde_json::Value> {
        self.ok(&["ledger", "tail", "--json", "--from", "1"])
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["type"] == event_type)
            .collect()
    }
}

fn restore(site: &Site, dir: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "restore",
        "latest",
        "--allow-unverified",
        "--physical",
        "--source",
        "main",
        "--to-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    site.ok(&args)
}

#[test]
fn point_in_time_recovery_through_the_binary() {
    let site = Site::new();
    let mut pg = Postgres::start_with(
        PostgresOptions::new()
            .conf("archive_mode = on")
            .conf(format!("archive_command = '{}'", site.archive_command())),
    )
    .unwrap();
    query(
        &pg,
        "CREATE TABLE trades (id int PRIMARY KEY, note text, at timestamptz NOT NULL DEFAULT clock_timestamp());
         INSERT INTO trades (id, note) SELECT g, md5(g::text) FROM generate_series(1, 100) g;
         CHECKPOINT;",
    );

    // A base backup through the CLI.
    let url = pg.conninfo("postgres");
    let backup: serde_json::Value = serde_json::from_str(&site.ok(&[
        "backup",
        "--physical",
        "--pg",
        &url,
        "--name",
        "main",
        "--json",
    ]))
    .expect("backup --json");
    assert_eq!(backup["method"], "physical");
    assert_eq!(backup["source"], "main");
    let report = &backup["physical_report"];
    assert_eq!(report["part"], "base/base.tar");
    assert!(report["has_manifest"].as_bool().unwrap());

    // Two batches of rows, each committed and archived, with a known moment between them.
    let TwoBatches {
        seg_a,
        between,
        seg_b,
    } = two_batches(&pg);
    assert!(seg_b > seg_a);
    let ordered = query(
        &pg,
        &format!(
            "SELECT max(at) FILTER (WHERE id BETWEEN 101 AND 150) < '{between}'::timestamptz
                    AND min(at) FILTER (WHERE id > 200) > '{between}'::timestamptz FROM trades"
        ),
    );
    assert_eq!(ordered, "t", "batch a before {between}, batch b after it");

    // The window spans the base backup to the last archived commit.
    let window = site.ok(&["restore", "--physical", "--list-window"]);
    assert!(window.contains("earliest"), "{window}");
    assert!(window.contains(&seg_b), "{window}");
    let w: serde_json::Value =
        serde_json::from_str(&site.ok(&["restore", "--physical", "--list-window", "--json"]))
            .unwrap();
    assert_eq!(w["source"], "main");
    assert_eq!(w["last_segment"], seg_b.as_str());
    let latest: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(w["latest"]["time"].clone()).expect("latest commit time");
    let between_t: chrono::DateTime<chrono::Utc> = between.parse().unwrap();
    assert!(latest > between_t, "{w}");

    // To the latest archived point: every committed row.
    let latest_dir = site.path("latest");
    restore(&site, &latest_dir, &[]);
    let copy = Postgres::from_data_dir(&latest_dir, PostgresOptions::new()).unwrap();
    copy.wait_promoted().unwrap();
    assert_eq!(later_rows(&copy), "100|101|250");
    drop(copy);

    // To the moment between the batches: exactly the rows committed before it. This copy keeps
    // archiving (it becomes the new production, on timeline 2).
    let pitr = site.path("pitr");
    let out = restore(
        &site,
        &pitr,
        &["--target-time", &between, "--keep-archiving"],
    );
    assert!(out.contains("recovery target: time"), "{out}");
    let auto = std::fs::read_to_string(pitr.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("wal-fetch --source main"), "{auto}");
    assert!(auto.contains("recovery_target_time"), "{auto}");
    let copy = Postgres::from_data_dir(&pitr, PostgresOptions::new()).unwrap();
    copy.wait_promoted().unwrap();
    assert_eq!(later_rows(&copy), "50|101|150");
    assert_eq!(
        query(&copy, "SELECT count(*) FROM trades WHERE id <= 100"),
        "100"
    );
    assert_eq!(
        query(&copy, "SELECT timeline_id FROM pg_control_checkpoint()"),
        "2"
    );
    query(
        &copy,
        "INSERT INTO trades (id, note) SELECT g, 'after the branch' FROM generate_series(301, 310) g",
    );
    let seg_tl2 = switch_and_wait(&copy);
    assert!(seg_tl2.starts_with("00000002"), "{seg_tl2}");
    drop(copy);

    // The latest point now follows the new timeline: the branch's rows, not batch b, which
    // lives only on the abandoned end of timeline 1.
    let branch_dir = site.path("branch");
    restore(&site, &branch_dir, &[]);
    let copy = Postgres::from_data_dir(&branch_dir, PostgresOptions::new()).unwrap();
    copy.wait_promoted().unwrap();
    assert_eq!(later_rows(&copy), "60|101|310");
    drop(copy);

    // A real test restore of the physical backup: a temporary cluster replayed to consistency,
    // pg_amcheck, row counts, all removed afterwards.
    let out = site.ok(&["verify", "latest", "--restore"]);
    assert!(out.contains("pg_amcheck: no corruption"), "{out}");
    assert!(out.contains("trades"), "{out}");
    let passed = site.events("verification.passed");
    assert_eq!(passed.len(), 1, "{passed:?}");
    assert_eq!(passed[0]["payload"]["tier"]["tier"], "restore");

    // The operator and the point in time are on record.
    let completed = site.events("recovery.completed");
    assert_eq!(completed.len(), 3, "{completed:?}");
    assert_eq!(completed[1]["payload"]["operator"], "dr-lead");
    let scope = &completed[1]["payload"]["scope"];
    assert_eq!(scope["target"], pitr.to_str().unwrap());
    assert!(
        scope["point_in_time"]
            .as_str()
            .unwrap()
            .starts_with("time "),
        "{scope}"
    );
    let done = site.events("backup.completed");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["payload"]["method"], "physical");

    // The archive is intact; wal verify records the archived files it finds unrecorded.
    let out = site.ok(&["wal", "verify"]);
    assert!(out.contains("WAL archive intact"), "{out}");
    let archived: Vec<String> = site
        .events("wal.archived")
        .iter()
        .map(|e| e["payload"]["segment"].as_str().unwrap().to_string())
        .collect();
    assert!(
        out.contains("timeline 2, branched from timeline 1"),
        "{out}"
    );
    for seg in [&seg_a, &seg_b, &seg_tl2] {
        assert_eq!(
            archived.iter().filter(|s| *s == seg).count(),
            1,
            "{seg} in {archived:?}"
        );
    }
    // Recording again adds nothing.
    site.ok(&["wal", "verify", "--presence-only"]);
    assert_eq!(site.events("wal.archived").len(), archived.len());

    // wal-fetch: a file beyond the end of the archive is "not archived" (exit 1).
    let scratch = site.path("fetch");
    std::fs::create_dir_all(&scratch).unwrap();
    let out = site
        .command(&[
            "wal-fetch",
            "--source",
            "main",
            "0000000100000000000000FF",
            "pg_wal/RECOVERYXLOG",
        ])
        .current_dir(&scratch)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // A segment lost and another damaged: wal verify names both and fails.
    std::fs::rename(site.wal_object(&seg_a), site.path("kept-segment")).unwrap();
    let damaged = site.wal_object(&seg_b);
    let mut bytes = std::fs::read(&damaged).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&damaged, bytes).unwrap();
    let out = site.run(&["wal", "verify"]);
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(text.contains(&format!("MISSING {seg_a}")), "{text}");
    assert!(text.contains(&format!("DAMAGED {seg_b}")), "{text}");
    let out = site.run(&["wal", "verify", "--json"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["missing_segments"][0], seg_a.as_str());

    // A restore to the latest point needs the lost segment: recovery stops and says why,
    // instead of promoting at the gap.
    let gap_dir = site.path("gap");
    restore(&site, &gap_dir, &[]);
    let started = Postgres::from_data_dir(&gap_dir, PostgresOptions::new());
    let marker = gap_dir.join("backstop.recovery-failed");
    let start = Instant::now();
    while !marker.exists() {
        assert!(
            start.elapsed() < backstop_testkit::deadline(),
            "recovery did not abort at the gap"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let why = std::fs::read_to_string(&marker).unwrap();
    assert!(why.contains(&seg_a), "{why}");
    assert!(why.contains("gap"), "{why}");
    if let Ok(copy) = &started {
        // If it opened for reads before reaching the gap, it must never have promoted.
        std::thread::sleep(Duration::from_secs(1));
        assert_ne!(
            copy.psql("postgres", "SELECT pg_is_in_recovery()")
                .ok()
                .as_deref(),
            Some("f")
        );
    }
    drop(started);

    pg.stop().unwrap();
}
