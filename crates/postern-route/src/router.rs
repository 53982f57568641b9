//! From a login name to a backend: normalize, look up the pin (cache first), apply the
//! policy for users without one. The router never invents a route when the store
//! cannot answer: serving a guess is exactly the two-backends corruption pinning exists
//! to prevent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postern_proto::{Failure, Protocol};
use tokio::time::Instant;
use tracing::warn;

use crate::cache::{CacheOptions, Cached, Lookup, RouteCache};
use crate::hash::{self, Weighted};
use crate::stats::{Outcome, RouteStats};
use crate::store::{BackendRef, RouteRecord, RouteStore, StoreError};
use crate::{InvalidUser, Normalizer, UserName};

/// What to do with a user the store has no pin for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownUsers {
    /// Refuse the login as an authentication failure.
    #[default]
    Reject,
    /// Pick a backend by weighted rendezvous hash of the normalized name, every time.
    /// Stable across instances, but nothing is written.
    Hash,
    /// Pick a backend and pin the user there (race-safe), so the choice sticks.
    Assign(AssignPolicy),
}

/// How a new user's backend is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AssignPolicy {
    /// The backend with the fewest pinned users per unit of weight.
    #[default]
    LeastLoaded,
    /// Weighted rendezvous hash of the normalized name.
    Hash,
}

/// A backend as the router sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    /// Name, as pins refer to it.
    pub name: String,
    /// Host, as an operator's user table may refer to it.
    pub host: String,
    /// Relative share of new users.
    pub weight: u32,
    /// The pool it belongs to.
    pub pool: String,
    /// The protocols it serves.
    pub protocols: Vec<Protocol>,
}

/// Why a route was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The store pins the user there.
    Pinned,
    /// A cached pin, served because the store is failing.
    Stale,
    /// No pin; chosen by hash, not written.
    Hashed,
    /// No pin; chosen now and written to the store.
    Assigned,
    /// No pin; reserved here for this login (tentative in the store): the login must
    /// [`Router::confirm`] it once the backend accepts, or [`Router::release`] it.
    Reserved,
    /// No pin; this is where the user would be assigned (a dry run, nothing written).
    Proposed,
    /// The pinned backend is down; re-pinned here (shared pool).
    FailedOver,
    /// The pinned backend is down; routed here until it is back (shared pool).
    Temporary,
    /// The pinned backend is draining; moved here with a fenced move (shared pool).
    Moved,
}

impl Source {
    /// Name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Pinned => "pinned",
            Source::Stale => "stale",
            Source::Hashed => "hashed",
            Source::Assigned => "assigned",
            Source::Reserved => "reserved",
            Source::Proposed => "proposed",
            Source::FailedOver => "failed_over",
            Source::Temporary => "temporary",
            Source::Moved => "moved",
        }
    }
}

/// Where a user goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The normalized user name.
    pub user: UserName,
    /// The backend's name.
    pub backend: String,
    /// Why.
    pub source: Source,
    /// The store's record, when there is one (password hash, pool).
    pub record: Option<Arc<RouteRecord>>,
    /// The backend the user is pinned to, when the session goes elsewhere
    /// (failover, temporary routing, drain).
    pub pinned: Option<String>,
}

/// Why a user could not be routed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The name cannot be a routing key.
    #[error("invalid user name: {0}")]
    InvalidUser(#[from] InvalidUser),
    /// No pin, and unknown users are rejected.
    #[error("no route for user")]
    NoRoute,
    /// The account is disabled in the store.
    #[error("account disabled")]
    Disabled,
    /// The user is being moved between backends.
    #[error("user is being moved")]
    Moving,
    /// This instance stood still long enough to be presumed dead, and is reading the
    /// change log before it serves again.
    #[error("this instance is catching up on the route change log")]
    CatchingUp,
    /// The pin names a backend that is not configured for this protocol.
    #[error("pinned to backend {0:?}, which does not serve this protocol")]
    UnknownBackend(String),
    /// No backend can take the user.
    #[error("no backend available for this protocol")]
    NoBackend,
    /// The user's backend is down and the pool does not let another take them.
    #[error("backend {0:?} is down")]
    BackendDown(String),
    /// Too many failovers at once: the login is refused for now, so the surviving
    /// backends are not stampeded.
    #[error("failover rate limit reached")]
    FailoverThrottled,
    /// The store did not answer and nothing usable was cached.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RouteError {
    /// How the protocol should report this to the client.
    pub fn failure(&self) -> Failure {
        match self {
            RouteError::InvalidUser(_) | RouteError::NoRoute | RouteError::Disabled => {
                Failure::AuthFailed
            }
            RouteError::Moving
            | RouteError::CatchingUp
            | RouteError::UnknownBackend(_)
            | RouteError::NoBackend
            | RouteError::BackendDown(_)
            | RouteError::FailoverThrottled
            | RouteError::Store(_) => Failure::Unavailable,
        }
    }
}

