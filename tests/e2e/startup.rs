//! `backstop serve` starting up, end to end against real servers: a configuration error stops it
//! at once with its message (NATS configured, so the outbox and the remote appends would have
//! started), and the API answers 503 with a reason and `Retry-After`, never a 500, until the
//! projections' migrations have run.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backstop_testkit::{Nats, Postgres, free_port};
use support::Process;

const TOKEN: &str = "operator-token-startup-0123456789";

/// A configuration file with `[nats] url` and whatever else the case needs.
fn config(dir: &Path, nats: &str, api: &str) -> PathBuf {
    let path = dir.join("backstop.toml");
    std::fs::write(&path, format!("[nats]\nurl = \"{nats}\"\n\n[api]\n{api}")).unwrap();
    path
}

fn tokens_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `serve` until it exits; fails the test if it is still running after `limit`.
fn serve_exits_within(data: &Path, config: &Path, extra: &[&str], limit: Duration) -> String {
    let mut args = vec!["--config", config.to_str().unwrap(), "serve"];
    args.extend_from_slice(extra);
    let mut serve = Process::spawn(data, &args, &[]);
    let started = Instant::now();
    loop {
        if let Some(status) = serve.child.try_wait().unwrap() {
            let took = started.elapsed();
            // The reader thread may still be copying the last lines.
            std::thread::sleep(Duration::from_millis(100));
            let log = serve.log();
            assert!(
                !status.success(),
                "serve exited successfully on a bad configuration:\n{log}"
            );
            assert!(
                took < limit,
                "serve took {took:?} to give up (limit {limit:?}):\n{log}"
            );
            return log;
        }
        if started.elapsed() > limit {
            serve.kill9();
            panic!(
                "serve was still running {limit:?} after start on a bad configuration (hung?):\n{}",
                serve.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_configuration_error_stops_serve_at_once_with_its_message() {
    let nats = Nats::start().expect("nats-server");
    let limit = Duration::from_secs(5);

    // A token shorter than 16 characters (the reported hang).
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path(), "alice operator short\n");
    let cfg = config(
        dir.path(),
        &nats.url(),
        &format!(
            "tokens_file = \"{}\"\nlisten = \"127.0.0.1:{}\"\n",
            tokens.display(),
            free_port()
        ),
    );
    let log = serve_exits_within(&dir.path().join("data"), &cfg, &[], limit);
    assert!(
        log.contains("shorter than 16 characters") && log.contains(&tokens.display().to_string()),
        "the message names the file and the problem:\n{log}"
    );
    // Nothing long-lived was started before the configuration was checked.
    assert!(
        !log.contains("publishing to NATS"),
        "the outbox started before the check:\n{log}"
    );

    // A tokens file that is not there.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-tokens");
    let cfg = config(
        dir.path(),
        &nats.url(),
        &format!("tokens_file = \"{}\"\n", missing.display()),
    );
    let log = serve_exits_within(
        &dir.path().join("data"),
        &cfg,
        &["--listen", "127.0.0.1:0"],
        limit,
    );
    assert!(
        log.contains("cannot read api.tokens_file") && log.contains("no-such-tokens"),
        "{log}"
    );

    // An explicit API address another process holds.
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path(), &format!("alice operator {TOKEN}\n"));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let cfg = config(
        dir.path(),
        &nats.url(),
        &format!(
            "tokens_file = \"{}\"\nlisten = \"{addr}\"\n",
            tokens.display()
        ),
    );
    let log = serve_exits_within(&dir.path().join("data"), &cfg, &[], limit);
    assert!(
        log.contains(&format!("cannot listen on {addr}")) && log.contains("another process"),
        "{log}"
    );

    // An address that is not HOST:PORT.
    let log = serve_exits_within(
        &dir.path().join("data"),
        &cfg,
        &["--listen", "dashboard"],
        limit,
    );
    assert!(
        log.contains("cannot listen on dashboard") && log.contains("HOST:PORT"),
        "{log}"
    );

    // A projections URL that does not parse.
    let log = serve_exits_within(
        &dir.path().join("data"),
        &cfg,
        &[
            "--listen",
            "127.0.0.1:0",
            "--projections-url",
            "postgres://backstop@[::1/projections",
        ],
        limit,
    );
    assert!(log.contains("projections.database_url"), "{log}");

    // The same data directory then serves normally with a good configuration, and stops cleanly.
    let port = free_port();
    let mut serve = Process::spawn(
        &dir.path().join("data"),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &[],
    );
    serve.wait_for_log("API and dashboard listening", Duration::from_secs(30));
    let status = serve.terminate();
    assert!(
        status.success(),
        "serve exited with {status}:\n{}",
        serve.log()
    );
}

/// `GET path` with the token; the status, the response head (lower-cased) and the body.
fn get(port: u16, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_ascii_lowercase(), body.to_string()))
}

