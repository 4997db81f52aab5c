//! Shared by the physical and WAL tests: a directory-backed [`WalStore`] and part store standing
//! in for the repository, and the test binary itself as PostgreSQL's `archive_command` and
//! `restore_command` (an ignored test, `wal_helper`, that does what `backstop wal-push` and
//! `backstop wal-fetch` do, then exits with their exit status).
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backstop_sources::pg::logical::{DumpSink, DumpSource, PartReader, PartStored, SinkError};
use backstop_sources::pg::wal::{
    self, FetchOptions, PushOptions, StoredWal, WalEntry, WalFile, WalStore, WalStoreError,
    decode_stored, encode_stored,
};
use backstop_testkit::Postgres;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

/// WAL files as `<root>/wal/<timeline>/<name>` in the stored form ([`encode_stored`]), written
/// to a temporary name and hard-linked into place (so an existing file is never overwritten).
#[derive(Clone)]
pub struct DirWalStore {
    pub root: PathBuf,
}

impl DirWalStore {
    pub fn new(root: &Path) -> DirWalStore {
        DirWalStore {
            root: root.to_path_buf(),
        }
    }

    pub fn path_of(&self, name: &str) -> PathBuf {
        let tli = &name[..8];
        self.root.join("wal").join(tli).join(name)
    }

