//! Retention and garbage collection end to end: the `backstop` binary against real PostgreSQL
//! 15 and a local repository. `forget --dry-run`, `forget` and `prune` with a policy that keeps
//! one backup; the kept backup restores, `check --read-data` is clean, and the ledger has every
//! decision and deletion with its policy. Then `kill -9` of `prune` at random points, repeated:
//! never a referenced object gone.
//!
//! Grace: `prune --grace 0s`, so a second prune sweeps what the first marked; no test waits
//! for a real period.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use backstop_sources::pg::QualifiedName;
use backstop_sources::pg::logical::{TableDigest, table_digests};
use backstop_testkit::Postgres;
use support::{run, stderr, stdout};

fn dataset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../bench")
        .join(name)
}

async fn digests(url: &str) -> BTreeMap<QualifiedName, TableDigest> {
    table_digests(url, &[]).await.expect("table digests")
}

/// Keep the newest backup of every source, and nothing by period or tag.
const KEEP_ONE: &str = r#"
[[retention]]
keep_last = 1
keep_daily = 0
keep_weekly = 0
keep_monthly = 0
keep_yearly = 0
keep_tags = {}
"#;

struct Setup {
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Setup {
    fn new() -> Setup {
        Setup::with_policy(KEEP_ONE)
    }

    fn with_policy(policy: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        let repo = dir.path().join("repo");
        let config = dir.path().join("backstop.toml");
        std::fs::write(&config, policy).unwrap();
        let args = vec![
            "--config".to_string(),
            config.display().to_string(),
            "--repo".to_string(),
            repo.display().to_string(),
            "--master-key-file".to_string(),
            key.display().to_string(),
        ];
        let s = Setup { dir, args };
        let out = run(
            &s.data(),
            &[
                "--config",
                config.to_str().unwrap(),
                "init",
                "--repo",
                repo.to_str().unwrap(),
                "--generate-key",
                key.to_str().unwrap(),
                "--chunk-avg-kib",
                "64",
            ],
        );
        assert!(out.status.success(), "init: {}", stderr(&out));
        s
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, cmd: &[&str]) -> Vec<String> {
        // Global flags first, then the command and its own, then the repository's.
        let mut args: Vec<String> = self.args[..2].to_vec();
        args.extend(cmd.iter().map(|s| s.to_string()));
        args.extend(self.args[2..].iter().cloned());
        args
    }

    fn run(&self, cmd: &[&str]) -> std::process::Output {
        let args = self.command(cmd);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&self.data(), &refs)
    }

    fn ok_json(&self, cmd: &[&str]) -> serde_json::Value {
        let out = self.run(cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}\n{}",
            stdout(&out),
            stderr(&out)
        );
        serde_json::from_str(&stdout(&out))
            .unwrap_or_else(|e| panic!("{cmd:?} --json: {e}: {}", stdout(&out)))
    }

    fn backup(&self, url: &str) -> String {
        let b = self.ok_json(&["backup", "--pg", url, "--name", "main", "--json"]);
        b["backup_id"].as_str().expect("backup_id").to_string()
    }

    fn backups(&self) -> BTreeSet<String> {
        let v = self.ok_json(&["list", "--json"]);
        v.as_array()
            .expect("list --json is an array")
            .iter()
            .map(|b| b["backup_id"].as_str().unwrap().to_string())
            .collect()
    }

    fn check_read_data(&self) -> serde_json::Value {
        let out = self.run(&["check", "--read-data", "--json"]);
        let report: serde_json::Value = serde_json::from_str(&stdout(&out))
            .unwrap_or_else(|e| panic!("check --json: {e}: {}", stdout(&out)));
        assert!(
            out.status.success(),
            "check --read-data found problems: {report}"
        );
        assert_eq!(report["problems"], serde_json::json!([]), "{report}");
        report
    }
}

fn events_of_type(s: &Setup, t: &str) -> Vec<serde_json::Value> {
    // The ledger takes the configuration, not the repository's flags.
    let mut args: Vec<&str> = s.args[..2].iter().map(String::as_str).collect();
    args.extend(["ledger", "tail", "--json", "--from", "1"]);
    let out = run(&s.data(), &args);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == t)
        .collect()
}

