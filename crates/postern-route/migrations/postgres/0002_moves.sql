-- Fenced moves and cross-instance notifications; see migrations/sqlite/0002_moves.sql.
ALTER TABLE routes ADD COLUMN moving_to VARCHAR(64) NULL;
ALTER TABLE routes ADD COLUMN hold_until BIGINT NULL;

CREATE TABLE IF NOT EXISTS route_events (
    id         BIGSERIAL    PRIMARY KEY,
    username   VARCHAR(255) NOT NULL,
    kind       VARCHAR(16)  NOT NULL,
    backend    VARCHAR(64)  NULL,
    created_at BIGINT       NOT NULL
);

CREATE TABLE IF NOT EXISTS instances (
    id            VARCHAR(128) NOT NULL PRIMARY KEY,
    heartbeat_at  BIGINT       NOT NULL,
    last_event_id BIGINT       NOT NULL
);
