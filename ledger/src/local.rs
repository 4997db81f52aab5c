//! The control socket: appends, the head and a follow stream over a Unix domain socket, so the
//! CLI works beside the process that holds the ledger (sled allows one process) without NATS.
//!
//! `backstop serve` binds `DATA_DIR/control.sock` ([`ControlServer`]); commands that find the
//! ledger locked use [`LocalLedger`], which implements [`Appender`] like [`crate::Ledger`] and
//! [`crate::remote::RemoteLedger`].
//!
//! # Wire format
//!
//! One request per connection. Every message in either direction is a frame: a 4-byte unsigned
//! big-endian length, then that many bytes of JSON. The client sends one request frame:
//!
//! ```text
//! {"append": {"stream": "...", "expected": {"expect": "any"}, "events": [NewEvent, ...]}}
//! "head"
//! {"follow": {"from": 42}}
//! ```
//!
//! and the server answers with frames of one of these shapes:
//!
//! ```text
//! {"append": {"ok": Appended} | {"error": {"kind": "...", "message": "...", "actual": 3}}}
//! {"head": {"position": 41, "hash": "hex"}}
//! {"events": [Envelope, ...]}
//! {"end": {"reason": "..."}}
//! {"error": {"kind": "denied"|"too_large"|"malformed"|"deadline"|"storage"|..., "message": "..."}}
//! ```
//!
//! - `append` is answered by one `append` frame, the same reply as a remote append over NATS
//!   (see [`crate::requests`]): the request goes through the same [`crate::requests::answer`],
//!   so type, schema, size, batch and stream checks are those of every other append.
//! - `head` is answered by one `head` frame (position 0 for an empty ledger).
//! - `follow` is answered by a `head` frame (the head when following began, so a reader knows
//!   where catch-up ends), then `events` frames in position order from `from` (inclusive),
//!   catch-up then live, until the client closes the connection or the server stops, which it
//!   announces with an `end` frame. Only flushed (acknowledged) events are sent.
//! - `error` is sent instead of any of these when the connection is refused or the request is
//!   bad; the server then closes the connection.
//!
//! # Invariants
//!
//! - The socket file has mode 0600 from the moment it appears at its path: it is bound in a
//!   private 0700 directory, chmodded, then renamed into place.
//! - Only the socket's owner (the server's own uid) and root are served, checked with
//!   `SO_PEERCRED` on every connection; anyone else gets a `denied` error and is recorded as an
//!   `access.denied` event with the uid.
//! - A request frame is at most [`MAX_REQUEST_BYTES`]; a longer one is refused from its length
//!   alone, before its body is read. A reply frame is at most [`MAX_REPLY_BYTES`].
//! - Every request must arrive and be answered within [`REQUEST_DEADLINE`]; every frame of a
//!   follow stream must be taken by the client within it, or the connection is dropped.
//! - A socket file whose server is gone (a killed serve) is found by connecting to it and
//!   replaced; a live one makes [`ControlServer::bind`] fail with [`LedgerError::Locked`]. At
//!   shutdown the server removes the socket file, if it is still the one it created.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backstop_events::{AccessDenied, Actor, Digest, Envelope, Event, NewEvent, streams};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};

use crate::error::LedgerError;
use crate::requests::{self, AppendReply, AppendRequest};
use crate::store::Head;
use crate::{Appended, Appender, ExpectedVersion, Ledger};

/// The socket's file name in the data directory.
pub const SOCKET_FILE: &str = "control.sock";
/// The largest request frame the server reads.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// The largest reply frame either side sends or reads.
pub const MAX_REPLY_BYTES: usize = 16 << 20;
/// How long a request may take, from connection to answer (and each follow frame to be taken).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// Events read from the ledger per follow frame (a frame that would exceed the reply limit is
/// split).
const FOLLOW_BATCH: usize = 256;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Resolves once `shutdown` is true (or its sender is gone), without holding its guard.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// `DATA_DIR/control.sock`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// The uid policy: the socket's owner and root, nobody else.
pub fn peer_allowed(peer_uid: u32, owner_uid: u32) -> bool {
    peer_uid == owner_uid || peer_uid == 0
}

/// What the client sends (one per connection).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRequest {
    Append(AppendRequest),
    Head,
    Follow { from: u64 },
}

/// What the server sends.
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "snake_case")]
pub enum ControlReply {
    Append(AppendReply),
    Head { position: u64, hash: Digest },
    Events(Vec<Envelope>),
    End { reason: String },
    Error { kind: String, message: String },
}

impl ControlReply {
    fn error(kind: &str, message: impl Into<String>) -> ControlReply {
        ControlReply::Error {
            kind: kind.to_string(),
            message: message.into(),
        }
    }