/// Three backups of `trading`, with a day's churn between them.
fn three_backups(pg: &Postgres, s: &Setup) -> Vec<String> {
    pg.create_db("trading").unwrap();
    pg.psql_file("trading", &dataset("trading.sql"), &[("rows", "40000")])
        .unwrap();
    let url = pg.conninfo("trading");
    let mut ids = Vec::new();
    for i in 0..3 {
        if i > 0 {
            pg.psql_file("trading", &dataset("churn.sql"), &[]).unwrap();
        }
        ids.push(s.backup(&url));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_then_prune_keeps_one_backup_that_restores_and_records_every_deletion() {
    let pg = Postgres::start().unwrap();
    let s = Setup::new();
    let ids = three_backups(&pg, &s);
    let url = pg.conninfo("trading");
    let at_last_backup = digests(&url).await;
    let newest = ids[2].clone();

    // Dry run: the decisions, nothing recorded, nothing deleted.
    let dry = s.ok_json(&["forget", "--dry-run", "--json"]);
    assert_eq!(dry["dry_run"], true);
    let decisions = |r: &serde_json::Value| -> BTreeMap<String, (bool, String)> {
        r["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["backup_id"].as_str().unwrap().to_string(),
                    (
                        d["keep"].as_bool().unwrap(),
                        d["reason"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect()
    };
    let planned = decisions(&dry);
    assert_eq!(planned.len(), 3, "{dry}");
    assert_eq!(planned[&newest], (true, "last 1".to_string()));
    assert!(!planned[&ids[0]].0 && !planned[&ids[1]].0, "{dry}");
    assert_eq!(s.backups().len(), 3, "a dry run deletes nothing");
    assert!(events_of_type(&s, "retention.decided").is_empty());

    // The text form names the rule that keeps each backup.
    let out = s.run(&["forget", "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(newest.as_str()) && text.contains("last 1"),
        "{text}"
    );
    assert!(text.contains("would be removed"), "{text}");

    // The real run: the same decisions, and the two older backups gone.
    let real = s.ok_json(&["forget", "--json"]);
    assert_eq!(decisions(&real), planned);
    assert_eq!(s.backups(), BTreeSet::from([newest.clone()]));

    // Prune: the first run marks, the second (grace 0) sweeps.
    let first = s.ok_json(&["prune", "--grace", "0s", "--json"]);
    assert!(
        first["report"]["newly_marked"].as_u64().unwrap() > 0,
        "{first}"
    );
    let dry_sweep = s.ok_json(&["prune", "--grace", "0s", "--dry-run", "--json"]);
    let sweep = s.ok_json(&["prune", "--grace", "0s", "--json"]);
    let swept = sweep["report"]["swept"].as_u64().unwrap();
    assert!(swept > 0, "{sweep}");
    assert_eq!(dry_sweep["report"]["swept"].as_u64().unwrap(), swept);
    assert!(sweep["report"]["bytes_reclaimed"].as_u64().unwrap() > 0);
    let out = s.run(&["prune", "--grace", "0s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("swept:"), "{}", stdout(&out));

    let report = s.check_read_data();
    assert_eq!(report["unreferenced_chunks"], 0, "{report}");
    let out = s.run(&[
        "restore",
        &newest,
        "--to",
        &pg.conninfo("restored"),
        "--create-db",
    ]);
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_eq!(digests(&pg.conninfo("restored")).await, at_last_backup);

    // The audit trail: every decision and each deletion, with the policy.
    let decided = events_of_type(&s, "retention.decided");
    assert_eq!(decided.len(), 3, "{decided:?}");
    for e in &decided {
        assert_eq!(e["payload"]["policy"], "backups/*", "{e}");
    }
    let deleted: BTreeSet<String> = events_of_type(&s, "backup.deleted")
        .iter()
        .map(|e| {
            assert_eq!(e["payload"]["policy"], "backups/*", "{e}");
            assert_eq!(e["payload"]["reason"], "no rule keeps it", "{e}");
            e["payload"]["backup_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(deleted, BTreeSet::from([ids[0].clone(), ids[1].clone()]));

    // A second forget the same day records nothing new.
    s.ok_json(&["forget", "--json"]);
    assert_eq!(events_of_type(&s, "retention.decided").len(), 3);
}

/// A small xorshift, seeded from the clock and printed, so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_killed_at_random_points_never_removes_a_referenced_object() {
    let pg = Postgres::start().unwrap();
    let s = Setup::new();
    let ids = three_backups(&pg, &s);
    let url = pg.conninfo("trading");
    s.ok_json(&["forget", "--json"]);
    assert_eq!(s.backups(), BTreeSet::from([ids[2].clone()]));

    let seed = std::env::var("BACKSTOP_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("kill points from seed {seed} (BACKSTOP_TEST_SEED={seed} repeats them)");
    let mut rng = Rng(seed);
    let prune_args = s.command(&["prune", "--grace", "0s"]);
    let spawn_prune = || {
        Command::new(support::bin())
            .arg("--data-dir")
            .arg(s.data())
            .args(&prune_args)
            .env("BACKSTOP_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prune")
    };
    // How long a whole run takes here: kill points are drawn from that span.
    let started = std::time::Instant::now();
    assert!(spawn_prune().wait().unwrap().success());
    let mut span = started.elapsed().as_millis().max(20) as u64;
    eprintln!("a prune run takes about {span} ms");
    let mut kept = ids[2].clone();
    assert!(!kept.is_empty());
    let mut killed = 0;
    // Until 6 runs were killed (most rounds kill; one that finished counts too), at most 16.
    let mut rounds = 0;
    while killed < 6 && rounds < 40 {
        let round = rounds;
        rounds += 1;
        // New garbage each round: a backup after a day's churn (reusing most of the old
        // chunks), and the previous one forgotten.
        pg.psql_file("trading", &dataset("churn.sql"), &[]).unwrap();
        kept = s.backup(&url);
        s.ok_json(&["forget", "--json"]);
        assert_eq!(s.backups(), BTreeSet::from([kept.clone()]));
        let mut child = spawn_prune();
        let round_started = std::time::Instant::now();
        // Somewhere inside a run (later rounds have less garbage and run faster: the span
        // follows the fastest finished run, so most rounds are killed somewhere inside).
        std::thread::sleep(Duration::from_millis(rng.next(span)));
        if let Some(_finished) = child.try_wait().unwrap() {
            span = span.min(round_started.elapsed().as_millis().max(10) as u64);
        } else {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            killed += 1;
        }
        let status = child.wait().unwrap();
        eprintln!("round {round}: prune ended with {status}");
        // Whatever was interrupted, the kept backup's objects are all there.
        let out = s.run(&["check", "--json"]);
        assert!(
            out.status.success(),
            "round {round} (seed {seed}): check failed\nstdout: {}\nstderr: {}",
            stdout(&out),
            stderr(&out)
        );
    }
    let at_last_backup = digests(&url).await;
    assert!(
        killed >= 4,
        "only {killed} of {rounds} prunes were killed (seed {seed})"
    );
    // Two complete runs finish what the killed ones left.
    s.ok_json(&["prune", "--grace", "0s", "--json"]);
    s.ok_json(&["prune", "--grace", "0s", "--json"]);
    let report = s.check_read_data();
    assert_eq!(report["unreferenced_chunks"], 0, "{report}");
    let out = s.run(&[
        "restore",
        &kept,
        "--to",
        &pg.conninfo("restored"),
        "--create-db",
    ]);
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_eq!(digests(&pg.conninfo("restored")).await, at_last_backup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_tagged_pre_deploy_is_kept_for_its_own_period() {
    let pg = Postgres::start().unwrap();
    let s = Setup::with_policy(
        r#"
[[retention]]
keep_last = 1
keep_daily = 0
keep_weekly = 0
keep_monthly = 0
keep_yearly = 0
keep_tags = { "pre-deploy" = "30d" }
"#,
    );
    pg.create_db("trading").unwrap();
    pg.psql_file("trading", &dataset("trading.sql"), &[("rows", "2000")])
        .unwrap();
    let url = pg.conninfo("trading");
    let tagged = s.ok_json(&[
        "backup",
        "--pg",
        &url,
        "--name",
        "main",
        "--tag",
        "pre-deploy",
        "--json",
    ])["backup_id"]
        .as_str()
        .unwrap()
        .to_string();
    let plain = s.backup(&url);
    let newest = s.backup(&url);
    let out = s.run(&["backup", "--pg", &url, "--tag", "no spaces"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("a tag is"), "{}", stderr(&out));

    s.ok_json(&["forget", "--json"]);
    assert_eq!(
        s.backups(),
        BTreeSet::from([tagged.clone(), newest.clone()]),
        "the tagged backup is kept beside the newest; {plain} is not"
    );
    let decided = events_of_type(&s, "retention.decided");
    assert!(
        decided
            .iter()
            .any(|e| e["payload"]["backup_id"] == tagged.as_str()
                && e["payload"]["keep"] == true
                && e["payload"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("pre-deploy")),
        "{decided:?}"
    );
}
