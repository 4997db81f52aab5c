-- What the overview reads on every request, made index lookups instead of scans, so that it
-- stays a few milliseconds with tens of thousands of backups and verifications.

-- When an attempt began: the order of "latest attempt per source".
ALTER TABLE backups ADD COLUMN began_at timestamptz
    GENERATED ALWAYS AS (COALESCE(requested_at, started_at, completed_at, failed_at)) STORED;
CREATE INDEX backups_source_began ON backups (source, began_at DESC NULLS LAST, last_position DESC);
CREATE INDEX backups_source_success ON backups (source, completed_at DESC) WHERE state = 'completed';
CREATE INDEX backups_source_failed ON backups (source, failed_at) WHERE state = 'failed';
CREATE INDEX backups_last_position ON backups (last_position DESC);
CREATE INDEX verifications_last_position ON verifications (last_position DESC);

-- The last storage sample of each day per region and storage class (the usage chart).
CREATE TABLE storage_daily (
    day           date NOT NULL,
    region        text NOT NULL,
    storage_class text NOT NULL,
    bytes         bigint NOT NULL,
    objects       bigint NOT NULL,
    sampled_at    timestamptz NOT NULL,
    position      bigint NOT NULL,
    PRIMARY KEY (day, region, storage_class)
);
