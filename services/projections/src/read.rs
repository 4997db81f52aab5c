//! Queries over the read models, for the dashboard, the JSON API and `/metrics`.
//!
//! Every query is a fixed SQL text with bound parameters, except the audit filter, which is
//! assembled from fixed fragments (never from input) so that each combination of filters gets a
//! plan that uses its index. Results are plain serializable structs.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::FromRow;
use uuid::Uuid;

use crate::{ProjectionError, Projections};

/// One re-encryption job's progress (`reencryption.*`), for the dashboard.
#[derive(Clone, Debug, Serialize, FromRow, PartialEq)]
pub struct ReencryptionJobRow {
    pub job_id: Uuid,
    pub started_at: DateTime<Utc>,
    pub purposes: String,
    pub from_key_ids: String,
    pub to_key_id: String,
    /// `running`, `completed` or `failed` (the last run stopped; resumable).
    pub state: String,
    pub backups_done: i64,
    pub backups_total: i64,
    pub objects: i64,
    pub bytes: i64,
    pub updated_at: DateTime<Utc>,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, FromRow, PartialEq)]
pub struct BackupRow {
    pub backup_id: Uuid,
    pub source: String,
    pub kind: String,
    pub physical: bool,
    pub parent: Option<Uuid>,
    pub attempt: i32,
    pub state: String,
    pub requested_by: Option<String>,
    pub requested_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub host: Option<String>,
    pub failure_reason: Option<String>,
    pub manifest: Option<String>,
    pub manifest_sha3: Option<String>,
    pub raw_bytes: Option<i64>,
    pub stored_bytes: Option<i64>,
    pub new_bytes: Option<i64>,
    pub chunks: Option<i64>,
    pub new_chunks: Option<i64>,
    pub duration_ms: Option<i64>,
    pub upload_objects: Option<i64>,
    pub upload_bytes: Option<i64>,
    pub verification_state: String,
    pub verification_id: Option<Uuid>,
    pub verification_tier: Option<String>,
    pub verified_at: Option<DateTime<Utc>>,
    pub verification_reason: Option<String>,
    pub verifications_passed: i32,
    pub verifications_failed: i32,
    pub restore_ms: Option<i64>,
    pub restore_bytes_per_sec: Option<f64>,
    pub deleted_policy: Option<String>,
    pub deleted_reason: Option<String>,
    pub last_position: i64,
}

const BACKUP_COLUMNS: &str = "backup_id, source, kind, physical, parent, attempt, state, \
    requested_by, requested_at, started_at, completed_at, failed_at, deleted_at, host, \
    failure_reason, manifest, manifest_sha3, raw_bytes, stored_bytes, new_bytes, chunks, \
    new_chunks, duration_ms, upload_objects, upload_bytes, verification_state, verification_id, \
    verification_tier, verified_at, verification_reason, verifications_passed, \
    verifications_failed, restore_ms, restore_bytes_per_sec, deleted_policy, deleted_reason, \
    last_position";

/// One source at a glance: its last successful backup and its most recent attempt.
#[derive(Clone, Debug, Serialize)]
pub struct SourceSummary {
    pub source: String,
    pub last_success: Option<BackupRow>,
    pub latest: BackupRow,
    pub completed: i64,
    pub failed_7d: i64,
}

#[derive(Clone, Debug, Serialize, FromRow)]
pub struct VerificationRow {
    pub verification_id: Uuid,
    pub backup_id: Uuid,
    pub source: Option<String>,
    pub tier: String,
    pub sample_percent: Option<f64>,
    pub state: String,
    pub actor: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub objects_checked: Option<i64>,
    pub bytes_checked: Option<i64>,
    pub restore_ms: Option<i64>,
    pub restore_bytes_per_sec: Option<f64>,
    pub reason: Option<String>,
    pub tables: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, FromRow)]
pub struct TableRow {
    pub schema_name: String,
    pub table_name: String,
    pub rows: i64,
    pub restored_rows: Option<i64>,
}

#[derive(Clone, Debug, Serialize, FromRow)]
pub struct SizePoint {
    pub backup_id: Uuid,
    pub source: String,
    pub kind: String,
    pub completed_at: DateTime<Utc>,
    pub raw_bytes: i64,
    pub stored_bytes: i64,
    pub new_bytes: i64,
}

