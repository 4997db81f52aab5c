//! No backup stays "started" forever: a foreground `backstop backup` killed with `kill -9` while
//! its dump waits on a lock is recorded as failed (abandoned) by the running `backstop serve`
//! once its lease lapses. The binary, embedded mode, against a real PostgreSQL 15.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use backstop_testkit::{Postgres, free_port};
use support::{Process, run_env, stderr, stdout};

const LEASE_SECONDS: u64 = 3;

/// Every event of the ledger, read beside the serve (`ledger tail --json`).
fn tail(data: &Path, config: &Path) -> Vec<serde_json::Value> {
    let out = run_env(
        data,
        &["ledger", "tail", "--json", "--from", "1"],
        &[("BACKSTOP_CONFIG", config.to_str().unwrap())],
    );
    assert!(out.status.success(), "ledger tail: {}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("tail printed {l:?}: {e}")))
        .collect()
}

/// Polls the ledger until `want` finds something, for at most `timeout`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut want: impl FnMut(&[serde_json::Value]) -> Option<T>,
    data: &Path,
    config: &Path,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let events = tail(data, config);
        if let Some(found) = want(&events) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {timeout:?}; the ledger holds:\n{events:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A psql session holding `LOCK TABLE orders IN ACCESS EXCLUSIVE MODE` in an open transaction,
/// until it is dropped.
struct LockHolder(Child);

impl LockHolder {
    fn take(pg: &Postgres, db: &str) -> LockHolder {
        let mut child = pg
            .client("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn psql");
        child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"BEGIN;\nLOCK TABLE orders IN ACCESS EXCLUSIVE MODE;\n")
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while locks(pg, db, true) == 0 {
            assert!(Instant::now() < deadline, "psql never took the lock");
            std::thread::sleep(Duration::from_millis(50));
        }
        LockHolder(child)
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Locks on `orders`, granted or waiting.
fn locks(pg: &Postgres, db: &str, granted: bool) -> u64 {
    pg.psql(
        db,
        &format!(
            "SELECT count(*) FROM pg_locks WHERE relation = 'orders'::regclass AND granted = {granted}"
        ),
    )
    .unwrap()
    .parse()
    .unwrap()
}

fn of_backup<'a>(
    events: &'a [serde_json::Value],
    backup_id: &'a str,
    event_type: &'a str,
) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
    events
        .iter()
        .filter(move |e| e["type"] == event_type && e["stream"] == format!("backup-{backup_id}"))
}

#[test]
fn a_backup_killed_with_kill_9_is_recorded_as_abandoned_within_the_lease() {
    let pg = Postgres::start().unwrap();
    pg.create_db("shop").unwrap();
    pg.psql(
        "shop",
        "CREATE TABLE orders (id bigint PRIMARY KEY, item text NOT NULL);
         INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 1000) g;",
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let repo = tmp.path().join("repo");
    let key = tmp.path().join("master.key");
    let config = tmp.path().join("backstop.toml");
    std::fs::write(
        &config,
        format!("[workers]\nlease_seconds = {LEASE_SECONDS}\n"),
    )
    .unwrap();
    let env = [("BACKSTOP_CONFIG", config.to_str().unwrap())];

    let listen = format!("127.0.0.1:{}", free_port());
    let mut serve = Process::spawn(&data, &["serve", "--listen", &listen], &env);
    serve.wait_for_log("control socket listening", Duration::from_secs(60));
    serve.wait_for_log("lease monitor running", Duration::from_secs(10));
    let out = run_env(
        &data,
        &[
            "init",
            "--repo",
            repo.to_str().unwrap(),
            "--generate-key",
            key.to_str().unwrap(),
        ],
        &env,
    );
    assert!(out.status.success(), "init beside serve: {}", stderr(&out));

    // Another session holds the table: the dump's ACCESS SHARE lock waits behind it.
    let lock = LockHolder::take(&pg, "shop");
    let shop = pg.conninfo("shop");
    let mut backup = Process::spawn(
        &data,
        &[
            "backup",
            "--pg",
            shop.as_str(),
            "--name",
            "shop",
            "--json",
            "--repo",
            repo.to_str().unwrap(),
            "--master-key-file",
            key.to_str().unwrap(),
        ],
        &env,
    );
    let backup_id = wait_for(
        "backup.started",
        Duration::from_secs(60),
        |events| {
            events
                .iter()
                .find(|e| e["type"] == "backup.started")
                .map(|e| e["payload"]["backup_id"].as_str().unwrap().to_string())
        },
        &data,
        &config,
    );
    // The backup is alive and stuck: its lock request waits, and it renews its lease.
    let deadline = Instant::now() + Duration::from_secs(30);
    while locks(&pg, "shop", false) == 0 {
        assert!(
            Instant::now() < deadline,
            "the dump never waited on the lock:\n{}",
            backup.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for(
        "a second lease renewal",
        Duration::from_secs(30),
        |events| (of_backup(events, &backup_id, "lease.renewed").count() >= 2).then_some(()),
        &data,
        &config,
    );
    assert!(
        backup.child.try_wait().unwrap().is_none(),
        "the backup ended on its own:\n{}",
        backup.log()
    );

    backup.kill9();
    let killed = Instant::now();
    let failed = wait_for(
        "backup.failed",
        Duration::from_secs(LEASE_SECONDS * 5),
        |events| {
            of_backup(events, &backup_id, "backup.failed")
                .next()
                .cloned()
        },
        &data,
        &config,
    );
    let took = killed.elapsed();
    let reason = failed["payload"]["reason"].as_str().unwrap();
    assert!(reason.contains("abandoned"), "{reason}");
    assert!(reason.contains("stopped renewing its lease"), "{reason}");
    assert_eq!(failed["actor"], "worker:lease-monitor");
    // The last renewal held the lease for one period; the monitor looks every quarter of it.
    assert!(
        took <= Duration::from_secs(LEASE_SECONDS * 2),
        "recorded {took:?} after the kill, beyond the lease of {LEASE_SECONDS} s and a tick"
    );

    // Recorded once, and nothing is renewed or recorded for the dead backup after that.
    std::thread::sleep(Duration::from_secs(LEASE_SECONDS));
    let events = tail(&data, &config);
    assert_eq!(of_backup(&events, &backup_id, "backup.failed").count(), 1);
    let failed_at = failed["position"].as_u64().unwrap();
    let last = events
        .iter()
        .filter(|e| e["stream"] == format!("backup-{backup_id}"))
        .map(|e| e["position"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(last, failed_at, "events after the failure: {events:#?}");
    assert!(
        serve.log().contains("lease lapsed"),
        "the serve did not say why:\n{}",
        serve.log()
    );

    drop(lock);
    assert!(serve.terminate().success(), "{}", serve.log());
    // With the serve gone the ledger opens directly, and its chain is intact.
    let out = run_env(&data, &["ledger", "verify"], &env);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}
