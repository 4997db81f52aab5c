-- Each replica's newest replication (replication.started/completed/failed, backstop_ops::replicate)
-- for the dashboard, beside its lag (replication_lag): `state` is that of its newest replication
-- event (running, completed or failed, with `reason` when failed); `last_replicated_at` and
-- `last_backup_id` are those of its newest replication.completed (NULL until one completes).
CREATE TABLE replication_status (
    replica            text PRIMARY KEY,
    state              text NOT NULL,
    backup_id          uuid NOT NULL,
    state_at           timestamptz NOT NULL,
    reason             text NOT NULL DEFAULT '',
    last_replicated_at timestamptz,
    last_backup_id     uuid,
    last_position      bigint NOT NULL
);
