-- Fenced moves and cross-instance notifications (docs/routing.md).
-- A user being moved keeps its old backend in `backend` until every instance has
-- ended its sessions; meanwhile `moving_to` is set and logins get a temporary failure.
-- `hold_until` (Unix seconds) bounds the hold if the mover dies half way.
ALTER TABLE routes ADD COLUMN moving_to VARCHAR(64) NULL;
ALTER TABLE routes ADD COLUMN hold_until BIGINT NULL;

-- Append-only log the instances poll: every pin change and every kick.
CREATE TABLE IF NOT EXISTS route_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    username   VARCHAR(255) NOT NULL,
    kind       VARCHAR(16)  NOT NULL,
    backend    VARCHAR(64)  NULL,
    created_at BIGINT       NOT NULL
);

-- One row per running Postern instance: its heartbeat and the last event it applied,
-- which is how a move knows every live instance has ended the user's sessions.
CREATE TABLE IF NOT EXISTS instances (
    id            VARCHAR(128) NOT NULL PRIMARY KEY,
    heartbeat_at  BIGINT       NOT NULL,
    last_event_id BIGINT       NOT NULL
);
