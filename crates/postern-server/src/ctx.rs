//! What every session of a configuration generation shares: the settings, the router,
//! the registry, health, limits, the cancellation tokens and the listeners' drivers.
//! Its own module so that the session driver, the login and the SMTP relay can all
//! use it without importing each other.

use std::collections::HashMap;
use std::sync::Arc;

use postern_route::Router;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::health::Health;
use crate::registry::Registry;
use crate::settings::{ListenerSettings, Settings};

/// Shared by every session of a server.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) settings: Arc<Settings>,
    pub(crate) router: Arc<Router>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) health: Arc<Health>,
    pub(crate) limiter: Arc<postern_limits::Limiter>,
    pub(crate) admission: Arc<crate::backends::admit::Admission>,
    pub(crate) verifier: Arc<crate::auth::Verifier>,
    /// Shutdown: stop accepting, say goodbye to pre-auth clients.
    pub(crate) cancel: CancellationToken,
    /// The end of the shutdown grace period: close relayed sessions too.
    pub(crate) kill: CancellationToken,
    /// This generation was replaced by a reload: its background tasks stop.
    pub(crate) retire: CancellationToken,
    /// Stops this generation's change-log follower: at a reload, or at shutdown once
    /// the last session has ended (not before: until then the instance must keep
    /// applying kicks and confirming them, or movers would presume it dead while its
    /// sessions still run).
    pub(crate) follow: CancellationToken,
    /// The listeners' settings and drivers, by listener name.
    pub(crate) listeners: HashMap<String, Listening>,
    /// The configuration generation (1, then one more per reload).
    pub(crate) generation: u64,
    /// The server's session tasks, which graceful shutdown waits for: a logged-in
    /// session is relayed in a task of its own, spawned here by its login task.
    pub(crate) tracker: TaskTracker,
}

/// One listener of a generation.
#[derive(Debug)]
pub(crate) struct Listening {
    pub(crate) settings: Arc<ListenerSettings>,
    pub(crate) driver: ListeningDriver,
}

/// The protocol driver of a listener (the submission one keeps the probed extensions).
pub(crate) enum ListeningDriver {
    Imap(Arc<crate::session::driver::Imap>),
    Pop3(Arc<crate::session::driver::Pop3>),
    Submission(Arc<crate::session::driver::Submission>),
    Relay(Arc<postern_smtp::RelayOptions>),
}

impl std::fmt::Debug for ListeningDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ListeningDriver::Imap(_) => "Imap",
            ListeningDriver::Pop3(_) => "Pop3",
            ListeningDriver::Submission(_) => "Submission",
            ListeningDriver::Relay(_) => "Relay",
        })
    }
}