#[derive(Clone, Debug, Serialize, FromRow)]
pub struct StoragePoint {
    pub at: DateTime<Utc>,
    pub bytes: i64,
    pub objects: i64,
}

#[derive(Clone, Debug, Serialize, FromRow)]
pub struct VerificationDay {
    pub day: chrono::NaiveDate,
    pub passed: i64,
    pub failed: i64,
}

#[derive(Clone, Debug, Serialize, FromRow)]
pub struct AuditRow {
    pub position: i64,
    pub id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub stream: String,
    pub version: i64,
    pub actor: String,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Option<Uuid>,
    pub payload: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

/// Filters of the audit trail. All present filters must hold; paging is keyset on position,
/// newest first: pass the last page's smallest position as `before`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditFilter {
    /// Exact event types (`backup.completed`); a type ending in `.` or `.*` matches the prefix.
    pub types: Vec<String>,
    pub actor: Option<String>,
    pub stream: Option<String>,
    /// Recorded at or after.
    pub from: Option<DateTime<Utc>>,
    /// Recorded strictly before.
    pub to: Option<DateTime<Utc>>,
    /// Only positions below this.
    pub before: Option<u64>,
    pub limit: u32,
}

#[derive(Clone, Debug, Serialize, FromRow)]
pub struct AlertRow {
    pub alert_id: Uuid,
    pub severity: String,
    pub kind: String,
    pub subject: String,
    pub message: String,
    pub raised_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Serialize, FromRow)]
pub struct RecoveryRow {
    pub recovery_id: Uuid,
    pub backup_id: Uuid,
    pub operator: String,
    pub scope: serde_json::Value,
    pub state: String,
    pub requested_by: Option<String>,
    pub requested_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, FromRow)]
pub struct ConnectivityRow {
    pub backend: String,
    pub ok: bool,
    pub latency_ms: i64,
    pub error: Option<String>,
    pub checked_at: DateTime<Utc>,
}

/// The latest recorded check of a health endpoint.
#[derive(Clone, Debug, Serialize, FromRow)]
pub struct HealthRow {
    pub endpoint: String,
    pub state: String,
    pub ok: bool,
    pub status: Option<i32>,
    pub latency_ms: i64,
    pub error: Option<String>,
    pub checked_at: DateTime<Utc>,
}

/// One recorded check (state changes, failed and slow checks, hourly samples).
#[derive(Clone, Debug, Serialize, FromRow)]
pub struct HealthCheckRow {
    pub endpoint: String,
    pub checked_at: DateTime<Utc>,
    pub ok: bool,
    pub status: Option<i32>,
    pub latency_ms: i64,
    pub state: String,
    pub error: Option<String>,
}

/// A `storage.usage_sampled` as projected.
#[derive(Clone, Debug, Serialize, FromRow)]
pub struct UsageRow {
    pub repository: String,
    pub region: String,
    pub storage_class: String,
    pub bytes: i64,
    pub objects: i64,
    pub sampled_at: DateTime<Utc>,
}

/// How long restoring the latest backup should take, from measured restore speeds.
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryEstimate {
    pub backup_id: Uuid,
    pub source: String,
    pub raw_bytes: i64,
    /// Bytes of source data per second, the median of the last (up to) five restore-tier
    /// verifications of this source that measured it.
    pub bytes_per_sec: Option<f64>,
    pub samples: i64,
    pub estimated_seconds: Option<f64>,
    /// The restore of this very backup, when a verification measured it.
    pub measured_ms: Option<i64>,
}

/// Per source and kind, for `/metrics`.
#[derive(Clone, Debug, Serialize, FromRow)]
pub struct LastSuccess {
    pub source: String,
    pub kind: String,
    pub completed_at: DateTime<Utc>,
    pub duration_ms: Option<i64>,
    pub raw_bytes: Option<i64>,
    pub stored_bytes: Option<i64>,
    pub new_bytes: Option<i64>,
}

