//! The move protocol as pure decisions: what a mover does next, and what an instance
//! does with the change log. No I/O and no clock of its own: the caller passes the
//! time in and executes the steps (`moves.rs` against a real store, the simulation in
//! `tests/simulation.rs` against a simulated one), so any interleaving of movers,
//! instances, reloads, crashes and store outages can be replayed deterministically.
//!
//! The invariant: at no instant does a user have live sessions on two backends.
//!
//! ```text
//!  mover                                   every instance (each watch tick)
//!  Begin: hold + moving_to + Kick ───────▶ applies the log in order: Kick → end the
//!                                          user's sessions; Pin → end them elsewhere;
//!                                          then reports its position (heartbeat)
//!  ReadInstances until every LIVE instance
//!  reports a position ≥ the Kick
//!    all confirmed ──▶ Finish (pin = to, hold cleared, Pin logged)      = Moved
//!    one missing at the deadline ──▶ Abort (hold cleared, pin stays)    = RolledBack
//!    the store fails past its patience ──▶ stop, say what is written    = Interrupted
//! ```
//! Logins of a user with a hold get a temporary failure, so no session starts on the
//! old backend after the Kick, and none on the new one before every live instance has
//! ended the old ones. An instance is live while its heartbeat is younger than
//! `live_within`; one that is older crashed (its sessions died with it) or was frozen,
//! and a frozen one catches up on the log before it serves again (`Follower`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::store::{ChangeEvent, ChangeKind, InstanceRow};

/// Timing of a fenced operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FenceOptions {
    /// How long new logins are held off while a move is in progress: a safety bound
    /// if the mover dies half way (a finished or rolled-back move clears it at once).
    pub hold: Duration,
    /// How long to wait for every live instance to confirm.
    pub ack_timeout: Duration,
    /// An instance whose heartbeat is older than this is considered gone: a few watch
    /// intervals, so a crashed instance stops blocking moves within seconds.
    pub live_within: Duration,
    /// How long the mover keeps retrying a store that fails before it stops and says
    /// what it left written.
    pub store_patience: Duration,
}

impl Default for FenceOptions {
    fn default() -> Self {
        Self {
            hold: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(15),
            live_within: Duration::from_secs(5),
            store_patience: Duration::from_secs(10),
        }
    }
}

/// How often the mover reads the instances while waiting for confirmations.
pub const ACK_POLL: Duration = Duration::from_millis(200);
/// How long the mover waits before retrying a failed store call.
pub const STORE_RETRY: Duration = Duration::from_millis(500);

/// Which instances confirmed a change-log entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acks {
    /// Live instances that applied it.
    pub confirmed: Vec<String>,
    /// Live instances that did not, within the timeout.
    pub missing: Vec<String>,
}

/// Sorts the instances into those that confirmed a kick (`acked`: the ids of the
/// instances that wrote an acknowledgement of it after ending its sessions) and live
/// ones that did not; with `presume_dead`, instances silent for longer than
/// `live_within` are left out (`now`: Unix seconds, the heartbeats' clock domain).
///
/// An acknowledgement names the kick, not a position in the log: entries can commit
/// out of id order, so an instance past a higher id may not have seen a kick that
/// committed late; only its own acknowledgement says it did.
///
/// Silence means death only if the store could take heartbeats all that time: right
/// after an outage of the store every instance looks silent, though each served its
/// cached users all along. So the caller presumes nobody dead before it has reached
/// the store without a failure for `live_within` (see [`MovePlan`]); by then every live
/// instance has heartbeat again.
pub fn acks(
    instances: &[InstanceRow],
    acked: &[String],
    now: i64,
    live_within: Duration,
    presume_dead: bool,
) -> Acks {
    let live_secs = i64::try_from(live_within.as_secs()).unwrap_or(i64::MAX);
    let mut acks = Acks::default();
    for i in instances {
        if presume_dead && i.heartbeat_at < now.saturating_sub(live_secs) {
            continue;
        }
        if acked.contains(&i.id) {
            acks.confirmed.push(i.id.clone());
        } else {
            acks.missing.push(i.id.clone());
        }
    }
    acks
}

