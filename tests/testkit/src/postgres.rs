//! A throwaway PostgreSQL 15 cluster for tests.
//!
//! Layout of the temporary directory (owned by the server user when running as root):
//! ```text
//! <tmp>/data/          the cluster (initdb -U postgres -A trust --no-sync -E UTF8 --locale=C)
//! <tmp>/sock/          unix socket directory (-k), so clusters never share /var/run/postgresql
//! <tmp>/postgres.log   server log (pg_ctl -l)
//! <tmp>/wal_archive/   WAL archive, only with PostgresOptions::archive_wal()
//! ```
//! The server listens on 127.0.0.1 only; port, socket directory and listen address are passed on
//! the postgres command line (`pg_ctl -o`), which outranks postgresql.conf and
//! postgresql.auto.conf, so a restored data directory can't make it listen elsewhere. The
//! superuser is `postgres` with trust authentication (local and 127.0.0.1, replication included).
//! Speed settings: `fsync = off`, `synchronous_commit = off` (both on with
//! [`PostgresOptions::durable`]); `full_page_writes` stays on because online base backups need it.
//! With [`PostgresOptions::in_dir`] the temporary directory is made under the given parent instead
//! of the system's temporary directory.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::process;
use crate::user::{self, ServerUser};

/// Name of the superuser every test cluster has (trust authentication).
const SUPERUSER: &str = "postgres";

/// Extra settings for [`Postgres::start_with`] and [`Postgres::from_data_dir`].
#[derive(Clone, Debug, Default)]
pub struct PostgresOptions {
    /// Lines appended to postgresql.conf before the first start (later lines win).
    pub extra_conf: Vec<String>,
    /// Archive WAL into [`Postgres::wal_archive_dir`] (`archive_mode = on`).
    pub archive_wal: bool,
    /// Where the cluster's temporary directory is created (default: the system's temporary
    /// directory). Benchmarks put big clusters beside their working files; the server user must
    /// be able to traverse it.
    pub parent_dir: Option<PathBuf>,
}

impl PostgresOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one postgresql.conf line, e.g. `"archive_command = '/bin/true'"`.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.extra_conf.push(line.into());
        self
    }

    /// Turns on WAL archiving into a directory of the cluster's own (see
    /// [`Postgres::wal_archive_dir`]): `archive_mode = on` and an `archive_command` that copies
    /// each segment there and refuses to overwrite one.
    pub fn archive_wal(mut self) -> Self {
        self.archive_wal = true;
        self
    }

    /// A durable server, as a production restore target is: `fsync = on` and
    /// `synchronous_commit = on` instead of the kit's speed settings.
    pub fn durable(self) -> Self {
        self.conf("fsync = on").conf("synchronous_commit = on")
    }

    /// `autovacuum = off`: nothing runs in the background, so the server's CPU time is all spent
    /// on behalf of its clients (what benchmarks charge to the tool they measure).
    pub fn autovacuum_off(self) -> Self {
        self.conf("autovacuum = off")
    }

    /// Creates the cluster's temporary directory under `parent` (see [`Self::parent_dir`]).
    pub fn in_dir(mut self, parent: impl Into<PathBuf>) -> Self {
        self.parent_dir = Some(parent.into());
        self
    }
}

/// A running PostgreSQL 15 server on a free loopback port. Stopped (`pg_ctl stop -m immediate`)
/// and its temporary directory removed on drop.
pub struct Postgres {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    sock_dir: PathBuf,
    log_path: PathBuf,
    wal_archive: Option<PathBuf>,
    user: Option<ServerUser>,
    running: bool,
    /// Limit for one psql run (default: five times the kit's deadline).
    command_timeout: Option<Duration>,
    // Last: dropped after `Drop::drop` has stopped the server.
    tmp: TempDir,
}

