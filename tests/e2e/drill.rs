//! `backstop drill` through the binary and its real ledger: a logical backup of a source, then a
//! drill into a staging database that passes, writes its three reports and records
//! `drill.started` and `drill.completed`; then a drill whose staging is the source's own database,
//! refused before anything is dropped. A physical drill (PostgreSQL 15 archiving through
//! `backstop wal-push`): the base backup laid out, the WAL archived after it replayed by a
//! throwaway server on a loopback port, the rows checked, each phase timed; then a chunk of the
//! base backup damaged, and the next physical drill fails with the restore's reason and raises
//! `drill_failed`. The logical variant of the damaged-chunk drill is services/ops/tests/drill.rs.
//!
//! When the tests run as root, PostgreSQL (and so `wal-push` and the staging server's
//! `wal-fetch`) runs as the `postgres` user: the site is handed to that user.

mod support;

use std::time::{Duration, Instant};

use backstop_testkit::{Postgres, free_port, give_to_server_user};
use support::{Process, Site, archiving_postgres, switch_and_wait};

#[test]
fn a_drill_through_the_cli_passes_reports_and_records_itself() {
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE trades (id bigint PRIMARY KEY, px numeric); \
         INSERT INTO trades SELECT g, g * 0.5 FROM generate_series(1, 4000) g;",
    )
    .unwrap();
    let site = Site::new("dr");
    std::fs::write(
        site.path("backstop.toml"),
        format!(
            "data_dir = {:?}\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n[[sources]]\nname = \"app\"\npostgres = \"{}\"\n",
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
    ]);
    site.ok(&["backup", "--source", "app"]);
    let reports = site.path("reports");
    let out = site.ok(&[
        "drill",
        "--source",
        "app",
        "--staging",
        &pg.conninfo("staging"),
        "--allow-unverified",
        "--report-dir",
        reports.to_str().unwrap(),
    ]);
    assert!(out.contains("restore"), "{out}");
    let files: Vec<String> = std::fs::read_dir(&reports)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for ext in ["json", "md", "html"] {
        assert!(files.iter().any(|f| f.ends_with(ext)), "{files:?}");
    }
    assert_eq!(
        pg.psql("staging", "SELECT count(*) FROM trades").unwrap(),
        "4000"
    );
    let tail = site.ok(&["ledger", "tail", "--json", "--from", "1"]);
    let of = |t: &str| {
        tail.lines()
            .filter(|l| l.contains(&format!("\"type\":\"{t}\"")))
            .count()
    };
    assert_eq!(
        (of("drill.started"), of("drill.completed")),
        (1, 1),
        "{tail}"
    );
    assert!(tail.contains("\"passed\":true"), "{tail}");

    // The source's own database as staging: refused, and the source keeps its rows.
    let out = site.run(&[
        "drill",
        "--source",
        "app",
        "--staging",
        &pg.conninfo("app"),
        "--allow-unverified",
    ]);
    assert!(!out.status.success());
    assert_eq!(
        pg.psql("app", "SELECT count(*) FROM trades").unwrap(),
        "4000"
    );
}

/// The newest report of `dir` (drill-ID.json).
fn newest_report(dir: &std::path::Path) -> serde_json::Value {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    // Drill ids are UUIDv7: the names sort by time.
    files.sort();
    let last = files.last().expect("a JSON report");
    serde_json::from_str(&std::fs::read_to_string(last).unwrap()).unwrap()
}

#[test]
fn a_physical_drill_replays_the_archive_and_a_damaged_base_backup_fails_with_an_alert() {
    let site = Site::new("dr");
    let config = site.path("backstop.toml");
    let pg = archiving_postgres(&config, "app");
    pg.create_db("app").unwrap();
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[api]\nlisten = \"127.0.0.1:{}\"\n[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n[[sources]]\nname = \"app\"\npostgres = \"{}\"\n",
            site.path("data"),
            free_port(),
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
    give_to_server_user(site.tmp.path()).unwrap();
    pg.psql(
        "app",
        "CREATE TABLE trades (id bigint PRIMARY KEY, px numeric); \
         INSERT INTO trades SELECT g, g * 0.5 FROM generate_series(1, 4000) g; CHECKPOINT;",
    )
    .unwrap();
    site.ok(&["backup", "--source", "app", "--physical"]);
    // Rows after the base backup: only WAL replay brings them to staging.
    pg.psql(
        "app",
        "CREATE TABLE fills (id bigint); INSERT INTO fills SELECT generate_series(1, 300); \
         INSERT INTO trades SELECT g, 1 FROM generate_series(4001, 4500) g;",
    )
    .unwrap();
    switch_and_wait(&pg);

    let reports = site.path("reports");
    let drill = |extra: &[&str]| {
        let mut args = vec![
            "drill",
            "--source",
            "app",
            "--method",
            "physical",
            "--allow-unverified",
            "--report-dir",
            reports.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        site.run(&args)
    };
    let out = drill(&[]);
    assert!(
        out.status.success(),
        "{}\n{}",
        support::stdout(&out),
        support::stderr(&out)
    );
    let report = newest_report(&reports);
    assert_eq!(report["method"], "physical", "{report:#}");
    assert_eq!(report["passed"], true, "{report:#}");
    let phases: Vec<&str> = report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        ["fetch", "restore", "replay", "checks"],
        "{report:#}"
    );
    assert!(
        report["phases"][2]["ms"].as_u64().unwrap() > 0,
        "{report:#}"
    );
    let rows = |table: &str| {
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["table"] == table)
            .unwrap_or_else(|| panic!("{table} in {report:#}"))
            .clone()
    };
    assert_eq!(rows("public.trades")["restored"], 4500, "{report:#}");
    assert_eq!(rows("public.fills")["restored"], 300, "{report:#}");
    assert!(
        report["staging"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{report:#}"
    );
    let md = std::fs::read_to_string(
        reports.join(format!("drill-{}.md", report["drill_id"].as_str().unwrap())),
    )
    .unwrap();
    assert!(md.contains("| replay |") && md.contains("PASSED"), "{md}");
    let tail = site.ok(&["ledger", "tail", "--json", "--from", "1"]);
    assert!(
        tail.lines()
            .any(|l| l.contains("\"type\":\"drill.started\"")
                && l.contains("\"method\":\"physical\"")),
        "{tail}"
    );

    // One chunk of the base backup damaged: the drill fails with the restore's reason.
    let mut chunks: Vec<std::path::PathBuf> = Vec::new();
    let mut dirs = vec![site.path("repo").join("chunks")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                chunks.push(p);
            }
        }
    }
    chunks.sort();
    let victim = &chunks[chunks.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(victim, bytes).unwrap();
    let out = drill(&[]);
    assert!(!out.status.success(), "{}", support::stdout(&out));
    let failed = newest_report(&reports);
    assert_eq!(failed["passed"], false);
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("the staging restore failed"),
        "{failed:#}"
    );

    // serve's alert monitor raises drill_failed from the recorded drill.completed.
    let serve = Process::spawn(
        &site.path("data"),
        &["--config", config.to_str().unwrap(), "serve"],
        &[],
    );
    serve.wait_for_log("alert monitor running", Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let alerts = site.ok(&["alerts", "list", "--json"]);
        if alerts.contains("drill_failed") {
            assert!(alerts.contains("staging restore failed"), "{alerts}");
            break;
        }
        assert!(Instant::now() < deadline, "no drill_failed alert: {alerts}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
