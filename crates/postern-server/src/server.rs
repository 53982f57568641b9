//! Listeners, the accept loops, configuration generations (reload) and shutdown.
//!
//! Everything a session reads from the configuration hangs off one [`Ctx`], a
//! *generation*. A reload builds a new generation and swaps it in atomically; sessions
//! keep the generation they were accepted in until they end, new connections get the
//! new one. Listeners are matched by name: a listener whose address and protocol did not
//! change keeps its socket (no connection is refused during a reload), a new one is
//! bound, a removed one stops accepting.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use postern_limits::Limiter;
use postern_route::Router;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backends::health::Health;
use crate::ctx::{Ctx, Listening, ListeningDriver};
use crate::registry::Registry;
use crate::session;
use crate::session::driver::{Imap, Pop3, Submission};
use crate::settings::{FrontOptions, ListenerSettings, Settings};

/// Why the server could not start, or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not bind its address.
    #[error("listener {name}: cannot listen on {addr}: {source}")]
    Bind {
        /// The listener's name.
        name: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// `auth.dummy_scheme` names no supported scheme.
    #[error("auth.dummy_scheme: {0}")]
    DummyScheme(postern_auth::password::SchemeError),
}

/// What the server shares with the router and the admin side: live sessions and
/// backend health.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// Live sessions.
    pub registry: Arc<Registry>,
    /// Backend health (also the router's availability view).
    pub health: Arc<Health>,
    /// Abuse-control state.
    pub limiter: Arc<Limiter>,
    /// Logins in flight and waiting, per backend service.
    pub admission: Arc<crate::backends::admit::Admission>,
}

impl Runtime {
    /// A registry and a health view for `settings`.
    pub fn new(settings: &Settings) -> Self {
        let registry = Registry::new();
        let health = Health::new(settings, Arc::clone(&registry));
        let limiter = Limiter::new(settings.limits.clone());
        Self {
            registry,
            health,
            limiter,
            admission: crate::backends::admit::Admission::new(settings),
        }
    }

    /// The runtime of a reloaded configuration: the same sessions; health as far as
    /// the backends are the same ones; the abuse-control counts kept unless the limits
    /// themselves changed (then they start afresh).
    pub fn renew(&self, settings: &Settings) -> Self {
        // Its state is taken over from the running one when the reload is committed
        // (`Server::reload`): a reload refused after this point changes nothing.
        let health = Health::renewed(settings, Arc::clone(&self.registry), &self.health);
        let limiter = if self.limiter.settings() == &settings.limits {
            Arc::clone(&self.limiter)
        } else {
            Limiter::new(settings.limits.clone())
        };
        // The same gates: logins in flight under the old configuration still count.
        self.admission.configure(settings);
        Self {
            registry: Arc::clone(&self.registry),
            health,
            limiter,
            admission: Arc::clone(&self.admission),
        }
    }
}

/// A bound listener socket and what stops its accept loop.
#[derive(Debug)]
struct Socket {
    bind: SocketAddr,
    local: SocketAddr,
    stop: CancellationToken,
}

/// State shared by the running server and its [`Handle`]s.
#[derive(Debug)]
struct Inner {
    current: ArcSwap<Ctx>,
    tracker: TaskTracker,
    /// Stops accepting and ends pre-auth sessions (with their goodbye).
    cancel: CancellationToken,
    /// Ends relayed sessions: fired when the shutdown grace period is over.
    kill: CancellationToken,
    sockets: tokio::sync::Mutex<HashMap<String, Socket>>,
    generation: AtomicU64,
    started: std::sync::atomic::AtomicBool,
    /// The change-log follower's identity and position, kept across reloads.
    position: Arc<crate::watch::Position>,
}

/// A bound, not yet running, Postern server.
#[derive(Debug)]
pub struct Server {
    inner: Arc<Inner>,
    bound: Vec<(String, TcpListener)>,
}

/// Controls a server from elsewhere (signal handlers, the admin API): reload.
#[derive(Clone, Debug)]
pub struct Handle {
    inner: Arc<Inner>,
}

/// What a reload changed.
#[derive(Debug, Default)]
pub struct ReloadSummary {
    /// The new generation's number (the first configuration is 1).
    pub generation: u64,
    /// Listeners bound anew.
    pub added: Vec<String>,
    /// Listeners closed.
    pub removed: Vec<String>,
}

