//! Redis sources: a snapshot taken over the replication protocol, as `redis-cli --rdb` does, and
//! its test restore into a throwaway `redis-server`.
//!
//! Backup ([`snapshot`]): connect, `AUTH` when the URL has a password, record the keyspace
//! (`INFO keyspace`: keys per database) and a sample of keys with their types, then `REPLCONF
//! rdb-only 1`, `REPLCONF capa eof` and `SYNC`. The server answers with newlines while it
//! prepares, then either `$<len>\r\n` and that many bytes (disk-based) or `$EOF:<40-byte
//! mark>\r\n`, the bytes, and the mark again (diskless, streamed from the server's fork). The
//! RDB payload is streamed into the sink as the part [`RDB_PART`]: never held whole.
//!
//! Wire format read: RESP2 (simple strings, errors, integers, bulk strings, arrays).
//!
//! Invariants:
//! - A connection that ends before the payload does (the server died or was killed mid-snapshot)
//!   is an error naming how many bytes came of how many; the caller writes no manifest.
//! - The RDB's byte count and SHA3-256 are in [`RedisReport`] and checked when read back; the
//!   RDB's own CRC64 is checked by `redis-server` when a test restore loads it.
//! - The keyspace and the sample are read just before the snapshot, not in it: writes in between
//!   make small differences, which the verification tolerates (`tolerance_percent`).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;

use crate::SourceError;
use crate::capture::{Measured, StderrTail};
use crate::child_env::scrub_server;
use crate::pg::logical::{DumpSink, PartReader};

/// The part holding the RDB file.
pub const RDB_PART: &str = "redis/dump.rdb";
/// Keys sampled (with their types) at backup time, checked by the test restore.
pub const SAMPLE_KEYS: usize = 100;

/// A configured Redis source.
#[derive(Clone, Debug)]
pub struct RedisSource {
    /// `redis://[[USER]:PASSWORD@]HOST[:PORT]`.
    pub url: String,
    /// Limit of the whole snapshot.
    pub timeout: Duration,
}

/// Host, port and credentials parsed from a `redis://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisTarget {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl RedisTarget {
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| format!("{:?} is not a redis:// URL", redacted_url(url)))?;
        let rest = rest.split('/').next().unwrap_or_default();
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
                None => (None, Some(a.to_string())),
            },
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("redis URL: port {p:?} is not a number"))?,
            ),
            None => (hostport.to_string(), 6379),
        };
        if host.is_empty() {
            return Err("redis URL: no host (redis://HOST:PORT)".into());
        }
        Ok(RedisTarget {
            host,
            port,
            user,
            password,
        })
    }

    /// `host:port`, never the password.
    pub fn shown(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A `redis://` URL with its password replaced.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(a)) if a > s => format!("{}***{}", &url[..s + 3], &url[a..]),
        _ => url.to_string(),
    }
}

/// Keys in one database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbKeys {
    pub db: u32,
    pub keys: u64,
}

/// A key read before the snapshot, with its type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampledKey {
    pub db: u32,
    pub key: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// What a Redis backup recorded, stored in the manifest (`extra.redis`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisReport {
    /// `host:port` of the source.
    pub server: String,
    pub redis_version: String,
    /// `sync` (the replication protocol).
    pub method: String,
    /// Whether the server streamed the RDB from its fork (diskless) or from a file it wrote.
    pub diskless: bool,
    pub keyspace: Vec<DbKeys>,
    pub sample: Vec<SampledKey>,
    /// Bytes and SHA3-256 (hex) of the RDB file.
    pub bytes: u64,
    pub sha3: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

/// A RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn text(&self) -> String {
        match self {
            Reply::Simple(s) | Reply::Error(s) => s.clone(),
            Reply::Int(i) => i.to_string(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Bulk(None) | Reply::Array(None) => String::new(),
            Reply::Array(Some(items)) => {
                items.iter().map(Reply::text).collect::<Vec<_>>().join(" ")
            }
        }
    }
}

/// A minimal RESP2 client: enough to authenticate, ask for the keyspace, sample keys and start
/// a replication sync.
pub struct Conn {
    io: BufReader<TcpStream>,
    target: String,
}

