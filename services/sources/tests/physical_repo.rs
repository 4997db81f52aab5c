//! The physical data path end to end on the real repository (backstop-repo, local backend): base
//! backups streamed into it as chunked, deduplicated, sealed streams; WAL archived into it by
//! PostgreSQL through this test binary acting as `backstop wal-push` (sealed with the `wal` key);
//! a restore from it replaying that WAL. This is also the reference for the CLI's glue: the
//! `DumpSink`, `DumpSource` and `WalStore` implementations over the repository below.

#[path = "wal_support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use backstop_events::BackupKind;
use backstop_repo::{
    BackupMeta, BackupResult, BackupWriter, ChunkerParams, KeyAccessLog, KeyPurpose, LocalBackend,
    Manifest, MasterKey, RepoError, RepoParams, Repository,
};
use backstop_sources::pg::logical::{
    self, DumpSink, DumpSource, PartReader, PartStored, SinkError,
};
use backstop_sources::pg::physical::{
    self, BaseBackupOptions, BaseBackupReport, PhysicalRestoreOptions, RecoveryTarget,
};
use backstop_sources::pg::wal::{
    self, StoredWal, WalEntry, WalFile, WalStore, WalStoreError, WalVerifyOptions, decode_stored,
    encode_stored,
};
use backstop_testkit::{
    Postgres, PostgresOptions, give_to_server_user, server_tempdir, server_user,
};
use bytes::Bytes;
use uuid::Uuid;

/// A backup's parts as streams of one repository backup.
struct RepoSink {
    writer: BackupWriter,
}

fn sink_err(e: RepoError) -> SinkError {
    SinkError::with_source(e.to_string(), e)
}

#[async_trait]
impl DumpSink for RepoSink {
    async fn put_part(&self, name: &str, reader: PartReader) -> Result<PartStored, SinkError> {
        let s = self
            .writer
            .add_stream(name, reader)
            .await
            .map_err(sink_err)?;
        Ok(PartStored {
            stored_bytes: s.new_bytes,
            new_bytes: s.new_bytes,
        })
    }
}

/// A backup's parts read back from the repository.
struct RepoSource {
    repo: Repository,
    manifest: Manifest,
}

#[async_trait]
impl DumpSource for RepoSource {
    async fn open_part(&self, name: &str) -> Result<PartReader, SinkError> {
        let s = self
            .repo
            .open_stream(&self.manifest, name)
            .await
            .map_err(sink_err)?;
        Ok(Box::pin(s))
    }
}

/// WAL files as sealed blobs (`wal` data key) at `wal/<timeline>/<name>`, in the stored form
/// that carries the checksum recorded at push time.
struct RepoWalStore {
    repo: Repository,
}

fn wal_key(name: &str) -> String {
    format!("wal/{}/{name}", &name[..8.min(name.len())])
}

fn store_err(e: RepoError) -> WalStoreError {
    if matches!(e, RepoError::Corrupt { .. } | RepoError::Damaged { .. }) {
        WalStoreError::Corrupt {
            object: e.object_key().unwrap_or("?").to_string(),
            why: e.to_string(),
        }
    } else {
        WalStoreError::unavailable_with(e.to_string(), e)
    }
}

#[async_trait]
impl WalStore for RepoWalStore {
    fn object_key(&self, file: &WalFile) -> String {
        wal_key(&file.name)
    }

    async fn put_segment(
        &self,
        file: &WalFile,
        data: Bytes,
        sha3: &str,
    ) -> Result<String, WalStoreError> {
        let key = wal_key(&file.name);
        self.repo
            .put_blob(&key, KeyPurpose::Wal, encode_stored(sha3, &data))
            .await
            .map_err(store_err)?;
        Ok(key)
    }

    async fn get_segment(&self, name: &str) -> Result<Option<StoredWal>, WalStoreError> {
        match self.repo.get_blob(&wal_key(name), None).await {
            Ok(b) => Ok(Some(decode_stored(name, b)?)),
            Err(RepoError::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(e)),
        }
    }

