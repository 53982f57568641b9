//! Backend health: active checks on an interval with rise/fall thresholds, passive
//! reports from real logins, and the operator's decisions (`postern backend
//! drain|down`, read from the database). Together they give the router each backend's
//! [`BackendState`] per protocol.
//!
//! ```text
//!            fall consecutive failures (checks or failed connects/logins)
//!     Up ────────────────────────────────────────────────────────────────▶ Down
//!     ▲      live sessions go on (re-pinned users' sessions end at re-pin)  │
//!     └──────────────── rise consecutive successful checks ─────────────────┘
//!            ends the sessions sent elsewhere temporarily while it was down
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use postern_proto::{BackendLogin, ClientInfo, Credentials, Mechanism, Protocol, Secret, Verdict};
use postern_route::{Availability, BackendState};
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backends::backend::{self, BackendError, BackendStream, ClientTls};
use crate::backends::blame::{Blame, Verdict as Blamed};
pub use crate::backends::service_health::{FailureKind, LastError, Seen};
use crate::backends::service_health::{ServiceHealth, Thresholds, Transition};
use crate::registry::Registry;

/// Without active checks, how often a down service gets one real login through.
const HALF_OPEN_AFTER: Duration = Duration::from_secs(10);
use crate::settings::{Backend, Endpoint, HealthSettings, Settings};

/// An operator's decision about a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminState {
    /// No new users or sessions (where the pool allows elsewhere).
    Drain,
    /// No sessions at all.
    Down,
}

impl AdminState {
    /// Parses the value stored in `backend_state.state`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "drain" => Some(AdminState::Drain),
            "down" => Some(AdminState::Down),
            _ => None,
        }
    }

    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Drain => "drain",
            AdminState::Down => "down",
        }
    }
}

/// One backend service's health, for status pages and metrics.
#[derive(Clone, Debug)]
pub struct HealthReport {
    /// Backend name.
    pub backend: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Whether logins may be sent there, as far as checks and real connections tell.
    pub up: bool,
    /// What the checks say: unknown (not answered since start), up or down.
    pub seen: Seen,
    /// Timeouts lately, forgiven because the service was answering: slow, not dead.
    pub degraded: bool,
    /// The operator's decision, if any.
    pub admin: Option<AdminState>,
    /// Since when it is in its current state.
    pub since: SystemTime,
    /// The last failure, while the service is not yet healthy again.
    pub last_error: Option<LastError>,
}

/// Health of every backend service of this instance.
#[derive(Debug)]
pub struct Health {
    checks: RwLock<HashMap<(String, Protocol), ServiceHealth>>,
    admin: RwLock<HashMap<String, AdminState>>,
    /// SMTP-family services: the extension lines each backend's EHLO/LHLO allows
    /// Postern to advertise, learned by the checks.
    ehlo: RwLock<HashMap<(String, Protocol), Vec<String>>>,
    /// The last `up <time>` each backend's operator state said (`postern backend up`):
    /// a new one resets that backend's health.
    operator_ups: RwLock<HashMap<String, String>>,
    settings: HealthSettings,
    registry: Arc<Registry>,
    /// Whose fault recent login timeouts are; shared with the generations before and
    /// after a reload, so logins in flight across it are judged with everyone else's.
    blame: Arc<Mutex<Blame<(String, Protocol)>>>,
    /// The backend-login timeout the judgement uses.
    login_timeout: Duration,
    /// Each backend's pool: the peers a login timeout is compared with.
    pools: HashMap<String, String>,
    /// Bumped at every DOWN (checks, real logins, the operator), so logins waiting on
    /// a backend learn at once that it went down. One channel for every generation:
    /// a login waiting since before a reload hears the DOWNs after it.
    downs: Arc<tokio::sync::watch::Sender<u64>>,
    /// The next configuration generation's health, once a reload took over: from then
    /// on this one forwards every report and question there, so the sessions and
    /// logins of the old generation see (and feed) the live state.
    successor: OnceLock<Arc<Health>>,
}

/// A login in flight on a backend service, known to the blame judgement until it is
/// answered, times out or is abandoned (dropped).
#[derive(Debug)]
pub struct LoginWatch {
    health: Arc<Health>,
    key: (String, Protocol),
    id: u64,
    done: bool,
}

impl LoginWatch {
    /// The backend answered the login (yes or no).
    pub fn answered(mut self) {
        self.done = true;
        self.health
            .blame()
            .ended(&self.key, self.id, true, Instant::now());
    }

    /// The login timed out: counted against the backend unless the cause is shared.
    pub fn timed_out(mut self) -> Blamed {
        self.done = true;
        let (backend, protocol) = (&self.key.0, self.key.1);
        let peers = self.health.live().peers(backend, protocol);
        let verdict = self
            .health
            .blame()
            .timed_out(&self.key, self.id, &peers, Instant::now());
        if verdict.is_backend() {
            self.health.report_failure(
                backend,
                protocol,
                FailureKind::Timeout,
                "login timed out".into(),
            );
        } else {
            warn!(
                backend = backend.as_str(),
                %protocol,
                cause = verdict.as_str(),
                "backend login timed out, not counted against the backend: the cause is shared"
            );
        }
        verdict
    }
}

impl Drop for LoginWatch {
    fn drop(&mut self) {
        if !self.done {
            self.health
                .blame()
                .ended(&self.key, self.id, false, Instant::now());
        }
    }
}

impl Health {
    /// Every configured backend service starts unknown and routable: a fresh instance
    /// serves at once, and the checks take services out if they do not answer.
    pub fn new(settings: &Settings, registry: Arc<Registry>) -> Arc<Self> {
        let blame = Blame::new(
            settings.timeouts.backend_login,
            probe_window(&settings.health),
        );
        let downs = Arc::new(tokio::sync::watch::Sender::new(0));
        Self::with_shared(settings, registry, Arc::new(Mutex::new(blame)), downs)
    }

