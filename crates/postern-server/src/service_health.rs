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

    /// Records a success (a check, a login, bytes from the backend).
    pub fn success(&mut self, t: &Thresholds, wall: SystemTime) -> Option<Transition> {
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
            Seen::Down if self.ok_streak >= t.rise => {
                self.enter(Seen::Up, wall);
                Some(Transition::Up { was_down: true })
            }
            Seen::Down => None,
        }
    }

    /// Records a failure.
    pub fn failure(
        &mut self,
        t: &Thresholds,
        message: String,
        now: Instant,
        wall: SystemTime,
    ) -> Option<Transition> {
        self.fail_streak = self.fail_streak.saturating_add(1);
        self.ok_streak = 0;
        self.last_error = Some(LastError { message, at: wall });
        if self.fail_streak < t.fall {
            return None;
        }
        match self.seen {
            Seen::Up => {
                self.enter(Seen::Down, wall);
                Some(Transition::Down { never_up: false })
            }
            Seen::Unknown if now.saturating_duration_since(self.started) >= t.startup_grace => {
                self.enter(Seen::Down, wall);
                Some(Transition::Down { never_up: true })
            }
            Seen::Unknown | Seen::Down => None,
        }
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
    };

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
            let tr = h.failure(&T, "connect: refused".into(), at(start, s * 2), wall);
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
            h.success(&T, wall),
            Some(Transition::Up { was_down: false })
        );
        assert_eq!(h.seen(), Seen::Up);
        // One success is not yet proof of health: the error stays, with its time.
        assert!(h.last_error().is_some());
        assert_eq!(h.success(&T, wall), None);
        assert_eq!(h.last_error(), None, "cleared once the service is up again");
    }

    #[test]
    fn a_backend_that_never_answers_goes_down_after_the_grace() {
        let start = Instant::now();
        let wall = SystemTime::now();
        let mut h = ServiceHealth::new(start, wall);
        assert_eq!(h.failure(&T, "x".into(), at(start, 8), wall), None);
        assert_eq!(h.failure(&T, "x".into(), at(start, 9), wall), None);
        assert_eq!(
            h.failure(&T, "x".into(), at(start, 11), wall),
            Some(Transition::Down { never_up: true })
        );
        assert_eq!(h.seen(), Seen::Down);
        assert_eq!(h.success(&T, wall), None);
        assert_eq!(h.success(&T, wall), Some(Transition::Up { was_down: true }));
    }

    #[test]
    fn an_up_backend_goes_down_after_fall_and_back_after_rise() {
        let start = Instant::now();
        let wall = SystemTime::now();
        let mut h = ServiceHealth::new(start, wall);
        h.success(&T, wall);
        assert_eq!(h.failure(&T, "x".into(), at(start, 1), wall), None);
        assert_eq!(h.seen(), Seen::Up);
        // A success between failures resets the streak.
        h.success(&T, wall);
        assert_eq!(h.failure(&T, "x".into(), at(start, 2), wall), None);
        assert_eq!(
            h.failure(&T, "y".into(), at(start, 3), wall),
            Some(Transition::Down { never_up: false })
        );
        assert!(!h.routable(&T));
        assert_eq!(h.last_error().map(|e| e.message.as_str()), Some("y"));
        assert_eq!(h.success(&T, wall), None);
        assert_eq!(h.seen(), Seen::Down);
        assert_eq!(h.success(&T, wall), Some(Transition::Up { was_down: true }));
        assert_eq!(h.last_error(), None);
    }
}