/// The advisory lock sqlx's migrator takes on the database `name` before it touches anything
/// (`generate_lock_id` in sqlx-postgres: 0x3d32ad9e times the CRC-32 of the name). Holding it
/// keeps `serve`'s migrations waiting for as long as the test wants. Should sqlx change the key,
/// the migrations no longer wait and the test fails at its check that they do.
fn sqlx_migration_lock_id(name: &str) -> i64 {
    let mut crc = 0xffff_ffffu32;
    for b in name.bytes() {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    0x3d32_ad9e * i64::from(!crc)
}

/// A psql session holding an advisory lock until it is dropped.
struct HeldLock {
    psql: std::process::Child,
}

impl HeldLock {
    fn take(pg: &Postgres, db: &str, id: i64) -> HeldLock {
        let bin = pg.bin("psql");
        let bin = if bin.is_file() { bin } else { "psql".into() };
        let mut psql = Command::new(bin)
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg(pg.conninfo(db))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run psql");
        let stdin = psql.stdin.as_mut().unwrap();
        writeln!(stdin, "SELECT pg_advisory_lock({id}); SELECT 'locked';").unwrap();
        stdin.flush().unwrap();
        let mut out = BufReader::new(psql.stdout.take().unwrap());
        let mut line = String::new();
        while line.trim() != "locked" {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "psql ended before taking the lock"
            );
        }
        HeldLock { psql }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        // Ending the session releases the lock.
        drop(self.psql.stdin.take());
        let _ = self.psql.wait();
    }
}

#[test]
fn the_api_answers_503_with_a_reason_until_the_read_models_are_ready() {
    let pg = Postgres::start().expect("PostgreSQL");
    pg.create_db("projections").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path(), &format!("alice operator {TOKEN}\n"));
    let cfg = dir.path().join("backstop.toml");
    std::fs::write(
        &cfg,
        format!("[api]\ntokens_file = \"{}\"\n", tokens.display()),
    )
    .unwrap();

    let lock = HeldLock::take(&pg, "projections", sqlx_migration_lock_id("projections"));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut serve = Process::spawn(
        &dir.path().join("data"),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "serve",
            "--projections-url",
            &pg.conninfo("projections"),
            "--listen",
            &listen,
        ],
        &[],
    );
    serve.wait_for_log("API and dashboard listening", Duration::from_secs(30));
    // The migrations are waiting on the lock (so the read models' tables do not exist yet).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting = pg
            .psql(
                "projections",
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
            )
            .unwrap();
        if waiting != "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serve's migrations never waited on the migration lock:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    for path in ["/api/backups", "/api/overview", "/api/verifications"] {
        let (status, head, body) = get(port, path).unwrap();
        assert_eq!(status, 503, "{path} while migrating: {head}\n{body}");
        assert!(head.contains("retry-after: "), "{path}: {head}");
        assert!(
            body.contains("read models are not ready") && body.contains("migrations"),
            "{path}: {body}"
        );
    }
    // The dashboard's pages say the same, as a page.
    let (status, head, body) = get(port, "/").unwrap();
    assert_eq!(status, 503, "{head}\n{body}");
    assert!(head.contains("retry-after: "), "{head}");
    assert!(body.contains("read models are not ready"), "{body}");
    let (status, _, body) = get(port, "/healthz").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"projections\":\"starting\""), "{body}");

    // Once the migrations may run, the same requests succeed; none is ever a 500.
    drop(lock);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, body) = get(port, "/api/backups").unwrap();
        assert_ne!(status, 500, "a 500 while the read models got ready: {body}");
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "the read models never became ready:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _, body) = get(port, "/api/overview").unwrap();
    assert_eq!(status, 200, "{body}");
    let (_, _, body) = get(port, "/healthz").unwrap();
    assert!(body.contains("\"projections\":\"ok\""), "{body}");
    let status = serve.terminate();
    assert!(
        status.success(),
        "serve exited with {status}:\n{}",
        serve.log()
    );
}