    /// The health of a reloaded configuration: built like [`Health::new`], judging
    /// blame with `old`'s record of the logins in flight and announcing its DOWNs to
    /// the logins waiting on `old`. It knows nothing yet: the state comes over in
    /// [`Health::take_over`], when the reload is committed.
    pub fn renewed(settings: &Settings, registry: Arc<Registry>, old: &Health) -> Arc<Self> {
        let old = old.live();
        Self::with_shared(
            settings,
            registry,
            Arc::clone(&old.blame),
            Arc::clone(&old.downs),
        )
    }

    fn with_shared(
        settings: &Settings,
        registry: Arc<Registry>,
        blame: Arc<Mutex<Blame<(String, Protocol)>>>,
        downs: Arc<tokio::sync::watch::Sender<u64>>,
    ) -> Arc<Self> {
        let pools = settings
            .backends
            .values()
            .map(|b| (b.name.clone(), b.pool.clone()))
            .collect();
        let mut checks = HashMap::new();
        let (now, wall) = (Instant::now(), SystemTime::now());
        for b in settings.backends.values() {
            for p in b.protocols() {
                checks.insert((b.name.clone(), p), ServiceHealth::new(now, wall));
            }
        }
        Arc::new(Self {
            checks: RwLock::new(checks),
            admin: RwLock::new(HashMap::new()),
            ehlo: RwLock::new(HashMap::new()),
            operator_ups: RwLock::new(HashMap::new()),
            settings: settings.health.clone(),
            registry,
            blame,
            login_timeout: settings.timeouts.backend_login,
            pools,
            downs,
            successor: OnceLock::new(),
        })
    }

    /// A reload is committed: this (the new generation's) health takes over from
    /// `old`. It inherits the state of the backends still configured (`inherit`,
    /// below), as `old` knows it at this moment; `old` forwards
    /// everything here from now on, so the logins waiting on its backends for a DOWN
    /// (on the channel both share) see the live state: a backend going down after the
    /// reload releases the logins that started before it.
    pub fn take_over(self: &Arc<Self>, old: &Health) {
        let old = old.live();
        if std::ptr::eq(old, self.as_ref()) {
            return;
        }
        self.inherit(old);
        self.blame()
            .retime(self.login_timeout, probe_window(&self.settings));
        let _ = old.successor.set(Arc::clone(self));
    }

    /// The health in force: this one, or the one of the latest reload after it.
    fn live(&self) -> &Health {
        let mut h = self;
        while let Some(next) = h.successor.get() {
            h = next;
        }
        h
    }

    /// The other services of `protocol` in `backend`'s pool: what its login timeouts
    /// and stalled checks are compared with.
    fn peers(&self, backend: &str, protocol: Protocol) -> Vec<(String, Protocol)> {
        match self.pools.get(backend) {
            Some(pool) => self
                .pools
                .iter()
                .filter(|(b, p)| *b != backend && *p == pool)
                .map(|(b, _)| (b.clone(), protocol))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Records the outcome of an active check. A check that logs in and stalled in
    /// the login step (the greeting came, the answer did not, or it was a temporary
    /// failure) may be waiting on the password database every backend shares: the
    /// blame judgement decides whether it counts.
    fn checked(&self, backend: &str, protocol: Protocol, result: Result<(), CheckFailure>) {
        if let Some(next) = self.successor.get() {
            return next.checked(backend, protocol, result);
        }
        let key = (backend.to_owned(), protocol);
        let now = Instant::now();
        let (kind, message) = match result {
            Ok(()) => return self.record(backend, protocol, Ok(())),
            Err(CheckFailure::Failed(kind, message)) => (kind, message),
            Err(CheckFailure::LoginStalled(kind, message)) => {
                let peers = self.peers(backend, protocol);
                let verdict = self.blame().probe_stalled(&key, &peers, now);
                if !verdict.is_backend() {
                    warn!(
                        backend,
                        %protocol,
                        cause = verdict.as_str(),
                        error = message.as_str(),
                        "health check's login stalled after the greeting, not counted against the backend: the cause is shared"
                    );
                    if let Ok(mut checks) = self.checks.write()
                        && let Some(c) = checks.get_mut(&key)
                    {
                        c.excused(message, now, SystemTime::now());
                    }
                    return;
                }
                (kind, message)
            }
        };
        self.record(backend, protocol, Err((kind, message)));
    }

    fn blame(&self) -> std::sync::MutexGuard<'_, Blame<(String, Protocol)>> {
        self.blame.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A login starts on a backend service: watched until answered or timed out.
    pub fn login_started(self: &Arc<Self>, backend: &str, protocol: Protocol) -> LoginWatch {
        if let Some(next) = self.successor.get() {
            return next.login_started(backend, protocol);
        }
        let key = (backend.to_owned(), protocol);
        let id = self.blame().started(&key, Instant::now());
        LoginWatch {
            health: Arc::clone(self),
            key,
            id,
            done: false,
        }
    }

    /// The route store or an auth server failed: login timeouts around now may wait
    /// on the same thing, and are not the backends' fault.
    pub fn dependency_failed(&self) {
        // The judgement is shared across generations: no forwarding needed.
        self.blame().dependency_failed(Instant::now());
    }

    /// Returns once `backend`'s `protocol` service goes DOWN from now on (a login
    /// let through a half-open DOWN service is not stopped by the DOWN it started in).
    /// A reload does not end the wait: the generations share the channel, and the
    /// state asked is the live one. "From now on" is from this call, not from the
    /// first poll: a login's connect and login race the wait in one `select!`, and a
    /// worker thread preempted between polling the login (which sent its credentials)
    /// and polling this would otherwise subscribe after a DOWN that came meanwhile,
    /// and the login would wait on a backend already given up.
    pub fn gone_down<'a>(
        &'a self,
        backend: &'a str,
        protocol: Protocol,
    ) -> impl Future<Output = ()> + Send + 'a {
        let mut rx = self.downs.subscribe();
        async move {
            loop {
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if self.is_down(backend, protocol) {
                    return;
                }
            }
        }
    }

