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
    AssignPolicy, Availability, BackendEntry, BackendState, CacheOptions, Failover, Normalizer,
    PoolMode, PoolPolicy, RouteError, RouteStore, Router, RouterOptions, Source, StoreError,
    UnknownUsers, UserName,
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
            sync_wait: postern_route::store::sql::SyncWait::Auto,
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
        options.clone(),
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
    assert!(decisions.iter().any(|d| d.source == Source::Reserved));
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
            ..RouterOptions::default()
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

/// Backend states set by the test.
#[derive(Debug, Default)]
struct States(std::sync::Mutex<std::collections::HashMap<String, BackendState>>);

impl States {
    fn set(&self, b: &str, s: BackendState) {
        self.0.lock().unwrap().insert(b.into(), s);
    }
}

impl Availability for States {
    fn state(&self, backend: &str, _: Protocol) -> BackendState {
        *self
            .0
            .lock()
            .unwrap()
            .get(backend)
            .unwrap_or(&BackendState::Up)
    }
}

async fn pool_router(
    path: &std::path::Path,
    mode: PoolMode,
    failover: Failover,
) -> (Router, Arc<States>, Arc<SqlStore>) {
    let store = sqlite(path).await;
    let states = Arc::new(States::default());
    let mut pools = std::collections::HashMap::new();
    pools.insert("default".to_owned(), PoolPolicy { mode, failover });
    let router = Router::new(
        Normalizer::default(),
        Arc::clone(&store) as Arc<dyn RouteStore>,
        RouterOptions {
            pools,
            failover_rate: 2,
            fence: postern_route::moves::FenceOptions {
                ack_timeout: Duration::from_millis(300),
                ..Default::default()
            },
            ..RouterOptions::default()
        },
        backends(1, 1),
    )
    .with_availability(Arc::clone(&states) as Arc<dyn Availability>);
    (router, states, store)
}

#[tokio::test]
async fn a_down_backend_in_a_shared_pool_hands_its_users_over() {
    let dir = tempfile::tempdir().unwrap();
    let (router, states, store) =
        pool_router(&dir.path().join("r.db"), PoolMode::Shared, Failover::Repin).await;
    let n = Normalizer::default();
    for u in ["alice", "bob", "carol"] {
        store.pin(&n.normalize(u).unwrap(), "b1").await.unwrap();
    }
    states.set("b1", BackendState::Down);
    let d = router.resolve("alice", Protocol::Imap).await.unwrap();
    assert_eq!((d.backend.as_str(), d.source), ("b2", Source::FailedOver));
    assert_eq!(d.pinned.as_deref(), Some("b1"));
    // The pin moved, compare-and-set: the next login simply follows it.
    let d = router.resolve("alice", Protocol::Imap).await.unwrap();
    assert_eq!((d.backend.as_str(), d.source), ("b2", Source::Pinned));
    // Reconnects are spread: the bucket holds two failovers.
    router.resolve("bob", Protocol::Imap).await.unwrap();
    let e = router.resolve("carol", Protocol::Imap).await.unwrap_err();
    assert!(matches!(e, RouteError::FailoverThrottled));
    // With every backend down there is nowhere to go.
    states.set("b2", BackendState::Down);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let e = router.resolve("carol", Protocol::Imap).await.unwrap_err();
    assert!(matches!(e, RouteError::BackendDown(_)));
}

#[tokio::test]
async fn temporary_failover_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (router, states, store) = pool_router(
        &dir.path().join("r.db"),
        PoolMode::Shared,
        Failover::Temporary,
    )
    .await;
    let alice = Normalizer::default().normalize("alice").unwrap();
    store.pin(&alice, "b1").await.unwrap();
    states.set("b1", BackendState::Down);
    let d = router.resolve("alice", Protocol::Imap).await.unwrap();
    assert_eq!((d.backend.as_str(), d.source), ("b2", Source::Temporary));
    assert_eq!(store.list(None).await.unwrap()[0].backend, "b1");
}

#[tokio::test]
async fn own_storage_users_wait_for_their_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (router, states, store) = pool_router(
        &dir.path().join("r.db"),
        PoolMode::OwnStorage,
        Failover::Repin,
    )
    .await;
    let alice = Normalizer::default().normalize("alice").unwrap();
    store.pin(&alice, "b1").await.unwrap();
    states.set("b1", BackendState::Down);
    let e = router.resolve("alice", Protocol::Imap).await.unwrap_err();
    assert!(matches!(e, RouteError::BackendDown(_)));
    assert_eq!(e.failure(), postern_proto::Failure::Unavailable);
    // Draining own storage keeps serving: there is nowhere else.
    states.set("b1", BackendState::Draining);
    let d = router.resolve("alice", Protocol::Imap).await.unwrap();
    assert_eq!(d.backend, "b1");
}