    async fn list(&self) -> Result<Vec<WalEntry>, WalStoreError> {
        let objects = self.repo.backend().list("wal/").await.map_err(store_err)?;
        Ok(objects
            .into_iter()
            .filter_map(|o| {
                let name = o.key.rsplit('/').next()?.to_string();
                WalFile::parse(&name)?;
                Some(WalEntry {
                    name,
                    bytes: o.size,
                })
            })
            .collect())
    }
}

async fn open_repo(root: &Path, master: &MasterKey) -> Repository {
    Repository::open(
        Arc::new(LocalBackend::new(root).expect("local backend")),
        master,
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .expect("open the repository")
}

/// Entry point for PostgreSQL's archive_command / restore_command, on the repository.
#[test]
#[ignore = "run by PostgreSQL as archive_command / restore_command, not by hand"]
fn wal_helper() {
    support::helper_main_with(|root| async move {
        let key = std::env::var("BACKSTOP_TEST_MASTER_KEY").expect("BACKSTOP_TEST_MASTER_KEY");
        let master = MasterKey::from_encoded(&key).expect("master key");
        Box::new(RepoWalStore {
            repo: open_repo(&root, &master).await,
        }) as Box<dyn WalStore>
    });
}

/// Test data: the benchmark datasets live once, in the repository's `bench/`; the rest in
/// `tests/data/`.
fn data(name: &str) -> PathBuf {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../bench")
        .join(name);
    if bench.exists() {
        return bench;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

async fn take(
    repo: &Repository,
    pg: &Postgres,
    kind: BackupKind,
    parent: Option<Uuid>,
) -> (BaseBackupReport, BackupResult) {
    let mut meta = BackupMeta::new(Uuid::now_v7(), kind, "trading");
    meta.parent = parent;
    let sink = RepoSink {
        writer: repo.start_backup(meta).await.expect("start backup"),
    };
    let report = physical::base_backup(
        &pg.conninfo("postgres"),
        &sink,
        &BaseBackupOptions::default(),
    )
    .await
    .expect("base backup");
    let result = sink
        .writer
        .finish(serde_json::json!({ "physical": report }))
        .await
        .expect("finish backup");
    (report, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_backups_in_the_repository_store_unchanged_data_once_and_restore_with_its_wal() {
    let tmp = server_tempdir().unwrap();
    let root = tmp.path().join("repo");
    let master = MasterKey::generate();
    let params = RepoParams {
        // Small chunks: this database is small, and the point is the streaming and dedup path.
        chunker: ChunkerParams {
            min_size: 16 << 10,
            avg_size: 64 << 10,
            max_size: 256 << 10,
        },
        ..RepoParams::default()
    };
    let repo = Repository::init(
        Arc::new(LocalBackend::new(&root).unwrap()),
        &master,
        params,
        Arc::new(KeyAccessLog::new()),
    )
    .await
    .unwrap();
    // PostgreSQL's user archives into it.
    give_to_server_user(tmp.path()).unwrap();
    let env = format!("BACKSTOP_TEST_MASTER_KEY={}", master.to_base64().as_str());
    let pg = support::archiving_cluster_with(&support::archive_command_with(&root, &env));

    pg.psql_file("postgres", &data("trading.sql"), &[("rows", "200000")])
        .unwrap();
    // A database at rest, as one is between two nightly backups: its tuples hinted and its pages
    // all-visible. (The test cluster commits asynchronously, so the commits are flushed first:
    // hint bits are only set for flushed commits. Without this, the first read after the first
    // backup sets hint bits on every page, and every page of the table differs.)
    pg.psql("postgres", "CHECKPOINT").unwrap();
    pg.psql("postgres", "VACUUM (FREEZE, ANALYZE)").unwrap();
    pg.psql("postgres", "CHECKPOINT").unwrap();
    let (first, first_result) = take(&repo, &pg, BackupKind::Full, None).await;

    // A quiet hour: a small new table and nothing else. Everything else is stored once; what is
    // new is the catalog pages the table touched, the control file, the labels and the manifest,
    // each costing a whole chunk (a fixed cost of a few hundred KiB whatever the database size).
    pg.psql(
        "postgres",
        "CREATE TABLE audit_note AS SELECT g AS id, md5(g::text) AS note FROM generate_series(1, 100) g",
    )
    .unwrap();
    pg.psql("postgres", "CHECKPOINT").unwrap();
    let (second, second_result) = take(
        &repo,
        &pg,
        BackupKind::Incremental,
        Some(first_result.backup_id),
    )
    .await;
    let share = |r: &BackupResult| 100.0 * r.new_bytes as f64 / first_result.new_bytes as f64;
    println!(
        "first base backup: {} raw bytes, {} stored; after a quiet hour: {} new ({:.1}%)",
        first.raw_bytes,
        first_result.new_bytes,
        second_result.new_bytes,
        share(&second_result)
    );
    assert!(second.raw_bytes > first.raw_bytes);
    assert!(
        second_result.new_bytes * 10 < first_result.new_bytes,
        "the second base backup stored {} new bytes, the first {}: unchanged data should be stored once",
        second_result.new_bytes,
        first_result.new_bytes
    );

    // A trading day (churn.sql). At this small scale its 1,000 new signals land in the free
    // space of every page of live_signals (8% of the database), so the share is far above what
    // the same churn costs on the full-size benchmark; it still stays well below a full copy.
    pg.psql_file("postgres", &data("churn.sql"), &[]).unwrap();
    pg.psql("postgres", "CHECKPOINT").unwrap();
    let (third, third_result) = take(
        &repo,
        &pg,
        BackupKind::Incremental,
        Some(second_result.backup_id),
    )
    .await;
    println!(
        "after churn.sql: {} raw bytes, {} new ({:.1}%)",
        third.raw_bytes,
        third_result.new_bytes,
        share(&third_result)
    );
    assert!(
        third_result.new_bytes * 3 < first_result.new_bytes,
        "after churn.sql the base backup stored {} new bytes, the first {}",
        third_result.new_bytes,
        first_result.new_bytes
    );

    // Changes after the second base backup, archived, then the latest point from the repository.
    pg.psql(
        "postgres",
        "INSERT INTO live_signals (received_at, symbol, direction, strategy, confidence, payload) \
         SELECT now(), 'ES', 'short', 'late', 0.5, '{}'::jsonb FROM generate_series(1, 500)",
    )
    .unwrap();
    support::switch_and_wait(&pg);
    let expected = logical::table_digests(&pg.conninfo("postgres"), &[])
        .await
        .unwrap();

    let manifest = repo.load_manifest(third_result.backup_id).await.unwrap();
    let recorded: BaseBackupReport =
        serde_json::from_value(manifest.extra["physical"].clone()).unwrap();
    assert_eq!(recorded, third);
    let source = RepoSource {
        repo: repo.clone(),
        manifest,
    };
    let target = server_tempdir().unwrap();
    let dir = target.path().join("data");
    let mut opts = PhysicalRestoreOptions::new(support::restore_command_with(&root, &env));
    opts.target = RecoveryTarget::Latest;
    opts.owner = server_user().unwrap();
    let restored = physical::restore_physical(&source, &recorded, &dir, &opts)
        .await
        .unwrap();
    assert!(restored.manifest_verified);
    assert_eq!(restored.archive_bytes, third.raw_bytes);
    let copy = Postgres::from_data_dir(&dir, PostgresOptions::new()).unwrap();
    copy.wait_promoted().unwrap();
    let got = logical::table_digests(&copy.conninfo("postgres"), &[])
        .await
        .unwrap();
    assert_eq!(got, expected);

    // The archive in the repository: continuous from the first base backup, every checksum good.
    let store = RepoWalStore { repo: repo.clone() };
    let v = wal::wal_verify(
        &store,
        &WalVerifyOptions {
            backups: vec![first.wal_range(), second.wal_range(), third.wal_range()],
            ..WalVerifyOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(v.is_ok(), "{:?}", v.problems);
    assert!(v.files_checked >= 3);
}
