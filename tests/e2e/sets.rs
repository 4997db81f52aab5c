//! Backup sets end to end through the binary, on real servers: a set of four components (a
//! PostgreSQL database, a Redis server, a files tree and a command source over SQLite) taken by
//! `backup --set nightly --tag pre-deploy`, listed by `set list`, checked by `restore --set ID
//! --dry-run` (every target unchanged, no recovery recorded), restored by `--only redis` alone
//! (the database target not created, the files and SQLite targets absent), then `--only
//! database` from `latest --tag pre-deploy`; a set with a failing component exits non-zero,
//! names it, and keeps the other component's backup.

mod support;

use std::process::Command;

use backstop_testkit::{Postgres, Redis};
use support::{Site, stderr, stdout};

fn sqlite(db: &std::path::Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn databases(pg: &Postgres) -> String {
    pg.psql(
        "postgres",
        "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database",
    )
    .unwrap()
}

#[test]
fn a_set_of_four_components_backs_up_together_and_restores_selectively() {
    let site = Site::new("dba");
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE orders (id int PRIMARY KEY, qty int); \
         INSERT INTO orders SELECT g, g % 7 FROM generate_series(1, 2500) g;",
    )
    .unwrap();
    let redis = Redis::start().unwrap();
    let mut p = String::new();
    for i in 0..500 {
        let (k, v) = (format!("session:{i}"), format!("user{i}"));
        p.push_str(&format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
            k.len(),
            v.len()
        ));
    }
    redis.pipe(p.as_bytes()).unwrap();
    let models = site.path("srv/models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(models.join("model.bin"), vec![7u8; 300_000]).unwrap();
    let db = site.path("signals.db");
    sqlite(
        &db,
        "CREATE TABLE signals (id INTEGER PRIMARY KEY, body TEXT); \
         INSERT INTO signals VALUES (1, 'buy'), (2, 'sell');",
    );
    let restore_dir = site.path("restore");
    let rdb = restore_dir.join("dump.rdb");
    let config = format!(
        r#"data_dir = {data:?}
[repository]
location = {repo:?}
master_key_file = {key:?}

[[sources]]
name = "main"
postgres = "{main}"

[[sources]]
name = "cache"
kind = "redis"
url = "{redis}"

[[sources]]
name = "models"
kind = "files"
paths = [{models:?}]

[[sources]]
name = "signals"
kind = "command"
backup = "sqlite3 '{db}' .dump"
restore = "sqlite3 \"$BACKSTOP_TARGET\""

[[sources]]
name = "broken"
kind = "command"
backup = "echo 'disk on fire' >&2; exit 3"

[[sets]]
name = "nightly"
sources = ["main", "cache", "models", "signals"]
[sets.restore]
main = "{restored_db}"
cache = {rdb:?}
models = {restored_models:?}
signals = {restored_sqlite:?}

[[sets]]
name = "partial"
sources = ["cache", "broken"]
"#,
        data = site.path("data"),
        repo = site.path("repo"),
        key = site.path("master.key"),
        main = pg.conninfo("app"),
        redis = redis.url(),
        models = models,
        db = db.display(),
        restored_db = pg.conninfo("app_restored"),
        rdb = rdb,
        restored_models = restore_dir.join("models"),
        restored_sqlite = restore_dir.join("signals.db"),
    );
    std::fs::write(site.path("backstop.toml"), &config).unwrap();
    site.ok(&[
        "init",
        "--generate-key",
        site.path("master.key").to_str().unwrap(),
    ]);

    // The set: four backups, one manifest each, one set id, the tag on each.
    let out = site.ok(&[
        "backup",
        "--set",
        "nightly",
        "--tag",
        "pre-deploy",
        "--json",
    ]);
    let taken: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(taken["ok"], true, "{taken}");
    let set_id = taken["set_id"].as_str().unwrap().to_string();
    let completed = taken["completed"].as_array().unwrap();
    assert_eq!(completed.len(), 4, "{taken}");
    let listed = site.ok(&["set", "list", "--json"]);
    let sets: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let set = &sets.as_array().unwrap()[0];
    assert_eq!(set["set_id"], set_id.as_str());
    assert_eq!(set["tags"], serde_json::json!(["pre-deploy"]));
    let roles: Vec<&str> = set["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["role"].as_str().unwrap())
        .collect();
    // Restore order: databases, then Redis, then files, then the rest.
    assert_eq!(roles, ["database", "redis", "files", "other"], "{set}");

    let tail = || site.ok(&["ledger", "tail", "--json", "--from", "1"]);
    let count = |t: &str, tail: &str| {
        tail.lines()
            .filter(|l| l.contains(&format!("\"type\":\"{t}\"")))
            .count()
    };
    let before = tail();
    assert_eq!(count("set.started", &before), 1);
    assert_eq!(count("set.completed", &before), 1);
    assert_eq!(count("backup.completed", &before), 4);

    // Dry run: each step named, every target unchanged, no recovery recorded.
    let dbs_before = databases(&pg);
    let out = site.ok(&["restore", "--set", &set_id, "--dry-run"]);
    let at = |role: &str, source: &str| {
        let needle = format!("{role:<13} {source}");
        out.find(&needle)
            .unwrap_or_else(|| panic!("{needle:?} not in:\n{out}"))
    };
    assert!(at("database", "main") < at("redis", "cache"), "{out}");
    assert!(at("redis", "cache") < at("files", "models"), "{out}");
    assert!(at("files", "models") < at("other", "signals"), "{out}");
    assert!(out.contains("2500 rows"), "{out}");
    assert!(out.contains("500 keys"), "{out}");
    assert!(out.contains("nothing was written"), "{out}");
    assert_eq!(databases(&pg), dbs_before);
    assert!(
        !restore_dir.exists(),
        "the dry run wrote under {restore_dir:?}"
    );
    let after = tail();
    assert_eq!(count("recovery.requested", &after), 0);
    assert_eq!(count("recovery.started", &after), 0);

    // --only redis: the RDB alone; a new server loads the same keys.
    std::fs::create_dir_all(&restore_dir).unwrap();
    let out = site.ok(&["restore", "--set", &set_id, "--only", "redis"]);
    assert!(out.contains("1 of 4 components"), "{out}");
    let copy = Redis::start_with(Some(&rdb), &[]).unwrap();
    assert_eq!(copy.cli(&["DBSIZE"]).unwrap().trim(), "500");
    assert_eq!(
        copy.cli(&["DEBUG", "DIGEST"]).unwrap(),
        redis.cli(&["DEBUG", "DIGEST"]).unwrap()
    );
    assert_eq!(
        databases(&pg),
        dbs_before,
        "the database target was touched"
    );
    assert!(!restore_dir.join("models").exists());
    assert!(!restore_dir.join("signals.db").exists());
    assert_eq!(count("recovery.completed", &tail()), 1);

    // The newest set tagged pre-deploy, its database only, to a target given on the line.
    let out = site.ok(&[
        "restore",
        "--set",
        "latest",
        "--tag",
        "pre-deploy",
        "--only",
        "main",
        "--target",
        &format!("main={}", pg.conninfo("app_rollback")),
    ]);
    assert!(out.contains(&set_id), "{out}");
    assert_eq!(
        pg.psql("app_rollback", "SELECT count(*) FROM orders")
            .unwrap(),
        "2500"
    );

    // A component that fails: the set fails, names it, and keeps the other's backup.
    let out = site.run(&["backup", "--set", "partial"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(
        o.contains("FAILED  broken") && o.contains("exit code 3"),
        "{o}"
    );
    assert!(e.contains("1 of 2 components failed (broken)"), "{e}");
    let listed = site.ok(&["set", "list"]);
    let partial = listed
        .lines()
        .find(|l| l.contains("partial"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(
        partial.contains("cache (redis)") && !partial.contains("broken"),
        "{listed}"
    );
    let tail = tail();
    let done = tail
        .lines()
        .rfind(|l| l.contains("\"type\":\"set.completed\""))
        .unwrap();
    assert!(done.contains("disk on fire"), "{done}");

    // An --only naming nothing in the set says what the set holds.
    let out = site.run(&["restore", "--set", &set_id, "--only", "kafka"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("main (database)"), "{}", stderr(&out));
}
