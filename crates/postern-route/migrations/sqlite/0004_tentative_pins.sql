-- A first login's pin is written before the backend login, so concurrent first logins
-- of one user all go to one backend, but only as a reservation: `tentative_until`
-- (Unix seconds, when the login should have settled) is set until the backend accepts
-- the login, then cleared; the row is deleted when the login fails, so a name that
-- never logs in leaves no pin. A reservation left by an instance that died mid-login
-- stands as an ordinary pin.
ALTER TABLE routes ADD COLUMN tentative_until BIGINT NULL;

-- Holds left by a mover that died are cleared by the instances (clear_expired_holds).
CREATE INDEX IF NOT EXISTS routes_hold ON routes (hold_until);
