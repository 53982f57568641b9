-- Postern's routes table for PostgreSQL. `username` holds the normalized name.
CREATE TABLE IF NOT EXISTS routes (
    username   VARCHAR(255) NOT NULL PRIMARY KEY,
    backend    VARCHAR(64)  NOT NULL,
    updated_at TIMESTAMPTZ  NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS routes_backend ON routes (backend);
