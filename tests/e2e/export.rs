//! `backstop export` end to end through the binary: a configured source exported, listed, one
//! table written with `export get` and read by the system's `gzip`; a missing table and a
//! wrong master key fail with clear errors and leave no export. Real PostgreSQL.

mod support;

use std::path::PathBuf;
use std::process::{Command, Output};

use backstop_repo::MasterKey;
use backstop_testkit::{Postgres, server_tempdir};
use support::{bin, stderr, stdout};

struct Site {
    tmp: tempfile::TempDir,
}

impl Site {
    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn run(&self, config: &str, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--config")
            .arg(self.path(config))
            .args(args)
            .current_dir(self.tmp.path())
            .env_remove("BACKSTOP_MASTER_KEY")
            .env("BACKSTOP_OPERATOR", "dba")
            .output()
            .expect("run backstop")
    }

    fn ok(&self, config: &str, args: &[&str]) -> String {
        let out = self.run(config, args);
        assert!(
            out.status.success(),
            "backstop {args:?} failed:\n{}\n{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }
}

#[test]
fn export_list_get_and_bad_input_through_the_cli() {
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE orders (id bigint PRIMARY KEY, px numeric(20,8), at timestamptz, raw bytea); \
         INSERT INTO orders SELECT g, g / 7.0, '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 s', \
                decode(md5(g::text), 'hex') FROM generate_series(1, 5000) g; \
         CREATE TABLE other (id int PRIMARY KEY); INSERT INTO other VALUES (1);",
    )
    .unwrap();
    let site = Site {
        tmp: server_tempdir().unwrap(),
    };
    let config = |key: &str| {
        format!(
            "data_dir = {:?}\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n[[sources]]\nname = \"app\"\npostgres = \"{}\"\n",
            site.path("data"),
            site.path("repo"),
            site.path(key),
            pg.conninfo("app"),
        )
    };
    std::fs::write(site.path("backstop.toml"), config("master.key")).unwrap();
    std::fs::write(site.path("wrong.toml"), config("wrong.key")).unwrap();
    std::fs::write(
        site.path("wrong.key"),
        MasterKey::from_bytes([9; 64]).to_base64().as_str(),
    )
    .unwrap();
    site.ok(
        "backstop.toml",
        &[
            "init",
            "--generate-key",
            site.path("master.key").to_str().unwrap(),
        ],
    );

    let out = site.ok(
        "backstop.toml",
        &["export", "--source", "app", "--tables", "orders", "--json"],
    );
    let index: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = index["export_id"].as_str().unwrap().to_string();
    assert_eq!(index["tables"].as_array().unwrap().len(), 1);
    assert_eq!(index["tables"][0]["rows"], 5000);
    assert!(index["key_id"].as_str().unwrap().starts_with("export-"));

    let listed = site.ok("backstop.toml", &["export", "list"]);
    assert!(
        listed.contains(&id) && listed.contains("public.orders"),
        "{listed}"
    );

    let file = site.path("orders.jsonl.gz");
    site.ok(
        "backstop.toml",
        &[
            "export",
            "get",
            &id,
            "--table",
            "orders",
            "--out",
            file.to_str().unwrap(),
        ],
    );
    let plain = Command::new("gzip").arg("-dc").arg(&file).output().unwrap();
    assert!(plain.status.success());
    let text = String::from_utf8(plain.stdout).unwrap();
    assert_eq!(text.lines().count(), 5000);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    // 1 / 7.0 at numeric(20,8): the exact digits, not a float's.
    assert_eq!(first["px"].to_string(), "0.14285714");
    assert_eq!(first["at"], "2024-01-01T00:00:01+00:00");
    assert_eq!(first["raw"], "\\xc4ca4238a0b923820dcc509a6f75849b");

    // The RUNBOOK's load back ("Get a table back from an export"), as written there.
    let load = format!(
        "zcat {file} | {psql} \"$DB\" -v ON_ERROR_STOP=1 \\
  -c 'CREATE TABLE restore_orders (LIKE public.orders INCLUDING ALL)' \\
  -c 'CREATE TEMP TABLE l (j json)' \\
  -c \"COPY l FROM STDIN WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')\" \\
  -c 'INSERT INTO restore_orders SELECT r.* FROM l, json_populate_record(NULL::restore_orders, l.j) r'",
        file = file.display(),
        psql = pg.bin("psql").display(),
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&load)
        .env("DB", pg.conninfo("app"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let same = pg
        .psql(
            "app",
            "SELECT (SELECT md5(string_agg(x::text, E'\\n' ORDER BY id)) FROM orders x) \
                  = (SELECT md5(string_agg(x::text, E'\\n' ORDER BY id)) FROM restore_orders x), \
                    (SELECT count(*) FROM restore_orders)",
        )
        .unwrap();
    assert_eq!(same, "t|5000");

    // A missing table: the error names it; no second export appears.
    let out = site.run("backstop.toml", &["export", "--tables", "nope"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
    let listed = site.ok("backstop.toml", &["export", "list", "--json"]);
    let all: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(all.len(), 1);

    // A wrong master key: refused before anything is read or written.
    let out = site.run(
        "wrong.toml",
        &["export", "get", &id, "--table", "orders", "--out", "x.gz"],
    );
    assert!(!out.status.success());
    assert!(!site.path("x.gz").exists());
    assert!(
        stderr(&out).to_lowercase().contains("key"),
        "{}",
        stderr(&out)
    );
    let out = site.run("wrong.toml", &["export", "--tables", "other"]);
    assert!(!out.status.success());
    let listed = site.ok("backstop.toml", &["export", "list", "--json"]);
    let all: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(all.len(), 1);

    // The ledger holds each export's story, by the operator: requested then completed, or
    // failed with the reason.
    let tail = site.ok(
        "backstop.toml",
        &["ledger", "tail", "--json", "--from", "1"],
    );
    let events: Vec<serde_json::Value> = tail
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["type"].as_str().unwrap().starts_with("export."))
        .collect();
    let of =
        |t: &str| -> Vec<&serde_json::Value> { events.iter().filter(|e| e["type"] == t).collect() };
    assert_eq!(of("export.requested").len(), 2, "{events:#?}");
    let done = of("export.completed");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["payload"]["export_id"], id.as_str());
    assert_eq!(done[0]["payload"]["rows"], 5000);
    assert_eq!(done[0]["actor"], "operator:dba");
    let failed = of("export.failed");
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0]["payload"]["reason"]
            .as_str()
            .unwrap()
            .contains("nope"),
        "{failed:?}"
    );

    // The exports' retention keeps a fresh export (90 days by default); the deletion itself
    // runs on an injected clock in services/workers/tests/export.rs.
    let out = site.ok(
        "backstop.toml",
        &["export", "expire", "--dry-run", "--json"],
    );
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["kept"], 1, "{report}");
    assert_eq!(report["deleted"].as_array().unwrap().len(), 0, "{report}");
}