    /// Temporary files left in the store (by killed pushes).
    pub fn temp_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in std::fs::read_dir(self.root.join("wal"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                if f.file_name().to_string_lossy().starts_with('.') {
                    out.push(f.path());
                }
            }
        }
        out
    }

    /// Flips one byte of the file's data (past the header), as storage rot would.
    pub fn damage(&self, name: &str, at: usize) {
        let p = self.path_of(name);
        let mut bytes = std::fs::read(&p).expect("read stored segment");
        let i = 72 + at;
        bytes[i] ^= 0x40;
        std::fs::write(&p, bytes).expect("write damaged segment");
    }

    /// Segment names archived, sorted.
    pub fn segments(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .list_blocking()
            .into_iter()
            .filter(|n| WalFile::parse(n).is_some_and(|f| f.is_segment()))
            .collect();
        out.sort();
        out
    }

    pub fn list_blocking(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in std::fs::read_dir(self.root.join("wal"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                let n = f.file_name().to_string_lossy().into_owned();
                if !n.starts_with('.') {
                    out.push(n);
                }
            }
        }
        out.sort();
        out
    }

    /// Lines of the helper's call log: `quick NAME extra=0` or `push NAME extra=N`.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join("push.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Lines of the event log the helper keeps (one per newly archived file, as the CLI would
    /// append a `wal.archived` event).
    pub fn events(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join("events.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[async_trait]
impl WalStore for DirWalStore {
    fn object_key(&self, file: &WalFile) -> String {
        format!("wal/{}/{}", &file.name[..8], file.name)
    }

    async fn put_segment(
        &self,
        file: &WalFile,
        data: Bytes,
        sha3: &str,
    ) -> Result<String, WalStoreError> {
        let path = self.path_of(&file.name);
        let dir = path.parent().expect("parent");
        tokio::fs::create_dir_all(dir).await?;
        // Readable and writable by both the test (root) and PostgreSQL's user.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777));
        let _ = std::fs::set_permissions(
            self.root.join("wal"),
            std::fs::Permissions::from_mode(0o777),
        );
        let tmp = dir.join(format!(".{}.tmp-{}", file.name, std::process::id()));
        let body = encode_stored(sha3, &data);
        let mut f = tokio::fs::File::create(&tmp).await?;
        if std::env::var("BACKSTOP_TEST_WAL_STALL").as_deref() == Ok(file.name.as_str()) {
            // Simulates a push killed halfway through its upload.
            f.write_all(&body[..body.len() / 2]).await?;
            f.sync_all().await?;
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        f.write_all(&body).await?;
        f.sync_all().await?;
        drop(f);
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(self.object_key(file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(
                WalStoreError::unavailable(format!("{} appeared concurrently", file.name)),
            ),
            Err(e) => Err(e.into()),
        }
    }

    async fn get_segment(&self, name: &str) -> Result<Option<StoredWal>, WalStoreError> {
        match tokio::fs::read(self.path_of(name)).await {
            Ok(b) => Ok(Some(decode_stored(name, Bytes::from(b))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn head(&self, name: &str) -> Result<Option<String>, WalStoreError> {
        use tokio::io::AsyncReadExt;
        let mut f = match tokio::fs::File::open(self.path_of(name)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut head = vec![0u8; 72];
        f.read_exact(&mut head).await?;
        Ok(Some(decode_stored(name, Bytes::from(head))?.sha3))
    }

    async fn list(&self) -> Result<Vec<WalEntry>, WalStoreError> {
        let mut out = Vec::new();
        for name in self.list_blocking() {
            let bytes = std::fs::metadata(self.path_of(&name))
                .map(|m| m.len())
                .unwrap_or(0);
            out.push(WalEntry { name, bytes });
        }
        Ok(out)
    }
}

/// Base backup parts as files (names hex-encoded), written as they stream.
pub struct DirParts {
    pub dir: tempfile::TempDir,
}

impl DirParts {
    pub fn new() -> DirParts {
        DirParts {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.path().join(hex)
    }
}

#[async_trait]
impl DumpSink for DirParts {
    async fn put_part(&self, name: &str, mut reader: PartReader) -> Result<PartStored, SinkError> {
        let tmp = self.path(&format!("{name}.partial"));
        let mut file = tokio::fs::File::create(&tmp).await?;
        let n = tokio::io::copy(&mut reader, &mut file).await?;
        file.flush().await?;
        tokio::fs::rename(&tmp, self.path(name)).await?;
        Ok(PartStored {
            stored_bytes: n,
            new_bytes: n,
        })
    }
}

#[async_trait]
impl DumpSource for DirParts {
    async fn open_part(&self, name: &str) -> Result<PartReader, SinkError> {
        let file = tokio::fs::File::open(self.path(name))
            .await
            .map_err(|e| SinkError::with_source(format!("part {name} is missing"), e))?;
        Ok(Box::pin(file))
    }
}

fn helper_command(op: &str, store: &Path, args: &str) -> String {
    let exe = std::env::current_exe().expect("current_exe");
    format!(
        "BACKSTOP_TEST_WAL_OP={op} BACKSTOP_TEST_WAL_STORE={} {args} {} wal_helper --exact --include-ignored --nocapture --test-threads=1 -q",
        store.display(),
        exe.display()
    )
}

/// `archive_command` running this test binary's `wal_helper` as `wal-push %p`.
pub fn archive_command(store: &Path) -> String {
    archive_command_with(store, "")
}

/// [`archive_command`] with extra `NAME=value` environment assignments for the helper.
pub fn archive_command_with(store: &Path, env: &str) -> String {
    helper_command("push", store, &format!("{env} BACKSTOP_TEST_WAL_P=%p"))
}

/// `restore_command` running this test binary's `wal_helper` as `wal-fetch %f %p`.
pub fn restore_command(store: &Path) -> String {
    restore_command_with(store, "")
}

/// [`restore_command`] with extra `NAME=value` environment assignments for the helper.
pub fn restore_command_with(store: &Path, env: &str) -> String {
    helper_command(
        "fetch",
        store,
        &format!("{env} BACKSTOP_TEST_WAL_F=%f BACKSTOP_TEST_WAL_P=%p"),
    )
}

/// What `backstop wal-push` / `wal-fetch` do, driven by environment variables, on a
/// [`DirWalStore`]; exits the process with their exit status. Does nothing when the variables
/// are not set.
pub fn helper_main() {
    helper_main_with(|dir| async move { Box::new(DirWalStore::new(&dir)) as Box<dyn WalStore> });
}

/// [`helper_main`] on the store `open` makes from `BACKSTOP_TEST_WAL_STORE`.
pub fn helper_main_with<F, Fut>(open: F)
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Box<dyn WalStore>>,
{
    let Ok(op) = std::env::var("BACKSTOP_TEST_WAL_OP") else {
        return;
    };
    let root =
        PathBuf::from(std::env::var("BACKSTOP_TEST_WAL_STORE").expect("BACKSTOP_TEST_WAL_STORE"));
    let p = PathBuf::from(std::env::var("BACKSTOP_TEST_WAL_P").expect("BACKSTOP_TEST_WAL_P"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let code = rt.block_on(async {
        let store = open(root.clone()).await;
        let store = store.as_ref();
        match op.as_str() {
            "push" => {
                let opts = PushOptions::default();
                let result = match wal::already_pushed(&p, &opts).await {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) => wal::push(&p, &opts, store).await,
                    Err(e) => Err(e),
                };
                if let Ok(r) = &result
                    && let Ok(mut log) = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(root.join("push.log"))
                {
                    let how = if r.from_marker { "quick" } else { "push" };
                    let _ = writeln!(log, "{how} {} extra={}", r.requested.name, r.extra.len());
                }
                match result {
                    Ok(report) => {
                        // As the CLI appends events: idempotent by a key derived from the file.
                        let path = root.join("events.log");
                        let seen = std::fs::read_to_string(&path).unwrap_or_default();
                        let mut log = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&path)
                            .expect("events.log");
                        for a in report.to_announce() {
                            let line =
                                format!("wal.archived {} {} {}", a.name, a.sha3, a.event_key());
                            if !seen.lines().any(|l| l == line) {
                                let _ = writeln!(log, "{line}");
                            }
                        }
                        0
                    }
                    Err(e) => {
                        eprintln!("backstop wal-push: {e}");
                        1
                    }
                }
            }
            "fetch" => {
                let f = std::env::var("BACKSTOP_TEST_WAL_F").expect("BACKSTOP_TEST_WAL_F");
                match wal::fetch(&f, &p, &FetchOptions::default(), store).await {
                    Ok(wal::FetchOutcome::Unusable { reason, .. }) => {
                        eprintln!("backstop wal-fetch: {reason}");
                        1
                    }
                    Ok(o) => o.exit_code(),
                    Err(e) => {
                        eprintln!("backstop wal-fetch: {e}");
                        e.exit_code
                    }
                }
            }
            other => panic!("unknown helper op {other}"),
        }
    });
    std::process::exit(code);
}

/// A cluster archiving through the helper into `store`.
pub fn archiving_cluster(store: &Path) -> Postgres {
    archiving_cluster_with(&archive_command(store))
}

/// A cluster archiving with `archive_command`.
pub fn archiving_cluster_with(archive_command: &str) -> Postgres {
    Postgres::start_with(
        backstop_testkit::PostgresOptions::new()
            .conf("archive_mode = on")
            .conf(format!("archive_command = '{archive_command}'"))
            .conf("log_min_messages = info"),
    )
    .expect("start an archiving cluster")
}

/// Switches to a new WAL segment and waits until the finished one is archived; returns its name.
pub fn switch_and_wait(pg: &Postgres) -> String {
    // A record first, so the switch is never a no-op on an empty segment.
    pg.psql(
        "postgres",
        "SELECT pg_logical_emit_message(false, 'backstop-test', 'x')",
    )
    .expect("emit");
    let name = pg
        .psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
        .expect("switch");
    wait_archived(pg, &name);
    name
}

/// Waits until `pg_stat_archiver` reports `name` (or a later file) archived.
pub fn wait_archived(pg: &Postgres, name: &str) {
    let start = Instant::now();
    loop {
        let last = pg
            .psql(
                "postgres",
                "SELECT coalesce(last_archived_wal, '') || '|' || coalesce(last_failed_wal, '') FROM pg_stat_archiver",
            )
            .expect("pg_stat_archiver");
        let (archived, _failed) = last.split_once('|').unwrap_or((&last, ""));
        if archived.get(..24).is_some_and(|a| a >= name) {
            return;
        }
        assert!(
            start.elapsed() < backstop_testkit::deadline(),
            "{name} was not archived in time (pg_stat_archiver: {last}); log:\n{}",
            pg.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The server's clock, as an RFC 3339 UTC timestamp.
pub fn server_now(pg: &Postgres) -> chrono::DateTime<chrono::Utc> {
    let s = pg
        .psql(
            "postgres",
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        )
        .expect("clock");
    s.parse().expect("timestamp")
}
