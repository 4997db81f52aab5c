//! Realistic event sequences for tests, demos and the API benchmark: a backup's whole life
//! (requested, started, completed with row counts, verified) and the events around it.
//!
//! These are ordinary, valid events; nothing here writes anywhere. Callers append them through
//! the ledger like any other appender.

use backstop_events::{
    Actor, AlertRaised, BackupKind, BackupMethod, BackupRequested, BackupStarted, DrillCompleted,
    DrillStarted, Event, KeyAccessed, NewEvent, Severity, StorageUsageSampled, TableCheck,
    TableRows, Trigger, VerificationFailed, VerificationPassed, VerificationStarted, VerifyTier,
    streams, uuid_v7,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// What to say about one backup.
#[derive(Clone, Debug)]
pub struct BackupSpec {
    pub source: String,
    pub kind: BackupKind,
    pub at: DateTime<Utc>,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub new_bytes: u64,
    pub duration_ms: u64,
    /// `Some(true)`: a passed test restore; `Some(false)`: a failed one; `None`: not verified.
    pub verified: Option<bool>,
    /// Restore speed measured by the verification, bytes per second.
    pub restore_bytes_per_sec: f64,
}

impl BackupSpec {
    pub fn new(source: &str, at: DateTime<Utc>, raw_bytes: u64) -> BackupSpec {
        BackupSpec {
            source: source.to_string(),
            kind: BackupKind::Full,
            at,
            raw_bytes,
            stored_bytes: raw_bytes / 4,
            new_bytes: raw_bytes / 10,
            duration_ms: 42_000,
            verified: Some(true),
            restore_bytes_per_sec: 80.0 * 1024.0 * 1024.0,
        }
    }
}

fn at(mut e: NewEvent, t: DateTime<Utc>) -> NewEvent {
    e.occurred_at = t;
    e
}

/// A `backup.completed` built from JSON, so fields added to the vocabulary later (with their
/// defaults) need no change here.
fn completed(payload: serde_json::Value) -> Event {
    match Event::decode("backup.completed", 1, &payload) {
        Ok(e) => e,
        // The payload above is written to the schema; a mismatch is a bug in this file.
        Err(e) => panic!("sample backup.completed does not match its schema: {e}"),
    }
}

/// The events of one backup, in order, all on the backup's stream. Returns the backup id too.
pub fn backup(spec: &BackupSpec) -> (Uuid, Vec<NewEvent>) {
    let id = uuid_v7();
    let stream = streams::backup(id);
    let op = Actor::operator("alice");
    let worker = Actor::worker("backup");
    let t0 = spec.at - chrono::Duration::milliseconds(spec.duration_ms as i64);
    let tables = vec![
        TableRows {
            schema: "public".into(),
            table: "trades".into(),
            rows: spec.raw_bytes / 200,
        },
        TableRows {
            schema: "public".into(),
            table: "orders".into(),
            rows: spec.raw_bytes / 500,
        },
    ];
    let mut events = vec![
        at(
            NewEvent::new(
                stream.clone(),
                op,
                &Event::BackupRequested(BackupRequested {
                    backup_id: id,
                    source: spec.source.clone(),
                    kind: spec.kind,
                    method: BackupMethod::Logical,
                    trigger: Trigger::Manual,
                    attempt: 1,
                }),
            ),
            t0 - chrono::Duration::seconds(1),
        ),
        at(
            NewEvent::new(
                stream.clone(),
                worker.clone(),
                &Event::BackupStarted(BackupStarted {
                    backup_id: id,
                    source: spec.source.clone(),
                    kind: spec.kind,
                    parent: None,
                    method: BackupMethod::Logical,
                    host: "db1".into(),
                }),
            ),
            t0,
        ),
        at(
            NewEvent::new(
                stream.clone(),
                worker,
                &completed(serde_json::json!({
                    "backup_id": id,
                    "source": spec.source,
                    "kind": spec.kind,
                    "parent": null,
                    "method": "logical",
                    "manifest": format!("manifests/{id}"),
                    "manifest_sha3": "0".repeat(64),
                    "raw_bytes": spec.raw_bytes,
                    "stored_bytes": spec.stored_bytes,
                    "new_bytes": spec.new_bytes,
                    "chunks": spec.raw_bytes / (1 << 20) + 1,
                    "new_chunks": spec.new_bytes / (1 << 20) + 1,
                    "duration_ms": spec.duration_ms,
                    "tables": tables,
                })),
            ),
            spec.at,
        ),
    ];
    if let Some(passed) = spec.verified {
        let vid = uuid_v7();
        let verifier = Actor::worker("verify");
        let vt = spec.at + chrono::Duration::seconds(5);
        events.push(at(
            NewEvent::new(
                stream.clone(),
                verifier.clone(),
                &Event::VerificationStarted(VerificationStarted {
                    verification_id: vid,
                    backup_id: id,
                    tier: VerifyTier::Restore,
                }),
            ),
            vt,
        ));
        let checks: Vec<TableCheck> = tables
            .iter()
            .map(|t| TableCheck {
                schema: t.schema.clone(),
                table: t.table.clone(),
                expected: t.rows,
                restored: if passed { t.rows } else { t.rows / 2 },
            })
            .collect();
        let restore_ms = (spec.raw_bytes as f64 / spec.restore_bytes_per_sec * 1000.0) as u64;
        let done = vt + chrono::Duration::milliseconds(restore_ms as i64 + 1);
        let event = if passed {
            Event::VerificationPassed(VerificationPassed {
                verification_id: vid,
                backup_id: id,
                tier: VerifyTier::Restore,
                objects_checked: spec.raw_bytes / (1 << 20) + 2,
                bytes_checked: spec.stored_bytes,
                restore_ms: Some(restore_ms),
                restore_bytes_per_sec: Some(spec.restore_bytes_per_sec),
                tables: checks,
            })
        } else {
            Event::VerificationFailed(VerificationFailed {
                verification_id: vid,
                backup_id: id,
                tier: VerifyTier::Restore,
                reason: "row counts differ by more than 1% in public.trades".into(),
                tables: checks,
            })
        };
        events.push(at(NewEvent::new(stream, verifier, &event), done));
    }
    (id, events)
}

/// A storage usage sample on the `storage` stream.
pub fn storage_sample(t: DateTime<Utc>, bytes: u64, objects: u64) -> NewEvent {
    at(
        NewEvent::new(
            streams::storage(),
            Actor::worker("monitor"),
            &Event::StorageUsageSampled(StorageUsageSampled {
                region: "primary".into(),
                storage_class: "STANDARD".into(),
                bytes,
                objects,
                repository: String::new(),
            }),
        ),
        t,
    )
}

/// A recorded health check of `endpoint` on its stream, with the monitor's judgement.
pub fn health_check(
    t: DateTime<Utc>,
    endpoint: &str,
    latency_ms: u64,
    state: backstop_events::HealthState,
) -> NewEvent {
    let ok = state != backstop_events::HealthState::Down;
    at(
        NewEvent::new(
            streams::health(endpoint),
            Actor::worker("health-monitor"),
            &Event::HealthChecked(backstop_events::HealthChecked {
                endpoint: endpoint.into(),
                ok,
                status: Some(if ok { 200 } else { 503 }),
                latency_ms,
                error: (!ok).then(|| "answered 503, expected 200".to_string()),
                state,
            }),
        ),
        t,
    )
}

/// A key access by a worker, on the purpose's key stream.
pub fn key_access(purpose: &str, reason: &str) -> NewEvent {
    NewEvent::new(
        streams::keys(purpose),
        Actor::worker("backup"),
        &Event::KeyAccessed(KeyAccessed {
            purpose: purpose.into(),
            key_id: format!("{purpose}-v1"),
            reason: reason.into(),
        }),
    )
}

/// A critical alert on the `alerts` stream.
pub fn alert(kind: &str, subject: &str, message: &str) -> NewEvent {
    NewEvent::new(
        streams::alerts(),
        Actor::worker("alerts"),
        &Event::AlertRaised(AlertRaised {
            alert_id: uuid_v7(),
            severity: Severity::Critical,
            kind: kind.into(),
            subject: subject.into(),
            message: message.into(),
            key: String::new(),
            source: None,
        }),
    )
}

/// A DR drill of `source`: started and completed, with its RTO.
pub fn drill(source: &str, passed: bool, recovery_ms: u64) -> Vec<NewEvent> {
    let drill_id = uuid_v7();
    let backup_id = uuid_v7();
    let stream = streams::drill(drill_id);
    vec![
        NewEvent::new(
            &stream,
            Actor::operator("drill"),
            &Event::DrillStarted(DrillStarted {
                drill_id,
                backup_id,
                target: "postgres://staging/drill".into(),
                source: source.into(),
                method: "logical".into(),
            }),
        ),
        NewEvent::new(
            &stream,
            Actor::operator("drill"),
            &Event::DrillCompleted(DrillCompleted {
                drill_id,
                backup_id,
                passed,
                recovery_ms,
                report: serde_json::json!({"source": source, "rto_ms": recovery_ms, "rto_target_ms": 300_000}),
                source: source.into(),
                rto_target_ms: 300_000,
                reason: if passed {
                    String::new()
                } else {
                    "the staging restore failed".into()
                },
            }),
        ),
    ]
}
