//! `backstop drill` through the binary and its real ledger: a logical backup of a source, then a
//! drill into a staging database that passes, writes its three reports and records
//! `drill.started` and `drill.completed`; then a drill whose staging is the source's own database,
//! refused before anything is dropped.

mod support;

use backstop_testkit::Postgres;
use support::Site;

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
