//! Content digests and exact row counts of tables, for verification and tests.
//!
//! Invariants:
//! - A table's digest is `md5` over its rows' text forms, sorted bytewise (`COLLATE "C"`) and
//!   joined by newlines: independent of physical order and of the database's collation, equal for
//!   two tables exactly when they hold the same multiset of rows (up to md5 collisions).
//! - Both helpers read one consistent snapshot (`REPEATABLE READ READ ONLY`) and set the same
//!   output formats as the dump (`DateStyle`, `extra_float_digits`, ...), so digests of a source
//!   and of its restore compare.
//! - The digest sorts the whole table in the server: meant for test and verification sizes, not
//!   for auditing a multi-gigabyte table on a busy primary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use super::TableKind;
use super::catalog::{self, COPY_SESSION};
use super::dump::resolve_error;
use crate::error::SourceError;
use crate::pg::conninfo::ConnInfo;
use crate::pg::names::{QualifiedName, resolve};

/// Rows and ordered content digest of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDigest {
    pub rows: u64,
    /// Hex md5 of the sorted rows joined by newlines.
    pub md5: String,
}

async fn open(ci: &ConnInfo) -> Result<PgConnection, SourceError> {
    let mut conn = ci.connect().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "{COPY_SESSION}; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    )))
    .execute(&mut conn)
    .await
    .map_err(|e| SourceError::query("opening a read-only snapshot", ci, e))?;
    Ok(conn)
}

/// The ordinary (leaf) tables of the database; partitioned tables have no rows of their own.
async fn leaf_tables(
    conn: &mut PgConnection,
    ci: &ConnInfo,
) -> Result<Vec<QualifiedName>, SourceError> {
    Ok(catalog::list_tables(conn)
        .await
        .map_err(|e| SourceError::query("listing tables", ci, e))?
        .into_iter()
        .filter(|t| t.kind == TableKind::Table)
        .map(|t| t.name)
        .collect())
}

/// Digests of `tables` (names as [`super::RestoreOptions::tables`] takes them), or of every
/// ordinary table when `tables` is empty.
pub async fn table_digests(
    conninfo: &str,
    tables: &[String],
) -> Result<BTreeMap<QualifiedName, TableDigest>, SourceError> {
    let ci = ConnInfo::parse(conninfo)?;
    let mut conn = open(&ci).await?;
    let known = leaf_tables(&mut conn, &ci).await?;
    let chosen: Vec<QualifiedName> = if tables.is_empty() {
        known.clone()
    } else {
        tables
            .iter()
            .map(|n| resolve(n, &known).map_err(|e| resolve_error(e, &known)))
            .collect::<Result<_, _>>()?
    };
    let mut out = BTreeMap::new();
    for t in chosen {
        let sql = format!(
            "SELECT count(*)::int8, \
                    pg_catalog.md5(coalesce(string_agg(r.t, E'\\n' ORDER BY r.t COLLATE \"C\"), '')) \
             FROM (SELECT x::text AS t FROM ONLY {} x) r",
            t.quoted()
        );
        let (rows, md5): (i64, String) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut conn)
            .await
            .map_err(|e| SourceError::query(format!("digesting {t}"), &ci, e))?;
        out.insert(
            t,
            TableDigest {
                rows: rows.max(0) as u64,
                md5,
            },
        );
    }
    let _ = conn.close().await;
    Ok(out)
}

/// Exact row counts (`count(*)`) of every ordinary table, in one snapshot.
pub async fn row_counts(conninfo: &str) -> Result<BTreeMap<QualifiedName, u64>, SourceError> {
    let ci = ConnInfo::parse(conninfo)?;
    let mut conn = open(&ci).await?;
    let mut out = BTreeMap::new();
    for t in leaf_tables(&mut conn, &ci).await? {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*)::int8 FROM ONLY {}",
            t.quoted()
        )))
        .fetch_one(&mut conn)
        .await
        .map_err(|e| SourceError::query(format!("counting rows of {t}"), &ci, e))?;
        out.insert(t, n.max(0) as u64);
    }
    let _ = conn.close().await;
    Ok(out)
}
