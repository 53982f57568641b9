//! The router against a real (SQLite) store: race-safe assignment by two instances, and
//! the cache's behaviour when the store fails and comes back.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postern_proto::Protocol;
use postern_route::store::sql::{SqlOptions, SqlStore};
use postern_route::store::{RouteRecord, StoreFuture};
use postern_route::{
    AssignPolicy, BackendEntry, CacheOptions, Normalizer, RouteError, RouteStore, Router,
    RouterOptions, Source, StoreError, UnknownUsers, UserName,
};

fn backends(w1: u32, w2: u32) -> Vec<BackendEntry> {
    [("b1", w1), ("b2", w2)]
        .map(|(name, weight)| BackendEntry {
            name: name.into(),
            host: "127.0.0.1".into(),
            weight,
            pool: "default".into(),
            protocols: vec![Protocol::Imap],
        })
        .to_vec()
}

async fn sqlite(path: &std::path::Path) -> Arc<SqlStore> {
    Arc::new(
        SqlStore::open(&SqlOptions {
            url: format!("sqlite:{}?mode=rwc", path.display()),
            max_connections: 4,
            connect_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(5),
            lookup_query: None,
            migrate: true,
        })
        .await
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_assigning_at_once_agree_on_one_pin() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.db");
    let options = RouterOptions {
        unknown_users: UnknownUsers::Assign(AssignPolicy::LeastLoaded),
        ..RouterOptions::default()
    };
    // The instances are configured to prefer different backends, so every race is real.
    let a = Arc::new(Router::new(
        Normalizer::default(),
        sqlite(&path).await,
        options,
        backends(100, 1),
    ));
    let b = Arc::new(Router::new(
        Normalizer::default(),
        sqlite(&path).await,
        options,
        backends(1, 100),
    ));
    let mut tasks = Vec::new();
    for i in 0..40 {
        for (router, spelling) in [(&a, format!("User{i}@X")), (&b, format!("user{i}@x"))] {
            let router = Arc::clone(router);
            tasks.push(tokio::spawn(async move {
                router.resolve(&spelling, Protocol::Imap).await.unwrap()
            }));
        }
    }
    let mut decisions = Vec::new();
    for t in tasks {
        decisions.push(t.await.unwrap());
    }
    let store = sqlite(&path).await;
    for pair in decisions.chunks(2) {
        assert_eq!(pair[0].user, pair[1].user);
        assert_eq!(pair[0].backend, pair[1].backend, "{:?}", pair);
        let listed = store.list(None).await.unwrap();
        let rows: Vec<_> = listed
            .iter()
            .filter(|r| r.user == pair[0].user.as_str())
            .collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].backend, pair[0].backend);
    }
    // Both preferences won some races: the test really raced.
    assert!(decisions.iter().any(|d| d.source == Source::Assigned));
}

/// A store that can be switched off, to play a database outage.
#[derive(Debug)]
struct Flaky {
    inner: Arc<SqlStore>,
    down: AtomicBool,
}

impl RouteStore for Flaky {
    fn lookup<'a>(&'a self, user: &'a UserName) -> StoreFuture<'a, Option<RouteRecord>> {
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(async { Err(StoreError::Unavailable("down".into())) });
        }
        self.inner.lookup(user)
    }
    fn ping(&self) -> StoreFuture<'_, ()> {
        self.inner.ping()
    }
    fn kind(&self) -> &'static str {
        "flaky"
    }
}

#[tokio::test]
async fn cached_routes_survive_an_outage_for_a_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let inner = sqlite(&dir.path().join("routes.db")).await;
    let n = Normalizer::default();
    inner
        .pin(&n.normalize("alice").unwrap(), "b2")
        .await
        .unwrap();
    let store = Arc::new(Flaky {
        inner,
        down: AtomicBool::new(false),
    });
    let router = Router::new(
        n,
        Arc::clone(&store) as Arc<dyn RouteStore>,
        RouterOptions {
            unknown_users: UnknownUsers::Hash,
            cache: CacheOptions {
                ttl: Duration::from_secs(10),
                negative_ttl: Duration::from_secs(10),
                stale_if_error: Duration::from_secs(3600),
                capacity: 100,
            },
        },
        backends(1, 1),
    );
    let d = router.resolve("alice", Protocol::Imap).await.unwrap();
    assert_eq!((d.backend.as_str(), d.source), ("b2", Source::Pinned));

    // Virtual time only while the database is "down": sqlx's own timers need real time.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(60)).await;
    store.down.store(true, Ordering::SeqCst);
    // A cached user keeps going to THAT backend...
    let d = router.resolve("alice", Protocol::Imap).await.unwrap();
    assert_eq!((d.backend.as_str(), d.source), ("b2", Source::Stale));
    // ...an uncached one gets a temporary failure, never a hashed guess.
    let e = router.resolve("bob", Protocol::Imap).await.unwrap_err();
    assert!(matches!(e, RouteError::Store(_)));
    assert_eq!(e.failure(), postern_proto::Failure::Unavailable);
    // The stale window is bounded.
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(router.resolve("alice", Protocol::Imap).await.is_err());
    // And recovery needs nothing but the store coming back.
    store.down.store(false, Ordering::SeqCst);
    tokio::time::resume();
    let d = router.resolve("alice", Protocol::Imap).await.unwrap();
    assert_eq!((d.backend.as_str(), d.source), ("b2", Source::Pinned));
    let stats = router.stats();
    assert_eq!(stats.stale.load(Ordering::Relaxed), 1);
    assert_eq!(stats.errors.load(Ordering::Relaxed), 2);
}
