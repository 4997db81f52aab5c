//! A single-node Garage (S3-compatible object store) for tests, set up the way Garage's
//! single-node quick start describes (the steps are in `start` below).
//!
//! Layout of the temporary directory:
//! ```text
//! <tmp>/garage.toml   fresh per instance: free ports, random rpc_secret and admin_token (mode 0600)
//! <tmp>/meta/         metadata_dir (sqlite)
//! <tmp>/data/         data_dir
//! <tmp>/garage.log    server stdout + stderr
//! ```
//! Start-up: `garage server`, poll `garage status` until it answers, assign the node a 1G zone
//! `dc1` layout and apply it, import a random access key (`GK` + 24 hex, secret 64 hex), create the
//! bucket and give the key read, write and owner rights on it, then wait until the S3 port answers
//! HTTP. The S3 region is `garage`; clients must use path-style addressing.
//!
//! [`GarageOptions`] may name the bucket, turn off Garage's zstd pass over stored blocks
//! (`compression_level = "none"`, as a store of encrypted, incompressible backups is configured)
//! and put the temporary directory under a given parent.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::RngCore;
use tempfile::TempDir;

use crate::process;

/// The S3 region every test Garage uses (`s3_region` in garage.toml).
const REGION: &str = "garage";

/// Settings for [`Garage::start_with`].
#[derive(Clone, Debug)]
pub struct GarageOptions {
    /// The bucket created at start (default `backups`).
    pub bucket: String,
    /// Store blocks uncompressed (`compression_level = "none"`; Garage's default is zstd level 1).
    pub uncompressed: bool,
    /// Where the temporary directory is created (default: the system's temporary directory).
    pub parent_dir: Option<PathBuf>,
}

impl Default for GarageOptions {
    fn default() -> Self {
        GarageOptions {
            bucket: "backups".into(),
            uncompressed: false,
            parent_dir: None,
        }
    }
}

impl GarageOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the bucket created at start.
    pub fn bucket(mut self, name: impl Into<String>) -> Self {
        self.bucket = name.into();
        self
    }

    /// `compression_level = "none"`: Garage's zstd pass over sealed, incompressible objects
    /// only spends CPU (which a benchmark would otherwise charge to the machine it measures on).
    pub fn uncompressed(mut self) -> Self {
        self.uncompressed = true;
        self
    }

    /// Creates the temporary directory under `parent`.
    pub fn in_dir(mut self, parent: impl Into<PathBuf>) -> Self {
        self.parent_dir = Some(parent.into());
        self
    }
}

/// A running single-node Garage with one access key and one bucket. Killed on drop.
pub struct Garage {
    bin: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    s3_port: u16,
    rpc_port: u16,
    admin_port: u16,
    admin_token: String,
    access_key: String,
    secret_key: String,
    bucket: String,
    uncompressed: bool,
    child: Option<Child>,
    // Last: removed after `Drop::drop` has killed the server.
    tmp: TempDir,
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn garage_bin() -> anyhow::Result<PathBuf> {
    crate::require_tool("garage").context(
        "Garage is needed for S3 tests: `cargo install garage --locked` (about 11 minutes; puts it \
         in ~/.cargo/bin), or run scripts/setup",
    )
}

impl Garage {
    /// Starts Garage with a bucket named `backups`.
    pub fn start() -> anyhow::Result<Garage> {
        Self::start_with_bucket("backups")
    }

    /// Starts Garage with a bucket named `bucket`.
    pub fn start_with_bucket(bucket: &str) -> anyhow::Result<Garage> {
        Self::start_with(GarageOptions::new().bucket(bucket))
    }

