//! Follows the route store's change log: forgets cached routes whose pin changed and
//! ends the sessions of kicked users, then reports (heartbeat) how far it got, which is
//! what a fenced move waits for. Polling keeps the three SQL dialects on one path; a
//! change is seen within one interval (1 s by default).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use postern_route::Router;
use postern_route::fence::{Effect, Follower, Gate, LATE_WINDOW, STAMP_EVERY};
use postern_route::store::{ChangeEvent, RouteStore, StoreError, now_secs};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backends::health::Health;
use crate::registry::Registry;

/// Entries fetched per poll; a backlog is drained over consecutive polls.
const BATCH: u32 = 1000;
/// Change-log entries older than this are pruned: an instance cut off for longer
/// than this misses entries, so it is long.
const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Instances silent this long are removed (crashed ones: a clean exit removes its own
/// row at once, and a silent one stopped counting for moves after `live_within`).
const INSTANCE_RETENTION: Duration = Duration::from_secs(600);
/// How often to prune.
const PRUNE_EVERY: Duration = Duration::from_secs(300);

/// Who this process is to the route store, and how far it has applied the change log.
/// It lives as long as the process, not a configuration generation: a reload keeps the
/// instance's row in `instances` (one per process) and resumes the log where the last
/// generation left it, so a kick written just before a reload is still applied.
#[derive(Debug, Default)]
pub struct Position {
    instance: OnceLock<String>,
    follower: Mutex<Follower>,
    gate: OnceLock<Arc<Gate>>,
}

impl Position {
    /// The instance id: the first configuration's, for the life of the process.
    pub fn instance(&self, configured: &str) -> String {
        self.instance.get_or_init(|| configured.to_owned()).clone()
    }

    /// The process's gate (the first configuration's `live_within`).
    pub fn gate(&self, live_within: Duration) -> Arc<Gate> {
        Arc::clone(
            self.gate
                .get_or_init(|| Arc::new(Gate::new(std::time::Instant::now(), live_within))),
        )
    }

    fn follower(&self) -> std::sync::MutexGuard<'_, Follower> {
        self.follower.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How often expired holds (a mover that died half way) are cleared.
const CLEAR_HOLDS_EVERY: Duration = Duration::from_secs(10);

/// Runs until `cancel` fires.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    router: Arc<Router>,
    registry: Arc<Registry>,
    health: Arc<Health>,
    position: Arc<Position>,
    configured_instance: String,
    interval: Duration,
    live_within: Duration,
    cancel: CancellationToken,
) {
    let store = Arc::clone(router.store());
    let gate = position.gate(live_within);
    router.attach_gate(Arc::clone(&gate));
    let instance = position.instance(&configured_instance);
    if instance != configured_instance {
        debug!(%instance, configured = %configured_instance, "keeping this process's instance id across the reload");
    }
    let Some(last) = start(&*store, &position, interval, &cancel).await else {
        return;
    };
    info!(%instance, from = last, "following the route change log");
    let mut watch = Watch {
        router,
        registry,
        health,
        position,
        store,
        gate,
        instance,
        last,
        failing: false,
        unacked: Vec::new(),
        last_prune: tokio::time::Instant::now(),
        last_clear: tokio::time::Instant::now(),
    };
    loop {
        if watch.tick().await == Tick::More {
            continue;
        }
        watch.housekeeping().await;
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Where the log is followed from: entries written before this process started
/// concern neither its (empty) cache nor its (absent) sessions; after a reload, the
/// log resumes where it was. `None` when cancelled first.
async fn start(
    store: &dyn RouteStore,
    position: &Position,
    interval: Duration,
    cancel: &CancellationToken,
) -> Option<i64> {
    if let Some(last) = position.follower().position() {
        return Some(last);
    }
    loop {
        match store.last_event_id().await {
            Ok(id) => {
                position.follower().start_at(id);
                return Some(id);
            }
            Err(e) => {
                warn!(error = %e, "cannot read the route change log; retrying");
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = cancel.cancelled() => return None,
                }
            }
        }
    }
}

/// Whether a tick drained the log.
#[derive(PartialEq, Eq)]
enum Tick {
    /// A full batch was read: read again at once.
    More,
    Done,
}

/// The follower's state between ticks.
struct Watch {
    router: Arc<Router>,
    registry: Arc<Registry>,
    health: Arc<Health>,
    position: Arc<Position>,
    store: Arc<dyn RouteStore>,
    gate: Arc<Gate>,
    instance: String,
    /// The position: the highest id applied.
    last: i64,
    /// The store is failing (logged once).
    failing: bool,
    /// Kicks applied but not yet acknowledged (the store failed): retried each tick.
    unacked: Vec<i64>,
    last_prune: tokio::time::Instant,
    last_clear: tokio::time::Instant,
}

impl Watch {
    /// Reads the log (the late window behind the position, then what is new),
    /// applies it, acknowledges kicks, heartbeats and reads the operator's states.
    async fn tick(&mut self) -> Tick {
        // Catch-up ends only by a read that began after it did.
        let ticket = self.gate.read_began();
        let (events, fresh) = match self.read().await {
            Ok(read) => read,
            Err(e) => {
                if !self.failing {
                    warn!(error = %e, "cannot read the route change log");
                    self.failing = true;
                }
                return Tick::Done;
            }
        };
        if self.failing {
            info!("route change log reachable again");
            self.failing = false;
        }
        let effects = self
            .position
            .follower()
            .apply(&events, std::time::Instant::now());
        for effect in effects {
            match effect {
                // After the effects before it: the sessions are ended.
                Effect::Confirm(kick) => self.unacked.push(kick),
                other => apply(&self.router, &self.registry, other),
            }
        }
        self.last = self.position.follower().position().unwrap_or(self.last);
        let drained = fresh < BATCH as usize;
        if !self.unacked.is_empty() {
            match self.store.ack(&self.instance, &self.unacked).await {
                Ok(()) => self.unacked.clear(),
                Err(e) => {
                    warn!(error = %e, kicks = self.unacked.len(), "cannot acknowledge kicks; retrying")
                }
            }
        }
        match self.store.heartbeat(&self.instance, self.last).await {
            Ok(()) if drained && self.gate.caught_up(ticket) => {
                info!(
                    to = self.last,
                    "caught up on the route change log; serving again"
                );
            }
            Ok(()) => {}
            Err(e) => warn!(error = %e, "cannot record the heartbeat"),
        }
        // Operator states (drain, down): a tiny table, read every tick.
        match self.store.backend_states().await {
            Ok(states) => self.health.set_admin(&states),
            Err(e) => warn!(error = %e, "cannot read backend states"),
        }
        if drained { Tick::Done } else { Tick::More }
    }

    /// The entries to apply and how many of them are new (a full batch means more).
    async fn read(&self) -> Result<(Vec<ChangeEvent>, usize), StoreError> {
        // Entries that committed after a higher one was read (out of id order).
        let late_from = self
            .position
            .follower()
            .late_from(std::time::Instant::now());
        let mut events: Vec<ChangeEvent> = match late_from {
            Some(from) => {
                let window = u32::try_from(LATE_WINDOW).unwrap_or(BATCH);
                let late = self.store.events_since(from, window).await?;
                late.into_iter().filter(|e| e.id <= self.last).collect()
            }
            None => Vec::new(),
        };
        let new = self.store.events_since(self.last, BATCH).await?;
        let fresh = new.len();
        events.extend(new);
        Ok((events, fresh))
    }

    /// Clears expired holds and prunes the log, each on its own period.
    async fn housekeeping(&mut self) {
        if self.last_clear.elapsed() >= CLEAR_HOLDS_EVERY {
            self.last_clear = tokio::time::Instant::now();
            match self.store.clear_expired_holds(now_secs()).await {
                Ok(0) => {}
                Ok(n) => info!(
                    users = n,
                    "cleared the holds of moves nobody finished; their pins stay"
                ),
                Err(e) => debug!(error = %e, "cannot clear expired holds"),
            }
        }
        if self.last_prune.elapsed() >= PRUNE_EVERY {
            self.last_prune = tokio::time::Instant::now();
            let ago = |d: Duration| now_secs() - i64::try_from(d.as_secs()).unwrap_or(0);
            let pruned = self
                .store
                .prune(ago(RETENTION), ago(INSTANCE_RETENTION))
                .await;
            if let Err(e) = pruned {
                warn!(error = %e, "cannot prune the route change log");
            }
        }
    }
}

/// Stamps the process's gate every [`STAMP_EVERY`] until `cancel` fires: nothing but
/// the clock, so a store outage cannot stop it, and a gap between two stamps means
/// this process stood still (see [`Gate`]).
pub async fn stamp(gate: Arc<Gate>, live_within: Duration, cancel: CancellationToken) {
    let mut every = tokio::time::interval(STAMP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = cancel.cancelled() => return,
        }
        if gate.stamp(std::time::Instant::now()) {
            warn!(
                "this instance stood still for about {live_within:?} (frozen or starved): \
                 other instances may have presumed it dead and moved users; no login is \
                 served until it has read the route change log to its end"
            );
        }
    }
}

/// Executes one effect of the change log on this instance.
fn apply(router: &Router, registry: &Registry, effect: Effect) {
    match effect {
        Effect::Forget(user) => router.forget(&user),
        Effect::EndSessions(user) => {
            let n = registry.kick_user(&user);
            info!(user = %user, sessions = n, "kick: ending the user's sessions");
        }
        // Acknowledged by the caller, in a batch.
        Effect::Confirm(_) => {}
        Effect::EndSessionsElsewhere(user, pin) => {
            // The user is pinned elsewhere now (re-pin on failover, an operator's
            // pin): their sessions on any other backend end, on every instance, so no
            // mailbox is served by two backends.
            let n = registry.kick_user_elsewhere(&user, &pin);
            if n > 0 {
                info!(user = %user, backend = %pin, sessions = n, "pin changed: ending the user's sessions on other backends");
            } else {
                debug!(user = %user, backend = %pin, "pin changed");
            }
        }
    }
}

/// Removes this process's row from `instances` at a clean exit, so moves stop waiting
/// for it at once instead of after `live_within`.
pub async fn leave(router: &Router, position: &Position) {
    if let Some(instance) = position.instance.get()
        && let Err(e) = router.store().leave(instance).await
    {
        warn!(error = %e, "cannot remove this instance from the route store");
    }
}
