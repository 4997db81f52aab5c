//! A bandwidth cap on what a backup reads from its source, for trading hours (seed 000 R10.3):
//! a backup that must run while the platform trades takes at most so many bytes per second
//! from the database, whatever the number of parallel streams.
//!
//! One [`RateLimit`] (a token bucket: `bytes_per_second` tokens a second, at most one second's
//! worth saved up) is shared by every stream of a backup; each stream's reader is wrapped in a
//! [`Throttled`] that waits for tokens before handing bytes on. A physical backup passes the cap
//! to `pg_basebackup --max-rate` instead ([`max_rate_arg`]), which throttles at the server.
//!
//! The bucket reads time from tokio's clock, so tests run it on paused time (no real sleeping).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A shared token bucket of bytes.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_second: u64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl RateLimit {
    /// At most `bytes_per_second` (at least 1) across every reader sharing it.
    pub fn new(bytes_per_second: u64) -> Arc<RateLimit> {
        let bytes_per_second = bytes_per_second.max(1);
        Arc::new(RateLimit {
            bytes_per_second,
            state: Mutex::new(Bucket {
                tokens: bytes_per_second as f64,
                refilled: Instant::now(),
            }),
        })
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// Takes up to `want` bytes' worth of tokens: how many it got, or how long to wait.
    fn take(&self, want: usize) -> Result<usize, std::time::Duration> {
        // A poisoned lock only means a reader panicked; the bucket's numbers are still sound.
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let rate = self.bytes_per_second as f64;
        let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.refilled = now;
        if b.tokens >= 1.0 {
            let got = (b.tokens as usize).min(want).max(1);
            b.tokens -= got as f64;
            Ok(got)
        } else {
            let missing = 1.0 - b.tokens;
            Err(std::time::Duration::from_secs_f64(missing / rate))
        }
    }
}

/// `pg_basebackup --max-rate` for a cap: kilobytes per second, within the tool's 32 kB/s to
/// 1 GB/s.
pub fn max_rate_arg(bytes_per_second: u64) -> String {
    format!("{}k", (bytes_per_second / 1024).clamp(32, 1024 * 1024))
}

/// A reader that hands on no more bytes than its [`RateLimit`] allows.
pub struct Throttled<R> {
    inner: R,
    limit: Arc<RateLimit>,
    wait: Option<Pin<Box<Sleep>>>,
    /// Bytes granted by the bucket but not yet read: granted before reading, so the grant is
    /// kept across a `Pending` inner read.
    granted: usize,
    scratch: Vec<u8>,
}

impl<R> Throttled<R> {
    pub fn new(inner: R, limit: Arc<RateLimit>) -> Throttled<R> {
        Throttled {
            inner,
            limit,
            wait: None,
            granted: 0,
            scratch: Vec::new(),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Throttled<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while this.granted == 0 {
            if let Some(wait) = this.wait.as_mut() {
                match wait.as_mut().poll(cx) {
                    Poll::Ready(()) => this.wait = None,
                    Poll::Pending => return Poll::Pending,
                }
            }
            match this.limit.take(buf.remaining()) {
                Ok(got) => this.granted = got,
                Err(delay) => this.wait = Some(Box::pin(tokio::time::sleep(delay))),
            }
        }
        if this.granted >= buf.remaining() {
            let before = buf.filled().len();
            let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
            if polled.is_ready() {
                this.granted = this.granted.saturating_sub(buf.filled().len() - before);
            }
            return polled;
        }
        // Read at most the grant through a scratch buffer of that size.
        let n = this.granted;
        this.scratch.resize(n, 0);
        let mut window = ReadBuf::new(&mut this.scratch[..n]);
        match Pin::new(&mut this.inner).poll_read(cx, &mut window) {
            Poll::Ready(Ok(())) => {
                let read = window.filled().len();
                buf.put_slice(window.filled());
                this.granted -= read;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test(start_paused = true)]
    async fn readers_sharing_a_limit_get_its_rate_together() {
        let limit = RateLimit::new(100_000);
        let started = Instant::now();
        let data = vec![7u8; 250_000];
        let mut a = Throttled::new(&data[..], limit.clone());
        let mut b = Throttled::new(&data[..], limit.clone());
        let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
        let (ra, rb) = tokio::join!(a.read_to_end(&mut out_a), b.read_to_end(&mut out_b));
        ra.unwrap();
        rb.unwrap();
        assert_eq!(out_a, data);
        assert_eq!(out_b, data);
        // 500 kB at 100 kB/s with one second saved up: about 4 s of (paused, virtual) time.
        let took = started.elapsed().as_secs_f64();
        assert!((3.9..=4.2).contains(&took), "took {took} s");
    }

    #[test]
    fn max_rate_stays_in_the_tools_range() {
        assert_eq!(max_rate_arg(10 * 1024 * 1024), "10240k");
        assert_eq!(max_rate_arg(1), "32k");
        assert_eq!(max_rate_arg(u64::MAX), "1048576k");
    }
}