#[tokio::test]
async fn a_draining_shared_backend_moves_its_users_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let (router, states, store) =
        pool_router(&dir.path().join("r.db"), PoolMode::Shared, Failover::Repin).await;
    let alice = Normalizer::default().normalize("alice").unwrap();
    store.pin(&alice, "b1").await.unwrap();
    states.set("b1", BackendState::Draining);
    let d = router.resolve("alice", Protocol::Imap).await.unwrap();
    assert_eq!((d.backend.as_str(), d.source), ("b2", Source::Moved));
    // The move went through the change log (a kick first), like `postern route move`.
    let events = store.events_since(0, 100).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == postern_route::store::ChangeKind::Kick)
    );
    assert_eq!(store.list(None).await.unwrap()[0].backend, "b2");
    // A draining backend takes no new users either.
    let n = router.resolve("dave", Protocol::Imap).await;
    assert!(n.is_err(), "reject policy");
}

#[tokio::test]
async fn being_moved_is_never_cached() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir.path().join("routes.db")).await;
    let n = Normalizer::default();
    let alice = n.normalize("alice@x").unwrap();
    store.pin(&alice, "b1").await.unwrap();
    let router = Router::new(
        n,
        Arc::clone(&store) as Arc<dyn RouteStore>,
        RouterOptions {
            cache: CacheOptions {
                ttl: Duration::from_secs(3600),
                ..CacheOptions::default()
            },
            ..RouterOptions::default()
        },
        backends(1, 1),
    );
    store
        .begin_move(&alice, "b1", "b2", postern_route::store::now_secs() + 60)
        .await
        .unwrap();
    assert!(matches!(
        router.resolve("alice@x", Protocol::Imap).await,
        Err(RouteError::Moving)
    ));
    // The move completes; no change-log event reaches this router (its follower may be
    // a watch interval behind): the next login must still see the new pin at once.
    store.finish_move(&alice, "b2").await.unwrap();
    let d = router.resolve("alice@x", Protocol::Imap).await.unwrap();
    assert_eq!(d.backend, "b2");
}

#[tokio::test]
async fn a_delivery_to_a_down_service_never_moves_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    let (router, states, store) =
        pool_router(&dir.path().join("r.db"), PoolMode::Shared, Failover::Repin).await;
    let alice = Normalizer::default().normalize("alice").unwrap();
    store.pin(&alice, "b1").await.unwrap();
    states.set("b1", BackendState::Down);
    // The MX relay asks: a temporary failure (the sender queues), not a re-pin that
    // would put the user's next IMAP login on a second backend.
    let e = router
        .resolve_recipient("alice", Protocol::Imap)
        .await
        .unwrap_err();
    assert!(matches!(e, RouteError::BackendDown(_)), "{e:?}");
    let rec = store.lookup(&alice).await.unwrap().unwrap();
    assert_eq!(
        rec.backend,
        Some(postern_route::store::BackendRef::Name("b1".into()))
    );
    // A login in the shared pool still fails over.
    let d = router.resolve("alice", Protocol::Imap).await.unwrap();
    assert_eq!((d.backend.as_str(), d.source), ("b2", Source::FailedOver));
}

/// A first login reserves its pin; only a login the backend accepted keeps it, so a
/// name tried with a wrong password (or one that does not exist) leaves no row behind.
#[tokio::test]
async fn first_login_pins_only_when_the_backend_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(&dir.path().join("routes.db")).await;
    let options = RouterOptions {
        unknown_users: UnknownUsers::Assign(AssignPolicy::Hash),
        ..RouterOptions::default()
    };
    let router = Router::new(
        Normalizer::default(),
        Arc::clone(&store) as Arc<dyn RouteStore>,
        options,
        backends(1, 1),
    );
    let failed = router.resolve("nobody@x", Protocol::Imap).await.unwrap();
    assert_eq!(failed.source, Source::Reserved);
    // A second login racing the first one meets it on the same backend.
    let racing = router.resolve("Nobody@X", Protocol::Imap).await.unwrap();
    assert_eq!(racing.backend, failed.backend);
    assert!(router.release(&failed).await.unwrap());
    assert!(
        store.list(None).await.unwrap().is_empty(),
        "a failed login left a pin"
    );

    let ok = router.resolve("somebody@x", Protocol::Imap).await.unwrap();
    assert_eq!(router.confirm(&ok).await.unwrap(), ok.backend);
    // Released after a confirm (a second, failed login of the same user): the pin stays.
    assert!(!router.release(&ok).await.unwrap());
    let rows = store.list(None).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].backend, ok.backend);
    let again = router.resolve("somebody@x", Protocol::Imap).await.unwrap();
    assert_eq!(
        (again.source, again.backend),
        (Source::Pinned, ok.backend.clone())
    );

    // A reservation released under a login that then succeeds: its confirm pins anew.
    let first = router.resolve("third@x", Protocol::Imap).await.unwrap();
    let second = router.resolve("third@x", Protocol::Imap).await.unwrap();
    assert!(router.release(&first).await.unwrap());
    assert_eq!(router.confirm(&second).await.unwrap(), second.backend);
    assert_eq!(store.list(None).await.unwrap().len(), 2);
}
