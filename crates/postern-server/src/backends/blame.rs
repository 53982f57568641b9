//! Whose fault is a backend-login timeout? A pure judgement, the clock passed in, so
//! the rules are tested on a simulated clock (below); `health.rs` asks before counting
//! a login timeout against a backend.
//!
//! A login that times out on a backend that greets fine is waiting on something the
//! backend waits on: its password database (MariaDB behind Dovecot's passdb), the
//! route store, an auth server. When that shared dependency hangs, every backend of
//! the pool times out at once, and counting those timeouts would take the whole pool
//! down for a fault no failover can fix. So a login timeout is the backend's own
//! failure only when something says the others are fine:
//!
//! | what the other backends of the pool did while the login waited | verdict |
//! |---|---|
//! | one answered a login | the backend's own failure (it is the odd one out) |
//! | every one timed out too, or has a login stuck as long | shared: not counted |
//! | a route-store or auth failure was seen while it waited, or up to one login timeout before | shared: not counted |
//! | nothing (idle peers, or no peers) | the backend's own failure |
//!
//! A frozen backend still goes down: its health checks time out without any sign of
//! life, and those are not login timeouts.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The judgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Count it against the backend.
    Backend,
    /// Every backend shows it: a shared cause.
    EveryBackend,
    /// A shared dependency (route store, auth server) failed just before.
    Dependency,
}

impl Verdict {
    /// Whether the backend is to blame.
    pub fn is_backend(self) -> bool {
        self == Verdict::Backend
    }

    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Backend => "backend",
            Verdict::EveryBackend => "every_backend",
            Verdict::Dependency => "shared_dependency",
        }
    }
}

#[derive(Debug, Default)]
struct Service {
    last_answer: Option<Instant>,
    last_timeout: Option<Instant>,
    /// Logins in flight, by id, with when they started.
    in_flight: BTreeMap<u64, Instant>,
}

/// What is known of recent logins, per backend service.
#[derive(Debug)]
pub struct Blame<K> {
    /// The backend-login timeout: how long a login waits before it times out.
    login_timeout: Duration,
    services: HashMap<K, Service>,
    dependency_failed: Option<Instant>,
    next: u64,
}

impl<K: Hash + Eq + Clone> Blame<K> {
    /// `login_timeout` is the backend-login timeout in force.
    pub fn new(login_timeout: Duration) -> Self {
        Self {
            login_timeout,
            services: HashMap::new(),
            dependency_failed: None,
            next: 0,
        }
    }

    /// A login starts on `key` (connected, about to log in); returns its id.
    pub fn started(&mut self, key: &K, now: Instant) -> u64 {
        let id = self.next;
        self.next += 1;
        self.services
            .entry(key.clone())
            .or_default()
            .in_flight
            .insert(id, now);
        id
    }

    /// The login `id` on `key` ended; `answered` when the backend answered it (yes
    /// or no).
    pub fn ended(&mut self, key: &K, id: u64, answered: bool, now: Instant) {
        let s = self.services.entry(key.clone()).or_default();
        s.in_flight.remove(&id);
        if answered {
            s.last_answer = Some(now);
        }
    }

    /// The route store or an auth server failed (an error, a timeout): a login timing
    /// out around now may be waiting on the same thing.
    pub fn dependency_failed(&mut self, now: Instant) {
        self.dependency_failed = Some(now);
    }

