//! A throwaway InfluxDB 1.x (`influxd` from Debian's `influxdb` package) on free loopback ports
//! (HTTP and the backup/restore RPC port), in a temporary directory; killed when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process;

pub struct Influx {
    http_port: u16,
    rpc_port: u16,
    child: Option<Child>,
    tmp: tempfile::TempDir,
}

impl Influx {
    pub fn start() -> anyhow::Result<Influx> {
        let bin = crate::require_tool("influxd")?;
        let tmp = tempfile::Builder::new()
            .prefix("backstop-influx-")
            .tempdir()
            .context("could not create a temporary directory for influxd")?;
        let http_port = crate::try_free_port()?;
        let rpc_port = crate::try_free_port()?;
        let d = tmp.path().display();
        let config = format!(
            "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc_port}\"\n\
             [meta]\n  dir = \"{d}/meta\"\n\
             [data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n\
             [http]\n  bind-address = \"127.0.0.1:{http_port}\"\n  log-enabled = false\n\
             [monitor]\n  store-enabled = false\n"
        );
        let conf = tmp.path().join("influxdb.conf");
        std::fs::write(&conf, config).context("could not write influxdb.conf")?;
        let log = std::fs::File::create(tmp.path().join("influxd.log"))?;
        let child = Command::new(&bin)
            .arg("run")
            .arg("-config")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("could not run {}", bin.display()))?;
        let mut i = Influx {
            http_port,
            rpc_port,
            child: Some(child),
            tmp,
        };
        let start = Instant::now();
        loop {
            if let Some(c) = i.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!(
                    "influxd exited during start-up ({status}):\n{}",
                    crate::log_tail(&i.tmp.path().join("influxd.log"), 30)
                );
            }
            if let Ok((204, _)) = crate::http::get(http_port, "/ping", Duration::from_secs(2))
                && TcpStream::connect(("127.0.0.1", rpc_port)).is_ok()
            {
                return Ok(i);
            }
            if start.elapsed() > crate::deadline() {
                bail!(
                    "influxd not ready on 127.0.0.1:{http_port}:\n{}",
                    crate::log_tail(&i.tmp.path().join("influxd.log"), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// `127.0.0.1:PORT` of the RPC service `influxd backup` and `influxd restore` talk to.
    pub fn rpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.rpc_port)
    }

    /// POSTs `body` to `path_and_query` and returns the status and the response body.
    pub fn post(&self, path_and_query: &str, body: &str) -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.http_port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "POST {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    }

    /// Runs an InfluxQL statement (`q`, form-encoded by the caller if it needs it).
    pub fn query(&self, db: &str, q: &str) -> anyhow::Result<String> {
        let body = format!("db={db}&q={}", form_encode(q));
        let (code, text) = self.post("/query", &body)?;
        if code != 200 {
            bail!("query {q:?} answered {code}: {text}");
        }
        Ok(text)
    }

    /// Writes line protocol into `db`.
    pub fn write(&self, db: &str, lines: &str) -> anyhow::Result<()> {
        let (code, text) = self.post(&format!("/write?db={db}"), lines)?;
        if code != 204 {
            bail!("write answered {code}: {text}");
        }
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::kill(&mut c);
        }
    }
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Influx {
    fn drop(&mut self) {
        self.kill();
    }
}
