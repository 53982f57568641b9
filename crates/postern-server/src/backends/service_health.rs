//! The health of one backend service, as a pure state machine: results in, state and
//! transitions out, the clock passed in. No I/O, so every rule is tested on a simulated
//! clock (see the tests below); `health.rs` feeds it checks and real connections and
//! acts on its transitions.
//!
//! ```text
//!   Unknown ── first success ─────────────────────────────▶ Up
//!      │  failures while within startup_grace: still Unknown   ▲  rise successes
//!      └─ fall failures once the grace is over ──▶ Down ───────┘
//!                         Up ── fall failures ──▶ Down
//! ```
//!
//! *Unknown* is a service that has not answered since Postern started: a backend whose
//! daemon starts a few seconds after Postern is not an outage, so it is neither logged
//! nor shown as down. It is routed to as if up, except once it has failed `fall` times
//! in a row (then logins go where the pool allows, as for a down service).
//!
//! Slow is not dead. A timeout while the service showed signs of life shortly before
//! (a check or a real login succeeded within `evidence_window`) makes it *degraded*:
//! shown, but not counted toward `fall`, so an overloaded Dovecot that answers in 3 s
//! keeps its users. Hard failures (refused, reset, TLS, a wrong greeting) and timeouts
//! with no sign of life (a frozen process) count as before.
//!
//! Without active checks nothing would bring a service taken down by real logins back;
//! then a down service lets one login through every `half_open_after` (a half-open
//! circuit breaker), and its success brings the service back.

use std::time::{Duration, Instant, SystemTime};

/// What the checks (and real connections) say of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not answered yet since start.
    Unknown,
    /// Answering.
    Up,
    /// Not answering.
    Down,
}

impl Seen {
    /// The name used in the admin API, the status page and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Seen::Unknown => "unknown",
            Seen::Up => "up",
            Seen::Down => "down",
        }
    }
}

/// A change worth acting on (ending sessions, logging).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Came up (from down, or for the first time).
    Up {
        /// It had been down (not merely unknown).
        was_down: bool,
    },
    /// Went down.
    Down {
        /// It had never answered since start.
        never_up: bool,
    },
}

/// Thresholds, from `[health]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive successes that bring a down service back.
    pub rise: u32,
    /// Consecutive failures that take it down.
    pub fall: u32,
    /// After start, how long a service never seen up stays unknown.
    pub startup_grace: Duration,
    /// A timeout this soon after a success is slowness, not death.
    pub evidence_window: Duration,
    /// Without active checks: how often a down service gets one login through.
    pub half_open_after: Option<Duration>,
}

/// What kind of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Refused, reset, TLS failure, a wrong greeting: the service is not there.
    Hard,
    /// No answer in time: dead, or only slow.
    Timeout,
}

/// The last failure, with when it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastError {
    /// What failed.
    pub message: String,
    /// When (wall clock, for display).
    pub at: SystemTime,
}

/// One backend service's health.
#[derive(Clone, Debug)]
pub struct ServiceHealth {
    seen: Seen,
    ok_streak: u32,
    fail_streak: u32,
    /// When the current state began (wall clock, for display).
    since: SystemTime,
    /// When this instance started watching (monotonic, for the grace).
    started: Instant,
    last_error: Option<LastError>,
    /// The last success (check or real login), for telling slow from dead.
    last_alive: Option<Instant>,
    /// The last timeout forgiven as slowness.
    last_slow: Option<Instant>,
    /// Down: when the next half-open login may go through.
    next_probe: Option<Instant>,
}

impl ServiceHealth {
    /// A service just configured: unknown until it answers.
    pub fn new(now: Instant, wall: SystemTime) -> Self {
        Self {
            seen: Seen::Unknown,
            ok_streak: 0,
            fail_streak: 0,
            since: wall,
            started: now,
            last_error: None,
            last_alive: None,
            last_slow: None,
            next_probe: None,
        }
    }

