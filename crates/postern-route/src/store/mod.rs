//! Where pins live. A store answers "which backend is this user pinned to?", writes
//! pins race-safely, and carries the change log through which Postern instances learn
//! of moves and kicks. Every failure means "no answer": the caller must never guess.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use postern_proto::Secret;

use crate::UserName;

pub mod breaker;
pub mod sql;
pub mod static_map;

/// A boxed future, so stores can sit behind `dyn RouteStore`.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// How a record names its backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendRef {
    /// A backend name from the configuration.
    Name(String),
    /// A host, as an operator's user table may store it (Dovecot's `host` field); the
    /// router maps it to the configured backend with that host.
    Host(String),
}

/// What the store knows about a user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteRecord {
    /// The pin; `None` when the user is known (e.g. in the operator's table) but has no
    /// backend yet, so assignment applies.
    pub backend: Option<BackendRef>,
    /// The pool the user belongs to, if the operator's query says.
    pub pool: Option<String>,
    /// The password hash from the operator's query (for proxy-side authentication).
    pub password: Option<Secret<String>>,
    /// The account is disabled: logins are refused.
    pub disabled: bool,
    /// A move is in progress: logins get a temporary failure until it completes.
    pub moving: bool,
    /// The pin is a first login's reservation, not yet confirmed by a backend login.
    pub tentative: bool,
    /// The target of a move that is in progress or was interrupted (its hold may have
    /// ended), for `postern route move --resume`.
    pub moving_to: Option<String>,
    /// Where the pin came from, for `postern route USER` and the admin API.
    pub origin: PinOrigin,
}

/// Where a record's pin came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PinOrigin {
    /// Postern's own `routes` table (assignment, `route pin`, `route move`).
    #[default]
    Table,
    /// The operator's `routing.sql.lookup_query`.
    LookupQuery,
    /// `[routing.static]` in the configuration.
    Static,
}

impl PinOrigin {
    /// Words for the CLI and logs.
    pub fn describe(self) -> &'static str {
        match self {
            PinOrigin::Table => "Postern's routes table",
            PinOrigin::LookupQuery => "routing.sql.lookup_query",
            PinOrigin::Static => "the configuration's static map",
        }
    }
}

/// One pin, as listed by `postern route list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinRow {
    /// The normalized user.
    pub user: String,
    /// The backend.
    pub backend: String,
    /// The target of a move in progress.
    pub moving_to: Option<String>,
}

/// What changed, as recorded in the change log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// The pin was written (pinned, assigned by an operator, moved): forget cached routes.
    Pin,
    /// End the user's live sessions (a kick, or the first half of a move).
    Kick,
}

impl ChangeKind {
    /// The value stored in `route_events.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Pin => "pin",
            ChangeKind::Kick => "kick",
        }
    }
}

/// One entry of the change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeEvent {
    /// Position in the log; increases.
    pub id: i64,
    /// The normalized user.
    pub user: String,
    /// What happened.
    pub kind: ChangeKind,
    /// The backend involved, when there is one.
    pub backend: Option<String>,
}

/// A Postern instance as seen through the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceRow {
    /// Its id (host, pid, start time).
    pub id: String,
    /// Unix seconds of its last heartbeat.
    pub heartbeat_at: i64,
    /// The last change-log entry it has applied.
    pub last_event_id: i64,
}

/// A store failure. Every variant means "no answer": the caller must not guess a route.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached, timed out or failed; retrying later may help.
    #[error("route store unavailable: {0}")]
    Unavailable(String),
    /// The store does not support the operation (e.g. writing to a static map).
    #[error("the {0} route store is read-only")]
    ReadOnly(&'static str),
    /// The store answered something Postern cannot use (e.g. a lookup query without a
    /// `backend` or `host` column).
    #[error("route store answer unusable: {0}")]
    Invalid(String),
}

/// A source of pins. Read-only stores implement `lookup`, `ping` and `kind`; the write
/// and change-log methods default to [`StoreError::ReadOnly`] and an empty log.
pub trait RouteStore: Send + Sync + fmt::Debug {
    /// Looks up a normalized user; `Ok(None)` when the store does not know the user.
    fn lookup<'a>(&'a self, user: &'a UserName) -> StoreFuture<'a, Option<RouteRecord>>;

    /// Checks that the store answers, for `postern check` and readiness.
    fn ping(&self) -> StoreFuture<'_, ()>;

    /// A short name for logs: `static`, `sqlite`, `mysql`, `postgres`.
    fn kind(&self) -> &'static str;

