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
//!
//! Health checks that log in (`probe_user`) wait on the same password database, so
//! the same question is asked of them ([`Blame::probe_stalled`]): a check that got
//! the greeting and then stalled in the login step (no answer in time, or the
//! backend's temporary failure as the answer, which is what Dovecot says when its
//! password database is down) is compared with the other backends' checks of
//! the last two check periods, and at least 10 s (the probe window).
//!
//! | what the other backends' checks did within the probe window | verdict |
//! |---|---|
//! | every one had a check stalled in the login step too | shared: not counted |
//! | (a route-store or auth failure was seen within the window) | shared: not counted |
//! | one had no stalled check (it passed, or failed otherwise) | the backend's own failure |
//! | there is no other backend in the pool | the backend's own failure |
//!
//! The window, not only each peer's latest check, so that the tail of a shared outage
//! is not blamed either: when the database answers again the backends work through
//! their backlogs one after the other, and the last one to recover stalls a check or
//! two more while the first already passes. A backend still stalling a window after
//! every other one stopped is on its own.
//!
//! A lone backend still counts: nothing tells its own stuck login path (a Dovecot
//! auth process wedged, its own passdb) from a shared one, and excusing it on no
//! evidence would keep a backend up that nobody can log in to. The cost is bounded:
//! its DOWN ends no session, logins get the temporary failure at once instead of
//! after the login timeout (they could not be served anyway), and the first check
//! that passes again starts its way back up.

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
    /// When a health check that logs in last stalled in the login step.
    last_stall: Option<Instant>,
}

/// What is known of recent logins, per backend service.
#[derive(Debug)]
pub struct Blame<K> {
    /// The backend-login timeout: how long a login waits before it times out.
    login_timeout: Duration,
    /// How long a health check's outcome stands for its backend: a peer checked
    /// longer ago than this says nothing about now.
    probe_window: Duration,
    services: HashMap<K, Service>,
    dependency_failed: Option<Instant>,
    next: u64,
}

impl<K: Hash + Eq + Clone> Blame<K> {
    /// `login_timeout` is the backend-login timeout in force; `probe_window` how long
    /// a health check's outcome stands (two check periods: interval plus timeout).
    pub fn new(login_timeout: Duration, probe_window: Duration) -> Self {
        Self {
            login_timeout,
            probe_window,
            services: HashMap::new(),
            dependency_failed: None,
            next: 0,
        }
    }

