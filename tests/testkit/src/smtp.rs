//! A real SMTP server (PyPI's aiosmtpd) on a free loopback port, keeping every message it
//! accepts, for the notification tests.
//!
//! Layout of the temporary directory (also the server's working directory):
//! ```text
//! <tmp>/backstop_smtp_sink.py   the handler class (written by the kit)
//! <tmp>/smtp.log                server stdout + stderr
//! <tmp>/mail/<ns>-<n>.eml       one file per accepted message: `X-Envelope-From:` and
//!                               `X-Envelope-To:` lines, then the message as received
//! <tmp>/ca.pem, server.pem, server.key   with TLS only: a throwaway CA and the server's
//!                               certificate it signed (for `localhost` and 127.0.0.1)
//! ```
//! A message file is written under a temporary name and renamed, so [`Smtp::messages`] never
//! reads half of one. No authentication. [`Smtp::start`] speaks plain SMTP;
//! [`Smtp::start_tls`] STARTTLS (required before MAIL) or TLS from the first byte (SMTPS), with
//! [`Smtp::ca_file`] the CA a client must trust. Start-up: `python -m aiosmtpd -n -l
//! 127.0.0.1:PORT [--tlscert|--smtpscert ...] -c backstop_smtp_sink.Sink <dir>`, then connect
//! until the `220` greeting comes (SMTPS: until the port accepts). Killed on drop.
//!
//! The python is the one `scripts/setup` installed aiosmtpd for
//! (`~/.local/share/backstop/moto-venv/bin/python`), else `python3` on PATH if it can import it.

use std::fs::OpenOptions;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::process;

const HANDLER: &str = r#"
import os, time, itertools

_counter = itertools.count()

class Sink:
    def __init__(self, directory):
        self.directory = directory

    @classmethod
    def from_cli(cls, parser, *args):
        return cls(args[0])

    async def handle_DATA(self, server, session, envelope):
        name = "%020d-%06d.eml" % (time.time_ns(), next(_counter))
        path = os.path.join(self.directory, name)
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "replace")
        head = "X-Envelope-From: %s\r\nX-Envelope-To: %s\r\n" % (
            envelope.mail_from, ", ".join(envelope.rcpt_tos))
        with open(path + ".tmp", "wb") as f:
            f.write(head.encode() + data)
        os.rename(path + ".tmp", path)
        return "250 OK"
"#;

/// How the server secures connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpTls {
    Plain,
    /// STARTTLS offered and required before MAIL.
    Starttls,
    /// TLS from the first byte (SMTPS).
    Implicit,
}

/// A running aiosmtpd. Killed on drop.
pub struct Smtp {
    port: u16,
    tls: SmtpTls,
    log_path: PathBuf,
    mail: PathBuf,
    child: Option<Child>,
    // Last: removed after `Drop::drop` has killed the server.
    tmp: TempDir,
}