/// Where the PostgreSQL 15 server binaries are: `$BACKSTOP_PG_BIN`, else
/// /usr/lib/postgresql/15/bin, else the directory of `pg_ctl` on PATH (symlinks resolved).
fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BACKSTOP_PG_BIN") {
        let dir = PathBuf::from(dir);
        if dir.join("pg_ctl").is_file() {
            return Ok(dir);
        }
        bail!(
            "BACKSTOP_PG_BIN={} has no pg_ctl; point it at PostgreSQL 15's bin directory",
            dir.display()
        );
    }
    let debian = PathBuf::from("/usr/lib/postgresql/15/bin");
    if debian.join("pg_ctl").is_file() && debian.join("initdb").is_file() {
        return Ok(debian);
    }
    let pg_ctl = crate::require_tool("pg_ctl")?;
    let real = std::fs::canonicalize(&pg_ctl).unwrap_or(pg_ctl);
    match real.parent() {
        Some(dir) if dir.join("initdb").is_file() && dir.join("postgres").is_file() => {
            Ok(dir.to_path_buf())
        }
        _ => bail!(
            "found {} but no initdb/postgres beside it: {}",
            real.display(),
            crate::install_hint("postgres")
        ),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// True if the log text says the port was taken (another process got it first).
fn port_taken(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("could not bind")
}

impl Postgres {
    /// initdb + start with the default settings (see the module docs).
    pub fn start() -> anyhow::Result<Postgres> {
        Self::start_with(PostgresOptions::default())
    }

    /// initdb + start, with extra postgresql.conf lines and optional WAL archiving.
    pub fn start_with(options: PostgresOptions) -> anyhow::Result<Postgres> {
        let bin_dir = pg_bin_dir()?;
        let user = user::current()?;
        let tmp = match &options.parent_dir {
            Some(parent) => user::server_tempdir_in(parent)?,
            None => user::server_tempdir()?,
        };
        let data_dir = tmp.path().join("data");
        let mut pg = Self::new_in(tmp, data_dir, bin_dir, user)?;

        let mut initdb = user::server_command(&pg.user, &pg.bin("initdb"));
        initdb
            .current_dir(pg.tmp.path())
            .arg("-D")
            .arg(&pg.data_dir)
            .args([
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg("--no-instructions");
        process::run_ok(&mut initdb, crate::deadline() * 2).context("initdb failed")?;

        let mut conf = vec![
            "# added by backstop-testkit: a throwaway test cluster".to_string(),
            "fsync = off".into(),
            "synchronous_commit = off".into(),
            "wal_level = replica".into(),
            "max_wal_senders = 10".into(),
            "max_replication_slots = 10".into(),
            "archive_mode = off".into(),
            "max_connections = 100".into(),
            "log_line_prefix = '%m [%p] '".into(),
        ];
        conf.extend(pg.archive_conf(&options)?);
        conf.extend(options.extra_conf.iter().cloned());
        pg.append_conf(&conf)?;
        pg.start_on_free_port()?;
        Ok(pg)
    }

    /// Starts a server on an existing data directory, e.g. one restored from a base backup
    /// (add `recovery.signal` / `restore_command` yourself). The directory is chowned to the
    /// server user and chmod 0700; it must be reachable by that user, so create it under
    /// [`crate::server_tempdir`]. It is NOT deleted on drop (the caller owns it); the socket
    /// directory and log live in a temporary directory of this handle's own.
    /// `options.extra_conf` lines are appended to its postgresql.conf.
    pub fn from_data_dir(
        data_dir: impl Into<PathBuf>,
        options: PostgresOptions,
    ) -> anyhow::Result<Postgres> {
        let data_dir = data_dir.into();
        if !data_dir.join("PG_VERSION").is_file() {
            bail!(
                "{} is not a PostgreSQL data directory (no PG_VERSION); restore a base backup into it first",
                data_dir.display()
            );
        }
        let bin_dir = pg_bin_dir()?;
        let user = user::current()?;
        let tmp = user::server_tempdir()?;
        user::give_to_server_user(&data_dir)?;
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("could not chmod 0700 {}", data_dir.display()))?;
        // A copied data directory may carry a stale pid file from a crashed source; it is not ours.
        let _ = std::fs::remove_file(data_dir.join("postmaster.pid"));
        let mut pg = Self::new_in(tmp, data_dir, bin_dir, user)?;
        let mut conf = pg.archive_conf(&options)?;
        conf.extend(options.extra_conf.iter().cloned());
        if !conf.is_empty() {
            pg.append_conf(&conf)?;
        }
        pg.start_on_free_port()?;
        Ok(pg)
    }

    fn new_in(
        tmp: TempDir,
        data_dir: PathBuf,
        bin_dir: PathBuf,
        user: Option<ServerUser>,
    ) -> anyhow::Result<Self> {
        let sock_dir = tmp.path().join("sock");
        std::fs::create_dir(&sock_dir)
            .with_context(|| format!("could not create {}", sock_dir.display()))?;
        user::give_to_server_user(&sock_dir)?;
        let log_path = tmp.path().join("postgres.log");
        Ok(Postgres {
            data_dir,
            bin_dir,
            port: 0,
            sock_dir,
            log_path,
            wal_archive: None,
            user,
            running: false,
            command_timeout: None,
            tmp,
        })
    }

    fn archive_conf(&mut self, options: &PostgresOptions) -> anyhow::Result<Vec<String>> {
        if !options.archive_wal {
            return Ok(Vec::new());
        }
        let dir = self.tmp.path().join("wal_archive");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("could not create {}", dir.display()))?;
        user::give_to_server_user(&dir)?;
        let d = dir.display();
        self.wal_archive = Some(dir.clone());
        Ok(vec![
            "archive_mode = on".into(),
            format!("archive_command = 'test ! -f {d}/%f && cp %p {d}/%f'"),
        ])
    }

    fn append_conf(&self, lines: &[String]) -> anyhow::Result<()> {
        let path = self.data_dir.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("could not open {} to append settings", path.display()))?;
        let mut text = String::from("\n");
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        f.write_all(text.as_bytes())
            .with_context(|| format!("could not write {}", path.display()))
    }

    /// Picks a free port and starts; retries with another port if someone else took it first.
    fn start_on_free_port(&mut self) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..5 {
            self.port = crate::try_free_port()?;
            let before = std::fs::metadata(&self.log_path)
                .map(|m| m.len())
                .unwrap_or(0);
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let log = std::fs::read(&self.log_path).unwrap_or_default();
                    let new =
                        String::from_utf8_lossy(log.get(before as usize..).unwrap_or_default());
                    if !port_taken(&new) {
                        return Err(e);
                    }
                    tracing::warn!(
                        port = self.port,
                        "port taken while starting PostgreSQL; trying another"
                    );
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("PostgreSQL did not start")))
    }

    fn pg_ctl(&self) -> Command {
        let mut c = user::server_command(&self.user, &self.bin("pg_ctl"));
        c.current_dir(self.tmp.path());
        c
    }

    fn pg_ctl_start(&mut self) -> anyhow::Result<()> {
        let secs = crate::deadline().as_secs().to_string();
        let opts = format!(
            "-p {} -k '{}' -c listen_addresses=127.0.0.1",
            self.port,
            self.sock_dir.display()
        );
        let mut cmd = self.pg_ctl();
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_path)
            .args(["-w", "-t", &secs, "-o", &opts, "start"]);
        let out = process::run(&mut cmd, None, crate::deadline() + Duration::from_secs(10));
        let failed = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(o.combined()),
            Err(e) => Some(format!("{e:#}")),
        };
        if let Some(output) = failed {
            // pg_ctl may have left a half-started postmaster behind (e.g. on timeout).
            self.running = true;
            self.stop_mode("immediate");
            bail!(
                "PostgreSQL did not start on 127.0.0.1:{} (data {}): {}\n--- last lines of {} ---\n{}\n\
                 (if the data directory is not reachable by the server user, create it under \
                 backstop_testkit::server_tempdir())",
                self.port,
                self.data_dir.display(),
                output.trim(),
                self.log_path.display(),
                crate::log_tail(&self.log_path, 40)
            );
        }
        self.running = true;
        // pg_ctl -w waited for "ready"; prove it with a real query before handing it out.
        let start = Instant::now();
        loop {
            match self.psql("postgres", "SELECT 1") {
                Ok(s) if s == "1" => {
                    tracing::debug!(port = self.port, data = %self.data_dir.display(), "PostgreSQL ready");
                    return Ok(());
                }
                Ok(other) => bail!(
                    "PostgreSQL on port {} answered SELECT 1 with {other:?}",
                    self.port
                ),
                Err(e) if start.elapsed() > crate::deadline() => {
                    return Err(e.context(format!(
                        "PostgreSQL on port {} started but does not answer queries; log tail:\n{}",
                        self.port,
                        crate::log_tail(&self.log_path, 40)
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// `pg_ctl stop -m MODE`; falls back to SIGKILL of the postmaster if pg_ctl fails.
    /// Returns pg_ctl's failure, if any, after making sure the server is gone.
    fn stop_mode(&mut self, mode: &str) -> Option<String> {
        if !self.running {
            return None;
        }
        self.running = false;
        let secs = crate::deadline().as_secs().to_string();
        let mut cmd = self.pg_ctl();
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "-t", &secs, "stop"]);
        let result = process::run(&mut cmd, None, crate::deadline() + Duration::from_secs(10));
        let failure = match result {
            Ok(o) if o.status.success() => return None,
            Ok(o) => o.combined(),
            Err(e) => format!("{e:#}"),
        };
        // pg_ctl could not stop it: kill the postmaster by the pid in its pid file.
        if let Ok(pidfile) = std::fs::read_to_string(self.data_dir.join("postmaster.pid"))
            && let Some(pid) = pidfile
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u32>().ok())
        {
            process::signal(pid, libc::SIGKILL);
        }
        Some(failure)
    }

    /// Clean shutdown (`pg_ctl stop -m fast`). The data directory stays; see [`Self::start_again`].
    pub fn stop(&mut self) -> anyhow::Result<()> {
        match self.stop_mode("fast") {
            None => Ok(()),
            Some(f) => bail!("pg_ctl stop failed (server killed instead): {f}"),
        }
    }

    /// Crash-like shutdown (`pg_ctl stop -m immediate`): the next start runs crash recovery.
    pub fn stop_immediate(&mut self) -> anyhow::Result<()> {
        match self.stop_mode("immediate") {
            None => Ok(()),
            Some(f) => bail!("pg_ctl stop -m immediate failed (server killed instead): {f}"),
        }
    }

    /// Starts a stopped server again on the same port and data directory.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.running {
            bail!(
                "PostgreSQL on port {} is already running; stop() it first",
                self.port
            );
        }
        self.pg_ctl_start()
    }

    /// Clean stop then start, same port and data (e.g. after changing settings that need it).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB` (trust authentication, no password).
    pub fn conninfo(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The superuser's name (`postgres`).
    pub fn superuser(&self) -> &'static str {
        SUPERUSER
    }

    /// Runs `sql` with `psql -X -A -t -q -v ON_ERROR_STOP=1` (fed on stdin, so several statements
    /// and psql meta-commands work) against `db`; returns stdout trimmed. Rows print one per line,
    /// columns separated by `|`.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let mut cmd = self.psql_command(db);
        cmd.args(["-f", "-"]);
        let out = process::run(&mut cmd, Some(sql.as_bytes()), self.command_timeout())?;
        if !out.status.success() {
            bail!(
                "psql on database {db:?} (port {}) failed ({}): {}\nSQL: {}",
                self.port,
                out.status,
                out.stderr.trim(),
                sql.chars().take(2000).collect::<String>()
            );
        }
        Ok(out.stdout.trim().to_string())
    }

    /// Runs the SQL file at `path` against `db`, with psql variables (`-v NAME=VALUE`).
    pub fn psql_file(
        &self,
        db: &str,
        path: &Path,
        vars: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let mut cmd = self.psql_command(db);
        for (k, v) in vars {
            cmd.arg("-v").arg(format!("{k}={v}"));
        }
        cmd.arg("-f").arg(path);
        let out = process::run(&mut cmd, None, self.command_timeout())?;
        if !out.status.success() {
            bail!(
                "psql -f {} on database {db:?} (port {}) failed ({}): {}",
                path.display(),
                self.port,
                out.status,
                out.stderr.trim()
            );
        }
        Ok(out.stdout.trim().to_string())
    }

    fn command_timeout(&self) -> Duration {
        self.command_timeout.unwrap_or(crate::deadline() * 5)
    }

    /// Raises (or lowers) the limit on one [`Self::psql`] or [`Self::psql_file`] run, e.g. for
    /// a benchmark loading millions of rows. Default: five times the kit's deadline.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = Some(timeout);
    }

    /// A PostgreSQL client program of the server's version (`pg_dump`, `pg_restore`, `pgbench`,
    /// `psql`, ...) aimed at this server: `-h 127.0.0.1 -p PORT -U postgres`, run as the caller
    /// (trust authentication over TCP). Add the database and the program's own arguments.
    pub fn client(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin(program));
        cmd.args(["-h", "127.0.0.1"])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER])
            .env_remove("PGOPTIONS")
            .env_remove("PGSERVICE");
        cmd
    }

    /// The postmaster's process id, from `postmaster.pid` (for reading its CPU account in
    /// /proc: the postmaster reaps every backend, so its children's times are theirs).
    pub fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let path = self.data_dir.join("postmaster.pid");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}; is the server running?", path.display()))?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("{} does not start with a process id", path.display()))
    }

    fn psql_command(&self, db: &str) -> Command {
        let psql = self.bin("psql");
        let psql = if psql.is_file() {
            psql
        } else {
            PathBuf::from("psql")
        };
        let mut cmd = Command::new(psql);
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .args(["-U", SUPERUSER, "-d", db])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGOPTIONS")
        .env_remove("PGSERVICE");
        cmd
    }

    /// A role for test restores, as Backstop's docs tell operators to make one: it may log in
    /// and create databases, and is not a superuser. Returns its maintenance-database URL
    /// (trust authentication, no password). Creating it twice is harmless.
    pub fn scratch_role(&self) -> anyhow::Result<String> {
        self.psql(
            "postgres",
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'backstop_verify') \
             THEN CREATE ROLE backstop_verify LOGIN CREATEDB; END IF; END $$",
        )?;
        Ok(format!(
            "postgres://backstop_verify@127.0.0.1:{}/postgres",
            self.port
        ))
    }

    /// `CREATE DATABASE "name"`.
    pub fn create_db(&self, name: &str) -> anyhow::Result<()> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        )
        .map(|_| ())
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding initdb, pg_ctl, postgres, psql, pg_dump, pg_basebackup, ...
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// `bin_dir().join(name)`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// The unix socket directory (`-k`).
    pub fn socket_dir(&self) -> &Path {
        &self.sock_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::log_tail(&self.log_path, lines)
    }

    /// Waits until the server has left recovery (a restored copy that replayed its archive and
    /// promoted), for up to twice the readiness deadline. The error holds the log's tail.
    pub fn wait_promoted(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        let limit = crate::deadline() * 2;
        loop {
            let state = self.psql("postgres", "SELECT pg_is_in_recovery()");
            if state.as_ref().is_ok_and(|s| s == "f") {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!(
                    "the server did not finish recovery within {limit:?} (last answer: {state:?}); log:\n{}",
                    self.log_tail(80)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The WAL archive directory, when started with [`PostgresOptions::archive_wal`].
    pub fn wal_archive_dir(&self) -> Option<&Path> {
        self.wal_archive.as_deref()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(failure) = self.stop_mode("immediate") {
            tracing::warn!(port = self.port, "stopping test PostgreSQL: {failure}");
        }
    }
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("running", &self.running)
            .finish()
    }
}
