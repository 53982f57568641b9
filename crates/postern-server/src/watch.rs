//! Follows the route store's change log: forgets cached routes whose pin changed and
//! ends the sessions of kicked users, then reports (heartbeat) how far it got, which is
//! what a fenced move waits for. Polling keeps the three SQL dialects on one path; a
//! change is seen within one interval (1 s by default).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use postern_route::Router;
use postern_route::store::{ChangeKind, now_secs};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::health::Health;
use crate::registry::Registry;

/// Entries fetched per poll; a backlog is drained over consecutive polls.
const BATCH: u32 = 1000;
/// Change-log entries and dead instances older than this are pruned.
const RETENTION: Duration = Duration::from_secs(24 * 3600);
/// How often to prune.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Who this process is to the route store, and how far it has applied the change log.
/// It lives as long as the process, not a configuration generation: a reload keeps the
/// instance's row in `instances` (one per process) and resumes the log where the last
/// generation left it, so a kick written just before a reload is still applied.
#[derive(Debug, Default)]
pub struct Position {
    instance: OnceLock<String>,
    /// The last entry applied; `None` until the first generation has read the log.
    last: Mutex<Option<i64>>,
}

impl Position {
    /// The instance id: the first configuration's, for the life of the process.
    pub fn instance(&self, configured: &str) -> String {
        self.instance.get_or_init(|| configured.to_owned()).clone()
    }

    fn last(&self) -> Option<i64> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records entries applied; never goes back (an old generation's follower may
    /// finish a batch after the new one started).
    fn advance(&self, to: i64) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some(last.map_or(to, |l| l.max(to)));
    }
}

/// Runs until `cancel` fires.
pub async fn run(
    router: Arc<Router>,
    registry: Arc<Registry>,
    health: Arc<Health>,
    position: Arc<Position>,
    configured_instance: String,
    interval: Duration,
    cancel: CancellationToken,
) {
    let store = Arc::clone(router.store());
    let instance = position.instance(&configured_instance);
    if instance != configured_instance {
        debug!(%instance, configured = %configured_instance, "keeping this process's instance id across the reload");
    }
    // Entries written before this process started concern neither its (empty) cache
    // nor its (absent) sessions; after a reload, the log resumes where it was.
    let mut last = match position.last() {
        Some(last) => last,
        None => loop {
            match store.last_event_id().await {
                Ok(id) => break id,
                Err(e) => {
                    warn!(error = %e, "cannot read the route change log; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(interval) => {}
                        () = cancel.cancelled() => return,
                    }
                }
            }
        },
    };
    position.advance(last);
    info!(%instance, from = last, "following the route change log");
    let mut failing = false;
    let mut last_prune = tokio::time::Instant::now();
    loop {
        match store.events_since(last, BATCH).await {
            Ok(events) => {
                if failing {
                    info!("route change log reachable again");
                    failing = false;
                }
                for e in &events {
                    router.forget(&e.user);
                    if e.kind == ChangeKind::Kick {
                        let n = registry.kick_user(&e.user);
                        info!(user = %e.user, sessions = n, "kick: ending the user's sessions");
                    } else if let Some(pin) = &e.backend {
                        // The user is pinned elsewhere now (re-pin on failover, an
                        // operator's pin): their sessions on any other backend end, on
                        // every instance, so no mailbox is served by two backends.
                        let n = registry.kick_user_elsewhere(&e.user, pin);
                        if n > 0 {
                            info!(user = %e.user, backend = %pin, sessions = n, "pin changed: ending the user's sessions on other backends");
                        } else {
                            debug!(user = %e.user, backend = %pin, "pin changed");
                        }
                    }
                    last = last.max(e.id);
                }
                position.advance(last);
                if let Err(e) = store.heartbeat(&instance, last).await {
                    warn!(error = %e, "cannot record the heartbeat");
                }
                // Operator states (drain, down): a tiny table, read every tick.
                match store.backend_states().await {
                    Ok(states) => health.set_admin(&states),
                    Err(e) => warn!(error = %e, "cannot read backend states"),
                }
                if events.len() == BATCH as usize {
                    continue;
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "cannot read the route change log");
                    failing = true;
                }
            }
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = tokio::time::Instant::now();
            let before = now_secs() - i64::try_from(RETENTION.as_secs()).unwrap_or(0);
            if let Err(e) = store.prune(before).await {
                warn!(error = %e, "cannot prune the route change log");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = cancel.cancelled() => return,
        }
    }
}
