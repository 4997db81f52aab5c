//! Verification of a restored data directory on a private, temporary server.
//!
//! [`PrivateServer`] is that server, started and waited for ([`PrivateServer::start`],
//! [`PrivateServer::wait_recovered`]); [`verify_restored`] (the verify worker's test restore)
//! and the DR drill (`backstop_ops::drill`) both run it.
//!
//! Invariants:
//! - The server is reachable through a Unix socket in a fresh 0700 directory, with trust
//!   authentication from a temporary `hba_file`, so the restored cluster's own passwords and
//!   `pg_hba.conf` don't matter to our checks and nobody else can use that socket. It has no TCP
//!   (`listen_addresses = ''`) unless the caller asks for a loopback port (a drill's staging
//!   server, for applications to connect to): then it listens on 127.0.0.1 only, where the
//!   restored cluster's own passwords apply (`md5`/SCRAM), never trust.
//! - It cannot touch production: `archive_mode = off`, `primary_conninfo = ''`,
//!   `synchronous_standby_names = ''` are forced on the command line, which outranks every file.
//! - It loads no code of the restored cluster's choosing: `shared_preload_libraries`,
//!   `session_preload_libraries` and `local_preload_libraries` are emptied the same way (a
//!   library the source preloads could do anything with the server's rights, or be missing on
//!   this machine and keep the server from starting).
//! - It is always stopped (immediately, if verification failed or was abandoned): a guard stops
//!   it on drop. The directory is removed afterwards when asked.
//! - Recovery failure is detected, not waited out: the postmaster's disappearance ends the wait,
//!   and the error carries `wal-fetch`'s failure marker and the server log's tail.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::Connection;

use super::{PhysicalError, os};
use crate::error::SourceError;
use crate::pg::conninfo::ConnInfo;
use crate::pg::logical::row_counts;
use crate::pg::tools;
use crate::pg::wal::{Lsn, RECOVERY_FAILED_MARKER, RECOVERY_WARNINGS};

/// How to verify.
#[derive(Debug, Clone)]
pub struct PhysicalVerifyOptions {
    /// Directory of the server programs (`pg_ctl`, `postgres`, `pg_amcheck`); default as for the
    /// other tools.
    pub pg_bin_dir: Option<PathBuf>,
    /// The account the server runs as when this process is root; default `postgres`. Ignored
    /// when not root (the server runs as the current user).
    pub run_as: Option<String>,
    /// A superuser role of the restored cluster to connect as; default `postgres`.
    pub superuser: String,
    /// Run `pg_amcheck --all` (default true), with `--heapallindexed` (default false: it reads
    /// every index fully).
    pub amcheck: bool,
    pub heapallindexed: bool,
    /// How long recovery may take before giving up. Default 1 hour.
    pub timeout: Duration,
    /// Remove the directory afterwards (default true), whatever the outcome.
    pub remove: bool,
}

impl Default for PhysicalVerifyOptions {
    fn default() -> Self {
        PhysicalVerifyOptions {
            pg_bin_dir: None,
            run_as: None,
            superuser: "postgres".into(),
            amcheck: true,
            heapallindexed: false,
            timeout: Duration::from_secs(3600),
            remove: true,
        }
    }
}

/// Rows of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCount {
    /// `schema.table`, as [`crate::pg::QualifiedName`] displays it.
    pub table: String,
    pub rows: u64,
}

/// Row counts of one database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseRows {
    pub database: String,
    pub tables: Vec<TableCount>,
}

/// What the verification found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhysicalVerifyReport {
    /// From server start to the end of recovery.
    pub recovery_ms: u64,
    /// The timeline the server ended on, and its WAL position then.
    pub timeline: u32,
    pub end_lsn: Lsn,
    /// True when recovery paused at its target instead of promoting.
    pub paused: bool,
    /// `pg_amcheck`'s verdict (`None` when not run) and what it printed.
    pub amcheck_ok: Option<bool>,
    pub amcheck_output: String,
    pub databases: Vec<DatabaseRows>,
    pub total_rows: u64,
    pub duration_ms: u64,
}

impl PhysicalVerifyReport {
    /// `database -> table -> rows`, for comparisons.
    pub fn row_counts(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.databases
            .iter()
            .map(|d| {
                (
                    d.database.clone(),
                    d.tables.iter().map(|t| (t.table.clone(), t.rows)).collect(),
                )
            })
            .collect()
    }
}

