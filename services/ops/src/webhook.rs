//! The webhook log (R15): signals accepted at `POST /webhooks/NAME` are appended to a local,
//! durable daily log, sealed and uploaded in pieces, kept 90 days, and replayed into a
//! database after a recovery.
//!
//! ```text
//!  API ──append──► writer thread (group commit: one write + fdatasync per batch, then the acks)
//!                       │ a segment is sealed at 1,000 entries, at midnight America/New_York
//!                       ▼ (the roll task, on the injected Clock) and at start-up after a crash
//!                  uploader task ──put_blob (export key, read back)──► webhooks/NAME/DAY/F-L
//!                       └─► webhook.log_sealed, then the local cursor, then the file goes
//! ```
//!
//! Invariants:
//! - A signal is acknowledged (the API's 200) only after its record was `fdatasync`ed
//!   (`backstop_sources::webhook`, which also states the on-disk format and the torn-tail rule).
//! - Sequence numbers are per log, consecutive, and never reused: at start the next one is past
//!   both the local segments and the cursor (`DATA_DIR/webhooks/NAME/uploaded`, the last
//!   sequence uploaded, written atomically).
//! - A segment file is deleted only after its piece was read back from the repository, its
//!   `webhook.log_sealed` appended and the cursor moved. A crash anywhere in between leaves the
//!   file; the next start finds it, sees the piece already stored (same name: the day and the
//!   sequence range), checks it and records the event (same id), so nothing is lost and nothing
//!   is duplicated.
//! - A write or fsync error poisons the writer: every later append is refused (503) until
//!   `serve` restarts and recovers the file, since what follows a failed write is unknown.
//! - Pieces are sealed with the `export` key: DESIGN's purposes are database, wal, export,
//!   config, files and ledger, and the log, like table exports, is data for replay into a
//!   database, kept 90 days, apart from the database backups' key (R9.4).
//!
//! # Piece `webhooks/<name>/<YYYY-MM-DD>/<first, 20 digits>-<last, 20 digits>` (format 1)
//! A blob (kind 3, brotli, AES-SIV with the path bound) whose plaintext is one JSON line,
//! `{"format":"backstop-webhook-piece","format_version":1,"repository_id","name","day","first",
//! "last","entries"}`, a newline, then a segment in the local format (header and records, every
//! record's `synced_through` set to `first - 1`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backstop_events::{Actor, Event, WebhookLogDeleted, WebhookLogSealed, streams};
use backstop_ledger::Appender;
use backstop_repo::{RepoError, Repository};
use backstop_sources::webhook::{
    self as local, Entry, Header, SegmentWriter, WebhookLogError, encode_header, encode_record,
};
use bytes::Bytes;
use chrono::{DateTime, NaiveDate, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use sha3::{Digest, Sha3_256};
use tokio::sync::{mpsc, oneshot, watch};

use crate::record::record;
use crate::schedule::{Clock, ConfigDuration};

/// Entries per piece.
pub const PIECE_ENTRIES: u64 = 1000;
/// The zone whose midnight closes a day's log.
pub const ZONE: Tz = chrono_tz::America::New_York;
/// How long pieces are kept by default (R15).
pub const DEFAULT_KEEP: TimeDelta = TimeDelta::days(90);
/// Where pieces live in the repository.
pub const PREFIX: &str = "webhooks/";
/// Appends gathered into one write and one fsync at most.
const MAX_BATCH: usize = 512;

/// One `[[webhooks]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The log's name: `POST /webhooks/NAME`, stream `webhook-NAME`, `[A-Za-z0-9_-]`, 1-64.
    pub name: String,
    /// The token senders present (`Authorization: Bearer TOKEN` or `?token=TOKEN`)...
    pub token: Option<String>,
    /// ... or a file holding it (first line).
    pub token_file: Option<PathBuf>,
    /// How long uploaded pieces are kept (default 90 days).
    pub keep: Option<ConfigDuration>,
}

impl WebhookConfig {
    pub fn keep(&self) -> TimeDelta {
        self.keep.map(|d| d.as_chrono()).unwrap_or(DEFAULT_KEEP)
    }

