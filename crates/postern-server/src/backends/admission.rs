//! Admission control for one backend service, as a pure policy: requests, releases and
//! cancellations in, grants and refusals out, the clock passed in. No I/O and no
//! runtime, so thundering herds, full queues and deadlines are tested on a simulated
//! clock (below); `admit.rs` executes the decisions with a permit and a waiter queue.
//!
//! ```text
//!   request ─▶ in flight < cap ─────────────────────▶ Go (counted in flight)
//!         └──▶ queue < max_queue ─▶ Wait(ticket) ─┬─▶ granted by a release (FIFO)
//!         │                                       └─▶ gone at its deadline / cancelled
//!         └──▶ Full, or Late with no time left to wait (the temporary failure, at once)
//! ```
//!
//! A backend that answers slowly holds its logins longer, so fewer new ones start:
//! the cap turns a pile-up (every client reconnecting onto a struggling Dovecot,
//! each connection one more login process) into a queue that waits, in order, at most
//! until the session's pre-auth deadline.

use std::collections::VecDeque;
use std::time::Instant;

/// The cap and the queue of one backend service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connects and logins in flight at once; `0` turns admission control off.
    pub max_in_flight: u32,
    /// Logins waiting for a slot; beyond it they are refused at once.
    pub max_queue: u32,
}

impl Default for Limits {
    /// What one Dovecot in its default mode (a login process per connection,
    /// `default_process_limit = 100`) handles without refusing: 64 logins at once
    /// leave room for the health checks and a second Postern, and 256 waiting are
    /// four rounds of that, a few seconds' worth at normal login times.
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            max_queue: 256,
        }
    }
}

/// A waiting login, named so it can be granted or withdrawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// The answer to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead; the caller holds one slot until it releases it.
    Go,
    /// Wait for a release to grant this ticket, at most until the deadline given.
    Wait(Ticket),
    /// Cap reached and queue full: the temporary failure, now.
    Full,
    /// Cap reached and no time left to wait: the temporary failure, now.
    Late,
}

/// What a release did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// The waiters that now hold a slot each (one per release; more when a reload
    /// raised the cap).
    pub granted: Vec<Ticket>,
    /// Waiters found past their deadline: they get the temporary failure.
    pub expired: Vec<Ticket>,
}

/// Totals since start, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Requests that went ahead at once.
    pub admitted: u64,
    /// Requests that had to wait (granted later or not).
    pub queued: u64,
    /// Refused at once: the queue was full.
    pub refused_full: u64,
    /// Waited until their deadline without a slot.
    pub expired: u64,
}

#[derive(Clone, Copy, Debug)]
struct Waiter {
    ticket: Ticket,
    deadline: Instant,
}

/// One backend service's gate.
#[derive(Clone, Debug)]
pub struct Gate {
    limits: Limits,
    in_flight: u32,
    queue: VecDeque<Waiter>,
    next: u64,
    totals: Totals,
}

