//! Re-encryption survives `kill -9`: the real binary, a real PostgreSQL 15, a local repository.
//! Three backups, a key rotation, then `backstop key reencrypt` is killed with SIGKILL twice
//! while it works (once as soon as its job state exists, once after its checkpoint moved), and
//! run a third time to the end. After each kill every backup still verifies (every object read
//! and checked), `key reencrypt --status` says the job is unfinished, and at the end the job is
//! done, every backup verifies and restores, and the repository checks clean. Also: a refused
//! `init` leaves no new master key behind.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant, SystemTime};

use backstop_testkit::Postgres;
use support::{Process, run_env, stderr, stdout};

struct Site {
    tmp: tempfile::TempDir,
}

impl Site {
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        run_env(
            &self.path("data"),
            args,
            &[(
                "BACKSTOP_CONFIG",
                self.path("backstop.toml").to_str().unwrap(),
            )],
        )
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

    fn spawn_reencrypt(&self) -> Process {
        Process::spawn(
            &self.path("data"),
            &["key", "reencrypt"],
            &[(
                "BACKSTOP_CONFIG",
                self.path("backstop.toml").to_str().unwrap(),
            )],
        )
    }

    /// `key reencrypt --status`: 3 while a job is unfinished, 0 when none is.
    fn unfinished(&self) -> bool {
        let out = self.run(&["key", "reencrypt", "--status"]);
        match out.status.code() {
            Some(3) => true,
            Some(0) => false,
            other => panic!("status exited {other:?}: {}", stderr(&out)),
        }
    }

    fn every_backup_verifies(&self, ids: &[String]) {
        for id in ids {
            self.ok(&["verify", id]);
        }
    }
}

fn state_file(site: &Site) -> PathBuf {
    site.path("repo").join("reencryption").join("state")
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Waits until `ready` holds (polling the file system), for at most a minute.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not happen in time");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencryption_killed_twice_resumes_and_every_backup_stays_readable() {
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    // Rows that do not deduplicate or compress away, so the job has many chunks to re-seal.
    pg.psql(
        "app",
        "CREATE TABLE ticks (id bigint PRIMARY KEY, payload text); \
         INSERT INTO ticks SELECT g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) \
         FROM generate_series(1, 150000) g;",
    )
    .unwrap();
    let site = Site {
        tmp: tempfile::tempdir().unwrap(),
    };
    std::fs::write(
        site.path("backstop.toml"),
        format!(
            "data_dir = {:?}\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n[[sources]]\nname = \"app\"\npostgres = {:?}\n",
            site.path("data"),
            site.path("repo"),
            site.path("master.key"),
            pg.conninfo("app"),
        ),
    )
    .unwrap();
    site.ok(&[
        "init",
        "--generate-key",
        site.path("master.key").to_str().unwrap(),
        "--chunk-avg-kib",
        "64",
    ]);
    let mut ids = Vec::new();
    for round in 0..3 {
        let out = site.ok(&["backup", "--source", "app", "--json"]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("backup --json");
        ids.push(v["backup_id"].as_str().unwrap().to_string());
        pg.psql(
            "app",
            &format!(
                "INSERT INTO ticks SELECT g, md5(g::text || '{round}') FROM generate_series({}, {}) g;",
                200_000 + round * 50_000,
                200_000 + round * 50_000 + 49_999
            ),
        )
        .unwrap();
    }
    site.ok(&["key", "rotate", "--no-reencrypt"]);
    assert!(!site.unfinished(), "no job before the first run");

    // Killed as soon as its job state exists.
    let mut first = site.spawn_reencrypt();
    wait_until("the job state", || state_file(&site).exists());
    first.kill9();
    assert!(site.unfinished(), "a killed job is left unfinished");
    site.every_backup_verifies(&ids);

    // Killed again once its checkpoint has moved on.
    let before = modified(&state_file(&site));
    let mut second = site.spawn_reencrypt();
    wait_until("a checkpoint", || {
        modified(&state_file(&site)).is_some_and(|m| Some(m) != before)
    });
    second.kill9();
    assert!(site.unfinished(), "killed mid-job again");
    site.every_backup_verifies(&ids);

    // The third run finishes it.
    let out = site.ok(&["key", "reencrypt"]);
    assert!(!site.unfinished(), "the job finished: {out}");
    site.every_backup_verifies(&ids);
    let check = site.ok(&["check", "--read-data"]);
    assert!(check.contains("repository consistent"), "{check}");
    pg.create_db("restored").unwrap();
    site.ok(&[
        "restore",
        &ids[2],
        "--to",
        &pg.conninfo("restored"),
        "--allow-unverified",
    ]);
    // The third backup was taken after two rounds of 50,000 inserts.
    assert_eq!(
        pg.psql("restored", "SELECT count(*) FROM ticks")
            .unwrap()
            .trim(),
        "250000"
    );
    // The ledger tells the story: the job started once, ran three times, completed once.
    let tail = site.ok(&["ledger", "tail", "--json", "--from", "1"]);
    let count = |t: &str| tail.matches(&format!("\"type\":\"{t}\"")).count();
    assert_eq!(count("reencryption.completed"), 1, "{tail}");
    // Once, even when the first run was killed before it could say so: a resumed run says it.
    assert_eq!(count("reencryption.started"), 1, "{tail}");
}

/// A refused `init` leaves no master key behind: a key file that no repository uses would be
/// mistaken for the one that matters.
#[test]
fn a_refused_init_leaves_no_new_master_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    let repo = dir.path().join("repo");
    let init = |extra: &[&str]| {
        let mut args = vec![
            "init",
            "--repo",
            repo.to_str().unwrap(),
            "--generate-key",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        support::run(&dir.path().join("data"), &args)
    };
    let out = init(&["--chunk-avg-kib", "16"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("power of two"), "{}", stderr(&out));
    assert!(!key.exists(), "a key was left by a refused init");
    let out = init(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(key.exists());
    // A second init of the same location is refused, and the first key stays.
    let first = std::fs::read(&key).unwrap();
    let other = dir.path().join("second.key");
    let out = support::run(
        &dir.path().join("data"),
        &[
            "init",
            "--repo",
            repo.to_str().unwrap(),
            "--generate-key",
            other.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(!other.exists(), "the refused init's key was kept");
    assert_eq!(std::fs::read(&key).unwrap(), first);
}