/// What a backend can take right now, combining its health checks and the operator's
/// decision (`postern backend drain|down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// Healthy: new users and sessions welcome.
    Up,
    /// Healthy but draining: no new users, no new sessions where another backend can
    /// take them; existing sessions stay.
    Draining,
    /// Down (failed checks, or marked down): no sessions at all.
    Down,
}

/// The runtime's view of backend states; the router only asks.
pub trait Availability: Send + Sync + std::fmt::Debug {
    /// The state of `backend` for `protocol`.
    fn state(&self, backend: &str, protocol: Protocol) -> BackendState;
}

/// Every backend is up (no health checks): for tools and tests.
#[derive(Debug, Default)]
pub struct AlwaysAvailable;

impl Availability for AlwaysAvailable {
    fn state(&self, _backend: &str, _protocol: Protocol) -> BackendState {
        BackendState::Up
    }
}

/// Whether a pool's backends share one mail store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PoolMode {
    /// Each backend owns its users' mail ("own storage"): a user is never sent to
    /// another backend; while theirs is down they get a temporary failure.
    #[default]
    OwnStorage,
    /// The backends share one store (e.g. NFS): when a user's backend is down, another
    /// healthy backend of the pool takes them.
    Shared,
}

/// What a failover in a shared pool writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Failover {
    /// Re-pin the user to the new backend for good.
    #[default]
    Repin,
    /// Route to the new backend only while the pinned one is down; the pin stays, and
    /// the runtime ends these sessions when the pinned backend comes back.
    Temporary,
}

/// A pool's policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolPolicy {
    /// Shared store or own storage.
    pub mode: PoolMode,
    /// For shared pools: re-pin or route temporarily.
    pub failover: Failover,
}

/// Router settings.
#[derive(Clone, Debug, Default)]
pub struct RouterOptions {
    /// Policy for users without a pin.
    pub unknown_users: UnknownUsers,
    /// Route cache.
    pub cache: CacheOptions,
    /// Pool policies by pool name; pools not listed are own-storage.
    pub pools: HashMap<String, PoolPolicy>,
    /// Most failovers per second from this instance (0: unlimited). Logins beyond it
    /// get a temporary failure and retry, spreading the reconnects of a dead backend's
    /// users over time instead of stampeding the survivors.
    pub failover_rate: u32,
    /// Timing of the fenced move used to take users off a draining backend.
    pub fence: crate::moves::FenceOptions,
}

/// What a decision is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// A login: may assign (write) a pin; a held user gets a temporary failure.
    Login,
    /// `route show`: writes nothing.
    DryRun,
    /// `route move`: writes nothing and looks through a hold.
    IgnoreHold,
    /// Mail delivery to a recipient (MX, LMTP): a pinned user's backend, with the same
    /// failover rules as a login; an unpinned recipient goes to a backend by hash,
    /// never assigned (every random address would get a pin) nor refused (the backend
    /// decides whether the mailbox exists).
    Delivery,
}

/// How long a login waits for this instance to catch up on the change log (at start,
/// or after it stood still) before it gets the temporary failure.
const GATE_WAIT: Duration = Duration::from_secs(3);

/// Stored with a reservation: when its login should have settled it, longer than any
/// login's deadline. A reservation whose instance died mid-login is never deleted by
/// age (a session may have been served on it); it simply stands as the user's pin.
const RESERVATION_SECS: i64 = 300;

/// How long pinned-user counts are reused for least-loaded assignment: counting is a
/// GROUP BY over the whole routes table, too heavy per login.
const COUNTS_TTL: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Counts {
    fetched: Option<Instant>,
    per_backend: HashMap<String, u64>,
}

/// The routing policy of one Postern instance.
#[derive(Debug)]
pub struct Router {
    normalizer: Normalizer,
    store: Arc<dyn RouteStore>,
    options: RouterOptions,
    backends: Vec<BackendEntry>,
    cache: RouteCache,
    stats: Arc<RouteStats>,
    counts: Mutex<Counts>,
    availability: Arc<dyn Availability>,
    failover_tokens: Mutex<TokenBucket>,
    /// Closed while this process catches up on the change log after standing still
    /// (see `fence::Gate`): movers may have presumed it dead and moved users.
    gate: std::sync::OnceLock<Arc<crate::fence::Gate>>,
    /// Counts [`Router::forget`] calls, so a lookup that raced one does not cache.
    forgets: std::sync::atomic::AtomicU64,
}