fn python() -> anyhow::Result<PathBuf> {
    let can_import = |py: &Path| {
        Command::new(py)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    if let Some(d) = data {
        let p = d.join("backstop/moto-venv/bin/python");
        if p.is_file() && can_import(&p) {
            return Ok(p);
        }
    }
    let p = crate::require_tool("python3")?;
    if can_import(&p) {
        return Ok(p);
    }
    bail!(
        "aiosmtpd is needed for the notification tests: run scripts/setup (it installs PyPI's \
         aiosmtpd into ~/.local/share/backstop/moto-venv)"
    )
}

impl Smtp {
    /// Starts a plain aiosmtpd on a free loopback port, with no message yet.
    pub fn start() -> anyhow::Result<Smtp> {
        Smtp::start_tls(SmtpTls::Plain)
    }

    /// Starts aiosmtpd with `tls` (a fresh CA and certificate for STARTTLS and SMTPS).
    pub fn start_tls(tls: SmtpTls) -> anyhow::Result<Smtp> {
        let py = python()?;
        let tmp = tempfile::Builder::new()
            .prefix("backstop-smtp-")
            .tempdir()
            .context("could not create a temporary directory for the SMTP server")?;
        std::fs::write(tmp.path().join("backstop_smtp_sink.py"), HANDLER)
            .context("could not write the SMTP handler")?;
        let mail = tmp.path().join("mail");
        std::fs::create_dir(&mail).context("could not create the mail directory")?;
        if tls != SmtpTls::Plain {
            make_certificates(tmp.path())?;
        }
        let mut s = Smtp {
            port: 0,
            tls,
            log_path: tmp.path().join("smtp.log"),
            mail,
            child: None,
            tmp,
        };
        let mut last = None;
        for _ in 0..5 {
            s.port = crate::try_free_port()?;
            s.spawn(&py)?;
            let Err(e) = s.wait_ready() else {
                return Ok(s);
            };
            if let Some(mut c) = s.child.take() {
                process::kill(&mut c);
            }
            let log = std::fs::read_to_string(&s.log_path).unwrap_or_default();
            let e = e.context(format!(
                "aiosmtpd on 127.0.0.1:{} did not start; last lines of {}:\n{}",
                s.port,
                s.log_path.display(),
                crate::log_tail(&s.log_path, 40)
            ));
            if !log.contains("Address already in use") {
                return Err(e);
            }
            tracing::warn!("a port was taken while starting aiosmtpd; trying another");
            last = Some(e);
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("aiosmtpd did not start")))
    }

    fn spawn(&mut self, py: &Path) -> anyhow::Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("could not open {}", self.log_path.display()))?;
        let log2 = log
            .try_clone()
            .context("could not duplicate the log file handle")?;
        let listen = format!("127.0.0.1:{}", self.port);
        let mut cmd = Command::new(py);
        cmd.args(["-m", "aiosmtpd", "-n", "-l", &listen]);
        let dir = self.tmp.path();
        match self.tls {
            SmtpTls::Plain => {}
            SmtpTls::Starttls => {
                cmd.arg("--tlscert").arg(dir.join("server.pem"));
                cmd.arg("--tlskey").arg(dir.join("server.key"));
            }
            SmtpTls::Implicit => {
                cmd.arg("--smtpscert").arg(dir.join("server.pem"));
                cmd.arg("--smtpskey").arg(dir.join("server.key"));
            }
        }
        let child = cmd
            .arg("-c")
            .arg("backstop_smtp_sink.Sink")
            .arg(&self.mail)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONPATH", self.tmp.path())
            .current_dir(self.tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .with_context(|| format!("could not run {} -m aiosmtpd", py.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting for aiosmtpd")?
            {
                bail!("aiosmtpd exited during start-up ({status})");
            }
            let last = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                // The greeting of SMTPS comes inside TLS: an accepted connection will do.
                Ok(_) if self.tls == SmtpTls::Implicit => return Ok(()),
                Ok(mut stream) => {
                    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut buf = [0u8; 3];
                    match stream.read_exact(&mut buf) {
                        Ok(()) if &buf == b"220" => return Ok(()),
                        Ok(()) => format!("greeting {:?}", String::from_utf8_lossy(&buf)),
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) => e.to_string(),
            };
            if start.elapsed() > crate::deadline() {
                bail!(
                    "aiosmtpd on {addr} is not answering after {}s: {last}",
                    crate::deadline().as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA that signed the server's certificate (TLS modes only).
    pub fn ca_file(&self) -> PathBuf {
        self.tmp.path().join("ca.pem")
    }

    /// Every message accepted so far, oldest first, as received (with the envelope lines first).
    pub fn messages(&self) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.mail)
            .with_context(|| format!("reading {}", self.mail.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                std::fs::read(p)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .with_context(|| format!("reading {}", p.display()))
            })
            .collect()
    }

    /// Waits until at least `n` messages are in (or the kit's deadline passes).
    pub fn wait_for(&self, n: usize) -> anyhow::Result<Vec<String>> {
        let start = Instant::now();
        loop {
            let m = self.messages()?;
            if m.len() >= n {
                return Ok(m);
            }
            if start.elapsed() > crate::deadline() {
                bail!(
                    "{} message(s) after {}s, waiting for {n}",
                    m.len(),
                    crate::deadline().as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A throwaway CA and a server certificate it signed, for `localhost` and 127.0.0.1 (webpki
/// refuses a self-signed leaf as its own anchor, so the CA is separate).
fn make_certificates(dir: &Path) -> anyhow::Result<()> {
    let openssl = crate::require_tool("openssl")?;
    let limit = Duration::from_secs(60);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .context("writing server.ext")?;
    process::run_ok(
        Command::new(&openssl)
            .current_dir(dir)
            .args(["req", "-x509"])
            .args(ec)
            .args(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"])
            .args(["-subj", "/CN=Backstop test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
        limit,
    )?;
    process::run_ok(
        Command::new(&openssl)
            .current_dir(dir)
            .arg("req")
            .args(ec)
            .args(["-keyout", "server.key", "-out", "server.csr"])
            .args(["-subj", "/CN=localhost"]),
        limit,
    )?;
    process::run_ok(
        Command::new(&openssl).current_dir(dir).args([
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]),
        limit,
    )?;
    Ok(())
}

impl Drop for Smtp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::kill(&mut c);
        }
    }
}
