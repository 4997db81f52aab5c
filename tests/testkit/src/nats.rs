//! A single nats-server with JetStream for tests.
//!
//! Started as `nats-server -js -a 127.0.0.1 -p PORT -m MONITOR_PORT -sd <tmp>/jetstream
//! -n backstop-test`, stdout and stderr appended to `<tmp>/nats.log`. Ready means: the client
//! port sends an `INFO` line advertising `"jetstream":true`, and the monitoring port's `/healthz`
//! answers 200 (nats-server 2.9 reports JetStream health there). [`Nats::start_again`] reuses the
//! same ports and store directory, so streams and consumers survive a [`Nats::stop`] or
//! [`Nats::kill`], which is what outage tests need.
//!
//! The server stays in the test process's process group on purpose: a Ctrl-C on `cargo test`
//! then stops it too. It is a single process, so signalling its pid is enough.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::process;

/// A running nats-server with JetStream on free loopback ports. Killed on drop.
pub struct Nats {
    bin: PathBuf,
    port: u16,
    monitor_port: u16,
    store_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    /// A configuration file (`-c`) and the environment it reads, when started with one.
    config: Option<(PathBuf, Vec<(String, String)>)>,
    // Last: removed after `Drop::drop` has killed the server.
    tmp: TempDir,
}

/// Reads the INFO line the server sends on connect; true if it advertises JetStream.
fn info_has_jetstream(port: u16) -> anyhow::Result<bool> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if !line.starts_with("INFO ") {
        bail!("nats-server on {addr} sent {line:?} instead of INFO");
    }
    Ok(line.contains("\"jetstream\":true"))
}

impl Nats {
    /// Starts nats-server (on PATH, /usr/sbin or /usr/bin) with JetStream enabled.
    pub fn start() -> anyhow::Result<Nats> {
        Nats::start_inner(None)
    }

    /// Starts it with `config` as its configuration file (for example an `include` of
    /// deploy/nats/auth.conf), whose `$VARIABLES` come from `env`. Ports, JetStream and the store
    /// directory are still the kit's (command-line flags outrank the file).
    pub fn start_with_config(config: &str, env: &[(&str, &str)]) -> anyhow::Result<Nats> {
        Nats::start_inner(Some((
            config.to_string(),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )))
    }

    fn start_inner(config: Option<(String, Vec<(String, String)>)>) -> anyhow::Result<Nats> {
        let bin = crate::require_tool("nats-server")?;
        let tmp = tempfile::Builder::new()
            .prefix("backstop-nats-")
            .tempdir()
            .context("could not create a temporary directory for nats-server")?;
        let store_dir = tmp.path().join("jetstream");
        let log_path = tmp.path().join("nats.log");
        let config = match config {
            Some((text, env)) => {
                let path = tmp.path().join("nats.conf");
                std::fs::write(&path, text)
                    .with_context(|| format!("could not write {}", path.display()))?;
                Some((path, env))
            }
            None => None,
        };
        let mut nats = Nats {
            bin,
            port: 0,
            monitor_port: 0,
            store_dir,
            log_path,
            child: None,
            config,
            tmp,
        };
        let mut last = None;
        for _ in 0..5 {
            nats.port = crate::try_free_port()?;
            nats.monitor_port = crate::try_free_port()?;
            let before = std::fs::metadata(&nats.log_path)
                .map(|m| m.len())
                .unwrap_or(0);
            match nats.spawn_and_wait() {
                Ok(()) => return Ok(nats),
                Err(e) => {
                    let log = std::fs::read(&nats.log_path).unwrap_or_default();
                    let new =
                        String::from_utf8_lossy(log.get(before as usize..).unwrap_or_default());
                    if !new.contains("address already in use") {
                        return Err(e);
                    }
                    tracing::warn!(
                        port = nats.port,
                        "port taken while starting nats-server; trying others"
                    );
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("nats-server did not start")))
    }

    fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("could not open {}", self.log_path.display()))?;
        let log2 = log
            .try_clone()
            .context("could not duplicate the log file handle")?;
        let mut cmd = Command::new(&self.bin);
        if let Some((path, env)) = &self.config {
            cmd.arg("-c").arg(path);
            cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        cmd.args(["-js", "-a", "127.0.0.1", "-n", "backstop-test"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-m")
            .arg(self.monitor_port.to_string())
            .arg("-sd")
            .arg(&self.store_dir)
            .current_dir(self.tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd
            .spawn()
            .with_context(|| format!("could not run {}", self.bin.display()))?;
        self.child = Some(child);
        match self.wait_ready() {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Some(mut c) = self.child.take() {
                    process::kill(&mut c);
                }
                Err(e.context(format!(
                    "nats-server did not become ready on 127.0.0.1:{}; last lines of {}:\n{}",
                    self.port,
                    self.log_path.display(),
                    crate::log_tail(&self.log_path, 40)
                )))
            }
        }
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting for nats-server")?
            {
                bail!("nats-server exited during start-up ({status})");
            }
            let last_err = match info_has_jetstream(self.port) {
                Ok(true) => {
                    match crate::http::get(self.monitor_port, "/healthz", Duration::from_secs(5)) {
                        Ok((200, _)) => {
                            tracing::debug!(port = self.port, "nats-server ready");
                            return Ok(());
                        }
                        Ok((code, body)) => format!("/healthz answered {code}: {}", body.trim()),
                        Err(e) => format!("{e:#}"),
                    }
                }
                Ok(false) => "INFO does not advertise JetStream yet".to_string(),
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() > crate::deadline() {
                bail!(
                    "not ready after {}s (last check: {last_err})",
                    crate::deadline().as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port (`/healthz`, `/jsz`, `/varz`).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// JetStream's store directory (kept across stop/start_again).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Graceful shutdown: SIGTERM, then SIGKILL if it hasn't exited within the deadline.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::terminate(&mut c, crate::deadline());
        }
    }

    /// Abrupt death: SIGKILL (a crash or a lost machine, as far as clients can tell).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::kill(&mut c);
        }
    }

    /// Starts the server again after stop()/kill(): same ports, same store directory, so
    /// clients reconnect to the same URL and JetStream state is recovered from disk.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!(
                "nats-server on port {} is already running; stop() or kill() it first",
                self.port
            );
        }
        let start = Instant::now();
        // The old listener is gone once the process is reaped, but another process may have
        // grabbed the port meanwhile; wait a little for it rather than fail at once.
        while !crate::port_is_free(self.port) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.spawn_and_wait()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats")
            .field("url", &self.url())
            .field("store_dir", &self.store_dir)
            .field("running", &self.is_running())
            .finish()
    }
}