    /// Pins a user who has no pin yet. Race-safe: when several instances assign the
    /// same user at once, exactly one pin is written and every caller gets it back.
    fn assign<'a>(&'a self, _user: &'a UserName, _backend: &'a str) -> StoreFuture<'a, String> {
        read_only(self.kind())
    }

    /// Reserves a first login's pin until `until` (Unix seconds): race-safe like
    /// [`RouteStore::assign`], so concurrent first logins of one user meet on one
    /// backend, but the row stays tentative until [`RouteStore::confirm`] and goes away
    /// on [`RouteStore::release`]. Returns the pin in force. Stores without
    /// reservations pin at once.
    fn reserve<'a>(
        &'a self,
        user: &'a UserName,
        backend: &'a str,
        _until: i64,
    ) -> StoreFuture<'a, String> {
        self.assign(user, backend)
    }

    /// Makes a reservation a pin, once the backend accepted the login. Returns the pin
    /// in force: if the reservation was released meanwhile and another login pinned the
    /// user elsewhere, that backend, and this session must not be served.
    fn confirm<'a>(&'a self, user: &'a UserName, backend: &'a str) -> StoreFuture<'a, String> {
        self.assign(user, backend)
    }

    /// Deletes a reservation whose login failed (a name that does not log in leaves no
    /// pin). A pin that was confirmed meanwhile stays. `true` if a row was deleted.
    fn release<'a>(&'a self, _user: &'a UserName, _backend: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async { Ok(false) })
    }

    /// Pins a user to a backend, replacing any pin, and logs a `Pin` change.
    fn pin<'a>(&'a self, _user: &'a UserName, _backend: &'a str) -> StoreFuture<'a, ()> {
        read_only(self.kind())
    }

    /// Moves a user's pin from `from` to `to` only if it still points to `from`
    /// (compare-and-set), logging a `Pin` change; returns the pin now in force. Two
    /// instances failing the same user over at once end with one pin.
    fn repin<'a>(
        &'a self,
        _user: &'a UserName,
        _from: &'a str,
        _to: &'a str,
    ) -> StoreFuture<'a, String> {
        read_only(self.kind())
    }

    /// Operator states of backends (`drain`, `down`), as set by `postern backend`.
    fn backend_states(&self) -> StoreFuture<'_, Vec<(String, String)>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Sets (or with `None` clears) a backend's operator state.
    fn set_backend_state<'a>(
        &'a self,
        _backend: &'a str,
        _state: Option<&'a str>,
    ) -> StoreFuture<'a, ()> {
        read_only(self.kind())
    }

    /// Removes a user's pin; `true` if there was one.
    fn unpin<'a>(&'a self, _user: &'a UserName) -> StoreFuture<'a, bool> {
        read_only(self.kind())
    }

    /// First half of a fenced move: marks the user as moving from `from` to `to` until
    /// `hold_until` (Unix seconds) and logs a `Kick`. Returns the kick's log id.
    fn begin_move<'a>(
        &'a self,
        _user: &'a UserName,
        _from: &'a str,
        _to: &'a str,
        _hold_until: i64,
    ) -> StoreFuture<'a, i64> {
        read_only(self.kind())
    }

    /// Second half of a fenced move: switches the pin to `to`, clears the hold and logs
    /// a `Pin` change.
    fn finish_move<'a>(&'a self, _user: &'a UserName, _to: &'a str) -> StoreFuture<'a, ()> {
        read_only(self.kind())
    }

    /// Rolls a fenced move back: clears the hold and the target, keeps the pin. The
    /// user's logins go to the old backend again at once.
    fn abort_move<'a>(&'a self, _user: &'a UserName) -> StoreFuture<'a, ()> {
        read_only(self.kind())
    }

    /// Clears holds that ended (a mover that died half way): the pin stays, and the
    /// listing no longer says "moving". Returns how many.
    fn clear_expired_holds(&self, _now: i64) -> StoreFuture<'_, u64> {
        Box::pin(async { Ok(0) })
    }

    /// Removes this instance's row (a clean exit), so moves stop waiting for it at once.
    fn leave<'a>(&'a self, _instance: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Logs a `Kick` for the user; returns its log id.
    fn kick<'a>(&'a self, _user: &'a UserName) -> StoreFuture<'a, i64> {
        read_only(self.kind())
    }

    /// What answers lookups, as a fingerprint: two stores with the same one give the
    /// same answers (the same database and query, the same static table). A reload
    /// keeps cached routes only when it does not change. Never shown: it may be
    /// derived from a URL with a password.
    fn source(&self) -> u64 {
        0
    }

    /// Whether some pins come from somewhere [`RouteStore::counts`] cannot count (an
    /// operator's per-user lookup query).
    fn has_uncounted_pins(&self) -> bool {
        false
    }

    /// Pinned users per backend, for least-loaded assignment: Postern's own pins.
    fn counts(&self) -> StoreFuture<'_, Vec<(String, u64)>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Every pin, or the pins of one backend.
    fn list<'a>(&'a self, _backend: Option<&'a str>) -> StoreFuture<'a, Vec<PinRow>> {
        read_only(self.kind())
    }

    /// Change-log entries after `after`, oldest first, at most `limit`.
    fn events_since(&self, _after: i64, _limit: u32) -> StoreFuture<'_, Vec<ChangeEvent>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// The id of the newest change-log entry (0 when empty).
    fn last_event_id(&self) -> StoreFuture<'_, i64> {
        Box::pin(async { Ok(0) })
    }

    /// Records that `instance` is alive and has applied the log up to `last_event_id`.
    fn heartbeat<'a>(&'a self, _instance: &'a str, _last_event_id: i64) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Records that `instance` ended the sessions of these kicks (their log ids).
    fn ack<'a>(&'a self, _instance: &'a str, _kicks: &'a [i64]) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Which instances acknowledged which of these kicks: `(kick, instance)` pairs.
    fn acked<'a>(&'a self, _kicks: &'a [i64]) -> StoreFuture<'a, Vec<(i64, String)>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// The instances that have reported.
    fn instances(&self) -> StoreFuture<'_, Vec<InstanceRow>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Forgets change-log entries older than `events_before` and instances silent
    /// since before `instances_before` (Unix seconds).
    fn prune(&self, _events_before: i64, _instances_before: i64) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

fn read_only<T: Send + 'static>(kind: &'static str) -> StoreFuture<'static, T> {
    Box::pin(async move { Err(StoreError::ReadOnly(kind)) })
}

/// Seconds since the Unix epoch, as stored in the change log and holds.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
