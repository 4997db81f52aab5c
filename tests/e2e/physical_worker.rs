//! A physical backup requested through the API (`"method": "physical"`) is taken by the backup
//! worker, test-restored automatically by the verify worker (a temporary cluster recovered to
//! consistency with the archived WAL, then `pg_amcheck`), and shown verified by the API. Real
//! PostgreSQL 15 archiving through `backstop wal-push`; the `backstop` binary as `serve`.
//!
//! When the tests run as root, PostgreSQL (and so `wal-push` and the test restore's
//! `wal-fetch`) runs as the `postgres` user: the configuration, the master key and the
//! repository live in a directory handed to that user.

#[path = "tests/dashboard_support.rs"]
mod dashboard_support;
mod support;

use std::time::Duration;

use backstop_testkit::{Postgres, PostgresOptions, free_port, give_to_server_user, server_tempdir};
use dashboard_support::{AUDITOR, LEAD, OPERATOR, http, wait_http};
use support::{Process, run, stderr};

#[test]
fn a_physical_backup_requested_through_the_api_is_taken_and_verified_by_the_workers() {
    let site = server_tempdir().unwrap();
    let path = |n: &str| site.path().join(n);
    let port = free_port();
    std::fs::write(
        path("tokens"),
        format!("alice operator {OPERATOR}\nlee recovery-lead {LEAD}\naudrey auditor {AUDITOR}\n"),
    )
    .unwrap();
    let config = path("backstop.toml");
    // The source's URL is known once it runs; the archive command needs only the config path.
    let archive_command = support::archive_command(&config, "main");
    let write_config = |source: &str, projections: &str| {
        std::fs::write(
            &config,
            format!(
                r#"data_dir = {data:?}
[api]
listen = "127.0.0.1:{port}"
tokens_file = {tokens:?}

[projections]
database_url = "{projections}"

[repository]
location = {repo:?}
master_key_file = {key:?}

[[sources]]
name = "main"
postgres = "{source}"

[verify]
scratch = "{projections}"
max_retries = 0
"#,
                data = path("data"),
                tokens = path("tokens"),
                repo = path("repo"),
                key = path("master.key"),
            ),
        )
        .unwrap();
    };
    write_config(
        "postgres://127.0.0.1:1/postgres",
        "postgres://127.0.0.1:1/postgres",
    );
    let data = path("data");
    let cfg = config.to_str().unwrap();
    let out = run(
        &data,
        &[
            "--config",
            cfg,
            "init",
            "--generate-key",
            path("master.key").to_str().unwrap(),
            "--chunk-avg-kib",
            "64",
        ],
    );
    assert!(out.status.success(), "init: {}", stderr(&out));
    give_to_server_user(site.path()).unwrap();

    let pg = Postgres::start_with(
        PostgresOptions::new()
            .conf("archive_mode = on")
            .conf(format!("archive_command = '{archive_command}'")),
    )
    .unwrap();
    pg.psql(
        "postgres",
        "CREATE TABLE trades (id int PRIMARY KEY, note text);
         INSERT INTO trades SELECT g, md5(g::text) FROM generate_series(1, 500) g;
         CHECKPOINT;",
    )
    .unwrap();
    pg.create_db("backstop").unwrap();
    write_config(&pg.conninfo("postgres"), &pg.conninfo("backstop"));
    give_to_server_user(site.path()).unwrap();

    let serve = Process::spawn(&data, &["--config", cfg, "serve"], &[]);
    wait_http(port, "/healthz", None, "serve up", |s, _| s == 200);
    let (status, body) = http(
        port,
        "POST",
        "/api/backups",
        Some(OPERATOR),
        Some(r#"{"source": "main", "kind": "full", "method": "physical"}"#),
    )
    .unwrap();
    assert_eq!(status, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["method"], "physical");
    let id = v["backup_id"].as_str().unwrap().to_string();

    // A method the workers do not know is refused by the API, not dead-lettered later.
    let (status, body) = http(
        port,
        "POST",
        "/api/backups",
        Some(OPERATOR),
        Some(r#"{"source": "main", "method": "snapshot"}"#),
    )
    .unwrap();
    assert_eq!(status, 400, "{body}");

    let body = wait_http(
        port,
        &format!("/api/backups/{id}"),
        Some(OPERATOR),
        "the physical backup verified",
        |s, b| {
            s == 200
                && serde_json::from_str::<serde_json::Value>(b)
                    .map(|v| {
                        let b = &v["backup"];
                        b["verification_state"] == "passed"
                            || b["verification_state"] == "failed"
                            || b["state"] == "failed"
                    })
                    .unwrap_or(false)
        },
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let b = &v["backup"];
    assert_eq!(b["state"], "completed", "{v:#}\n{}", serve.log());
    assert_eq!(b["physical"], true, "{v:#}");
    assert_eq!(b["verification_state"], "passed", "{v:#}\n{}", serve.log());
    assert_eq!(v["verifications"][0]["tier"], "restore", "{v:#}");
    serve.wait_for_log("backup verified", Duration::from_secs(5));
    assert!(
        !serve.log().contains("dead-lettered"),
        "no event was dead-lettered:\n{}",
        serve.log()
    );
}