    /// Checks the name and reads the token.
    pub fn resolve_token(&self) -> Result<String, WebhookError> {
        check_name(&self.name)?;
        let bad =
            |what: String| WebhookError::Config(format!("[[webhooks]] {}: {what}", self.name));
        let token = match (&self.token, &self.token_file) {
            (Some(t), None) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| bad(format!("token_file {}: {e}", f.display())))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
            _ => return Err(bad("set exactly one of token and token_file".into())),
        };
        if token.len() < 16 {
            return Err(bad(
                "the token is shorter than 16 characters; use a long random one (e.g. `openssl rand -hex 32`)".into(),
            ));
        }
        Ok(token)
    }
}

/// A log name as the URL, the stream and the object keys use it.
pub fn check_name(name: &str) -> Result<(), WebhookError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(WebhookError::Config(format!(
            "webhook log name {name:?}: use 1 to 64 of A-Z, a-z, 0-9, '-' and '_'"
        )));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Log(#[from] WebhookLogError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("recording the piece in the ledger: {0}")]
    Ledger(#[from] backstop_ledger::LedgerError),
    /// The writer met a storage error earlier (or stopped): nothing more is accepted until
    /// `serve` restarts and recovers the log.
    #[error(
        "webhook log {0} is not accepting signals: its local log met a storage error (see the log of `backstop serve`); restart it once the disk is fixed"
    )]
    Stopped(String),
    #[error("piece {key}: {what}")]
    BadPiece { key: String, what: String },
    #[error("{0}")]
    Database(String),
}

impl WebhookError {
    /// Whether the same operation may succeed later (storage or network trouble).
    pub fn is_transient(&self) -> bool {
        match self {
            WebhookError::Log(e) => e.is_transient(),
            WebhookError::Repo(e) => e.is_transient(),
            WebhookError::Ledger(_) | WebhookError::Database(_) => true,
            _ => false,
        }
    }
}

/// The day (America/New_York) of an instant.
pub fn day_of(at: DateTime<Utc>) -> NaiveDate {
    at.with_timezone(&ZONE).date_naive()
}

/// The first midnight (America/New_York) after `now`, in UTC.
pub fn next_midnight(now: DateTime<Utc>) -> DateTime<Utc> {
    let mut day = day_of(now);
    loop {
        day = day.succ_opt().unwrap_or(day);
        // Midnight exists in New York every day (DST changes at 02:00); `earliest` covers it.
        if let Some(t) = day
            .and_hms_opt(0, 0, 0)
            .and_then(|m| ZONE.from_local_datetime(&m).earliest())
        {
            let t = t.with_timezone(&Utc);
            if t > now {
                return t;
            }
        }
    }
}

/// The repository key of a piece.
pub fn piece_key(name: &str, day: NaiveDate, first: u64, last: u64) -> String {
    format!("{PREFIX}{name}/{day}/{first:020}-{last:020}")
}

/// A piece named by its key: (day, first, last).
pub fn parse_piece_key(name: &str, key: &str) -> Option<(NaiveDate, u64, u64)> {
    let rest = key
        .strip_prefix(PREFIX)?
        .strip_prefix(name)?
        .strip_prefix('/')?;
    let (day, range) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    if first.len() != 20 || last.len() != 20 {
        return None;
    }
    Some((day.parse().ok()?, first.parse().ok()?, last.parse().ok()?))
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct PieceHeader {
    format: String,
    format_version: u32,
    repository_id: uuid::Uuid,
    name: String,
    day: NaiveDate,
    first: u64,
    last: u64,
    entries: u64,
}

/// A piece's plaintext.
pub fn encode_piece(
    repository_id: uuid::Uuid,
    name: &str,
    day: NaiveDate,
    entries: &[Entry],
) -> Vec<u8> {
    let first = entries.first().map(|e| e.seq).unwrap_or(0);
    let last = entries.last().map(|e| e.seq).unwrap_or(0);
    let h = PieceHeader {
        format: "backstop-webhook-piece".into(),
        format_version: 1,
        repository_id,
        name: name.into(),
        day,
        first,
        last,
        entries: entries.len() as u64,
    };
    let mut out = serde_json::to_vec(&h).unwrap_or_default();
    out.push(b'\n');
    out.extend_from_slice(&encode_header(&Header {
        first_seq: first,
        day,
    }));
    for e in entries {
        encode_record(&mut out, e, first.saturating_sub(1));
    }
    out
}

/// Opens a piece's plaintext, checking that it is the piece `key` names.
pub fn decode_piece(
    key: &str,
    repository_id: uuid::Uuid,
    name: &str,
    plain: &[u8],
) -> Result<Vec<Entry>, WebhookError> {
    let bad = |what: String| WebhookError::BadPiece {
        key: key.to_string(),
        what,
    };
    let (day, first, last) =
        parse_piece_key(name, key).ok_or_else(|| bad("not a piece name".into()))?;
    let nl = plain
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| bad("no header line".into()))?;
    let h: PieceHeader =
        serde_json::from_slice(&plain[..nl]).map_err(|e| bad(format!("header: {e}")))?;
    if h.format != "backstop-webhook-piece" || h.format_version != 1 {
        return Err(bad(format!(
            "format {} version {}: upgrade Backstop",
            h.format, h.format_version
        )));
    }
    if h.repository_id != repository_id
        || h.name != name
        || h.day != day
        || h.first != first
        || h.last != last
    {
        return Err(bad("the header names another piece".into()));
    }
    let seg = &plain[nl + 1..];
    let sh = local::decode_header(seg).ok_or_else(|| bad("damaged segment header".into()))?;
    let entries = local::decode_records(Path::new(key), &sh, &seg[local::HEADER_LEN..])?;
    if entries.len() as u64 != h.entries
        || entries.first().map(|e| e.seq) != Some(first)
        || entries.last().map(|e| e.seq) != Some(last)
    {
        return Err(bad("its entries are not the range it names".into()));
    }
    Ok(entries)
}