/// Builds one generation: the drivers of every listener over `settings`.
fn generation(
    settings: Arc<Settings>,
    router: Arc<Router>,
    runtime: Runtime,
    cancel: &CancellationToken,
    kill: &CancellationToken,
    tracker: &TaskTracker,
    number: u64,
) -> Result<Ctx, ServerError> {
    let verifier = crate::auth::Verifier::new(
        settings.auth.max_parallel_checks,
        &settings.auth.dummy_scheme,
    )
    .map_err(ServerError::DummyScheme)?;
    let mut listeners = HashMap::new();
    for l in &settings.listeners {
        let driver = match l.front.clone() {
            FrontOptions::Imap(options) => ListeningDriver::Imap(Arc::new(Imap { options })),
            FrontOptions::Pop3(options) => ListeningDriver::Pop3(Arc::new(Pop3 {
                options,
                hostname: settings.hostname.clone(),
            })),
            FrontOptions::Submission(options) => ListeningDriver::Submission(Arc::new(
                Submission::new(options, Arc::clone(&runtime.health)),
            )),
            FrontOptions::Relay(options) => ListeningDriver::Relay(options),
        };
        listeners.insert(
            l.name.clone(),
            Listening {
                settings: Arc::clone(l),
                driver,
            },
        );
    }
    Ok(Ctx {
        verifier: Arc::new(verifier),
        settings,
        router,
        registry: runtime.registry,
        health: runtime.health,
        limiter: runtime.limiter,
        admission: runtime.admission,
        cancel: cancel.clone(),
        kill: kill.clone(),
        retire: cancel.child_token(),
        follow: CancellationToken::new(),
        listeners,
        generation: number,
        tracker: tracker.clone(),
    })
}

impl Server {
    /// Binds every listener. Nothing is accepted until [`Server::run`]. `runtime` holds
    /// the session registry and the health view the router was built with.
    pub async fn bind(
        settings: Arc<Settings>,
        router: Arc<Router>,
        runtime: Runtime,
    ) -> Result<Self, ServerError> {
        let cancel = CancellationToken::new();
        let kill = CancellationToken::new();
        let mut bound = Vec::new();
        let mut sockets = HashMap::new();
        for l in &settings.listeners {
            let listener = bind(l).await?;
            let local = listener.local_addr().unwrap_or(l.bind);
            sockets.insert(
                l.name.clone(),
                Socket {
                    bind: l.bind,
                    local,
                    stop: cancel.child_token(),
                },
            );
            bound.push((l.name.clone(), listener));
        }
        let tracker = TaskTracker::new();
        let ctx = generation(settings, router, runtime, &cancel, &kill, &tracker, 1)?;
        Ok(Self {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(ctx),
                tracker,
                cancel,
                kill,
                sockets: tokio::sync::Mutex::new(sockets),
                generation: AtomicU64::new(1),
                started: std::sync::atomic::AtomicBool::new(false),
                position: Arc::default(),
            }),
            bound,
        })
    }

    /// This instance's live sessions.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.inner.current.load().registry)
    }

    /// A handle to reload the running server.
    pub fn handle(&self) -> Handle {
        Handle {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Each listener's name and the address it is bound to (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.bound
            .iter()
            .filter_map(|(name, l)| l.local_addr().ok().map(|a| (name.clone(), a)))
            .collect()
    }

    /// Serves until `shutdown` completes. Then: the listeners close, pre-auth clients
    /// get the protocol's goodbye, relayed sessions run on for `timeouts.shutdown_grace`
    /// and are then closed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let inner = self.inner;
        start_generation(&inner, &inner.current.load_full());
        {
            let sockets = inner.sockets.lock().await;
            for (name, listener) in self.bound {
                let Some(socket) = sockets.get(&name) else {
                    continue;
                };
                log_listening(&inner.current.load(), &name, socket.local);
                inner.tracker.spawn(accept_loop(
                    Arc::clone(&inner),
                    name,
                    listener,
                    socket.stop.clone(),
                ));
            }
        }
        inner.started.store(true, Ordering::Release);
        shutdown.await;
        let grace = inner.current.load().settings.timeouts.shutdown_grace;
        let live = inner.current.load().registry.len();
        info!(
            sessions = live,
            grace_secs = grace.as_secs_f64(),
            "shutting down: listeners closed, pre-auth clients told goodbye"
        );
        inner.cancel.cancel();
        inner.tracker.close();
        if tokio::time::timeout(grace, inner.tracker.wait())
            .await
            .is_err()
        {
            let live = inner.current.load().registry.len();
            warn!(
                sessions = live,
                "shutdown grace period over: closing the sessions still running"
            );
            inner.kill.cancel();
            if tokio::time::timeout(Duration::from_secs(5), inner.tracker.wait())
                .await
                .is_err()
            {
                warn!("sessions still running after they were told to close");
            }
        }
        let ctx = inner.current.load_full();
        ctx.follow.cancel();
        if ctx.settings.watch.is_some() {
            crate::watch::leave(&ctx.router, &inner.position).await;
        }
        info!("stopped");
    }
}

