//! Weighted rendezvous hashing (highest random weight): the backend a user without a pin
//! lands on, the same on every Postern instance and stable when other backends come
//! and go. Only users whose top-scoring backend left are moved.
//!
//! The hash is XXH3-64 over `backend NUL user`; its output is fixed by the XXH3
//! specification, so every instance and every Postern version agrees.

use xxhash_rust::xxh3::xxh3_64;

/// A backend that may take users, with its relative weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Weighted<'a> {
    /// Backend name.
    pub name: &'a str,
    /// Relative share of users; 0 takes none.
    pub weight: u32,
}

/// Picks the backend for `key` among `candidates`, or `None` when no candidate has
/// a positive weight.
pub fn pick<'a>(key: &str, candidates: &[Weighted<'a>]) -> Option<&'a str> {
    let mut best: Option<(f64, &'a str)> = None;
    for c in candidates.iter().filter(|c| c.weight > 0) {
        let score = score(key, c.name, c.weight);
        // Ties (astronomically unlikely) go to the smaller name, so the answer never
        // depends on the order of the configuration.
        let better = match best {
            None => true,
            Some((s, name)) => score > s || (score == s && c.name < name),
        };
        if better {
            best = Some((score, c.name));
        }
    }
    best.map(|(_, name)| name)
}

/// `-w / ln(u)` with `u` uniform in (0, 1): the weighted HRW score (Schindelhauer &
/// Schomaker), which gives each backend a share of users proportional to its weight.
fn score(key: &str, backend: &str, weight: u32) -> f64 {
    let mut buf = Vec::with_capacity(backend.len() + 1 + key.len());
    buf.extend_from_slice(backend.as_bytes());
    buf.push(0);
    buf.extend_from_slice(key.as_bytes());
    let h = xxh3_64(&buf);
    // 53 bits fit an f64 exactly; +0.5 keeps u strictly inside (0, 1).
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight) / u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str, weight: u32) -> Weighted<'_> {
        Weighted { name, weight }
    }

    #[test]
    fn stable_and_order_independent() {
        let a = [w("b1", 1), w("b2", 1), w("b3", 1)];
        let b = [w("b3", 1), w("b1", 1), w("b2", 1)];
        for i in 0..200 {
            let user = format!("user{i}@example.test");
            assert_eq!(pick(&user, &a), pick(&user, &b));
        }
        assert_eq!(pick("x", &[]), None);
        assert_eq!(pick("x", &[w("b1", 0)]), None);
    }

    #[test]
    fn removing_a_backend_moves_only_its_users() {
        let all = [w("b1", 1), w("b2", 1), w("b3", 1)];
        let without_b3 = [w("b1", 1), w("b2", 1)];
        for i in 0..1000 {
            let user = format!("u{i}");
            let before = pick(&user, &all).unwrap();
            let after = pick(&user, &without_b3).unwrap();
            if before != "b3" {
                assert_eq!(before, after);
            }
        }
    }

    #[test]
    fn weights_shape_the_split() {
        let c = [w("big", 3), w("small", 1)];
        let big = (0..8000)
            .filter(|i| pick(&format!("user{i}"), &c) == Some("big"))
            .count();
        // expected 6000; allow for sampling noise
        assert!((5700..6300).contains(&big), "{big}");
    }
}
