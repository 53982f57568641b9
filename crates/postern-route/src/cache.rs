//! The route cache: what keeps users on their backend when the database is slow or down.
//!
//! - A positive entry is served without asking the store for `ttl`.
//! - A negative entry ("the store does not know this user") for `negative_ttl`.
//! - When the store fails, a positive entry up to `stale_if_error` old is served anyway:
//!   the user keeps logging in to THAT backend. A negative or missing entry is never
//!   turned into a guess: the login gets a temporary failure.
//!
//! Capacity-bounded (S3-FIFO eviction via quick_cache); entries are dropped when the
//! change log says a pin changed.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::UserName;
use crate::store::RouteRecord;

/// Cache settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheOptions {
    /// How long a found route is served without asking the store.
    pub ttl: Duration,
    /// How long "no such user" is remembered.
    pub negative_ttl: Duration,
    /// How long a found route may still be served while the store fails.
    pub stale_if_error: Duration,
    /// Most entries kept.
    pub capacity: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
            stale_if_error: Duration::from_secs(3600),
            capacity: 100_000,
        }
    }
}

/// What the cache holds for a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cached {
    /// The store's record.
    Found(Arc<RouteRecord>),
    /// The store does not know the user.
    Absent,
}

#[derive(Clone, Debug)]
struct Entry {
    value: Cached,
    at: Instant,
}

/// The answer of [`RouteCache::get`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Fresh: use it without asking the store.
    Fresh(Cached),
    /// Expired but within `stale_if_error`: ask the store, and use this if it fails.
    Stale(Arc<RouteRecord>),
    /// Nothing usable.
    Miss,
}

/// A bounded map from user to route with ages.
pub struct RouteCache {
    map: quick_cache::sync::Cache<UserName, Entry>,
    options: CacheOptions,
}

impl std::fmt::Debug for RouteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteCache")
            .field("entries", &self.map.len())
            .field("options", &self.options)
            .finish()
    }
}

impl RouteCache {
    /// Creates an empty cache.
    pub fn new(options: CacheOptions) -> Self {
        Self {
            map: quick_cache::sync::Cache::new(options.capacity.max(1)),
            options,
        }
    }

    /// Looks a user up.
    pub fn get(&self, user: &UserName) -> Lookup {
        let Some(entry) = self.map.get(user) else {
            return Lookup::Miss;
        };
        let age = entry.at.elapsed();
        match entry.value {
            Cached::Found(record) if age < self.options.ttl => Lookup::Fresh(Cached::Found(record)),
            Cached::Found(record) if age < self.options.stale_if_error => Lookup::Stale(record),
            Cached::Absent if age < self.options.negative_ttl => Lookup::Fresh(Cached::Absent),
            _ => Lookup::Miss,
        }
    }

    /// Stores what the store answered.
    pub fn put(&self, user: UserName, value: Cached) {
        if self.options.ttl.is_zero() && self.options.stale_if_error.is_zero() {
            return;
        }
        self.map.insert(
            user,
            Entry {
                value,
                at: Instant::now(),
            },
        );
    }

    /// Copies `old`'s entries that `keep` accepts, with their ages: a reload must
    /// neither refresh nor forget what the last configuration had learnt. Returns how
    /// many were kept.
    pub fn inherit(&self, old: &RouteCache, keep: impl Fn(&Cached) -> bool) -> usize {
        let mut kept = 0;
        for (user, entry) in old.map.iter() {
            if keep(&entry.value) {
                self.map.insert(user, entry);
                kept += 1;
            }
        }
        kept
    }

    /// Forgets a user (its pin changed somewhere).
    pub fn invalidate(&self, user: &UserName) {
        self.map.remove(user);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Normalizer;
    use crate::store::BackendRef;

    fn rec(b: &str) -> Cached {
        Cached::Found(Arc::new(RouteRecord {
            backend: Some(BackendRef::Name(b.into())),
            ..RouteRecord::default()
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn ages() {
        let c = RouteCache::new(CacheOptions {
            ttl: Duration::from_secs(10),
            negative_ttl: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(100),
            capacity: 10,
        });
        let n = Normalizer::default();
        let (a, b) = (n.normalize("a").unwrap(), n.normalize("b").unwrap());
        c.put(a.clone(), rec("b1"));
        c.put(b.clone(), Cached::Absent);
        assert_eq!(c.get(&a), Lookup::Fresh(rec("b1")));
        assert_eq!(c.get(&b), Lookup::Fresh(Cached::Absent));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(c.get(&b), Lookup::Miss, "a negative entry is never stale");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(matches!(c.get(&a), Lookup::Stale(_)));
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(c.get(&a), Lookup::Miss);
        c.put(a.clone(), rec("b2"));
        c.invalidate(&a);
        assert_eq!(c.get(&a), Lookup::Miss);
    }
}
