-- The health monitor's recorded checks (state changes, failed and slow checks, hourly samples:
-- see backstop_ops::health), for the /health page's response-time chart; and the state of the
-- latest one per endpoint.
CREATE TABLE health_checks (
    position   bigint PRIMARY KEY,
    endpoint   text NOT NULL,
    checked_at timestamptz NOT NULL,
    ok         boolean NOT NULL,
    status     integer,
    latency_ms bigint NOT NULL,
    state      text NOT NULL,
    error      text
);
CREATE INDEX health_checks_endpoint_time ON health_checks (endpoint, checked_at);

ALTER TABLE health_status ADD COLUMN state text NOT NULL DEFAULT 'up';

-- A usage sample's repository (two repositories are two cost series).
ALTER TABLE storage_usage ADD COLUMN repository text NOT NULL DEFAULT '';