    /// Forgets everything learnt (an operator said the backend is up, or a reload
    /// without active checks): unknown again, with a fresh start-up grace.
    pub fn reset(&mut self, now: Instant, wall: SystemTime) {
        *self = Self::new(now, wall);
    }

    /// Whether recent timeouts were forgiven as slowness (shown as degraded).
    pub fn degraded(&self, t: &Thresholds, now: Instant) -> bool {
        self.seen != Seen::Down
            && self
                .last_slow
                .is_some_and(|at| now.saturating_duration_since(at) < t.evidence_window)
    }

    /// A down service without active checks: whether this login may try it (one per
    /// `half_open_after`). Takes the slot when it says yes.
    pub fn half_open(&mut self, t: &Thresholds, now: Instant) -> bool {
        let Some(every) = t.half_open_after else {
            return false;
        };
        if self.seen != Seen::Down {
            return false;
        }
        match self.next_probe {
            Some(at) if now < at => false,
            _ => {
                self.next_probe = Some(now + every);
                true
            }
        }
    }

    /// The state.
    pub fn seen(&self) -> Seen {
        self.seen
    }

    /// Whether logins and deliveries may be sent here.
    pub fn routable(&self, t: &Thresholds) -> bool {
        match self.seen {
            Seen::Up => true,
            Seen::Down => false,
            Seen::Unknown => self.fail_streak < t.fall,
        }
    }

    /// Since when the state holds.
    pub fn since(&self) -> SystemTime {
        self.since
    }

    /// The last failure, kept until the service is healthy again (`rise` successes in
    /// a row), so an error shown always belongs to a service that is not yet proven
    /// well.
    pub fn last_error(&self) -> Option<&LastError> {
        self.last_error.as_ref()
    }

    /// Records a success (a check, a real login).
    pub fn success(
        &mut self,
        t: &Thresholds,
        now: Instant,
        wall: SystemTime,
    ) -> Option<Transition> {
        self.last_alive = Some(now);
        // Without active checks one real login is all the evidence there will be.
        let rise = if t.half_open_after.is_some() {
            1
        } else {
            t.rise
        };
        self.ok_streak = self.ok_streak.saturating_add(1);
        self.fail_streak = 0;
        if self.ok_streak >= t.rise {
            self.last_error = None;
        }
        match self.seen {
            Seen::Up => None,
            Seen::Unknown => {
                self.enter(Seen::Up, wall);
                Some(Transition::Up { was_down: false })
            }
            Seen::Down if self.ok_streak >= rise => {
                self.enter(Seen::Up, wall);
                self.next_probe = None;
                Some(Transition::Up { was_down: true })
            }
            Seen::Down => None,
        }
    }

    /// Records a failure.
    pub fn failure(
        &mut self,
        t: &Thresholds,
        kind: FailureKind,
        message: String,
        now: Instant,
        wall: SystemTime,
    ) -> Option<Transition> {
        let alive_lately = self
            .last_alive
            .is_some_and(|at| now.saturating_duration_since(at) < t.evidence_window);
        if kind == FailureKind::Timeout && alive_lately && self.seen != Seen::Down {
            // Slow, not dead: shown, not counted.
            self.last_slow = Some(now);
            self.last_error = Some(LastError { message, at: wall });
            return None;
        }
        self.fail_streak = self.fail_streak.saturating_add(1);
        self.ok_streak = 0;
        self.last_error = Some(LastError { message, at: wall });
        if self.fail_streak < t.fall {
            return None;
        }
        match self.seen {
            Seen::Up => {
                self.enter(Seen::Down, wall);
                self.next_probe = t.half_open_after.map(|d| now + d);
                Some(Transition::Down { never_up: false })
            }
            Seen::Unknown if now.saturating_duration_since(self.started) >= t.startup_grace => {
                self.enter(Seen::Down, wall);
                self.next_probe = t.half_open_after.map(|d| now + d);
                Some(Transition::Down { never_up: true })
            }
            Seen::Unknown | Seen::Down => None,
        }
    }

