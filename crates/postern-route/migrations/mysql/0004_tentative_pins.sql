-- Reservations for first logins; see migrations/sqlite/0004_tentative_pins.sql.
ALTER TABLE routes ADD COLUMN tentative_until BIGINT NULL;
