//! moto's S3 server (PyPI `moto[server]`, the `moto_server` command) for tests that need what
//! Garage lacks: S3 object lock (versioned buckets, retention, compliance mode).
//!
//! Layout of the temporary directory (also the server's working directory):
//! ```text
//! <tmp>/moto.log   server stdout + stderr
//! ```
//! Start-up: `moto_server -H 127.0.0.1 -p PORT`, then poll `GET /` until it answers HTTP with
//! anything but a server error. State lives in the process's memory only: every instance starts
//! empty and forgets everything when it is killed (on drop).
//!
//! moto accepts any credentials ([`Moto::access_key`], [`Moto::secret_key`]) in the region
//! `us-east-1`; clients must use path-style addressing. Buckets are created with
//! [`Moto::create_bucket`] (object lock on or off: it cannot be turned on later in moto).
//!
//! `moto_server` is looked for where `scripts/setup` puts it (`~/.local/bin/moto_server`, a link
//! into a virtual environment), then on `PATH`. moto 5.2.5 or later is needed: older versions
//! answer CompleteMultipartUpload with a root element the Rust SDK refuses.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::process;

const REGION: &str = "us-east-1";

/// A running moto S3 server. Killed on drop.
pub struct Moto {
    port: u16,
    log_path: PathBuf,
    child: Option<Child>,
    // Last: removed after `Drop::drop` has killed the server.
    tmp: TempDir,
}

fn moto_bin() -> anyhow::Result<PathBuf> {
    // The one scripts/setup installed wins: an older moto on PATH (before 5.2.5) answers
    // CompleteMultipartUpload in a form the Rust SDK cannot parse.
    if let Some(home) = std::env::var_os("HOME") {
        let p = PathBuf::from(home).join(".local/bin/moto_server");
        if p.is_file() {
            return Ok(p);
        }
    }
    crate::require_tool("moto_server").context(
        "moto's S3 server is needed for the object-lock tests: run scripts/setup (it installs \
         PyPI's moto[server] in a virtual environment and links ~/.local/bin/moto_server)",
    )
}

impl Moto {
    /// Starts moto's server on a free loopback port, with no bucket.
    pub fn start() -> anyhow::Result<Moto> {
        let bin = moto_bin()?;
        let tmp = tempfile::Builder::new()
            .prefix("backstop-moto-")
            .tempdir()
            .context("could not create a temporary directory for moto")?;
        let mut m = Moto {
            port: 0,
            log_path: tmp.path().join("moto.log"),
            child: None,
            tmp,
        };
        let mut last = None;
        for _ in 0..5 {
            m.port = crate::try_free_port()?;
            let before = std::fs::metadata(&m.log_path).map(|l| l.len()).unwrap_or(0);
            m.spawn(&bin)?;
            let Err(e) = m.wait_ready() else {
                return Ok(m);
            };
            if let Some(mut c) = m.child.take() {
                process::kill(&mut c);
            }
            let log = std::fs::read(&m.log_path).unwrap_or_default();
            let new = String::from_utf8_lossy(log.get(before as usize..).unwrap_or_default())
                .into_owned();
            let e = e.context(format!(
                "moto_server on 127.0.0.1:{} did not start; last lines of {}:\n{}",
                m.port,
                m.log_path.display(),
                crate::log_tail(&m.log_path, 40)
            ));
            if !new.contains("Address already in use") {
                return Err(e);
            }
            tracing::warn!("a port was taken while starting moto; trying another");
            last = Some(e);
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("moto did not start")))
    }

    fn spawn(&mut self, bin: &Path) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("could not open {}", self.log_path.display()))?;
        let log2 = log
            .try_clone()
            .context("could not duplicate the log file handle")?;
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .env("PYTHONUNBUFFERED", "1")
            .current_dir(self.tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .with_context(|| format!("could not run {}", bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting for moto_server")?
            {
                bail!("moto_server exited during start-up ({status})");
            }
            let last = match crate::http::get(self.port, "/", Duration::from_secs(5)) {
                Ok((code, _)) if code < 500 => return Ok(()),
                Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() > crate::deadline() {
                bail!(
                    "moto_server on 127.0.0.1:{} is not answering after {}s: {last}",
                    self.port,
                    crate::deadline().as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Creates a bucket; with `object_lock`, object lock is enabled on it (and so versioning).
    pub fn create_bucket(&self, name: &str, object_lock: bool) -> anyhow::Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let timeout = Duration::from_secs(10);
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("could not connect to moto at {addr}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let lock = if object_lock {
            "x-amz-bucket-object-lock-enabled: true\r\n"
        } else {
            ""
        };
        // moto checks no signature; the header only tells it which service is asked.
        write!(
            stream,
            "PUT /{name} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{lock}Authorization: \
             AWS4-HMAC-SHA256 Credential={key}/20260101/{REGION}/s3/aws4_request, \
             SignedHeaders=host, Signature=00\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            port = self.port,
            key = self.access_key(),
        )?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .with_context(|| format!("reading moto's answer to creating bucket {name}"))?;
        let text = String::from_utf8_lossy(&raw);
        let status = text.lines().next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("200") {
            bail!("moto refused to create bucket {name:?}: {text}");
        }
        Ok(())
    }

    /// `http://127.0.0.1:PORT` (use path-style addressing).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `us-east-1`.
    pub fn region(&self) -> &str {
        REGION
    }

    /// Any key works with moto; this one is `testing`.
    pub fn access_key(&self) -> &str {
        "testing"
    }

    pub fn secret_key(&self) -> &str {
        "testing"
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::kill(&mut c);
        }
    }
}
