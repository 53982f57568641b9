-- Postern's routes table for MySQL / MariaDB. `username` holds the normalized name and
-- compares byte for byte (utf8mb4_bin): normalization is Postern's job, and a
-- case-insensitive collation would silently merge names Postern keeps apart.
CREATE TABLE IF NOT EXISTS routes (
    username   VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    backend    VARCHAR(64)  NOT NULL,
    updated_at TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    KEY routes_backend (backend)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