/// Without a loopback port, the port number only names the socket file; the socket directory is
/// private.
const SOCKET_PORT: u16 = 5432;

/// Where recovery ended, as [`PrivateServer::wait_recovered`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryEnd {
    /// True when recovery paused at its target instead of promoting.
    pub paused: bool,
    /// The timeline the server ended on, and its WAL position then.
    pub timeline: u32,
    pub end_lsn: Lsn,
    /// The commit time of the last transaction replayed (`pg_last_xact_replay_timestamp()`):
    /// the restored data's point in time. `None` when recovery replayed no commit.
    pub last_commit: Option<chrono::DateTime<chrono::Utc>>,
    /// From the server's start to the end of recovery.
    pub recovery_ms: u64,
}

/// A private, temporary PostgreSQL on a restored data directory (see the module invariants).
/// Stopped immediately on drop; [`PrivateServer::stop`] stops it cleanly.
pub struct PrivateServer {
    dir: PathBuf,
    pg_ctl: PathBuf,
    major: u32,
    user: Option<String>,
    sock: tempfile::TempDir,
    port: u16,
    tcp: bool,
    started: Instant,
    running: bool,
}

impl PrivateServer {
    fn log_path(&self) -> PathBuf {
        self.sock.path().join("postgres.log")
    }

    /// The last 30 lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A libpq conninfo reaching the server through its private socket (trust).
    pub fn conninfo(&self, user: &str, db: &str) -> String {
        format!(
            "host={} port={} user={user} dbname={db}",
            self.sock.path().display(),
            self.port
        )
    }

    /// The loopback port it listens on, when it was started with one.
    pub fn tcp_port(&self) -> Option<u16> {
        self.tcp.then_some(self.port)
    }

    /// The data directory's major version.
    pub fn major(&self) -> u32 {
        self.major
    }

    fn postmaster_alive(&self) -> bool {
        let Ok(pidfile) = std::fs::read_to_string(self.dir.join("postmaster.pid")) else {
            return false;
        };
        pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    }

    /// Stops the server (`pg_ctl stop -m fast`), if it runs.
    pub fn stop(&mut self) {
        self.stop_blocking("fast");
    }

