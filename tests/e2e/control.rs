//! The CLI beside a running `backstop serve` in embedded mode (no NATS): `init`, `ledger append`
//! and `backup` append, and `ledger tail [--follow]` reads, through `DATA_DIR/control.sock`
//! while the serve holds the ledger. The binary against a real PostgreSQL 15.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backstop_testkit::{Postgres, free_port};
use support::{Process, bin, run, stderr, stdout};

/// `backstop ledger tail --follow --json`, its stdout collected as parsed lines.
struct Follower {
    child: Child,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Follower {
    fn start(data: &Path) -> Follower {
        let mut child = Command::new(bin())
            .arg("--data-dir")
            .arg(data)
            .args(["ledger", "tail", "--follow", "--json", "--from", "1"])
            .env("BACKSTOP_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn backstop ledger tail --follow");
        let out = child.stdout.take().expect("stdout piped");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let e = serde_json::from_str(&line)
                    .unwrap_or_else(|err| panic!("tail printed a non-JSON line {line:?}: {err}"));
                sink.lock().unwrap().push(e);
            }
        });
        Follower { child, events }
    }

    /// Waits until an event matching `want` has been printed; returns it.
    fn wait_for(&self, what: &str, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(e) = self.events.lock().unwrap().iter().find(|e| want(e)) {
                return e.clone();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "tail --follow never printed {what}; it printed:\n{:#?}",
            self.events.lock().unwrap()
        );
    }

    fn positions(&self) -> Vec<u64> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_cli_appends_backs_up_and_follows_beside_a_running_serve() {
    let pg = Postgres::start().unwrap();
    pg.create_db("shop").unwrap();
    pg.psql(
        "shop",
        "CREATE TABLE orders (id bigint PRIMARY KEY, item text NOT NULL);
         INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 5000) g;",
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let repo = tmp.path().join("repo");
    let key = tmp.path().join("master.key");
    let repo_args = [
        "--repo",
        repo.to_str().unwrap(),
        "--master-key-file",
        key.to_str().unwrap(),
    ];

    let listen = format!("127.0.0.1:{}", free_port());
    let mut serve = Process::spawn(&data, &["serve", "--listen", &listen], &[]);
    serve.wait_for_log("control socket listening", Duration::from_secs(60));
    let socket = data.join("control.sock");
    assert!(socket.exists());

    let follower = Follower::start(&data);

    // Every one of these would have refused with "the ledger is held" before the socket.
    let out = run(
        &data,
        &[
            "init",
            "--repo",
            repo.to_str().unwrap(),
            "--generate-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "init beside serve: {}", stderr(&out));

    let out = run(
        &data,
        &[
            "ledger",
            "append",
            "--stream",
            "storage",
            "--type",
            "storage.usage_sampled",
            "--payload",
            r#"{"region": "beside-serve", "storage_class": "STANDARD", "bytes": 7, "objects": 1}"#,
            "--operator",
            "e2e",
        ],
    );
    assert!(
        out.status.success(),
        "ledger append beside serve: {}",
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("appended at position"),
        "{}",
        stdout(&out)
    );

    // The same checks as any other append: a payload of the wrong shape is refused.
    let out = run(
        &data,
        &[
            "ledger",
            "append",
            "--stream",
            "storage",
            "--type",
            "storage.usage_sampled",
            "--payload",
            r#"{"region": 5}"#,
        ],
    );
    assert!(!out.status.success(), "a bad payload was accepted");
    assert!(stderr(&out).contains("invalid"), "{}", stderr(&out));

    let shop = pg.conninfo("shop");
    let mut backup_args = vec!["backup", "--pg", shop.as_str(), "--name", "shop", "--json"];
    backup_args.extend(repo_args);
    let out = run(&data, &backup_args);
    assert!(
        out.status.success(),
        "backup beside serve: {}",
        stderr(&out)
    );
    let backup: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("backup --json");
    let backup_id = backup["backup_id"].as_str().unwrap().to_string();

    // The follower, started before any of it, sees it all live.
    let sampled = follower.wait_for("the appended event", |e| {
        e["type"] == "storage.usage_sampled" && e["payload"]["region"] == "beside-serve"
    });
    assert_eq!(sampled["actor"], "operator:e2e");
    follower.wait_for("backup.completed", |e| {
        e["type"] == "backup.completed" && e["payload"]["backup_id"] == backup_id.as_str()
    });
    follower.wait_for("key.accessed", |e| e["type"] == "key.accessed");
    let positions = follower.positions();
    let expected: Vec<u64> = (1..=positions.len() as u64).collect();
    assert_eq!(positions, expected, "gapless, in order, each once");

    // A plain tail beside the serve prints the same history and returns.
    let out = run(&data, &["ledger", "tail", "--json", "--from", "1"]);
    assert!(out.status.success(), "tail beside serve: {}", stderr(&out));
    let tailed = stdout(&out).lines().count();
    assert!(tailed >= positions.len(), "{tailed} < {}", positions.len());

    // What needs the ledger's files says so.
    let out = run(&data, &["ledger", "stats"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("stop the serve"), "{}", stderr(&out));

    // Shutdown ends the follow stream, and the socket goes with the serve.
    assert!(serve.terminate().success(), "{}", serve.log());
    assert!(!socket.exists(), "the serve left its socket behind");
    let mut follower = follower;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = follower.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "tail --follow did not end with the serve"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "tail --follow exited with {status}");

    // With the serve gone the ledger opens directly again, and the chain is intact.
    let out = run(&data, &["ledger", "verify"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

#[test]
fn a_killed_serve_leaves_a_stale_socket_that_the_next_serve_replaces() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut serve = Process::spawn(&data, &["serve", "--listen", &listen], &[]);
    serve.wait_for_log("control socket listening", Duration::from_secs(60));
    serve.kill9();
    let socket = data.join("control.sock");
    assert!(socket.exists(), "kill -9 leaves the socket file");

    // The dead serve's lock went with it: commands open the ledger directly.
    let out = run(&data, &["ledger", "tail"]);
    assert!(
        out.status.success(),
        "tail after kill -9 opens the ledger: {}",
        stderr(&out)
    );

    let listen = format!("127.0.0.1:{}", free_port());
    let mut again = Process::spawn(&data, &["serve", "--listen", &listen], &[]);
    again.wait_for_log("control socket listening", Duration::from_secs(60));
    assert!(
        again.log().contains("stale control socket"),
        "{}",
        again.log()
    );
    let out = run(
        &data,
        &[
            "ledger",
            "append",
            "--stream",
            "storage",
            "--type",
            "storage.usage_sampled",
            "--payload",
            r#"{"region": "r", "storage_class": "STANDARD", "bytes": 1, "objects": 1}"#,
        ],
    );
    assert!(
        out.status.success(),
        "append through the new socket: {}",
        stderr(&out)
    );
    assert!(again.terminate().success());
}
