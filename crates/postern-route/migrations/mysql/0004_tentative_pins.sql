-- Reservations for first logins; see migrations/sqlite/0004_tentative_pins.sql.
ALTER TABLE routes ADD COLUMN tentative_until BIGINT NULL;

-- Holds left by a mover that died are cleared by the instances (clear_expired_holds).
CREATE INDEX routes_hold ON routes (hold_until);