    fn is_down(&self, backend: &str, protocol: Protocol) -> bool {
        if let Some(next) = self.successor.get() {
            return next.is_down(backend, protocol);
        }
        let admin = self.admin.read().ok().and_then(|a| a.get(backend).copied());
        if admin == Some(AdminState::Down) {
            return true;
        }
        let t = self.thresholds();
        self.checks
            .read()
            .ok()
            .and_then(|c| {
                c.get(&(backend.to_owned(), protocol))
                    .map(|c| !c.routable(&t))
            })
            .unwrap_or(false)
    }

    /// After a reload: the state of every backend service that is still configured,
    /// and the operator's marks on every backend still configured (`backend
    /// drain|down`, and the last `backend up` stamp seen), so that a reload neither
    /// revives a down backend, nor undoes a drain, nor takes an old `backend up` for a
    /// new one (which would forget what the checks said). A backend removed from the
    /// configuration leaves its marks behind: added again later, it starts afresh.
    fn inherit(&self, old: &Health) {
        if let (Ok(mut mine), Ok(theirs)) = (self.checks.write(), old.checks.read()) {
            for (key, check) in mine.iter_mut() {
                if let Some(prev) = theirs.get(key) {
                    // Without active checks nothing but a real login would ever bring
                    // a down service back: a reload gives it a fresh start instead.
                    if !self.settings.enabled && prev.seen() == Seen::Down {
                        continue;
                    }
                    *check = prev.clone();
                }
            }
        }
        let configured = |name: &String| self.pools.contains_key(name);
        if let (Ok(mut mine), Ok(theirs)) = (self.admin.write(), old.admin.read()) {
            for (name, state) in theirs.iter().filter(|(n, _)| configured(n)) {
                mine.insert(name.clone(), *state);
            }
        }
        if let (Ok(mut mine), Ok(theirs)) = (self.operator_ups.write(), old.operator_ups.read()) {
            for (name, stamp) in theirs.iter().filter(|(n, _)| configured(n)) {
                mine.insert(name.clone(), stamp.clone());
            }
        }
        if let (Ok(mut mine), Ok(theirs)) = (self.ehlo.write(), old.ehlo.read()) {
            for (key, lines) in theirs.iter() {
                mine.insert(key.clone(), lines.clone());
            }
        }
    }

    fn thresholds(&self) -> Thresholds {
        let s = &self.settings;
        Thresholds {
            rise: s.rise,
            fall: s.fall,
            startup_grace: s.startup_grace,
            // A timeout within `fall` check intervals of a success (plus one check's
            // own bound) comes from a backend that was answering a moment ago.
            evidence_window: s.interval.saturating_mul(s.fall) + s.timeout,
            half_open_after: (!s.enabled).then_some(HALF_OPEN_AFTER),
        }
    }

    /// Records the outcome of a check or of a real connection attempt; a failure is a
    /// hard one (refused, reset, TLS, wrong greeting).
    pub fn report(&self, backend: &str, protocol: Protocol, result: Result<(), String>) {
        self.record(
            backend,
            protocol,
            result.map_err(|e| (FailureKind::Hard, e)),
        );
    }

    /// Records a failure of a given kind (a timeout may be slowness, not death).
    pub fn report_failure(
        &self,
        backend: &str,
        protocol: Protocol,
        kind: FailureKind,
        message: String,
    ) {
        self.record(backend, protocol, Err((kind, message)));
    }