impl Handle {
    /// The configuration generation in use (1 until the first reload).
    pub fn generation(&self) -> u64 {
        self.inner.current.load().generation
    }

    /// The settings in use.
    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.inner.current.load().settings)
    }

    /// The router in use.
    pub fn router(&self) -> Arc<Router> {
        Arc::clone(&self.inner.current.load().router)
    }

    /// The runtime (registry, health, limiter) in use.
    pub fn runtime(&self) -> Runtime {
        let ctx = self.inner.current.load();
        Runtime {
            registry: Arc::clone(&ctx.registry),
            health: Arc::clone(&ctx.health),
            limiter: Arc::clone(&ctx.limiter),
            admission: Arc::clone(&ctx.admission),
        }
    }

    /// Each listener's name and bound address.
    pub async fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        let sockets = self.inner.sockets.lock().await;
        let mut v: Vec<_> = sockets.iter().map(|(n, s)| (n.clone(), s.local)).collect();
        v.sort();
        v
    }

    /// Swaps in a new configuration: binds new listeners first (a failure refuses the
    /// whole reload and changes nothing), then makes the new generation current, then
    /// closes the listeners that are gone. Live sessions are not touched.
    pub async fn reload(
        &self,
        settings: Arc<Settings>,
        router: Arc<Router>,
        runtime: Runtime,
    ) -> Result<ReloadSummary, ServerError> {
        let inner = &self.inner;
        let mut sockets = inner.sockets.lock().await;
        // 1. Bind what is new or moved, before anything changes.
        let mut fresh = Vec::new();
        for l in &settings.listeners {
            // The socket stays while the address does: the accept loop serves each
            // connection with the current generation's driver, whatever the protocol.
            if sockets.get(&l.name).is_none_or(|s| s.bind != l.bind) {
                fresh.push((l.name.clone(), l.bind, bind(l).await?));
            }
        }
        // 2. The new generation, with what the last one's route cache knew: during a
        // route-store outage a reloaded instance must go on serving its users.
        let kept_routes = router.inherit_cache(&inner.current.load().router);
        let number = inner.generation.load(Ordering::Acquire) + 1;
        let ctx = Arc::new(generation(
            settings,
            router,
            runtime,
            &inner.cancel,
            &inner.kill,
            &inner.tracker,
            number,
        )?);
        // Nothing can fail from here on. The health takes over before the swap, so a
        // connection of the new generation never sees a state that forgot the old
        // one; and from here on the old generation's checks, sessions and logins
        // waiting on its backends see (and feed) the new generation's health.
        ctx.health.take_over(&inner.current.load().health);
        let old = inner.current.swap(Arc::clone(&ctx));
        inner.generation.store(number, Ordering::Release);
        old.retire.cancel();
        old.follow.cancel();
        if inner.started.load(Ordering::Acquire) {
            start_generation(inner, &ctx);
        }
        // 3. Listeners: start the new ones, stop the ones gone or replaced.
        let mut summary = ReloadSummary {
            generation: number,
            ..ReloadSummary::default()
        };
        for (name, bind_addr, listener) in fresh {
            let local = listener.local_addr().unwrap_or(bind_addr);
            let stop = inner.cancel.child_token();
            if let Some(old) = sockets.insert(
                name.clone(),
                Socket {
                    bind: bind_addr,
                    local,
                    stop: stop.clone(),
                },
            ) {
                old.stop.cancel();
            }
            log_listening(&ctx, &name, local);
            inner
                .tracker
                .spawn(accept_loop(Arc::clone(inner), name.clone(), listener, stop));
            summary.added.push(name);
        }
        let gone: Vec<String> = sockets
            .keys()
            .filter(|n| !ctx.listeners.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(s) = sockets.remove(&name) {
                s.stop.cancel();
                info!(listener = %name, addr = %s.local, "listener closed by reload");
            }
            summary.removed.push(name);
        }
        info!(
            generation = number,
            added = ?summary.added,
            removed = ?summary.removed,
            kept_routes,
            "configuration reloaded"
        );
        Ok(summary)
    }
}

async fn bind(l: &ListenerSettings) -> Result<TcpListener, ServerError> {
    let listener = TcpListener::bind(l.bind)
        .await
        .map_err(|source| ServerError::Bind {
            name: l.name.clone(),
            addr: l.bind,
            source,
        })?;
    tune_listener(&listener);
    Ok(listener)
}