    fn head(head: Head) -> ControlReply {
        ControlReply::Head {
            position: head.position,
            hash: head.hash,
        }
    }
}

#[derive(Debug)]
enum FrameError {
    Io(std::io::Error),
    TooLarge { len: usize, max: usize },
}

/// Reads one frame; `None` when the peer closed before sending a length.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(FrameError::Io)?;
    Ok(Some(body))
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    w.write_all(&frame).await?;
    w.flush().await
}

fn encode(reply: &ControlReply) -> Vec<u8> {
    // Serializing these plain data types cannot fail; an empty frame would be reported by the
    // client as malformed rather than hang it.
    serde_json::to_vec(reply).unwrap_or_default()
}

fn io_error(path: &Path, source: std::io::Error) -> LedgerError {
    LedgerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check_path_length(path: &Path) -> Result<(), LedgerError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(io_error(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "a Unix socket path may be at most {MAX_SOCKET_PATH} bytes and this one is {len}; use a shorter --data-dir"
                ),
            ),
        ));
    }
    Ok(())
}

/// Leaves `path` free for a new socket: absent, or a socket nobody answers on (a killed serve's,
/// which the rename in [`ControlServer::bind`] replaces). A live socket is another serve's.
fn check_stale(path: &Path) -> Result<(), LedgerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(path, e)),
    };
    if !meta.file_type().is_socket() {
        return Err(io_error(
            path,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; move it out of the data directory",
            ),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(LedgerError::Locked {
            path: path.to_path_buf(),
        }),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            ) =>
        {
            tracing::info!(path = %path.display(), "replacing a stale control socket (its serve is gone)");
            Ok(())
        }
        Err(e) => Err(io_error(path, e)),
    }
}

/// The serving side of the control socket.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's device and inode: removed at shutdown only while it is still ours.
    file_id: (u64, u64),
    shared: Arc<Shared>,
}

struct Shared {
    ledger: Ledger,
    owner_uid: u32,
    path: PathBuf,
}

impl ControlServer {
    /// Creates the socket at `path` (mode 0600), replacing a stale one. Needs a Tokio runtime.
    pub fn bind(path: &Path, ledger: Ledger) -> Result<ControlServer, LedgerError> {
        check_path_length(path)?;
        check_stale(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        // Bound in a private directory and renamed into place, so the socket is never reachable
        // at its public path with the process umask's mode.
        let staging = dir.join(format!(".ctl-{}", std::process::id()));
        let staged = staging.join("s");
        check_path_length(&staged)?;
        if staging.exists() {
            // Left by an earlier process that had this pid and was killed mid-bind.
            std::fs::remove_dir_all(&staging).map_err(|e| io_error(&staging, e))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(|e| io_error(&staging, e))?;
        let bound = (|| {
            let listener = std::os::unix::net::UnixListener::bind(&staged)
                .map_err(|e| io_error(&staged, e))?;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io_error(&staged, e))?;
            let meta = std::fs::symlink_metadata(&staged).map_err(|e| io_error(&staged, e))?;
            std::fs::rename(&staged, path).map_err(|e| io_error(path, e))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| io_error(path, e))?;
            let listener = UnixListener::from_std(listener).map_err(|e| io_error(path, e))?;
            Ok::<_, LedgerError>((listener, meta))
        })();
        let _ = std::fs::remove_dir_all(&staging);
        let (listener, meta) = bound?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            file_id: (meta.dev(), meta.ino()),
            shared: Arc::new(Shared {
                ledger,
                // Our socket file was created by this process: its owner is our effective uid.
                owner_uid: meta.uid(),
                path: path.to_path_buf(),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until `shutdown` turns true; then stops accepting, ends follow
    /// streams, lets requests in hand finish (within their deadline) and removes the socket.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), LedgerError> {
        tracing::info!(path = %self.path.display(), "control socket listening");
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = JoinSet::new();
        loop {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = stopping(&mut shutdown) => break,
            };
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let shared = self.shared.clone();
                        let shutdown = shutdown.clone();
                        connections.spawn(async move {
                            handle(&shared, stream, shutdown).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // Usually out of file descriptors: wait instead of spinning.
                        tracing::warn!(error = %e, "control socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = stopping(&mut shutdown) => break,
            }
            while connections.try_join_next().is_some() {}
        }
        let ControlServer {
            listener,
            path,
            file_id,
            ..
        } = self;
        // Connections still in the backlog are refused now rather than after the drain.
        drop(listener);
        remove_socket_file(&path, file_id);
        let drain = async { while connections.join_next().await.is_some() {} };
        if timeout(REQUEST_DEADLINE + Duration::from_secs(1), drain)
            .await
            .is_err()
        {
            tracing::warn!("control socket: connections outlived their deadline; aborted");
        }
        tracing::info!(path = %path.display(), "control socket closed");
        Ok(())
    }
}

fn remove_socket_file(path: &Path, file_id: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == file_id => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the control socket");
            }
        }
        _ => tracing::warn!(
            path = %path.display(),
            "the control socket file was replaced or removed by someone else; leaving it"
        ),
    }
}

