//! Logical dump and restore against a real PostgreSQL 15 (started by backstop-testkit), with a
//! directory-backed sink and source standing in for the repository.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use backstop_sources::SourceError;
use backstop_sources::pg::QualifiedName;
use backstop_sources::pg::logical::{
    self, DumpOptions, DumpReport, DumpSink, DumpSource, PartReader, PartStored, RestoreOptions,
    SinkError, TableKind,
};
use backstop_testkit::Postgres;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

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

/// Parts as files in a directory (names hex-encoded), written as they stream.
struct DirStore {
    dir: tempfile::TempDir,
    /// Fail this part after this many bytes (to test abandoned dumps).
    fail: Option<(String, u64)>,
}

impl DirStore {
    fn new() -> Arc<DirStore> {
        Arc::new(DirStore {
            dir: tempfile::tempdir().expect("tempdir"),
            fail: None,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.path().join(hex)
    }
}

#[async_trait]
impl DumpSink for DirStore {
    async fn put_part(&self, name: &str, mut reader: PartReader) -> Result<PartStored, SinkError> {
        let tmp = self.path(&format!("{name}.partial"));
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut total = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut reader, &mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if let Some((part, after)) = &self.fail
                && part == name
                && total > *after
            {
                return Err(SinkError::new(format!("disk full while storing {name}")));
            }
            file.write_all(&buf[..n]).await?;
        }
        file.flush().await?;
        tokio::fs::rename(&tmp, self.path(name)).await?;
        Ok(PartStored {
            stored_bytes: total,
            new_bytes: total,
        })
    }
}

#[async_trait]
impl DumpSource for DirStore {
    async fn open_part(&self, name: &str) -> Result<PartReader, SinkError> {
        let file = tokio::fs::File::open(self.path(name))
            .await
            .map_err(|e| SinkError::with_source(format!("part {name} is missing"), e))?;
        Ok(Box::pin(file))
    }

    async fn check_part(&self, name: &str) -> Result<(), SinkError> {
        if self.path(name).is_file() {
            Ok(())
        } else {
            Err(SinkError::new(format!("object for part {name} not found")))
        }
    }
}

/// A source whose one part fails after some bytes, like a damaged chunk would.
struct Damaged {
    inner: Arc<DirStore>,
    part: String,
}

struct FailingReader {
    inner: PartReader,
    left: u64,
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.left == 0 {
            return Poll::Ready(Err(std::io::Error::other(
                "chunk 0badc0de failed its checksum",
            )));
        }
        let before = buf.filled().len();
        let r = self.inner.as_mut().poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.left = self.left.saturating_sub(n.max(1));
        r
    }
}

#[async_trait]
impl DumpSource for Damaged {
    async fn open_part(&self, name: &str) -> Result<PartReader, SinkError> {
        let inner = self.inner.open_part(name).await?;
        if name == self.part {
            Ok(Box::pin(FailingReader { inner, left: 1 }))
        } else {
            Ok(inner)
        }
    }
}

