//! Offline copies end to end with the `backstop` binary: a PostgreSQL backup in a Garage bucket
//! is copied to a directory (`backstop copy --to DIR`), which records `copy.started` and
//! `copy.completed`; a second copy writes nothing; a directory holding another repository is
//! refused (`copy.failed`). Then Garage is stopped and a new machine that has only the copy
//! and the master key checks it (`check --read-data`) and restores from it with the same row
//! counts; a chunk corrupted in the copy is found by the check. And a physical backup: the
//! copy holds the WAL archived after it, and with the repository deleted a physical restore
//! from the copy replays that WAL (its `restore_command` reads the copy).

mod support;

use backstop_testkit::{Garage, Postgres, PostgresOptions, give_to_server_user};
use support::{Site, archiving_postgres, query, stderr, stdout, switch_and_wait};

fn events_of_type(site: &Site, t: &str) -> Vec<serde_json::Value> {
    site.ok(&["ledger", "tail", "--json", "--from", "1"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == t)
        .collect()
}

#[test]
fn an_offline_copy_restores_on_its_own_after_the_repository_is_gone() {
    let pg = Postgres::start().unwrap();
    pg.create_db("shop").unwrap();
    pg.psql(
        "shop",
        "CREATE TABLE orders (id int primary key, note text); \
         INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 5000) g; \
         CREATE TABLE customers (id int primary key); \
         INSERT INTO customers SELECT generate_series(1, 700);",
    )
    .unwrap();
    let mut garage = Garage::start().unwrap();
    let site = Site::new("ops");
    let key = site.path("master.key");
    std::fs::write(
        site.path("backstop.toml"),
        format!(
            "[repository]\nlocation = \"s3://{}/prod\"\nendpoint = \"{}\"\nregion = \"{}\"\n\
             access_key_id = \"{}\"\nsecret_access_key = \"{}\"\nmaster_key_file = {:?}\n\n\
             [[sources]]\nname = \"main\"\npostgres = \"{}\"\n",
            garage.bucket(),
            garage.endpoint(),
            garage.region(),
            garage.access_key(),
            garage.secret_key(),
            key,
            pg.conninfo("shop"),
        ),
    )
    .unwrap();
    site.ok(&["init", "--generate-key", key.to_str().unwrap()]);
    site.ok(&["backup", "--source", "main"]);

    let offline = site.path("offline");
    let to = offline.to_str().unwrap();
    let out = site.ok(&["copy", "--to", to, "--json"]);
    let first: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(first["backups"].as_array().unwrap().len(), 1, "{first}");
    assert!(first["objects"].as_u64().unwrap() >= 4, "{first}");
    assert_eq!(first["copied"], first["objects"], "{first}");
    let completed = events_of_type(&site, "copy.completed");
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0]["payload"]["to"], to);
    assert_eq!(completed[0]["payload"]["objects"], first["objects"]);
    assert_eq!(events_of_type(&site, "copy.started").len(), 1);

    // Again: everything is there and read back, nothing written.
    let out = site.ok(&["copy", "--to", to, "--json"]);
    let second: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(second["copied"], 0, "{second}");
    assert_eq!(second["objects"], first["objects"], "{second}");

    // A directory that holds another repository is refused, and the failure recorded.
    let other = site.path("other");
    site.ok(&["init", "--repo", other.to_str().unwrap()]);
    let out = site.run(&["copy", "--to", other.to_str().unwrap()]);
    assert!(!out.status.success(), "copied over another repository");
    assert!(
        stderr(&out).contains("holds another repository"),
        "{}",
        stderr(&out)
    );
    let failed = events_of_type(&site, "copy.failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(events_of_type(&site, "copy.completed").len(), 2);

    // The primary is gone. A new machine has the copy and the master key, nothing else.
    garage.stop();
    let fresh = Site::new("dr");
    let fresh_key = fresh.path("master.key");
    std::fs::copy(&key, &fresh_key).unwrap();
    std::fs::write(
        fresh.path("backstop.toml"),
        format!("[repository]\nlocation = {offline:?}\nmaster_key_file = {fresh_key:?}\n"),
    )
    .unwrap();
    let out = fresh.ok(&["check", "--read-data"]);
    assert!(out.contains("repository consistent"), "{out}");
    assert!(out.contains("offline copy"), "{out}");
    let target = pg.conninfo("from_copy");
    fresh.ok(&[
        "restore",
        "latest",
        "--allow-unverified",
        "--to",
        &target,
        "--create-db",
    ]);
    for (table, rows) in [("orders", "5000"), ("customers", "700")] {
        assert_eq!(
            pg.psql("from_copy", &format!("SELECT count(*) FROM {table}"))
                .unwrap(),
            rows,
            "{table}"
        );
    }

    // A chunk damaged on the offline media is found.
    let chunk = walk(&offline.join("chunks"))
        .into_iter()
        .next()
        .expect("a chunk in the copy");
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&chunk, bytes).unwrap();
    let out = fresh.run(&["check", "--read-data"]);
    assert!(!out.status.success(), "a damaged chunk went unnoticed");
    let name = chunk.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        stdout(&out).contains(&name),
        "{} {}",
        stdout(&out),
        stderr(&out)
    );
}

/// Every file under `dir`, sorted.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn a_physical_backup_restores_from_the_copy_with_the_wal_it_holds() {
    let site = Site::new("dr");
    let key = site.path("master.key");
    let config = site.path("backstop.toml");
    let repo = site.path("repo");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[repository]\nlocation = {repo:?}\nmaster_key_file = {key:?}\n",
            site.path("ledger-data"),
        ),
    )
    .unwrap();
    site.ok(&["init", "--generate-key", key.to_str().unwrap()]);
    // PostgreSQL's user runs wal-push and wal-fetch: it reads the config, the key, the repository.
    give_to_server_user(site.tmp.path()).unwrap();
    let mut pg = archiving_postgres(&config, "main");
    query(
        &pg,
        "CREATE TABLE trades (id int PRIMARY KEY, note text); \
         INSERT INTO trades SELECT g, md5(g::text) FROM generate_series(1, 100) g; CHECKPOINT;",
    );
    site.ok(&[
        "backup",
        "--physical",
        "--pg",
        &pg.conninfo("postgres"),
        "--name",
        "main",
    ]);
    query(
        &pg,
        "INSERT INTO trades SELECT g, 'after' FROM generate_series(101, 150) g",
    );
    switch_and_wait(&pg);

    let offline = site.path("offline");
    let out: serde_json::Value =
        serde_json::from_str(&site.ok(&["copy", "--to", offline.to_str().unwrap(), "--json"]))
            .unwrap();
    assert_eq!(out["backups"][0]["method"], "physical", "{out}");
    pg.stop().unwrap();
    std::fs::remove_dir_all(&repo).unwrap();
    give_to_server_user(site.tmp.path()).unwrap();

    let to_dir = site.path("restored");
    let out = site.run(&[
        "restore",
        "latest",
        "--allow-unverified",
        "--physical",
        "--source",
        "main",
        "--repo",
        offline.to_str().unwrap(),
        "--to-dir",
        to_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "physical restore from the copy: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let auto = std::fs::read_to_string(to_dir.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains(offline.to_str().unwrap()), "{auto}");
    let copy = Postgres::from_data_dir(&to_dir, PostgresOptions::new()).unwrap();
    copy.wait_promoted().unwrap();
    assert_eq!(query(&copy, "SELECT count(*) FROM trades"), "150");
}
