//! Fenced moves and kicks across Postern instances, through the database only: the
//! runtime side of `fence.rs`, which decides every step.
//!
//! ```text
//!  move USER B2:   begin_move (moving_to = B2, hold, Kick logged)   ── logins: temporary failure
//!                  every live instance applies the Kick: ends USER's sessions, forgets the
//!                  cached route, and reports the log position it reached (heartbeat)
//!                  all live instances past the Kick? ── yes: finish_move (pin = B2, Pin logged)
//!                                                     ── no, by ack_timeout: abort_move
//! ```
//! An instance is live when its heartbeat is recent; a dead one holds no sessions. A
//! move that a live instance does not confirm is rolled back (the pin stays, logins go
//! there again at once), so a user is never on two backends and never locked out
//! longer than the move took; one the store interrupts says what it left written.

use tokio::time::{Instant, sleep, sleep_until};

use crate::UserName;
pub use crate::fence::{Acks, FenceOptions, Left, Outcome as MoveOutcome};
use crate::fence::{Input, MovePlan, Step};
use crate::store::{RouteStore, StoreError, now_secs};

/// The instances, and the ids of those that acknowledged every one of `kicks`.
async fn confirmations(
    store: &dyn RouteStore,
    kicks: &[i64],
) -> Result<(Vec<crate::store::InstanceRow>, Vec<String>), StoreError> {
    let rows = store.instances().await?;
    let acked = store.acked(kicks).await?;
    let all = rows
        .iter()
        .filter(|r| {
            kicks
                .iter()
                .all(|k| acked.iter().any(|(kick, i)| kick == k && *i == r.id))
        })
        .map(|r| r.id.clone())
        .collect();
    Ok((rows, all))
}

/// Waits until every live instance has acknowledged kick `id`.
pub async fn wait_for_acks(
    store: &dyn RouteStore,
    id: i64,
    options: FenceOptions,
) -> Result<Acks, StoreError> {
    let deadline = Instant::now() + options.ack_timeout;
    loop {
        let (rows, acked) = confirmations(store, &[id]).await?;
        // A kick has no plan: it presumes silent instances dead at once (it waits for
        // nothing it could get wrong; a move is what must not).
        let acks = crate::fence::acks(&rows, &acked, now_secs(), options.live_within, true);
        if acks.missing.is_empty() || Instant::now() >= deadline {
            return Ok(acks);
        }
        sleep(crate::fence::ACK_POLL).await;
    }
}

/// Moves `user` from `from` to `to` by executing a [`MovePlan`] (see `fence.rs`): it
/// finishes, rolls back, or stops after the store failed for `store_patience` and says
/// what it left written. With `force`, the pin is switched even if some live instance
/// did not confirm.
pub async fn move_user(
    store: &dyn RouteStore,
    user: &UserName,
    from: &str,
    to: &str,
    options: FenceOptions,
    force: bool,
) -> MoveOutcome {
    let mut plan = MovePlan::new(options, force, now_secs());
    let mut input = Input::Start;
    loop {
        let now = Instant::now().into_std();
        input = match plan.next(now, input) {
            Step::Begin { hold_until } => Input::Begun(
                store
                    .begin_move(user, from, to, hold_until)
                    .await
                    .inspect_err(|e| tracing::warn!(error = %e, "move: cannot write the hold"))
                    .ok(),
            ),
            Step::ReadInstances { kick } => Input::Instances(
                confirmations(store, &[kick])
                    .await
                    .inspect_err(|e| tracing::warn!(error = %e, "move: cannot read the instances"))
                    .ok()
                    .map(|(rows, acked)| (rows, acked, now_secs())),
            ),
            Step::Finish => Input::Written(
                store
                    .finish_move(user, to)
                    .await
                    .inspect_err(|e| tracing::warn!(error = %e, "move: cannot write the new pin"))
                    .is_ok(),
            ),
            Step::Abort => Input::Written(
                store
                    .abort_move(user)
                    .await
                    .inspect_err(|e| tracing::warn!(error = %e, "move: cannot clear the hold"))
                    .is_ok(),
            ),
            Step::WaitUntil(at) => {
                sleep_until(Instant::from_std(at)).await;
                Input::Woke
            }
            Step::Done(outcome) => return outcome,
        };
    }
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
    /// Users whose move was rolled back (a live instance did not confirm): still on
    /// the old backend, which serves them again at once.
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
    let mut reach = Reach::new(options);
    let pins = reach.patiently(|| store.list(Some(from))).await?;
    for chunk in pins.chunks(batch.max(1)) {
        let hold_until = now_secs() + i64::try_from(options.hold.as_secs()).unwrap_or(60);
        let mut planned = Vec::new();
        let outcome = evacuate_batch(
            store,
            chunk,
            (from, targets),
            hold_until,
            &mut reach,
            &mut planned,
            &mut report,
        )
        .await;
        if let Err(e) = outcome {
            return Err(stopped(e, &report, &planned, from, hold_until));
        }
    }
    Ok(report)
}