impl Conn {
    pub async fn connect(t: &RedisTarget) -> Result<Conn, SourceError> {
        let stream = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|source| SourceError::RedisConnect {
                target: t.shown(),
                source,
            })?;
        let mut conn = Conn {
            io: BufReader::new(stream),
            target: t.shown(),
        };
        if let Some(pw) = &t.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(u) = &t.user {
                args.push(u.as_bytes());
            }
            args.push(pw.as_bytes());
            conn.ok(&args, "authenticating").await?;
        }
        Ok(conn)
    }

    fn err(&self, doing: &str, why: impl Into<String>) -> SourceError {
        SourceError::Redis {
            target: self.target.clone(),
            doing: doing.into(),
            why: why.into(),
        }
    }

    async fn send(&mut self, args: &[&[u8]], doing: &str) -> Result<(), SourceError> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        let target = self.target.clone();
        self.io
            .get_mut()
            .write_all(&out)
            .await
            .map_err(|e| SourceError::Redis {
                target,
                doing: doing.into(),
                why: e.to_string(),
            })
    }

    async fn line(&mut self, doing: &str) -> Result<String, SourceError> {
        let mut line = Vec::new();
        let n = self
            .io
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| self.err(doing, e.to_string()))?;
        if n == 0 {
            return Err(self.err(doing, "the server closed the connection"));
        }
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    fn read_reply<'a>(
        &'a mut self,
        doing: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Reply, SourceError>> + Send + 'a>> {
        Box::pin(async move {
            let line = self.line(doing).await?;
            let (tag, rest) = line.split_at(line.len().min(1));
            let num = |s: &str| {
                s.parse::<i64>()
                    .map_err(|_| self.err(doing, format!("unexpected reply {line:?}")))
            };
            match tag {
                "+" => Ok(Reply::Simple(rest.to_string())),
                "-" => Ok(Reply::Error(rest.to_string())),
                ":" => Ok(Reply::Int(num(rest)?)),
                "$" => {
                    let len = num(rest)?;
                    if len < 0 {
                        return Ok(Reply::Bulk(None));
                    }
                    let mut buf = vec![0u8; len as usize + 2];
                    self.io
                        .read_exact(&mut buf)
                        .await
                        .map_err(|e| self.err(doing, e.to_string()))?;
                    buf.truncate(len as usize);
                    Ok(Reply::Bulk(Some(buf)))
                }
                "*" => {
                    let len = num(rest)?;
                    if len < 0 {
                        return Ok(Reply::Array(None));
                    }
                    let mut items = Vec::with_capacity(len as usize);
                    for _ in 0..len {
                        items.push(self.read_reply(doing).await?);
                    }
                    Ok(Reply::Array(Some(items)))
                }
                _ => Err(self.err(doing, format!("unexpected reply {line:?}"))),
            }
        })
    }

    /// Sends one command and reads its reply; an error reply is an error.
    pub async fn cmd(&mut self, args: &[&[u8]], doing: &str) -> Result<Reply, SourceError> {
        self.send(args, doing).await?;
        match self.read_reply(doing).await? {
            Reply::Error(e) => Err(self.err(doing, e)),
            r => Ok(r),
        }
    }

    async fn ok(&mut self, args: &[&[u8]], doing: &str) -> Result<(), SourceError> {
        self.cmd(args, doing).await.map(|_| ())
    }

    /// `INFO section` as `key:value` pairs.
    pub async fn info(&mut self, section: &str) -> Result<Vec<(String, String)>, SourceError> {
        let r = self
            .cmd(&[b"INFO", section.as_bytes()], "reading INFO")
            .await?;
        Ok(r.text()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect())
    }

    /// Keys per database, from `INFO keyspace` (`db0:keys=3,expires=0,...`).
    pub async fn keyspace(&mut self) -> Result<Vec<DbKeys>, SourceError> {
        let mut out = Vec::new();
        for (k, v) in self.info("keyspace").await? {
            let Some(db) = k.strip_prefix("db").and_then(|d| d.parse::<u32>().ok()) else {
                continue;
            };
            let keys = v
                .split(',')
                .find_map(|kv| kv.strip_prefix("keys="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            out.push(DbKeys { db, keys });
        }
        out.sort_by_key(|d| d.db);
        Ok(out)
    }

    pub async fn select(&mut self, db: u32) -> Result<(), SourceError> {
        self.ok(
            &[b"SELECT", db.to_string().as_bytes()],
            "selecting a database",
        )
        .await
    }

    /// The type of `key` (`none` when it does not exist).
    pub async fn key_type(&mut self, key: &[u8]) -> Result<String, SourceError> {
        Ok(self
            .cmd(&[b"TYPE", key], "reading a key's type")
            .await?
            .text())
    }
}

/// Up to [`SAMPLE_KEYS`] distinct keys (UTF-8 names only) over the databases, with their types.
async fn sample(conn: &mut Conn, keyspace: &[DbKeys]) -> Result<Vec<SampledKey>, SourceError> {
    let mut out: Vec<SampledKey> = Vec::new();
    let total: u64 = keyspace.iter().map(|d| d.keys).sum();
    for d in keyspace.iter().filter(|d| d.keys > 0) {
        let share = ((SAMPLE_KEYS as u64 * d.keys).div_ceil(total.max(1))).max(1) as usize;
        conn.select(d.db).await?;
        let mut tries = 0;
        let mut got = 0;
        while got < share && tries < share * 3 {
            tries += 1;
            let Reply::Bulk(Some(key)) = conn.cmd(&[b"RANDOMKEY"], "sampling keys").await? else {
                break;
            };
            let Ok(name) = String::from_utf8(key) else {
                continue;
            };
            if out.iter().any(|s| s.db == d.db && s.key == name) {
                continue;
            }
            let kind = conn.key_type(name.as_bytes()).await?;
            out.push(SampledKey {
                db: d.db,
                key: name,
                kind,
            });
            got += 1;
        }
    }
    conn.select(0).await?;
    Ok(out)
}

/// How the payload ends.
enum Framing {
    Length(u64),
    Mark([u8; 40]),
}

/// The RDB payload of a sync, read off the connection; ends exactly at the payload's end, and
/// fails if the connection ends before it.
struct Payload {
    io: BufReader<TcpStream>,
    framing: Framing,
    /// Length framing: bytes passed on so far.
    done: u64,
    /// Mark framing: bytes read but held back, as they might be the start of the mark.
    held: Vec<u8>,
    finished: bool,
    target: String,
}

impl AsyncRead for Payload {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.finished || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            match this.framing {
                Framing::Length(len) => {
                    let want = (len - this.done).min(buf.remaining() as u64) as usize;
                    if want == 0 {
                        this.finished = true;
                        return Poll::Ready(Ok(()));
                    }
                    let mut tmp = vec![0u8; want];
                    let mut rb = ReadBuf::new(&mut tmp);
                    match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            if n == 0 {
                                return Poll::Ready(Err(cut_short(
                                    &this.target,
                                    format!("after {} of {} bytes", this.done, len),
                                )));
                            }
                            buf.put_slice(&tmp[..n]);
                            this.done += n as u64;
                            if this.done == len {
                                this.finished = true;
                            }
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
                Framing::Mark(mark) => {
                    // Pass on what cannot be part of the mark; hold back the last 40 bytes.
                    if let Some(p) = find(&this.held, &mark) {
                        let n = p.min(buf.remaining());
                        buf.put_slice(&this.held[..n]);
                        this.held.drain(..n);
                        if n == p {
                            this.finished = true;
                        }
                        return Poll::Ready(Ok(()));
                    }
                    if this.held.len() > mark.len() {
                        let n = (this.held.len() - mark.len()).min(buf.remaining());
                        buf.put_slice(&this.held[..n]);
                        this.held.drain(..n);
                        this.done += n as u64;
                        return Poll::Ready(Ok(()));
                    }
                    let mut tmp = vec![0u8; 64 * 1024];
                    let mut rb = ReadBuf::new(&mut tmp);
                    match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            if n == 0 {
                                return Poll::Ready(Err(cut_short(
                                    &this.target,
                                    format!(
                                        "after {} bytes, before the end mark of the diskless transfer",
                                        this.done + this.held.len() as u64
                                    ),
                                )));
                            }
                            this.held.extend_from_slice(&tmp[..n]);
                        }
                    }
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The error a payload cut short reads as; recognised by [`snapshot`] through its kind.
fn cut_short(target: &str, when: String) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!(
            "Redis at {target} closed the connection {when} of the snapshot: the server stopped or was killed mid-snapshot"
        ),
    )
}

/// Takes one snapshot of `source` into `sink` (see the module docs).
pub async fn snapshot(
    source: &RedisSource,
    sink: &dyn DumpSink,
) -> Result<RedisReport, SourceError> {
    let target = RedisTarget::parse(&source.url).map_err(|why| SourceError::InvalidConninfo {
        why: format!("{why} (a Redis source's url is redis://[:PASSWORD@]HOST:PORT)"),
    })?;
    let limit = source.timeout;
    match tokio::time::timeout(limit, snapshot_inner(&target, sink)).await {
        Ok(r) => r,
        Err(_) => Err(SourceError::Redis {
            target: target.shown(),
            doing: "taking a snapshot".into(),
            why: format!(
                "it did not finish within {} s (timeout_seconds of the source)",
                limit.as_secs()
            ),
        }),
    }
}

async fn snapshot_inner(
    target: &RedisTarget,
    sink: &dyn DumpSink,
) -> Result<RedisReport, SourceError> {
    let started_at = Utc::now();
    let mut conn = Conn::connect(target).await?;
    let version = conn
        .info("server")
        .await?
        .into_iter()
        .find(|(k, _)| k == "redis_version")
        .map(|(_, v)| v)
        .unwrap_or_default();
    let keyspace = conn.keyspace().await?;
    let sample = sample(&mut conn, &keyspace).await?;
    // Redis 7: a replica that wants only the RDB (no command stream after it). Older servers
    // refuse the option; the sync then works as redis-cli's did.
    let _ = conn
        .cmd(&[b"REPLCONF", b"rdb-only", b"1"], "asking for the RDB only")
        .await;
    conn.ok(
        &[b"REPLCONF", b"capa", b"eof"],
        "announcing diskless capability",
    )
    .await?;
    conn.send(&[b"SYNC"], "starting the sync").await?;
    // Newlines keep the connection alive while the server prepares the RDB.
    let header = loop {
        let l = conn
            .line("waiting for the snapshot")
            .await
            .map_err(|e| match e {
                SourceError::Redis { target, why, .. } => SourceError::Redis {
                    target,
                    doing: "waiting for the snapshot to begin".into(),
                    why: format!(
                        "{why}: the server stopped or was killed before it sent the snapshot"
                    ),
                },
                e => e,
            })?;
        if !l.is_empty() {
            break l;
        }
    };
    let framing = if let Some(mark) = header.strip_prefix("$EOF:") {
        let mark: [u8; 40] = mark
            .as_bytes()
            .try_into()
            .map_err(|_| conn.err("starting the sync", format!("bad header {header:?}")))?;
        Framing::Mark(mark)
    } else if let Some(len) = header.strip_prefix('$').and_then(|l| l.parse::<u64>().ok()) {
        Framing::Length(len)
    } else if let Some(e) = header.strip_prefix('-') {
        return Err(conn.err(
            "starting the sync",
            format!(
                "{e} (the user needs the SYNC and REPLCONF commands; replica-serve-stale-data or ACLs may refuse it)"
            ),
        ));
    } else {
        return Err(conn.err("starting the sync", format!("unexpected reply {header:?}")));
    };
    let diskless = matches!(framing, Framing::Mark(_));
    let payload = Payload {
        io: conn.io,
        framing,
        done: 0,
        held: Vec::new(),
        finished: false,
        target: conn.target.clone(),
    };
    let (reader, measure) = Measured::new(payload);
    let stored = sink.put_part(RDB_PART, Box::pin(reader)).await;
    if let Err(e) = stored {
        // A connection cut short is the reason, not the storage step that saw it end.
        if let Some(io) = io_inside(&e)
            && io.kind() == std::io::ErrorKind::UnexpectedEof
        {
            return Err(SourceError::Redis {
                target: target.shown(),
                doing: "streaming the snapshot".into(),
                why: io.to_string(),
            });
        }
        return Err(SourceError::Sink {
            part: RDB_PART.into(),
            source: e,
        });
    }
    let (bytes, sha3) = measure.figures();
    Ok(RedisReport {
        server: target.shown(),
        redis_version: version,
        method: "sync".into(),
        diskless,
        keyspace,
        sample,
        bytes,
        sha3,
        started_at,
        finished_at: Utc::now(),
    })
}

fn io_inside(e: &crate::pg::logical::SinkError) -> Option<&std::io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.source.as_deref().map(|s| s as _);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// The `redis-server` binary: `$BACKSTOP_REDIS_SERVER`, else `redis-server` on the PATH.
pub fn server_binary() -> PathBuf {
    std::env::var_os("BACKSTOP_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// A `redis-server` started on an RDB file in a directory of its own, on a loopback port;
/// killed when dropped.
pub struct ScratchRedis {
    pub port: u16,
    child: tokio::process::Child,
    stderr: Option<StderrTail>,
}

impl ScratchRedis {
    /// Starts a server on `dir/dump.rdb` (which must exist), with no persistence of its own, and
    /// waits until it has loaded the file (up to `limit`).
    pub async fn start(dir: &Path, limit: Duration) -> Result<ScratchRedis, SourceError> {
        let port = free_port()?;
        let bin = server_binary();
        let mut cmd = tokio::process::Command::new(&bin);
        scrub_server(&mut cmd);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args([
                "--dbfilename",
                "dump.rdb",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| SourceError::ToolSpawn {
            tool: format!(
                "{} (install redis-server, or set BACKSTOP_REDIS_SERVER)",
                bin.display()
            ),
            source: e,
        })?;
        // Its log goes to stdout; kept for the error if it exits.
        let stderr = Some(StderrTail::spawn(child.stdout.take()));
        let mut s = ScratchRedis {
            port,
            child,
            stderr,
        };
        let target = RedisTarget {
            host: "127.0.0.1".into(),
            port,
            user: None,
            password: None,
        };
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = s.child.try_wait() {
                let log = match s.stderr.take() {
                    Some(t) => t.finish().await,
                    None => String::new(),
                };
                return Err(SourceError::CommandFailed {
                    what: "scratch redis-server (test restore)".into(),
                    command: format!("{} --dir {}", bin.display(), dir.display()),
                    status: crate::capture::status_text(&status),
                    stderr: log,
                });
            }
            if let Ok(mut c) = Conn::connect(&target).await
                && let Ok(info) = c.info("persistence").await
                && info.iter().any(|(k, v)| k == "loading" && v == "0")
            {
                return Ok(s);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(SourceError::Redis {
                    target: target.shown(),
                    doing: "loading the backup into a scratch server".into(),
                    why: format!("it was not ready within {} s", limit.as_secs()),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn target(&self) -> RedisTarget {
        RedisTarget {
            host: "127.0.0.1".into(),
            port: self.port,
            user: None,
            password: None,
        }
    }
}

fn free_port() -> Result<u16, SourceError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| SourceError::io("finding a free loopback port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| SourceError::io("finding a free loopback port", e))
}

/// One database's keys: recorded at backup time and found in the restored copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbCheck {
    pub db: u32,
    pub expected: u64,
    pub restored: u64,
}

/// What a Redis test restore found.
#[derive(Clone, Debug)]
pub struct RedisChecked {
    pub databases: Vec<DbCheck>,
    pub sampled: usize,
    pub sample_missing: usize,
}

/// Compares a loaded copy with the report: keys per database within `tolerance_percent`, and
/// the sampled keys present with their types (at most `tolerance_percent` of them missing or
/// changed, as the sample was read just before the snapshot).
pub async fn check_restored(
    report: &RedisReport,
    restored: &RedisTarget,
    tolerance_percent: f64,
) -> Result<RedisChecked, SourceError> {
    let mut conn = Conn::connect(restored).await?;
    let found = conn.keyspace().await?;
    let mut databases = Vec::new();
    let dbs: std::collections::BTreeSet<u32> = report
        .keyspace
        .iter()
        .chain(found.iter())
        .map(|d| d.db)
        .collect();
    for db in dbs {
        let expected = report
            .keyspace
            .iter()
            .find(|d| d.db == db)
            .map_or(0, |d| d.keys);
        let restored_keys = found.iter().find(|d| d.db == db).map_or(0, |d| d.keys);
        let diff = expected.abs_diff(restored_keys) as f64;
        if diff > expected as f64 * tolerance_percent / 100.0 {
            return Err(SourceError::Mismatch {
                what: format!("database {db} of the Redis backup"),
                why: format!(
                    "the source had {expected} keys when the snapshot began, the restored copy has {restored_keys} (DBSIZE), beyond the {tolerance_percent}% tolerance"
                ),
            });
        }
        databases.push(DbCheck {
            db,
            expected,
            restored: restored_keys,
        });
    }
    let mut missing = 0;
    let mut first: Option<String> = None;
    for s in &report.sample {
        conn.select(s.db).await?;
        let t = conn.key_type(s.key.as_bytes()).await?;
        if t != s.kind {
            missing += 1;
            first.get_or_insert_with(|| {
                format!(
                    "key {:?} in database {} was a {} and is {t} in the copy",
                    s.key, s.db, s.kind
                )
            });
        }
    }
    let allowed = (report.sample.len() as f64 * tolerance_percent / 100.0).floor() as usize;
    if missing > allowed {
        return Err(SourceError::Mismatch {
            what: "the sampled keys of the Redis backup".into(),
            why: format!(
                "{missing} of {} are missing or of another type in the restored copy (first: {})",
                report.sample.len(),
                first.unwrap_or_default()
            ),
        });
    }
    Ok(RedisChecked {
        databases,
        sampled: report.sample.len(),
        sample_missing: missing,
    })
}

/// A test restore: the RDB written to a temporary directory (bytes and SHA3 checked), loaded by
/// a throwaway `redis-server` (which checks the RDB's CRC), compared, everything removed.
pub async fn test_restore(
    report: &RedisReport,
    input: PartReader,
    work_dir: Option<&Path>,
    tolerance_percent: f64,
) -> Result<RedisChecked, SourceError> {
    let mut b = tempfile::Builder::new();
    b.prefix("backstop-redis-verify-");
    let dir = match work_dir {
        Some(d) => b.tempdir_in(d),
        None => b.tempdir(),
    }
    .map_err(|e| SourceError::io("creating a scratch directory for a Redis test restore", e))?;
    let rdb = dir.path().join("dump.rdb");
    crate::command::write_raw(input, (report.bytes, &report.sha3), &rdb).await?;
    let limit = Duration::from_secs(600);
    let server = match ScratchRedis::start(dir.path(), limit).await {
        // A copy the server refuses to load is a damaged backup.
        Err(SourceError::CommandFailed { stderr, .. }) => {
            return Err(SourceError::Mismatch {
                what: "the Redis backup's RDB file".into(),
                why: format!("a scratch redis-server refused to load it: {stderr}"),
            });
        }
        other => other?,
    };
    check_restored(report, &server.target(), tolerance_percent).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_never_show_the_password() {
        let t = RedisTarget::parse("redis://:s3cret@cache.internal:6380").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.user.as_deref(),
                t.password.as_deref()
            ),
            ("cache.internal", 6380, None, Some("s3cret"))
        );
        assert_eq!(t.shown(), "cache.internal:6380");
        let t = RedisTarget::parse("redis://backup:pw@10.0.0.5/0").unwrap();
        assert_eq!((t.user.as_deref(), t.port), (Some("backup"), 6379));
        assert!(RedisTarget::parse("http://x").is_err());
        assert!(RedisTarget::parse("redis://h:port").is_err());
        assert_eq!(
            redacted_url("redis://:s3cret@h:1"),
            "redis://***@h:1".to_string()
        );
        let err = RedisTarget::parse("rediss://:s3cret@h:1").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
