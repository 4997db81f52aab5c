//! Trust you can see: a backup requested through the API is taken by the backup worker, verified
//! by a real test restore, and shown verified; a backup damaged after upload fails verification,
//! raises the alert, and is retried (healing the damage). Real PostgreSQL; the `backstop` binary.

#[path = "tests/dashboard_support.rs"]
mod dashboard_support;
mod support;

use std::path::Path;

use backstop_testkit::{Postgres, free_port};
use dashboard_support::{AUDITOR, LEAD, OPERATOR, http, wait_http};
use support::{Process, run, stderr};

fn dataset(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../bench")
        .join(name)
}

fn write_config(dir: &Path, pg: &Postgres, port: u16) -> String {
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("alice operator {OPERATOR}\nlee recovery-lead {LEAD}\naudrey auditor {AUDITOR}\n"),
    )
    .unwrap();
    let config = dir.join("backstop.toml");
    std::fs::write(
        &config,
        format!(
            r#"[api]
listen = "127.0.0.1:{port}"
tokens_file = "{tokens}"

[projections]
database_url = "{projections}"

[repository]
location = "{repo}"
master_key_file = "{key}"

[[sources]]
name = "main"
postgres = "{source}"

[verify]
scratch = "{scratch}"
max_retries = 1

[restore]
allowed_targets = ["{restored}"]
"#,
            tokens = tokens.display(),
            projections = pg.conninfo("backstop"),
            repo = dir.join("repo").display(),
            key = dir.join("master.key").display(),
            source = pg.conninfo("trading"),
            scratch = pg.scratch_role().unwrap(),
            restored = pg.conninfo("restored"),
        ),
    )
    .unwrap();
    config.display().to_string()
}