/// A source that holds back one part until the test lets it go, to look at a restore midway.
struct Gated {
    inner: Arc<DirStore>,
    part: String,
    reached: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

#[async_trait]
impl DumpSource for Gated {
    async fn open_part(&self, name: &str) -> Result<PartReader, SinkError> {
        if name == self.part {
            self.reached.notify_one();
            let _ = self.release.acquire().await;
        }
        self.inner.open_part(name).await
    }
}

fn q(pg: &Postgres, db: &str, sql: &str) -> String {
    pg.psql(db, sql).expect("psql")
}

/// Every database on the server but the templates, sorted.
fn databases(pg: &Postgres) -> Vec<String> {
    q(
        pg,
        "postgres",
        "SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY datname COLLATE \"C\"",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

fn names(map: &BTreeMap<QualifiedName, u64>) -> Vec<String> {
    map.keys().map(|k| k.to_string()).collect()
}

async fn assert_same_contents(pg: &Postgres, a: &str, b: &str) {
    let da = logical::table_digests(&pg.conninfo(a), &[])
        .await
        .expect("digest a");
    let db = logical::table_digests(&pg.conninfo(b), &[])
        .await
        .expect("digest b");
    assert_eq!(
        da.keys().collect::<Vec<_>>(),
        db.keys().collect::<Vec<_>>(),
        "same tables"
    );
    for (t, d) in &da {
        assert_eq!(
            Some(d),
            db.get(t),
            "contents of {t} differ between {a} and {b}"
        );
    }
}

fn check_report_counts(report: &DumpReport, counts: &BTreeMap<QualifiedName, u64>) {
    let recorded = report.row_counts();
    assert_eq!(&recorded, counts, "the dump's row counts are the source's");
    assert!(report.total_rows > 0);
    assert_eq!(
        report.raw_bytes,
        report.parts.iter().map(|p| p.raw_bytes).sum::<u64>()
    );
}

async fn setup(pg: &Postgres, db: &str, rows: &str) {
    pg.create_db(db).expect("create db");
    pg.psql_file(db, &data("trading.sql"), &[("rows", rows)])
        .expect("load trading.sql");
    pg.psql_file(db, &data("rich.sql"), &[])
        .expect("load rich.sql");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_restore_round_trip_then_churn_then_refusals() {
    let pg = Postgres::start().expect("start PostgreSQL");
    setup(&pg, "trading", "20000").await;
    let store = DirStore::new();

    // Full dump.
    let report = logical::dump(
        &pg.conninfo("trading"),
        &DumpOptions::default(),
        store.clone(),
    )
    .await
    .expect("dump");
    let counts = logical::row_counts(&pg.conninfo("trading")).await.unwrap();
    check_report_counts(&report, &counts);
    assert_eq!(report.database, "trading");
    assert!(report.server_version.starts_with("15."));
    assert_eq!(report.large_objects, 1);
    assert!(!report.snapshot.is_empty());
    let prices = report
        .tables
        .iter()
        .find(|t| t.table == QualifiedName::new("public", "realtime_prices"))
        .unwrap();
    assert_eq!(prices.rows, 20_000);
    assert_eq!(report.tables[0].table, prices.table, "largest table first");
    assert!(
        report
            .tables
            .iter()
            .any(|t| t.kind == TableKind::Partitioned && t.part.is_none())
    );
    for p in [
        "schema",
        "sequences",
        "large-objects",
        "data/\"We.ird\".\"Mixed Case\"",
    ] {
        assert!(
            report.part_names().iter().any(|n| n == p),
            "part {p} missing"
        );
    }
    // Parts are stored uncompressed: the data parts are the COPY text itself.
    let raw = std::fs::read(store.path("data/public.orders")).unwrap();
    assert!(String::from_utf8_lossy(&raw).contains("line1\\nline2\\ttab\\\\back"));
    // The report survives the manifest.
    let json = serde_json::to_string(&report).unwrap();
    let report: DumpReport = serde_json::from_str(&json).unwrap();

    // Restore into a new database.
    let restored = logical::restore(
        &pg.conninfo("restored1"),
        &RestoreOptions {
            create_db: true,
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .expect("restore");
    assert!(restored.created_database);
    assert_eq!(restored.rows, report.total_rows);
    assert_same_contents(&pg, "trading", "restored1").await;
    let after = logical::row_counts(&pg.conninfo("restored1"))
        .await
        .unwrap();
    assert_eq!(after, report.row_counts(), "row counts match the report");
    // Everything else came back too: views, matview data, large object, comments, grants,
    // triggers, foreign keys, policies, and sequences that continue past the restored ids.
    assert_eq!(
        q(&pg, "restored1", "SELECT count(*) FROM order_view"),
        "5000"
    );
    assert_eq!(q(&pg, "restored1", "SELECT n FROM acc_mv"), "300");
    assert_eq!(
        q(
            &pg,
            "restored1",
            "SELECT convert_from(lo_get(oid), 'UTF8') FROM pg_largeobject_metadata"
        ),
        "hello large object"
    );
    assert_eq!(
        q(
            &pg,
            "restored1",
            "SELECT obj_description('accounts'::regclass)"
        ),
        "customer accounts"
    );
    assert_eq!(
        q(
            &pg,
            "restored1",
            "SELECT has_table_privilege('backstop_reader', 'accounts', 'SELECT')"
        ),
        "t"
    );
    assert_eq!(
        q(
            &pg,
            "restored1",
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"
        ),
        "1"
    );
    assert_eq!(
        q(
            &pg,
            "restored1",
            "SELECT relrowsecurity FROM pg_class WHERE relname = 'orders'"
        ),
        "t"
    );
    assert_eq!(
        q(
            &pg,
            "restored1",
            "SELECT nextval('realtime_prices_id_seq') > (SELECT max(id) FROM realtime_prices)"
        ),
        "t"
    );
    assert_eq!(
        q(
            &pg,
            "restored1",
            "INSERT INTO accounts (name, q) VALUES ('new', 1) RETURNING id"
        ),
        "301"
    );
    assert_eq!(
        q(&pg, "restored1", "SELECT nextval('standalone_seq')"),
        "503"
    );
    q(&pg, "restored1", "UPDATE accounts SET q = 2 WHERE id = 1");
    assert_eq!(
        q(
            &pg,
            "restored1",
            "SELECT updated IS NOT NULL FROM accounts WHERE id = 1"
        ),
        "t",
        "trigger restored"
    );

    // A trading day later: churn, dump again, restore, same contents.
    pg.psql_file("trading", &data("churn.sql"), &[])
        .expect("churn");
    let report2 = logical::dump(
        &pg.conninfo("trading"),
        &DumpOptions {
            jobs: 3,
            ..DumpOptions::default()
        },
        store.clone(),
    )
    .await
    .expect("second dump");
    let counts2 = logical::row_counts(&pg.conninfo("trading")).await.unwrap();
    check_report_counts(&report2, &counts2);
    assert_eq!(
        report2.row_counts()[&QualifiedName::new("public", "realtime_prices")],
        20_200
    );
    logical::restore(
        &pg.conninfo("restored2"),
        &RestoreOptions {
            create_db: true,
            jobs: 3,
            ..RestoreOptions::default()
        },
        store.clone(),
        &report2,
    )
    .await
    .expect("restore after churn");
    assert_same_contents(&pg, "trading", "restored2").await;

    // A database that is not empty is refused, and the message says what to do.
    let err = logical::restore(
        &pg.conninfo("restored1"),
        &RestoreOptions::default(),
        store.clone(),
        &report2,
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SourceError::TargetNotEmpty { .. }), "{msg}");
    assert!(
        msg.contains("restored1") && msg.contains("not empty"),
        "{msg}"
    );
    assert!(
        msg.contains("--create-db") && msg.contains("--force"),
        "{msg}"
    );
    // A missing database without --create-db is refused too, naming it.
    let err = logical::restore(
        &pg.conninfo("nowhere"),
        &RestoreOptions::default(),
        store.clone(),
        &report2,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::DatabaseMissing { .. }), "{err}");
    assert!(err.to_string().contains("--create-db"), "{err}");
    assert_eq!(
        q(
            &pg,
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'nowhere'"
        ),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_level_restores_bring_exactly_the_tables_chosen() {
    let pg = Postgres::start().expect("start PostgreSQL");
    setup(&pg, "src", "2000").await;
    let store = DirStore::new();
    let report = logical::dump(&pg.conninfo("src"), &DumpOptions::default(), store.clone())
        .await
        .expect("dump");

    // Two tables linked by a foreign key, plus a partitioned table (bringing its partitions).
    let r = logical::restore(
        &pg.conninfo("some"),
        &RestoreOptions {
            create_db: true,
            tables: Some(vec![
                "orders".into(),
                "public.accounts".into(),
                "events".into(),
            ]),
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .expect("restore of chosen tables");
    let counts = logical::row_counts(&pg.conninfo("some")).await.unwrap();
    assert_eq!(
        names(&counts),
        vec![
            "public.accounts",
            "public.events_2025",
            "public.events_2026",
            "public.orders"
        ]
    );
    assert_eq!(
        q(
            &pg,
            "some",
            "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relkind IN ('r','p','v','m','f') AND relnamespace = 'public'::regnamespace"
        ),
        "accounts,events,events_2025,events_2026,orders",
        "no other table, view or materialized view"
    );
    let src = logical::table_digests(
        &pg.conninfo("src"),
        &["orders".into(), "accounts".into(), "events_2025".into()],
    )
    .await
    .unwrap();
    let dst = logical::table_digests(&pg.conninfo("some"), &[])
        .await
        .unwrap();
    for (t, d) in &src {
        assert_eq!(Some(d), dst.get(t), "{t}");
    }
    assert_eq!(r.tables.len(), 4);
    assert!(
        r.empty_tables
            .contains(&QualifiedName::new("public", "events"))
    );
    assert_eq!(
        q(
            &pg,
            "some",
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"
        ),
        "1",
        "the foreign key between two restored tables is kept"
    );
    assert_eq!(
        q(
            &pg,
            "some",
            "SELECT nextval('orders_id_seq') > (SELECT max(id) FROM orders)"
        ),
        "t"
    );
    assert_eq!(
        q(
            &pg,
            "some",
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent WHERE c.relname = 'events'"
        ),
        "2",
        "partitions attached"
    );

    // One table alone: its FK to a table not restored is dropped, its serial kept.
    logical::restore(
        &pg.conninfo("one"),
        &RestoreOptions {
            create_db: true,
            tables: Some(vec!["orders".into()]),
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .expect("restore of one table");
    let counts = logical::row_counts(&pg.conninfo("one")).await.unwrap();
    assert_eq!(names(&counts), vec!["public.orders"]);
    assert_eq!(counts.values().next(), Some(&5000));
    assert_eq!(
        q(
            &pg,
            "one",
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"
        ),
        "0"
    );
    assert_eq!(
        q(&pg, "one", "SELECT count(*) FROM pg_largeobject_metadata"),
        "0"
    );

    // A partition alone, and a table with an odd name.
    logical::restore(
        &pg.conninfo("odd"),
        &RestoreOptions {
            create_db: true,
            tables: Some(vec![
                "events_2026".into(),
                "\"We.ird\".\"Mixed Case\"".into(),
            ]),
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .expect("restore of a partition and an odd name");
    let counts = logical::row_counts(&pg.conninfo("odd")).await.unwrap();
    assert_eq!(
        names(&counts),
        vec!["\"We.ird\".\"Mixed Case\"", "public.events_2026"]
    );
    assert_eq!(
        logical::table_digests(&pg.conninfo("odd"), &[])
            .await
            .unwrap()[&QualifiedName::new("We.ird", "Mixed Case")],
        logical::table_digests(&pg.conninfo("src"), &["\"We.ird\".\"Mixed Case\"".into()])
            .await
            .unwrap()[&QualifiedName::new("We.ird", "Mixed Case")],
    );

    // Names not in the backup, ambiguous or needing a parent are refused before anything is
    // written, naming the table.
    let err = logical::restore(
        &pg.conninfo("nothing"),
        &RestoreOptions {
            create_db: true,
            tables: Some(vec!["orders".into(), "no_such_table".into()]),
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::UnknownTable { .. }), "{err}");
    assert!(err.to_string().contains("no_such_table"), "{err}");
    let err = logical::restore(
        &pg.conninfo("nothing"),
        &RestoreOptions {
            create_db: true,
            tables: Some(vec!["child_inh".into()]),
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("public.child_inh") && msg.contains("public.uses_seq"),
        "{msg}"
    );
    assert_eq!(
        q(
            &pg,
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'nothing'"
        ),
        "0",
        "refused before the target was touched"
    );

    // A dry run plans and checks presence; a missing part is named.
    let plan = logical::restore(
        &pg.conninfo("planned"),
        &RestoreOptions {
            create_db: true,
            dry_run: true,
            tables: Some(vec!["realtime_prices".into()]),
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .expect("dry run");
    assert!(plan.dry_run && plan.created_database);
    assert_eq!(plan.rows, 2000);
    assert_eq!(
        q(
            &pg,
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'planned'"
        ),
        "0",
        "a dry run writes nothing"
    );
    std::fs::remove_file(store.path("data/public.realtime_prices")).unwrap();
    let err = logical::restore(
        &pg.conninfo("planned"),
        &RestoreOptions {
            create_db: true,
            dry_run: true,
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, SourceError::PartsMissing { count: 1, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("data/public.realtime_prices"),
        "{err}"
    );

    // Forced restore of a table into a database that has other objects.
    logical::restore(
        &pg.conninfo("one"),
        &RestoreOptions {
            force: true,
            tables: Some(vec!["signal_lab_trades".into()]),
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .expect("forced restore beside existing tables");
    let counts = logical::row_counts(&pg.conninfo("one")).await.unwrap();
    assert_eq!(
        names(&counts),
        vec!["public.orders", "public.signal_lab_trades"]
    );
    // ... but never over a table that exists.
    let err = logical::restore(
        &pg.conninfo("one"),
        &RestoreOptions {
            force: true,
            tables: Some(vec!["orders".into()]),
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::TablesExist { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_clear_and_nothing_incomplete_is_taken_for_good() {
    // An unreachable server.
    let port = backstop_testkit::free_port();
    let err = logical::dump(
        &format!("postgres://postgres:hunter2@127.0.0.1:{port}/x"),
        &DumpOptions::default(),
        DirStore::new(),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SourceError::Connect { .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("server is running"), "{msg}");
    assert!(!msg.contains("hunter2"), "the password never shows: {msg}");

    let pg = Postgres::start().expect("start PostgreSQL");
    setup(&pg, "src", "5000").await;

    // The sink failing mid-part abandons the dump with its error.
    let failing = Arc::new(DirStore {
        dir: tempfile::tempdir().unwrap(),
        fail: Some(("data/public.realtime_prices".into(), 10_000)),
    });
    let err = logical::dump(&pg.conninfo("src"), &DumpOptions::default(), failing)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SourceError::Sink { .. }), "{msg}");
    assert!(
        msg.contains("data/public.realtime_prices") && msg.contains("disk full"),
        "{msg}"
    );

    // A restore reading a damaged part fails naming the part, and the table is not half-loaded.
    let store = DirStore::new();
    let report = logical::dump(&pg.conninfo("src"), &DumpOptions::default(), store.clone())
        .await
        .expect("dump");
    let damaged = Arc::new(Damaged {
        inner: store.clone(),
        part: "data/public.live_signals".into(),
    });
    let err = logical::restore(
        &pg.conninfo("broken"),
        &RestoreOptions {
            create_db: true,
            ..RestoreOptions::default()
        },
        damaged,
        &report,
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SourceError::Source { .. }), "{msg}");
    assert!(
        msg.contains("data/public.live_signals") && msg.contains("checksum"),
        "{msg}"
    );
    assert_eq!(databases(&pg), ["postgres", "src"], "nothing half-restored");

    // A part that lost rows (truncated) is caught by the row count.
    let path = store.path("data/public.ai_conversation_history");
    let text = std::fs::read(&path).unwrap();
    let cut = text[..text.len() - 1]
        .iter()
        .rposition(|b| *b == b'\n')
        .unwrap()
        + 1;
    std::fs::write(&path, &text[..cut]).unwrap();
    let err = logical::restore(
        &pg.conninfo("short"),
        &RestoreOptions {
            create_db: true,
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::RowCountMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("public.ai_conversation_history"),
        "{err}"
    );

    // Dumps filtered to chosen tables restore only those; excluded data restores empty.
    let store = DirStore::new();
    let report = logical::dump(
        &pg.conninfo("src"),
        &DumpOptions {
            tables: Some(vec!["live_signals".into(), "events".into()]),
            exclude_table_data: vec!["events_2026".into()],
            ..DumpOptions::default()
        },
        store.clone(),
    )
    .await
    .expect("filtered dump");
    assert!(report.filtered);
    logical::restore(
        &pg.conninfo("filtered"),
        &RestoreOptions {
            create_db: true,
            ..RestoreOptions::default()
        },
        store.clone(),
        &report,
    )
    .await
    .expect("restore of a filtered dump");
    let counts = logical::row_counts(&pg.conninfo("filtered")).await.unwrap();
    assert_eq!(
        names(&counts),
        vec![
            "public.events_2025",
            "public.events_2026",
            "public.live_signals"
        ]
    );
    assert_eq!(counts[&QualifiedName::new("public", "events_2026")], 0);
    assert_eq!(counts[&QualifiedName::new("public", "live_signals")], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_fails_midway_leaves_nothing_under_the_target_name() {
    let pg = Postgres::start().expect("start PostgreSQL");
    setup(&pg, "src", "5000").await;
    let store = DirStore::new();
    let report = logical::dump(&pg.conninfo("src"), &DumpOptions::default(), store.clone())
        .await
        .expect("dump");
    let create = RestoreOptions {
        create_db: true,
        ..RestoreOptions::default()
    };

    // A damaged data part fails the restore in the middle of the data (schema and other tables
    // already in): the database it created is dropped, under whatever name it had.
    let damaged = Arc::new(Damaged {
        inner: store.clone(),
        part: "data/public.live_signals".into(),
    });
    let err = logical::restore(&pg.conninfo("trading_copy"), &create, damaged, &report)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Source { .. }), "{err}");
    assert_eq!(databases(&pg), ["postgres", "src"]);

    // A missing part that is read last (the sequences, after every table's data): the same.
    let sequences = store.path("sequences");
    let kept = std::fs::read(&sequences).unwrap();
    std::fs::remove_file(&sequences).unwrap();
    let err = logical::restore(
        &pg.conninfo("trading_copy"),
        &create,
        store.clone(),
        &report,
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SourceError::Source { .. }), "{msg}");
    assert!(msg.contains("sequences"), "{msg}");
    assert_eq!(databases(&pg), ["postgres", "src"]);

    // A database that existed before is the operator's: a failed restore leaves it there.
    pg.create_db("existing").unwrap();
    let err = logical::restore(&pg.conninfo("existing"), &create, store.clone(), &report)
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Source { .. }), "{err}");
    assert_eq!(databases(&pg), ["existing", "postgres", "src"]);

    // With every part there the restore works under a staging name until it is complete (seen
    // here midway, held before its last part), then the database appears under its own name,
    // complete, and nothing else is left.
    std::fs::write(&sequences, kept).unwrap();
    let gated = Arc::new(Gated {
        inner: store.clone(),
        part: "sequences".into(),
        reached: tokio::sync::Notify::new(),
        release: tokio::sync::Semaphore::new(0),
    });
    let running = tokio::spawn({
        let (target, create, gated, report) = (
            pg.conninfo("trading_copy"),
            create.clone(),
            gated.clone(),
            report.clone(),
        );
        async move { logical::restore(&target, &create, gated, &report).await }
    });
    gated.reached.notified().await;
    let midway = databases(&pg);
    assert!(!midway.iter().any(|d| d == "trading_copy"), "{midway:?}");
    let staging: Vec<&String> = midway
        .iter()
        .filter(|d| d.starts_with("trading_copy__restoring_"))
        .collect();
    assert_eq!(staging.len(), 1, "one staging database: {midway:?}");
    gated.release.add_permits(1);
    let restored = running.await.unwrap().expect("restore");
    assert!(restored.created_database);
    assert_eq!(restored.database, "trading_copy");
    assert_same_contents(&pg, "src", "trading_copy").await;
    // A name at PostgreSQL's limit works the same.
    // 63 bytes of two-byte characters and one ASCII: the staging name must cut it inside.
    let long = format!("{}x", "ü".repeat(31));
    assert_eq!(long.len(), 63);
    logical::restore(&pg.conninfo(&long), &create, store.clone(), &report)
        .await
        .expect("restore under a 63-byte name");
    let mut expected = vec![
        "existing".to_string(),
        "postgres".into(),
        "src".into(),
        "trading_copy".into(),
        long,
    ];
    expected.sort();
    assert_eq!(databases(&pg), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_database_that_does_not_exist_says_to_check_its_name() {
    let pg = Postgres::start().expect("start PostgreSQL");
    let err = logical::dump(
        &pg.conninfo("ghost"),
        &DumpOptions::default(),
        DirStore::new(),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, SourceError::SourceDatabaseMissing { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("\"ghost\" does not exist")
            && msg.contains(&format!("127.0.0.1:{}", pg.port())),
        "names the database and the server: {msg}"
    );
    assert!(
        msg.contains("--pg") && msg.contains("[[sources]]"),
        "says what to check: {msg}"
    );
    assert!(
        !msg.contains("--create-db"),
        "a backup is not a restore: {msg}"
    );
    assert_eq!(databases(&pg), ["postgres"], "and creates nothing");
}