    fn stop_blocking(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        self.running = false;
        let mut cmd = match &self.user {
            Some(u) => {
                let c = os::command_as(Some(u), &self.pg_ctl);
                c.into_std()
            }
            None => {
                let mut c = std::process::Command::new(&self.pg_ctl);
                crate::child_env::scrub_server_std(&mut c);
                c
            }
        };
        let _ = cmd
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", mode, "-w", "-t", "120", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }

    /// Starts a private server on the restored directory `dir` (it begins recovery from the
    /// settings the restore wrote). `tcp_port`: also listen on 127.0.0.1 at that port, with the
    /// cluster's own passwords. Returns once `pg_ctl start` has launched it (not recovered).
    pub async fn start(
        dir: &Path,
        opts: &PhysicalVerifyOptions,
        tcp_port: Option<u16>,
    ) -> Result<PrivateServer, PhysicalError> {
        let started = Instant::now();
        let version = tokio::fs::read_to_string(dir.join("PG_VERSION"))
            .await
            .map_err(|_| {
                server_err(
                    "start",
                    dir,
                    "it is not a PostgreSQL data directory (no PG_VERSION); restore a base backup into it first",
                )
            })?;
        let major: u32 = version.trim().parse().unwrap_or(0);
        let pg_ctl = tools::locate("pg_ctl", opts.pg_bin_dir.as_deref(), major).await?;
        let user = if os::is_root() {
            Some(opts.run_as.clone().unwrap_or_else(|| "postgres".into()))
        } else {
            None
        };

        let sock = tempfile::Builder::new()
            .prefix("backstop-verify-")
            .tempdir()
            .map_err(|e| PhysicalError::io("creating the socket directory", e))?;
        let hba = sock.path().join("pg_hba.conf");
        let mut hba_text = String::from("local all all trust\n");
        if tcp_port.is_some() {
            // md5 also accepts SCRAM-stored passwords: whatever the cluster's roles have.
            hba_text.push_str("host all all 127.0.0.1/32 md5\n");
        }
        std::fs::write(&hba, hba_text)
            .map_err(|e| PhysicalError::io("writing the verification pg_hba.conf", e))?;
        if let Some(u) = &user {
            let (uid, gid) = os::user_ids(u)
                .await
                .map_err(|why| server_err("start", dir, why))?;
            os::chown_tree(sock.path(), uid, gid).map_err(|e| {
                PhysicalError::io("giving the socket directory to the server user", e)
            })?;
            os::chown_tree(dir, uid, gid)
                .map_err(|e| PhysicalError::io(format!("giving {} to {u}", dir.display()), e))?;
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| PhysicalError::io(format!("chmod 0700 {}", dir.display()), e))?;
        let _ = std::fs::remove_file(dir.join(RECOVERY_FAILED_MARKER));
        let _ = std::fs::remove_file(dir.join(RECOVERY_WARNINGS));

        let mut server = PrivateServer {
            dir: dir.to_path_buf(),
            pg_ctl: pg_ctl.path.clone(),
            major,
            user: user.clone(),
            sock,
            port: tcp_port.unwrap_or(SOCKET_PORT),
            tcp: tcp_port.is_some(),
            started,
            running: false,
        };
        let sockdir = server.sock.path().display().to_string();
        let listen = if server.tcp { "127.0.0.1" } else { "" };
        let options = format!(
            "-c listen_addresses='{listen}' -c unix_socket_directories='{sockdir}' -c port={} \
             -c hba_file='{}' -c archive_mode=off -c primary_conninfo='' \
             -c synchronous_standby_names='' -c logging_collector=off -c cluster_name=backstop-verify \
             -c shared_preload_libraries='' -c session_preload_libraries='' \
             -c local_preload_libraries='' -c archive_command=''",
            server.port,
            hba.display()
        );
        let mut start = os::command_as(user.as_deref(), &pg_ctl.path);
        start
            .arg("-D")
            .arg(dir)
            .arg("-l")
            .arg(server.log_path())
            .args(["-W", "-o", &options, "start"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let out = start
            .output()
            .await
            .map_err(|e| server_err("start", dir, e.to_string()))?;
        server.running = true;
        if !out.status.success() {
            return Err(server_err(
                "start",
                dir,
                format!(
                    "pg_ctl failed: {}\n{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    server.log_tail()
                ),
            ));
        }
        Ok(server)
    }

    /// Waits for recovery to end: promoted (not in recovery) or paused at the target. A server
    /// that stops during recovery ends the wait with `wal-fetch`'s failure marker and the log's
    /// tail; so does `timeout`.
    pub async fn wait_recovered(
        &mut self,
        superuser: &str,
        timeout: Duration,
    ) -> Result<RecoveryEnd, PhysicalError> {
        let dir = self.dir.clone();
        let ci = ConnInfo::parse(&self.conninfo(superuser, "postgres"))?;
        let deadline = Instant::now() + timeout;
        let mut seen_pid = false;
        loop {
            if Instant::now() > deadline {
                return Err(PhysicalError::Recovery {
                    dir,
                    why: format!("recovery did not finish within {timeout:?}"),
                    log: self.log_tail(),
                });
            }
            let alive = self.postmaster_alive();
            seen_pid |= alive;
            if !alive && (seen_pid || self.started.elapsed() > Duration::from_secs(30)) {
                self.running = false;
                let mut marker = std::fs::read_to_string(dir.join(RECOVERY_FAILED_MARKER))
                    .map(|m| m.trim().to_string())
                    .unwrap_or_default();
                if let Ok(w) = std::fs::read_to_string(dir.join(RECOVERY_WARNINGS)) {
                    if !marker.is_empty() {
                        marker.push('\n');
                    }
                    marker.push_str(w.trim());
                }
                let why = if marker.is_empty() {
                    "the server stopped during recovery".to_string()
                } else {
                    format!("the server stopped during recovery: {marker}")
                };
                return Err(PhysicalError::Recovery {
                    dir,
                    why,
                    log: self.log_tail(),
                });
            }
            if let Ok(mut conn) = ci.connect().await {
                let state: Result<(bool, String), _> = sqlx::query_as(
                    "SELECT pg_is_in_recovery(), \
                     CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() ELSE '' END",
                )
                .fetch_one(&mut conn)
                .await;
                if let Ok((in_recovery, pause)) = state
                    && (!in_recovery || pause == "paused")
                {
                    let (file, lsn, last_commit): (
                        String,
                        String,
                        Option<chrono::DateTime<chrono::Utc>>,
                    ) = sqlx::query_as(
                        "SELECT pg_walfile_name(l), l::text, pg_last_xact_replay_timestamp() \
                         FROM (SELECT CASE WHEN pg_is_in_recovery() \
                         THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END AS l) s",
                    )
                    .fetch_one(&mut conn)
                    .await
                    .map_err(|e| SourceError::query("reading the end of recovery", &ci, e))?;
                    let _ = conn.close().await;
                    let timeline =
                        u32::from_str_radix(file.get(..8).unwrap_or("1"), 16).unwrap_or(1);
                    return Ok(RecoveryEnd {
                        paused: in_recovery,
                        timeline,
                        end_lsn: lsn.parse().unwrap_or_default(),
                        last_commit,
                        recovery_ms: self.started.elapsed().as_millis() as u64,
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every table's rows in every database that allows connections.
    pub async fn count_rows(&self, superuser: &str) -> Result<Vec<DatabaseRows>, PhysicalError> {
        let ci = ConnInfo::parse(&self.conninfo(superuser, "postgres"))?;
        let mut conn = ci.connect().await?;
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
        )
        .fetch_all(&mut conn)
        .await
        .map_err(|e| SourceError::query("listing databases", &ci, e))?;
        let _ = conn.close().await;
        let mut databases = Vec::new();
        for db in names {
            let counts = row_counts(&self.conninfo(superuser, &db)).await?;
            databases.push(DatabaseRows {
                database: db,
                tables: counts
                    .into_iter()
                    .map(|(t, rows)| TableCount {
                        table: t.to_string(),
                        rows,
                    })
                    .collect(),
            });
        }
        Ok(databases)
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.stop_blocking("immediate");
    }
}

fn server_err(doing: &str, dir: &Path, why: impl Into<String>) -> PhysicalError {
    PhysicalError::Server {
        doing: doing.into(),
        dir: dir.to_path_buf(),
        why: why.into(),
    }
}

/// Starts a private server on the restored directory `dir`, waits for recovery to finish,
/// checks it with `pg_amcheck`, counts rows, stops it and (by default) removes `dir`.
pub async fn verify_restored(
    dir: &Path,
    opts: &PhysicalVerifyOptions,
) -> Result<PhysicalVerifyReport, PhysicalError> {
    let result = verify_inner(dir, opts).await;
    if opts.remove {
        let _ = tokio::fs::remove_dir_all(dir).await;
    }
    result
}

async fn verify_inner(
    dir: &Path,
    opts: &PhysicalVerifyOptions,
) -> Result<PhysicalVerifyReport, PhysicalError> {
    let clock = Instant::now();
    let mut server = PrivateServer::start(dir, opts, None).await?;
    let su = &opts.superuser;
    let end = server.wait_recovered(su, opts.timeout).await?;

    let (mut amcheck_ok, mut amcheck_output) = (None, String::new());
    if opts.amcheck && !end.paused {
        let tool = tools::locate("pg_amcheck", opts.pg_bin_dir.as_deref(), server.major).await?;
        let mut cmd = tool.command();
        cmd.stdout(std::process::Stdio::piped())
            .args(["--all", "--install-missing", "--no-password"])
            .arg(format!("--host={}", server.sock.path().display()))
            .arg(format!("--port={}", server.port))
            .arg(format!("--username={su}"));
        if opts.heapallindexed {
            cmd.arg("--heapallindexed");
        }
        let out = cmd
            .output()
            .await
            .map_err(|source| SourceError::ToolSpawn {
                tool: "pg_amcheck".into(),
                source,
            })?;
        amcheck_output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        if !out.status.success() {
            return Err(PhysicalError::Amcheck {
                output: amcheck_output,
            });
        }
        amcheck_ok = Some(true);
    }

    let databases = server.count_rows(su).await?;
    let total_rows = databases
        .iter()
        .flat_map(|d| d.tables.iter())
        .map(|t| t.rows)
        .sum();
    server.stop();
    Ok(PhysicalVerifyReport {
        recovery_ms: end.recovery_ms,
        timeline: end.timeline,
        end_lsn: end.end_lsn,
        paused: end.paused,
        amcheck_ok,
        amcheck_output,
        databases,
        total_rows,
        duration_ms: clock.elapsed().as_millis() as u64,
    })
}
