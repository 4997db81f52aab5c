-- Re-encryption jobs (reencryption.* events, backstop_repo::reencrypt): each job's progress for
-- the dashboard. `objects` and `bytes` add up the re-sealed chunks of every progress event;
-- `state` is running (started or progressed since), completed, or failed (the last run stopped;
-- the job stays resumable and a later progress event makes it running again).
CREATE TABLE reencryption_jobs (
    job_id        uuid PRIMARY KEY,
    started_at    timestamptz NOT NULL,
    purposes      text NOT NULL,
    from_key_ids  text NOT NULL,
    to_key_id     text NOT NULL,
    state         text NOT NULL,
    backups_done  bigint NOT NULL DEFAULT 0,
    backups_total bigint NOT NULL,
    objects       bigint NOT NULL DEFAULT 0,
    bytes         bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL,
    reason        text
);