/// A token bucket refilled at `rate` per second, holding at most one second's worth.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Router {
    /// Builds a router.
    pub fn new(
        normalizer: Normalizer,
        store: Arc<dyn RouteStore>,
        options: RouterOptions,
        backends: Vec<BackendEntry>,
    ) -> Self {
        Self {
            normalizer,
            store,
            cache: RouteCache::new(options.cache),
            failover_tokens: Mutex::new(TokenBucket::new(options.failover_rate)),
            options,
            backends,
            stats: Arc::new(RouteStats::default()),
            counts: Mutex::new(Counts::default()),
            gate: std::sync::OnceLock::new(),
            forgets: std::sync::atomic::AtomicU64::new(0),
            availability: Arc::new(AlwaysAvailable),
        }
    }

    /// Replaces the availability view (health checks, drain).
    pub fn with_availability(mut self, availability: Arc<dyn Availability>) -> Self {
        self.availability = availability;
        self
    }

    /// The normalization rules.
    pub fn normalizer(&self) -> &Normalizer {
        &self.normalizer
    }

    /// The store behind the router.
    pub fn store(&self) -> &Arc<dyn RouteStore> {
        &self.store
    }

    /// Lookup counters.
    pub fn stats(&self) -> &Arc<RouteStats> {
        &self.stats
    }

    /// After a reload: keeps the routes `old` cached whose backend is configured here
    /// exactly as it was there (so a reloaded instance serves its users through a store
    /// outage as its peers do). Nothing is kept when the normalization changed (the keys
    /// would differ) or the store did (another table, database or lookup query may
    /// answer differently). Returns how many routes were kept.
    pub fn inherit_cache(&self, old: &Router) -> usize {
        // Another table, database or lookup query may answer differently.
        if old.normalizer != self.normalizer
            || old.store.kind() != self.store.kind()
            || old.store.source() != self.store.source()
        {
            return 0;
        }
        let same = |name: &str| {
            let mine = self.backends.iter().find(|b| b.name == name);
            let theirs = old.backends.iter().find(|b| b.name == name);
            mine.is_some() && mine == theirs
        };
        let same_host = |host: &str| {
            let pick = |r: &Router| {
                r.backends
                    .iter()
                    .find(|b| b.host.eq_ignore_ascii_case(host))
                    .cloned()
            };
            let mine = pick(self);
            mine.is_some() && mine == pick(old)
        };
        self.cache.inherit(&old.cache, |cached| match cached {
            Cached::Found(r) => match &r.backend {
                Some(BackendRef::Name(name)) => same(name),
                Some(BackendRef::Host(host)) => same_host(host),
                None => false,
            },
            Cached::Absent => false,
        })
    }

    /// Attaches the process's gate (once): while it is closed, logins and deliveries
    /// get a temporary failure.
    pub fn attach_gate(&self, gate: Arc<crate::fence::Gate>) {
        let _ = self.gate.set(gate);
    }

    /// Whether logins may be served now (see [`crate::fence::Gate`]).
    pub fn is_serving(&self) -> bool {
        self.gate
            .get()
            .is_none_or(|g| g.serving(std::time::Instant::now()))
    }

    /// Whether this process serves logins, waiting a little for it when it does not
    /// yet: catching up takes one read of the change log (a login in the first
    /// moments after a start, or right after the process stood still).
    pub async fn serving_soon(&self) -> bool {
        let deadline = tokio::time::Instant::now() + GATE_WAIT;
        while !self.is_serving() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Forgets the cached route of a (normalized) user, after a change in the store.
    pub fn forget(&self, normalized_user: &str) {
        self.forgets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.cache
            .invalidate(&UserName::from_normalized(normalized_user));
    }

    /// Decides where `raw_user` (as the client typed it) goes for `protocol`.
    pub async fn resolve(
        &self,
        raw_user: &str,
        protocol: Protocol,
    ) -> Result<Decision, RouteError> {
        let user = self.normalizer.normalize(raw_user)?;
        self.resolve_normalized(user, protocol).await
    }

    /// [`Router::resolve`] for a name already normalized.
    pub async fn resolve_normalized(
        &self,
        user: UserName,
        protocol: Protocol,
    ) -> Result<Decision, RouteError> {
        self.decide(user, protocol, Mode::Login).await
    }

    /// Like [`Router::resolve`], but writes nothing: a user who would be assigned gets a
    /// [`Source::Proposed`] decision. For `postern route show`.
    pub async fn explain(
        &self,
        raw_user: &str,
        protocol: Protocol,
    ) -> Result<Decision, RouteError> {
        let user = self.normalizer.normalize(raw_user)?;
        self.decide(user, protocol, Mode::DryRun).await
    }

    /// Where mail for `address` goes (MX relay, LMTP): see the delivery rules on
    /// `Mode::Delivery`. A user being moved gets a temporary failure, so the sender
    /// retries after the move instead of writing to the old backend.
    pub async fn resolve_recipient(
        &self,
        address: &str,
        protocol: Protocol,
    ) -> Result<Decision, RouteError> {
        let user = self.normalizer.normalize(address)?;
        self.decide(user, protocol, Mode::Delivery).await
    }

    /// Where the user is pinned now, even while a move holds their logins: the
    /// starting point of `postern route move`, which may resume or force a stalled move.
    pub async fn current(
        &self,
        raw_user: &str,
        protocol: Protocol,
    ) -> Result<Decision, RouteError> {
        let user = self.normalizer.normalize(raw_user)?;
        self.decide(user, protocol, Mode::IgnoreHold).await
    }

    async fn decide(
        &self,
        user: UserName,
        protocol: Protocol,
        mode: Mode,
    ) -> Result<Decision, RouteError> {
        let write = mode == Mode::Login;
        if matches!(mode, Mode::Login | Mode::Delivery) && !self.serving_soon().await {
            return Err(RouteError::CatchingUp);
        }
        let (record, stale) = self.lookup(&user).await?;
        let Some(record) = record else {
            if mode == Mode::Delivery {
                return self.undelivered(user, protocol, None);
            }
            return self.unknown(user, protocol, None, write).await;
        };
        if record.disabled && mode != Mode::Delivery {
            return Err(RouteError::Disabled);
        }
        if record.moving && mode != Mode::IgnoreHold {
            return Err(RouteError::Moving);
        }
        let backend = match &record.backend {
            None if mode == Mode::Delivery => {
                return self.undelivered(user, protocol, Some(record));
            }
            None => return self.unknown(user, protocol, Some(record), write).await,
            Some(BackendRef::Name(name)) => self
                .serving(protocol)
                .find(|b| &b.name == name)
                .ok_or_else(|| RouteError::UnknownBackend(name.clone()))?,
            Some(BackendRef::Host(host)) => self
                .serving(protocol)
                .find(|b| b.host.eq_ignore_ascii_case(host))
                .ok_or_else(|| RouteError::UnknownBackend(host.clone()))?,
        };
        let source = match (stale, record.tentative) {
            (true, _) => Source::Stale,
            // Another login's reservation: this login settles it as well (confirms it
            // if the backend accepts, releases it if not), as the reserving one does.
            (false, true) if mode == Mode::Login => Source::Reserved,
            (false, _) => Source::Pinned,
        };
        let decision = Decision {
            user,
            backend: backend.name.clone(),
            source,
            record: Some(record),
            pinned: None,
        };
        if !matches!(mode, Mode::Login | Mode::Delivery) {
            return Ok(decision);
        }
        let policy = self.pool_policy(&backend.pool);
        match self.availability.state(&backend.name, protocol) {
            BackendState::Up => Ok(decision),
            // Mail for a user still goes where their sessions are: a delivery never
            // triggers the fenced move that logins do.
            BackendState::Draining
                if policy.mode == PoolMode::OwnStorage || mode == Mode::Delivery =>
            {
                Ok(decision)
            }
            BackendState::Draining => self.drain_move(decision, backend, protocol).await,
            BackendState::Down if policy.mode == PoolMode::OwnStorage => {
                Err(RouteError::BackendDown(backend.name.clone()))
            }
            // A delivery never moves a pin: one service down (Postfix, or Dovecot's
            // LMTP) says nothing of the user's sessions on the backend's other
            // services, and a re-pin would put their next login on a second backend.
            // The sender gets a temporary failure and queues; nothing is lost.
            BackendState::Down if mode == Mode::Delivery => {
                Err(RouteError::BackendDown(backend.name.clone()))
            }
            BackendState::Down => self.fail_over(decision, backend, protocol, policy).await,
        }
    }

    /// A recipient without a pin. Under `reject` nobody may have them (the MX/LMTP
    /// front answers 550, so the sender bounces instead of the backend, which would
    /// send backscatter to a forged sender); otherwise they go where a login would be
    /// sent by hash, and the backend answers for the address. Delivery never writes.
    fn undelivered(
        &self,
        user: UserName,
        protocol: Protocol,
        record: Option<Arc<RouteRecord>>,
    ) -> Result<Decision, RouteError> {
        match self.options.unknown_users {
            UnknownUsers::Reject => Err(RouteError::NoRoute),
            UnknownUsers::Hash | UnknownUsers::Assign(_) => self.hashed(user, protocol, record),
        }
    }

    /// A backend by rendezvous hash among those that take new users; nothing written.
    fn hashed(
        &self,
        user: UserName,
        protocol: Protocol,
        record: Option<Arc<RouteRecord>>,
    ) -> Result<Decision, RouteError> {
        let pool = record.as_ref().and_then(|r| r.pool.clone());
        let candidates = self.candidates(protocol, pool.as_deref());
        let backend = hash_pick(&user, &candidates).ok_or(RouteError::NoBackend)?;
        Ok(Decision {
            user,
            backend,
            source: Source::Hashed,
            record,
            pinned: None,
        })
    }

    fn pool_policy(&self, pool: &str) -> PoolPolicy {
        self.options.pools.get(pool).copied().unwrap_or_default()
    }

    /// Another backend of the shared pool, the same on every instance for a user
    /// (rendezvous hash over the pool's healthy members).
    fn failover_target(
        &self,
        user: &UserName,
        from: &BackendEntry,
        protocol: Protocol,
    ) -> Option<String> {
        let candidates: Vec<&BackendEntry> = self
            .candidates(protocol, Some(&from.pool))
            .into_iter()
            .filter(|b| b.name != from.name)
            .collect();
        hash_pick(user, &candidates)
    }

    async fn fail_over(
        &self,
        decision: Decision,
        from: &BackendEntry,
        protocol: Protocol,
        policy: PoolPolicy,
    ) -> Result<Decision, RouteError> {
        let target = self
            .failover_target(&decision.user, from, protocol)
            .ok_or_else(|| RouteError::BackendDown(from.name.clone()))?;
        let admitted = self.failover_tokens.lock().map_or(true, |mut b| b.take());
        if !admitted {
            return Err(RouteError::FailoverThrottled);
        }
        let mut decision = decision;
        decision.pinned = Some(from.name.clone());
        if policy.failover == Failover::Repin && decision.source != Source::Stale {
            match self.store.repin(&decision.user, &from.name, &target).await {
                Ok(winner) => {
                    warn!(user = %decision.user, from = %from.name, to = %winner, "backend down: user re-pinned");
                    self.cache.invalidate(&decision.user);
                    decision.backend = winner;
                    decision.source = Source::FailedOver;
                    return Ok(decision);
                }
                Err(e) => {
                    // The store cannot take the new pin: route for the outage only,
                    // which needs no write and is the same on every instance.
                    warn!(error = %e, user = %decision.user, "cannot re-pin; routing temporarily");
                }
            }
        }
        warn!(user = %decision.user, from = %from.name, to = %target, "backend down: routing temporarily");
        decision.backend = target;
        decision.source = Source::Temporary;
        Ok(decision)
    }

    /// A draining backend takes no new sessions when the pool can serve the user
    /// elsewhere: the user is moved with a fenced move, which ends their sessions on
    /// every instance first, so they never run on two backends at once.
    async fn drain_move(
        &self,
        decision: Decision,
        from: &BackendEntry,
        protocol: Protocol,
    ) -> Result<Decision, RouteError> {
        let Some(target) = self.failover_target(&decision.user, from, protocol) else {
            // Nowhere else to go: a draining backend still serves its users.
            return Ok(decision);
        };
        // A login waits on this move: a failing store ends it at once (the login gets
        // the temporary failure and the client retries), not after the CLI's patience.
        let fence = crate::moves::FenceOptions {
            store_patience: std::time::Duration::ZERO,
            ..self.options.fence
        };
        let outcome = crate::moves::move_user(
            self.store.as_ref(),
            &decision.user,
            &from.name,
            &target,
            fence,
            false,
        )
        .await;
        match outcome {
            crate::moves::MoveOutcome::Moved(_) => {
                tracing::info!(user = %decision.user, from = %from.name, to = %target, "backend draining: user moved");
                self.cache.invalidate(&decision.user);
                let mut decision = decision;
                decision.pinned = Some(from.name.clone());
                decision.backend = target;
                decision.source = Source::Moved;
                Ok(decision)
            }
            crate::moves::MoveOutcome::RolledBack(_)
            | crate::moves::MoveOutcome::Interrupted { .. } => Err(RouteError::Moving),
        }
    }

    /// The cache, then the store; stale routes when the store fails.
    async fn lookup(
        &self,
        user: &UserName,
    ) -> Result<(Option<Arc<RouteRecord>>, bool), RouteError> {
        let stale = match self.cache.get(user) {
            Lookup::Fresh(Cached::Found(r)) => {
                self.stats.record(Outcome::Hit);
                return Ok((Some(r), false));
            }
            Lookup::Fresh(Cached::Absent) => {
                self.stats.record(Outcome::Hit);
                return Ok((None, false));
            }
            Lookup::Stale(r) => Some(r),
            Lookup::Miss => None,
        };
        let started = Instant::now();
        let forgets = self.forgets.load(std::sync::atomic::Ordering::SeqCst);
        let answer = self.store.lookup(user).await;
        self.stats.observe(started.elapsed());
        match answer {
            Ok(record) => {
                self.stats.record(Outcome::Miss);
                let record = record.map(Arc::new);
                // A change-log entry applied while this lookup was in flight may be
                // newer than its answer: caching it would bring back the route the
                // entry just forgot (after a move, the old backend, until the TTL).
                let raced = self.forgets.load(std::sync::atomic::Ordering::SeqCst) != forgets;
                match &record {
                    _ if raced => {}
                    // "Being moved" is never cached: the move's last step (the new pin)
                    // must be seen by the next login, not one cache TTL later, and a
                    // failed move must not lock the user out any longer than it lasts.
                    Some(r) if r.moving => self.cache.invalidate(user),
                    // Nor is a reservation: its login settles it within seconds, and a
                    // released one must not route this instance's next login.
                    Some(r) if r.tentative => self.cache.invalidate(user),
                    Some(r) => self.cache.put(user.clone(), Cached::Found(Arc::clone(r))),
                    None => self.cache.put(user.clone(), Cached::Absent),
                }
                Ok((record, false))
            }
            Err(e) => match stale {
                Some(record) => {
                    self.stats.record(Outcome::Stale);
                    warn!(error = %e, user = %user, "route store failing; serving the cached route");
                    Ok((Some(record), true))
                }
                None => {
                    self.stats.record(Outcome::Error);
                    Err(RouteError::Store(e))
                }
            },
        }
    }

    fn serving(&self, protocol: Protocol) -> impl Iterator<Item = &BackendEntry> {
        self.backends
            .iter()
            .filter(move |b| b.protocols.contains(&protocol))
    }

    /// Backends that may take a new user of `pool` for `protocol`.
    fn candidates(&self, protocol: Protocol, pool: Option<&str>) -> Vec<&BackendEntry> {
        self.serving(protocol)
            .filter(|b| b.weight > 0)
            .filter(|b| pool.is_none_or(|p| b.pool == p))
            .filter(|b| self.availability.state(&b.name, protocol) == BackendState::Up)
            .collect()
    }

    async fn unknown(
        &self,
        user: UserName,
        protocol: Protocol,
        record: Option<Arc<RouteRecord>>,
        write: bool,
    ) -> Result<Decision, RouteError> {
        let pool = record.as_ref().and_then(|r| r.pool.clone());
        let policy = match self.options.unknown_users {
            UnknownUsers::Reject => return Err(RouteError::NoRoute),
            UnknownUsers::Hash => None,
            UnknownUsers::Assign(p) => Some(p),
        };
        let candidates = self.candidates(protocol, pool.as_deref());
        let choice = match policy {
            Some(AssignPolicy::LeastLoaded) => self.least_loaded(&user, &candidates).await,
            Some(AssignPolicy::Hash) | None => hash_pick(&user, &candidates),
        }
        .ok_or(RouteError::NoBackend)?;
        if policy.is_none() || !write {
            let source = if policy.is_none() {
                Source::Hashed
            } else {
                Source::Proposed
            };
            return Ok(Decision {
                user,
                backend: choice,
                source,
                record,
                pinned: None,
            });
        }
        // Race-safe: if another instance pinned (or reserved) the user first, its pin
        // comes back, and this login goes there too. Not cached until confirmed: a
        // released reservation must not live on in the cache.
        let until = crate::store::now_secs() + RESERVATION_SECS;
        let backend = self.store.reserve(&user, &choice, until).await?;
        Ok(Decision {
            user,
            backend,
            source: Source::Reserved,
            record,
            pinned: None,
        })
    }

    /// Turns a [`Source::Reserved`] decision into a pin once the backend accepted the
    /// login. Returns the pin in force; when it is not `decision.backend` (the
    /// reservation was released by a failed login of the same name and another login
    /// pinned the user elsewhere meanwhile), the session must not be served.
    pub async fn confirm(&self, decision: &Decision) -> Result<String, RouteError> {
        let backend = self
            .store
            .confirm(&decision.user, &decision.backend)
            .await?;
        self.stats.record(Outcome::Assigned);
        if let Ok(mut c) = self.counts.lock() {
            *c.per_backend.entry(backend.clone()).or_default() += 1;
        }
        let mut record = decision.record.as_deref().cloned().unwrap_or_default();
        record.backend = Some(BackendRef::Name(backend.clone()));
        self.cache
            .put(decision.user.clone(), Cached::Found(Arc::new(record)));
        Ok(backend)
    }

    /// Drops a [`Source::Reserved`] decision's reservation: the login failed, and a
    /// name that never logged in must not keep a pin. `true` if a row was deleted.
    pub async fn release(&self, decision: &Decision) -> Result<bool, RouteError> {
        self.cache.invalidate(&decision.user);
        Ok(self
            .store
            .release(&decision.user, &decision.backend)
            .await?)
    }

    async fn least_loaded(&self, user: &UserName, candidates: &[&BackendEntry]) -> Option<String> {
        let counts = self.pinned_counts().await;
        let load = |b: &BackendEntry| {
            let n = counts.get(&b.name).copied().unwrap_or(0);
            // +1: an empty heavy backend still beats an empty light one.
            (n as f64 + 1.0) / f64::from(b.weight)
        };
        let best = candidates
            .iter()
            .map(|b| load(b))
            .fold(f64::INFINITY, f64::min);
        let tied: Vec<&BackendEntry> = candidates
            .iter()
            .copied()
            .filter(|b| load(b) <= best)
            .collect();
        // Ties go by hash, so two instances with the same counts agree.
        hash_pick(user, &tied)
    }

    /// Pinned users per backend for status pages: the store's answer if it comes
    /// within `limit`, else the last counts known (a hung database must not hang the
    /// admin API). `None` when the store never answered.
    pub async fn counts_within(&self, limit: Duration) -> Option<(HashMap<String, u64>, bool)> {
        match tokio::time::timeout(limit, self.store.counts()).await {
            Ok(Ok(rows)) => {
                let fresh: HashMap<String, u64> = rows.into_iter().collect();
                if let Ok(mut c) = self.counts.lock() {
                    c.per_backend = fresh.clone();
                    c.fetched = Some(Instant::now());
                }
                Some((fresh, true))
            }
            _ => {
                let c = self.counts.lock().ok()?;
                c.fetched.map(|_| (c.per_backend.clone(), false))
            }
        }
    }

    async fn pinned_counts(&self) -> HashMap<String, u64> {
        if let Ok(c) = self.counts.lock()
            && c.fetched.is_some_and(|t| t.elapsed() < COUNTS_TTL)
        {
            return c.per_backend.clone();
        }
        match self.store.counts().await {
            Ok(rows) => {
                let fresh: HashMap<String, u64> = rows.into_iter().collect();
                if let Ok(mut c) = self.counts.lock() {
                    c.per_backend = fresh.clone();
                    c.fetched = Some(Instant::now());
                }
                fresh
            }
            Err(e) => {
                warn!(error = %e, "cannot count pinned users; using the last counts");
                self.counts
                    .lock()
                    .map(|c| c.per_backend.clone())
                    .unwrap_or_default()
            }
        }
    }
}