impl Gate {
    /// An idle gate.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            in_flight: 0,
            queue: VecDeque::new(),
            next: 0,
            totals: Totals::default(),
        }
    }

    /// New limits (a reload); slots in flight and waiters keep their place, and a
    /// larger cap is filled from the queue at once.
    pub fn set_limits(&mut self, limits: Limits, now: Instant) -> Released {
        self.limits = limits;
        self.fill(now)
    }

    fn has_room(&self) -> bool {
        self.limits.max_in_flight == 0 || self.in_flight < self.limits.max_in_flight
    }

    /// A login wants to connect; `deadline` is as long as it may wait.
    pub fn request(&mut self, now: Instant, deadline: Instant) -> Admit {
        // Waiters already past their deadline hold no place a newcomer should lose
        // (they are told when they wake, or withdraw by themselves).
        let before = self.queue.len();
        self.queue.retain(|w| w.deadline > now);
        self.totals.expired += (before - self.queue.len()) as u64;
        if self.queue.is_empty() && self.has_room() {
            self.in_flight = self.in_flight.saturating_add(1);
            self.totals.admitted += 1;
            return Admit::Go;
        }
        if self.queue.len() >= self.limits.max_queue as usize {
            self.totals.refused_full += 1;
            return Admit::Full;
        }
        if deadline <= now {
            self.totals.expired += 1;
            return Admit::Late;
        }
        let ticket = Ticket(self.next);
        self.next += 1;
        self.queue.push_back(Waiter { ticket, deadline });
        self.totals.queued += 1;
        Admit::Wait(ticket)
    }

    /// A slot holder is done (its login answered, failed or was abandoned): the slot
    /// passes to the first waiter still within its deadline.
    pub fn release(&mut self, now: Instant) -> Released {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.fill(now)
    }

    /// Grants free slots to waiters in order, skipping those past their deadline.
    fn fill(&mut self, now: Instant) -> Released {
        let mut out = Released::default();
        while self.has_room() {
            let Some(w) = self.queue.pop_front() else {
                break;
            };
            if w.deadline <= now {
                self.totals.expired += 1;
                out.expired.push(w.ticket);
                continue;
            }
            self.in_flight = self.in_flight.saturating_add(1);
            out.granted.push(w.ticket);
        }
        out
    }

    /// A waiter gives up (its deadline passed, its client left, it was sent
    /// elsewhere). Returns whether it was still waiting; if not, it was already
    /// granted a slot or expired, which the caller knows from what it was told.
    pub fn cancel(&mut self, ticket: Ticket, deadline_passed: bool) -> bool {
        let Some(i) = self.queue.iter().position(|w| w.ticket == ticket) else {
            return false;
        };
        self.queue.remove(i);
        if deadline_passed {
            self.totals.expired += 1;
        }
        true
    }

    /// Slots held now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Logins waiting now.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Totals since start.
    pub fn totals(&self) -> Totals {
        self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gate(max_in_flight: u32, max_queue: u32) -> Gate {
        Gate::new(Limits {
            max_in_flight,
            max_queue,
        })
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn a_thundering_herd_gets_the_cap_then_the_queue_then_refusals() {
        let t0 = Instant::now();
        let mut g = gate(64, 256);
        let answers: Vec<Admit> = (0..1000).map(|_| g.request(t0, secs(t0, 60))).collect();
        let go = answers.iter().filter(|a| **a == Admit::Go).count();
        let wait = answers
            .iter()
            .filter(|a| matches!(a, Admit::Wait(_)))
            .count();
        let full = answers.iter().filter(|a| **a == Admit::Full).count();
        assert_eq!((go, wait, full), (64, 256, 680));
        assert_eq!(g.in_flight(), 64);
        assert_eq!(g.queued(), 256);
        // Every completion lets exactly one waiter in, first come first served.
        let waiting: Vec<Ticket> = answers
            .iter()
            .filter_map(|a| match a {
                Admit::Wait(t) => Some(*t),
                _ => None,
            })
            .collect();
        for (i, want) in waiting.iter().enumerate() {
            let r = g.release(secs(t0, 1));
            assert_eq!(r.granted, vec![*want], "grant {i} out of order");
            assert!(r.expired.is_empty());
            assert_eq!(g.in_flight(), 64, "never more than the cap");
        }
        assert_eq!(g.queued(), 0);
        for _ in 0..64 {
            assert!(g.release(secs(t0, 2)).granted.is_empty());
        }
        assert_eq!(g.in_flight(), 0);
        let t = g.totals();
        assert_eq!((t.admitted, t.queued, t.refused_full), (64, 256, 680));
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_frees_as_waiters_leave() {
        let t0 = Instant::now();
        let mut g = gate(1, 2);
        assert_eq!(g.request(t0, secs(t0, 10)), Admit::Go);
        let Admit::Wait(a) = g.request(t0, secs(t0, 10)) else {
            panic!("queued")
        };
        assert!(matches!(g.request(t0, secs(t0, 10)), Admit::Wait(_)));
        assert_eq!(g.request(t0, secs(t0, 10)), Admit::Full);
        // One waiter's client goes away: its place is free for the next one.
        assert!(g.cancel(a, false));
        assert!(!g.cancel(a, false), "cancelled once");
        assert!(matches!(g.request(t0, secs(t0, 10)), Admit::Wait(_)));
        assert_eq!(g.request(t0, secs(t0, 10)), Admit::Full);
        assert_eq!(g.totals().refused_full, 2);
    }

    #[test]
    fn waiters_past_their_deadline_are_skipped_and_reported() {
        let t0 = Instant::now();
        let mut g = gate(1, 10);
        assert_eq!(g.request(t0, secs(t0, 60)), Admit::Go);
        let Admit::Wait(early) = g.request(t0, secs(t0, 5)) else {
            panic!()
        };
        let Admit::Wait(late) = g.request(t0, secs(t0, 60)) else {
            panic!()
        };
        // The holder takes 10 s (a slow backend): the first waiter's deadline passed.
        let r = g.release(secs(t0, 10));
        assert_eq!(r.expired, vec![early]);
        assert_eq!(r.granted, vec![late]);
        assert_eq!(g.in_flight(), 1);
        assert_eq!(g.totals().expired, 1);
        // A waiter that timed out by itself is counted when it withdraws.
        let Admit::Wait(t) = g.request(secs(t0, 11), secs(t0, 12)) else {
            panic!()
        };
        assert!(g.cancel(t, true));
        assert_eq!(g.totals().expired, 2);
        // A request with no time left is not queued.
        assert_eq!(g.request(secs(t0, 20), secs(t0, 20)), Admit::Late);
        assert_eq!(g.totals().expired, 3);
    }

    #[test]
    fn a_stuck_backend_never_admits_more_than_the_cap() {
        // Logins start on a frozen backend and none completes: the cap holds however
        // many try, and every waiter is gone by its deadline.
        let t0 = Instant::now();
        let mut g = gate(4, 8);
        let mut go = 0;
        for s in 0..100 {
            if g.request(secs(t0, s), secs(t0, s + 5)) == Admit::Go {
                go += 1;
            }
            assert!(g.in_flight() <= 4);
            assert!(g.queued() <= 8);
        }
        assert_eq!(go, 4);
        // The backend wakes up: each completion admits one waiter still in time.
        let r = g.release(secs(t0, 100));
        assert_eq!(r.granted.len(), 1);
        assert_eq!(g.in_flight(), 4);
    }

    #[test]
    fn release_on_completion_empties_the_gate() {
        let t0 = Instant::now();
        let mut g = gate(2, 2);
        assert_eq!(g.request(t0, secs(t0, 9)), Admit::Go);
        assert_eq!(g.request(t0, secs(t0, 9)), Admit::Go);
        assert!(g.release(t0).granted.is_empty());
        assert_eq!(g.request(t0, secs(t0, 9)), Admit::Go);
        assert_eq!(g.release(t0), Released::default());
        assert_eq!(g.release(t0), Released::default());
        assert_eq!(g.in_flight(), 0);
        // Without a cap everything goes, and nothing is counted in the queue.
        let mut off = gate(0, 0);
        for _ in 0..1000 {
            assert_eq!(off.request(t0, t0), Admit::Go);
        }
        assert_eq!(off.queued(), 0);
    }

    #[test]
    fn a_reload_raising_the_cap_lets_a_waiter_in_and_lowering_it_drains() {
        let t0 = Instant::now();
        let mut g = gate(1, 4);
        assert_eq!(g.request(t0, secs(t0, 9)), Admit::Go);
        let Admit::Wait(w) = g.request(t0, secs(t0, 9)) else {
            panic!()
        };
        let r = g.set_limits(
            Limits {
                max_in_flight: 2,
                max_queue: 4,
            },
            t0,
        );
        assert_eq!(r.granted, vec![w]);
        assert_eq!(g.in_flight(), 2);
        // Lowered to 1: releases retire slots until the cap holds again.
        g.set_limits(
            Limits {
                max_in_flight: 1,
                max_queue: 4,
            },
            t0,
        );
        let Admit::Wait(x) = g.request(t0, secs(t0, 9)) else {
            panic!()
        };
        assert!(g.release(t0).granted.is_empty(), "still over the new cap");
        assert_eq!(g.in_flight(), 1);
        assert_eq!(g.release(t0).granted, vec![x]);
        assert_eq!(g.in_flight(), 1);
    }
}
