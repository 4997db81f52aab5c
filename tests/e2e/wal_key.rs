//! A database host with a WAL-only key, end to end: `backstop key export --purpose wal` writes
//! the key file where the master key is; a real PostgreSQL whose `archive_command` is `wal-push`
//! with a configuration that names only that file (no master key anywhere on the "host")
//! archives its WAL, `wal-fetch` restores it, and the master-key side reads what the host sealed
//! (`wal verify`). The same file cannot open the backup's manifest (the error names the
//! purpose), cannot list backups, is refused when modified (another repository id, one flipped
//! bit) or readable by its group (with the `chmod` to run), and after a rotation of the `wal`
//! key `wal-push` says to re-export it.
//!
//! When the tests run as root, PostgreSQL (and so `wal-push`) runs as the `postgres` user: the
//! site directory is handed to that user.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backstop_repo::{
    KeyAccessLog, KeyPurpose, LocalBackend, MasterKey, PurposeKeyFile, PurposeRepository,
    RepoError, Repository,
};
use backstop_testkit::{
    Nats, Postgres, PostgresOptions, free_port, give_to_server_user, server_tempdir,
};
use support::{Process, bin, query, stderr, stdout, switch_and_wait};

struct Site {
    tmp: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        Site::with("")
    }

    /// A site whose two configuration files both end with `extra` (e.g. a `[nats]` section).
    fn with(extra: &str) -> Site {
        let site = Site {
            tmp: server_tempdir().unwrap(),
        };
        // Where the master key is: the backup server.
        std::fs::write(
            site.path("admin.toml"),
            format!(
                "data_dir = {:?}\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n{extra}",
                site.path("admin-data"),
                site.path("repo"),
                site.path("master.key"),
            ),
        )
        .unwrap();
        // The database host: the repository and the WAL key file, no master key.
        std::fs::write(
            site.path("host.toml"),
            format!(
                "data_dir = {:?}\n[repository]\nlocation = {:?}\n[wal]\nkey_file = {:?}\n{extra}",
                site.path("host-data"),
                site.path("repo"),
                site.path("wal.key"),
            ),
        )
        .unwrap();
        // The backup server again, handing PostgreSQL's restore_command (physical restores and
        // test restores) the WAL key file instead of the master key.
        std::fs::write(
            site.path("restore.toml"),
            format!(
                "data_dir = {:?}\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n[wal]\nkey_file = {:?}\n{extra}",
                site.path("admin-data"),
                site.path("repo"),
                site.path("master.key"),
                site.path("wal.key"),
            ),
        )
        .unwrap();
        let out = site.run(
            "admin.toml",
            &[
                "init",
                "--generate-key",
                site.path("master.key").to_str().unwrap(),
                "--chunk-avg-kib",
                "64",
            ],
        );
        assert!(out.status.success(), "init: {}", stderr(&out));
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn command(&self, config: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(self.path(config))
            .args(args)
            .current_dir(self.tmp.path())
            .env_remove("BACKSTOP_MASTER_KEY")
            .env("BACKSTOP_LOG", "info")
            .env("BACKSTOP_OPERATOR", "dba");
        cmd
    }

    fn run(&self, config: &str, args: &[&str]) -> Output {
        self.command(config, args).output().expect("run backstop")
    }

    fn ok(&self, config: &str, args: &[&str]) -> String {
        let out = self.run(config, args);
        assert!(
            out.status.success(),
            "backstop {args:?} ({config}) failed:\n{}\n{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    fn archive_command(&self) -> String {
        support::archive_command(&self.path("host.toml"), "main")
    }

    fn master(&self) -> MasterKey {
        MasterKey::from_file(&self.path("master.key")).unwrap()
    }

    fn backend(&self) -> Arc<LocalBackend> {
        Arc::new(LocalBackend::new(self.path("repo")).unwrap())
    }
}

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs wal-fetch with the host's configuration and a given key file; returns (exit code,
/// stderr).
fn fetch_with(site: &Site, key_file: &Path, name: &str, dest: &Path) -> (i32, String) {
    let out = site.run(
        "host.toml",
        &[
            "wal-fetch",
            "--source",
            "main",
            "--key-file",
            key_file.to_str().unwrap(),
            name,
            dest.to_str().unwrap(),
        ],
    );
    (out.status.code().unwrap_or(-1), stderr(&out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_host_archives_and_restores_wal_with_only_the_wal_key_file() {
    let site = Site::new();

    // The keys, listed where the master key is.
    let listed: serde_json::Value =
        serde_json::from_str(&site.ok("admin.toml", &["key", "list", "--json"])).unwrap();
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 6, "{listed}");
    assert!(
        keys.iter()
            .all(|k| k["current"] == true && k["version"] == 1)
    );
    let table = site.ok("admin.toml", &["key", "list"]);
    assert!(
        table.contains("wal") && table.contains("database"),
        "{table}"
    );

    // Export the wal key; only wal is exportable, and the file is never overwritten.
    let key_file = site.path("wal.key");
    let out = site.ok(
        "admin.toml",
        &[
            "key",
            "export",
            "--purpose",
            "wal",
            "--out",
            key_file.to_str().unwrap(),
        ],
    );
    assert!(out.contains("wal-v1-"), "{out}");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let exported = std::fs::read(&key_file).unwrap();
    let again = site.run(
        "admin.toml",
        &[
            "key",
            "export",
            "--purpose",
            "wal",
            "--out",
            key_file.to_str().unwrap(),
        ],
    );
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("never overwritten"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read(&key_file).unwrap(), exported);
    let db = site.run(
        "admin.toml",
        &[
            "key",
            "export",
            "--purpose",
            "database",
            "--out",
            site.path("db.key").to_str().unwrap(),
        ],
    );
    assert!(!db.status.success());
    assert!(
        stderr(&db).contains("cannot be exported"),
        "{}",
        stderr(&db)
    );
    assert!(!site.path("db.key").exists());
    // The export is recorded as a key access by the operator.
    let events = site.ok("admin.toml", &["ledger", "tail", "--json", "--from", "1"]);
    assert!(
        events
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .any(|e| e["type"] == "key.accessed"
                && e["payload"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("exported to the key file"))),
        "{events}"
    );

    // A real PostgreSQL archives through the host's configuration: no master key on it.
    give_to_server_user(site.tmp.path()).unwrap();
    let mut pg = Postgres::start_with(
        PostgresOptions::new()
            .conf("archive_mode = on")
            .conf(format!("archive_command = '{}'", site.archive_command())),
    )
    .unwrap();
    query(
        &pg,
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g; CHECKPOINT;",
    );
    // A base backup, where the master key is.
    site.ok(
        "admin.toml",
        &[
            "backup",
            "--physical",
            "--pg",
            &pg.conninfo("postgres"),
            "--name",
            "main",
        ],
    );
    query(
        &pg,
        "INSERT INTO t SELECT g FROM generate_series(101, 150) g",
    );
    let seg = switch_and_wait(&pg);
    let object = site
        .path("repo")
        .join("wal/main")
        .join(&seg[..8])
        .join(&seg);
    assert!(object.exists(), "{} not archived", object.display());

    // wal-fetch with only the key file restores it, byte for byte what the master key reads.
    let host_copy = site.path("host-copy");
    let (code, err) = fetch_with(&site, &key_file, &seg, &host_copy);
    assert_eq!(code, 0, "{err}");
    let admin_copy = site.path("admin-copy");
    let out = site.run(
        "admin.toml",
        &[
            "wal-fetch",
            "--source",
            "main",
            &seg,
            admin_copy.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let restored = std::fs::read(&host_copy).unwrap();
    assert_eq!(restored.len(), 16 << 20);
    assert_eq!(restored, std::fs::read(&admin_copy).unwrap());
    // The master-key side checks the archive the host sealed.
    let verify = site.ok("admin.toml", &["wal", "verify", "--source", "main"]);
    assert!(verify.contains("intact"), "{verify}");

    // A point-in-time restore whose restore_command gets the WAL key file, not the master key:
    // the restored server replays the archived WAL through it.
    let restored_dir = site.path("restored");
    site.ok(
        "restore.toml",
        &[
            "restore",
            "latest",
            "--allow-unverified",
            "--physical",
            "--source",
            "main",
            "--to-dir",
            restored_dir.to_str().unwrap(),
        ],
    );
    let auto = std::fs::read_to_string(restored_dir.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains(&format!("--key-file {}", key_file.display())),
        "{auto}"
    );
    assert!(!auto.contains("master"), "{auto}");
    let copy = Postgres::from_data_dir(&restored_dir, PostgresOptions::new()).unwrap();
    copy.wait_promoted().unwrap();
    assert_eq!(query(&copy, "SELECT count(*) FROM t"), "150");
    drop(copy);

    // The key file cannot list backups (every such command needs the master key) ...
    let list = site.run("host.toml", &["list"]);
    assert!(!list.status.success());
    assert!(stderr(&list).contains("no master key"), "{}", stderr(&list));
    // ... nor open the backup's manifest: the error names the purpose.
    let file = PurposeKeyFile::load(&key_file).unwrap();
    let host = PurposeRepository::open(site.backend(), file, Arc::new(KeyAccessLog::new()))
        .await
        .unwrap();
    let manifests: Vec<_> = std::fs::read_dir(site.path("repo").join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!manifests.is_empty());
    for m in &manifests {
        let e = host
            .get_blob(&format!("manifests/{m}"), None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                RepoError::KeyNotHeld {
                    purpose: KeyPurpose::Wal,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("holds only the wal key"), "{e}");
    }

    // A modified file is refused: another repository id, one flipped bit in the key.
    let text = String::from_utf8(exported.clone()).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let repo_id = doc["repository_id"].as_str().unwrap();
    let other_repo = site.path("other-repo.key");
    std::fs::write(
        &other_repo,
        text.replace(repo_id, "01941f29-7c00-7000-8000-00000000dead"),
    )
    .unwrap();
    // One character of the base64 key changed: some of its bits flip.
    let key_b64 = doc["keys"][0]["key"].as_str().unwrap();
    let first = if key_b64.starts_with('A') { "B" } else { "A" };
    let changed = format!("{first}{}", &key_b64[1..]);
    let flipped = site.path("flipped.key");
    std::fs::write(&flipped, text.replace(key_b64, &changed)).unwrap();
    for bad in [&other_repo, &flipped] {
        set_mode(bad, 0o600);
        let (code, err) = fetch_with(&site, bad, &seg, &site.path("bad-copy"));
        assert_eq!(code, 150, "{err}");
        assert!(err.contains("MAC does not match"), "{err}");
        assert!(!site.path("bad-copy").exists());
    }
    // A group-readable file is refused, with the chmod to run.
    let shared = site.path("shared.key");
    std::fs::write(&shared, &exported).unwrap();
    set_mode(&shared, 0o640);
    let (code, err) = fetch_with(&site, &shared, &seg, &site.path("bad-copy"));
    assert_eq!(code, 150, "{err}");
    assert!(
        err.contains(&format!("chmod 600 {}", shared.display())),
        "{err}"
    );

    // After a rotation of the wal key, the host keeps archiving with its version and
    // wal-push says to re-export the file.
    let repo = Repository::open(
        site.backend(),
        &site.master(),
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .unwrap();
    let rotation = repo.rotate_key(KeyPurpose::Wal).await.unwrap();
    give_to_server_user(site.tmp.path()).unwrap();
    let seg2 = switch_and_wait(&pg);
    assert!(seg2 > seg);
    let log = pg.log_tail(200);
    assert!(
        log.contains("the wal key was rotated") && log.contains(&rotation.new.key_id),
        "{log}"
    );
    let (code, err) = fetch_with(&site, &key_file, &seg2, &site.path("copy2"));
    assert_eq!(code, 0, "{err}");
    pg.stop().unwrap();
}

/// With NATS reachable, the host's uses of its key file are recorded: `wal-push` appends a
/// `key.accessed` (actor `worker:wal-push`, reason "... with a key file") beside its
/// `wal.archived`, into the ledger `serve` holds, signed by the host's identity (a `wal-host`
/// from `backstop ledger identity new`, so unsigned appends are refused) and inside its grants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hosts_key_uses_are_recorded_through_nats() {
    let nats = Nats::start().expect("nats-server");
    let site = Site::with(&format!(
        "[nats]\nurl = \"{}\"\n[api]\nlisten = \"127.0.0.1:{}\"\n[reports]\nweekly = false\n",
        nats.url(),
        free_port()
    ));
    let key_file = site.path("wal.key");
    site.ok(
        "admin.toml",
        &[
            "key",
            "export",
            "--purpose",
            "wal",
            "--out",
            key_file.to_str().unwrap(),
        ],
    );
    // The host signs its appends as identity db1, whose grants (`--role wal-host`) allow
    // wal.archived and its key accesses only: the printed parts go into each side's config.
    let made = site.ok(
        "admin.toml",
        &[
            "ledger",
            "identity",
            "new",
            "db1",
            "--key-file",
            site.path("db1.key").to_str().unwrap(),
            "--role",
            "wal-host",
        ],
    );
    let (ledger_part, host_part) = made.split_once("# On the wal-host").unwrap();
    let host_part = host_part.split_once('\n').unwrap().1;
    let admin = std::fs::read_to_string(site.path("admin.toml")).unwrap();
    std::fs::write(site.path("admin.toml"), format!("{admin}\n{ledger_part}")).unwrap();
    let host = std::fs::read_to_string(site.path("host.toml")).unwrap();
    std::fs::write(
        site.path("host.toml"),
        host.replace("[nats]\n", &format!("[nats]\n{host_part}\n")),
    )
    .unwrap();
    let mut serve = Process::spawn(
        &site.path("admin-data"),
        &[
            "--config",
            site.path("admin.toml").to_str().unwrap(),
            "serve",
            "--no-workers",
        ],
        &[],
    );
    serve.wait_for_log("publishing to NATS JetStream", Duration::from_secs(60));

    give_to_server_user(site.tmp.path()).unwrap();
    let mut pg = Postgres::start_with(
        PostgresOptions::new()
            .conf("archive_mode = on")
            .conf(format!("archive_command = '{}'", site.archive_command())),
    )
    .unwrap();
    let seg = switch_and_wait(&pg);

    let deadline = Instant::now() + backstop_testkit::deadline();
    let (accessed, archived) = loop {
        let tail = site.ok("admin.toml", &["ledger", "tail", "--json", "--from", "1"]);
        let events: Vec<serde_json::Value> = tail
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let accessed: Vec<_> = events
            .iter()
            .filter(|e| {
                e["type"] == "key.accessed"
                    && e["payload"]["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("with a key file"))
            })
            .cloned()
            .collect();
        let archived = events.iter().any(|e| {
            e["type"] == "wal.archived"
                && serde_json::to_string(&e["payload"]).unwrap().contains(&seg)
        });
        if !accessed.is_empty() && archived {
            break (accessed, archived);
        }
        assert!(
            Instant::now() < deadline,
            "the host's key access was not recorded; server log:\n{}\nserve:\n{}",
            pg.log_tail(40),
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(archived);
    let a = &accessed[0];
    assert_eq!(a["actor"], "worker:wal-push", "{a}");
    assert_eq!(a["payload"]["purpose"], "wal", "{a}");
    assert!(
        a["payload"]["key_id"]
            .as_str()
            .is_some_and(|k| k.starts_with("wal-v1-")),
        "{a}"
    );
    // Everything the host sent was inside its grants.
    let tail = site.ok("admin.toml", &["ledger", "tail", "--json", "--from", "1"]);
    assert!(
        !tail.contains("\"access.denied\""),
        "the host's signed appends were refused: {tail}"
    );
    pg.stop().unwrap();
    serve.terminate();
}
