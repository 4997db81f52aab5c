//! Point-in-time recovery from the secondary region, end to end: two Garage instances on
//! loopback stand for two regions (primary and `eu`). PostgreSQL 15 archives through `backstop
//! wal-push`, which writes every segment to both as it is archived; a physical base backup is
//! replicated; then production and the primary region are lost. A point-in-time restore served
//! by the replica (base backup and WAL, `wal-fetch` falling back by itself) reaches a moment
//! between two batches with exactly the rows committed before it, and `--from eu` restores the
//! latest point with every row.
//!
//! As root, PostgreSQL (and so `wal-push` / `wal-fetch`) runs as the `postgres` user: the
//! configuration and the master key live in a directory handed to that user.

mod support;

use std::path::Path;

use backstop_repo::{Backend, S3Backend, S3Settings};
use backstop_testkit::{Garage, Postgres, PostgresOptions, give_to_server_user};
use support::{
    Site, TwoBatches, archiving_postgres, later_rows, query, stderr, stdout, two_batches,
};

fn s3_keys(g: &Garage) -> String {
    format!(
        "endpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        g.endpoint(),
        g.region(),
        g.access_key(),
        g.secret_key()
    )
}

fn restore(site: &Site, dir: &Path, extra: &[&str]) -> (String, String) {
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
    let out = site.run(&args);
    assert!(
        out.status.success(),
        "restore {extra:?}: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    (stdout(&out), stderr(&out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_restore_from_the_secondary_with_the_primary_region_lost() {
    let site = Site::new("dr-lead");
    let mut primary = Garage::start().unwrap();
    let replica = Garage::start().unwrap();
    let key = site.path("master.key");
    let config = site.path("backstop.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n\
             [repository]\nlocation = \"s3://{}/prod\"\n{}master_key_file = {:?}\n\n\
             [[repository.replicas]]\nname = \"eu\"\nlocation = \"s3://{}/copy\"\n{}\n",
            site.path("ledger-data"),
            primary.bucket(),
            s3_keys(&primary),
            key,
            replica.bucket(),
            s3_keys(&replica),
        ),
    )
    .unwrap();
    site.ok(&[
        "init",
        "--generate-key",
        key.to_str().unwrap(),
        "--chunk-avg-kib",
        "64",
    ]);
    // PostgreSQL's user runs wal-push and wal-fetch: it reads the config and the key.
    give_to_server_user(site.tmp.path()).unwrap();

    let mut pg = archiving_postgres(&config, "main");
    query(
        &pg,
        "CREATE TABLE trades (id int PRIMARY KEY, note text, at timestamptz NOT NULL DEFAULT clock_timestamp());
         INSERT INTO trades (id, note) SELECT g, md5(g::text) FROM generate_series(1, 100) g;
         CHECKPOINT;",
    );
    let url = pg.conninfo("postgres");
    site.ok(&["backup", "--physical", "--pg", &url, "--name", "main"]);

    // Two batches, each committed and archived, with a known moment between them.
    let TwoBatches {
        seg_a,
        between,
        seg_b,
    } = two_batches(&pg);

    // wal-push wrote each segment to the replica as it was archived, before any replicate.
    let eu = S3Backend::connect(S3Settings {
        endpoint: Some(replica.endpoint()),
        region: Some(replica.region().to_string()),
        access_key: Some(replica.access_key().to_string()),
        secret_key: Some(replica.secret_key().to_string()),
        bucket: replica.bucket().to_string(),
        prefix: "copy".into(),
        path_style: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let on_eu: Vec<String> = eu
        .list("wal/main/00000001/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    for seg in [&seg_a, &seg_b] {
        assert!(
            on_eu.iter().any(|k| k.ends_with(seg.as_str())),
            "{seg} not on the replica: {on_eu:?}"
        );
    }

    // The base backup goes over with `replicate`; the replica then matches, WAL included.
    let out = site.ok(&["replicate"]);
    assert!(out.contains("replicated to eu"), "{out}");
    assert!(out.contains("WAL replicated to eu"), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&site.ok(&["check", "--replica", "eu", "--json"])).unwrap();
    assert_eq!(
        report["differences"].as_array().unwrap().len(),
        0,
        "{report}"
    );

    // Production and the primary region are lost.
    pg.stop().unwrap();
    primary.stop();

    // To the moment between the batches, from the secondary: the base backup and the WAL are
    // read from the replica, each saying so.
    let pitr = site.path("pitr");
    let (out, err) = restore(&site, &pitr, &["--target-time", &between]);
    assert!(out.contains("recovery target: time"), "{out}");
    assert!(err.contains("restoring from replica `eu`"), "{err}");
    let auto = std::fs::read_to_string(pitr.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("wal-fetch --source main"), "{auto}");
    let copy = Postgres::from_data_dir(&pitr, PostgresOptions::new()).unwrap();
    copy.wait_promoted().unwrap();
    assert_eq!(later_rows(&copy), "50|101|150");
    assert_eq!(
        query(&copy, "SELECT count(*) FROM trades WHERE id <= 100"),
        "100"
    );
    let log = copy.log_tail(400);
    assert!(log.contains("served by replica `eu`"), "{log}");
    drop(copy);

    // --from chooses the copy: the latest point, every committed row, and the restore_command
    // it wrote reads the same replica.
    let latest = site.path("latest");
    let (_, err) = restore(&site, &latest, &["--from", "eu"]);
    assert!(err.contains("restoring from replica `eu`"), "{err}");
    let auto = std::fs::read_to_string(latest.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("--from eu"), "{auto}");
    let copy = Postgres::from_data_dir(&latest, PostgresOptions::new()).unwrap();
    copy.wait_promoted().unwrap();
    assert_eq!(later_rows(&copy), "100|101|250");
    drop(copy);

    // The restores are on record.
    let completed: Vec<serde_json::Value> = site
        .ok(&["ledger", "tail", "--json", "--from", "1"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "recovery.completed")
        .collect();
    assert_eq!(completed.len(), 2, "{completed:?}");
}
