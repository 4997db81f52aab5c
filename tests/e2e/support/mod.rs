//! What the end-to-end tests share: running the `backstop` binary and waiting on it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_backstop"))
}

/// Runs `backstop ARGS` to completion with the data directory set.
pub fn run(data_dir: &Path, args: &[&str]) -> Output {
    run_env(data_dir, args, &[])
}

pub fn run_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.arg("--data-dir").arg(data_dir).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env("BACKSTOP_LOG", "info");
    cmd.output().expect("run the backstop binary")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A long-running `backstop` process whose stderr is captured line by line.
pub struct Process {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    pub fn spawn(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(bin());
        cmd.arg("--data-dir").arg(data_dir).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env("BACKSTOP_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn backstop");
        let stderr = child.stderr.take().expect("stderr piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  [backstop] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Process { child, lines }
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until a stderr line contains `needle`; panics with the log after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no log line with {needle:?} within {timeout:?}:\n{}",
            self.log()
        );
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "backstop did not stop within 40 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP server on 127.0.0.1 that records every POSTed JSON body and answers 200.
pub struct Webhook {
    port: u16,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Webhook {
    pub fn start() -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the webhook receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("local addr").port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let sink = bodies.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let app = axum::Router::new().route(
                    "/hook",
                    axum::routing::post(move |axum::Json(v): axum::Json<serde_json::Value>| {
                        let sink = sink.clone();
                        async move {
                            sink.lock().unwrap().push(v);
                            "ok"
                        }
                    }),
                );
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                axum::serve(listener, app).await.expect("serve");
            });
        });
        Webhook { port, bodies }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }

    pub fn wait_for(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let b = self.bodies();
            if b.len() >= n {
                return b;
            }
            assert!(
                Instant::now() < deadline,
                "{} webhook bodies, waiting for {n}",
                b.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One line of `psql`'s answer to `sql` in the `postgres` database.
pub fn query(pg: &backstop_testkit::Postgres, sql: &str) -> String {
    pg.psql("postgres", sql).unwrap()
}

/// Switches to a new WAL segment and waits until the finished one is archived; returns its name.
pub fn switch_and_wait(pg: &backstop_testkit::Postgres) -> String {
    // A record first, so the switch is never a no-op on an empty segment.
    query(pg, "SELECT pg_logical_emit_message(false, 'e2e', 'x')");
    let name = query(pg, "SELECT pg_walfile_name(pg_switch_wal())");
    let start = Instant::now();
    loop {
        let last = query(
            pg,
            "SELECT coalesce(last_archived_wal, '') || '|' || coalesce(last_failed_wal, '') FROM pg_stat_archiver",
        );
        if last.get(..24).is_some_and(|a| a >= name.as_str()) {
            return name;
        }
        assert!(
            start.elapsed() < backstop_testkit::deadline(),
            "{name} was not archived in time (pg_stat_archiver: {last}); server log:\n{}",
            pg.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// PostgreSQL's `archive_command` for `source`: `backstop --config CONFIG wal-push`.
pub fn archive_command(config: &Path, source: &str) -> String {
    format!(
        "{} --config {} wal-push --source {source} %p",
        bin().display(),
        config.display()
    )
}

/// A PostgreSQL server that archives its WAL through [`archive_command`].
pub fn archiving_postgres(config: &Path, source: &str) -> backstop_testkit::Postgres {
    backstop_testkit::Postgres::start_with(
        backstop_testkit::PostgresOptions::new()
            .conf("archive_mode = on")
            .conf(format!(
                "archive_command = '{}'",
                archive_command(config, source)
            )),
    )
    .unwrap()
}

/// Two batches of rows into `trades` (ids 101-150, then 201-250), each committed and archived,
/// with a moment more than a second from both between them.
pub struct TwoBatches {
    pub seg_a: String,
    /// UTC, RFC 3339 with microseconds: a `--target-time` that keeps batch a only.
    pub between: String,
    pub seg_b: String,
}

pub fn two_batches(pg: &backstop_testkit::Postgres) -> TwoBatches {
    query(
        pg,
        "INSERT INTO trades (id, note) SELECT g, 'batch a' FROM generate_series(101, 150) g",
    );
    let seg_a = switch_and_wait(pg);
    std::thread::sleep(Duration::from_millis(1200));
    let between = query(
        pg,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    std::thread::sleep(Duration::from_millis(1200));
    query(
        pg,
        "INSERT INTO trades (id, note) SELECT g, 'batch b' FROM generate_series(201, 250) g",
    );
    let seg_b = switch_and_wait(pg);
    TwoBatches {
        seg_a,
        between,
        seg_b,
    }
}

/// `count|min|max` of the `trades` rows inserted after the base backup (ids over 100).
pub fn later_rows(pg: &backstop_testkit::Postgres) -> String {
    query(
        pg,
        "SELECT count(*) || '|' || min(id) || '|' || max(id) FROM trades WHERE id > 100",
    )
}

/// A throwaway site for commands run with one configuration file, `backstop.toml` in its
/// directory (the test writes it), as operator `operator`, with no master key in the
/// environment.
pub struct Site {
    pub tmp: tempfile::TempDir,
    pub operator: &'static str,
}

impl Site {
    /// A new site in a directory the test servers' users can read.
    pub fn new(operator: &'static str) -> Site {
        Site {
            tmp: backstop_testkit::server_tempdir().expect("a temporary directory"),
            operator,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--config")
            .arg(self.path("backstop.toml"))
            .args(args)
            .current_dir(self.tmp.path())
            .env_remove("BACKSTOP_MASTER_KEY")
            .env("BACKSTOP_OPERATOR", self.operator)
            .output()
            .expect("run backstop")
    }

    /// Runs `backstop ARGS` and returns its stdout; panics with both outputs if it failed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "backstop {args:?} failed:\n{}\n{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }
}
