//! Catalog queries shared by dump, restore and the digest helpers.
//!
//! Invariants:
//! - "User" objects are those outside `information_schema` and the `pg_*` schemas (which
//!   PostgreSQL reserves: `pg_catalog`, `pg_toast`, `pg_temp_N`), that are not members of an
//!   extension (an extension's own tables are recreated by `CREATE EXTENSION`), and not temporary.
//! - Run inside the dump's transaction, these queries see the snapshot's catalog.

use sqlx::Row;
use sqlx::postgres::PgConnection;

use super::TableKind;
use crate::pg::names::QualifiedName;

/// The filter for user relations, shared by every query here (`c` is pg_class, `n` pg_namespace).
const USER_RELATION: &str = "n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' \
     AND c.relpersistence <> 't' \
     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                     WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass \
                       AND d.objid = c.oid AND d.deptype = 'e')";

/// A table as the catalog describes it.
#[derive(Debug, Clone)]
pub(crate) struct CatalogTable {
    pub name: QualifiedName,
    pub kind: TableKind,
    pub partition_of: Option<QualifiedName>,
    /// Bytes on disk of the main fork (0 for partitioned tables): orders the work, largest first.
    pub size: i64,
}

/// Ordinary and partitioned user tables, by name.
pub(crate) async fn list_tables(conn: &mut PgConnection) -> Result<Vec<CatalogTable>, sqlx::Error> {
    let sql = format!(
        "SELECT n.nspname::text AS schema, c.relname::text AS name, c.relkind::text AS kind, \
                CASE WHEN c.relkind = 'r' THEN pg_catalog.pg_relation_size(c.oid) ELSE 0 END::int8 AS size, \
                pn.nspname::text AS parent_schema, pc.relname::text AS parent_name \
         FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_catalog.pg_inherits i ON c.relispartition AND i.inhrelid = c.oid \
         LEFT JOIN pg_catalog.pg_class pc ON pc.oid = i.inhparent \
         LEFT JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND {USER_RELATION} \
         ORDER BY 1, 2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let kind: String = row.try_get("kind")?;
        let parent_schema: Option<String> = row.try_get("parent_schema")?;
        let parent_name: Option<String> = row.try_get("parent_name")?;
        out.push(CatalogTable {
            name: QualifiedName::new(
                row.try_get::<String, _>("schema")?,
                row.try_get::<String, _>("name")?,
            ),
            kind: if kind == "p" {
                TableKind::Partitioned
            } else {
                TableKind::Table
            },
            partition_of: match (parent_schema, parent_name) {
                (Some(s), Some(n)) => Some(QualifiedName::new(s, n)),
                _ => None,
            },
            size: row.try_get("size")?,
        });
    }
    Ok(out)
}

/// User sequences, by name.
pub(crate) async fn list_sequences(
    conn: &mut PgConnection,
) -> Result<Vec<QualifiedName>, sqlx::Error> {
    let sql = format!(
        "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'S' AND {USER_RELATION} ORDER BY 1, 2"
    );
    let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(s, n)| QualifiedName::new(s, n))
        .collect())
}

/// Relations and functions a restore would collide with: up to `limit` names, and the total.
pub(crate) async fn existing_user_objects(
    conn: &mut PgConnection,
    limit: usize,
) -> Result<(Vec<String>, i64), sqlx::Error> {
    let sql = format!(
        "SELECT kind, name FROM ( \
           SELECT CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view' \
                  WHEN 'm' THEN 'materialized view' WHEN 'S' THEN 'sequence' ELSE 'foreign table' END AS kind, \
                  pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) AS name \
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
           WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {USER_RELATION} \
           UNION ALL \
           SELECT 'function', pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(p.proname) \
           FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
           WHERE n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' \
             AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                             WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass \
                               AND d.objid = p.oid AND d.deptype = 'e') \
         ) o ORDER BY 1, 2"
    );
    let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    let total = rows.len() as i64;
    Ok((
        rows.into_iter()
            .take(limit)
            .map(|(k, n)| format!("{k} {n}"))
            .collect(),
        total,
    ))
}

/// Facts about the connected server and database.
pub(crate) struct ServerInfo {
    pub database: String,
    pub server_version: String,
    pub server_version_num: u32,
    pub encoding: String,
}

pub(crate) async fn server_info(conn: &mut PgConnection) -> Result<ServerInfo, sqlx::Error> {
    let (database, server_version, num, encoding): (String, String, i32, String) = sqlx::query_as(
        "SELECT pg_catalog.current_database()::text, pg_catalog.current_setting('server_version'), \
                pg_catalog.current_setting('server_version_num')::int4, \
                pg_catalog.pg_encoding_to_char(d.encoding)::text \
         FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(ServerInfo {
        database,
        server_version,
        server_version_num: num.max(0) as u32,
        encoding,
    })
}

/// Makes the server notice within a second that its client went away, even while the session
/// waits for a lock (PostgreSQL 14 and later; a no-op before). A backup stopped at its deadline
/// drops its connections, and without this their sessions would go on waiting, and queueing
/// other lock requests behind them, until the lock came free.
pub(crate) const NOTICE_DEAD_CLIENT: &str = "SELECT pg_catalog.set_config('client_connection_check_interval', '1000', false) \
     WHERE pg_catalog.current_setting('server_version_num')::int >= 140000";

/// The same for an external tool's sessions (`PGOPTIONS`), on servers that have the setting.
pub(crate) fn notice_dead_client_options(server_version_num: u32) -> Option<&'static str> {
    (server_version_num >= 140_000).then_some("-c client_connection_check_interval=1000")
}

/// Session settings for COPY in both directions: the same text representation on both ends
/// whatever the servers' defaults (as pg_dump sets them), no timeouts, and no row security
/// (a dump must fail rather than silently skip rows a policy hides).
pub(crate) const COPY_SESSION: &str = "SET statement_timeout = 0; \
     SET lock_timeout = 0; \
     SET idle_in_transaction_session_timeout = 0; \
     SET client_encoding = 'UTF8'; \
     SET DateStyle = ISO; \
     SET IntervalStyle = postgres; \
     SET extra_float_digits = 3; \
     SET row_security = off";
