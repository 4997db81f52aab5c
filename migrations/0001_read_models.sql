-- Read models built from the ledger by backstop-projections.
--
-- Every table here is derived: `backstop projections rebuild` truncates it and replays the
-- ledger from position 1, and must arrive at the same contents. So no column holds a value that
-- is not taken from an event (no now(), no serials): timestamps are the events' own.
--
-- Each projector records the last ledger position it applied in `projector_positions`, in the
-- same transaction as its row changes. Rows that one event may touch twice on a replay carry
-- `last_position`, and updates are guarded by it, so a write is idempotent by construction.

CREATE TABLE projector_positions (
    name     text PRIMARY KEY,
    position bigint NOT NULL CHECK (position >= 0)
);

-- The audit trail: every event, as the ledger holds it.
CREATE TABLE audit_events (
    position       bigint PRIMARY KEY,
    id             uuid NOT NULL UNIQUE,
    -- "C" collation: identifiers compare bytewise, and `LIKE 'prefix%'` can use the index.
    event_type     text COLLATE "C" NOT NULL,
    schema_version integer NOT NULL,
    stream         text COLLATE "C" NOT NULL,
    version        bigint NOT NULL,
    actor          text COLLATE "C" NOT NULL,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL,
    correlation_id uuid NOT NULL,
    causation_id   uuid,
    payload        jsonb NOT NULL,
    prev_hash      text NOT NULL,
    hash           text NOT NULL
);
-- Keyset paging is newest first (position DESC); each filter has an index that ends in position,
-- so "WHERE filter AND position < cursor ORDER BY position DESC LIMIT n" is an index range scan.
CREATE INDEX audit_events_type ON audit_events (event_type, position);
CREATE INDEX audit_events_actor ON audit_events (actor, position);
CREATE INDEX audit_events_stream ON audit_events (stream, position);
CREATE INDEX audit_events_recorded ON audit_events (recorded_at, position);