    /// A reload changed the timeouts: what is recorded stays.
    pub fn retime(&mut self, login_timeout: Duration, probe_window: Duration) {
        self.login_timeout = login_timeout;
        self.probe_window = probe_window;
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

    /// A health check of `key` got the greeting, then stalled in the login step (timed
    /// out, or was answered with a temporary failure);
    /// `peers` are the other backend services of its pool. Records it and judges it
    /// (the table at the top).
    pub fn probe_stalled(&mut self, key: &K, peers: &[K], now: Instant) -> Verdict {
        self.services.entry(key.clone()).or_default().last_stall = Some(now);
        let since = now.checked_sub(self.probe_window).unwrap_or(now);
        if self.dependency_failed.is_some_and(|at| at >= since) {
            return Verdict::Dependency;
        }
        let mut peers = peers.iter().filter(|p| *p != key).peekable();
        if peers.peek().is_none() {
            return Verdict::Backend;
        }
        let stalled_lately = |p: &K| {
            self.services
                .get(p)
                .and_then(|s| s.last_stall)
                .is_some_and(|at| at >= since)
        };
        if peers.all(stalled_lately) {
            Verdict::EveryBackend
        } else {
            Verdict::Backend
        }
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
    const PROBES: Duration = Duration::from_secs(8);

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_hung_password_database_times_out_every_backend_and_none_is_blamed() {
        let t0 = Instant::now();
        let mut b = Blame::new(LOGIN, PROBES);
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
        let mut b = Blame::new(LOGIN, PROBES);
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
        let mut b = Blame::new(LOGIN, PROBES);
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
        let mut b = Blame::new(LOGIN, PROBES);
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
        let mut b = Blame::new(LOGIN, PROBES);
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

/// Health checks that log in (`probe_user`), on a simulated clock, fed to the health
/// state as `health.rs` feeds them: counted when the verdict is the backend's,
/// excused otherwise.
#[cfg(test)]
mod probes {
    use std::time::SystemTime;

    use super::*;
    use crate::backends::service_health::{FailureKind, Seen, ServiceHealth, Thresholds};

    // The defaults of `[health]`: a check every 2 s bounded by 2 s, rise and fall 2;
    // health.rs derives the evidence window (fall × interval + timeout) and the
    // probe window (2 × (interval + timeout)) the same way.
    const T: Thresholds = Thresholds {
        rise: 2,
        fall: 2,
        startup_grace: Duration::ZERO,
        evidence_window: Duration::from_secs(6),
        half_open_after: None,
    };
    const PROBES: Duration = Duration::from_secs(8);
    const LOGIN: Duration = Duration::from_secs(30);

    struct Pool {
        blame: Blame<&'static str>,
        health: HashMap<&'static str, ServiceHealth>,
        names: Vec<&'static str>,
        t0: Instant,
        counted: usize,
        excused: usize,
    }

    impl Pool {
        fn new(names: &[&'static str]) -> Self {
            let t0 = Instant::now();
            let health = names
                .iter()
                .map(|n| (*n, ServiceHealth::new(t0, SystemTime::now())))
                .collect();
            Self {
                blame: Blame::new(LOGIN, PROBES),
                health,
                names: names.to_vec(),
                t0,
                counted: 0,
                excused: 0,
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        fn passed(&mut self, b: &'static str, ms: u64) {
            let now = self.at(ms);
            if let Some(h) = self.health.get_mut(b) {
                h.success(&T, now, SystemTime::now());
            }
        }

        /// A check of `b` stalled in the login step at `ms`; returns the verdict.
        fn stalled(&mut self, b: &'static str, ms: u64) -> Verdict {
            let now = self.at(ms);
            let verdict = self.blame.probe_stalled(&b, &self.names, now);
            let h = self.health.get_mut(b).expect("configured");
            let message = "probe login stalled".to_string();
            if verdict.is_backend() {
                self.counted += 1;
                h.failure(&T, FailureKind::Timeout, message, now, SystemTime::now());
            } else {
                self.excused += 1;
                h.excused(message, now, SystemTime::now());
            }
            verdict
        }

        fn seen(&self, b: &str) -> Seen {
            self.health
                .get(b)
                .map(ServiceHealth::seen)
                .expect("configured")
        }
    }

    #[test]
    fn checks_stalled_on_every_backend_take_none_down_and_recover() {
        let mut p = Pool::new(&["b1", "b2", "b3"]);
        // Every check passes for 10 s; b2 and b3 beat out of step with b1.
        for round in 0..3u64 {
            for (i, b) in ["b1", "b2", "b3"].into_iter().enumerate() {
                p.passed(b, round * 4_000 + i as u64 * 700);
            }
        }
        // The password database hangs at 10 s: from then on every check gets the
        // greeting and times out 2 s into its login step, for five minutes.
        for round in 0..75u64 {
            for (i, b) in ["b1", "b2", "b3"].into_iter().enumerate() {
                let v = p.stalled(b, 12_000 + round * 4_000 + i as u64 * 700);
                if round > 0 {
                    assert_eq!(v, Verdict::EveryBackend, "round {round}, {b}");
                }
            }
        }
        for b in ["b1", "b2", "b3"] {
            assert_eq!(p.seen(b), Seen::Up, "{b} was taken down by a shared outage");
            assert!(p.health[b].degraded(&T, p.at(12_000 + 74 * 4_000 + 2_000)));
        }
        // Only the first checks of the outage could compare with peers still passing:
        // counted, and forgiven as slowness (a success moments before).
        assert!(p.counted <= 3, "counted {}", p.counted);
        assert_eq!(p.counted + p.excused, 225);
        // The database answers again at `back`: b2 and b3 pass at once, b1 works
        // through its backlog and stalls once more: the outage's tail, still excused.
        let back = 12_000 + 75 * 4_000;
        p.passed("b2", back);
        p.passed("b3", back + 100);
        assert_eq!(p.stalled("b1", back + 500), Verdict::EveryBackend);
        p.passed("b1", back + 4_000);
        assert_eq!(p.seen("b1"), Seen::Up);
        // A window after the others last stalled, b1 stalling alone is on its own.
        for round in 2..5u64 {
            p.passed("b2", back + round * 4_000);
            p.passed("b3", back + round * 4_000 + 100);
            assert_eq!(
                p.stalled("b1", back + round * 4_000 + 500),
                Verdict::Backend
            );
        }
        assert_eq!(p.seen("b1"), Seen::Down);
    }

    #[test]
    fn a_check_stalled_while_the_others_pass_counts_and_takes_it_down() {
        let mut p = Pool::new(&["b1", "b2"]);
        p.passed("b1", 0);
        p.passed("b2", 500);
        // b1's own login path is stuck (its auth process wedged); b2 is fine.
        let mut down_at = None;
        for round in 1..10u64 {
            p.passed("b2", round * 4_000 + 500);
            assert_eq!(p.stalled("b1", round * 4_000), Verdict::Backend);
            if p.seen("b1") == Seen::Down && down_at.is_none() {
                down_at = Some(round);
            }
        }
        // Forgiven as slowness within the evidence window, then `fall` counted ones.
        assert_eq!(down_at, Some(3));
        assert_eq!(p.seen("b2"), Seen::Up);
    }

    #[test]
    fn a_lone_backend_has_nobody_to_compare_with_and_counts() {
        let mut p = Pool::new(&["solo"]);
        p.passed("solo", 0);
        for round in 1..5u64 {
            assert_eq!(p.stalled("solo", round * 4_000), Verdict::Backend);
        }
        assert_eq!(p.seen("solo"), Seen::Down);
        // It recovers through its checks as soon as the database answers.
        p.passed("solo", 20_000);
        p.passed("solo", 24_000);
        assert_eq!(p.seen("solo"), Seen::Up);
    }

    #[test]
    fn only_a_recent_stall_on_every_peer_excuses() {
        let mut p = Pool::new(&["b1", "b2", "b3"]);
        // b2 stalled long ago (beyond the window).
        p.stalled("b2", 0);
        p.stalled("b3", 5_000);
        assert_eq!(
            p.stalled("b1", 9_000),
            Verdict::Backend,
            "b2's stall is stale"
        );
        // Every peer stalled within the window: shared.
        p.stalled("b2", 10_000);
        assert_eq!(p.stalled("b1", 11_000), Verdict::EveryBackend);
        assert_eq!(p.stalled("b1", 13_000), Verdict::EveryBackend);
        // Once b3's stall is out of the window, two of three are not every one.
        assert_eq!(
            p.stalled("b1", 14_000),
            Verdict::Backend,
            "b3's stall is stale"
        );
        // A route-store or auth failure just seen: a shared dependency, even alone.
        let mut solo = Pool::new(&["solo"]);
        solo.blame.dependency_failed(solo.at(1_000));
        assert_eq!(solo.stalled("solo", 3_000), Verdict::Dependency);
        assert_eq!(solo.stalled("solo", 10_000), Verdict::Backend);
    }
}