    /// Records a failure the blame judgement put on a shared cause (a check's login
    /// stalled on every backend at once): shown as the last error and as degraded,
    /// neither counted toward `fall` nor taken as a sign of life.
    pub fn excused(&mut self, message: String, now: Instant, wall: SystemTime) {
        self.last_slow = Some(now);
        self.last_error = Some(LastError { message, at: wall });
    }

    fn enter(&mut self, seen: Seen, wall: SystemTime) {
        self.seen = seen;
        self.since = wall;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        rise: 2,
        fall: 2,
        startup_grace: Duration::from_secs(10),
        evidence_window: Duration::from_secs(6),
        half_open_after: None,
    };
    const H: FailureKind = FailureKind::Hard;

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn a_backend_starting_after_postern_is_unknown_then_up_never_down() {
        let start = Instant::now();
        let wall = SystemTime::now();
        let mut h = ServiceHealth::new(start, wall);
        assert_eq!(h.seen(), Seen::Unknown);
        assert!(h.routable(&T));
        for s in 0..4 {
            let tr = h.failure(&T, H, "connect: refused".into(), at(start, s * 2), wall);
            assert_eq!(tr, None, "within the grace nothing goes down");
            assert_eq!(h.seen(), Seen::Unknown);
        }
        // Failing in a row: not routed to, but not reported down either.
        assert!(!h.routable(&T));
        assert_eq!(
            h.last_error().map(|e| e.message.as_str()),
            Some("connect: refused")
        );
        assert_eq!(
            h.success(&T, start, wall),
            Some(Transition::Up { was_down: false })
        );
        assert_eq!(h.seen(), Seen::Up);
        // One success is not yet proof of health: the error stays, with its time.
        assert!(h.last_error().is_some());
        assert_eq!(h.success(&T, start, wall), None);
        assert_eq!(h.last_error(), None, "cleared once the service is up again");
    }

    #[test]
    fn a_backend_that_never_answers_goes_down_after_the_grace() {
        let start = Instant::now();
        let wall = SystemTime::now();
        let mut h = ServiceHealth::new(start, wall);
        assert_eq!(h.failure(&T, H, "x".into(), at(start, 8), wall), None);
        assert_eq!(h.failure(&T, H, "x".into(), at(start, 9), wall), None);
        assert_eq!(
            h.failure(&T, H, "x".into(), at(start, 11), wall),
            Some(Transition::Down { never_up: true })
        );
        assert_eq!(h.seen(), Seen::Down);
        assert_eq!(h.success(&T, start, wall), None);
        assert_eq!(
            h.success(&T, start, wall),
            Some(Transition::Up { was_down: true })
        );
    }

    #[test]
    fn an_up_backend_goes_down_after_fall_and_back_after_rise() {
        let start = Instant::now();
        let wall = SystemTime::now();
        let mut h = ServiceHealth::new(start, wall);
        h.success(&T, start, wall);
        assert_eq!(h.failure(&T, H, "x".into(), at(start, 1), wall), None);
        assert_eq!(h.seen(), Seen::Up);
        // A success between failures resets the streak.
        h.success(&T, start, wall);
        assert_eq!(h.failure(&T, H, "x".into(), at(start, 2), wall), None);
        assert_eq!(
            h.failure(&T, H, "y".into(), at(start, 3), wall),
            Some(Transition::Down { never_up: false })
        );
        assert!(!h.routable(&T));
        assert_eq!(h.last_error().map(|e| e.message.as_str()), Some("y"));
        assert_eq!(h.success(&T, start, wall), None);
        assert_eq!(h.seen(), Seen::Down);
        assert_eq!(
            h.success(&T, start, wall),
            Some(Transition::Up { was_down: true })
        );
        assert_eq!(h.last_error(), None);
    }
}

#[cfg(test)]
mod slow_and_dead {
    use super::*;

    const T: Thresholds = Thresholds {
        rise: 2,
        fall: 2,
        startup_grace: Duration::ZERO,
        evidence_window: Duration::from_secs(6),
        half_open_after: None,
    };

