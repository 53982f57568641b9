//! Percentiles over a run's samples. Runs hold at most tens of thousands of samples, so
//! sorting them all is exact and cheaper than thinking about histogram precision.

use serde::Serialize;

/// Distribution of a run's samples (same unit as the samples).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Summary {
    pub(crate) count: usize,
    pub(crate) mean: f64,
    pub(crate) min: f64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Summary {
    /// Summarizes `samples` (reordered in place).
    pub(crate) fn of(samples: &mut [f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        // Nearest rank: the smallest sample with at least q of the samples at or below it.
        let rank = |q: f64| -> f64 {
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples.get(i).copied().unwrap_or(0.0)
        };
        Self {
            count: n,
            mean: samples.iter().sum::<f64>() / n as f64,
            min: samples.first().copied().unwrap_or(0.0),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: samples.last().copied().unwrap_or(0.0),
        }
    }
}

/// The median of a few values (repeated runs); `None` when there are none.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let mid = n / 2;
    if n % 2 == 1 {
        v.get(mid).copied()
    } else {
        Some((v.get(mid - 1)? + v.get(mid)?) / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&mut v);
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p90, 90.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(s.max, 100.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.mean, 50.5);
    }

    #[test]
    fn single_sample_and_empty() {
        let s = Summary::of(&mut [7.0]);
        assert_eq!((s.p50, s.p99, s.count), (7.0, 7.0, 1));
        assert_eq!(Summary::of(&mut []).count, 0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
