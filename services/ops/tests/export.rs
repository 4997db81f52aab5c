//! Table exports round-trip through `export get` and a load back into PostgreSQL: the trading
//! tables (bench/trading.sql) and a table of every awkward type (numeric beyond float precision,
//! NaN, bytea with backslashes and newlines, nested arrays, jsonb, json with raw whitespace,
//! timestamptz in several zones, floats at their limits, text with control characters). The
//! files are read with the system's `gzip`, as any tool would. Then the bad inputs: a missing
//! table, an unreachable server, a damaged piece. Real PostgreSQL.

mod support;

use std::path::Path;
use std::process::Command;

use backstop_ops::SourceSpec;
use backstop_ops::export::{export_get, index_key, list_exports, run_export};
use backstop_repo::Repository;
use backstop_testkit::Postgres;
use bytes::Bytes;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

const TYPES: &str = r#"
CREATE TABLE types (
  id int PRIMARY KEY,
  n numeric, n2 numeric(30,10), b bytea, ia int[], ta text[], j jsonb, js json,
  tz timestamptz, ts timestamp, d date, iv interval, f8 double precision, f4 real,
  u uuid, ok boolean, t text, r text, tza timestamptz[], na numeric[]);
INSERT INTO types VALUES
 (1, 12345678901234567890.123456789012345678901234567890, 12345678901234567890.1234567890,
  '\x00ff5c0a0d09275c5c'::bytea, '{{1,2},{3,4}}', ARRAY['a"b', 'back\slash', NULL, 'tab	x', E'nl\nx'],
  '{"k": [1, 2.50, "x\ny", {"deep": null}], "uni": "é☃"}', E'{\n  "raw": "whitespace",\t"n": 1.000\n}',
  '2024-03-01 09:30:00.123456-05', '2024-03-01 14:30:00.5', '2024-02-29', '1 year 2 mons 3 days 04:05:06.789',
  0.1, 3.4028235e38, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true, E'tab\tnl\ncr\rbs\\ quote" é', 'r',
  ARRAY['2024-01-01 00:00:00+09'::timestamptz, '1999-12-31 23:59:59.999999+00'], ARRAY[1.10, -0.000001, 'NaN']),
 (2, 'NaN', -0.0000000001, '', '{}', '{}', '[]', 'null', '-infinity', 'infinity', '0001-01-01',
  '-1 days', 'Infinity', '-Infinity', NULL, false, '', NULL, '{}', '{}'),
 (3, -1e-30, 0, NULL, NULL, NULL, 'null', NULL, '1970-01-01 00:00:00+14', NULL, NULL, NULL, 1e308,
  'NaN', NULL, NULL, NULL, NULL, NULL, NULL),
 (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL);
"#;

fn trading_sql() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/trading.sql")
}

fn gunzip(path: &Path) -> String {
    let t = Command::new("gzip").arg("-t").arg(path).status().unwrap();
    assert!(t.success(), "gzip -t {}", path.display());
    let out = Command::new("gzip").arg("-dc").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// md5 of the table's rows as text, in key order (the alias is no column's name: `types` has a
/// column `t`, which would win over a whole-row `t`).
async fn digest(conn: &mut PgConnection, table: &str) -> (i64, String) {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*), md5(coalesce(string_agg(whole_row::text, E'\\n' ORDER BY whole_row.id), '')) FROM {table} whole_row"
    )))
    .fetch_one(conn)
    .await
    .unwrap()
}