async fn handle(shared: &Shared, mut stream: UnixStream, shutdown: watch::Receiver<bool>) {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let peer = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "control socket: cannot read the peer's credentials; refused");
            return;
        }
    };
    if !peer_allowed(peer.uid(), shared.owner_uid) {
        let reason = format!(
            "the control socket serves only its owner (uid {}) and root, not uid {}",
            shared.owner_uid,
            peer.uid()
        );
        tracing::warn!(uid = peer.uid(), pid = ?peer.pid(), "control socket: connection refused");
        let reply = ControlReply::error("denied", reason.clone());
        let _ = timeout_at(deadline, write_frame(&mut stream, &encode(&reply))).await;
        drop(stream);
        record_denial(shared, peer.uid(), peer.pid(), reason).await;
        return;
    }
    let body = match timeout_at(deadline, read_frame(&mut stream, MAX_REQUEST_BYTES)).await {
        Ok(Ok(Some(body))) => body,
        // Connected and closed without a request: a liveness probe.
        Ok(Ok(None)) => return,
        Ok(Err(FrameError::TooLarge { len, max })) => {
            let reply = ControlReply::error(
                "too_large",
                format!(
                    "the request is {len} bytes; the control socket accepts at most {max}: append fewer or smaller events per request"
                ),
            );
            let _ = timeout_at(deadline, write_frame(&mut stream, &encode(&reply))).await;
            return;
        }
        Ok(Err(FrameError::Io(e))) => {
            tracing::debug!(error = %e, "control socket: the client left mid-request");
            return;
        }
        Err(_) => {
            let reply = ControlReply::error(
                "deadline",
                format!("no complete request within {REQUEST_DEADLINE:?}"),
            );
            let _ = timeout(
                Duration::from_secs(1),
                write_frame(&mut stream, &encode(&reply)),
            )
            .await;
            return;
        }
    };
    let reply = match serde_json::from_slice::<ControlRequest>(&body) {
        Err(e) => ControlReply::error(
            "malformed",
            format!(
                "the control request is not a length-prefixed JSON request of the expected shape ({e}); see the wire format in backstop_ledger::local"
            ),
        ),
        Ok(ControlRequest::Head) => ControlReply::head(shared.ledger.head()),
        Ok(ControlRequest::Follow { from }) => {
            follow(shared, stream, from, shutdown).await;
            return;
        }
        Ok(ControlRequest::Append(req)) => {
            match timeout_at(
                deadline,
                requests::answer(&shared.ledger, req, "control socket"),
            )
            .await
            {
                Ok(r) => ControlReply::Append(r),
                Err(_) => ControlReply::error(
                    "deadline",
                    format!(
                        "the append was not acknowledged within {REQUEST_DEADLINE:?}; it may still commit, and retrying with the same event ids is safe"
                    ),
                ),
            }
        }
    };
    if let ControlReply::Error { kind, message } = &reply {
        tracing::warn!(%kind, %message, "control socket: request refused");
    }
    if let Err(e) = timeout_at(deadline, write_frame(&mut stream, &encode(&reply))).await {
        tracing::debug!(error = %e, "control socket: the client did not take its reply in time");
    }
}

async fn record_denial(shared: &Shared, uid: u32, pid: Option<i32>, reason: String) {
    let caller = match pid {
        Some(pid) => format!("uid {uid} (pid {pid})"),
        None => format!("uid {uid}"),
    };
    let event = Event::AccessDenied(AccessDenied {
        caller,
        role: None,
        method: "connect".into(),
        path: shared.path.display().to_string(),
        reason,
        count: 1,
        window_seconds: 0,
    });
    let stream = streams::access();
    let e = NewEvent::new(stream.clone(), Actor::worker("control-socket"), &event);
    match timeout(
        Duration::from_secs(5),
        shared.ledger.append(&stream, ExpectedVersion::Any, vec![e]),
    )
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "could not record a refused control connection"),
        Err(_) => tracing::error!("recording a refused control connection timed out"),
    }
}