/// What the API is told for an accepted signal.
#[derive(Clone, Debug, Serialize)]
pub struct Ack {
    pub log: String,
    pub seq: u64,
    pub received_at: DateTime<Utc>,
}

enum Cmd {
    Append {
        body: Vec<u8>,
        reply: oneshot::Sender<Result<Ack, WebhookError>>,
    },
    /// Seal the open segment if its day is over (the midnight roll).
    Roll { done: oneshot::Sender<()> },
}

/// One configured log, as the API uses it.
pub struct WebhookLog {
    name: String,
    token_sha3: [u8; 32],
    tx: mpsc::Sender<Cmd>,
}

impl WebhookLog {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `token` is this log's (compared by SHA3-256, in constant time).
    pub fn token_matches(&self, token: &str) -> bool {
        let h: [u8; 32] = Sha3_256::digest(token.as_bytes()).into();
        h.iter()
            .zip(self.token_sha3.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Appends a signal; Ok once it is durable on the local disk.
    pub async fn append(&self, body: Vec<u8>) -> Result<Ack, WebhookError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Append { body, reply })
            .await
            .map_err(|_| WebhookError::Stopped(self.name.clone()))?;
        rx.await
            .map_err(|_| WebhookError::Stopped(self.name.clone()))?
    }

    /// Seals the open segment if its day (America/New_York) is over; returns once done.
    pub async fn roll(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Cmd::Roll { done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Every configured log of this process.
#[derive(Clone, Default)]
pub struct WebhookLogs {
    logs: Arc<HashMap<String, Arc<WebhookLog>>>,
}

impl WebhookLogs {
    pub fn get(&self, name: &str) -> Option<Arc<WebhookLog>> {
        self.logs.get(name).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.logs.is_empty()
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.logs.keys().cloned().collect();
        v.sort();
        v
    }
}

/// The local directory of a log.
pub fn log_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("webhooks").join(name)
}

fn cursor_path(dir: &Path) -> PathBuf {
    dir.join("uploaded")
}

fn read_cursor(dir: &Path) -> Result<u64, WebhookError> {
    let p = cursor_path(dir);
    match std::fs::read_to_string(&p) {
        Ok(s) => s.trim().parse().map_err(|_| {
            WebhookError::Config(format!(
                "{}: not a sequence number ({s:?}); it holds the last uploaded sequence",
                p.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(WebhookLogError::Io { path: p, source: e }.into()),
    }
}

fn write_cursor(dir: &Path, seq: u64) -> Result<(), WebhookError> {
    let p = cursor_path(dir);
    let tmp = dir.join(".uploaded.tmp");
    let io = |e| WebhookLogError::Io {
        path: p.clone(),
        source: e,
    };
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(format!("{seq}\n").as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &p).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// Everything the uploader needs.
#[derive(Clone)]
pub struct Uploading {
    pub repo: Repository,
    pub appender: Arc<dyn Appender>,
}

/// Opens every configured log: recovers each local directory (a torn, never acknowledged tail
/// is cut; acknowledged damage is an error that stops `serve`), queues the segments found for
/// upload, and starts one writer thread and one uploader task per log, and the midnight roll.
/// Tasks end when `shutdown` turns true.
pub fn open(
    data_dir: &Path,
    configs: &[WebhookConfig],
    uploading: Option<Uploading>,
    clock: Arc<dyn Clock>,
    shutdown: watch::Receiver<bool>,
) -> Result<(WebhookLogs, Vec<tokio::task::JoinHandle<()>>), WebhookError> {
    let mut logs = HashMap::new();
    let mut tasks = Vec::new();
    for c in configs {
        let token = c.resolve_token()?;
        if logs.contains_key(&c.name) {
            return Err(WebhookError::Config(format!(
                "[[webhooks]] {} is configured twice",
                c.name
            )));
        }
        let dir = log_dir(data_dir, &c.name);
        std::fs::create_dir_all(&dir).map_err(|e| WebhookLogError::Io {
            path: dir.clone(),
            source: e,
        })?;
        let cursor = read_cursor(&dir)?;
        let mut last = cursor.max(set_aside_horizon(&dir)?);
        let mut pending = Vec::new();
        for path in local::list_segments(&dir)? {
            let r = local::recover(&path)?;
            if r.dropped_bytes > 0 {
                tracing::warn!(
                    log = %c.name, file = %path.display(), bytes = r.dropped_bytes,
                    "a torn record that was never acknowledged was cut from the webhook log"
                );
            }
            if r.header.is_none() {
                continue;
            }
            if let Some(e) = r.entries.last() {
                last = last.max(e.seq);
            }
            pending.push(path);
        }
        let (sealed_tx, sealed_rx) = mpsc::unbounded_channel::<PathBuf>();
        for p in pending {
            let _ = sealed_tx.send(p);
        }
        let (tx, rx) = mpsc::channel::<Cmd>(4096);
        let writer = Writer {
            name: c.name.clone(),
            dir: dir.clone(),
            clock: clock.clone(),
            current: None,
            next_seq: last + 1,
            synced_through: last,
            sealed: sealed_tx,
            poisoned: false,
        };
        std::thread::Builder::new()
            .name(format!("webhook-{}", c.name))
            .spawn(move || writer.run(rx))
            .map_err(|e| WebhookLogError::Io {
                path: dir.clone(),
                source: e,
            })?;
        match &uploading {
            Some(u) => tasks.push(tokio::spawn(upload_loop(
                u.clone(),
                c.name.clone(),
                dir.clone(),
                c.keep(),
                sealed_rx,
                clock.clone(),
                shutdown.clone(),
            ))),
            None => tracing::warn!(
                log = %c.name,
                "no repository open: webhook signals are kept in the local log only, and uploaded once serve starts with the repository"
            ),
        }
        tracing::info!(log = %c.name, next_seq = last + 1, "webhook log open");
        logs.insert(
            c.name.clone(),
            Arc::new(WebhookLog {
                name: c.name.clone(),
                token_sha3: Sha3_256::digest(token.as_bytes()).into(),
                tx,
            }),
        );
    }
    let logs = WebhookLogs {
        logs: Arc::new(logs),
    };
    if !logs.is_empty() {
        tasks.push(tokio::spawn(roll_loop(logs.clone(), clock, shutdown)));
    }
    Ok((logs, tasks))
}

/// The highest sequence in the files an operator set aside in `DIR/damaged/` (RUNBOOK): those
/// numbers were handed out and are never reused.
fn set_aside_horizon(dir: &Path) -> Result<u64, WebhookError> {
    let damaged = dir.join("damaged");
    let mut best = 0;
    let Ok(rd) = std::fs::read_dir(&damaged) else {
        return Ok(0);
    };
    for entry in rd.flatten() {
        let bytes = std::fs::read(entry.path()).map_err(|e| WebhookLogError::Io {
            path: entry.path(),
            source: e,
        })?;
        best = best.max(local::highest_intact_seq(&bytes).unwrap_or(0));
    }
    Ok(best)
}

/// At every midnight (America/New_York) of the clock, every log seals the day's segment.
async fn roll_loop(logs: WebhookLogs, clock: Arc<dyn Clock>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let next = next_midnight(clock.now());
        tokio::select! {
            _ = clock.sleep_until(next) => {}
            _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => return,
        }
        for log in logs.logs.values() {
            log.roll().await;
        }
    }
}

struct Writer {
    name: String,
    dir: PathBuf,
    clock: Arc<dyn Clock>,
    current: Option<SegmentWriter>,
    next_seq: u64,
    synced_through: u64,
    sealed: mpsc::UnboundedSender<PathBuf>,
    poisoned: bool,
}

type Pending = Vec<(Entry, oneshot::Sender<Result<Ack, WebhookError>>)>;

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        while let Some(first) = rx.blocking_recv() {
            let mut cmds = vec![first];
            while cmds.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            let mut pending: Pending = Vec::new();
            for cmd in cmds {
                match cmd {
                    Cmd::Append { body, reply } => {
                        if self.poisoned {
                            let _ = reply.send(Err(WebhookError::Stopped(self.name.clone())));
                            continue;
                        }
                        // Stored at microsecond precision: the acknowledgement says what is kept.
                        let now = self.clock.now();
                        let now = DateTime::<Utc>::from_timestamp_micros(now.timestamp_micros())
                            .unwrap_or(now);
                        let day = day_of(now);
                        if self.current.as_ref().is_some_and(|c| c.header().day != day) {
                            self.flush(&mut pending);
                            self.seal();
                        }
                        if self.current.is_none() && !self.poisoned {
                            match SegmentWriter::create(
                                &self.dir,
                                Header {
                                    first_seq: self.next_seq,
                                    day,
                                },
                            ) {
                                Ok(w) => self.current = Some(w),
                                Err(e) => {
                                    tracing::error!(log = %self.name, error = %e, "cannot create a webhook log segment; refusing signals until restart");
                                    self.poisoned = true;
                                }
                            }
                        }
                        if self.poisoned {
                            let _ = reply.send(Err(WebhookError::Stopped(self.name.clone())));
                            continue;
                        }
                        let e = Entry {
                            seq: self.next_seq,
                            received_at: now,
                            body,
                        };
                        self.next_seq += 1;
                        pending.push((e, reply));
                        let open = self.current.as_ref().map(|c| c.len()).unwrap_or(0);
                        if open + pending.len() as u64 >= PIECE_ENTRIES {
                            self.flush(&mut pending);
                            self.seal();
                        }
                    }
                    Cmd::Roll { done } => {
                        self.flush(&mut pending);
                        let today = day_of(self.clock.now());
                        if self
                            .current
                            .as_ref()
                            .is_some_and(|c| c.header().day != today)
                        {
                            self.seal();
                        }
                        let _ = done.send(());
                    }
                }
            }
            self.flush(&mut pending);
        }
    }

    /// One write and one fdatasync for everything pending, then the acknowledgements.
    fn flush(&mut self, pending: &mut Pending) {
        if pending.is_empty() {
            return;
        }
        let batch: Pending = std::mem::take(pending);
        let entries: Vec<Entry> = batch.iter().map(|(e, _)| e.clone()).collect();
        let result = match self.current.as_mut() {
            Some(w) => w.append(&entries, self.synced_through),
            None => Err(WebhookLogError::Invalid {
                path: self.dir.clone(),
                what: "no open segment".into(),
            }),
        };
        match result {
            Ok(()) => {
                if let Some(e) = entries.last() {
                    self.synced_through = e.seq;
                }
                for (e, reply) in batch {
                    let _ = reply.send(Ok(Ack {
                        log: self.name.clone(),
                        seq: e.seq,
                        received_at: e.received_at,
                    }));
                }
            }
            Err(err) => {
                tracing::error!(log = %self.name, error = %err, "the webhook log could not be written; refusing signals until restart");
                self.poisoned = true;
                for (_, reply) in batch {
                    let _ = reply.send(Err(WebhookError::Stopped(self.name.clone())));
                }
            }
        }
    }

    /// Closes the open segment and hands it to the uploader.
    fn seal(&mut self) {
        if let Some(w) = self.current.take() {
            let path = w.path().to_path_buf();
            drop(w);
            let _ = self.sealed.send(path);
        }
    }
}

async fn upload_loop(
    u: Uploading,
    name: String,
    dir: PathBuf,
    keep: TimeDelta,
    mut rx: mpsc::UnboundedReceiver<PathBuf>,
    clock: Arc<dyn Clock>,
    mut shutdown: watch::Receiver<bool>,
) {
    let repo = u.repo.with_access(
        Actor::worker("webhook").to_string(),
        format!("sealing the webhook log {name}"),
    );
    let mut last_expiry: Option<NaiveDate> = None;
    loop {
        // Once a day (the first chance after start and after each midnight): retention.
        let today = day_of(clock.now());
        if last_expiry != Some(today) {
            match expire(&repo, u.appender.as_ref(), &name, keep, clock.now()).await {
                Ok(n) => {
                    last_expiry = Some(today);
                    if n > 0 {
                        tracing::info!(log = %name, deleted = n, "expired webhook log pieces deleted");
                    }
                }
                Err(e) => {
                    tracing::warn!(log = %name, error = %e, "webhook log retention failed; retried later")
                }
            }
        }
        let path = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => return },
            _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => return,
            // Wake at least hourly for the retention pass.
            _ = tokio::time::sleep(Duration::from_secs(3600)) => continue,
        };
        let mut backoff = Duration::from_secs(1);
        loop {
            match upload_segment(&repo, u.appender.as_ref(), &name, &dir, &path).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(log = %name, file = %path.display(), error = %e, transient = e.is_transient(), "uploading a webhook log piece failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
}

/// Uploads one closed segment as a piece (or finds it already uploaded), records it, moves the
/// cursor and deletes the file.
pub async fn upload_segment(
    repo: &Repository,
    appender: &dyn Appender,
    name: &str,
    dir: &Path,
    path: &Path,
) -> Result<(), WebhookError> {
    let (header, entries) = {
        let p = path.to_path_buf();
        tokio::task::spawn_blocking(move || local::read_segment(&p))
            .await
            .map_err(|e| WebhookError::Config(format!("reading a segment: {e}")))??
    };
    let cursor = read_cursor(dir)?;
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        remove(path)?;
        return Ok(());
    };
    let (first, last_seq) = (first.clone(), last.seq);
    if last_seq <= cursor {
        // Uploaded and recorded before a crash that came before the file's removal.
        remove(path)?;
        return Ok(());
    }
    let key = piece_key(name, header.day, first.seq, last_seq);
    let (size, sha3, key_id) = match repo.backend().head(&key).await? {
        Some(_) => {
            // Stored before a crash: check it is whole and the same range, then record it.
            let sealed = repo.backend().get(&key).await?;
            let sha: [u8; 32] = Sha3_256::digest(&sealed).into();
            let plain = repo
                .get_blob(&key, Some(backstop_repo::Hash32(sha)))
                .await?;
            if decode_piece(&key, repo.id(), name, &plain)? != entries {
                // Never drop local entries for a piece that holds others: two processes serving
                // one log would number their signals alike. The file stays until someone looks.
                return Err(WebhookError::BadPiece {
                    key,
                    what: format!(
                        "it holds other entries than the local segment {} (is a second `backstop serve` configured with this [[webhooks]] log? one log must be served by one process); the local file is kept",
                        path.display()
                    ),
                });
            }
            // The key it was sealed with (a rotation may have come since).
            let key_id = backstop_repo::seal::parse_header(&key, &sealed)?.key_id;
            (sealed.len() as u64, hex::encode(sha), key_id)
        }
        None => {
            let plain = encode_piece(repo.id(), name, header.day, &entries);
            let stored = repo
                .put_blob(&key, backstop_repo::KeyPurpose::Export, Bytes::from(plain))
                .await?;
            (stored.size, stored.sha3.to_hex(), stored.key_id)
        }
    };
    let event = Event::WebhookLogSealed(WebhookLogSealed {
        name: name.to_string(),
        day: header.day.to_string(),
        first: first.seq,
        last: last_seq,
        entries: entries.len() as u64,
        bytes: size,
        sha3,
        object: key.clone(),
        key_id,
    });
    record(
        appender,
        &streams::webhook(name),
        &Actor::worker("webhook"),
        None,
        first.received_at,
        &format!("webhook.log_sealed/{name}/{}", first.seq),
        uuid::Uuid::nil(),
        event,
    )
    .await?;
    write_cursor(dir, last_seq)?;
    remove(path)?;
    tracing::info!(log = %name, object = %key, entries = entries.len(), "webhook log piece uploaded");
    Ok(())
}

fn remove(path: &Path) -> Result<(), WebhookError> {
    let io = |e| WebhookLogError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    std::fs::remove_file(path).map_err(io)?;
    if let Some(d) = path.parent() {
        std::fs::File::open(d)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// A stored piece, as `backstop webhook list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Piece {
    pub key: String,
    pub day: NaiveDate,
    pub first: u64,
    pub last: u64,
    pub entries: u64,
    pub sealed_bytes: u64,
}

/// The pieces of `name` in the repository, in sequence order.
pub async fn list_pieces(repo: &Repository, name: &str) -> Result<Vec<Piece>, WebhookError> {
    check_name(name)?;
    let mut out: Vec<Piece> = repo
        .backend()
        .list(&format!("{PREFIX}{name}/"))
        .await?
        .into_iter()
        .filter_map(|m| {
            let (day, first, last) = parse_piece_key(name, &m.key)?;
            Some(Piece {
                key: m.key,
                day,
                first,
                last,
                entries: last + 1 - first,
                sealed_bytes: m.size,
            })
        })
        .collect();
    out.sort_by_key(|p| p.first);
    Ok(out)
}

/// Deletes the pieces of `name` whose day ended more than `keep` before `now`, each recorded
/// as `webhook.log_deleted` before its object goes. Returns how many were deleted.
pub async fn expire(
    repo: &Repository,
    appender: &dyn Appender,
    name: &str,
    keep: TimeDelta,
    now: DateTime<Utc>,
) -> Result<usize, WebhookError> {
    let horizon = day_of(now - keep);
    let mut n = 0;
    for p in list_pieces(repo, name).await? {
        if p.day >= horizon {
            continue;
        }
        let at = p
            .day
            .and_hms_opt(0, 0, 0)
            .map(|d| d.and_utc())
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        let event = Event::WebhookLogDeleted(WebhookLogDeleted {
            name: name.to_string(),
            day: p.day.to_string(),
            first: p.first,
            last: p.last,
            object: p.key.clone(),
            reason: format!(
                "older than the webhook log's retention of {} days",
                keep.num_days()
            ),
        });
        record(
            appender,
            &streams::webhook(name),
            &Actor::worker("webhook"),
            None,
            at,
            &format!("webhook.log_deleted/{name}/{}", p.first),
            uuid::Uuid::nil(),
            event,
        )
        .await?;
        repo.backend().delete(&p.key).await?;
        n += 1;
    }
    Ok(n)
}

/// Reads the entries of `name` received in `[from, to)`: from the repository's pieces, then
/// the local segments in `local_dir` (the unsealed tail, read without changing it; a damaged
/// tail ends the read there), each sequence once, in sequence order.
pub async fn read_entries(
    repo: &Repository,
    name: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    local_dir: Option<&Path>,
) -> Result<BTreeMap<u64, Entry>, WebhookError> {
    let mut out = BTreeMap::new();
    // A piece's day is its first entry's: a day's piece may hold entries of the next one
    // only if the roll came late, so one day of slack on each side.
    let (lo, hi) = (
        day_of(from).pred_opt().unwrap_or(NaiveDate::MIN),
        day_of(to).succ_opt().unwrap_or(NaiveDate::MAX),
    );
    for p in list_pieces(repo, name).await? {
        if p.day < lo || p.day > hi {
            continue;
        }
        let plain = repo.get_blob(&p.key, None).await?;
        for e in decode_piece(&p.key, repo.id(), name, &plain)? {
            if e.received_at >= from && e.received_at < to {
                out.insert(e.seq, e);
            }
        }
    }
    if let Some(dir) = local_dir {
        for path in local::list_segments(dir)? {
            let bytes = std::fs::read(&path).map_err(|e| WebhookLogError::Io {
                path: path.clone(),
                source: e,
            })?;
            let Some(h) = local::decode_header(&bytes) else {
                continue;
            };
            let mut at = local::HEADER_LEN;
            let mut expected = h.first_seq;
            while let Some((e, _, len)) = local::decode_record(&bytes[at..]) {
                if e.seq != expected {
                    break;
                }
                expected += 1;
                at += len;
                if e.received_at >= from && e.received_at < to {
                    out.entry(e.seq).or_insert(e);
                }
            }
        }
    }
    Ok(out)
}

/// What a replay did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplayReport {
    pub log: String,
    pub table: String,
    pub entries: u64,
    pub inserted: u64,
    pub skipped: u64,
}

/// `schema.table` or `table`, each part an SQL identifier, quoted.
pub fn quote_table(table: &str) -> Result<String, WebhookError> {
    let parts: Vec<&str> = table.split('.').collect();
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    if parts.len() > 2 || !parts.iter().all(|p| ok(p)) {
        return Err(WebhookError::Config(format!(
            "--table {table:?}: give `table` or `schema.table`, each of letters, digits and '_'"
        )));
    }
    Ok(parts
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join("."))
}

/// The table replay creates when it is missing (documented in docs/FORMAT.md).
pub fn table_ddl(quoted: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {quoted} (\
         log text NOT NULL, seq bigint NOT NULL, received_at timestamptz NOT NULL, \
         body bytea NOT NULL, body_json jsonb, PRIMARY KEY (log, seq))"
    )
}

/// Inserts `entries` into `table` on `database_url`, each (log, seq) once: an entry already
/// there is skipped, so a replay run twice inserts nothing the second time.
pub async fn replay_into(
    database_url: &str,
    table: &str,
    name: &str,
    entries: &BTreeMap<u64, Entry>,
) -> Result<ReplayReport, WebhookError> {
    let quoted = quote_table(table)?;
    let db = |e: sqlx::Error| WebhookError::Database(format!("{table}: {e}"));
    let mut conn: sqlx::PgConnection =
        <sqlx::PgConnection as sqlx::Connection>::connect(database_url)
            .await
            .map_err(|e| {
                WebhookError::Database(format!("cannot connect to the target database: {e}"))
            })?;
    sqlx::query(sqlx::AssertSqlSafe(table_ddl(&quoted)))
        .execute(&mut conn)
        .await
        .map_err(db)?;
    let insert = format!(
        "INSERT INTO {quoted} (log, seq, received_at, body, body_json) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (log, seq) DO NOTHING"
    );
    let mut report = ReplayReport {
        log: name.to_string(),
        table: table.to_string(),
        ..Default::default()
    };
    let all: Vec<&Entry> = entries.values().collect();
    for chunk in all.chunks(1000) {
        let mut tx = sqlx::Connection::begin(&mut conn).await.map_err(db)?;
        for e in chunk {
            let json: Option<serde_json::Value> = serde_json::from_slice(&e.body).ok();
            let r = sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
                .bind(name)
                .bind(e.seq as i64)
                .bind(e.received_at)
                .bind(&e.body)
                .bind(json)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            report.entries += 1;
            if r.rows_affected() == 1 {
                report.inserted += 1;
            } else {
                report.skipped += 1;
            }
        }
        tx.commit().await.map_err(db)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn midnight_is_new_york_midnight_across_dst() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        // EST (UTC-5) in December, EDT (UTC-4) in July.
        assert_eq!(
            next_midnight(t("2026-12-02T14:00:00Z")),
            t("2026-12-03T05:00:00Z")
        );
        assert_eq!(
            next_midnight(t("2026-07-02T03:59:59Z")),
            t("2026-07-02T04:00:00Z")
        );
        assert_eq!(
            next_midnight(t("2026-07-02T04:00:00Z")),
            t("2026-07-03T04:00:00Z")
        );
        // The night DST ends (2026-11-01): midnight is still EDT.
        assert_eq!(
            next_midnight(t("2026-10-31T12:00:00Z")),
            t("2026-11-01T04:00:00Z")
        );
        assert_eq!(day_of(t("2026-12-03T04:59:59Z")).to_string(), "2026-12-02");
    }

    #[test]
    fn piece_keys_round_trip_and_pieces_check_their_name() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap();
        let key = piece_key("signals", day, 1, 1000);
        assert_eq!(
            key,
            "webhooks/signals/2026-12-02/00000000000000000001-00000000000000001000"
        );
        assert_eq!(parse_piece_key("signals", &key), Some((day, 1, 1000)));
        let repo = uuid::Uuid::now_v7();
        let entries: Vec<Entry> = (1..=3)
            .map(|seq| Entry {
                seq,
                received_at: DateTime::<Utc>::from_timestamp_micros(
                    1_764_680_400_000_000 + seq as i64,
                )
                .unwrap(),
                body: format!("{{\"n\":{seq}}}").into_bytes(),
            })
            .collect();
        let plain = encode_piece(repo, "signals", day, &entries);
        let k3 = piece_key("signals", day, 1, 3);
        assert_eq!(decode_piece(&k3, repo, "signals", &plain).unwrap(), entries);
        assert!(decode_piece(&piece_key("signals", day, 1, 4), repo, "signals", &plain).is_err());
        assert!(decode_piece(&k3, uuid::Uuid::now_v7(), "signals", &plain).is_err());
        assert!(quote_table("public.signals").is_ok());
        assert!(quote_table("x; drop table y").is_err());
    }
}