    /// Starts Garage with the given options.
    pub fn start_with(options: GarageOptions) -> anyhow::Result<Garage> {
        let bucket = options.bucket.as_str();
        let bin = garage_bin()?;
        let mut builder = tempfile::Builder::new();
        builder.prefix("backstop-garage-");
        let tmp = match &options.parent_dir {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .context("could not create a temporary directory for Garage")?;
        let mut g = Garage {
            bin,
            config_path: tmp.path().join("garage.toml"),
            log_path: tmp.path().join("garage.log"),
            s3_port: 0,
            rpc_port: 0,
            admin_port: 0,
            admin_token: random_hex(32),
            access_key: format!("GK{}", random_hex(12)),
            secret_key: random_hex(32),
            bucket: bucket.to_string(),
            uncompressed: options.uncompressed,
            child: None,
            tmp,
        };
        let mut last = None;
        for _ in 0..5 {
            g.s3_port = crate::try_free_port()?;
            g.rpc_port = crate::try_free_port()?;
            g.admin_port = crate::try_free_port()?;
            g.write_config()?;
            let before = std::fs::metadata(&g.log_path).map(|m| m.len()).unwrap_or(0);
            match g.spawn_and_wait() {
                Ok(()) => {
                    g.setup(bucket).map_err(|e| g.with_log(e))?;
                    return Ok(g);
                }
                Err(e) => {
                    let log = std::fs::read(&g.log_path).unwrap_or_default();
                    let new =
                        String::from_utf8_lossy(log.get(before as usize..).unwrap_or_default());
                    if !new.contains("Address already in use") && !new.contains("AddrInUse") {
                        return Err(e);
                    }
                    tracing::warn!("a port was taken while starting Garage; trying others");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("Garage did not start")))
    }

    fn with_log(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!(
            "setting up Garage (S3 on 127.0.0.1:{}) failed; last lines of {}:\n{}",
            self.s3_port,
            self.log_path.display(),
            crate::log_tail(&self.log_path, 40)
        ))
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let dir = self.tmp.path();
        let rpc = format!("127.0.0.1:{}", self.rpc_port);
        let text = format!(
            r#"# written by backstop-testkit: a throwaway single-node Garage
metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
{compression}rpc_bind_addr = "{rpc}"
rpc_public_addr = "{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{token}"
"#,
            meta = dir.join("meta").display(),
            data = dir.join("data").display(),
            secret = random_hex(32),
            s3 = self.s3_port,
            admin = self.admin_port,
            token = self.admin_token,
            compression = if self.uncompressed {
                "compression_level = \"none\"\n"
            } else {
                ""
            },
        );
        // Garage refuses a config holding secrets that others can read.
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.config_path)
            .with_context(|| format!("could not write {}", self.config_path.display()))?;
        f.write_all(text.as_bytes())
            .with_context(|| format!("could not write {}", self.config_path.display()))
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
        cmd.arg("-c")
            .arg(&self.config_path)
            .arg("server")
            .env(
                "RUST_LOG",
                std::env::var("BACKSTOP_TESTKIT_GARAGE_LOG")
                    .unwrap_or_else(|_| "garage=info".into()),
            )
            .current_dir(self.tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd
            .spawn()
            .with_context(|| format!("could not run {}", self.bin.display()))?;
        self.child = Some(child);
        if let Err(e) = self.wait_status() {
            if let Some(mut c) = self.child.take() {
                process::kill(&mut c);
            }
            return Err(self.with_log(e));
        }
        Ok(())
    }

    /// Polls `garage status` until the daemon answers over RPC.
    fn wait_status(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting for garage")?
            {
                bail!("garage server exited during start-up ({status})");
            }
            let err = match self.cli(&["status"]) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if start.elapsed() > crate::deadline() {
                return Err(err.context(format!(
                    "garage did not answer `garage status` within {}s",
                    crate::deadline().as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn setup(&self, bucket: &str) -> anyhow::Result<()> {
        let id = self.cli(&["node", "id", "-q"])?;
        let node = id.trim().split('@').next().unwrap_or_default().to_string();
        if node.is_empty() {
            bail!("`garage node id -q` printed no node id: {id:?}");
        }
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])?;
        self.cli(&["layout", "apply", "--version", "1"])?;
        self.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "backstop-test",
            &self.access_key,
            &self.secret_key,
        ])?;
        self.create_bucket(bucket)?;
        self.wait_s3()
    }

    /// Waits until the S3 port answers HTTP with anything but a server error.
    fn wait_s3(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let last = match crate::http::get(self.s3_port, "/", Duration::from_secs(5)) {
                Ok((code, _)) if code < 500 => {
                    tracing::debug!(port = self.s3_port, "Garage S3 ready");
                    return Ok(());
                }
                Ok((code, body)) => format!("HTTP {code}: {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() > crate::deadline() {
                bail!(
                    "Garage's S3 port 127.0.0.1:{} is not answering: {last}",
                    self.s3_port
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `garage -c <config> ARGS...` against this instance and returns its stdout; fails on
    /// a non-zero exit with the command's output.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&self.config_path)
            .args(args)
            .env("RUST_LOG", "warn");
        let out = process::run_ok(&mut cmd, Duration::from_secs(30))?;
        Ok(out.stdout)
    }

    /// Creates another bucket and gives this instance's key read, write and owner rights on it.
    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        self.cli(&["bucket", "create", name])?;
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            name,
            "--key",
            &self.access_key,
        ])?;
        Ok(())
    }

    /// `http://127.0.0.1:S3_PORT` (use path-style addressing).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// `garage`.
    pub fn region(&self) -> &str {
        REGION
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The bucket created at start (`backups` unless [`Self::start_with_bucket`] named another).
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn s3_port(&self) -> u16 {
        self.s3_port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// The admin API bearer token (`[admin] admin_token`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id while it runs (for reading its CPU time in /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (SIGTERM, SIGKILL after the deadline); data stays for [`Self::start_again`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::terminate(&mut c, crate::deadline());
        }
    }

    /// SIGKILL: an abrupt storage outage.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::kill(&mut c);
        }
    }

    /// Starts the server again after stop()/kill(): same ports, config, keys and data.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!(
                "Garage on port {} is already running; stop() it first",
                self.s3_port
            );
        }
        self.spawn_and_wait()?;
        self.wait_s3().map_err(|e| self.with_log(e))
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for Garage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Garage")
            .field("endpoint", &self.endpoint())
            .field("bucket", &self.bucket)
            .field("access_key", &self.access_key)
            .field("running", &self.is_running())
            .finish()
    }
}