/// Frames for a batch of envelopes, each within [`MAX_REPLY_BYTES`] (a batch that would exceed
/// it is split). `Err(position)` names an event too large for any frame.
fn event_frames(batch: &[Envelope]) -> Result<Vec<Vec<u8>>, u64> {
    let frame = encode(&ControlReply::Events(batch.to_vec()));
    if frame.len() <= MAX_REPLY_BYTES {
        return Ok(vec![frame]);
    }
    if batch.len() == 1 {
        return Err(batch[0].position);
    }
    let (a, b) = batch.split_at(batch.len() / 2);
    let mut frames = event_frames(a)?;
    frames.extend(event_frames(b)?);
    Ok(frames)
}

async fn follow(
    shared: &Shared,
    stream: UnixStream,
    from: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let mut sub = shared.ledger.subscribe(from);
    let send = |reply: ControlReply| encode(&reply);
    if timeout(
        REQUEST_DEADLINE,
        write_frame(&mut wr, &send(ControlReply::head(shared.ledger.head()))),
    )
    .await
    .map_or(true, |r| r.is_err())
    {
        return;
    }
    let mut probe = [0u8; 1];
    loop {
        let batch = tokio::select! {
            b = sub.next_batch(FOLLOW_BATCH) => b,
            _ = stopping(&mut shutdown) => {
                let end = send(ControlReply::End { reason: "the serve is shutting down".into() });
                let _ = timeout(Duration::from_secs(1), write_frame(&mut wr, &end)).await;
                return;
            }
            // A follower only listens; anything it sends, or its close, ends the stream.
            _ = rd.read(&mut probe) => return,
        };
        let frames = match batch {
            Ok(b) if b.is_empty() => {
                let end = send(ControlReply::End {
                    reason: "the ledger closed".into(),
                });
                let _ = timeout(Duration::from_secs(1), write_frame(&mut wr, &end)).await;
                return;
            }
            Ok(b) => match event_frames(&b) {
                Ok(frames) => frames,
                Err(position) => vec![send(ControlReply::error(
                    "too_large",
                    format!(
                        "the event at position {position} is larger than a control frame ({MAX_REPLY_BYTES} bytes); read it with the ledger opened directly"
                    ),
                ))],
            },
            Err(e) => vec![send(ControlReply::error("storage", e.to_string()))],
        };
        for frame in frames {
            match timeout(REQUEST_DEADLINE, write_frame(&mut wr, &frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "control socket: a follower left");
                    return;
                }
                Err(_) => {
                    tracing::warn!("control socket: a follower stopped reading; dropped");
                    return;
                }
            }
        }
    }
}

/// The client: appends, the head and follow streams through a running serve's control socket.
#[derive(Clone, Debug)]
pub struct LocalLedger {
    path: PathBuf,
    deadline: Duration,
    attempts: u32,
}

impl LocalLedger {
    /// A client of the socket at `path`; nothing is checked until the first request.
    pub fn new(path: impl Into<PathBuf>) -> LocalLedger {
        LocalLedger {
            path: path.into(),
            // A little longer than the server's, so that its answer (with the reason) arrives
            // first.
            deadline: REQUEST_DEADLINE + Duration::from_secs(5),
            attempts: 3,
        }
    }