    fn secs(start: Instant, s: u64) -> Instant {
        start + Duration::from_secs(s)
    }

    #[test]
    fn timeouts_while_logins_succeed_are_slowness_not_death() {
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let mut h = ServiceHealth::new(t0, wall);
        h.success(&T, t0, wall);
        // An overloaded backend: every check times out, real logins keep succeeding.
        for s in 1..30 {
            assert_eq!(
                h.failure(
                    &T,
                    FailureKind::Timeout,
                    "no answer".into(),
                    secs(t0, s),
                    wall
                ),
                None
            );
            assert!(h.degraded(&T, secs(t0, s)));
            h.success(&T, secs(t0, s), wall);
        }
        assert_eq!(h.seen(), Seen::Up);
        assert!(h.routable(&T));
        // Hard failures are not forgiven, however alive it was.
        h.failure(&T, FailureKind::Hard, "refused".into(), secs(t0, 31), wall);
        assert_eq!(
            h.failure(&T, FailureKind::Hard, "refused".into(), secs(t0, 31), wall),
            Some(Transition::Down { never_up: false })
        );
    }

    #[test]
    fn a_frozen_backend_times_out_with_no_sign_of_life_and_goes_down() {
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let mut h = ServiceHealth::new(t0, wall);
        h.success(&T, t0, wall);
        // Frozen at t0: timeouts only. Within the evidence window they are forgiven...
        assert_eq!(
            h.failure(&T, FailureKind::Timeout, "x".into(), secs(t0, 2), wall),
            None
        );
        assert_eq!(h.seen(), Seen::Up);
        // ...then they count: down after `fall` of them.
        assert_eq!(
            h.failure(&T, FailureKind::Timeout, "x".into(), secs(t0, 7), wall),
            None
        );
        assert_eq!(
            h.failure(&T, FailureKind::Timeout, "x".into(), secs(t0, 9), wall),
            Some(Transition::Down { never_up: false })
        );
        assert!(!h.degraded(&T, secs(t0, 9)));
    }

    #[test]
    fn without_checks_a_down_service_lets_one_login_through_per_period() {
        let t = Thresholds {
            half_open_after: Some(Duration::from_secs(10)),
            ..T
        };
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let mut h = ServiceHealth::new(t0, wall);
        h.success(&t, t0, wall);
        h.failure(
            &t,
            FailureKind::Timeout,
            "login timed out".into(),
            secs(t0, 40),
            wall,
        );
        h.failure(
            &t,
            FailureKind::Timeout,
            "login timed out".into(),
            secs(t0, 41),
            wall,
        );
        assert_eq!(h.seen(), Seen::Down);
        assert!(!h.half_open(&t, secs(t0, 45)), "not before the hold");
        assert!(h.half_open(&t, secs(t0, 51)));
        assert!(!h.half_open(&t, secs(t0, 52)), "one login per period");
        // That login fails: the next one a period later.
        h.failure(&t, FailureKind::Hard, "refused".into(), secs(t0, 52), wall);
        assert!(h.half_open(&t, secs(t0, 62)));
        // It succeeds: up at once (no checks will add evidence).
        assert_eq!(
            h.success(&t, secs(t0, 62), wall),
            Some(Transition::Up { was_down: true })
        );
        // With active checks there is no half-open: the checks decide.
        let mut c = ServiceHealth::new(t0, wall);
        c.success(&T, t0, wall);
        c.failure(&T, FailureKind::Hard, "x".into(), secs(t0, 1), wall);
        c.failure(&T, FailureKind::Hard, "x".into(), secs(t0, 1), wall);
        assert!(!c.half_open(&T, secs(t0, 100)));
        // An operator's `backend up` (or a reload) forgets it all.
        c.reset(secs(t0, 100), wall);
        assert_eq!(c.seen(), Seen::Unknown);
        assert!(c.routable(&T));
    }
}