    /// The login `id` on `key` timed out; `peers` are the other backend services of
    /// its pool. Records the timeout and judges it.
    pub fn timed_out(&mut self, key: &K, id: u64, peers: &[K], now: Instant) -> Verdict {
        let began = now.checked_sub(self.login_timeout).unwrap_or(now);
        {
            let s = self.services.entry(key.clone()).or_default();
            s.in_flight.remove(&id);
            s.last_timeout = Some(now);
        }
        // The failure may come just before the login (the lookup that routed it was
        // served stale) or while it waited: up to one timeout before it began.
        let dependency_since = began.checked_sub(self.login_timeout).unwrap_or(began);
        if self
            .dependency_failed
            .is_some_and(|at| at >= dependency_since)
        {
            return Verdict::Dependency;
        }
        let peers: Vec<&Service> = peers
            .iter()
            .filter(|p| *p != key)
            .filter_map(|p| self.services.get(p))
            .collect();
        let answered = peers
            .iter()
            .any(|s| s.last_answer.is_some_and(|at| at >= began));
        if answered {
            return Verdict::Backend;
        }
        // Stuck as long: a login started no later than half a timeout after this one
        // and still unanswered, or one that timed out within the window.
        let stuck_since = began + self.login_timeout / 2;
        let stuck = |s: &&Service| {
            s.last_timeout.is_some_and(|at| at >= began)
                || s.in_flight.values().any(|&at| at <= stuck_since)
        };
        if !peers.is_empty() && peers.iter().all(stuck) {
            return Verdict::EveryBackend;
        }
        Verdict::Backend
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOGIN: Duration = Duration::from_secs(30);

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_hung_password_database_times_out_every_backend_and_none_is_blamed() {
        let t0 = Instant::now();
        let mut b = Blame::new(LOGIN);
        let (b1, b2) = ("b1", "b2");
        // Both answered until MariaDB hung at t0.
        let a = b.started(&b1, ms(t0, 0));
        b.ended(&b1, a, true, ms(t0, 1));
        let a = b.started(&b2, ms(t0, 0));
        b.ended(&b2, a, true, ms(t0, 1));
        // Logins land on both during the hang; none is answered.
        let on_b1: Vec<u64> = (0..5).map(|i| b.started(&b1, ms(t0, 10 + i))).collect();
        let on_b2: Vec<u64> = (0..5).map(|i| b.started(&b2, ms(t0, 12 + i))).collect();
        // b1's all time out first, while b2's are still waiting: b2 is stuck as long.
        for (i, id) in on_b1.iter().enumerate() {
            let v = b.timed_out(&b1, *id, &[b2], ms(t0, 30_010 + i as u64));
            assert_eq!(v, Verdict::EveryBackend, "b1 timeout {i}");
        }
        for id in &on_b2 {
            assert_eq!(
                b.timed_out(&b2, *id, &[b1], ms(t0, 30_020)),
                Verdict::EveryBackend
            );
        }
    }

    #[test]
    fn a_backend_timing_out_while_its_peer_answers_is_to_blame() {
        let t0 = Instant::now();
        let mut b = Blame::new(LOGIN);
        let stuck = b.started(&"b1", t0);
        // b2 keeps answering logins meanwhile (and has some in flight).
        for s in 1..20 {
            let id = b.started(&"b2", ms(t0, s * 1000));
            b.ended(&"b2", id, true, ms(t0, s * 1000 + 50));
        }
        b.started(&"b2", ms(t0, 29_000));
        assert_eq!(
            b.timed_out(&"b1", stuck, &["b2"], ms(t0, 30_000)),
            Verdict::Backend
        );
    }

    #[test]
    fn with_idle_peers_or_none_a_timeout_is_the_backends() {
        let t0 = Instant::now();
        let mut b = Blame::new(LOGIN);
        let id = b.started(&"b1", t0);
        assert_eq!(
            b.timed_out(&"b1", id, &["b2"], ms(t0, 30_000)),
            Verdict::Backend,
            "b2 had no logins at all: nothing says the cause is shared"
        );
        let id = b.started(&"solo", t0);
        assert_eq!(
            b.timed_out(&"solo", id, &[], ms(t0, 30_000)),
            Verdict::Backend
        );
        // A peer whose logins started only just now is not stuck (yet).
        let id = b.started(&"b1", ms(t0, 40_000));
        b.started(&"b2", ms(t0, 69_000));
        assert_eq!(
            b.timed_out(&"b1", id, &["b2"], ms(t0, 70_000)),
            Verdict::Backend
        );
    }

    #[test]
    fn a_timeout_after_a_route_store_failure_is_the_dependencys() {
        let t0 = Instant::now();
        let mut b = Blame::new(LOGIN);
        let id = b.started(&"b1", t0);
        b.dependency_failed(ms(t0, 5_000));
        assert_eq!(
            b.timed_out(&"b1", id, &[], ms(t0, 30_000)),
            Verdict::Dependency
        );
        // The lookup that routed a login was served stale just before it started.
        b.dependency_failed(ms(t0, 40_000));
        let id = b.started(&"b1", ms(t0, 40_001));
        assert_eq!(
            b.timed_out(&"b1", id, &[], ms(t0, 70_001)),
            Verdict::Dependency
        );
        // Long after the failure, timeouts count again.
        let id = b.started(&"b1", ms(t0, 110_000));
        assert_eq!(
            b.timed_out(&"b1", id, &[], ms(t0, 140_000)),
            Verdict::Backend
        );
    }

    #[test]
    fn every_peer_must_show_it() {
        let t0 = Instant::now();
        let mut b = Blame::new(LOGIN);
        let id = b.started(&"b1", t0);
        b.started(&"b2", ms(t0, 100)); // stuck
        let quiet = b.started(&"b3", ms(t0, 100));
        b.ended(&"b3", quiet, false, ms(t0, 200)); // ended without an answer: not stuck
        assert_eq!(
            b.timed_out(&"b1", id, &["b2", "b3"], ms(t0, 30_000)),
            Verdict::Backend
        );
    }
}