/// What the mover must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write the hold and `moving_to`, and log a Kick; report its id with
    /// [`Input::Begun`].
    Begin {
        /// Unix seconds: when the hold ends if nobody finishes or aborts the move.
        hold_until: i64,
    },
    /// Read the instances and which of them acknowledged this kick; report them with
    /// [`Input::Instances`].
    ReadInstances {
        /// The kick's log id.
        kick: i64,
    },
    /// Switch the pin to the target, clear the hold, log a Pin; report [`Input::Written`].
    Finish,
    /// Clear the hold, keep the pin; report [`Input::Written`].
    Abort,
    /// Call again with [`Input::Woke`] at this instant.
    WaitUntil(Instant),
    /// The move is over.
    Done(Outcome),
}

/// What happened to the last step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The first call.
    Start,
    /// [`Step::Begin`] done: the Kick's log id; `None` if the store failed.
    Begun(Option<i64>),
    /// [`Step::ReadInstances`] done: the instances, the ids of those that acknowledged
    /// the kick, and the store's clock (Unix seconds); `None` if the store failed.
    Instances(Option<(Vec<InstanceRow>, Vec<String>, i64)>),
    /// [`Step::Finish`] or [`Step::Abort`] done; `false` if the store failed.
    Written(bool),
    /// A [`Step::WaitUntil`] is over.
    Woke,
}

/// Where an interrupted move stopped: exactly what is written in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Left {
    /// Nothing may have been written, or the hold may have been: the store failed on
    /// the first write, so either is possible.
    MaybeHeld,
    /// The hold and the Kick are written; the pin still points to the old backend.
    /// Logins are refused until the hold ends, when the old pin serves again.
    Held,
    /// Every live instance confirmed the Kick, but writing the new pin failed.
    Confirmed,
}

/// How a move ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The pin points to the new backend; these instances ended the old sessions.
    Moved(Acks),
    /// Some live instance did not confirm: the hold was cleared and the pin stays on
    /// the old backend (whose sessions were ended by those that did confirm).
    RolledBack(Acks),
    /// The store failed for longer than `store_patience`.
    Interrupted {
        /// What is written.
        left: Left,
        /// Unix seconds: when the hold ends by itself.
        hold_until: i64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Begin,
    Waiting { kick: i64 },
    Finishing,
    Aborting,
    Over,
}

/// One move, as a state machine; feed it [`Input`]s, execute its [`Step`]s.
#[derive(Clone, Debug)]
pub struct MovePlan {
    options: FenceOptions,
    force: bool,
    hold_until: i64,
    phase: Phase,
    /// When the wait for confirmations ends.
    ack_deadline: Option<Instant>,
    /// When the store has failed for too long: set at the first failure of a run of
    /// failures, cleared by a success.
    failing_since: Option<Instant>,
    /// Since when every store call succeeded (this plan's view): silent instances are
    /// presumed dead only once this is `live_within` old.
    reachable_since: Option<Instant>,
    acks: Acks,
}

impl MovePlan {
    /// A move that begins now (`now_secs`: Unix seconds, for the hold). With `force`,
    /// the pin is switched even if some live instance did not confirm.
    pub fn new(options: FenceOptions, force: bool, now_secs: i64) -> Self {
        let hold = i64::try_from(options.hold.as_secs()).unwrap_or(i64::MAX);
        Self {
            options,
            force,
            hold_until: now_secs.saturating_add(hold),
            phase: Phase::Begin,
            ack_deadline: None,
            failing_since: None,
            reachable_since: None,
            acks: Acks::default(),
        }
    }