    /// A client of the socket at `path`, once it has answered a `head` request.
    pub async fn connect(path: impl Into<PathBuf>) -> Result<LocalLedger, LedgerError> {
        let l = LocalLedger::new(path);
        l.head().await?;
        Ok(l)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn transport(&self, what: impl std::fmt::Display) -> LedgerError {
        LedgerError::Remote(format!("control socket {}: {what}", self.path.display()))
    }

    fn refused(kind: &str, message: &str) -> LedgerError {
        requests::refusal(kind.to_string(), message.to_string())
    }

    async fn open(&self) -> Result<UnixStream, LedgerError> {
        UnixStream::connect(&self.path).await.map_err(|e| {
            self.transport(format!(
                "{e} (is `backstop serve` running with this data directory?)"
            ))
        })
    }

    async fn read_reply<R: AsyncRead + Unpin>(
        &self,
        r: &mut R,
    ) -> Result<ControlReply, LedgerError> {
        match read_frame(r, MAX_REPLY_BYTES).await {
            Ok(Some(body)) => serde_json::from_slice(&body)
                .map_err(|e| self.transport(format!("malformed reply: {e}"))),
            Ok(None) => Err(self.transport("the server closed the connection without a reply")),
            Err(FrameError::TooLarge { len, max }) => {
                Err(self.transport(format!("a reply of {len} bytes exceeds the limit of {max}")))
            }
            Err(FrameError::Io(e)) => Err(self.transport(e)),
        }
    }

    /// Sends one request frame holding `body` and reads one reply frame (for tests of malformed
    /// input, and for the requests below).
    pub async fn request_raw(&self, body: &[u8]) -> Result<ControlReply, LedgerError> {
        let exchange = async {
            let mut stream = self.open().await?;
            write_frame(&mut stream, body)
                .await
                .map_err(|e| self.transport(e))?;
            self.read_reply(&mut stream).await
        };
        timeout(self.deadline, exchange)
            .await
            .map_err(|_| self.transport(format!("no answer within {:?}", self.deadline)))?
    }

    fn encode_request(&self, req: &ControlRequest) -> Result<Vec<u8>, LedgerError> {
        let body = serde_json::to_vec(req)
            .map_err(|e| self.transport(format!("cannot encode the request: {e}")))?;
        if body.len() > MAX_REQUEST_BYTES {
            return Err(Self::refused(
                "too_large",
                &format!(
                    "the request is {} bytes; the control socket accepts at most {MAX_REQUEST_BYTES}: append fewer or smaller events per request",
                    body.len()
                ),
            ));
        }
        Ok(body)
    }

    /// The serve's committed head.
    pub async fn head(&self) -> Result<Head, LedgerError> {
        let body = self.encode_request(&ControlRequest::Head)?;
        match self.request_raw(&body).await? {
            ControlReply::Head { position, hash } => Ok(Head { position, hash }),
            ControlReply::Error { kind, message } => Err(Self::refused(&kind, &message)),
            other => Err(self.transport(format!("unexpected reply to head: {other:?}"))),
        }
    }

    /// Events from `from` (inclusive) onwards: catch-up, then live.
    pub async fn follow(&self, from: u64) -> Result<LocalFollow, LedgerError> {
        let body = self.encode_request(&ControlRequest::Follow { from })?;
        let start = async {
            let mut stream = self.open().await?;
            write_frame(&mut stream, &body)
                .await
                .map_err(|e| self.transport(e))?;
            let first = self.read_reply(&mut stream).await?;
            Ok::<_, LedgerError>((stream, first))
        };
        let (stream, first) = timeout(self.deadline, start)
            .await
            .map_err(|_| self.transport(format!("no answer within {:?}", self.deadline)))??;
        match first {
            ControlReply::Head { position, hash } => Ok(LocalFollow {
                client: self.clone(),
                stream,
                head_at_start: Head { position, hash },
                ended: false,
            }),
            ControlReply::Error { kind, message } => Err(Self::refused(&kind, &message)),
            other => Err(self.transport(format!("unexpected reply to follow: {other:?}"))),
        }
    }
}

#[async_trait]
impl Appender for LocalLedger {
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, LedgerError> {
        let req = requests::request(stream, expected, events)?;
        let body = self.encode_request(&ControlRequest::Append(req))?;
        let mut delay = Duration::from_millis(100);
        let mut last = None;
        for _ in 0..self.attempts {
            match self.request_raw(&body).await {
                Ok(ControlReply::Append(reply)) => return reply.into_result(stream, expected),
                Ok(ControlReply::Error { kind, message }) => {
                    return Err(Self::refused(&kind, &message));
                }
                Ok(other) => {
                    return Err(self.transport(format!("unexpected reply to append: {other:?}")));
                }
                // The request may or may not have reached the writer; appends are idempotent
                // by event id, so sending it again is safe.
                Err(e) => {
                    tracing::warn!(error = %e, "append through the control socket failed; retrying");
                    last = Some(e);
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        Err(last.unwrap_or_else(|| self.transport("no attempt made")))
    }
}

/// A follow stream from [`LocalLedger::follow`].
pub struct LocalFollow {
    client: LocalLedger,
    stream: UnixStream,
    head_at_start: Head,
    ended: bool,
}

impl LocalFollow {
    /// The head when following began: catch-up is complete once this position has been seen.
    pub fn head_at_start(&self) -> Head {
        self.head_at_start
    }

    /// The next events; waits while there are none. `Ok(empty)` means the serve stopped.
    pub async fn next_batch(&mut self) -> Result<Vec<Envelope>, LedgerError> {
        if self.ended {
            return Ok(Vec::new());
        }
        match self.client.read_reply(&mut self.stream).await? {
            ControlReply::Events(events) => Ok(events),
            ControlReply::End { reason } => {
                tracing::info!(%reason, "the follow stream ended");
                self.ended = true;
                Ok(Vec::new())
            }
            ControlReply::Error { kind, message } => Err(LocalLedger::refused(&kind, &message)),
            other => Err(self
                .client
                .transport(format!("unexpected frame in a follow stream: {other:?}"))),
        }
    }
}
