//! Byte streams between producers (COPY, `pg_dump`) and the caller's sink, with bounded memory.
//!
//! Invariants:
//! - A producer hands its bytes over a bounded channel in batches of about [`BATCH`] bytes, so at
//!   most `CHANNEL_DEPTH * BATCH` bytes per part are in flight, whatever the table size.
//! - The reader given to the sink reports end-of-file only after the producer said the stream
//!   ended cleanly. A failing producer, or one that vanished (panic, abort), makes the reader
//!   return an error, so a truncated part is never mistaken for a complete one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

/// Bytes handed over per message.
pub(crate) const BATCH: usize = 256 * 1024;
/// Messages in flight per part.
const CHANNEL_DEPTH: usize = 4;

enum Msg {
    Data(Bytes),
    End,
    Fail(io::Error),
}

/// The producer's end of a part stream.
pub(crate) struct PartWriter {
    tx: mpsc::Sender<Msg>,
    batch: BytesMut,
    bytes: u64,
}

/// The consumer closed the stream before the producer finished.
#[derive(Debug)]
pub(crate) struct ReaderGone;

/// A new part stream: the producer writes into the [`PartWriter`], the sink reads the
/// [`PartStream`].
pub(crate) fn part_stream() -> (PartWriter, PartStream) {
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    (
        PartWriter {
            tx,
            batch: BytesMut::with_capacity(BATCH),
            bytes: 0,
        },
        PartStream {
            rx,
            cur: Bytes::new(),
            state: ReaderState::Open,
        },
    )
}

impl PartWriter {
    /// Appends bytes, handing a batch over when it is full.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ReaderGone> {
        self.bytes += data.len() as u64;
        self.batch.extend_from_slice(data);
        if self.batch.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hands over an already-filled buffer without copying (flushing any pending batch first).
    pub async fn write_bytes(&mut self, data: Bytes) -> Result<(), ReaderGone> {
        self.flush().await?;
        self.bytes += data.len() as u64;
        self.tx.send(Msg::Data(data)).await.map_err(|_| ReaderGone)
    }

    async fn flush(&mut self) -> Result<(), ReaderGone> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.batch, BytesMut::with_capacity(BATCH));
        self.tx
            .send(Msg::Data(full.freeze()))
            .await
            .map_err(|_| ReaderGone)
    }

    /// Ends the stream cleanly: the reader will report end-of-file.
    pub async fn finish(mut self) -> Result<u64, ReaderGone> {
        self.flush().await?;
        self.tx.send(Msg::End).await.map_err(|_| ReaderGone)?;
        Ok(self.bytes)
    }

    /// Ends the stream with an error: the reader will fail with `message`.
    pub async fn fail(self, message: String) {
        // If the reader is gone there is nobody to tell.
        let _ = self.tx.send(Msg::Fail(io::Error::other(message))).await;
    }
}

#[derive(PartialEq, Eq)]
enum ReaderState {
    Open,
    Ended,
    Failed,
}

/// The sink's end of a part stream.
pub(crate) struct PartStream {
    rx: mpsc::Receiver<Msg>,
    cur: Bytes,
    state: ReaderState,
}

impl AsyncRead for PartStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.cur.is_empty() {
                let n = self.cur.len().min(buf.remaining());
                buf.put_slice(&self.cur[..n]);
                self.cur.advance(n);
                return Poll::Ready(Ok(()));
            }
            match self.state {
                ReaderState::Ended => return Poll::Ready(Ok(())),
                ReaderState::Failed => {
                    return Poll::Ready(Err(io::Error::other("the part's producer failed")));
                }
                ReaderState::Open => {}
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Msg::Data(b))) => self.cur = b,
                Poll::Ready(Some(Msg::End)) => self.state = ReaderState::Ended,
                Poll::Ready(Some(Msg::Fail(e))) => {
                    self.state = ReaderState::Failed;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(None) => {
                    self.state = ReaderState::Failed;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the part's producer stopped without finishing it",
                    )));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Counts `\n` bytes. In COPY text format that is the number of rows: newlines inside values are
/// escaped as `\n` (two characters). Eight bytes at a time, exact (no false positives).
pub(crate) fn count_newlines(data: &[u8]) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const NL: u64 = ONES * b'\n' as u64;
    let mut chunks = data.chunks_exact(8);
    let mut count = 0u64;
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let x = u64::from_ne_bytes(w) ^ NL;
        // High bit of each byte set iff that byte of x is zero (i.e. was a newline).
        let zero = !(((x & LOW7) + LOW7) | x | LOW7);
        count += u64::from(zero.count_ones());
    }
    count + chunks.remainder().iter().filter(|&&b| b == b'\n').count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn newline_counting_is_exact() {
        let samples: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"\n".to_vec(),
            b"a\tb\n\\n\nxyz".to_vec(),
            (0..=255u8).cycle().take(10_000).collect(),
            vec![b'\n'; 17],
            vec![0x8a; 64],
            vec![0x0b; 33],
        ];
        for s in samples {
            let naive = s.iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(count_newlines(&s), naive);
        }
    }

    #[tokio::test]
    async fn clean_end_reads_everything_and_failure_is_an_error() {
        let (mut w, mut r) = part_stream();
        let producer = tokio::spawn(async move {
            for i in 0..1000u32 {
                w.write(format!("{i}\n").as_bytes()).await.unwrap();
            }
            w.finish().await.unwrap()
        });
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out.lines().count(), 1000);
        assert_eq!(producer.await.unwrap(), out.len() as u64);

        let (mut w, mut r) = part_stream();
        tokio::spawn(async move {
            w.write(b"partial").await.unwrap();
            w.fail("COPY failed".into()).await;
        });
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).await.unwrap_err();
        assert!(err.to_string().contains("COPY failed"));

        let (w, mut r) = part_stream();
        drop(w);
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn writer_notices_a_departed_reader() {
        let (mut w, r) = part_stream();
        drop(r);
        let big = vec![0u8; BATCH];
        assert!(w.write(&big).await.is_err());
    }
}
