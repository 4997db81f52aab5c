//! What the benchmarks share: finding the `backstop` binary, measuring a child process (wall
//! time, CPU seconds and peak memory from `wait4`), reading a server's CPU account in /proc, the
//! trading dataset, and small formatting helpers.
//!
//! CPU accounting: a process's own time is `utime + stime` in `/proc/PID/stat` (fields 14 and
//! 15); the time of the children it has reaped is `cutime + cstime` (16 and 17). The postmaster
//! reaps every backend, so the growth of its children's time over a step is the CPU the server
//! spent serving that step (autovacuum off keeps other work out of it).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::Duration;

use anyhow::{Context, bail};

/// The trading-platform dataset (`psql -v rows=N -f`), compiled in so the benchmarks need no
/// checkout.
pub const TRADING_SQL: &str = include_str!("../../../bench/trading.sql");
/// A trading day's change to that dataset.
pub const CHURN_SQL: &str = include_str!("../../../bench/churn.sql");

const BACKSTOP_BINARY: &str = "backstop";

/// The `backstop` binary to measure: `explicit` (`--backstop` / `BACKSTOP_BIN`) if given, else
/// the one beside this executable, else the first on PATH.
pub fn backstop_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if is_executable(path) {
            return Ok(path.to_path_buf());
        }
        bail!(
            "--backstop / BACKSTOP_BIN names {}, which is not an executable file; point it at a \
             built `backstop` (cargo build --release -p backstop)",
            path.display()
        );
    }
    let exe = std::env::current_exe().context("cannot find this executable's path")?;
    let beside = exe.parent().map(|d| d.join(BACKSTOP_BINARY));
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(BACKSTOP_BINARY));
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| is_executable(p))
        .with_context(|| {
            format!(
                "this benchmark runs the `backstop` binary, which is neither beside {} nor on \
                 PATH: build it with `cargo build --release -p backstop`, or name one with \
                 --backstop PATH",
                exe.display()
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// What `wait4` says of a finished child.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub status: ExitStatus,
    /// Peak resident set size in bytes: the larger of the child's own and that of any child it
    /// reaped.
    pub peak_bytes: u64,
    /// User + system CPU seconds of the child and of the children it reaped.
    pub cpu_secs: f64,
}

/// Waits for `child` with `wait4` (std must not have waited for it).
pub fn wait_rusage(child: &mut Child) -> anyhow::Result<Usage> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; `pid` is our own unreaped child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("waiting for a benchmarked process");
        }
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Usage {
        status: ExitStatus::from_raw(status),
        // ru_maxrss is in KiB on Linux.
        peak_bytes: (usage.ru_maxrss.max(0) as u64) * 1024,
        cpu_secs: secs(usage.ru_utime) + secs(usage.ru_stime),
    })
}

/// CPU seconds of process `pid` (all its threads) from /proc; with those of its reaped children
/// when `children`.
pub fn proc_cpu_secs(pid: u32, children: bool) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    Ok(stat_cpu_ticks(&stat, children)? as f64 / clock_ticks_per_sec())
}

/// Clock ticks of a `/proc/PID/stat` line: utime + stime, plus cutime + cstime when `children`.
fn stat_cpu_ticks(stat: &str, children: bool) -> anyhow::Result<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields are counted after its
    // last closing parenthesis, where field 3 (state) comes first.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let wanted = if children { 11..15 } else { 11..13 };
    let ticks = fields
        .get(wanted)
        .context("unexpected /proc/PID/stat layout")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    Ok(ticks)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// CPU seconds the server has spent on its finished backends so far (the postmaster's reaped
/// children).
pub fn server_cpu(pg: &backstop_testkit::Postgres) -> anyhow::Result<f64> {
    proc_cpu_secs(pg.postmaster_pid()?, true)
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg prints them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `1536` -> `1.5 KiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Apparent size of every file under `path` (a file counts itself).
pub fn dir_bytes(path: &Path) -> anyhow::Result<u64> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        total += dir_bytes(&entry?.path())?;
    }
    Ok(total)
}

/// A fresh working directory `PREFIX*` under `parent` (default: the system's temporary
/// directory), mode 0755 so that PostgreSQL's user reaches what the benchmark puts there.
pub fn work_dir(parent: Option<&Path>, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let parent = parent
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let work = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a working directory in {}", parent.display()))?;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", work.path().display()))?;
    Ok(work)
}

/// Connects to NATS, retrying the first connection a few times so that a server still starting
/// does not fail the benchmark; an unreachable server gets a clear error.
pub async fn connect_nats(url: &str) -> anyhow::Result<async_nats::Client> {
    let mut last = None;
    for attempt in 0..3u64 {
        match async_nats::ConnectOptions::new()
            .name("backstop-bench")
            .connection_timeout(Duration::from_secs(3))
            .connect(url)
            .await
        {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(anyhow::Error::from(e)),
        }
        tokio::time::sleep(Duration::from_millis(300 * (attempt + 1))).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no connection attempt was made")))
        .with_context(|| format!("cannot reach NATS at {url}: is nats-server running with -js?"))
}

/// Kills a background process when dropped (a load generator on an error path).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // pid (comm with ") x") state ppid ... utime=14 stime=15 cutime=16 cstime=17.
        let stat = "42 (post) x) S 1 2 3 4 5 6 7 8 9 10 100 20 3 4 20 0 1 0";
        assert_eq!(stat_cpu_ticks(stat, false).expect("own"), 120);
        assert_eq!(stat_cpu_ticks(stat, true).expect("with children"), 127);
        assert!(stat_cpu_ticks("42 (short) S 1", false).is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(5 << 30), "5.0 GiB");
    }

    #[test]
    fn an_explicit_backstop_that_is_not_executable_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("backstop");
        let err = backstop_binary(Some(&missing)).expect_err("missing binary");
        let msg = format!("{err:#}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("cargo build --release -p backstop"), "{msg}");
    }
}
