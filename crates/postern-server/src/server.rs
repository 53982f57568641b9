//! Listeners and the accept loop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_limits::Limiter;
use postern_route::Router;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::driver::{Driver, Imap, Pop3, Submission};
use crate::health::Health;
use crate::registry::Registry;
use crate::session::{self, Ctx};
use crate::settings::{FrontOptions, ListenerSettings, Settings};

/// Why the server could not start.
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

/// A bound, not yet running, Postern server.
#[derive(Debug)]
pub struct Server {
    ctx: Arc<Ctx>,
    bound: Vec<(Arc<ListenerSettings>, TcpListener)>,
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
        }
    }
}

/// How long sessions get to end after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl Server {
    /// Binds every listener. Nothing is accepted until [`Server::run`]. `runtime` holds
    /// the session registry and the health view the router was built with.
    pub async fn bind(
        settings: Arc<Settings>,
        router: Arc<Router>,
        runtime: Runtime,
    ) -> Result<Self, ServerError> {
        let mut bound = Vec::new();
        for l in &settings.listeners {
            let listener = TcpListener::bind(l.bind)
                .await
                .map_err(|source| ServerError::Bind {
                    name: l.name.clone(),
                    addr: l.bind,
                    source,
                })?;
            bound.push((Arc::clone(l), listener));
        }
        let verifier = crate::auth::Verifier::new(
            settings.auth.max_parallel_checks,
            &settings.auth.dummy_scheme,
        )
        .map_err(ServerError::DummyScheme)?;
        let ctx = Arc::new(Ctx {
            verifier: Arc::new(verifier),
            settings,
            router,
            registry: runtime.registry,
            health: runtime.health,
            limiter: runtime.limiter,
            cancel: CancellationToken::new(),
        });
        Ok(Self { ctx, bound })
    }

    /// This instance's live sessions.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.ctx.registry
    }

    /// Each listener's name and the address it is bound to (useful with port 0).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.bound
            .iter()
            .filter_map(|(s, l)| l.local_addr().ok().map(|a| (s.name.clone(), a)))
            .collect()
    }

    /// Serves until `shutdown` completes, then closes the listeners, cancels the
    /// sessions and waits (briefly) for them to end.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let tracker = TaskTracker::new();
        if let Some(watch) = &self.ctx.settings.watch {
            tracker.spawn(crate::watch::run(
                Arc::clone(&self.ctx.router),
                Arc::clone(&self.ctx.registry),
                Arc::clone(&self.ctx.health),
                watch.instance_id.clone(),
                watch.interval,
                self.ctx.cancel.clone(),
            ));
        }
        tracker.spawn(sweep_limits(
            Arc::clone(&self.ctx.limiter),
            self.ctx.cancel.clone(),
        ));
        tracker.spawn(crate::health::run(
            Arc::clone(&self.ctx.settings),
            Arc::clone(&self.ctx.health),
            self.ctx.cancel.clone(),
        ));
        for (settings, listener) in self.bound {
            if let Ok(addr) = listener.local_addr() {
                info!(
                    listener = %settings.name,
                    proto = %settings.front.protocol(),
                    %addr,
                    tls = settings.tls_mode.as_str(),
                    "listening"
                );
            }
            let ctx = Arc::clone(&self.ctx);
            let sessions = tracker.clone();
            match settings.front.clone() {
                FrontOptions::Imap(options) => {
                    let driver = Arc::new(Imap { options });
                    tracker.spawn(accept_loop(ctx, driver, settings, listener, sessions));
                }
                FrontOptions::Pop3(options) => {
                    let driver = Arc::new(Pop3 {
                        options,
                        hostname: self.ctx.settings.hostname.clone(),
                    });
                    tracker.spawn(accept_loop(ctx, driver, settings, listener, sessions));
                }
                FrontOptions::Submission(options) => {
                    let driver = Arc::new(Submission::new(options, Arc::clone(&ctx.health)));
                    tracker.spawn(accept_loop(ctx, driver, settings, listener, sessions));
                }
                FrontOptions::Relay(options) => {
                    tracker.spawn(relay_accept_loop(
                        ctx, options, settings, listener, sessions,
                    ));
                }
            }
        }
        shutdown.await;
        info!("shutting down");
        self.ctx.cancel.cancel();
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            warn!("sessions still running after the shutdown grace period");
        }
    }
}

async fn accept_loop<D: Driver>(
    ctx: Arc<Ctx>,
    driver: Arc<D>,
    settings: Arc<ListenerSettings>,
    listener: TcpListener,
    sessions: TaskTracker,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = ctx.cancel.cancelled() => return,
        };
        match accepted {
            Ok((tcp, client)) => {
                backoff = Duration::from_millis(5);
                let local = tcp.local_addr().unwrap_or(settings.bind);
                tune(&tcp);
                sessions.spawn(session::run(
                    Arc::clone(&ctx),
                    Arc::clone(&driver),
                    Arc::clone(&settings),
                    tcp,
                    client,
                    local,
                ));
            }
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning, and
                // keep serving the sessions we have.
                warn!(listener = %settings.name, error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// The accept loop of an MX or LMTP listener (its sessions use their own driver).
async fn relay_accept_loop(
    ctx: Arc<Ctx>,
    options: Arc<postern_smtp::RelayOptions>,
    settings: Arc<ListenerSettings>,
    listener: TcpListener,
    sessions: TaskTracker,
) {
    let protocol = settings.front.protocol();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = ctx.cancel.cancelled() => return,
        };
        match accepted {
            Ok((tcp, client)) => {
                backoff = Duration::from_millis(5);
                let local = tcp.local_addr().unwrap_or(settings.bind);
                tune(&tcp);
                sessions.spawn(crate::smtp_relay::run(
                    Arc::clone(&ctx),
                    Arc::clone(&options),
                    protocol,
                    Arc::clone(&settings),
                    tcp,
                    client,
                    local,
                ));
            }
            Err(e) => {
                warn!(listener = %settings.name, error = %e, "accept failed");
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

/// Socket options for a client connection: no Nagle delay on short protocol lines, and
/// TCP keepalive so a vanished phone does not hold a session until the idle timeout.
fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(300))
        .with_interval(Duration::from_secs(60))
        .with_retries(4);
    let _ = SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}
