//! A fixed pool of threads for a backup's CPU work: chunk ids, brotli, sealing.
//!
//! Why not `spawn_blocking`: tokio's blocking pool grows to hundreds of threads over a long
//! backup, and glibc gives each allocating thread its own malloc arena (up to eight per core).
//! Brotli's working buffers then stay resident in every arena that ever compressed a chunk, so
//! peak memory grows with how long a backup runs instead of with how many chunks are in flight.
//! A pool of exactly `cpu_jobs` threads keeps both the parallelism and the arenas bounded.
//!
//! Jobs run in submission order; a job that panics is reported to its caller as an error and
//! the thread goes on with the next job. Dropping the pool lets its threads finish the queued
//! jobs and exit.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, mpsc};

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct CpuPool {
    tx: Mutex<mpsc::Sender<Job>>,
}

/// The job could not run or did not finish (it panicked, or the pool is gone).
#[derive(Debug)]
pub(crate) struct JobLost;

impl CpuPool {
    pub fn new(threads: usize) -> CpuPool {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("backstop-cpu-{i}"))
                .spawn(move || {
                    loop {
                        // Hold the lock only to take a job, never while running it.
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a CPU thread; continuing with fewer");
            }
        }
        CpuPool { tx: Mutex::new(tx) }
    }

    /// Runs `f` on the pool and waits for its result without blocking the async runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, JobLost> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if let Ok(v) = catch_unwind(AssertUnwindSafe(f)) {
                let _ = done_tx.send(v);
            }
        });
        self.tx
            .lock()
            .map_err(|_| JobLost)?
            .send(job)
            .map_err(|_| JobLost)?;
        done_rx.await.map_err(|_| JobLost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_on_its_own_threads_and_survives_a_panic() {
        let pool = CpuPool::new(2);
        let name = pool
            .run(|| std::thread::current().name().unwrap_or("").to_string())
            .await
            .unwrap();
        assert!(name.starts_with("backstop-cpu-"), "{name}");
        assert!(pool.run(|| panic!("boom")).await.is_err());
        assert_eq!(pool.run(|| 40 + 2).await.unwrap(), 42);
    }
}
