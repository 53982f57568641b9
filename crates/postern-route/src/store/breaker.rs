//! Failing fast while the route store is unreachable. A database that refuses
//! connections makes sqlx's pool retry until its acquire timeout, so without this every
//! lookup of an outage waits that long (2 s by default) before the router falls back
//! to its cached route. After a connection failure or a timeout the breaker opens for
//! [`OPEN_FOR`]: calls fail at once, except one probe per period, which closes it again
//! when the store answers. Pure: the caller passes the clock in.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long calls fail fast after the store could not be reached.
pub const OPEN_FOR: Duration = Duration::from_secs(1);

/// What a call may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Go ahead.
    Pass,
    /// Go ahead as the one probe of this period.
    Probe,
    /// Fail at once: the store was unreachable moments ago.
    Refuse,
}

#[derive(Debug, Default)]
struct State {
    /// Open until then. A probe pushes it one period on, so a probe that never reports
    /// (its caller gave up) costs one period, never a breaker stuck open.
    open_until: Option<Instant>,
}

/// The breaker of one store.
#[derive(Debug, Default)]
pub struct Breaker {
    state: Mutex<State>,
}

impl Breaker {
    /// Whether a call may go to the store at `now`.
    pub fn gate(&self, now: Instant) -> Gate {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.open_until {
            None => Gate::Pass,
            Some(until) if now < until => Gate::Refuse,
            Some(_) => {
                s.open_until = Some(now + OPEN_FOR);
                Gate::Probe
            }
        }
    }

    /// The store answered (whatever it said): close.
    pub fn success(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = State::default();
    }

    /// The store could not be reached: open (again) from `now`.
    pub fn unreachable(&self, now: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.open_until = Some(now + OPEN_FOR);
    }

    /// Whether the breaker is open (for logs and tests).
    pub fn is_open(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open_until
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_failure_probes_once_per_period_and_closes_on_success() {
        let b = Breaker::default();
        let t0 = Instant::now();
        assert_eq!(b.gate(t0), Gate::Pass);
        b.unreachable(t0);
        assert_eq!(b.gate(t0), Gate::Refuse);
        assert_eq!(b.gate(t0 + OPEN_FOR / 2), Gate::Refuse);
        // After the period, one probe; the others keep failing fast meanwhile.
        assert_eq!(b.gate(t0 + OPEN_FOR), Gate::Probe);
        assert_eq!(b.gate(t0 + OPEN_FOR), Gate::Refuse);
        // A probe that never reports: the next period has a probe again.
        assert_eq!(b.gate(t0 + OPEN_FOR * 2), Gate::Probe);
        // The probe fails: open again for a period.
        b.unreachable(t0 + OPEN_FOR * 2);
        assert_eq!(b.gate(t0 + OPEN_FOR * 2), Gate::Refuse);
        assert_eq!(b.gate(t0 + OPEN_FOR * 3), Gate::Probe);
        // The probe succeeds: closed.
        b.success();
        assert!(!b.is_open());
        assert_eq!(b.gate(t0 + OPEN_FOR * 3), Gate::Pass);
    }
}