fn request_backup(port: u16) -> String {
    let (status, body) = http(
        port,
        "POST",
        "/api/backups",
        Some(OPERATOR),
        Some(r#"{"source": "main", "kind": "full"}"#),
    )
    .unwrap();
    assert_eq!(status, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["backup_id"].as_str().unwrap().to_string()
}

fn wait_backup(
    port: u16,
    id: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let body = wait_http(
        port,
        &format!("/api/backups/{id}"),
        Some(OPERATOR),
        what,
        |s, b| {
            s == 200
                && serde_json::from_str::<serde_json::Value>(b)
                    .map(|v| ok(&v))
                    .unwrap_or(false)
        },
    );
    serde_json::from_str(&body).unwrap()
}

#[test]
fn backups_are_verified_automatically_and_damage_is_caught_alerted_and_retried() {
    let pg = Postgres::start().unwrap();
    pg.create_db("trading").unwrap();
    pg.psql_file("trading", &dataset("trading.sql"), &[("rows", "20000")])
        .unwrap();
    pg.create_db("backstop").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), &pg, port);
    let data = dir.path().join("data");
    let key = dir.path().join("master.key");
    let out = run(
        &data,
        &[
            "--config",
            &config,
            "init",
            "--generate-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "init: {}", stderr(&out));

    // 1. Requested through the API, backed up by the worker, verified by a test restore.
    let serve = Process::spawn(&data, &["--config", &config, "serve"], &[]);
    wait_http(port, "/healthz", None, "serve up", |s, _| s == 200);
    let first = request_backup(port);
    let v = wait_backup(port, &first, "first backup verified", |v| {
        v["backup"]["verification_state"] == "passed"
    });
    assert_eq!(v["backup"]["state"], "completed");
    let check = &v["verifications"][0];
    assert!(check["restore_ms"].as_i64().unwrap() > 0, "{v}");
    let est = wait_http(
        port,
        "/api/recovery-estimate",
        Some(OPERATOR),
        "estimate",
        |s, _| s == 200,
    );
    assert!(est.contains("main"), "{est}");

    // A restore requested through the API: refused to an operator, run for a recovery lead by
    // the restore worker, recorded with the lead's identity.
    let body = format!(
        r#"{{"backup": "{first}", "target": "{}", "tables": ["live_signals"]}}"#,
        pg.conninfo("restored")
    );
    let (status, _) = http(port, "POST", "/api/restores", Some(OPERATOR), Some(&body)).unwrap();
    assert_eq!(status, 403);
    let (status, answer) = http(port, "POST", "/api/restores", Some(LEAD), Some(&body)).unwrap();
    assert_eq!(status, 202, "{answer}");
    let done = wait_http(
        port,
        "/api/audit?type=recovery.completed",
        Some(AUDITOR),
        "API restore completed",
        |s, b| s == 200 && b.contains(&first),
    );
    assert!(done.contains("lee"), "the recovery names the lead: {done}");
    assert_eq!(
        pg.psql("restored", "SELECT count(*) FROM live_signals")
            .unwrap(),
        pg.psql("trading", "SELECT count(*) FROM live_signals")
            .unwrap()
    );
    assert_eq!(
        pg.psql(
            "restored",
            "SELECT to_regclass('public.realtime_prices') IS NULL"
        )
        .unwrap(),
        "t"
    );
    drop(serve);

    // 2. A second backup taken with the verify worker off, then damaged after upload.
    let serve = Process::spawn(
        &data,
        &["--config", &config, "serve", "--only", "backup"],
        &[],
    );
    wait_http(port, "/healthz", None, "serve up", |s, _| s == 200);
    pg.psql("trading", "INSERT INTO live_signals (received_at, symbol, direction, strategy, confidence, payload) SELECT now(), 'ES', 'long', 's', 0.5, '{}'::jsonb FROM generate_series(1, 500)").unwrap();
    let second = request_backup(port);
    wait_backup(port, &second, "second backup completed", |v| {
        v["backup"]["state"] == "completed"
    });
    drop(serve);
    let chunk = chunk_only_in(&data, &config, &second, &first, &dir.path().join("repo"));
    let mut bytes = std::fs::read(&chunk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&chunk, &bytes).unwrap();

    // 3. All workers again: the verification fails, the alert is raised, the backup retried;
    //    the retry uploads the quarantined chunk again and verifies.
    let mut serve = Process::spawn(&data, &["--config", &config, "serve"], &[]);
    wait_http(port, "/healthz", None, "serve up", |s, _| s == 200);
    let v = wait_backup(port, &second, "second backup's verification fails", |v| {
        v["backup"]["verification_state"] == "failed"
    });
    let reason = v["backup"]["verification_reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("quarantine"), "{reason}");
    let alerts = wait_http(
        port,
        "/api/alerts",
        Some(OPERATOR),
        "alert raised",
        |s, b| s == 200 && b.contains("verification_failed"),
    );
    assert!(alerts.contains("critical"), "{alerts}");
    let list = wait_http(
        port,
        "/api/backups?source=main",
        Some(OPERATOR),
        "retry verified",
        |s, b| {
            s == 200 && {
                let v: serde_json::Value = serde_json::from_str(b).unwrap_or_default();
                v["backups"].as_array().is_some_and(|rows| {
                    rows.iter()
                        .any(|r| r["attempt"] == 2 && r["verification_state"] == "passed")
                })
            }
        },
    );
    assert!(list.contains(&second), "{list}");
    assert!(serve.terminate().success());
    // The damaged chunk was healed: the repository reads back clean.
    let out = run(&data, &["--config", &config, "check", "--read-data"]);
    assert!(
        out.status.success(),
        "{}{}",
        support::stdout(&out),
        stderr(&out)
    );
}

/// The largest chunk that backup `only` references and backup `not` does not.
fn chunk_only_in(
    data: &Path,
    config: &str,
    only: &str,
    not: &str,
    repo: &Path,
) -> std::path::PathBuf {
    let chunks = |id: &str| -> Vec<(String, u64)> {
        let out = run(data, &["--config", config, "show", id, "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let m: serde_json::Value = serde_json::from_str(&support::stdout(&out)).unwrap();
        m["streams"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["chunks"].as_array().unwrap().clone())
            .map(|c| {
                (
                    c["id"].as_str().unwrap().to_string(),
                    c["sealed_len"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let old: std::collections::HashSet<String> = chunks(not).into_iter().map(|c| c.0).collect();
    let (id, _) = chunks(only)
        .into_iter()
        .filter(|c| !old.contains(&c.0))
        .max_by_key(|c| c.1)
        .expect("the second backup has a chunk of its own");
    repo.join("chunks").join(&id[..2]).join(&id)
}