-- Events seen per type: a plain counter, incremented once per applied event. It doubles as the
-- proof that no event is applied twice (the sum equals the projector's position).
CREATE TABLE event_counts (
    event_type text PRIMARY KEY,
    events     bigint NOT NULL,
    last_at    timestamptz NOT NULL
);

CREATE TABLE backups (
    backup_id             uuid PRIMARY KEY,
    source                text NOT NULL,
    kind                  text NOT NULL,
    physical              boolean NOT NULL DEFAULT false,
    parent                uuid,
    attempt               integer NOT NULL DEFAULT 1,
    trigger               jsonb,
    -- requested | started | completed | failed | deleted
    state                 text NOT NULL,
    requested_by          text,
    requested_at          timestamptz,
    started_at            timestamptz,
    completed_at          timestamptz,
    failed_at             timestamptz,
    deleted_at            timestamptz,
    host                  text,
    failure_reason        text,
    manifest              text,
    manifest_sha3         text,
    raw_bytes             bigint,
    stored_bytes          bigint,
    new_bytes             bigint,
    chunks                bigint,
    new_chunks            bigint,
    duration_ms           bigint,
    upload_objects        bigint,
    upload_bytes          bigint,
    -- unverified | running | passed | failed
    verification_state    text NOT NULL DEFAULT 'unverified',
    verification_id       uuid,
    verification_tier     text,
    verified_at           timestamptz,
    verification_reason   text,
    verifications_passed  integer NOT NULL DEFAULT 0,
    verifications_failed  integer NOT NULL DEFAULT 0,
    restore_ms            bigint,
    restore_bytes_per_sec double precision,
    deleted_policy        text,
    deleted_reason        text,
    last_position         bigint NOT NULL
);
CREATE INDEX backups_source_completed ON backups (source, completed_at DESC);
CREATE INDEX backups_completed ON backups (completed_at DESC);

-- Row counts per table, from the backup's snapshot, and what the last test restore found.
CREATE TABLE backup_tables (
    backup_id     uuid NOT NULL,
    schema_name   text NOT NULL,
    table_name    text NOT NULL,
    rows          bigint NOT NULL,
    restored_rows bigint,
    PRIMARY KEY (backup_id, schema_name, table_name)
);

CREATE TABLE verifications (
    verification_id       uuid PRIMARY KEY,
    backup_id             uuid NOT NULL,
    tier                  text NOT NULL,
    sample_percent        double precision,
    -- running | passed | failed
    state                 text NOT NULL,
    actor                 text NOT NULL,
    started_at            timestamptz,
    finished_at           timestamptz,
    objects_checked       bigint,
    bytes_checked         bigint,
    restore_ms            bigint,
    restore_bytes_per_sec double precision,
    reason                text,
    tables                jsonb NOT NULL DEFAULT '[]',
    last_position         bigint NOT NULL
);
CREATE INDEX verifications_backup ON verifications (backup_id);
CREATE INDEX verifications_finished ON verifications (finished_at DESC);

CREATE TABLE storage_usage (
    position      bigint PRIMARY KEY,
    sampled_at    timestamptz NOT NULL,
    region        text NOT NULL,
    storage_class text NOT NULL,
    bytes         bigint NOT NULL,
    objects       bigint NOT NULL
);
CREATE INDEX storage_usage_sampled ON storage_usage (sampled_at);

-- The latest connectivity check per storage backend (the dashboard also probes live).
CREATE TABLE storage_connectivity (
    backend       text PRIMARY KEY,
    ok            boolean NOT NULL,
    latency_ms    bigint NOT NULL,
    error         text,
    checked_at    timestamptz NOT NULL,
    last_position bigint NOT NULL
);

CREATE TABLE health_status (
    endpoint      text PRIMARY KEY,
    ok            boolean NOT NULL,
    status        integer,
    latency_ms    bigint NOT NULL,
    error         text,
    checked_at    timestamptz NOT NULL,
    last_position bigint NOT NULL
);

CREATE TABLE alerts (
    alert_id         uuid PRIMARY KEY,
    severity         text NOT NULL,
    kind             text NOT NULL,
    subject          text NOT NULL,
    message          text NOT NULL,
    raised_at        timestamptz NOT NULL,
    resolved_at      timestamptz,
    resolved_message text,
    last_position    bigint NOT NULL
);
CREATE INDEX alerts_open ON alerts (raised_at DESC) WHERE resolved_at IS NULL;

CREATE TABLE recoveries (
    recovery_id   uuid PRIMARY KEY,
    backup_id     uuid NOT NULL,
    operator      text NOT NULL,
    scope         jsonb NOT NULL,
    -- requested | started | completed | failed
    state         text NOT NULL,
    requested_by  text,
    requested_at  timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz,
    duration_ms   bigint,
    bytes         bigint,
    reason        text,
    last_position bigint NOT NULL
);

CREATE TABLE key_accesses (
    position    bigint PRIMARY KEY,
    accessed_at timestamptz NOT NULL,
    actor       text NOT NULL,
    purpose     text NOT NULL,
    key_id      text NOT NULL,
    reason      text NOT NULL
);
CREATE INDEX key_accesses_at ON key_accesses (accessed_at);

CREATE TABLE keys (
    key_id      text PRIMARY KEY,
    purpose     text NOT NULL,
    version     integer NOT NULL,
    created_at  timestamptz NOT NULL,
    retired_at  timestamptz
);

CREATE TABLE drills (
    drill_id      uuid PRIMARY KEY,
    backup_id     uuid NOT NULL,
    target        text,
    passed        boolean,
    recovery_ms   bigint,
    report        jsonb,
    started_at    timestamptz,
    finished_at   timestamptz,
    last_position bigint NOT NULL
);

CREATE TABLE dead_letters (
    position       bigint PRIMARY KEY,
    at             timestamptz NOT NULL,
    consumer       text NOT NULL,
    event_id       uuid NOT NULL,
    event_type     text NOT NULL,
    event_position bigint NOT NULL,
    deliveries     integer NOT NULL,
    error          text NOT NULL
);

CREATE TABLE replication_lag (
    region        text PRIMARY KEY,
    lag_seconds   bigint NOT NULL,
    measured_at   timestamptz NOT NULL,
    last_position bigint NOT NULL
);
