//! The audit trail: one row per ledger event, with its hash, in `audit_events`.
//!
//! A batch is written with one `INSERT ... SELECT FROM UNNEST(arrays)` statement (one round trip
//! for up to a thousand events), `ON CONFLICT (position) DO NOTHING` so a replayed batch writes
//! nothing twice. Payloads are stored as `jsonb` for filtering; the authoritative bytes (and the
//! hash chain) stay in the ledger, which the audit export reads.

use async_trait::async_trait;
use backstop_events::Envelope;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{ProjectionError, Projector};

pub struct AuditProjector;

pub const NAME: &str = "audit";

#[async_trait]
impl Projector for AuditProjector {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["audit_events"]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[Envelope],
    ) -> Result<(), ProjectionError> {
        let n = events.len();
        let mut position = Vec::with_capacity(n);
        let mut id = Vec::with_capacity(n);
        let mut event_type = Vec::with_capacity(n);
        let mut schema_version = Vec::with_capacity(n);
        let mut stream = Vec::with_capacity(n);
        let mut version = Vec::with_capacity(n);
        let mut actor = Vec::with_capacity(n);
        let mut occurred_at: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut recorded_at: Vec<DateTime<Utc>> = Vec::with_capacity(n);
        let mut correlation: Vec<Uuid> = Vec::with_capacity(n);
        let mut causation: Vec<Option<Uuid>> = Vec::with_capacity(n);
        let mut payload = Vec::with_capacity(n);
        let mut prev_hash = Vec::with_capacity(n);
        let mut hash = Vec::with_capacity(n);
        for e in events {
            position.push(e.position as i64);
            id.push(e.id);
            event_type.push(e.event_type.clone());
            schema_version.push(e.schema_version as i32);
            stream.push(e.stream.clone());
            version.push(e.version as i64);
            actor.push(e.actor.to_string());
            occurred_at.push(e.occurred_at);
            recorded_at.push(e.recorded_at);
            correlation.push(e.correlation_id);
            causation.push(e.causation_id);
            payload.push(e.payload.clone());
            prev_hash.push(e.prev_hash.to_hex());
            hash.push(e.hash.to_hex());
        }
        sqlx::query(
            "INSERT INTO audit_events (position, id, event_type, schema_version, stream, version, \
               actor, occurred_at, recorded_at, correlation_id, causation_id, payload, prev_hash, hash) \
             SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::int[], $5::text[], \
               $6::bigint[], $7::text[], $8::timestamptz[], $9::timestamptz[], $10::uuid[], \
               $11::uuid[], $12::jsonb[], $13::text[], $14::text[]) \
             ON CONFLICT (position) DO NOTHING",
        )
        .bind(position)
        .bind(id)
        .bind(event_type)
        .bind(schema_version)
        .bind(stream)
        .bind(version)
        .bind(actor)
        .bind(occurred_at)
        .bind(recorded_at)
        .bind(correlation)
        .bind(causation)
        .bind(payload)
        .bind(prev_hash)
        .bind(hash)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
