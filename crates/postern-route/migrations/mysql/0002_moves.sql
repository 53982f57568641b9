-- Fenced moves and cross-instance notifications; see migrations/sqlite/0002_moves.sql.
ALTER TABLE routes
    ADD COLUMN moving_to VARCHAR(64) NULL,
    ADD COLUMN hold_until BIGINT NULL;

CREATE TABLE IF NOT EXISTS route_events (
    id         BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    username   VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    kind       VARCHAR(16)  NOT NULL,
    backend    VARCHAR(64)  NULL,
    created_at BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS instances (
    id            VARCHAR(128) NOT NULL PRIMARY KEY,
    heartbeat_at  BIGINT       NOT NULL,
    last_event_id BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
