//! How many malloc arenas the process may have.
//!
//! glibc gives a thread that meets contention an arena of its own, up to eight per core, and
//! memory freed into one arena is reused only by the threads that use it. Tokio moves tasks
//! between its workers and its blocking threads, so a long backup or restore spreads its
//! buffers over many arenas, and the peak grew with the size of the database though every
//! buffer is bounded. Measured with `backstop bench scale --rows 1000000,4000000 --runs 1
//! --methods logical` on 2 cores: the restore's peak went from 93 MB and 120 MB with glibc's
//! default to 63 MB and 72 MB with two arenas. The largest peak, that of the full backup, went
//! from 96 MB and 123 MB (1.28x) to 92 MB and 104 MB (1.13x). Times did not change beyond
//! the noise of single runs.
//!
//! The limit is one arena per core, at least two. It is set in `main` before any other thread
//! exists. `MALLOC_ARENA_MAX` in the environment still decides when it is set, since glibc
//! reads it itself.

/// Limits glibc's arenas to one per core (module docs). Elsewhere it does nothing.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = i32::try_from(cores.max(2)).unwrap_or(i32::MAX);
        // SAFETY: mallopt(3) only sets an allocator tunable, and no other thread exists yet.
        // It returns 0 when the value is refused; the default arenas then stay, which is safe.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}
