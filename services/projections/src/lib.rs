//! Read models of the ledger in PostgreSQL: what the dashboard, the JSON API and `/metrics` read.
//!
//! ```text
//!  ledger ──subscribe(position+1)──► projector ──one transaction per batch──► PostgreSQL
//!                                     (rows + projector_positions.position)
//! ```
//!
//! Invariants:
//! - A projector commits its row changes and its new ledger position in ONE transaction, so after
//!   a crash (or an aborted task, or a dropped connection) it resumes exactly after the last
//!   committed batch: nothing is applied twice and nothing is skipped.
//! - Each batch first locks the projector's row in `projector_positions` (`FOR UPDATE`) and
//!   checks the position it expects. Two processes running the same projector (a `serve` and a
//!   `projections rebuild`) therefore serialize, and the loser re-reads instead of double-applying.
//! - Every table is derived from events only (no clock, no sequence), so `rebuild` (truncate,
//!   replay from position 1) gives the same contents as the incremental build. Row writes are also
//!   idempotent on their own (inserts keyed by position or id; updates guarded by
//!   `last_position < event position`), as a second line of defence.
//! - The schema is `migrations/` at the workspace root, applied by [`Projections::migrate`].
//!
//! Projectors: [`audit::AuditProjector`] (`audit_events`, every event) and
//! [`state::StateProjector`] (backups, verifications, tables, storage, alerts, recoveries, keys,
//! drills, dead letters, event counts). They run independently, each at its own position.

pub mod audit;
pub mod read;
pub mod sample;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backstop_events::Envelope;
use backstop_ledger::Ledger;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;

/// Everything that can go wrong in a projection.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(
        "cannot connect to the projections database: {0}. Check projections.database_url (postgres://USER@HOST:PORT/DB) and that the server accepts connections"
    )]
    Connect(#[source] sqlx::Error),
    #[error("projections database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error(
        "cannot migrate the projections schema: {0}. Was the database created by a newer Backstop?"
    )]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("reading the ledger for projector `{projector}`: {source}")]
    Ledger {
        projector: String,
        #[source]
        source: backstop_ledger::LedgerError,
    },
    #[error("malformed projections database URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
}

impl ProjectionError {
    /// Whether trying again later may succeed (the database restarted, the network blinked).
    pub fn is_transient(&self) -> bool {
        match self {
            ProjectionError::Db(e) | ProjectionError::Connect(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
                    | sqlx::Error::Protocol(_)
            ),
            _ => false,
        }
    }
}

/// A projector: turns batches of events into row changes.
///
/// `apply` runs inside the batch's transaction; it must not commit, and must write only rows
/// derived from the events (see the crate invariants).
#[async_trait]
pub trait Projector: Send + Sync + 'static {
    /// The key of this projector in `projector_positions`; stable across versions.
    fn name(&self) -> &'static str;
    /// The tables this projector owns: `rebuild` truncates exactly these.
    fn tables(&self) -> &'static [&'static str];
    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[Envelope],
    ) -> Result<(), ProjectionError>;
}

/// The projectors `serve` and `rebuild` run.
pub fn projectors() -> Vec<Arc<dyn Projector>> {
    vec![
        Arc::new(audit::AuditProjector),
        Arc::new(state::StateProjector),
    ]
}

/// A connection pool on the projections database.
#[derive(Clone)]
pub struct Projections {
    pool: PgPool,
}

