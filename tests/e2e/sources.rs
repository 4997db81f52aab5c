//! Command and Redis sources end to end through the binary, from a configuration file with
//! `kind = "command"` and `kind = "redis"` beside a PostgreSQL-less setup: `backup --source`,
//! `verify --restore` (the verify command on a test-restored SQLite copy; a Redis snapshot loaded
//! by a throwaway server), `restore --to` (the restore command) and `restore --out` (dump.rdb,
//! loaded by a new redis-server with the same keys). A failing backup command exits non-zero with
//! its stderr tail and leaves no backup; a key of another kind is refused.

mod support;

use std::process::Command;

use backstop_testkit::Redis;
use support::{Site, stderr};

fn sqlite(db: &std::path::Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn backup_id(out: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(out).unwrap();
    v["backup_id"].as_str().unwrap().to_string()
}

#[test]
fn command_and_redis_sources_through_the_cli() {
    let site = Site::new("dba");
    let db = site.path("app.db");
    sqlite(
        &db,
        "CREATE TABLE signals (id INTEGER PRIMARY KEY, body TEXT); \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) \
         INSERT INTO signals SELECT i, 'signal ' || i FROM n;",
    );
    let redis = Redis::start().unwrap();
    let mut p = String::new();
    for i in 0..2000 {
        p.push_str(&format!(
            "*3\r\n$4\r\nSADD\r\n${}\r\nset:{i}\r\n$1\r\n{}\r\n",
            4 + i.to_string().len(),
            i % 10
        ));
    }
    redis.pipe(p.as_bytes()).unwrap();
    let config = format!(
        r#"data_dir = {data:?}
[repository]
location = {repo:?}
master_key_file = {key:?}

[[sources]]
name = "app-sqlite"
kind = "command"
backup = "sqlite3 '{db}' .dump"
restore = "sqlite3 \"$BACKSTOP_TARGET\""
verify = "test \"$(sqlite3 \"$BACKSTOP_TARGET\" 'PRAGMA integrity_check')\" = ok"
timeout_seconds = 60

[[sources]]
name = "broken"
kind = "command"
backup = "echo 'no such database' >&2; exit 5"

[[sources]]
name = "cache"
kind = "redis"
url = "{url}"
"#,
        data = site.path("data"),
        repo = site.path("repo"),
        key = site.path("master.key"),
        db = db.display(),
        url = redis.url(),
    );
    std::fs::write(site.path("backstop.toml"), &config).unwrap();
    site.ok(&[
        "init",
        "--generate-key",
        site.path("master.key").to_str().unwrap(),
    ]);

    // SQLite: back up, verify by a real test restore, restore with the recorded command.
    let id = backup_id(&site.ok(&["backup", "--source", "app-sqlite", "--json"]));
    let verified = site.ok(&["verify", &id, "--restore"]);
    assert!(
        verified.contains(&format!("backup {id} verified")),
        "{verified}"
    );
    let restored = site.path("restored.db");
    site.ok(&["restore", &id, "--to", restored.to_str().unwrap()]);
    assert_eq!(sqlite(&restored, ".dump"), sqlite(&db, ".dump"));
    let raw = site.path("app.sql");
    site.ok(&["restore", &id, "--out", raw.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&raw).unwrap(), sqlite(&db, ".dump"));

    // A failing command: a non-zero exit, its stderr, no backup.
    let out = site.run(&["backup", "--source", "broken"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("exit code 5") && err.contains("no such database"),
        "{err}"
    );

    // Redis: back up, verify in a throwaway server, dump.rdb into a new server.
    let id = backup_id(&site.ok(&["backup", "--source", "cache", "--json"]));
    let verified = site.ok(&["verify", &id, "--restore"]);
    assert!(
        verified.contains(&format!("backup {id} verified")),
        "{verified}"
    );
    let shown = site.ok(&["show", &id]);
    assert!(
        shown.contains("method        redis") && shown.contains("2000 keys"),
        "{shown}"
    );
    let rdb = site.path("dump.rdb");
    site.ok(&["restore", &id, "--out", rdb.to_str().unwrap()]);
    let copy = Redis::start_with(Some(&rdb), &[]).unwrap();
    assert_eq!(copy.cli(&["DBSIZE"]).unwrap().trim(), "2000");
    assert_eq!(
        copy.cli(&["DEBUG", "DIGEST"]).unwrap(),
        redis.cli(&["DEBUG", "DIGEST"]).unwrap()
    );
    let listed = site.ok(&["list"]);
    // Exactly two completed backups: the failed one left none.
    assert_eq!(
        listed.matches("app-sqlite").count() + listed.matches("cache").count(),
        2,
        "{listed}"
    );

    // A key of another kind is an error naming the source.
    std::fs::write(
        site.path("backstop.toml"),
        config.replace("timeout_seconds = 60", "postgres = \"postgres://x@y/z\""),
    )
    .unwrap();
    let out = site.run(&["list"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("app-sqlite"), "{}", stderr(&out));
}