async fn objects(repo: &Repository, prefix: &str) -> Vec<String> {
    repo.backend()
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_through_export_get_and_a_load_back() {
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    pg.psql_file("app", &trading_sql(), &[("rows", "3000")])
        .unwrap();
    pg.psql("app", TYPES).unwrap();
    // The server's zone must not matter: the export reads in UTC.
    pg.psql(
        "app",
        "ALTER DATABASE app SET TimeZone = 'America/New_York'",
    )
    .unwrap();

    let repo = support::memory_repo().await;
    let source = SourceSpec::postgres("app", pg.conninfo("app"), 1);
    let id = backstop_events::uuid_v7();
    let index = run_export(&repo, &source, id, None, "test").await.unwrap();
    let names: Vec<String> = index.tables.iter().map(|t| t.table.to_string()).collect();
    assert_eq!(
        names,
        [
            "public.ai_conversation_history",
            "public.live_signals",
            "public.realtime_prices",
            "public.signal_lab_trades",
            "public.types"
        ]
    );
    assert_eq!(
        index.key_id,
        repo.current_key(backstop_repo::KeyPurpose::Export)
            .unwrap()
            .key_id
    );
    let listed = list_exports(&repo).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].export_id, id);

    let mut conn = PgConnection::connect(&pg.conninfo("app")).await.unwrap();
    sqlx::raw_sql("CREATE SCHEMA back")
        .execute(&mut conn)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for t in &index.tables {
        let name = &t.table.name;
        let out = dir.path().join(format!("{name}.jsonl.gz"));
        let written = export_get(&repo, id, name, &out, "test").await.unwrap();
        assert_eq!(written.rows, t.rows);
        let text = gunzip(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() as u64, t.rows, "{name}");
        assert!(t.rows > 0, "{name} has rows");
        // Every line is a JSON object on its own.
        for l in &lines {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v.is_object());
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE back.{name} (LIKE public.{name} INCLUDING ALL)"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        for l in &lines {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO back.{name} SELECT * FROM json_populate_record(NULL::back.{name}, $1::json)"
            )))
            .bind(*l)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        if name == "types" {
            // The two documented differences, and only these: a json value's raw newlines
            // (whitespace between tokens) become spaces, and a JSON `null` in a json or jsonb
            // column reads back as SQL NULL (row_to_json writes both as `null`).
            sqlx::raw_sql(
                "UPDATE public.types SET \
                   js = CASE WHEN js::text = 'null' THEN NULL \
                        ELSE translate(js::text, E'\\n\\r', '  ')::json END, \
                   j = NULLIF(j, 'null'::jsonb)",
            )
            .execute(&mut conn)
            .await
            .unwrap();
        }
        let original = digest(&mut conn, &format!("public.{name}")).await;
        let loaded = digest(&mut conn, &format!("back.{name}")).await;
        assert_eq!(original, loaded, "{name} differs after the round trip");
    }

    // The exact forms, spot-checked in the file itself.
    let text = gunzip(&dir.path().join("types.jsonl.gz"));
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(text.contains("\"n\":12345678901234567890.123456789012345678901234567890"));
    assert_eq!(first["b"], "\\x00ff5c0a0d09275c5c");
    assert_eq!(first["tz"], "2024-03-01T14:30:00.123456+00:00");
    assert_eq!(first["ia"], serde_json::json!([[1, 2], [3, 4]]));
    assert_eq!(first["j"]["uni"], "é☃");
    assert_eq!(first["t"], "tab\tnl\ncr\rbs\\ quote\" é");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_clear_errors_and_nothing_marked_good() {
    let pg = Postgres::start().unwrap();
    pg.create_db("app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE a (id int PRIMARY KEY, v text); \
         INSERT INTO a SELECT g, repeat(md5(g::text), 40) FROM generate_series(1, 20000) g; \
         CREATE TABLE b (id int PRIMARY KEY);",
    )
    .unwrap();
    let repo = support::memory_repo().await;
    let source = SourceSpec::postgres("app", pg.conninfo("app"), 1);

    // A missing table: named in the error, with the tables there are; nothing stored.
    let err = run_export(
        &repo,
        &source,
        Uuid::now_v7(),
        Some(vec!["nope".into()]),
        "test",
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("nope") && msg.contains("public.a"), "{msg}");
    assert!(objects(&repo, "exports/").await.is_empty());

    // An unreachable server: an environment failure, retryable, nothing stored.
    let gone = SourceSpec::postgres("gone", "postgres://postgres@127.0.0.1:1/app", 1);
    let err = run_export(&repo, &gone, Uuid::now_v7(), None, "test")
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(objects(&repo, "exports/").await.is_empty());

    // A good export, then a damaged piece: `get` fails and leaves no file, not even a partial.
    let id = Uuid::now_v7();
    let index = run_export(
        &repo,
        &source,
        id,
        Some(vec!["a".into(), "b".into()]),
        "test",
    )
    .await
    .unwrap();
    let a = index.table("a").unwrap();
    assert_eq!(a.rows, 20000);
    assert!(a.pieces.len() >= 2, "{} pieces", a.pieces.len());
    assert_eq!(index.table("public.b").unwrap().rows, 0);
    let dir = tempfile::tempdir().unwrap();
    // The empty table is an empty but valid gzip file.
    let out_b = dir.path().join("b.jsonl.gz");
    export_get(&repo, id, "b", &out_b, "test").await.unwrap();
    assert_eq!(gunzip(&out_b), "");

    let err = export_get(&repo, id, "c", &dir.path().join("c.jsonl.gz"), "test")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no table \"c\""), "{err}");
    let err = export_get(
        &repo,
        Uuid::now_v7(),
        "a",
        &dir.path().join("x.jsonl.gz"),
        "test",
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no export"), "{err}");

    let victim = &a.pieces[1].key;
    let mut obj = repo.backend().get(victim).await.unwrap().to_vec();
    let mid = obj.len() / 2;
    obj[mid] ^= 0x40;
    repo.backend().put(victim, Bytes::from(obj)).await.unwrap();
    let out = dir.path().join("a.jsonl.gz");
    let err = export_get(&repo, id, "a", &out, "test").await.unwrap_err();
    assert!(err.to_string().contains(victim.as_str()), "{err}");
    assert!(!out.exists());
    assert!(!dir.path().join("a.jsonl.gz.partial").exists());

    // The index itself, sealed with the export key, is what makes an export exist.
    assert!(
        repo.backend()
            .head(&index_key(&id))
            .await
            .unwrap()
            .is_some()
    );
}