fn hash_pick(user: &UserName, candidates: &[&BackendEntry]) -> Option<String> {
    let weighted: Vec<Weighted<'_>> = candidates
        .iter()
        .map(|b| Weighted {
            name: &b.name,
            weight: b.weight,
        })
        .collect();
    hash::pick(user.as_str(), &weighted).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::static_map::StaticStore;

    fn backends() -> Vec<BackendEntry> {
        ["b1", "b2"]
            .map(|name| BackendEntry {
                name: name.into(),
                host: format!("{name}.example"),
                weight: 1,
                pool: "default".into(),
                protocols: vec![Protocol::Imap],
            })
            .to_vec()
    }

    fn router(unknown: UnknownUsers) -> Router {
        let n = Normalizer {
            default_domain: Some("example.test".into()),
            ..Normalizer::default()
        };
        let store = StaticStore::new(
            &n,
            [("alice@example.test", "b1"), ("Bob", "b2"), ("eve", "gone")],
        )
        .unwrap();
        let options = RouterOptions {
            unknown_users: unknown,
            ..RouterOptions::default()
        };
        Router::new(n, Arc::new(store), options, backends())
    }

    #[tokio::test]
    async fn pinned_users_go_to_their_backend_whatever_the_spelling() {
        let r = router(UnknownUsers::Reject);
        for name in ["alice", "ALICE@example.test", " alice@EXAMPLE.test "] {
            let d = r.resolve(name, Protocol::Imap).await.unwrap();
            assert_eq!((d.backend.as_str(), d.source), ("b1", Source::Pinned));
            assert_eq!(d.user.as_str(), "alice@example.test");
        }
        let d = r.resolve("bob@example.test", Protocol::Imap).await.unwrap();
        assert_eq!(d.backend, "b2");
        assert_eq!(r.stats().hits.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn unknown_users_follow_the_policy() {
        let r = router(UnknownUsers::Reject);
        let e = r.resolve("carol", Protocol::Imap).await.unwrap_err();
        assert!(matches!(e, RouteError::NoRoute));
        assert_eq!(e.failure(), Failure::AuthFailed);

        let r = router(UnknownUsers::Hash);
        let d1 = r.resolve("carol", Protocol::Imap).await.unwrap();
        let d2 = r
            .resolve("Carol@Example.test", Protocol::Imap)
            .await
            .unwrap();
        assert_eq!(d1, d2);
        assert_eq!(d1.source, Source::Hashed);

        // Assignment needs a writable store.
        let r = router(UnknownUsers::Assign(AssignPolicy::LeastLoaded));
        let e = r.resolve("carol", Protocol::Imap).await.unwrap_err();
        assert!(matches!(e, RouteError::Store(StoreError::ReadOnly(_))));
        assert_eq!(e.failure(), Failure::Unavailable);
    }

    #[tokio::test]
    async fn recipients_without_a_pin_follow_the_policy() {
        // reject: no backend for them (the MX front's 550, no backscatter).
        let r = router(UnknownUsers::Reject);
        let e = r
            .resolve_recipient("nobody@example.test", Protocol::Imap)
            .await
            .unwrap_err();
        assert!(matches!(e, RouteError::NoRoute));
        let d = r
            .resolve_recipient("alice@example.test", Protocol::Imap)
            .await
            .unwrap();
        assert_eq!((d.backend.as_str(), d.source), ("b1", Source::Pinned));
        // hash and assign: by hash, and nothing is written (delivery never assigns).
        for policy in [
            UnknownUsers::Hash,
            UnknownUsers::Assign(AssignPolicy::LeastLoaded),
        ] {
            let d = router(policy)
                .resolve_recipient("nobody@example.test", Protocol::Imap)
                .await
                .unwrap();
            assert_eq!(d.source, Source::Hashed);
        }
    }

    #[tokio::test]
    async fn a_reload_keeps_the_cached_routes_of_unchanged_backends() {
        let old = router(UnknownUsers::Reject);
        old.resolve("alice", Protocol::Imap).await.unwrap();
        old.resolve("bob", Protocol::Imap).await.unwrap();
        // The same configuration: both routes carry over.
        let same = router(UnknownUsers::Reject);
        assert_eq!(same.inherit_cache(&old), 2);
        // b2 redefined (another host): only alice's route (b1) carries over.
        let n = Normalizer {
            default_domain: Some("example.test".into()),
            ..Normalizer::default()
        };
        let table = [("alice@example.test", "b1"), ("Bob", "b2"), ("eve", "gone")];
        let store = StaticStore::new(&n, table).unwrap();
        let mut changed = backends();
        changed[1].host = "10.9.9.9".into();
        let new = Router::new(
            n.clone(),
            Arc::new(store),
            RouterOptions::default(),
            changed,
        );
        assert_eq!(new.inherit_cache(&old), 1);
        // Another static table (alice moved by an edit): nothing carries over, or the
        // edit would wait for the cache TTL.
        let store = StaticStore::new(&n, [("alice@example.test", "b2")]).unwrap();
        let edited = Router::new(n, Arc::new(store), RouterOptions::default(), backends());
        assert_eq!(edited.inherit_cache(&old), 0);
        // Another normalization: the keys may differ, nothing carries over.
        let other = Router::new(
            Normalizer::default(),
            Arc::new(StaticStore::new(&Normalizer::default(), [("a", "b1")]).unwrap()),
            RouterOptions::default(),
            backends(),
        );
        assert_eq!(other.inherit_cache(&old), 0);
    }

    #[tokio::test]
    async fn a_pin_to_an_unknown_backend_is_a_temporary_failure() {
        let r = router(UnknownUsers::Hash);
        let e = r.resolve("eve", Protocol::Imap).await.unwrap_err();
        assert!(matches!(e, RouteError::UnknownBackend(_)));
        assert_eq!(e.failure(), Failure::Unavailable);
    }
}
