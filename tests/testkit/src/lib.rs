//! backstop-testkit: starts REAL servers (PostgreSQL 15, nats-server with JetStream, Garage, moto's
//! S3 server for object lock, aiosmtpd for notification emails) on free loopback ports in temporary
//! directories, for other crates' tests.
//!
//! Invariants every server here keeps:
//! - It listens on 127.0.0.1 only, on ports from [`free_port`], and keeps all of its state (data,
//!   sockets, logs, config) in its own temporary directory, removed when the handle is dropped.
//! - `start()` returns only once the server answers real requests; readiness is polled against a
//!   generous deadline (60 s, or `BACKSTOP_TESTKIT_TIMEOUT_SECS`) because the test machines are
//!   small and shared. On failure the error carries the tail of the server's log.
//! - Dropping a handle stops the server (PostgreSQL: `pg_ctl stop -m immediate`; NATS and Garage:
//!   SIGKILL to the process), so a failing test does not leave servers behind.
//!
//! The API is blocking on purpose: it works from plain `#[test]`s and from `#[tokio::test]`s alike
//! (starting a server blocks the calling thread for a second or two, which is harmless in tests).
//!
//! When the tests run as root (CI containers), PostgreSQL refuses to run as root, so `initdb`,
//! `pg_ctl` and `postgres` are run as the unprivileged `postgres` system user (override with
//! `BACKSTOP_TESTKIT_PG_USER`) through `runuser` (or `su`), and the server's files are owned by
//! that user. See [`server_tempdir`] and [`give_to_server_user`] for directories a test wants the
//! server to read or write (WAL archives, restored data directories).

mod garage;
mod http;
mod influxdb;
mod moto;
mod nats;
mod nats_cluster;
mod postgres;
mod process;
mod recording;
mod redis;
mod smtp;
mod user;

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};

pub use backstop_repo::MemoryBackend;
pub use garage::{Garage, GarageOptions};
pub use influxdb::Influx;
pub use moto::Moto;
pub use nats::Nats;
pub use nats_cluster::NatsCluster;
pub use postgres::{Postgres, PostgresOptions};
pub use recording::RecordingAppender;
pub use redis::Redis;
pub use smtp::{Smtp, SmtpTls};
pub use user::{
    give_to_server_user, server_tempdir, server_tempdir_in, server_user, server_user_command,
};

/// How long to wait for a server to become ready or to stop: 60 s unless
/// `BACKSTOP_TESTKIT_TIMEOUT_SECS` says otherwise. Generous because the machines are slow and shared.
pub fn deadline() -> Duration {
    static SECS: OnceLock<u64> = OnceLock::new();
    let secs = *SECS.get_or_init(|| {
        std::env::var("BACKSTOP_TESTKIT_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|s: &u64| *s > 0)
            .unwrap_or(60)
    });
    Duration::from_secs(secs)
}

/// A free TCP port on 127.0.0.1. Never hands out the same port twice within one process, so
/// servers started concurrently by parallel tests don't collide with each other.
///
/// Panics only if the machine cannot bind a loopback socket at all (see [`try_free_port`]).
pub fn free_port() -> u16 {
    match try_free_port() {
        Ok(port) => port,
        Err(e) => panic!("{e:#}"),
    }
}

/// Like [`free_port`], but returns an error instead of panicking.
pub fn try_free_port() -> anyhow::Result<u16> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..1000 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).context(
            "cannot bind a TCP socket on 127.0.0.1 to find a free port; is the loopback interface up?",
        )?;
        let port = listener.local_addr()?.port();
        // A poisoned lock only means another test panicked while holding it; the set is still valid.
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    bail!("could not find a loopback port not already handed out after 1000 tries")
}

/// True if nothing listens on `127.0.0.1:port` (a listener can be bound there right now).
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// How to install each tool the test suites use; shown when one is missing.
fn install_hint(name: &str) -> &'static str {
    match name {
        "garage" => {
            "install it with `cargo install garage --locked` (about 11 minutes), or run scripts/setup"
        }
        "nats-server" => {
            "install Debian's package: `apt-get install nats-server`, or run scripts/setup"
        }
        "initdb" | "pg_ctl" | "postgres" | "psql" | "pg_dump" | "pg_restore" | "pg_basebackup"
        | "pg_isready" => {
            "install PostgreSQL 15: `apt-get install postgresql-15 postgresql-client-15`, or run scripts/setup"
        }
        "moto_server" => {
            "run scripts/setup: it installs PyPI's moto[server] in a virtual environment and links ~/.local/bin/moto_server"
        }
        "redis-server" | "redis-cli" => {
            "install Debian's package: `apt-get install redis-server`, or run scripts/setup"
        }
        "influxd" => "install Debian's package: `apt-get install influxdb`, or run scripts/setup",
        "restic" | "pgbackrest" | "chromium" | "wrk" | "sqlite3" => {
            "install Debian's package of that name with apt-get, or run scripts/setup"
        }
        _ => "install it, or run scripts/setup",
    }
}

/// Directories searched after `PATH`: where Debian, cargo and PostgreSQL 15 put binaries.
fn extra_bin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    for d in [
        "/usr/lib/postgresql/15/bin",
        "/usr/local/bin",
        "/usr/bin",
        "/usr/sbin",
        "/bin",
        "/sbin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Finds an executable named `name` on `PATH`, then in `~/.cargo/bin`,
/// `/usr/lib/postgresql/15/bin`, `/usr/local/bin`, `/usr/bin`, `/usr/sbin`.
/// The error names the tool, where it looked, and how to install it.
pub fn require_tool(name: &str) -> anyhow::Result<PathBuf> {
    let mut searched: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    searched.extend(extra_bin_dirs());
    for dir in &searched {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    let dirs: Vec<String> = searched.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "required tool `{name}` was not found (searched PATH and {}): {}",
        dirs.join(":"),
        install_hint(name)
    )
}

/// The last `lines` lines of a log file, or a note saying why it could not be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("(log {} unreadable: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_never_repeats_and_is_bindable() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(
            unique.len(),
            ports.len(),
            "free_port handed out a port twice"
        );
        assert!(ports.iter().all(|p| *p != 0));
        assert!(port_is_free(ports[0]));
    }

    #[test]
    fn require_tool_finds_sh_and_explains_missing_tools() {
        let sh = require_tool("sh").expect("sh is on every machine");
        assert!(sh.ends_with("sh"));
        let err = require_tool("garage-definitely-not-installed").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("garage-definitely-not-installed"), "{msg}");
        assert!(msg.contains("scripts/setup"), "{msg}");
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        let text: String = (1..=10).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).expect("write log");
        assert_eq!(log_tail(&path, 2), "line 9\nline 10");
        assert!(log_tail(&dir.path().join("missing.log"), 5).contains("unreadable"));
    }
}
