-- One row per user: the backend that user is pinned to. `username` holds the
-- normalized name (see docs/routing.md); lookups bind it as a parameter.
CREATE TABLE IF NOT EXISTS routes (
    username   VARCHAR(255) NOT NULL PRIMARY KEY,
    backend    VARCHAR(64)  NOT NULL,
    updated_at TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX IF NOT EXISTS routes_backend ON routes (backend);
