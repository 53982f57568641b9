-- The mail database of the compose topology, run once by the MariaDB image on an empty
-- data volume (/docker-entrypoint-initdb.d), inside MARIADB_DATABASE (`mail`).
--
-- `mailbox` is the operator's own user table, as in the cluster Postern replaces
-- (Postfix + Dovecot + MySQL): Dovecot authenticates against it, and Postern reads each
-- user's backend from it with routing.sql.lookup_query. Postern creates its own tables
-- (routes, route_events, instances, backend_state) here at its first start
-- (routing.sql.migrate = true); pins it writes there (first-login assignment,
-- `postern route move`) take precedence over `mailbox.backend`.
CREATE TABLE IF NOT EXISTS mailbox (
    username VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    -- A Dovecot password scheme prefix and hash (doveadm pw -s SHA512-CRYPT).
    password VARCHAR(255) NOT NULL,
    -- The backend the user is pinned to; NULL lets Postern assign one at first login.
    backend  VARCHAR(64)  NULL,
    active   TINYINT(1)   NOT NULL DEFAULT 1
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Demo users, password "demo" (never use these outside a test setup).
INSERT INTO mailbox (username, password, backend) VALUES
    ('alice@example.test',
     '{SHA512-CRYPT}$6$6WwAXhbS8fZAjVjp$dQStex7BmTgHcjSxnDY0O8Y/EFB7u.zAoLmcsrx9fTD5cw8S.5kqvt.lfoUyLxRWsnVND2LHHrcZ0Ekb/oIb4.',
     'b1'),
    ('bob@example.test',
     '{SHA512-CRYPT}$6$6WwAXhbS8fZAjVjp$dQStex7BmTgHcjSxnDY0O8Y/EFB7u.zAoLmcsrx9fTD5cw8S.5kqvt.lfoUyLxRWsnVND2LHHrcZ0Ekb/oIb4.',
     'b2'),
    ('carol@example.test',
     '{SHA512-CRYPT}$6$6WwAXhbS8fZAjVjp$dQStex7BmTgHcjSxnDY0O8Y/EFB7u.zAoLmcsrx9fTD5cw8S.5kqvt.lfoUyLxRWsnVND2LHHrcZ0Ekb/oIb4.',
     NULL)
ON DUPLICATE KEY UPDATE username = username;

-- Dovecot on the backends reads passwords, nothing else. (MARIADB_USER, `postern`,
-- owns the database: Postern creates and writes its routing tables.)
CREATE USER IF NOT EXISTS 'dovecot'@'%' IDENTIFIED BY 'dovecot-demo-pw';
GRANT SELECT ON mailbox TO 'dovecot'@'%';
