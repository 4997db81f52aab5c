//! Logical backups end to end: the `backstop` binary against real PostgreSQL 15 and Garage.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use backstop_sources::pg::QualifiedName;
use backstop_sources::pg::logical::{TableDigest, table_digests};
use backstop_testkit::{Garage, Postgres, free_port};
use support::{Process, run, stderr, stdout};

fn dataset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../bench")
        .join(name)
}

fn load_trading(pg: &Postgres, db: &str, rows: u64) {
    pg.create_db(db).unwrap();
    pg.psql_file(db, &dataset("trading.sql"), &[("rows", &rows.to_string())])
        .unwrap();
}

async fn digests(url: &str) -> BTreeMap<QualifiedName, TableDigest> {
    table_digests(url, &[]).await.expect("table digests")
}

/// A repository in a temp dir with a fresh master key; returns the flags that reach it.
struct Repo {
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Repo {
    fn local() -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        let repo = dir.path().join("repo");
        let args = vec![
            "--repo".to_string(),
            repo.display().to_string(),
            "--master-key-file".to_string(),
            key.display().to_string(),
        ];
        let out = run(
            &dir.path().join("data"),
            &[&[
                "init",
                "--repo",
                repo.to_str().unwrap(),
                "--generate-key",
                key.to_str().unwrap(),
                "--chunk-avg-kib",
                "128",
            ][..]]
            .concat(),
        );
        assert!(out.status.success(), "init: {}", stderr(&out));
        Repo { dir, args }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn repo_dir(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn run(&self, cmd: &[&str]) -> std::process::Output {
        let mut args: Vec<&str> = cmd.to_vec();
        args.extend(self.args.iter().map(String::as_str));
        run(&self.data(), &args)
    }

    fn backup(&self, url: &str, kind: &str) -> serde_json::Value {
        let out = self.run(&[
            "backup", "--pg", url, "--name", "main", "--kind", kind, "--json",
        ]);
        assert!(out.status.success(), "backup: {}", stderr(&out));
        serde_json::from_str(&stdout(&out)).expect("backup --json")
    }
}

fn events_of_type(data: &Path, t: &str) -> Vec<serde_json::Value> {
    let out = run(data, &["ledger", "tail", "--json", "--from", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == t)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restore_incremental_and_table_restore_round_trip() {
    let pg = Postgres::start().unwrap();
    load_trading(&pg, "trading", 300_000);
    let source = pg.conninfo("trading");
    let repo = Repo::local();

    let full = repo.backup(&source, "full");
    let before = digests(&source).await;
    // Row counts in the backup's snapshot match the database.
    for t in full["tables"].as_array().unwrap() {
        let name = QualifiedName::new(t["schema"].as_str().unwrap(), t["table"].as_str().unwrap());
        assert_eq!(before[&name].rows, t["rows"].as_u64().unwrap(), "{name}");
    }

    // `latest` means the newest verified backup: with none verified yet, it refuses and says why.
    let out = repo.run(&["restore", "latest", "--to", &pg.conninfo("unverified")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("has passed verification")
            && stderr(&out).contains("--allow-unverified"),
        "{}",
        stderr(&out)
    );

    // Restore into a new database: every table's ordered digest equals the source's.
    let out = repo.run(&[
        "restore",
        "latest",
        "--allow-unverified",
        "--to",
        &pg.conninfo("restored"),
        "--create-db",
    ]);
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_eq!(digests(&pg.conninfo("restored")).await, before);

    // A trading day's change, then an incremental backup: it uploads little, restores the new state.
    pg.psql_file("trading", &dataset("churn.sql"), &[]).unwrap();
    let incr = repo.backup(&source, "incremental");
    assert_eq!(incr["parent"], full["backup_id"]);
    let (new, stored) = (
        incr["new_bytes"].as_u64().unwrap(),
        full["stored_bytes"].as_u64().unwrap(),
    );
    assert!(
        (new as f64) < 0.10 * stored as f64,
        "incremental uploaded {new} bytes, full stored {stored}"
    );
    let after = digests(&source).await;
    assert_ne!(after, before);
    let out = repo.run(&[
        "restore",
        "latest",
        "--allow-unverified",
        "--to",
        &pg.conninfo("restored2"),
        "--create-db",
    ]);
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_eq!(digests(&pg.conninfo("restored2")).await, after);

    // --tables restores those tables alone.
    let out = repo.run(&[
        "restore",
        "latest",
        "--allow-unverified",
        "--to",
        &pg.conninfo("partial"),
        "--create-db",
        "--tables",
        "signal_lab_trades,live_signals",
    ]);
    assert!(out.status.success(), "restore --tables: {}", stderr(&out));
    let partial = digests(&pg.conninfo("partial")).await;
    let names: Vec<String> = partial.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        names,
        vec!["public.live_signals", "public.signal_lab_trades"]
    );
    for (k, v) in &partial {
        assert_eq!(v, &after[k]);
    }

    // The ledger tells the story, with the operator on the recoveries.
    assert_eq!(events_of_type(&repo.data(), "backup.completed").len(), 2);
    assert_eq!(events_of_type(&repo.data(), "upload.verified").len(), 2);
    let recoveries = events_of_type(&repo.data(), "recovery.completed");
    assert_eq!(recoveries.len(), 3);
    assert!(
        recoveries[0]["actor"]
            .as_str()
            .unwrap()
            .starts_with("operator:")
    );
    assert!(!events_of_type(&repo.data(), "key.accessed").is_empty());
    let list = repo.run(&["list"]);
    assert!(stdout(&list).contains("incremental"), "{}", stdout(&list));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_is_named_and_a_wrong_key_writes_nothing() {
    let pg = Postgres::start().unwrap();
    load_trading(&pg, "trading", 20_000);
    let source = pg.conninfo("trading");
    let repo = Repo::local();
    let b = repo.backup(&source, "full");
    let backup_id = b["backup_id"].as_str().unwrap().to_string();

    // A wrong master key: a clear error, and nothing written anywhere.
    let wrong = repo.dir.path().join("wrong.key");
    let out = run(
        &repo.data(),
        &[
            "init",
            "--repo",
            repo.dir.path().join("other-repo").to_str().unwrap(),
            "--generate-key",
            wrong.to_str().unwrap(),
        ],
    );
    // Another repository's key: well formed, and wrong for this one.
    assert!(out.status.success(), "{}", stderr(&out));
    let listing_before = list_files(&repo.repo_dir());
    let out = run(
        &repo.data(),
        &[
            "backup",
            "--pg",
            &source,
            "--repo",
            repo.repo_dir().to_str().unwrap(),
            "--master-key-file",
            wrong.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).to_lowercase().contains("master key"),
        "{}",
        stderr(&out)
    );
    assert_eq!(list_files(&repo.repo_dir()), listing_before);

    // A missing object: restore --dry-run names it.
    let chunks: Vec<PathBuf> = list_files(&repo.repo_dir())
        .into_iter()
        .filter(|p| p.starts_with("chunks/"))
        .collect();
    let victim = repo.repo_dir().join(&chunks[0]);
    let saved = std::fs::read(&victim).unwrap();
    std::fs::remove_file(&victim).unwrap();
    let out = repo.run(&[
        "restore",
        &backup_id,
        "--to",
        &pg.conninfo("never"),
        "--dry-run",
    ]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains(chunks[0].to_str().unwrap()),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );

    // One flipped bit in a stored chunk: check --read-data and restore fail and name it.
    let mut flipped = saved.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    std::fs::write(&victim, &flipped).unwrap();
    let out = repo.run(&["check", "--read-data"]);
    assert!(!out.status.success());
    let report = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        report.contains(chunks[0].file_name().unwrap().to_str().unwrap()),
        "{report}"
    );
    assert!(report.contains(&backup_id), "{report}");
    let out = repo.run(&[
        "restore",
        &backup_id,
        "--to",
        &pg.conninfo("broken"),
        "--create-db",
    ]);
    assert!(!out.status.success());
    let report = stderr(&out);
    assert!(
        report.contains(chunks[0].file_name().unwrap().to_str().unwrap()),
        "{report}"
    );
    assert_eq!(events_of_type(&repo.data(), "recovery.failed").len(), 1);
    let out = repo.run(&["verify", &backup_id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("FAILED verification"),
        "{}",
        stderr(&out)
    );
    assert_eq!(events_of_type(&repo.data(), "verification.failed").len(), 1);
    std::fs::write(&victim, &saved).unwrap();

    // A truncated manifest: a clear error that names the backup.
    let manifest = repo.repo_dir().join(format!("manifests/{backup_id}"));
    let bytes = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &bytes[..bytes.len() / 2]).unwrap();
    let out = repo.run(&["show", &backup_id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&backup_id), "{}", stderr(&out));
    std::fs::write(&manifest, &bytes).unwrap();
    let out = repo.run(&["check", "--read-data"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    // A superuser as the scratch role is refused, with the role to make instead, and nothing
    // is recorded against the backup.
    let failed_before = events_of_type(&repo.data(), "verification.failed").len();
    let out = repo.run(&[
        "verify",
        &backup_id,
        "--restore",
        "--scratch",
        &pg.conninfo("postgres"),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is a superuser") && stderr(&out).contains("CREATEDB"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        events_of_type(&repo.data(), "verification.failed").len(),
        failed_before
    );
    let out = repo.run(&[
        "verify",
        &backup_id,
        "--restore",
        "--scratch",
        &pg.scratch_role().unwrap(),
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("test restore"), "{}", stdout(&out));
    assert_eq!(events_of_type(&repo.data(), "verification.passed").len(), 1);
}

fn list_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_killed_halfway_leaves_no_completion_and_its_chunks_are_reused() {
    let pg = Postgres::start().unwrap();
    load_trading(&pg, "trading", 600_000);
    let source = pg.conninfo("trading");
    let repo = Repo::local();
    let mut args = vec!["backup", "--pg", &source, "--name", "main", "--jobs", "1"];
    args.extend(repo.args.iter().map(String::as_str));
    let mut proc = Process::spawn(&repo.data(), &args, &[]);
    // Wait until some chunks are in the repository, then kill -9.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let n = list_files(&repo.repo_dir())
            .iter()
            .filter(|p| p.starts_with("chunks/"))
            .count();
        if n >= 5 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no chunks appeared: {}",
            proc.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    proc.kill9();
    assert!(events_of_type(&repo.data(), "backup.completed").is_empty());
    assert_eq!(events_of_type(&repo.data(), "backup.started").len(), 1);
    let out = repo.run(&["check"]);
    assert!(
        out.status.success(),
        "repository inconsistent after kill -9: {}{}",
        stdout(&out),
        stderr(&out)
    );
    // Chunk objects only: an upload cut off by the kill leaves a `.tmp-` file, never a chunk.
    let left: Vec<(PathBuf, std::time::SystemTime)> = list_files(&repo.repo_dir())
        .into_iter()
        .filter(|p| p.starts_with("chunks/") && !p.to_string_lossy().contains(".tmp-"))
        .map(|p| {
            let m = std::fs::metadata(repo.repo_dir().join(&p))
                .unwrap()
                .modified()
                .unwrap();
            (p, m)
        })
        .collect();

    let b = repo.backup(&source, "full");
    let (chunks, new) = (
        b["chunks"].as_u64().unwrap(),
        b["new_chunks"].as_u64().unwrap(),
    );
    // Every chunk the killed backup left is still the same file: nothing was uploaded again.
    for (p, mtime) in &left {
        let now = std::fs::metadata(repo.repo_dir().join(p))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(&now, mtime, "{} was written again", p.display());
    }
    // And they were reused: all of them but the schema archive, whose header carries the time
    // of the dump.
    assert!(
        chunks - new + 1 >= left.len() as u64,
        "only {} of the {} chunks left by the killed backup were reused",
        chunks - new,
        left.len()
    );
    let out = repo.run(&[
        "restore",
        "latest",
        "--allow-unverified",
        "--to",
        &pg.conninfo("back"),
        "--create-db",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(digests(&pg.conninfo("back")).await, digests(&source).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_round_trip_and_an_unreachable_store_records_the_failure() {
    let pg = Postgres::start().unwrap();
    load_trading(&pg, "trading", 20_000);
    let source = pg.conninfo("trading");
    let garage = Garage::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    let write_config = |endpoint: &str| {
        let config = dir.path().join("backstop.toml");
        std::fs::write(
            &config,
            format!(
                "[repository]\nlocation = \"s3://{}/prod\"\nendpoint = \"{endpoint}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nmaster_key_file = \"{}\"\n\n[[sources]]\nname = \"main\"\npostgres = \"{source}\"\n",
                garage.bucket(), garage.region(), garage.access_key(), garage.secret_key(), key.display()
            ),
        )
        .unwrap();
        config.display().to_string()
    };
    let config = write_config(&garage.endpoint());
    let data = dir.path().join("data");
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
    let out = run(&data, &["--config", &config, "backup", "--source", "main"]);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let out = run(
        &data,
        &[
            "--config",
            &config,
            "restore",
            "latest",
            "--allow-unverified",
            "--to",
            &pg.conninfo("from_s3"),
            "--create-db",
        ],
    );
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_eq!(
        digests(&pg.conninfo("from_s3")).await,
        digests(&source).await
    );
    let out = run(&data, &["--config", &config, "check", "--read-data"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // The store goes away mid-life: the backup retries, then fails with the reason on record.
    let config = write_config(&format!("http://127.0.0.1:{}", free_port()));
    let out = run(&data, &["--config", &config, "backup", "--source", "main"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("127.0.0.1"), "{err}");
    // Opening the repository itself failed, so no backup started; nothing is marked good.
    assert_eq!(events_of_type(&data, "backup.completed").len(), 1);
}