fn log_listening(ctx: &Ctx, name: &str, addr: SocketAddr) {
    if let Some(l) = ctx.listeners.get(name) {
        info!(
            listener = %name,
            proto = %l.settings.front.protocol(),
            %addr,
            tls = l.settings.tls_mode.as_str(),
            "listening"
        );
    }
}

/// The background tasks of a generation: health checks, the route change log, the
/// abuse-control sweep. They stop when the generation is retired.
fn start_generation(inner: &Arc<Inner>, ctx: &Arc<Ctx>) {
    if let Some(watch) = &ctx.settings.watch {
        // Not on the tracker: shutdown waits for the sessions, and the follower must
        // outlive them (see `Ctx::follow`).
        tokio::spawn(crate::watch::stamp(
            inner.position.gate(watch.live_within),
            watch.live_within,
            ctx.follow.clone(),
        ));
        tokio::spawn(crate::watch::run(
            Arc::clone(&ctx.router),
            Arc::clone(&ctx.registry),
            Arc::clone(&ctx.health),
            Arc::clone(&inner.position),
            watch.instance_id.clone(),
            watch.interval,
            watch.live_within,
            ctx.follow.clone(),
        ));
    }
    inner
        .tracker
        .spawn(sweep_limits(Arc::clone(&ctx.limiter), ctx.retire.clone()));
    inner.tracker.spawn(crate::backends::health::run(
        Arc::clone(&ctx.settings),
        Arc::clone(&ctx.health),
        ctx.retire.clone(),
    ));
}

/// Accepts on one listener until it is stopped (shutdown, or a reload removed it).
/// Each connection is served by the generation current when it was accepted.
async fn accept_loop(
    inner: Arc<Inner>,
    name: String,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(5);
    // A listener bound to one address accepts only on it: asking the kernel per
    // connection (getsockname) is needed only for a wildcard bind.
    let bound = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((tcp, client)) => {
                backoff = Duration::from_millis(5);
                let ctx = inner.current.load_full();
                let Some(l) = ctx.listeners.get(&name) else {
                    continue;
                };
                let local = match bound {
                    Some(a) => a,
                    None => tcp.local_addr().unwrap_or(l.settings.bind),
                };
                #[cfg(not(target_os = "linux"))]
                tune(&tcp);
                let settings = Arc::clone(&l.settings);
                match &l.driver {
                    ListeningDriver::Imap(d) => {
                        let d = Arc::clone(d);
                        inner
                            .tracker
                            .spawn(session::run(ctx, d, settings, tcp, client, local));
                    }
                    ListeningDriver::Pop3(d) => {
                        let d = Arc::clone(d);
                        inner
                            .tracker
                            .spawn(session::run(ctx, d, settings, tcp, client, local));
                    }
                    ListeningDriver::Submission(d) => {
                        let d = Arc::clone(d);
                        inner
                            .tracker
                            .spawn(session::run(ctx, d, settings, tcp, client, local));
                    }
                    ListeningDriver::Relay(options) => {
                        let options = Arc::clone(options);
                        let protocol = settings.front.protocol();
                        inner.tracker.spawn(crate::session::smtp_relay::run(
                            ctx, options, protocol, settings, tcp, client, local,
                        ));
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning, and
                // keep serving the sessions we have.
                warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Drops idle abuse-control entries now and then, so the tables hold only live counts.
async fn sweep_limits(limiter: Arc<Limiter>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let limiter = Arc::clone(&limiter);
        // Sweeping locks each shard in turn; not on a worker that serves sessions.
        let _ = tokio::task::spawn_blocking(move || {
            limiter.sweep(std::time::Instant::now());
        })
        .await;
    }
}

/// Socket options for client connections: no Nagle delay on short protocol lines, and
/// TCP keepalive so a vanished phone does not hold a session until the idle timeout.
fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(Duration::from_secs(300))
        .with_interval(Duration::from_secs(60))
        .with_retries(4)
}

/// Sets the client options once on the listener. Linux copies them to every accepted
/// socket (the test below checks it), which saves five setsockopt calls per login;
/// elsewhere they are set on each accepted socket too.
fn tune_listener(listener: &TcpListener) {
    let sock = SockRef::from(listener);
    let _ = sock.set_tcp_nodelay(true);
    let _ = sock.set_tcp_keepalive(&keepalive());
}

#[cfg(not(target_os = "linux"))]
fn tune(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let _ = SockRef::from(tcp).set_tcp_keepalive(&keepalive());
}

#[cfg(all(test, target_os = "linux"))]
mod tune_tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        tune_listener(&listener);
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (_client, (tcp, _)) = (client.unwrap(), accepted.unwrap());
        let sock = SockRef::from(&tcp);
        assert!(tcp.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(300));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 4);
    }
}