/// One batch of an evacuation: the kicks, one wait for the confirmations, then the
/// new pins (or the roll-backs).
async fn evacuate_batch(
    store: &dyn RouteStore,
    chunk: &[crate::store::PinRow],
    (from, targets): (&str, &[crate::hash::Weighted<'_>]),
    hold_until: i64,
    reach: &mut Reach,
    planned: &mut Vec<(UserName, String)>,
    report: &mut Evacuation,
) -> Result<(), StoreError> {
    let mut kicks = Vec::with_capacity(chunk.len());
    for row in chunk {
        let user = UserName::from_normalized(&row.user);
        let Some(to) = crate::hash::pick(user.as_str(), targets) else {
            return Err(StoreError::Invalid("no backend to evacuate to".into()));
        };
        let kick = reach
            .patiently(|| store.begin_move(&user, from, to, hold_until))
            .await?;
        kicks.push(kick);
        planned.push((user, to.to_owned()));
    }
    let acks = reach.acks(store, &kicks).await?;
    for (user, to) in planned.iter() {
        if acks.missing.is_empty() {
            reach.patiently(|| store.finish_move(user, to)).await?;
            report.moved.push((user.as_str().to_owned(), to.clone()));
        } else {
            // Rolled back: the pin stays, and logins may go there again at once.
            reach.patiently(|| store.abort_move(user)).await?;
            report.stalled.push(user.as_str().to_owned());
        }
    }
    Ok(())
}

/// The error of an evacuation the store stopped, saying what it left: who was moved,
/// and which users of the batch in flight may hold a move (logins refused until the
/// hold ends, then they are served by `from` again). Running it again finishes it.
fn stopped(
    e: StoreError,
    report: &Evacuation,
    planned: &[(UserName, String)],
    from: &str,
    hold_until: i64,
) -> StoreError {
    let StoreError::Unavailable(why) = e else {
        return e;
    };
    let finished: std::collections::HashSet<&str> =
        report.moved.iter().map(|(u, _)| u.as_str()).collect();
    let held: Vec<&str> = planned
        .iter()
        .map(|(u, _)| u.as_str())
        .filter(|u| !finished.contains(u) && !report.stalled.iter().any(|s| s == u))
        .collect();
    StoreError::Unavailable(format!(
        "{why}; evacuation stopped after {} user(s) moved; may hold a move until {hold_until} \
         (then back on {from}): {}; run the evacuation again to finish it",
        report.moved.len(),
        if held.is_empty() {
            "none".to_owned()
        } else {
            held.join(", ")
        }
    ))
}

/// An evacuation's view of the store, as a [`MovePlan`] has it for one move: store
/// calls are retried for `store_patience` (each is idempotent: a hold written again, a
/// Kick or Pin logged twice, change nothing), so a short outage (a Galera node dying
/// and the cluster re-forming without it) pauses the evacuation instead of leaving it
/// half done; and silent instances are presumed dead only once the store has answered
/// without a failure for `live_within`, since while it failed nobody could heartbeat.
struct Reach {
    options: FenceOptions,
    reachable_since: Instant,
}

impl Reach {
    fn new(options: FenceOptions) -> Self {
        Self {
            options,
            reachable_since: Instant::now(),
        }
    }

    async fn patiently<T, F, Fut>(&mut self, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let deadline = Instant::now() + self.options.store_patience;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(StoreError::Unavailable(e)) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "evacuation: route store failing; retrying");
                    self.reachable_since = Instant::now();
                    sleep(crate::fence::STORE_RETRY).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until every live instance has acknowledged every one of `kicks`, or
    /// `ack_timeout`.
    async fn acks(&mut self, store: &dyn RouteStore, kicks: &[i64]) -> Result<Acks, StoreError> {
        let deadline = Instant::now() + self.options.ack_timeout;
        loop {
            let (rows, acked) = self.patiently(|| confirmations(store, kicks)).await?;
            let presume_dead = self.reachable_since.elapsed() >= self.options.live_within;
            let acks = crate::fence::acks(
                &rows,
                &acked,
                now_secs(),
                self.options.live_within,
                presume_dead,
            );
            if acks.missing.is_empty() || Instant::now() >= deadline {
                return Ok(acks);
            }
            sleep(crate::fence::ACK_POLL).await;
        }
    }
}
