//! The state read models: backups, verifications, table row counts, storage usage and
//! connectivity, health, alerts, recoveries, keys, drills, dead letters, replication lag and
//! per-type event counts.
//!
//! Every write here is derived from the event alone (its payload, actor and timestamps) and is
//! idempotent on its own: inserts are keyed by position or by the entity id, and updates of an
//! entity carry the event's position and only apply when it is newer than the row's
//! `last_position`. `event_counts` is the one plain counter; the batch transaction (see the crate
//! doc) is what keeps it exact, and tests use it to prove that no event is applied twice.
//!
//! Timestamps: an entity's times are the events' `occurred_at` (when it happened at the worker),
//! so a slow publication does not shift them.

use std::collections::BTreeMap;

use async_trait::async_trait;
use backstop_events::{BackupMethod, Envelope, Event, VerifyTier};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::{ProjectionError, Projector};

pub struct StateProjector;

pub const NAME: &str = "state";

#[async_trait]
impl Projector for StateProjector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "event_counts",
            "backups",
            "backup_tables",
            "verifications",
            "storage_usage",
            "storage_daily",
            "storage_connectivity",
            "health_status",
            "health_checks",
            "alerts",
            "recoveries",
            "reencryption_jobs",
            "key_accesses",
            "keys",
            "drills",
            "dead_letters",
            "replication_lag",
            "replication_status",
        ]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[Envelope],
    ) -> Result<(), ProjectionError> {
        let mut counts: BTreeMap<&str, (i64, DateTime<Utc>)> = BTreeMap::new();
        for env in events {
            let c = counts
                .entry(env.event_type.as_str())
                .or_insert((0, env.recorded_at));
            c.0 += 1;
            c.1 = c.1.max(env.recorded_at);
            match env.event() {
                Ok(event) => apply_event(conn, env, &event).await?,
                Err(e) => {
                    // Only events the ledger validated are here, so this means a newer writer;
                    // the audit trail still has the event. Skipping is deterministic, so a
                    // rebuild by the same build skips it too.
                    tracing::warn!(position = env.position, error = %e, "state projector skips an event it cannot decode");
                }
            }
        }
        for (event_type, (n, last_at)) in counts {
            sqlx::query(
                "INSERT INTO event_counts (event_type, events, last_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (event_type) DO UPDATE SET events = event_counts.events + EXCLUDED.events, \
                 last_at = GREATEST(event_counts.last_at, EXCLUDED.last_at)",
            )
            .bind(event_type)
            .bind(n)
            .bind(last_at)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

fn tier_name(t: &VerifyTier) -> (&'static str, Option<f64>) {
    match t {
        VerifyTier::Checksums => ("checksums", None),
        VerifyTier::Sampled { percent } => ("sampled", Some(*percent)),
        VerifyTier::Restore => ("restore", None),
    }
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

async fn apply_event(
    conn: &mut PgConnection,
    env: &Envelope,
    event: &Event,
) -> Result<(), ProjectionError> {
    let pos = env.position as i64;
    let at = env.occurred_at;
    let actor = env.actor.to_string();
    match event {
        Event::BackupRequested(e) => {
            sqlx::query(
                "INSERT INTO backups (backup_id, source, kind, physical, attempt, trigger, state, \
                   requested_by, requested_at, last_position) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'requested', $7, $8, $9) \
                 ON CONFLICT (backup_id) DO UPDATE SET attempt = EXCLUDED.attempt, \
                   trigger = EXCLUDED.trigger, requested_by = EXCLUDED.requested_by, \
                   requested_at = EXCLUDED.requested_at, last_position = EXCLUDED.last_position \
                 WHERE backups.last_position < EXCLUDED.last_position",
            )
            .bind(e.backup_id)
            .bind(&e.source)
            .bind(e.kind.as_str())
            .bind(e.method == BackupMethod::Physical)
            .bind(e.attempt as i32)
            .bind(serde_json::to_value(&e.trigger).unwrap_or_default())
            .bind(&actor)
            .bind(at)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        Event::BackupStarted(e) => {
            sqlx::query(
                "INSERT INTO backups (backup_id, source, kind, physical, parent, state, started_at, \
                   host, last_position) \
                 VALUES ($1, $2, $3, $4, $5, 'started', $6, $7, $8) \
                 ON CONFLICT (backup_id) DO UPDATE SET kind = EXCLUDED.kind, \
                   physical = EXCLUDED.physical, parent = EXCLUDED.parent, \
                   started_at = EXCLUDED.started_at, host = EXCLUDED.host, \
                   state = CASE WHEN backups.state = 'requested' THEN 'started' ELSE backups.state END, \
                   last_position = EXCLUDED.last_position \
                 WHERE backups.last_position < EXCLUDED.last_position",
            )
            .bind(e.backup_id)
            .bind(&e.source)
            .bind(e.kind.as_str())
            .bind(e.method == BackupMethod::Physical)
            .bind(e.parent)
            .bind(at)
            .bind(&e.host)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        Event::BackupCompleted(e) => {
            let started = at - chrono::Duration::milliseconds(i(e.duration_ms));
            let applied = sqlx::query(
                "INSERT INTO backups (backup_id, source, kind, physical, parent, state, started_at, \
                   completed_at, manifest, manifest_sha3, raw_bytes, stored_bytes, new_bytes, chunks, \
                   new_chunks, duration_ms, last_position, attempt) \
                 VALUES ($1, $2, $3, $4, $5, 'completed', $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
                 ON CONFLICT (backup_id) DO UPDATE SET kind = EXCLUDED.kind, attempt = EXCLUDED.attempt, \
                   physical = EXCLUDED.physical, parent = EXCLUDED.parent, \
                   state = CASE WHEN backups.state = 'deleted' THEN 'deleted' ELSE 'completed' END, \
                   started_at = COALESCE(backups.started_at, EXCLUDED.started_at), \
                   completed_at = EXCLUDED.completed_at, manifest = EXCLUDED.manifest, \
                   manifest_sha3 = EXCLUDED.manifest_sha3, raw_bytes = EXCLUDED.raw_bytes, \
                   stored_bytes = EXCLUDED.stored_bytes, new_bytes = EXCLUDED.new_bytes, \
                   chunks = EXCLUDED.chunks, new_chunks = EXCLUDED.new_chunks, \
                   duration_ms = EXCLUDED.duration_ms, failure_reason = NULL, \
                   last_position = EXCLUDED.last_position \
                 WHERE backups.last_position < EXCLUDED.last_position",
            )
            .bind(e.backup_id)
            .bind(&e.source)
            .bind(e.kind.as_str())
            .bind(e.method == BackupMethod::Physical)
            .bind(e.parent)
            .bind(started)
            .bind(at)
            .bind(&e.manifest)
            .bind(&e.manifest_sha3)
            .bind(i(e.raw_bytes))
            .bind(i(e.stored_bytes))
            .bind(i(e.new_bytes))
            .bind(i(e.chunks))
            .bind(i(e.new_chunks))
            .bind(i(e.duration_ms))
            .bind(pos)
            .bind(e.attempt as i32)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            if applied > 0 {
                for t in &e.tables {
                    sqlx::query(
                        "INSERT INTO backup_tables (backup_id, schema_name, table_name, rows) \
                         VALUES ($1, $2, $3, $4) ON CONFLICT (backup_id, schema_name, table_name) \
                         DO UPDATE SET rows = EXCLUDED.rows",
                    )
                    .bind(e.backup_id)
                    .bind(&t.schema)
                    .bind(&t.table)
                    .bind(i(t.rows))
                    .execute(&mut *conn)
                    .await?;
                }
            }
        }
        Event::BackupFailed(e) => {
            sqlx::query(
                "INSERT INTO backups (backup_id, source, kind, attempt, state, failed_at, \
                   failure_reason, last_position) \
                 VALUES ($1, $2, 'unknown', $3, 'failed', $4, $5, $6) \
                 ON CONFLICT (backup_id) DO UPDATE SET state = 'failed', attempt = EXCLUDED.attempt, \
                   failed_at = EXCLUDED.failed_at, failure_reason = EXCLUDED.failure_reason, \
                   last_position = EXCLUDED.last_position \
                 WHERE backups.last_position < EXCLUDED.last_position",
            )
            .bind(e.backup_id)
            .bind(&e.source)
            .bind(e.attempt as i32)
            .bind(at)
            .bind(&e.reason)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        // A request closed unchanged (configuration sources) took no backup: its row goes, so it
        // is neither pending nor failed and `list` shows nothing new.
        Event::BackupSkipped(e) => {
            sqlx::query("DELETE FROM backups WHERE backup_id = $1 AND state = 'requested'")
                .bind(e.backup_id)
                .execute(&mut *conn)
                .await?;
        }
        Event::UploadVerified(e) => {
            sqlx::query(
                "UPDATE backups SET upload_objects = $2, upload_bytes = $3, last_position = $4 \
                 WHERE backup_id = $1 AND last_position < $4",
            )
            .bind(e.backup_id)
            .bind(i(e.objects))
            .bind(i(e.bytes))
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        Event::VerificationStarted(e) => {
            let (tier, percent) = tier_name(&e.tier);
            sqlx::query(
                "INSERT INTO verifications (verification_id, backup_id, tier, sample_percent, state, \
                   actor, started_at, last_position) \
                 VALUES ($1, $2, $3, $4, 'running', $5, $6, $7) \
                 ON CONFLICT (verification_id) DO NOTHING",
            )
            .bind(e.verification_id)
            .bind(e.backup_id)
            .bind(tier)
            .bind(percent)
            .bind(&actor)
            .bind(at)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "UPDATE backups SET verification_state = CASE WHEN verification_state = 'unverified' \
                   THEN 'running' ELSE verification_state END, last_position = $2 \
                 WHERE backup_id = $1 AND last_position < $2",
            )
            .bind(e.backup_id)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        Event::VerificationPassed(e) => {
            let (tier, percent) = tier_name(&e.tier);
            let tables = serde_json::to_value(&e.tables).unwrap_or_default();
            finish_verification(
                conn,
                Finish {
                    verification_id: e.verification_id,
                    backup_id: e.backup_id,
                    tier,
                    percent,
                    passed: true,
                    actor: &actor,
                    at,
                    objects: Some(i(e.objects_checked)),
                    bytes: Some(i(e.bytes_checked)),
                    restore_ms: e.restore_ms.map(i),
                    speed: e
                        .restore_bytes_per_sec
                        .filter(|s| s.is_finite() && *s > 0.0),
                    reason: None,
                    tables,
                    pos,
                },
            )
            .await?;
            restored_rows(conn, e.backup_id, &e.tables).await?;
        }
        Event::VerificationFailed(e) => {
            let (tier, percent) = tier_name(&e.tier);
            let tables = serde_json::to_value(&e.tables).unwrap_or_default();
            finish_verification(
                conn,
                Finish {
                    verification_id: e.verification_id,
                    backup_id: e.backup_id,
                    tier,
                    percent,
                    passed: false,
                    actor: &actor,
                    at,
                    objects: None,
                    bytes: None,
                    restore_ms: None,
                    speed: None,
                    reason: Some(&e.reason),
                    tables,
                    pos,
                },
            )
            .await?;
            restored_rows(conn, e.backup_id, &e.tables).await?;
        }
        Event::BackupDeleted(e) => {
            sqlx::query(
                "UPDATE backups SET state = 'deleted', deleted_at = $2, deleted_policy = $3, \
                   deleted_reason = $4, last_position = $5 \
                 WHERE backup_id = $1 AND last_position < $5",
            )
            .bind(e.backup_id)
            .bind(at)
            .bind(&e.policy)
            .bind(&e.reason)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        Event::StorageUsageSampled(e) => {
            sqlx::query(
                "INSERT INTO storage_usage (position, sampled_at, region, storage_class, bytes, objects, repository) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (position) DO NOTHING",
            )
            .bind(pos)
            .bind(at)
            .bind(&e.region)
            .bind(&e.storage_class)
            .bind(i(e.bytes))
            .bind(i(e.objects))
            .bind(&e.repository)
            .execute(&mut *conn)
            .await?;
            // The day's last sample wins (by position: the ledger's order).
            sqlx::query(
                "INSERT INTO storage_daily (day, region, storage_class, bytes, objects, sampled_at, position) \
                 VALUES (($2 AT TIME ZONE 'UTC')::date, $3, $4, $5, $6, $2, $1) \
                 ON CONFLICT (day, region, storage_class) DO UPDATE SET bytes = EXCLUDED.bytes, \
                   objects = EXCLUDED.objects, sampled_at = EXCLUDED.sampled_at, position = EXCLUDED.position \
                 WHERE storage_daily.position < EXCLUDED.position",
            )
            .bind(pos)
            .bind(at)
            .bind(&e.region)
            .bind(&e.storage_class)
            .bind(i(e.bytes))
            .bind(i(e.objects))
            .execute(&mut *conn)
            .await?;
        }
        Event::StorageConnectivityChecked(e) => {
            sqlx::query(
                "INSERT INTO storage_connectivity (backend, ok, latency_ms, error, checked_at, last_position) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (backend) DO UPDATE SET ok = EXCLUDED.ok, latency_ms = EXCLUDED.latency_ms, \
                   error = EXCLUDED.error, checked_at = EXCLUDED.checked_at, \
                   last_position = EXCLUDED.last_position \
                 WHERE storage_connectivity.last_position < EXCLUDED.last_position",
            )
            .bind(&e.backend)
            .bind(e.ok)
            .bind(i(e.latency_ms))
            .bind(&e.error)
            .bind(at)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        Event::HealthChecked(e) => {
            sqlx::query(
                "INSERT INTO health_status (endpoint, ok, status, latency_ms, error, checked_at, last_position, state) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (endpoint) DO UPDATE SET ok = EXCLUDED.ok, status = EXCLUDED.status, \
                   latency_ms = EXCLUDED.latency_ms, error = EXCLUDED.error, \
                   checked_at = EXCLUDED.checked_at, last_position = EXCLUDED.last_position, \
                   state = EXCLUDED.state \
                 WHERE health_status.last_position < EXCLUDED.last_position",
            )
            .bind(&e.endpoint)
            .bind(e.ok)
            .bind(e.status.map(i32::from))
            .bind(i(e.latency_ms))
            .bind(&e.error)
            .bind(at)
            .bind(pos)
            .bind(health_state(e.state))
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "INSERT INTO health_checks (position, endpoint, checked_at, ok, status, latency_ms, state, error) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (position) DO NOTHING",
            )
            .bind(pos)
            .bind(&e.endpoint)
            .bind(at)
            .bind(e.ok)
            .bind(e.status.map(i32::from))
            .bind(i(e.latency_ms))
            .bind(health_state(e.state))
            .bind(&e.error)
            .execute(&mut *conn)
            .await?;
        }
        Event::AlertRaised(e) => {
            let severity = serde_json::to_value(e.severity)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "warning".into());
            sqlx::query(
                "INSERT INTO alerts (alert_id, severity, kind, subject, message, raised_at, last_position) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (alert_id) DO NOTHING",
            )
            .bind(e.alert_id)
            .bind(severity)
            .bind(&e.kind)
            .bind(&e.subject)
            .bind(&e.message)
            .bind(at)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        Event::AlertResolved(e) => {
            sqlx::query(
                "UPDATE alerts SET resolved_at = $2, resolved_message = $3, last_position = $4 \
                 WHERE alert_id = $1 AND last_position < $4",
            )
            .bind(e.alert_id)
            .bind(at)
            .bind(&e.message)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        Event::RecoveryRequested(e) => {
            recovery(
                conn,
                Recovery {
                    id: e.recovery_id,
                    backup_id: e.backup_id,
                    operator: &e.operator,
                    scope: serde_json::to_value(&e.scope).unwrap_or_default(),
                    state: "requested",
                    actor: &actor,
                    at,
                    duration_ms: None,
                    bytes: None,
                    reason: None,
                    pos,
                },
            )
            .await?;
        }
        Event::RecoveryStarted(e) => {
            recovery(
                conn,
                Recovery {
                    id: e.recovery_id,
                    backup_id: e.backup_id,
                    operator: &e.operator,
                    scope: serde_json::to_value(&e.scope).unwrap_or_default(),
                    state: "started",
                    actor: &actor,
                    at,
                    duration_ms: None,
                    bytes: None,
                    reason: None,
                    pos,
                },
            )
            .await?;
        }
        Event::RecoveryCompleted(e) => {
            recovery(
                conn,
                Recovery {
                    id: e.recovery_id,
                    backup_id: e.backup_id,
                    operator: &e.operator,
                    scope: serde_json::to_value(&e.scope).unwrap_or_default(),
                    state: "completed",
                    actor: &actor,
                    at,
                    duration_ms: Some(i(e.duration_ms)),
                    bytes: Some(i(e.bytes)),
                    reason: None,
                    pos,
                },
            )
            .await?;
        }
        Event::RecoveryFailed(e) => {
            recovery(
                conn,
                Recovery {
                    id: e.recovery_id,
                    backup_id: e.backup_id,
                    operator: &e.operator,
                    scope: serde_json::to_value(&e.scope).unwrap_or_default(),
                    state: "failed",
                    actor: &actor,
                    at,
                    duration_ms: None,
                    bytes: None,
                    reason: Some(&e.reason),
                    pos,
                },
            )
            .await?;
        }
        Event::KeyCreated(e) => {
            sqlx::query(
                "INSERT INTO keys (key_id, purpose, version, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key_id) DO NOTHING",
            )
            .bind(&e.key_id)
            .bind(&e.purpose)
            .bind(e.version as i32)
            .bind(at)
            .execute(&mut *conn)
            .await?;
        }
        Event::ReencryptionStarted(e) => {
            sqlx::query(
                "INSERT INTO reencryption_jobs (job_id, started_at, purposes, from_key_ids, \
                 to_key_id, state, backups_total, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, 'running', $6, $2) ON CONFLICT (job_id) DO NOTHING",
            )
            .bind(e.job_id)
            .bind(at)
            .bind(&e.purpose)
            .bind(&e.from_key_id)
            .bind(&e.to_key_id)
            .bind(e.backups as i64)
            .execute(&mut *conn)
            .await?;
        }
        Event::ReencryptionProgressed(e) => {
            sqlx::query(
                "UPDATE reencryption_jobs SET state = 'running', \
                 backups_done = GREATEST(backups_done, $2), backups_total = $3, \
                 objects = objects + $4, bytes = bytes + $5, updated_at = $6, reason = NULL \
                 WHERE job_id = $1",
            )
            .bind(e.job_id)
            .bind(e.backups_done as i64)
            .bind(e.backups_total as i64)
            .bind(e.objects as i64)
            .bind(e.bytes as i64)
            .bind(at)
            .execute(&mut *conn)
            .await?;
        }
        Event::ReencryptionCompleted(e) => {
            sqlx::query(
                "UPDATE reencryption_jobs SET state = 'completed', backups_done = $2, \
                 backups_total = $2, updated_at = $3, reason = NULL WHERE job_id = $1",
            )
            .bind(e.job_id)
            .bind(e.backups as i64)
            .bind(at)
            .execute(&mut *conn)
            .await?;
        }
        Event::ReencryptionFailed(e) => {
            sqlx::query(
                "UPDATE reencryption_jobs SET state = 'failed', reason = $2, updated_at = $3 \
                 WHERE job_id = $1",
            )
            .bind(e.job_id)
            .bind(&e.reason)
            .bind(at)
            .execute(&mut *conn)
            .await?;
        }
        // A rotation does not retire the old version: it still opens what it sealed until
        // re-encryption re-seals that and a retirement scan finds nothing left (`key.retired`).
        Event::KeyRetired(e) => {
            sqlx::query("UPDATE keys SET retired_at = $2 WHERE key_id = $1 AND retired_at IS NULL")
                .bind(&e.key_id)
                .bind(at)
                .execute(&mut *conn)
                .await?;
        }
        Event::KeyRotated(e) => {
            sqlx::query(
                "INSERT INTO keys (key_id, purpose, version, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key_id) DO NOTHING",
            )
            .bind(&e.new_key_id)
            .bind(&e.purpose)
            .bind(e.version as i32)
            .bind(at)
            .execute(&mut *conn)
            .await?;
        }
        Event::KeyAccessed(e) => {
            sqlx::query(
                "INSERT INTO key_accesses (position, accessed_at, actor, purpose, key_id, reason) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (position) DO NOTHING",
            )
            .bind(pos)
            .bind(at)
            .bind(&actor)
            .bind(&e.purpose)
            .bind(&e.key_id)
            .bind(&e.reason)
            .execute(&mut *conn)
            .await?;
        }
        Event::DrillStarted(e) => {
            sqlx::query(
                "INSERT INTO drills (drill_id, backup_id, target, started_at, last_position) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (drill_id) DO NOTHING",
            )
            .bind(e.drill_id)
            .bind(e.backup_id)
            .bind(&e.target)
            .bind(at)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        Event::DrillCompleted(e) => {
            sqlx::query(
                "INSERT INTO drills (drill_id, backup_id, passed, recovery_ms, report, finished_at, last_position) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (drill_id) DO UPDATE SET passed = EXCLUDED.passed, \
                   recovery_ms = EXCLUDED.recovery_ms, report = EXCLUDED.report, \
                   finished_at = EXCLUDED.finished_at, last_position = EXCLUDED.last_position \
                 WHERE drills.last_position < EXCLUDED.last_position",
            )
            .bind(e.drill_id)
            .bind(e.backup_id)
            .bind(e.passed)
            .bind(i(e.recovery_ms))
            .bind(&e.report)
            .bind(at)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        Event::WorkerDeadLettered(e) => {
            sqlx::query(
                "INSERT INTO dead_letters (position, at, consumer, event_id, event_type, event_position, \
                   deliveries, error) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (position) DO NOTHING",
            )
            .bind(pos)
            .bind(at)
            .bind(&e.consumer)
            .bind(e.event_id)
            .bind(&e.event_type)
            .bind(i(e.position))
            .bind(e.deliveries as i32)
            .bind(&e.error)
            .execute(&mut *conn)
            .await?;
        }
        Event::ReplicationLagMeasured(e) => {
            sqlx::query(
                "INSERT INTO replication_lag (region, lag_seconds, measured_at, last_position) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (region) DO UPDATE SET \
                   lag_seconds = EXCLUDED.lag_seconds, measured_at = EXCLUDED.measured_at, \
                   last_position = EXCLUDED.last_position \
                 WHERE replication_lag.last_position < EXCLUDED.last_position",
            )
            .bind(&e.region)
            .bind(i(e.lag_seconds))
            .bind(at)
            .bind(pos)
            .execute(&mut *conn)
            .await?;
        }
        Event::ReplicationStarted(e) => {
            replication_state(conn, &e.to_region, "running", e.backup_id, "", at, pos).await?;
        }
        Event::ReplicationFailed(e) => {
            replication_state(
                conn,
                &e.to_region,
                "failed",
                e.backup_id,
                &e.reason,
                at,
                pos,
            )
            .await?;
        }
        Event::ReplicationCompleted(e) => {
            replication_state(conn, &e.to_region, "completed", e.backup_id, "", at, pos).await?;
            sqlx::query(
                "UPDATE replication_status SET last_replicated_at = $2, last_backup_id = $3 \
                 WHERE replica = $1 \
                   AND (last_replicated_at IS NULL OR last_replicated_at <= $2)",
            )
            .bind(&e.to_region)
            .bind(at)
            .bind(e.backup_id)
            .execute(&mut *conn)
            .await?;
        }
        // The rest live in the audit trail only (for now).
        _ => {}
    }
    Ok(())
}

/// A replica's newest replication event (`replication_status`); an event already applied (a
/// replay) changes nothing.
async fn replication_state(
    conn: &mut PgConnection,
    replica: &str,
    state: &str,
    backup_id: uuid::Uuid,
    reason: &str,
    at: DateTime<Utc>,
    pos: i64,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "INSERT INTO replication_status (replica, state, backup_id, state_at, reason, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (replica) DO UPDATE SET \
           state = EXCLUDED.state, backup_id = EXCLUDED.backup_id, state_at = EXCLUDED.state_at, \
           reason = EXCLUDED.reason, last_position = EXCLUDED.last_position \
         WHERE replication_status.last_position < EXCLUDED.last_position",
    )
    .bind(replica)
    .bind(state)
    .bind(backup_id)
    .bind(at)
    .bind(reason)
    .bind(pos)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

struct Finish<'a> {
    verification_id: uuid::Uuid,
    backup_id: uuid::Uuid,
    tier: &'a str,
    percent: Option<f64>,
    passed: bool,
    actor: &'a str,
    at: DateTime<Utc>,
    objects: Option<i64>,
    bytes: Option<i64>,
    restore_ms: Option<i64>,
    speed: Option<f64>,
    reason: Option<&'a str>,
    tables: serde_json::Value,
    pos: i64,
}

async fn finish_verification(
    conn: &mut PgConnection,
    f: Finish<'_>,
) -> Result<(), ProjectionError> {
    let state = if f.passed { "passed" } else { "failed" };
    sqlx::query(
        "INSERT INTO verifications (verification_id, backup_id, tier, sample_percent, state, actor, \
           finished_at, objects_checked, bytes_checked, restore_ms, restore_bytes_per_sec, reason, \
           tables, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
         ON CONFLICT (verification_id) DO UPDATE SET state = EXCLUDED.state, \
           finished_at = EXCLUDED.finished_at, objects_checked = EXCLUDED.objects_checked, \
           bytes_checked = EXCLUDED.bytes_checked, restore_ms = EXCLUDED.restore_ms, \
           restore_bytes_per_sec = EXCLUDED.restore_bytes_per_sec, reason = EXCLUDED.reason, \
           tables = EXCLUDED.tables, last_position = EXCLUDED.last_position \
         WHERE verifications.last_position < EXCLUDED.last_position",
    )
    .bind(f.verification_id)
    .bind(f.backup_id)
    .bind(f.tier)
    .bind(f.percent)
    .bind(state)
    .bind(f.actor)
    .bind(f.at)
    .bind(f.objects)
    .bind(f.bytes)
    .bind(f.restore_ms)
    .bind(f.speed)
    .bind(f.reason)
    .bind(&f.tables)
    .bind(f.pos)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE backups SET verification_state = $3, verification_id = $2, verification_tier = $4, \
           verified_at = $5, verification_reason = $6, \
           verifications_passed = verifications_passed + CASE WHEN $7 THEN 1 ELSE 0 END, \
           verifications_failed = verifications_failed + CASE WHEN $7 THEN 0 ELSE 1 END, \
           restore_ms = COALESCE($8, restore_ms), \
           restore_bytes_per_sec = COALESCE($9, restore_bytes_per_sec), last_position = $10 \
         WHERE backup_id = $1 AND last_position < $10",
    )
    .bind(f.backup_id)
    .bind(f.verification_id)
    .bind(state)
    .bind(f.tier)
    .bind(f.at)
    .bind(f.reason)
    .bind(f.passed)
    .bind(f.restore_ms)
    .bind(f.speed)
    .bind(f.pos)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn restored_rows(
    conn: &mut PgConnection,
    backup_id: uuid::Uuid,
    tables: &[backstop_events::TableCheck],
) -> Result<(), ProjectionError> {
    for t in tables {
        sqlx::query(
            "INSERT INTO backup_tables (backup_id, schema_name, table_name, rows, restored_rows) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (backup_id, schema_name, table_name) \
             DO UPDATE SET restored_rows = EXCLUDED.restored_rows",
        )
        .bind(backup_id)
        .bind(&t.schema)
        .bind(&t.table)
        .bind(i(t.expected))
        .bind(i(t.restored))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

struct Recovery<'a> {
    id: uuid::Uuid,
    backup_id: uuid::Uuid,
    operator: &'a str,
    scope: serde_json::Value,
    state: &'a str,
    actor: &'a str,
    at: DateTime<Utc>,
    duration_ms: Option<i64>,
    bytes: Option<i64>,
    reason: Option<&'a str>,
    pos: i64,
}

async fn recovery(conn: &mut PgConnection, r: Recovery<'_>) -> Result<(), ProjectionError> {
    let requested = r.state == "requested";
    let finished = matches!(r.state, "completed" | "failed");
    sqlx::query(
        "INSERT INTO recoveries (recovery_id, backup_id, operator, scope, state, requested_by, \
           requested_at, started_at, finished_at, duration_ms, bytes, reason, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (recovery_id) DO UPDATE SET state = EXCLUDED.state, scope = EXCLUDED.scope, \
           requested_by = COALESCE(recoveries.requested_by, EXCLUDED.requested_by), \
           requested_at = COALESCE(recoveries.requested_at, EXCLUDED.requested_at), \
           started_at = COALESCE(EXCLUDED.started_at, recoveries.started_at), \
           finished_at = COALESCE(EXCLUDED.finished_at, recoveries.finished_at), \
           duration_ms = COALESCE(EXCLUDED.duration_ms, recoveries.duration_ms), \
           bytes = COALESCE(EXCLUDED.bytes, recoveries.bytes), \
           reason = COALESCE(EXCLUDED.reason, recoveries.reason), \
           last_position = EXCLUDED.last_position \
         WHERE recoveries.last_position < EXCLUDED.last_position",
    )
    .bind(r.id)
    .bind(r.backup_id)
    .bind(r.operator)
    .bind(&r.scope)
    .bind(r.state)
    .bind(requested.then_some(r.actor))
    .bind(requested.then_some(r.at))
    .bind((r.state == "started").then_some(r.at))
    .bind(finished.then_some(r.at))
    .bind(r.duration_ms)
    .bind(r.bytes)
    .bind(r.reason)
    .bind(r.pos)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn health_state(s: backstop_events::HealthState) -> &'static str {
    match s {
        backstop_events::HealthState::Up => "up",
        backstop_events::HealthState::Degraded => "degraded",
        backstop_events::HealthState::Down => "down",
    }
}