impl Projections {
    /// Connects (lazily: the pool opens connections on first use, so `serve` starts even while
    /// PostgreSQL is still coming up; the projectors retry).
    pub fn connect_lazy(url: &str) -> Result<Projections, ProjectionError> {
        let options: PgConnectOptions =
            url.parse()
                .map_err(|e: sqlx::Error| ProjectionError::BadUrl {
                    url: redact(url),
                    why: e.to_string(),
                })?;
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options.application_name("backstop"));
        Ok(Projections { pool })
    }

    /// Connects now and fails if the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Projections, ProjectionError> {
        let p = Projections::connect_lazy(url)?;
        p.pool.acquire().await.map_err(ProjectionError::Connect)?;
        Ok(p)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations in `migrations/` that the database lacks.
    pub async fn migrate(&self) -> Result<(), ProjectionError> {
        sqlx::migrate!("../../migrations").run(&self.pool).await?;
        Ok(())
    }

    /// The position a projector has applied up to (0: nothing yet).
    pub async fn position(&self, name: &str) -> Result<u64, ProjectionError> {
        let p: Option<i64> =
            sqlx::query_scalar("SELECT position FROM projector_positions WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(p.unwrap_or(0).max(0) as u64)
    }

    /// Every projector's position, by name.
    pub async fn positions(&self) -> Result<Vec<(String, u64)>, ProjectionError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT name, position FROM projector_positions ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(n, p)| (n, p.max(0) as u64))
            .collect())
    }

    /// Applies one batch and the new position in one transaction.
    ///
    /// `expected` is the position the caller believes the projector is at; if the database says
    /// otherwise (another process moved it), nothing is written and the database's position is
    /// returned as `Err(actual)` so the caller can resubscribe from there.
    pub async fn apply_batch(
        &self,
        projector: &dyn Projector,
        expected: u64,
        events: &[Envelope],
    ) -> Result<Result<u64, u64>, ProjectionError> {
        let Some(last) = events.last() else {
            return Ok(Ok(expected));
        };
        let mut tx = self.pool.begin().await?;
        let actual = lock_position(&mut tx, projector.name()).await?;
        if actual != expected || events[0].position != expected + 1 {
            // Dropping the transaction rolls it back.
            return Ok(Err(actual));
        }
        projector.apply(&mut tx, events).await?;
        sqlx::query("UPDATE projector_positions SET position = $2 WHERE name = $1")
            .bind(projector.name())
            .bind(last.position as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(last.position))
    }

    /// Empties a projector's tables and sets its position to 0, in one transaction; the next
    /// run replays the ledger from position 1.
    pub async fn reset(&self, projector: &dyn Projector) -> Result<(), ProjectionError> {
        let mut tx = self.pool.begin().await?;
        lock_position(&mut tx, projector.name()).await?;
        let tables = projector.tables().join(", ");
        // Table names are compile-time constants of the projector, not input.
        sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE {tables}")))
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE projector_positions SET position = 0 WHERE name = $1")
            .bind(projector.name())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Applies everything up to the ledger's current head, then returns the position reached.
    pub async fn catch_up(
        &self,
        ledger: &Ledger,
        projector: &dyn Projector,
        batch: usize,
    ) -> Result<u64, ProjectionError> {
        let head = ledger.head().position;
        let mut at = self.position(projector.name()).await?;
        while at < head {
            let events = ledger
                .read(at + 1, batch.min((head - at) as usize))
                .map_err(|source| ProjectionError::Ledger {
                    projector: projector.name().into(),
                    source,
                })?;
            if events.is_empty() {
                break;
            }
            at = match self.apply_batch(projector, at, &events).await? {
                Ok(p) => p,
                Err(actual) => actual,
            };
        }
        Ok(at)
    }

    /// Refreshes the planner's statistics (after a rebuild, so that queries pick their indexes).
    pub async fn analyze(&self) -> Result<(), ProjectionError> {
        sqlx::query("ANALYZE").execute(&self.pool).await?;
        Ok(())
    }

    /// Truncates and replays one projector from position 1 up to the ledger's head.
    pub async fn rebuild(
        &self,
        ledger: &Ledger,
        projector: &dyn Projector,
        batch: usize,
    ) -> Result<u64, ProjectionError> {
        self.reset(projector).await?;
        self.catch_up(ledger, projector, batch).await
    }
}

/// Locks the projector's position row for this transaction (creating it at 0 if absent).
async fn lock_position(conn: &mut PgConnection, name: &str) -> Result<u64, ProjectionError> {
    sqlx::query(
        "INSERT INTO projector_positions (name, position) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .execute(&mut *conn)
    .await?;
    let p: i64 =
        sqlx::query_scalar("SELECT position FROM projector_positions WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_one(&mut *conn)
            .await?;
    Ok(p.max(0) as u64)
}

/// How many events a projector applies per transaction: large enough to amortize the commit,
/// small enough that a batch's rows stay in memory comfortably.
pub const DEFAULT_BATCH: usize = 1000;

/// Runs one projector until `shutdown` fires: catches up from its stored position, then follows
/// the ledger live. Database errors are logged and retried with backoff (the ledger and the
/// workers keep running while the projections database is away); the projector resumes from
/// its committed position each time.
pub async fn run(
    projections: Projections,
    ledger: Ledger,
    projector: Arc<dyn Projector>,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = projector.name();
    let mut delay = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match follow(&projections, &ledger, projector.as_ref(), &mut shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(projector = name, error = %e, retry_in_ms = delay.as_millis() as u64, "projector stopped; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

async fn follow(
    projections: &Projections,
    ledger: &Ledger,
    projector: &dyn Projector,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), ProjectionError> {
    let name = projector.name();
    let mut at = projections.position(name).await?;
    tracing::info!(
        projector = name,
        position = at,
        head = ledger.head().position,
        "projector running"
    );
    let mut sub = ledger.subscribe(at + 1);
    loop {
        let batch = tokio::select! {
            b = sub.next_batch(DEFAULT_BATCH) => b.map_err(|source| ProjectionError::Ledger {
                projector: name.into(),
                source,
            })?,
            _ = shutdown.changed() => return Ok(()),
        };
        if batch.is_empty() {
            // The ledger closed: the process is stopping.
            return Ok(());
        }
        match projections.apply_batch(projector, at, &batch).await? {
            Ok(p) => at = p,
            Err(actual) => {
                tracing::warn!(
                    projector = name,
                    expected = at,
                    actual,
                    "projector position moved under us (another process?); resubscribing"
                );
                at = actual;
                sub = ledger.subscribe(at + 1);
            }
        }
    }
}

/// The URL with any password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            super::redact("postgres://u@h:5432/db"),
            "postgres://u@h:5432/db"
        );
    }
}