    /// An operator said the backend is up (`postern backend up`): forget what checks
    /// and real logins said of it, so a stale passive DOWN does not outlive the fix.
    pub fn reset(&self, backend: &str) {
        if let Some(next) = self.successor.get() {
            return next.reset(backend);
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        if let Ok(mut checks) = self.checks.write() {
            for ((b, _), c) in checks.iter_mut() {
                if b == backend {
                    c.reset(now, wall);
                }
            }
        }
        info!(backend, "backend health reset by the operator");
    }

    fn record(&self, backend: &str, protocol: Protocol, result: Result<(), (FailureKind, String)>) {
        if let Some(next) = self.successor.get() {
            return next.record(backend, protocol, result);
        }
        let t = self.thresholds();
        let (transition, first_failure) = {
            let Ok(mut checks) = self.checks.write() else {
                return;
            };
            let Some(c) = checks.get_mut(&(backend.to_owned(), protocol)) else {
                return;
            };
            let unknown_before = c.seen() == Seen::Unknown && c.last_error().is_none();
            match result {
                Ok(()) => (c.success(&t, Instant::now(), SystemTime::now()), false),
                Err((kind, e)) => (
                    c.failure(&t, kind, e, Instant::now(), SystemTime::now()),
                    unknown_before,
                ),
            }
        };
        if first_failure {
            info!(backend, %protocol, "backend service not answering yet; unknown until it does");
        }
        match transition {
            Some(Transition::Down { never_up }) => {
                // Live sessions are not ended: one whose backend still answers (a
                // failing check, a slow minute) goes on, and one whose backend is gone
                // ends by itself. A user re-pinned elsewhere has their sessions here
                // ended then, and only theirs (login and the change-log follower).
                let kept = self
                    .registry
                    .per_backend()
                    .get(backend)
                    .copied()
                    .unwrap_or(0);
                warn!(backend, %protocol, sessions_kept = kept, never_up, "backend DOWN");
                self.downs.send_modify(|n| *n = n.wrapping_add(1));
            }
            Some(Transition::Up { was_down }) => {
                // Also from unknown: a service that failed `fall` times before it ever
                // answered was not routed to, and its users may be elsewhere for now.
                let n = self.registry.kick_temporary(backend, protocol);
                if was_down {
                    info!(backend, %protocol, temporary_sessions_ended = n, "backend UP");
                } else {
                    info!(backend, %protocol, temporary_sessions_ended = n, "backend service answering");
                }
            }
            None => {}
        }
    }

    /// Applies the operator states read from the database.
    pub fn set_admin(&self, states: &[(String, String)]) {
        if let Some(next) = self.successor.get() {
            return next.set_admin(states);
        }
        // `postern backend up` writes "up <unix time>": the backend is normal again, and
        // whatever real logins said of it is forgotten (a passive DOWN would otherwise
        // outlive the fix when active checks are off). Each new stamp resets once.
        let fresh_ups: Vec<String> = {
            let mut seen = self.operator_ups.write().unwrap_or_else(|e| e.into_inner());
            states
                .iter()
                .filter(|(_, s)| s.starts_with("up"))
                .filter(|(b, s)| seen.insert(b.clone(), s.clone()).as_deref() != Some(s.as_str()))
                .map(|(b, _)| b.clone())
                .collect()
        };
        for b in fresh_ups {
            self.reset(&b);
        }
        let new: HashMap<String, AdminState> = states
            .iter()
            .filter_map(|(b, s)| AdminState::parse(s).map(|s| (b.clone(), s)))
            .collect();
        let Ok(mut admin) = self.admin.write() else {
            return;
        };
        let mut changed_down = false;
        for (b, s) in &new {
            if admin.get(b) != Some(s) {
                info!(backend = %b, state = s.as_str(), "backend state set by the operator");
                if *s == AdminState::Down {
                    let n = self.registry.kick_backend(b, None);
                    info!(backend = %b, sessions_ended = n, "backend marked down");
                    changed_down = true;
                }
            }
        }
        for b in admin.keys() {
            if !new.contains_key(b) {
                info!(backend = %b, "backend state cleared by the operator");
            }
        }
        *admin = new;
        drop(admin);
        if changed_down {
            self.downs.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Records what a backend's EHLO/LHLO allows Postern to advertise.
    pub fn record_extensions(&self, backend: &str, protocol: Protocol, lines: Vec<String>) {
        if let Some(next) = self.successor.get() {
            return next.record_extensions(backend, protocol, lines);
        }
        if let Ok(mut ehlo) = self.ehlo.write() {
            ehlo.insert((backend.to_owned(), protocol), lines);
        }
    }

    /// The extensions every probed backend of `protocol` supports, so that whichever
    /// backend a client ends up on honours what it was told; `None` before any probe.
    /// SIZE is advertised with the smallest limit.
    pub fn extensions(&self, protocol: Protocol) -> Option<Vec<String>> {
        if let Some(next) = self.successor.get() {
            return next.extensions(protocol);
        }
        let ehlo = self.ehlo.read().ok()?;
        // By backend name, so every instance advertises the same lines in one order.
        let mut entries: Vec<_> = ehlo.iter().filter(|((_, p), _)| *p == protocol).collect();
        entries.sort_by(|a, b| a.0.0.cmp(&b.0.0));
        let mut lists = entries.into_iter().map(|(_, lines)| lines);
        let first = lists.next()?;
        let rest: Vec<&Vec<String>> = lists.collect();
        let keyword = |l: &str| l.split(' ').next().unwrap_or_default().to_ascii_uppercase();
        let mut out = Vec::new();
        for line in first {
            let kw = keyword(line);
            let mut chosen = line.clone();
            let mut everywhere = true;
            for other in &rest {
                match other.iter().find(|l| keyword(l) == kw) {
                    None => everywhere = false,
                    Some(l) if kw == "SIZE" => {
                        let size =
                            |l: &str| l.split(' ').nth(1).and_then(|n| n.parse::<u64>().ok());
                        if let (Some(a), Some(b)) = (size(&chosen), size(l))
                            && b < a
                        {
                            chosen = l.clone();
                        }
                    }
                    Some(_) => {}
                }
            }
            if everywhere {
                out.push(chosen);
            }
        }
        Some(out)
    }

    /// Every service's health.
    pub fn reports(&self) -> Vec<HealthReport> {
        if let Some(next) = self.successor.get() {
            return next.reports();
        }
        let admin = self.admin.read().map(|a| a.clone()).unwrap_or_default();
        let mut out: Vec<HealthReport> = self
            .checks
            .read()
            .map(|checks| {
                checks
                    .iter()
                    .map(|((b, p), c)| HealthReport {
                        backend: b.clone(),
                        protocol: *p,
                        up: c.routable(&self.thresholds()),
                        degraded: c.degraded(&self.thresholds(), Instant::now()),
                        seen: c.seen(),
                        admin: admin.get(b).copied(),
                        since: c.since(),
                        last_error: c.last_error().cloned(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| (&a.backend, a.protocol).cmp(&(&b.backend, b.protocol)));
        out
    }
}

/// How long a check's outcome stands for the blame judgement: until the next one is
/// due and done, with room for the jitter between backends (two check periods), and
/// never less than the tail of an outage.
fn probe_window(s: &HealthSettings) -> Duration {
    (s.interval + s.timeout)
        .saturating_mul(2)
        .max(PROBE_WINDOW_AT_LEAST)
}

/// The tail of a shared outage is how long the backends take to come back one after
/// the other (each works through its backlog, reconnects to the database): seconds,
/// however often they are checked. A faster check interval must not shorten the
/// window below that.
const PROBE_WINDOW_AT_LEAST: Duration = Duration::from_secs(10);

impl Availability for Health {
    fn state(&self, backend: &str, protocol: Protocol) -> BackendState {
        // The old generation's router asks its own health: the live one answers.
        if let Some(next) = self.successor.get() {
            return next.state(backend, protocol);
        }
        let admin = self.admin.read().ok().and_then(|a| a.get(backend).copied());
        if admin == Some(AdminState::Down) {
            return BackendState::Down;
        }
        let t = self.thresholds();
        let up = self
            .checks
            .write()
            .ok()
            .and_then(|mut c| {
                c.get_mut(&(backend.to_owned(), protocol))
                    .map(|c| c.routable(&t) || c.half_open(&t, Instant::now()))
            })
            .unwrap_or(false);
        match (up, admin) {
            (false, _) => BackendState::Down,
            (true, Some(AdminState::Drain)) => BackendState::Draining,
            (true, _) => BackendState::Up,
        }
    }
}

/// Runs the active checks of every backend service until `cancel` fires.
pub async fn run(settings: Arc<Settings>, health: Arc<Health>, cancel: CancellationToken) {
    if !settings.health.enabled {
        return;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for b in settings.backends.values() {
        for protocol in b.protocols() {
            let (settings, health, cancel) =
                (Arc::clone(&settings), Arc::clone(&health), cancel.clone());
            let name = b.name.clone();
            tasks.spawn(async move {
                let Some(backend) = settings.backends.get(&name) else {
                    return;
                };
                // Spread the first checks so instances and backends do not beat in step.
                let jitter = Duration::from_millis(fastrand::u64(
                    0..=settings.health.interval.as_millis() as u64,
                ));
                tokio::select! {
                    () = tokio::time::sleep(jitter) => {}
                    () = cancel.cancelled() => return,
                }
                loop {
                    let result =
                        check(backend, protocol, &settings.health, &settings.hostname).await;
                    let result = result.map(|ehlo| {
                        if let Some(lines) = ehlo {
                            health.record_extensions(&backend.name, protocol, lines);
                        }
                    });
                    health.checked(&backend.name, protocol, result);
                    tokio::select! {
                        () = tokio::time::sleep(settings.health.interval) => {}
                        () = cancel.cancelled() => return,
                    }
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}

fn endpoint(backend: &Backend, protocol: Protocol) -> Option<&Endpoint> {
    backend.endpoint(protocol)
}

/// Why a check failed.
#[derive(Debug)]
enum CheckFailure {
    /// Of this kind (refused, no greeting, a wrong password, no answer at all).
    Failed(FailureKind, String),
    /// A check that logs in got the greeting, then no answer to its login in time
    /// (a timeout), or the backend's temporary failure as the answer (hard: it
    /// answered): the backend is there, its login path waits on or fails in
    /// something behind it (its password database hung, or down: then Dovecot
    /// answers `NO [UNAVAILABLE]`).
    LoginStalled(FailureKind, String),
}

/// One check: connect as a real session would (PROXY header, TLS), read the greeting,
/// and with a probe user configured, log in and out. SMTP-family services are asked
/// for their EHLO/LHLO instead, and the extensions come back.
async fn check(
    backend: &Backend,
    protocol: Protocol,
    s: &HealthSettings,
    hostname: &str,
) -> Result<Option<Vec<String>>, CheckFailure> {
    let greeted = AtomicBool::new(false);
    let result = timeout(
        s.timeout,
        check_once(backend, protocol, hostname, &greeted, s),
    )
    .await;
    match result {
        Ok(r) => r,
        Err(_) if greeted.load(Ordering::Relaxed) => Err(CheckFailure::LoginStalled(
            FailureKind::Timeout,
            format!(
                "probe login: greeted, no answer to the login within {:?}",
                s.timeout
            ),
        )),
        Err(_) => Err(CheckFailure::Failed(
            FailureKind::Timeout,
            format!("no answer within {:?}", s.timeout),
        )),
    }
}

/// The check itself; `greeted` is set once a check that logs in has the greeting.
async fn check_once(
    backend: &Backend,
    protocol: Protocol,
    hostname: &str,
    greeted: &AtomicBool,
    s: &HealthSettings,
) -> Result<Option<Vec<String>>, CheckFailure> {
    let hard = |e: String| CheckFailure::Failed(FailureKind::Hard, e);
    let Some(endpoint) = endpoint(backend, protocol) else {
        return Err(hard("protocol not served".into()));
    };
    let local = "127.0.0.1:0"
        .parse()
        .map_err(|_| hard("address".to_string()))?;
    let info = ClientInfo {
        client: local,
        local,
        tls: false,
        session_id: "health-check".into(),
    };
    let work = async {
        let stream = backend::connect(
            &backend.host,
            endpoint,
            backend.tls.as_ref(),
            &info,
            &ClientTls {
                version: None,
                cipher: None,
            },
            s.timeout,
        )
        .await
        .map_err(|e| CheckFailure::Failed(e.kind(), e.to_string()))?;
        if matches!(
            protocol,
            Protocol::Submission | Protocol::Smtp | Protocol::Lmtp
        ) {
            return ehlo(stream, protocol, hostname)
                .await
                .map(Some)
                .map_err(hard);
        }
        match &backend.probe {
            None => greeting(stream, protocol)
                .await
                .map(|()| None)
                .map_err(hard),
            Some(probe) => probe_login(backend, protocol, stream, probe, &info, greeted)
                .await
                .map(|()| None),
        }
    };
    work.await
}

/// EHLO (LHLO) and QUIT: the backend is up, and this is what it supports.
async fn ehlo(
    stream: BackendStream,
    protocol: Protocol,
    hostname: &str,
) -> Result<Vec<String>, String> {
    let mut probe = postern_smtp::Probe::new(hostname, protocol == Protocol::Lmtp);
    let (result, mut stream) = backend::drive(&mut probe, stream, None)
        .await
        .map_err(|e| conversation_error(e, "EHLO"))?;
    let _ = stream.shutdown().await;
    result
        .map(|ext| ext.advertise(protocol))
        .map_err(str::to_owned)
}

/// The greeting alone, answered with the protocol's goodbye (both from its crate).
async fn greeting(stream: BackendStream, protocol: Protocol) -> Result<(), String> {
    let mut check = match protocol {
        Protocol::Imap => postern_imap::greeting_check(),
        Protocol::Pop3 => postern_pop3::greeting_check(),
        _ => return Err("no greeting check for this protocol".into()),
    };
    let (result, mut stream) = backend::drive(&mut check, stream, None)
        .await
        .map_err(|e| conversation_error(e, "the greeting"))?;
    let _ = stream.shutdown().await;
    result.map_err(str::to_owned)
}

/// A check's conversation error as the operator reads it in `last_error`.
fn conversation_error(e: BackendError, during: &str) -> String {
    match e {
        BackendError::Login(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("closed during {during}")
        }
        BackendError::Login(e) => e.to_string(),
        e => e.to_string(),
    }
}

async fn probe_login(
    backend: &Backend,
    protocol: Protocol,
    stream: BackendStream,
    probe: &crate::settings::Probe,
    info: &ClientInfo,
    greeted: &AtomicBool,
) -> Result<(), CheckFailure> {
    let hard = |e: String| CheckFailure::Failed(FailureKind::Hard, e);
    let creds = Credentials {
        mechanism: Mechanism::Cleartext,
        authzid: None,
        user: probe.user.clone(),
        password: Secret::new(probe.password.expose().as_bytes().to_vec()),
        challenge: None,
    };
    let (mut machine, bye): (Box<dyn BackendLogin + Send>, &[u8]) = match protocol {
        Protocol::Imap => {
            let o = backend
                .imap
                .as_ref()
                .ok_or_else(|| hard("no imap".into()))?;
            let mut login = o.login.clone();
            login.forward_client = false;
            (
                Box::new(postern_imap::Login::new(creds, None, &login, info)),
                postern_imap::CHECK_GOODBYE,
            )
        }
        Protocol::Pop3 => {
            let o = backend
                .pop3
                .as_ref()
                .ok_or_else(|| hard("no pop3".into()))?;
            let mut login = o.login.clone();
            login.forward_client = false;
            (
                Box::new(postern_pop3::Login::new(creds, &login, info)),
                postern_pop3::CHECK_GOODBYE,
            )
        }
        _ => return Err(hard("no probe login for this protocol".into())),
    };
    let mut watched = Greeted {
        inner: machine.as_mut(),
        greeted,
    };
    let (verdict, mut stream) = backend::drive(&mut watched, stream, backend.tls.as_ref())
        .await
        .map_err(|e| hard(conversation_error(e, "the probe login")))?;
    let _ = stream.write_all(bye).await;
    let _ = stream.shutdown().await;
    match verdict {
        Verdict::Accepted(_) => Ok(()),
        Verdict::Refused(reply) if temporary_refusal(protocol, &reply.text) => {
            Err(CheckFailure::LoginStalled(
                FailureKind::Hard,
                "probe login: greeted, then a temporary failure".into(),
            ))
        }
        Verdict::Refused(_) => Err(hard("probe login refused".into())),
        Verdict::Failed(_) => Err(hard("probe login failed".into())),
    }
}

/// Whether a refused login's answer says "temporary failure, try later" (IMAP
/// `[UNAVAILABLE]`, RFC 5530; POP3 `[SYS/TEMP]`, RFC 3206): what Dovecot answers
/// when its password database fails, not a wrong password.
fn temporary_refusal(protocol: Protocol, text: &[u8]) -> bool {
    let code: &[u8] = match protocol {
        Protocol::Imap => b"[UNAVAILABLE]",
        Protocol::Pop3 => b"[SYS/TEMP]",
        _ => return false,
    };
    text.get(..code.len())
        .is_some_and(|t| t.eq_ignore_ascii_case(code))
}

/// A login machine that notes when the backend's first line (its greeting) came:
/// a check that times out after it stalled in the login step.
struct Greeted<'a> {
    inner: &'a mut (dyn BackendLogin + Send),
    greeted: &'a AtomicBool,
}

impl BackendLogin for Greeted<'_> {
    fn handle_input(&mut self, bytes: &[u8]) {
        if bytes.contains(&b'\n') {
            self.greeted.store(true, Ordering::Relaxed);
        }
        self.inner.handle_input(bytes);
    }

    fn handle_tls_ready(&mut self) {
        self.inner.handle_tls_ready();
    }

    fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        self.inner.poll_transmit(out);
    }

    fn poll_event(&mut self) -> Option<postern_proto::LoginEvent> {
        self.inner.poll_event()
    }

    fn into_handoff(self) -> Vec<u8> {
        // A check logs out at once: what followed the answer is of no use.
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::SessionInfo;

    fn health(rise: u32, fall: u32) -> (Arc<Health>, Arc<Registry>) {
        let downs = Arc::new(tokio::sync::watch::Sender::new(0));
        let blame = Arc::new(Mutex::new(Blame::new(
            Duration::from_secs(30),
            Duration::from_secs(8),
        )));
        health_sharing(rise, fall, blame, downs)
    }

    /// A reloaded generation's health, as `Health::renewed` builds it.
    fn renewed(old: &Health) -> Arc<Health> {
        let (rise, fall) = (old.settings.rise, old.settings.fall);
        health_sharing(rise, fall, Arc::clone(&old.blame), Arc::clone(&old.downs)).0
    }

    fn health_sharing(
        rise: u32,
        fall: u32,
        blame: Arc<Mutex<Blame<(String, Protocol)>>>,
        downs: Arc<tokio::sync::watch::Sender<u64>>,
    ) -> (Arc<Health>, Arc<Registry>) {
        let registry = Registry::new();
        let mut checks = HashMap::new();
        let mut b1 = ServiceHealth::new(Instant::now(), SystemTime::now());
        b1.success(
            &Thresholds {
                rise,
                fall,
                startup_grace: Duration::ZERO,
                evidence_window: Duration::ZERO,
                half_open_after: None,
            },
            Instant::now(),
            SystemTime::now(),
        );
        checks.insert(("b1".to_owned(), Protocol::Imap), b1);
        let h = Arc::new(Health {
            checks: RwLock::new(checks),
            admin: RwLock::new(HashMap::new()),
            ehlo: RwLock::new(HashMap::new()),
            operator_ups: RwLock::new(HashMap::new()),
            settings: HealthSettings {
                rise,
                fall,
                ..HealthSettings::default()
            },
            registry: Arc::clone(&registry),
            blame,
            login_timeout: Duration::from_secs(30),
            pools: HashMap::from([("b1".to_owned(), "default".to_owned())]),
            downs,
            successor: OnceLock::new(),
        });
        (h, registry)
    }

    #[test]
    fn rise_and_fall() {
        let (h, registry) = health(2, 2);
        let root = CancellationToken::new();
        let session = registry.register(
            SessionInfo {
                id: "s".into(),
                user: "alice".into(),
                protocol: Protocol::Imap,
                backend: None,
                pinned: None,
                client: "127.0.0.1:1".parse().unwrap(),
                since: SystemTime::now(),
            },
            &root,
        );
        session.set_backend("b1", None);
        h.report("b1", Protocol::Imap, Err("x".into()));
        assert_eq!(h.state("b1", Protocol::Imap), BackendState::Up);
        h.report("b1", Protocol::Imap, Err("x".into()));
        assert_eq!(h.state("b1", Protocol::Imap), BackendState::Down);
        assert!(
            !session.token().is_cancelled(),
            "DOWN ends no session: one whose backend still answers goes on"
        );
        h.report("b1", Protocol::Imap, Ok(()));
        assert_eq!(h.state("b1", Protocol::Imap), BackendState::Down);
        h.report("b1", Protocol::Imap, Ok(()));
        assert_eq!(h.state("b1", Protocol::Imap), BackendState::Up);
        h.set_admin(&[("b1".into(), "drain".into())]);
        assert_eq!(h.state("b1", Protocol::Imap), BackendState::Draining);
        h.set_admin(&[("b1".into(), "down".into())]);
        assert_eq!(h.state("b1", Protocol::Imap), BackendState::Down);
        h.set_admin(&[]);
        assert_eq!(h.state("b1", Protocol::Imap), BackendState::Up);
        assert_eq!(h.state("nope", Protocol::Imap), BackendState::Down);
    }

    /// The wait starts at the call: a DOWN before its first poll (the worker thread
    /// preempted between sending a login and polling the wait) still releases it.
    #[tokio::test]
    async fn a_down_before_the_first_poll_releases_the_waiter() {
        let (h, _) = health(2, 2);
        let waiting = h.gone_down("b1", Protocol::Imap);
        h.report("b1", Protocol::Imap, Err("refused".into()));
        h.report("b1", Protocol::Imap, Err("refused".into()));
        assert_eq!(h.state("b1", Protocol::Imap), BackendState::Down);
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("released by the DOWN that came before the first poll");
    }

    #[tokio::test]
    async fn after_a_reload_the_old_generation_waits_on_and_feeds_the_new_health() {
        let (old, _) = health(2, 2);
        let new = renewed(&old);
        // A login of the old generation waits on b1 for a DOWN.
        let waiting = {
            let old = Arc::clone(&old);
            tokio::spawn(async move { old.gone_down("b1", Protocol::Imap).await })
        };
        tokio::task::yield_now().await;
        new.take_over(&old);
        // A failure reported by an old-generation login counts in the live state...
        old.report("b1", Protocol::Imap, Err("refused".into()));
        assert!(!waiting.is_finished());
        // ...and the new generation's DOWN releases the old generation's waiter.
        new.report("b1", Protocol::Imap, Err("refused".into()));
        assert_eq!(new.state("b1", Protocol::Imap), BackendState::Down);
        // The old generation's router asks its own health: the live one answers.
        assert_eq!(old.state("b1", Protocol::Imap), BackendState::Down);
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("released at the DOWN")
            .expect("the waiter ran");
        // A second handover (another reload) chains.
        let newer = renewed(&old);
        newer.take_over(&old);
        old.report("b1", Protocol::Imap, Ok(()));
        old.report("b1", Protocol::Imap, Ok(()));
        assert_eq!(newer.state("b1", Protocol::Imap), BackendState::Up);
        assert_eq!(new.state("b1", Protocol::Imap), BackendState::Up);
    }

    #[test]
    fn operator_marks_survive_a_reload_unless_the_backend_was_removed() {
        let (old, _) = health(2, 2);
        let imap = Protocol::Imap;
        // `postern backend up b1` long ago: its stamp reset b1 once.
        old.set_admin(&[("b1".into(), "up 100".into())]);
        // Since then b1's checks took it down.
        old.report("b1", imap, Err("refused".into()));
        old.report("b1", imap, Err("refused".into()));
        assert_eq!(old.state("b1", imap), BackendState::Down);
        old.set_admin(&[("b1".into(), "up 100".into())]);
        assert_eq!(
            old.state("b1", imap),
            BackendState::Down,
            "an old stamp resets once"
        );
        // A reload: the new generation reads the same stamp, which is not news.
        let new = renewed(&old);
        new.take_over(&old);
        new.set_admin(&[("b1".into(), "up 100".into())]);
        assert_eq!(
            new.state("b1", imap),
            BackendState::Down,
            "a reload took the old `backend up` for a new one"
        );
        // A new `backend up` still resets, after the reload as before it.
        new.set_admin(&[("b1".into(), "up 200".into())]);
        assert_eq!(new.state("b1", imap), BackendState::Up);
        // `backend down` and `backend drain` marks come over as they are: no new kick,
        // no moment without them.
        new.set_admin(&[
            ("b1".into(), "drain".into()),
            ("gone".into(), "down".into()),
        ]);
        let newer = renewed(&new);
        newer.take_over(&new);
        assert_eq!(newer.state("b1", imap), BackendState::Draining);
        let admin = newer.admin.read().unwrap().clone();
        assert_eq!(
            admin,
            HashMap::from([("b1".to_owned(), AdminState::Drain)]),
            "a backend no longer configured leaves its marks behind"
        );
    }

    /// An IMAP backend for one check: `greet` or say nothing, then answer the login
    /// with `answer` (a line after the tag), or never.
    async fn scripted(greet: bool, answer: Option<&'static str>) -> u16 {
        use tokio::io::AsyncBufReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let (r, mut w) = sock.into_split();
            if !greet {
                std::future::pending::<()>().await;
            }
            w.write_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready.\r\n")
                .await
                .unwrap();
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let tag = line.split(' ').next().unwrap_or_default().to_owned();
                let reply = if line.contains("AUTHENTICATE") {
                    match answer {
                        Some(a) => format!("{tag} {a}\r\n"),
                        None => continue,
                    }
                } else {
                    format!("{tag} OK done\r\n")
                };
                if w.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        port
    }

    fn probed(port: u16) -> Backend {
        Backend {
            name: "b1".into(),
            host: "127.0.0.1".into(),
            weight: 1,
            pool: "default".into(),
            tls: None,
            probe: Some(crate::settings::Probe {
                user: "probe".into(),
                password: Secret::new("probe-pw".into()),
            }),
            imap: Some(crate::settings::ImapBackend {
                endpoint: Endpoint {
                    port,
                    tls: crate::settings::BackendTls::None,
                    proxy_protocol: crate::settings::ProxyProtocol::None,
                },
                login: postern_imap::LoginOptions::default(),
            }),
            pop3: None,
            submission: None,
            smtp: None,
            lmtp: None,
            admission: crate::backends::admission::Limits::default(),
        }
    }

    #[tokio::test]
    async fn a_check_that_logs_in_tells_a_stalled_login_step_from_other_failures() {
        let s = HealthSettings {
            timeout: Duration::from_millis(500),
            ..HealthSettings::default()
        };
        let run = |greet, answer| {
            let s = s.clone();
            async move {
                let b = probed(scripted(greet, answer).await);
                check(&b, Protocol::Imap, &s, "postern.test").await
            }
        };
        // Greeted, then no answer to the login: a stall (a hung password database).
        assert!(matches!(
            run(true, None).await,
            Err(CheckFailure::LoginStalled(FailureKind::Timeout, _))
        ));
        // Greeted, then the temporary failure Dovecot answers when its database is
        // down: a stall too, but an answer (hard when counted).
        assert!(matches!(
            run(
                true,
                Some("NO [UNAVAILABLE] Temporary authentication failure.")
            )
            .await,
            Err(CheckFailure::LoginStalled(FailureKind::Hard, _))
        ));
        // No greeting at all: a frozen backend, never excused.
        assert!(matches!(
            run(false, None).await,
            Err(CheckFailure::Failed(FailureKind::Timeout, _))
        ));
        // A wrong probe password: the backend's answer, never excused.
        assert!(matches!(
            run(
                true,
                Some("NO [AUTHENTICATIONFAILED] Authentication failed.")
            )
            .await,
            Err(CheckFailure::Failed(FailureKind::Hard, _))
        ));
        assert!(matches!(run(true, Some("OK Logged in")).await, Ok(None)));
    }

    #[test]
    fn a_temporary_failure_answered_to_a_probe_is_told_from_a_wrong_password() {
        let imap = Protocol::Imap;
        // Dovecot's answers when its passdb fails, and to a wrong password.
        assert!(temporary_refusal(
            imap,
            b"[UNAVAILABLE] Temporary authentication failure. [b1:2026-12-04 01:00:00]"
        ));
        assert!(temporary_refusal(
            Protocol::Pop3,
            b"[SYS/TEMP] Temporary authentication failure."
        ));
        assert!(!temporary_refusal(
            imap,
            b"[AUTHENTICATIONFAILED] Authentication failed."
        ));
        assert!(!temporary_refusal(
            Protocol::Pop3,
            b"[AUTH] Authentication failed."
        ));
        assert!(!temporary_refusal(imap, b"[UNAVAIL"));
        assert!(!temporary_refusal(Protocol::Smtp, b"[UNAVAILABLE]"));
    }

    #[test]
    fn advertised_extensions_are_what_every_backend_supports() {
        let (h, _) = health(1, 1);
        assert_eq!(h.extensions(Protocol::Submission), None);
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        h.record_extensions(
            "b1",
            Protocol::Submission,
            lines(&["PIPELINING", "SIZE 1000", "CHUNKING"]),
        );
        h.record_extensions(
            "b2",
            Protocol::Submission,
            lines(&["size 500", "PIPELINING", "DSN"]),
        );
        assert_eq!(
            h.extensions(Protocol::Submission).unwrap(),
            vec!["PIPELINING".to_string(), "size 500".to_string()]
        );
        assert_eq!(h.extensions(Protocol::Smtp), None);
    }
}