    /// The next step, given what the last one gave.
    pub fn next(&mut self, now: Instant, input: Input) -> Step {
        match (self.phase, input) {
            (Phase::Over, _) => Step::Done(self.interrupted(Left::Held)),
            (Phase::Begin, Input::Start | Input::Woke) => Step::Begin {
                hold_until: self.hold_until,
            },
            (Phase::Begin, Input::Begun(Some(kick))) => {
                self.failing_since = None;
                self.reachable_since.get_or_insert(now);
                self.phase = Phase::Waiting { kick };
                self.ack_deadline = Some(now + self.options.ack_timeout);
                Step::ReadInstances { kick }
            }
            (Phase::Begin, Input::Begun(None)) => self.store_failed(now, Left::MaybeHeld),
            (Phase::Waiting { kick }, Input::Woke) => Step::ReadInstances { kick },
            (Phase::Waiting { .. }, Input::Instances(Some((rows, acked, store_now)))) => {
                self.failing_since = None;
                let since = *self.reachable_since.get_or_insert(now);
                let presume_dead = now.saturating_duration_since(since) >= self.options.live_within;
                self.acks = acks(
                    &rows,
                    &acked,
                    store_now,
                    self.options.live_within,
                    presume_dead,
                );
                let timed_out = self.ack_deadline.is_some_and(|d| now >= d);
                if self.acks.missing.is_empty() || (timed_out && self.force) {
                    self.phase = Phase::Finishing;
                    Step::Finish
                } else if timed_out {
                    self.phase = Phase::Aborting;
                    Step::Abort
                } else {
                    Step::WaitUntil(now + ACK_POLL)
                }
            }
            (Phase::Waiting { .. }, Input::Instances(None)) => self.store_failed(now, Left::Held),
            (Phase::Finishing, Input::Written(true)) => {
                self.phase = Phase::Over;
                Step::Done(Outcome::Moved(std::mem::take(&mut self.acks)))
            }
            (Phase::Finishing, Input::Written(false)) => self.store_failed(now, Left::Confirmed),
            (Phase::Finishing, Input::Woke) => Step::Finish,
            (Phase::Aborting, Input::Written(true)) => {
                self.phase = Phase::Over;
                Step::Done(Outcome::RolledBack(std::mem::take(&mut self.acks)))
            }
            (Phase::Aborting, Input::Written(false)) => self.store_failed(now, Left::Held),
            (Phase::Aborting, Input::Woke) => Step::Abort,
            // An input that does not answer the last step is a caller's bug; repeat
            // the step the phase is in rather than guess.
            (Phase::Begin, _) => Step::Begin {
                hold_until: self.hold_until,
            },
            (Phase::Waiting { kick }, _) => Step::ReadInstances { kick },
            (Phase::Finishing, _) => Step::Finish,
            (Phase::Aborting, _) => Step::Abort,
        }
    }

    fn store_failed(&mut self, now: Instant, left: Left) -> Step {
        self.reachable_since = None;
        let since = *self.failing_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.options.store_patience {
            self.phase = Phase::Over;
            return Step::Done(self.interrupted(left));
        }
        Step::WaitUntil(now + STORE_RETRY)
    }

    fn interrupted(&self, left: Left) -> Outcome {
        Outcome::Interrupted {
            left,
            hold_until: self.hold_until,
        }
    }
}

/// What an instance must do for one change-log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Forget the user's cached route.
    Forget(String),
    /// End every session of the user (a kick, or the first half of a move).
    EndSessions(String),
    /// End the user's sessions on every backend but this one (the pin moved there).
    EndSessionsElsewhere(String, String),
    /// Acknowledge this kick (its log id) to the movers, once the effects before it
    /// are executed.
    Confirm(i64),
}

/// How far behind its position a follower looks again, in log ids: entries are
/// numbered when written but become visible when committed, so two concurrent writers
/// (two instances, two Galera nodes) can commit out of id order, and an entry with a
/// lower id can appear after a higher one was read.
pub const LATE_WINDOW: i64 = 256;

/// How long after the position last advanced a follower keeps looking behind it: a
/// late entry belongs to a transaction that was open when a higher one committed, and
/// the store's writes give up within seconds. A quiet log costs no second read.
pub const LATE_FOR: Duration = Duration::from_secs(30);

/// An instance's side of the protocol: its position in the change log. It lives as
/// long as the process, across reloads, so a Kick written just before a reload is
/// applied and the position reported is only ever one reached.
#[derive(Clone, Debug, Default)]
pub struct Follower {
    /// The highest entry applied; `None` until the first read of the log.
    last: Option<i64>,
    /// Entries at or below this were written before the process started: they concern
    /// neither its (empty) cache nor its (absent) sessions.
    floor: Option<i64>,
    /// Entries applied within [`LATE_WINDOW`] of `last`: a late one is applied once.
    recent: std::collections::BTreeSet<i64>,
    /// When `last` last moved forward.
    advanced_at: Option<Instant>,
}

