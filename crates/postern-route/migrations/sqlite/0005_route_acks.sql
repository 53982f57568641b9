-- Each instance acknowledges each kick it applied (after ending the user's sessions);
-- a move waits for the acknowledgement of every live instance. A position in the
-- log is not enough: entries can commit out of id order (concurrent writers, Galera
-- nodes), so an instance past a higher id may not have seen a kick that committed late.
CREATE TABLE IF NOT EXISTS route_acks (
    event_id BIGINT       NOT NULL,
    instance VARCHAR(128) NOT NULL,
    PRIMARY KEY (event_id, instance)
);
