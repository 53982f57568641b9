//! Fenced moves and kicks across Postern instances, through the database only.
//!
//! ```text
//!  move USER B2:   begin_move (moving_to = B2, hold, Kick logged)   ── logins: temporary failure
//!                  every live instance applies the Kick: ends USER's sessions, forgets the
//!                  cached route, and reports the log position it reached (heartbeat)
//!                  all live instances past the Kick?  ── no, within ack_timeout: stop, report
//!                  finish_move (backend = B2, hold cleared, Pin logged)
//! ```
//! An instance is live when its heartbeat is recent; a dead one holds no sessions. If a
//! live instance does not confirm in time the move stops half way: the user stays on
//! the old backend with logins refused until the hold expires, never on two backends.

use std::time::Duration;

use tokio::time::{Instant, sleep};

use crate::UserName;
use crate::store::{RouteStore, StoreError, now_secs};

/// Timing of a fenced operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FenceOptions {
    /// How long new logins are held off while a move is in progress (a safety bound if
    /// the mover dies half way; a completed move clears it at once).
    pub hold: Duration,
    /// How long to wait for every live instance to confirm.
    pub ack_timeout: Duration,
    /// An instance whose heartbeat is older than this is considered gone.
    pub live_within: Duration,
}

impl Default for FenceOptions {
    fn default() -> Self {
        Self {
            hold: Duration::from_secs(60),
            ack_timeout: Duration::from_secs(15),
            live_within: Duration::from_secs(10),
        }
    }
}

/// Which instances confirmed a change-log entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acks {
    /// Live instances that applied it.
    pub confirmed: Vec<String>,
    /// Live instances that did not, within the timeout.
    pub missing: Vec<String>,
}

/// Waits until every live instance has applied change-log entry `id`.
pub async fn wait_for_acks(
    store: &dyn RouteStore,
    id: i64,
    options: FenceOptions,
) -> Result<Acks, StoreError> {
    let deadline = Instant::now() + options.ack_timeout;
    let live_secs = i64::try_from(options.live_within.as_secs()).unwrap_or(i64::MAX);
    loop {
        let now = now_secs();
        let mut acks = Acks::default();
        for i in store.instances().await? {
            if i.heartbeat_at < now.saturating_sub(live_secs) {
                continue;
            }
            if i.last_event_id >= id {
                acks.confirmed.push(i.id);
            } else {
                acks.missing.push(i.id);
            }
        }
        if acks.missing.is_empty() || Instant::now() >= deadline {
            return Ok(acks);
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// The outcome of a fenced move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoveOutcome {
    /// The pin now points to the new backend; these instances ended the old sessions.
    Moved(Acks),
    /// Some live instance did not confirm: the pin was not switched, and logins stay
    /// on hold until it expires (Unix seconds).
    Stalled {
        /// Who confirmed and who did not.
        acks: Acks,
        /// When the hold ends.
        hold_until: i64,
    },
}

/// Moves `user` from `from` to `to`, fenced (see the module documentation). With
/// `force`, the pin is switched even if some instance did not confirm.
pub async fn move_user(
    store: &dyn RouteStore,
    user: &UserName,
    from: &str,
    to: &str,
    options: FenceOptions,
    force: bool,
) -> Result<MoveOutcome, StoreError> {
    let hold_until = now_secs() + i64::try_from(options.hold.as_secs()).unwrap_or(60);
    let kick = store.begin_move(user, from, to, hold_until).await?;
    let acks = wait_for_acks(store, kick, options).await?;
    if !acks.missing.is_empty() && !force {
        return Ok(MoveOutcome::Stalled { acks, hold_until });
    }
    store.finish_move(user, to).await?;
    Ok(MoveOutcome::Moved(acks))
}

/// Ends `user`'s sessions on every instance; returns who confirmed.
pub async fn kick_user(
    store: &dyn RouteStore,
    user: &UserName,
    options: FenceOptions,
) -> Result<Acks, StoreError> {
    let id = store.kick(user).await?;
    wait_for_acks(store, id, options).await
}

/// Progress of an evacuation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evacuation {
    /// Users moved, with their new backend.
    pub moved: Vec<(String, String)>,
    /// Users whose move stalled (a live instance did not confirm): still on the old
    /// backend, held until their hold expires.
    pub stalled: Vec<String>,
}

/// Moves every user pinned to `from` onto `targets` (by rendezvous hash, weighted), in
/// batches of `batch` fenced moves: the batch's kicks go out together and one wait
/// covers them all, so an evacuation of thousands of users takes seconds per batch,
/// not per user.
pub async fn evacuate(
    store: &dyn RouteStore,
    from: &str,
    targets: &[crate::hash::Weighted<'_>],
    batch: usize,
    options: FenceOptions,
) -> Result<Evacuation, StoreError> {
    let mut report = Evacuation::default();
    let pins = store.list(Some(from)).await?;
    for chunk in pins.chunks(batch.max(1)) {
        let hold_until = now_secs() + i64::try_from(options.hold.as_secs()).unwrap_or(60);
        let mut last = 0;
        let mut planned = Vec::new();
        for row in chunk {
            let user = UserName::from_normalized(&row.user);
            let Some(to) = crate::hash::pick(user.as_str(), targets) else {
                return Err(StoreError::Invalid("no backend to evacuate to".into()));
            };
            last = last.max(store.begin_move(&user, from, to, hold_until).await?);
            planned.push((user, to.to_owned()));
        }
        let acks = wait_for_acks(store, last, options).await?;
        for (user, to) in planned {
            if acks.missing.is_empty() {
                store.finish_move(&user, &to).await?;
                report.moved.push((user.as_str().to_owned(), to));
            } else {
                report.stalled.push(user.as_str().to_owned());
            }
        }
    }
    Ok(report)
}