impl Follower {
    /// A process's follower, before its first read of the log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The position to read from: `None` means "from the log's end" (a process that
    /// just started has neither cached routes nor sessions to correct).
    pub fn position(&self) -> Option<i64> {
        self.last
    }

    /// Sets the starting position, once, from the log's end.
    pub fn start_at(&mut self, id: i64) {
        if self.last.is_none() {
            self.last = Some(id);
            self.floor = Some(id);
        }
    }

    /// Where to look again for entries that committed late: read the entries after
    /// this id (up to [`LATE_WINDOW`] of them) and pass them to [`Follower::apply`],
    /// which skips those already applied. `None` when there is nothing behind, or the
    /// position has not moved for [`LATE_FOR`].
    pub fn late_from(&self, now: Instant) -> Option<i64> {
        let last = self.last?;
        let recently = self
            .advanced_at
            .is_some_and(|t| now.saturating_duration_since(t) < LATE_FOR);
        if !recently {
            return None;
        }
        let from = last
            .saturating_sub(LATE_WINDOW)
            .max(self.floor.unwrap_or(i64::MIN));
        (from < last).then_some(from)
    }

    /// The effects of a batch of entries, in log order; each entry is applied once,
    /// a late one too, and the position advances (never backwards). The caller
    /// executes every effect before it reports the position, which is what a mover
    /// takes as this instance's confirmation.
    pub fn apply(&mut self, events: &[ChangeEvent], now: Instant) -> Vec<Effect> {
        let mut effects = Vec::with_capacity(events.len() * 2);
        for e in events {
            let before_start = self.floor.is_some_and(|f| e.id <= f);
            let too_old = self
                .last
                .is_some_and(|l| e.id <= l.saturating_sub(LATE_WINDOW));
            if before_start || too_old || !self.recent.insert(e.id) {
                continue;
            }
            effects.push(Effect::Forget(e.user.clone()));
            match (e.kind, &e.backend) {
                (ChangeKind::Kick, _) => {
                    effects.push(Effect::EndSessions(e.user.clone()));
                    effects.push(Effect::Confirm(e.id));
                }
                (ChangeKind::Pin, Some(pin)) => {
                    effects.push(Effect::EndSessionsElsewhere(e.user.clone(), pin.clone()));
                }
                (ChangeKind::Pin, None) => {}
            }
            if self.last.is_none_or(|l| e.id > l) {
                self.last = Some(e.id);
                self.advanced_at = Some(now);
            }
        }
        if let Some(last) = self.last {
            let keep_from = last.saturating_sub(LATE_WINDOW);
            self.recent = self.recent.split_off(&keep_from);
        }
        effects
    }
}

/// Whether this process may serve logins, as far as the move protocol goes.
///
/// A process that stood still for about `live_within` (SIGSTOP, a paused VM, a starved
/// runtime) may have been presumed dead by a mover, which then moved its users away
/// without its confirmation. So a stamper that runs every fraction of a second, and
/// needs nothing but the clock, notes when its own stamps were too far apart and puts
/// the process in catch-up; and a login that finds the last stamp too old (it ran
/// before the stamper woke up) is refused too. Catch-up ends when the change log has
/// been read to its end by a read that began after it started. A store that merely
/// fails does not stop the stamps: then no mover can write a move through it either.
///
/// A process is born catching up: until its first heartbeat is written, movers do not
/// know it exists and would not wait for it, so it must not serve anyone yet.
///
/// Lock-free, clock passed in: logins call [`Gate::serving`] on every attempt.
#[derive(Debug)]
pub struct Gate {
    origin: Instant,
    /// Stamps this far apart mean the process stood still.
    limit_ms: u64,
    /// The last stamp, in ms since `origin`.
    stamp_ms: AtomicU64,
    /// Catch-up generation: odd while catching up. A read of the log that began in
    /// generation `g` (odd) ends catch-up only if no new one began meanwhile.
    catch_up: AtomicU64,
}

/// How often the runtime calls [`Gate::stamp`].
pub const STAMP_EVERY: Duration = Duration::from_millis(250);

