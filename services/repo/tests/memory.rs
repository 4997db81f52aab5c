//! Peak memory of a backup does not grow with the size of the data.
//!
//! Its own test binary (one test), because it reads the process's peak resident set size.

mod common;

use std::pin::Pin;
use std::task::{Context, Poll};

use backstop_repo::RepoParams;
use common::*;
use tokio::io::{AsyncRead, ReadBuf};

/// `len` bytes of pseudo-random data, generated as they are read (never held in memory).
struct Generated {
    left: u64,
    x: u64,
}

impl AsyncRead for Generated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left).min(64 << 10) as usize;
        let mut out = vec![0u8; n];
        for c in out.chunks_mut(8) {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let b = self.x.to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
        buf.put_slice(&out);
        self.left -= n as u64;
        Poll::Ready(Ok(()))
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn backup_generated(t: &TestRepo, len: u64, seed: u64) -> u64 {
    let w = t
        .repo
        .start_backup(meta(backstop_events::BackupKind::Full))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    // Two concurrent streams, as a parallel dump produces.
    for i in 0..2u64 {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            w.add_stream(
                &format!("s{i}"),
                Generated {
                    left: len / 2,
                    x: seed * 7 + i + 1,
                },
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    w.finish(serde_json::Value::Null).await.unwrap().raw_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_memory_is_bounded_whatever_the_data_size() {
    let t = TestRepo::new(RepoParams::default()).await;
    let base = peak_rss_kib();
    assert_eq!(backup_generated(&t, 48 << 20, 1).await, 48 << 20);
    let after_small = peak_rss_kib();
    assert_eq!(backup_generated(&t, 192 << 20, 2).await, 192 << 20);
    let after_large = peak_rss_kib();
    eprintln!(
        "peak RSS: start {} MiB, after 48 MiB {} MiB, after 192 MiB {} MiB",
        base / 1024,
        after_small / 1024,
        after_large / 1024
    );
    // Four times the data, little more memory (allocator arenas of the blocking pool's threads
    // account for what growth there is); and the peak stays below the size of the data itself,
    // far under the product's 300 MB budget.
    assert!(
        after_large - after_small < 48 << 10,
        "peak grew by {} KiB",
        after_large - after_small
    );
    assert!(
        after_large - base < 128 << 10,
        "peak {} KiB above start",
        after_large - base
    );
}
