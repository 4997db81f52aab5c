//! Running helper commands with a time limit, and signalling server processes.
//!
//! Every command the kit runs (initdb, pg_ctl, psql, the garage CLI) goes through [`run`], which
//! never waits forever: a command still running at its deadline is killed and reported with
//! whatever it printed so far.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// What a finished command printed.
pub(crate) struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// stdout and stderr, for error messages.
    pub fn combined(&self) -> String {
        let mut s = String::new();
        if !self.stdout.trim().is_empty() {
            s.push_str(self.stdout.trim_end());
        }
        if !self.stderr.trim().is_empty() {
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(self.stderr.trim_end());
        }
        s
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            // A read error only truncates what we show; the exit status still decides success.
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs `cmd` to completion (feeding it `stdin` if given), killing it after `timeout`.
/// Returns its output whatever the exit status; callers decide what failure means.
pub(crate) fn run(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<Output> {
    let what = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{what}`"))?;
    // Feed stdin and read both pipes on their own threads so a chatty command can't deadlock us.
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(thread::spawn(move || {
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_until(&mut child, timeout)?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "`{what}` did not finish within {}s and was killed; it printed:\n{}{}",
            timeout.as_secs(),
            stdout,
            stderr
        ),
    }
}

/// Runs `cmd` and fails unless it exits 0; the error carries its output.
pub(crate) fn run_ok(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let what = describe(cmd);
    let out = run(cmd, None, timeout)?;
    if !out.status.success() {
        bail!("`{what}` failed ({}):\n{}", out.status, out.combined());
    }
    Ok(out)
}

/// Waits for `child` to exit for at most `timeout`; kills it (SIGKILL) and returns `None` if it
/// doesn't.
pub(crate) fn wait_until(
    child: &mut Child,
    timeout: Duration,
) -> anyhow::Result<Option<ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(Some(status));
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to process `pid`. Errors (the process is already gone) are ignored: the caller
/// only wants it dead.
pub(crate) fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; a positive pid targets one process.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Stops a server child: `SIGTERM` and a wait of up to `grace`, then `SIGKILL`. Always reaps it.
pub(crate) fn terminate(child: &mut Child, grace: Duration) {
    signal(child.id(), libc::SIGTERM);
    match wait_until(child, grace) {
        Ok(Some(_)) => {}
        _ => {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Kills a server child with SIGKILL and reaps it.
pub(crate) fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
