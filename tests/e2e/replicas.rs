//! Replicas end to end with the `backstop` binary: two Garage instances on loopback stand for
//! two regions (primary and `eu`). A backup is replicated and `check --replica` finds both
//! sides' SHA3-256 equal; a chunk corrupted on the replica only is found and healed from the
//! primary; with the primary's Garage stopped, a logical restore is served by the replica, says
//! so, and the key access it records names the replica's location. And `serve` runs the
//! replicate worker: a backup taken beside it reaches a directory replica by itself.

mod support;

use std::path::Path;

use backstop_repo::{Backend, S3Backend, S3Settings};
use backstop_testkit::{Garage, Postgres};
use support::{Process, run, stderr, stdout};

fn events_of_type(cfg: &str, data: &Path, t: &str) -> Vec<serde_json::Value> {
    let out = run(
        data,
        &["--config", cfg, "ledger", "tail", "--json", "--from", "1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == t)
        .collect()
}

fn s3_keys(g: &Garage) -> String {
    format!(
        "endpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        g.endpoint(),
        g.region(),
        g.access_key(),
        g.secret_key()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_replicates_is_compared_healed_and_restored_from_the_replica() {
    let pg = Postgres::start().unwrap();
    pg.create_db("shop").unwrap();
    pg.psql(
        "shop",
        "CREATE TABLE orders (id int primary key, note text); \
         INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 20000) g;",
    )
    .unwrap();
    let mut primary = Garage::start().unwrap();
    let replica = Garage::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    let cfg = dir.path().join("backstop.toml");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nlocation = \"s3://{}/prod\"\n{}master_key_file = \"{}\"\n\n\
             [[repository.replicas]]\nname = \"eu\"\nlocation = \"s3://{}/copy\"\n{}\n\
             [[sources]]\nname = \"main\"\npostgres = \"{}\"\n",
            primary.bucket(),
            s3_keys(&primary),
            key.display(),
            replica.bucket(),
            s3_keys(&replica),
            pg.conninfo("shop"),
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let data = dir.path().join("data");
    let backstop = |args: &[&str]| {
        let mut all = vec!["--config", cfg.as_str()];
        all.extend_from_slice(args);
        run(&data, &all)
    };

    let out = backstop(&["init", "--generate-key", key.to_str().unwrap()]);
    assert!(out.status.success(), "init: {}", stderr(&out));
    let out = backstop(&["backup", "--source", "main"]);
    assert!(out.status.success(), "backup: {}", stderr(&out));

    // Before replication the replica lacks everything.
    let out = backstop(&["check", "--replica", "eu"]);
    assert!(!out.status.success(), "an empty replica compared equal");

    let out = backstop(&["replicate"]);
    assert!(out.status.success(), "replicate: {}", stderr(&out));
    assert!(
        stdout(&out).contains("replicated to eu"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("replica eu lag: 0 s"),
        "{}",
        stdout(&out)
    );
    let completed = events_of_type(&cfg, &data, "replication.completed");
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0]["payload"]["to_region"], "eu");
    assert_eq!(events_of_type(&cfg, &data, "replication.started").len(), 1);
    // Again: nothing left to copy, and nothing recorded twice.
    let out = backstop(&["replicate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("0 copied"), "{}", stdout(&out));
    assert_eq!(
        events_of_type(&cfg, &data, "replication.completed").len(),
        1
    );
    let lag = events_of_type(&cfg, &data, "replication.lag_measured");
    assert!(!lag.is_empty());
    assert_eq!(lag[0]["payload"]["region"], "eu");

    // Both sides' checksums match, object for object.
    let out = backstop(&["check", "--replica", "eu", "--json"]);
    assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(report["objects"].as_u64().unwrap() >= 4, "{report}");
    assert_eq!(report["differences"].as_array().unwrap().len(), 0);

    // A chunk corrupted on the replica only.
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
    let chunk = eu.list("chunks/").await.unwrap()[0].key.clone();
    let mut bytes = eu.get(&chunk).await.unwrap().to_vec();
    bytes[40] ^= 0xff;
    eu.put(&chunk, bytes.into()).await.unwrap();
    let out = backstop(&["check", "--replica", "eu"]);
    assert!(!out.status.success(), "corruption not found");
    assert!(
        stdout(&out).contains(&format!("{chunk}: differs on replica eu")),
        "{}",
        stdout(&out)
    );
    let out = backstop(&["check", "--replica", "eu", "--heal"]);
    assert!(
        out.status.success(),
        "heal: {} {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("healed from the primary"),
        "{}",
        stdout(&out)
    );
    let out = backstop(&["check", "--replica", "eu"]);
    assert!(out.status.success(), "after heal: {}", stdout(&out));

    // The primary region is lost: the restore is served by the replica, and says so.
    primary.stop();
    let target = pg.conninfo("from_eu");
    let out = backstop(&[
        "restore",
        "latest",
        "--allow-unverified",
        "--to",
        &target,
        "--create-db",
    ]);
    assert!(
        out.status.success(),
        "restore from replica: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("restoring from replica `eu`"),
        "{}",
        stderr(&out)
    );
    let rows = pg.psql("from_eu", "SELECT count(*) FROM orders").unwrap();
    assert!(rows.contains("20000"), "{rows}");
    let accessed = events_of_type(&cfg, &data, "key.accessed");
    assert!(
        accessed.iter().any(|e| e
            .to_string()
            .contains(&format!("s3://{}/copy", replica.bucket()))),
        "no key access names the replica: {accessed:?}"
    );

    // --from chooses a copy explicitly.
    let out = backstop(&[
        "restore",
        "latest",
        "--allow-unverified",
        "--from",
        "eu",
        "--to",
        &pg.conninfo("from_eu2"),
        "--create-db",
    ]);
    assert!(out.status.success(), "restore --from: {}", stderr(&out));
}

#[test]
fn serve_replicates_each_completed_backup_to_a_directory_replica() {
    let pg = Postgres::start().unwrap();
    pg.create_db("shop").unwrap();
    pg.psql(
        "shop",
        "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 1000);",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    let bucket = dir.path().join("bucket");
    let copy = dir.path().join("copy");
    let cfg = dir.path().join("backstop.toml");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nlocation = {:?}\nmaster_key_file = {:?}\n\n\
             [[repository.replicas]]\nname = \"dr\"\nlocation = {:?}\n\
             region = \"eu-central-1\"\nstorage_class = \"standard_ia\"\n\n\
             [ledger]\nmirror_seconds = 0\n\n\
             [[sources]]\nname = \"main\"\npostgres = \"{}\"\n",
            bucket.display().to_string(),
            key.display().to_string(),
            copy.display().to_string(),
            pg.conninfo("shop"),
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let data = dir.path().join("data");
    let out = run(
        &data,
        &[
            "--config",
            &cfg,
            "init",
            "--generate-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "init: {}", stderr(&out));
    let listen = format!("127.0.0.1:{}", backstop_testkit::free_port());
    let mut serve = Process::spawn(
        &data,
        &["--config", &cfg, "serve", "--listen", &listen],
        &[],
    );
    serve.wait_for_log(
        "control socket listening",
        std::time::Duration::from_secs(60),
    );
    let out = run(&data, &["--config", &cfg, "backup", "--source", "main"]);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    // Waiting for the worker (not timing it): at most 60 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let completed = loop {
        let done = events_of_type(&cfg, &data, "replication.completed");
        if !done.is_empty() || std::time::Instant::now() > deadline {
            break done;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    assert_eq!(
        completed.len(),
        1,
        "no replication by the worker: {}",
        serve.log()
    );
    assert_eq!(
        completed[0]["actor"], "worker:replicate",
        "{}",
        completed[0]
    );
    assert!(!events_of_type(&cfg, &data, "replication.lag_measured").is_empty());
    assert!(serve.terminate().success(), "{}", serve.log());
    let out = run(&data, &["--config", &cfg, "check", "--replica", "dr"]);
    assert!(out.status.success(), "{} {}", stdout(&out), stderr(&out));

    // The cost per region (R14.5): the primary (a directory: `local`) and the replica in its
    // configured region, priced at its own storage class (Standard-IA, $0.0125/GiB-month).
    let out = run(&data, &["--config", &cfg, "cost", "--json"]);
    assert!(out.status.success(), "cost: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let series = report["estimate"]["series"].as_array().unwrap();
    let dr = series
        .iter()
        .find(|s| s["copy"] == "dr")
        .unwrap_or_else(|| panic!("no replica series: {report}"));
    assert_eq!(dr["region"], "eu-central-1", "{dr}");
    assert_eq!(dr["storage_class"], "STANDARD_IA", "{dr}");
    assert_eq!(dr["usd_per_gib_month"], 0.0125, "{dr}");
    assert!(
        series
            .iter()
            .any(|s| s["copy"] == "primary" && s["region"] == "local")
    );
    let regions = report["regions"].as_array().unwrap();
    let eu = regions
        .iter()
        .find(|r| r["region"] == "eu-central-1")
        .unwrap();
    assert_eq!(eu["copies"], serde_json::json!(["dr"]), "{report}");
    assert_eq!(eu["monthly_usd"], dr["monthly_usd"]);
    assert!(
        regions
            .iter()
            .any(|r| r["region"] == "local" && r["copies"] == serde_json::json!(["primary"]))
    );
    let out = run(&data, &["--config", &cfg, "cost"]);
    let text = stdout(&out);
    assert!(
        text.contains("[dr] ") && text.contains("per region:"),
        "{text}"
    );
}
