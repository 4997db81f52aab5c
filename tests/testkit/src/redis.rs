//! A throwaway Redis 7 (`redis-server` from Debian's package) on a free loopback port, in a
//! temporary directory, with no persistence of its own; killed when dropped.
//!
//! Started with `repl-diskless-sync-delay 0` (a snapshot over the replication protocol starts at
//! once instead of after the default 5 s wait for more replicas) and `enable-debug-command yes`
//! (tests compare whole datasets with `DEBUG DIGEST`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process;

pub struct Redis {
    port: u16,
    child: Option<Child>,
    tmp: tempfile::TempDir,
}

impl Redis {
    /// A new empty server.
    pub fn start() -> anyhow::Result<Redis> {
        Redis::start_with(None, &[])
    }

    /// A server that loads `rdb` (a `dump.rdb`) at start, with `extra` arguments.
    pub fn start_with(rdb: Option<&Path>, extra: &[&str]) -> anyhow::Result<Redis> {
        let bin = crate::require_tool("redis-server")?;
        let tmp = tempfile::Builder::new()
            .prefix("backstop-redis-")
            .tempdir()
            .context("could not create a temporary directory for redis-server")?;
        if let Some(rdb) = rdb {
            std::fs::copy(rdb, tmp.path().join("dump.rdb"))
                .with_context(|| format!("could not copy {}", rdb.display()))?;
        }
        let port = crate::try_free_port()?;
        let log = tmp.path().join("redis.log");
        let child = Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(tmp.path())
            .args([
                "--dbfilename",
                "dump.rdb",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args([
                "--repl-diskless-sync-delay",
                "0",
                "--enable-debug-command",
                "yes",
            ])
            .arg("--logfile")
            .arg(&log)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("could not run {}", bin.display()))?;
        let mut r = Redis {
            port,
            child: Some(child),
            tmp,
        };
        let start = Instant::now();
        loop {
            if let Some(c) = r.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "redis-server exited during start-up ({status}):\n{}",
                    crate::log_tail(&log, 30)
                );
            }
            if let Ok(reply) = r.command(&["PING"])
                && reply.starts_with("+PONG")
            {
                return Ok(r);
            }
            if start.elapsed() > crate::deadline() {
                bail!(
                    "redis-server not ready on 127.0.0.1:{port}:\n{}",
                    crate::log_tail(&log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.tmp.path().join("redis.log")
    }

    /// One command, its raw RESP reply's first line(s) as text (enough for simple replies).
    pub fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(out.as_bytes())?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Runs `redis-cli -p PORT args...` and returns its standard output.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let bin = crate::require_tool("redis-cli")?;
        let mut cmd = Command::new(bin);
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args);
        let out = process::run(&mut cmd, None, Duration::from_secs(120))?;
        if !out.status.success() {
            bail!("redis-cli {args:?} failed: {}", out.combined());
        }
        Ok(out.stdout)
    }

    /// Feeds `protocol` (RESP commands) to `redis-cli --pipe`: a fast bulk load.
    pub fn pipe(&self, protocol: &[u8]) -> anyhow::Result<String> {
        let bin = crate::require_tool("redis-cli")?;
        let mut cmd = Command::new(bin);
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--pipe"]);
        let out = process::run(&mut cmd, Some(protocol), Duration::from_secs(120))?;
        if !out.status.success() || !out.stdout.contains("errors: 0") {
            bail!("redis-cli --pipe failed: {}", out.combined());
        }
        Ok(out.stdout)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::kill(&mut c);
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
