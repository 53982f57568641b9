-- Operator decisions about backends, shared by every instance: 'drain' (no new users
-- or sessions) or 'down' (no sessions at all). A backend without a row is governed by
-- its health checks alone.
CREATE TABLE IF NOT EXISTS backend_state (
    backend    VARCHAR(64) NOT NULL PRIMARY KEY,
    state      VARCHAR(16) NOT NULL,
    updated_at BIGINT      NOT NULL
);