impl Gate {
    /// A gate that treats stamps `live_within * 3/5` apart as standing still (the rest
    /// of `live_within` is margin for the store's clock and the heartbeat's delay).
    pub fn new(origin: Instant, live_within: Duration) -> Self {
        let limit = (live_within * 3 / 5).max(STAMP_EVERY * 4);
        Self {
            origin,
            limit_ms: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            stamp_ms: AtomicU64::new(0),
            catch_up: AtomicU64::new(1),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    /// The stamper's tick. Returns `true` when it just found a gap and began catch-up.
    pub fn stamp(&self, now: Instant) -> bool {
        let now_ms = self.ms(now);
        let last = self.stamp_ms.load(Ordering::SeqCst);
        let stood_still = last != 0 && now_ms.saturating_sub(last) >= self.limit_ms;
        let mut began = false;
        if stood_still {
            // Catch-up first, then the fresh stamp: a login that sees the new stamp
            // also sees the catch-up (sequentially consistent order).
            // Already catching up: a new generation all the same (odd to odd), so a
            // read that began before this gap cannot end it.
            let g = self.catch_up.load(Ordering::SeqCst);
            let next = if g.is_multiple_of(2) { g + 1 } else { g + 2 };
            began = self
                .catch_up
                .compare_exchange(g, next, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
                && g.is_multiple_of(2);
        }
        self.stamp_ms.store(now_ms.max(1), Ordering::SeqCst);
        began
    }

    /// Whether a login may be served now.
    pub fn serving(&self, now: Instant) -> bool {
        let last = self.stamp_ms.load(Ordering::SeqCst);
        let fresh = last == 0 || self.ms(now).saturating_sub(last) < self.limit_ms;
        fresh && self.catch_up.load(Ordering::SeqCst).is_multiple_of(2)
    }

    /// Taken when a read of the change log begins; pass it to [`Gate::caught_up`]
    /// once that read reached the log's end and its heartbeat was written.
    pub fn read_began(&self) -> u64 {
        self.catch_up.load(Ordering::SeqCst)
    }

    /// Ends catch-up if it began before the read that `ticket` marks. Returns `true`
    /// if it ended now.
    pub fn caught_up(&self, ticket: u64) -> bool {
        ticket % 2 == 1
            && self
                .catch_up
                .compare_exchange(ticket, ticket + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, heartbeat_at: i64, last_event_id: i64) -> InstanceRow {
        InstanceRow {
            id: id.into(),
            heartbeat_at,
            last_event_id,
        }
    }

    /// What the store answers: instances past the kick (7 in these tests) have
    /// acknowledged it.
    fn seen(rows: Vec<InstanceRow>, now: i64) -> (Vec<InstanceRow>, Vec<String>, i64) {
        let acked = rows
            .iter()
            .filter(|r| r.last_event_id >= 7)
            .map(|r| r.id.clone())
            .collect();
        (rows, acked, now)
    }

    fn opts() -> FenceOptions {
        FenceOptions::default()
    }

    #[test]
    fn a_move_that_every_live_instance_confirms_finishes() {
        let t = Instant::now();
        let mut plan = MovePlan::new(opts(), false, 1000);
        assert_eq!(plan.next(t, Input::Start), Step::Begin { hold_until: 1030 });
        assert_eq!(
            plan.next(t, Input::Begun(Some(7))),
            Step::ReadInstances { kick: 7 }
        );
        // b has not applied 7 yet; c is dead (silent for 100 s) and is not waited for.
        let rows = vec![row("a", 1000, 7), row("b", 1000, 6), row("c", 900, 1)];
        assert!(matches!(
            plan.next(t, Input::Instances(Some(seen(rows, 1000)))),
            Step::WaitUntil(_)
        ));
        assert_eq!(plan.next(t, Input::Woke), Step::ReadInstances { kick: 7 });
        // c is presumed dead only once the store has answered for live_within.
        let rows = vec![row("a", 1001, 7), row("b", 1001, 8), row("c", 900, 1)];
        assert!(matches!(
            plan.next(t, Input::Instances(Some(seen(rows.clone(), 1001)))),
            Step::WaitUntil(_)
        ));
        assert_eq!(
            plan.next(
                t + opts().live_within,
                Input::Instances(Some(seen(rows, 1005)))
            ),
            Step::Finish
        );
        let Step::Done(Outcome::Moved(acks)) = plan.next(t, Input::Written(true)) else {
            panic!("not moved")
        };
        assert_eq!(acks.confirmed, ["a", "b"]);
    }

    #[test]
    fn right_after_a_store_outage_silent_instances_are_not_presumed_dead() {
        let t = Instant::now();
        let mut plan = MovePlan::new(opts(), false, 1000);
        plan.next(t, Input::Start);
        // The store failed once; nobody could heartbeat meanwhile.
        assert!(matches!(
            plan.next(t, Input::Begun(None)),
            Step::WaitUntil(_)
        ));
        assert!(matches!(plan.next(t, Input::Woke), Step::Begin { .. }));
        plan.next(t, Input::Begun(Some(7)));
        let rows = vec![row("a", 970, 6), row("b", 969, 6)];
        assert!(matches!(
            plan.next(t, Input::Instances(Some(seen(rows, 1000)))),
            Step::WaitUntil(_)
        ));
        // a heartbeats again; once the store answered for live_within, b (crashed
        // during the outage) is presumed dead.
        let later = t + opts().live_within;
        let rows = vec![row("a", 1005, 7), row("b", 969, 6)];
        assert_eq!(
            plan.next(later, Input::Instances(Some(seen(rows, 1005)))),
            Step::Finish
        );
    }

    #[test]
    fn a_live_instance_that_never_confirms_rolls_the_move_back() {
        let t = Instant::now();
        let mut plan = MovePlan::new(opts(), false, 1000);
        plan.next(t, Input::Start);
        plan.next(t, Input::Begun(Some(7)));
        let late = t + opts().ack_timeout;
        let rows = vec![row("a", 1015, 7), row("b", 1015, 6)];
        assert_eq!(
            plan.next(late, Input::Instances(Some(seen(rows, 1015)))),
            Step::Abort
        );
        let Step::Done(Outcome::RolledBack(acks)) = plan.next(late, Input::Written(true)) else {
            panic!("not rolled back")
        };
        assert_eq!(acks.missing, ["b"]);
    }

    #[test]
    fn force_switches_the_pin_without_every_confirmation() {
        let t = Instant::now();
        let mut plan = MovePlan::new(opts(), true, 1000);
        plan.next(t, Input::Start);
        plan.next(t, Input::Begun(Some(7)));
        let late = t + opts().ack_timeout;
        let rows = vec![row("b", 1015, 6)];
        assert_eq!(
            plan.next(late, Input::Instances(Some(seen(rows, 1015)))),
            Step::Finish
        );
    }

    #[test]
    fn a_store_outage_is_retried_then_reported_with_what_is_written() {
        let t = Instant::now();
        let mut plan = MovePlan::new(opts(), false, 1000);
        plan.next(t, Input::Start);
        plan.next(t, Input::Begun(Some(7)));
        let rows = vec![row("a", 1000, 7)];
        assert_eq!(
            plan.next(t, Input::Instances(Some(seen(rows, 1000)))),
            Step::Finish
        );
        // The store goes away between the confirmations and the new pin.
        let mut now = t;
        let mut step = plan.next(now, Input::Written(false));
        let mut retries = 0;
        while let Step::WaitUntil(at) = step {
            now = at;
            assert_eq!(plan.next(now, Input::Woke), Step::Finish);
            step = plan.next(now, Input::Written(false));
            retries += 1;
            assert!(retries < 1000, "never gave up");
        }
        assert_eq!(
            step,
            Step::Done(Outcome::Interrupted {
                left: Left::Confirmed,
                hold_until: 1030
            })
        );
        assert!(now.duration_since(t) >= opts().store_patience);
    }

    #[test]
    fn a_failed_first_write_may_or_may_not_have_held_the_user() {
        let t = Instant::now();
        let options = FenceOptions {
            store_patience: Duration::ZERO,
            ..opts()
        };
        let mut plan = MovePlan::new(options, false, 1000);
        plan.next(t, Input::Start);
        assert_eq!(
            plan.next(t, Input::Begun(None)),
            Step::Done(Outcome::Interrupted {
                left: Left::MaybeHeld,
                hold_until: 1030
            })
        );
    }

    fn event(id: i64, user: &str, kind: ChangeKind, backend: Option<&str>) -> ChangeEvent {
        ChangeEvent {
            id,
            user: user.into(),
            kind,
            backend: backend.map(str::to_owned),
        }
    }

    #[test]
    fn the_follower_applies_each_entry_once_in_order() {
        let t = Instant::now();
        let mut f = Follower::new();
        f.start_at(5);
        f.start_at(1); // only the first start counts (a reload resumes)
        let events = [
            event(5, "old", ChangeKind::Kick, None),
            event(6, "u", ChangeKind::Kick, None),
            event(7, "u", ChangeKind::Pin, Some("b2")),
        ];
        assert_eq!(
            f.apply(&events, t),
            [
                Effect::Forget("u".into()),
                Effect::EndSessions("u".into()),
                Effect::Confirm(6),
                Effect::Forget("u".into()),
                Effect::EndSessionsElsewhere("u".into(), "b2".into()),
            ]
        );
        assert_eq!(f.position(), Some(7));
        assert!(f.apply(&events, t).is_empty(), "applied twice");
    }

    #[test]
    fn an_entry_that_commits_late_is_applied_once() {
        let t = Instant::now();
        let mut f = Follower::new();
        f.start_at(100);
        // 102 committed before 101: the read after 100 sees 102 only.
        let effects = f.apply(&[event(102, "b", ChangeKind::Kick, None)], t);
        assert_eq!(effects.len(), 3);
        assert_eq!(f.position(), Some(102));
        // The next tick looks behind its position and finds 101.
        assert_eq!(f.late_from(t), Some(100));
        let window = [
            event(101, "a", ChangeKind::Kick, None),
            event(102, "b", ChangeKind::Kick, None),
        ];
        assert_eq!(
            f.apply(&window, t),
            [
                Effect::Forget("a".into()),
                Effect::EndSessions("a".into()),
                Effect::Confirm(101)
            ]
        );
        assert!(f.apply(&window, t).is_empty(), "a late entry applied twice");
        // A log quiet for LATE_FOR is not read twice.
        assert_eq!(f.late_from(t + LATE_FOR), None);
        assert_eq!(f.position(), Some(102));
        // Entries from before the process started are never applied.
        assert!(
            f.apply(&[event(99, "old", ChangeKind::Kick, None)], t)
                .is_empty()
        );
    }

    #[test]
    fn a_process_that_stood_still_serves_again_only_after_reading_the_log() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let gate = Gate::new(t, Duration::from_secs(5)); // standing still: 3 s
        // Born catching up: nobody is served before the first heartbeat.
        assert!(!gate.serving(t));
        assert!(gate.caught_up(gate.read_began()));
        assert!(gate.serving(t));
        // Stamps every 250 ms; the store may be down meanwhile: still serving.
        for i in 1..=40 {
            assert!(!gate.stamp(at(i * 250)));
            assert!(gate.serving(at(i * 250 + 100)));
        }
        // Frozen for 4 s: a login that runs before the stamper is refused...
        assert!(!gate.serving(at(14_000)));
        // ...and once the stamper ran, catch-up holds logins off.
        let before_wake = gate.read_began();
        assert!(gate.stamp(at(14_000)));
        assert!(!gate.serving(at(14_001)));
        assert!(!gate.stamp(at(14_250)), "began once");
        // A read that began before the wake-up does not count.
        assert!(!gate.caught_up(before_wake));
        assert!(!gate.serving(at(14_300)));
        let ticket = gate.read_began();
        assert!(gate.caught_up(ticket));
        assert!(gate.serving(at(14_400)));
        // A second freeze during a catch-up read: that read no longer ends it.
        assert!(gate.stamp(at(20_000)));
        let ticket = gate.read_began();
        assert!(!gate.stamp(at(30_000)), "still the same catch-up");
        assert!(!gate.caught_up(ticket));
        assert!(!gate.serving(at(30_001)));
        assert!(gate.caught_up(gate.read_began()));
        assert!(gate.serving(at(30_002)));
    }
}
