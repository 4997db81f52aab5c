//! What the non-PostgreSQL sources share: a reader that measures and hashes the stream it passes
//! on (SHA3-256 of the raw bytes, recorded in the manifest and checked again on restore), the
//! tail of a child's standard error, and a child process run in its own process group so a
//! timeout kills the whole pipeline a shell command started, not only the shell.
//!
//! Invariants:
//! - [`Measured`] never buffers: it hashes each read as it passes.
//! - [`StderrTail`] keeps at most [`STDERR_TAIL`] bytes, the last ones (where tools say why).
//! - A [`Group`] dropped before its child was reaped kills the child's whole process group
//!   (SIGKILL), so a timed-out or abandoned command leaves nothing running.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use sha3::{Digest, Sha3_256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Bytes of a child's standard error kept for the error message.
pub const STDERR_TAIL: usize = 2048;

/// Byte count and SHA3-256 of a stream, shared between the reader and whoever reads the figures
/// once the stream is consumed.
#[derive(Clone, Default)]
pub struct Measure(Arc<Mutex<(u64, Sha3_256)>>);

impl Measure {
    /// Bytes seen and the SHA3-256 (hex) of them.
    pub fn figures(&self) -> (u64, String) {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        (g.0, hex(&g.1.clone().finalize()))
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Passes `inner` through, counting and hashing every byte into its [`Measure`].
pub struct Measured<R> {
    inner: R,
    measure: Measure,
}

impl<R> Measured<R> {
    pub fn new(inner: R) -> (Measured<R>, Measure) {
        let measure = Measure::default();
        (
            Measured {
                inner,
                measure: measure.clone(),
            },
            measure,
        )
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Measured<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                let mut g = self.measure.0.lock().unwrap_or_else(|p| p.into_inner());
                g.0 += new.len() as u64;
                g.1.update(new);
            }
        }
        r
    }
}

/// Reads a child's standard error to its end, keeping the last [`STDERR_TAIL`] bytes.
pub struct StderrTail(tokio::task::JoinHandle<String>);

impl StderrTail {
    pub fn spawn<R>(stderr: Option<R>) -> StderrTail
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        StderrTail(tokio::spawn(async move {
            let Some(mut stderr) = stderr else {
                return String::new();
            };
            let mut tail: Vec<u8> = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
            String::from_utf8_lossy(&tail).trim().to_string()
        }))
    }

    /// The tail, once the child closed its standard error.
    pub async fn finish(self) -> String {
        self.0.await.unwrap_or_default()
    }

    /// Whatever was read so far is lost with the task; used when the child is being killed.
    pub fn abort(self) {
        self.0.abort();
    }
}

/// Kills a child's process group when dropped, unless the child was reaped.
pub struct Group {
    pgid: Option<i32>,
}

impl Group {
    /// Guards `child`, which must have been spawned with `process_group(0)`.
    pub fn new(child: &tokio::process::Child) -> Group {
        Group {
            pgid: child.id().and_then(|p| i32::try_from(p).ok()),
        }
    }

    /// The child was reaped: kill the rest of its group (a pipeline's stragglers), then forget it.
    pub fn reaped(&mut self) {
        self.kill();
        self.pgid = None;
    }

    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) with a negative pid signals a process group; no memory involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An exit status in words: `exit code 3`, `killed by signal 9`.
pub fn status_text(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}
