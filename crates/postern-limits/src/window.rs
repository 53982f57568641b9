//! An approximate sliding-window counter: two fixed buckets, the previous one weighted
//! by how much of it still lies inside the window. Constant memory per key (what a map
//! keyed by every client address needs), and within a few percent of an exact log of
//! timestamps for the counts that matter here.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
pub(crate) struct Window {
    start: Instant,
    previous: u32,
    current: u32,
}

impl Window {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            start: now,
            previous: 0,
            current: 0,
        }
    }

    /// Moves the buckets forward to `now`.
    fn roll(&mut self, now: Instant, len: Duration) {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= len.saturating_mul(2) {
            self.previous = 0;
            self.current = 0;
            self.start = now;
        } else if elapsed >= len {
            self.previous = self.current;
            self.current = 0;
            self.start += len;
        }
    }

    /// Events in the `len` before `now`, estimated.
    pub(crate) fn count(&mut self, now: Instant, len: Duration) -> u32 {
        self.roll(now, len);
        let len_ns = len.as_nanos().max(1);
        let into = now
            .saturating_duration_since(self.start)
            .as_nanos()
            .min(len_ns);
        let weighted = u128::from(self.previous) * (len_ns - into) / len_ns;
        u32::try_from(weighted)
            .unwrap_or(u32::MAX)
            .saturating_add(self.current)
    }

    pub(crate) fn add(&mut self, now: Instant, len: Duration) {
        self.roll(now, len);
        self.current = self.current.saturating_add(1);
    }

    pub(crate) fn clear(&mut self, now: Instant) {
        *self = Self::new(now);
    }

    /// How long until fewer than `limit` events are counted, if nothing is added
    /// meanwhile (whole seconds, rounded up; zero when already below).
    pub(crate) fn time_until_below(&self, now: Instant, len: Duration, limit: u32) -> Duration {
        let below = |secs: u64| {
            let mut w = *self;
            w.count(now + Duration::from_secs(secs), len) < limit
        };
        // The count never grows without an add: search the first second it is below.
        // Two window lengths from now every event has aged out.
        let (mut lo, mut hi) = (0u64, len.as_secs().saturating_mul(2).saturating_add(1));
        if below(lo) {
            return Duration::ZERO;
        }
        while lo + 1 < hi {
            let mid = lo + (hi - lo) / 2;
            if below(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Duration::from_secs(hi)
    }

    /// Nothing counted any more: the entry can go.
    pub(crate) fn is_empty(&mut self, now: Instant, len: Duration) -> bool {
        self.count(now, len) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_until_below_counts_down_to_the_limit() {
        let len = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        for _ in 0..10 {
            w.add(t0, len);
        }
        assert_eq!(w.time_until_below(t0, len, 11), Duration::ZERO);
        let wait = w.time_until_below(t0, len, 10);
        // The ten events leave the estimate between one and two windows later.
        assert!(wait > len && wait <= len * 2, "{wait:?}");
        let mut later = w;
        assert!(later.count(t0 + wait, len) < 10);
        let mut earlier = w;
        assert!(earlier.count(t0 + wait - Duration::from_secs(1), len) >= 10);
        // Halfway there, the wait is shorter.
        assert!(w.time_until_below(t0 + Duration::from_secs(30), len, 10) < wait);
    }

    #[test]
    fn counts_slide_out_of_the_window() {
        let t0 = Instant::now();
        let len = Duration::from_secs(60);
        let mut w = Window::new(t0);
        for _ in 0..10 {
            w.add(t0, len);
        }
        assert_eq!(w.count(t0 + Duration::from_secs(30), len), 10);
        // Half a window after the bucket ended, half of it is still counted.
        assert_eq!(w.count(t0 + Duration::from_secs(90), len), 5);
        w.add(t0 + Duration::from_secs(90), len);
        assert_eq!(w.count(t0 + Duration::from_secs(90), len), 6);
        assert_eq!(w.count(t0 + Duration::from_secs(119), len), 1);
        assert_eq!(w.count(t0 + Duration::from_secs(181), len), 0);
        assert!(w.is_empty(t0 + Duration::from_secs(500), len));
    }
}