/// One DR drill, for the dashboard's list and RTO trend.
#[derive(Clone, Debug, Serialize, FromRow)]
pub struct DrillRow {
    pub drill_id: Uuid,
    pub source: String,
    pub passed: Option<bool>,
    pub recovery_ms: Option<i64>,
    pub rto_target_ms: Option<i64>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// The newest completed DR drill of a source (for `/metrics`).
#[derive(Clone, Debug, Serialize, FromRow)]
pub struct LastDrill {
    pub source: String,
    pub passed: Option<bool>,
    pub recovery_ms: Option<i64>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A replica's newest measured lag (`replication.lag_measured`, for `/metrics`).
#[derive(Clone, Debug, Serialize, FromRow)]
pub struct ReplicaLag {
    /// The replica's name (`[[repository.replicas]] name`, the event's `region`).
    pub replica: String,
    pub lag_seconds: i64,
    pub measured_at: DateTime<Utc>,
}

/// A replica as the dashboard shows it: its newest measured lag and its newest replication
/// (either may be missing: a replica measured before any replication, or the reverse).
#[derive(Clone, Debug, Serialize, FromRow)]
pub struct ReplicaRow {
    pub replica: String,
    pub lag_seconds: Option<i64>,
    pub measured_at: Option<DateTime<Utc>>,
    /// `running`, `completed` or `failed`: the newest replication event's.
    pub state: Option<String>,
    pub state_at: Option<DateTime<Utc>>,
    pub backup_id: Option<Uuid>,
    /// Why the newest replication failed (empty otherwise).
    pub reason: Option<String>,
    /// The newest completed replication: when, and of which backup.
    pub last_replicated_at: Option<DateTime<Utc>>,
    pub last_backup_id: Option<Uuid>,
}

#[derive(Clone, Debug, Serialize, FromRow)]
pub struct Count {
    pub label: String,
    pub n: i64,
}

impl Projections {
    /// Every source with a backup, with its last success and its latest attempt.
    ///
    /// The source names come from a loose index scan (one index probe per source), and each
    /// source's rows from index lookups, so the cost follows the number of sources, not backups.
    pub async fn sources(&self) -> Result<Vec<SourceSummary>, ProjectionError> {
        let names: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE s(source) AS ( \
               SELECT min(source) FROM backups \
               UNION ALL SELECT (SELECT min(b.source) FROM backups b WHERE b.source > s.source) \
               FROM s WHERE s.source IS NOT NULL) \
             SELECT source FROM s WHERE source IS NOT NULL",
        )
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(names.len());
        for source in names {
            let latest: Option<BackupRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {BACKUP_COLUMNS} FROM backups WHERE source = $1 \
                 ORDER BY began_at DESC NULLS LAST, last_position DESC LIMIT 1"
            )))
            .bind(&source)
            .fetch_optional(self.pool())
            .await?;
            let Some(latest) = latest else { continue };
            let last_success: Option<BackupRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {BACKUP_COLUMNS} FROM backups WHERE source = $1 AND state = 'completed' \
                 ORDER BY completed_at DESC LIMIT 1"
            )))
            .bind(&source)
            .fetch_optional(self.pool())
            .await?;
            let (completed, failed_7d): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM backups WHERE source = $1 AND state = 'completed'), \
                   (SELECT count(*) FROM backups WHERE source = $1 AND state = 'failed' \
                      AND failed_at > now() - interval '7 days')",
            )
            .bind(&source)
            .fetch_one(self.pool())
            .await?;
            out.push(SourceSummary {
                source,
                last_success,
                latest,
                completed,
                failed_7d,
            });
        }
        Ok(out)
    }

    /// Backups, newest first, optionally of one source; keyset paging on `last_position`.
    pub async fn backups(
        &self,
        source: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<BackupRow>, ProjectionError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {BACKUP_COLUMNS} FROM backups \
             WHERE ($1::text IS NULL OR source = $1) AND ($2::bigint IS NULL OR last_position < $2) \
             ORDER BY last_position DESC LIMIT $3"
        )))
        .bind(source)
        .bind(before)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn backup(&self, id: Uuid) -> Result<Option<BackupRow>, ProjectionError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {BACKUP_COLUMNS} FROM backups WHERE backup_id = $1"
        )))
        .bind(id)
        .fetch_optional(self.pool())
        .await?)
    }

    /// The newest completed backup (of one source, or of any).
    pub async fn latest_completed(
        &self,
        source: Option<&str>,
    ) -> Result<Option<BackupRow>, ProjectionError> {
        self.latest(source, false).await
    }

    /// The newest completed backup that passed verification (of one source, or of any).
    pub async fn latest_verified(
        &self,
        source: Option<&str>,
    ) -> Result<Option<BackupRow>, ProjectionError> {
        self.latest(source, true).await
    }

    async fn latest(
        &self,
        source: Option<&str>,
        verified: bool,
    ) -> Result<Option<BackupRow>, ProjectionError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {BACKUP_COLUMNS} FROM backups WHERE state = 'completed' \
             AND ($1::text IS NULL OR source = $1) \
             AND (NOT $2 OR verification_state = 'passed') ORDER BY completed_at DESC LIMIT 1"
        )))
        .bind(source)
        .bind(verified)
        .fetch_optional(self.pool())
        .await?)
    }

    pub async fn backup_tables(&self, id: Uuid) -> Result<Vec<TableRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT schema_name, table_name, rows, restored_rows FROM backup_tables \
             WHERE backup_id = $1 ORDER BY schema_name, table_name",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn backup_verifications(
        &self,
        id: Uuid,
    ) -> Result<Vec<VerificationRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT v.verification_id, v.backup_id, b.source, v.tier, v.sample_percent, v.state, \
               v.actor, v.started_at, v.finished_at, v.objects_checked, v.bytes_checked, v.restore_ms, \
               v.restore_bytes_per_sec, v.reason, v.tables \
             FROM verifications v LEFT JOIN backups b USING (backup_id) \
             WHERE v.backup_id = $1 ORDER BY v.last_position DESC",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Verifications that finished (or started, if still running) since `since`, newest first.
    pub async fn verifications_since(
        &self,
        since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<VerificationRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT v.verification_id, v.backup_id, b.source, v.tier, v.sample_percent, v.state, \
               v.actor, v.started_at, v.finished_at, v.objects_checked, v.bytes_checked, v.restore_ms, \
               v.restore_bytes_per_sec, v.reason, v.tables \
             FROM verifications v LEFT JOIN backups b USING (backup_id) \
             WHERE COALESCE(v.finished_at, v.started_at) >= $1 \
             ORDER BY v.last_position DESC LIMIT $2",
        )
        .bind(since)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?)
    }

    /// Passed and failed verifications per UTC day since `since` (days without any are absent).
    pub async fn verification_days(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<VerificationDay>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT (finished_at AT TIME ZONE 'UTC')::date AS day, \
               count(*) FILTER (WHERE state = 'passed') AS passed, \
               count(*) FILTER (WHERE state = 'failed') AS failed \
             FROM verifications WHERE finished_at >= $1 GROUP BY 1 ORDER BY 1",
        )
        .bind(since)
        .fetch_all(self.pool())
        .await?)
    }

    /// Sizes of completed backups since `since`, oldest first.
    pub async fn size_series(
        &self,
        source: Option<&str>,
        since: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<SizePoint>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT * FROM (SELECT backup_id, source, kind, completed_at, \
               COALESCE(raw_bytes, 0) AS raw_bytes, COALESCE(stored_bytes, 0) AS stored_bytes, \
               COALESCE(new_bytes, 0) AS new_bytes \
             FROM backups WHERE completed_at IS NOT NULL AND completed_at >= $2 \
               AND ($1::text IS NULL OR source = $1) \
             ORDER BY completed_at DESC LIMIT $3) s ORDER BY completed_at",
        )
        .bind(source)
        .bind(since)
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?)
    }

    /// Storage used over time: per bucket (`hour` or `day`), the sum over regions and storage
    /// classes of each one's last sample in the bucket.
    pub async fn storage_series(
        &self,
        since: DateTime<Utc>,
        daily: bool,
    ) -> Result<Vec<StoragePoint>, ProjectionError> {
        let sql = if daily {
            // Kept per day by the projector (the day's last sample per region and class).
            "SELECT day::timestamp AT TIME ZONE 'UTC' AS at, sum(bytes)::bigint AS bytes, \
               sum(objects)::bigint AS objects \
             FROM storage_daily WHERE day >= ($1 AT TIME ZONE 'UTC')::date GROUP BY day ORDER BY day"
        } else {
            "SELECT at, sum(bytes)::bigint AS bytes, sum(objects)::bigint AS objects FROM ( \
               SELECT DISTINCT ON (date_trunc('hour', sampled_at), region, storage_class) \
                 date_trunc('hour', sampled_at) AS at, bytes, objects \
               FROM storage_usage WHERE sampled_at >= $1 \
               ORDER BY date_trunc('hour', sampled_at), region, storage_class, sampled_at DESC, position DESC \
             ) s GROUP BY at ORDER BY at"
        };
        Ok(sqlx::query_as(sql)
            .bind(since)
            .fetch_all(self.pool())
            .await?)
    }

    /// The estimated recovery time of the newest completed backup (of a source, or of any).
    pub async fn recovery_estimate(
        &self,
        source: Option<&str>,
    ) -> Result<Option<RecoveryEstimate>, ProjectionError> {
        let Some(latest) = self.latest_completed(source).await? else {
            return Ok(None);
        };
        let speeds: Vec<f64> = sqlx::query_scalar(
            "SELECT v.restore_bytes_per_sec FROM verifications v JOIN backups b USING (backup_id) \
             WHERE b.source = $1 AND v.state = 'passed' AND v.restore_bytes_per_sec > 0 \
             ORDER BY v.last_position DESC LIMIT 5",
        )
        .bind(&latest.source)
        .fetch_all(self.pool())
        .await?;
        let bytes_per_sec = median(speeds.clone());
        let raw = latest.raw_bytes.unwrap_or(0);
        Ok(Some(RecoveryEstimate {
            backup_id: latest.backup_id,
            source: latest.source.clone(),
            raw_bytes: raw,
            bytes_per_sec,
            samples: speeds.len() as i64,
            estimated_seconds: bytes_per_sec.map(|s| raw as f64 / s),
            measured_ms: latest.restore_ms,
        }))
    }

    pub async fn open_alerts(&self, limit: u32) -> Result<Vec<AlertRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT alert_id, severity, kind, subject, message, raised_at, resolved_at FROM alerts \
             WHERE resolved_at IS NULL ORDER BY raised_at DESC LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?)
    }

    /// The dashboard's alerts panel: the open alerts (critical first, newest first), then the
    /// most recently resolved ones, `limit` of each at most.
    /// Re-encryption jobs, newest first.
    pub async fn reencryption_jobs(
        &self,
        limit: u32,
    ) -> Result<Vec<ReencryptionJobRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT job_id, started_at, purposes, from_key_ids, to_key_id, state, backups_done, \
             backups_total, objects, bytes, updated_at, reason FROM reencryption_jobs \
             ORDER BY started_at DESC, job_id DESC LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn alerts_panel(&self, limit: u32) -> Result<Vec<AlertRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "(SELECT alert_id, severity, kind, subject, message, raised_at, resolved_at FROM alerts \
               WHERE resolved_at IS NULL \
               ORDER BY CASE severity WHEN 'critical' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END, \
                 raised_at DESC LIMIT $1) \
             UNION ALL \
             (SELECT alert_id, severity, kind, subject, message, raised_at, resolved_at FROM alerts \
               WHERE resolved_at IS NOT NULL ORDER BY resolved_at DESC LIMIT $1)",
        )
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn recoveries(&self, limit: u32) -> Result<Vec<RecoveryRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT recovery_id, backup_id, operator, scope, state, requested_by, requested_at, \
               finished_at, duration_ms, reason FROM recoveries ORDER BY last_position DESC LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?)
    }

    /// Every health endpoint's latest recorded check, by name.
    pub async fn health_endpoints(&self) -> Result<Vec<HealthRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT endpoint, state, ok, status, latency_ms, error, checked_at FROM health_status \
             ORDER BY endpoint",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// The recorded checks since `since`, oldest first.
    pub async fn health_checks(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<HealthCheckRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT endpoint, checked_at, ok, status, latency_ms, state, error FROM health_checks \
             WHERE checked_at >= $1 ORDER BY endpoint, checked_at, position",
        )
        .bind(since)
        .fetch_all(self.pool())
        .await?)
    }

    /// The usage samples since `since`, oldest first (plus, per series, the latest one before
    /// it, so a series sampled before the window still counts).
    pub async fn usage_samples(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<UsageRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT repository, region, storage_class, bytes, objects, sampled_at FROM ( \
               SELECT DISTINCT ON (repository, region, storage_class) position, repository, region, \
                 storage_class, bytes, objects, sampled_at FROM storage_usage WHERE sampled_at < $1 \
                 ORDER BY repository, region, storage_class, sampled_at DESC, position DESC \
             ) before_window \
             UNION ALL \
             SELECT repository, region, storage_class, bytes, objects, sampled_at FROM storage_usage \
             WHERE sampled_at >= $1 ORDER BY sampled_at",
        )
        .bind(since)
        .fetch_all(self.pool())
        .await?)
    }

    pub async fn connectivity(&self) -> Result<Vec<ConnectivityRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT backend, ok, latency_ms, error, checked_at FROM storage_connectivity ORDER BY backend",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// The audit trail, filtered, newest first.
    pub async fn audit(&self, f: &AuditFilter) -> Result<Vec<AuditRow>, ProjectionError> {
        let (sql, binds) = audit_sql(f);
        let mut q = sqlx::query_as::<_, AuditRow>(sqlx::AssertSqlSafe(sql));
        for b in binds {
            q = match b {
                Bind::Text(s) => q.bind(s),
                Bind::Texts(v) => q.bind(v),
                Bind::Time(t) => q.bind(t),
                Bind::Int(i) => q.bind(i),
            };
        }
        Ok(q.fetch_all(self.pool()).await?)
    }

    /// The plan PostgreSQL picks for an audit query (`EXPLAIN`), for the benchmark report.
    pub async fn explain_audit(&self, f: &AuditFilter) -> Result<String, ProjectionError> {
        let (sql, binds) = audit_sql(f);
        let mut q = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")));
        for b in binds {
            q = match b {
                Bind::Text(s) => q.bind(s),
                Bind::Texts(v) => q.bind(v),
                Bind::Time(t) => q.bind(t),
                Bind::Int(i) => q.bind(i),
            };
        }
        Ok(q.fetch_all(self.pool()).await?.join("\n"))
    }

    /// For `/metrics`: the last success per source and kind.
    pub async fn last_successes(&self) -> Result<Vec<LastSuccess>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT ON (source, kind) source, kind, completed_at, duration_ms, raw_bytes, \
               stored_bytes, new_bytes FROM backups WHERE state IN ('completed', 'deleted') \
               AND completed_at IS NOT NULL ORDER BY source, kind, completed_at DESC",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// For `/metrics`: finished verifications by result.
    pub async fn verification_counts(&self) -> Result<Vec<Count>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT state AS label, count(*) AS n FROM verifications GROUP BY state ORDER BY state",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// For `/metrics`: dead letters per consumer.
    pub async fn dead_letter_counts(&self) -> Result<Vec<Count>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT consumer AS label, count(*) AS n FROM dead_letters GROUP BY consumer ORDER BY consumer",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// For `/metrics`: events seen per type.
    pub async fn event_counts(&self) -> Result<Vec<Count>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT event_type AS label, events AS n FROM event_counts ORDER BY event_type",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// For `/metrics`: backups per state.
    pub async fn backup_state_counts(&self) -> Result<Vec<Count>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT state AS label, count(*) AS n FROM backups GROUP BY state ORDER BY state",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// The newest `limit` drills, newest first (running ones have no verdict yet).
    pub async fn drills(&self, limit: i64) -> Result<Vec<DrillRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT drill_id, coalesce(report->>'source', '') AS source, passed, recovery_ms, \
               (report->>'rto_target_ms')::bigint AS rto_target_ms, started_at, finished_at \
             FROM drills ORDER BY coalesce(finished_at, started_at) DESC NULLS LAST, \
               last_position DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// For `/metrics`: per source, its newest completed drill (the source is the report's).
    pub async fn last_drills(&self) -> Result<Vec<LastDrill>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT ON (coalesce(report->>'source', '')) \
               coalesce(report->>'source', '') AS source, passed, recovery_ms, finished_at \
             FROM drills WHERE finished_at IS NOT NULL \
             ORDER BY coalesce(report->>'source', ''), finished_at DESC, last_position DESC",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// For `/metrics`: each replica's newest measured lag.
    pub async fn replication_lags(&self) -> Result<Vec<ReplicaLag>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT region AS replica, lag_seconds, measured_at FROM replication_lag ORDER BY region",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// Every replica's lag and newest replication, by name (the dashboard's panel).
    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT coalesce(l.region, s.replica) AS replica, l.lag_seconds, l.measured_at, \
               s.state, s.state_at, s.backup_id, s.reason, s.last_replicated_at, s.last_backup_id \
             FROM replication_lag l FULL OUTER JOIN replication_status s ON s.replica = l.region \
             ORDER BY 1",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// For `/metrics`: open alerts per severity.
    pub async fn open_alert_counts(&self) -> Result<Vec<Count>, ProjectionError> {
        Ok(sqlx::query_as(
            "SELECT severity AS label, count(*) AS n FROM alerts WHERE resolved_at IS NULL \
             GROUP BY severity ORDER BY severity",
        )
        .fetch_all(self.pool())
        .await?)
    }

    /// The first and last positions recorded in `[from, to)`, from the audit trail's index.
    pub async fn audit_position_range(
        &self,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Option<(u64, u64)>, ProjectionError> {
        let row: (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT min(position), max(position) FROM audit_events \
             WHERE ($1::timestamptz IS NULL OR recorded_at >= $1) \
               AND ($2::timestamptz IS NULL OR recorded_at < $2)",
        )
        .bind(from)
        .bind(to)
        .fetch_one(self.pool())
        .await?;
        Ok(match row {
            (Some(a), Some(b)) => Some((a as u64, b as u64)),
            _ => None,
        })
    }
}

