//! Counters for route lookups, read by the metrics endpoint. Lock-free: they sit on
//! the login path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (microseconds) of the lookup-latency histogram buckets.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// The totals of every router of this process. A reload builds a new [`Router`]
/// (with fresh [`RouteStats`]); the metrics endpoint reads these, which every router
/// also counts into, so that the exported counters never go back to zero.
///
/// [`Router`]: crate::Router
pub static PROCESS: RouteStats = RouteStats::new();

/// What one route lookup came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the cache.
    Hit,
    /// Asked the store, which answered.
    Miss,
    /// The store failed; a stale cached route was served.
    Stale,
    /// The store failed; nothing could be served.
    Error,
    /// A user was assigned a backend.
    Assigned,
}

/// Route lookup counters.
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Answered from the cache.
    pub hits: AtomicU64,
    /// Asked the store, which answered.
    pub misses: AtomicU64,
    /// The store failed and a stale cached route was served.
    pub stale: AtomicU64,
    /// The store failed and nothing could be served.
    pub errors: AtomicU64,
    /// Users assigned a backend on first login.
    pub assigned: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
}

/// A copy of the latency histogram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS_US`], then +Inf.
    pub cumulative: Vec<u64>,
    /// Sum of all observations, microseconds.
    pub sum_us: u64,
    /// Number of observations.
    pub count: u64,
}

impl RouteStats {
    /// Zeroed counters (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            assigned: AtomicU64::new(0),
            latency_buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS_US.len() + 1],
            latency_sum_us: AtomicU64::new(0),
            latency_count: AtomicU64::new(0),
        }
    }

    /// Counts one lookup outcome here and in the process totals ([`PROCESS`]).
    pub fn record(&self, outcome: Outcome) {
        self.record_one(outcome);
        if !std::ptr::eq(self, &PROCESS) {
            PROCESS.record_one(outcome);
        }
    }

    fn record_one(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Hit => &self.hits,
            Outcome::Miss => &self.misses,
            Outcome::Stale => &self.stale,
            Outcome::Error => &self.errors,
            Outcome::Assigned => &self.assigned,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// Records one store lookup's duration, here and in the process totals.
    pub fn observe(&self, d: Duration) {
        self.observe_one(d);
        if !std::ptr::eq(self, &PROCESS) {
            PROCESS.observe_one(d);
        }
    }

    fn observe_one(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        if let Some(bucket) = self.latency_buckets.get(i) {
            bucket.fetch_add(1, Relaxed);
        }
        self.latency_sum_us.fetch_add(us, Relaxed);
        self.latency_count.fetch_add(1, Relaxed);
    }

    /// The histogram, cumulative as Prometheus wants it.
    pub fn latency(&self) -> LatencySnapshot {
        let mut total = 0;
        let cumulative = self
            .latency_buckets
            .iter()
            .map(|b| {
                total += b.load(Relaxed);
                total
            })
            .collect();
        LatencySnapshot {
            cumulative,
            sum_us: self.latency_sum_us.load(Relaxed),
            count: self.latency_count.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let s = RouteStats::default();
        s.observe(Duration::from_micros(50));
        s.observe(Duration::from_micros(700));
        s.observe(Duration::from_secs(60));
        let l = s.latency();
        assert_eq!(l.count, 3);
        assert_eq!(l.cumulative[0], 1);
        assert_eq!(l.cumulative[3], 2);
        assert_eq!(*l.cumulative.last().unwrap(), 3);
    }
}