enum Bind {
    Text(String),
    Texts(Vec<String>),
    Time(DateTime<Utc>),
    Int(i64),
}

fn audit_sql(f: &AuditFilter) -> (String, Vec<Bind>) {
    let mut sql = String::from(
        "SELECT position, id, event_type, schema_version, stream, version, actor, occurred_at, \
         recorded_at, correlation_id, causation_id, payload, prev_hash, hash FROM audit_events WHERE true",
    );
    let mut binds = Vec::new();
    let mut n = 0;
    let mut next = |binds: &mut Vec<Bind>, b: Bind| {
        binds.push(b);
        n += 1;
        n
    };
    let (exact, prefixes): (Vec<&String>, Vec<&String>) = f
        .types
        .iter()
        .partition(|t| !(t.ends_with('.') || t.ends_with(".*")));
    if !exact.is_empty() || !prefixes.is_empty() {
        let mut parts = Vec::new();
        if exact.len() == 1 {
            // One type: a plain equality, which the planner matches to the type index.
            let i = next(&mut binds, Bind::Text(exact[0].clone()));
            parts.push(format!("event_type = ${i}"));
        } else if !exact.is_empty() {
            let i = next(
                &mut binds,
                Bind::Texts(exact.into_iter().cloned().collect()),
            );
            parts.push(format!("event_type = ANY(${i})"));
        }
        for p in prefixes {
            let prefix = p.trim_end_matches('*');
            // LIKE with the prefix's own wildcards escaped; the type index serves it.
            let escaped = prefix
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            let i = next(&mut binds, Bind::Text(format!("{escaped}%")));
            parts.push(format!("event_type LIKE ${i}"));
        }
        sql.push_str(&format!(" AND ({})", parts.join(" OR ")));
    }
    if let Some(a) = &f.actor {
        let i = next(&mut binds, Bind::Text(a.clone()));
        sql.push_str(&format!(" AND actor = ${i}"));
    }
    if let Some(s) = &f.stream {
        let i = next(&mut binds, Bind::Text(s.clone()));
        sql.push_str(&format!(" AND stream = ${i}"));
    }
    if let Some(t) = f.from {
        let i = next(&mut binds, Bind::Time(t));
        sql.push_str(&format!(" AND recorded_at >= ${i}"));
    }
    if let Some(t) = f.to {
        let i = next(&mut binds, Bind::Time(t));
        sql.push_str(&format!(" AND recorded_at < ${i}"));
    }
    if let Some(b) = f.before {
        let i = next(&mut binds, Bind::Int(b.min(i64::MAX as u64) as i64));
        sql.push_str(&format!(" AND position < ${i}"));
    }
    let i = next(&mut binds, Bind::Int(f.limit.clamp(1, 1000) as i64));
    sql.push_str(&format!(" ORDER BY position DESC LIMIT ${i}"));
    (sql, binds)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_sql_binds_every_filter_in_order() {
        let f = AuditFilter {
            types: vec!["backup.completed".into(), "verification.*".into()],
            actor: Some("operator:alice".into()),
            stream: None,
            from: Some(Utc::now()),
            to: None,
            before: Some(10),
            limit: 50,
        };
        let (sql, binds) = audit_sql(&f);
        assert_eq!(binds.len(), 6);
        assert!(sql.contains("event_type = $1"), "{sql}");
        assert!(sql.contains("event_type LIKE $2"), "{sql}");
        assert!(sql.contains("actor = $3"), "{sql}");
        assert!(sql.contains("recorded_at >= $4"), "{sql}");
        assert!(sql.contains("position < $5"), "{sql}");
        assert!(sql.ends_with("LIMIT $6"), "{sql}");
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
