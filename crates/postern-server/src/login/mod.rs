//! One login attempt, from the front end's `Authenticate` event to a logged-in backend
//! connection or the verdict for the client. What to do is [`plan`]'s decision; this
//! module executes its steps: the abuse-control tickets, the registry, the router,
//! the password check, auth_http, the backend connect and login, the penalty delay.
//! See the plan's diagram for the paths.

mod plan;

use std::net::IpAddr;
use std::time::SystemTime;

use postern_auth::auth_http::{self, AuthProtocol, Request, TlsInfo};
use postern_proto::{BackendLogin, ClientInfo, Credentials, Failure, FrontEnd, Verdict};
use postern_route::{Availability, BackendState, RouteError, Source, UserName};
use tokio::time::{Instant, timeout_at};
use tracing::{Span, debug, info, warn};

use crate::backends::backend::{self, BackendError, BackendStream, ClientTls};
use crate::ctx::Ctx;
use crate::observability::access_log::Facts;
use crate::registry::{SessionGuard, SessionInfo};
use crate::session::driver::Driver;
use crate::settings::{AuthMode, BackendTls, Endpoint, ProxyProtocol, TlsClient};

use plan::{Answer, AskFailure, Input, LoginAs, Penalty, Plan, Reached, Setup, Step, Why};

/// The outcome of a login attempt.
pub(crate) enum Login {
    /// Answer the client; the session goes on.
    Verdict(Verdict),
    /// Answer the client, then close (nginx's behaviour after an `auth_http` refusal
    /// without `Auth-Wait`, or an auth server error).
    Close(Verdict),
    /// Logged in: relay.
    Accepted {
        backend: BackendStream,
        leftover: Vec<u8>,
        verdict: Verdict,
        guard: SessionGuard,
        /// The user's session slot (abuse control), held while the session lasts.
        slot: Option<postern_limits::SessionGuard>,
    },
}

/// What the session knows about the client for this attempt.
pub(crate) struct Attempt<'a> {
    pub(crate) info: &'a ClientInfo,
    pub(crate) client_tls: &'a ClientTls,
    pub(crate) auth: AuthMode,
    /// 1 for the connection's first login attempt (`Auth-Login-Attempt`).
    pub(crate) number: u32,
    /// The pre-auth deadline: auth_http WAIT answers, penalty delays and every other
    /// wait of the login end there.
    pub(crate) deadline: Instant,
}

/// How long before the pre-auth deadline a login waiting for an admission slot gives
/// up and answers.
const QUEUE_MARGIN: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs one login attempt, counting its result (metrics, access log).
pub(crate) async fn login<D: Driver>(
    ctx: &Ctx,
    driver: &D,
    front: &D::Front,
    creds: Credentials,
    attempt: &Attempt<'_>,
    facts: &mut Facts,
) -> Login {
    let setup = Setup {
        auth: attempt.auth,
        normalized_login: ctx.settings.normalized_login,
        master: ctx.settings.auth.master.as_ref(),
        deadline: attempt.deadline.into_std(),
    };
    let mechanism = creds.mechanism.as_str();
    let mut plan = Plan::new(setup, creds);
    let mut run = Run {
        ctx,
        driver,
        front,
        attempt,
        mechanism,
        user: None,
        ticket: None,
        slot: None,
        guard: None,
        accepted: None,
        facts,
    };
    let mut input = Input::Start;
    let outcome = loop {
        match plan.next(std::time::Instant::now(), input) {
            Step::Answer(answer) => break run.answer(&plan, answer).await,
            step => input = run.execute(&plan, step).await,
        }
    };
    let verdict = match &outcome {
        Login::Verdict(v) | Login::Close(v) | Login::Accepted { verdict: v, .. } => v,
    };
    crate::observability::metrics::login(D::PROTOCOL, verdict);
    run.facts
        .login(crate::observability::metrics::login_result(verdict));
    outcome
}

/// The runtime side of one login: what the plan's steps took hold of.
struct Run<'a, D: Driver> {
    ctx: &'a Ctx,
    driver: &'a D,
    front: &'a D::Front,
    attempt: &'a Attempt<'a>,
    mechanism: &'static str,
    /// The routing key, once normalized.
    user: Option<UserName>,
    /// Held until this attempt is answered, penalty delay included: concurrent guesses
    /// count against the failure limits as they happen, not only once they failed.
    ticket: Option<postern_limits::LoginTicket>,
    slot: Option<postern_limits::SessionGuard>,
    /// The registration: kicks reach the login from here on.
    guard: Option<SessionGuard>,
    /// The logged-in backend connection and the bytes read past the login.
    accepted: Option<(BackendStream, Vec<u8>)>,
    /// The session's record for its access-log line: the user and backend go there.
    facts: &'a mut Facts,
}

/// Where to log in.
struct Target<'a, O> {
    /// Name for logs, health reports and the registry.
    name: &'a str,
    host: &'a str,
    endpoint: &'a Endpoint,
    tls: Option<&'a TlsClient>,
    options: &'a O,
    /// A configured backend, whose health Postern tracks.
    known: bool,
}

/// How connecting and logging in ended, short of a verdict.
enum Trouble {
    /// The backend could not be reached and is now down: another may take the user.
    ConnectDown,
    /// Answer with a temporary failure.
    Unavailable,
}

impl<D: Driver> Run<'_, D> {
    fn ip(&self) -> IpAddr {
        self.attempt.info.client.ip()
    }

    /// Carries out one step of the plan; its result is the plan's next input.
    async fn execute(&mut self, plan: &Plan<'_>, step: Step) -> Input {
        let ctx = self.ctx;
        let now = std::time::Instant::now();
        match step {
            Step::Normalize(name) => match ctx.router.normalizer().normalize(&name) {
                Ok(user) => Input::Normalized(Some(user)),
                Err(e) => {
                    info!(error = %e, mechanism = self.mechanism, "login refused");
                    Input::Normalized(None)
                }
            },
            Step::BeginLogin(user) => {
                self.user = Some(user.clone());
                let ticket = ctx.limiter.begin_login(self.ip(), user.as_str(), now);
                Input::Admitted(ticket.map(|t| self.ticket = Some(t)))
            }
            Step::TakeSessionSlot(user) => {
                let slot = ctx.limiter.session(user.as_str(), now);
                Input::Admitted(slot.map(|s| self.slot = Some(s)))
            }
            Step::Register => {
                self.guard = None;
                self.guard = Some(self.register(plan));
                Input::Done
            }
            Step::Route(user) => {
                Input::Routed(route(ctx, &user, D::PROTOCOL, self.mechanism).await)
            }
            Step::Release(decision) => {
                release(ctx, &decision).await;
                Input::Done
            }
            Step::Verify(stored) => {
                let password = plan.credentials().password.clone();
                Input::Verified(ctx.verifier.check(stored, password).await)
            }
            Step::Assign(decision) => {
                self.assign(&decision);
                Input::Done
            }
            Step::Connect {
                backend,
                login,
                route,
                until,
            } => Input::Reached(self.connect_configured(&backend, login, route, until).await),
            Step::AskAuthHttp { until } => Input::Asked(self.ask(plan, until).await),
            Step::ConnectUpstream {
                server,
                user,
                login,
                until,
            } => Input::Reached(self.connect_upstream(server, &user, login, until).await),
            Step::Confirm(decision) => Input::Confirmed(confirm(ctx, &decision).await),
            // The caller answers.
            Step::Answer(_) => Input::Done,
        }
    }

    fn register(&self, plan: &Plan<'_>) -> SessionGuard {
        self.ctx.registry.register(
            SessionInfo {
                id: self.attempt.info.session_id.clone(),
                user: plan
                    .user()
                    .map(|u| u.as_str().to_owned())
                    .unwrap_or_default(),
                protocol: D::PROTOCOL,
                backend: None,
                pinned: None,
                client: self.attempt.info.client,
                since: SystemTime::now(),
            },
            // Shutdown does not end a session at once: only the end of the grace
            // period does (the kill token), or a kick.
            &self.ctx.kill,
        )
    }

    /// Records where the session goes; a user sent away from their pinned backend
    /// (failover, drain) has their sessions there ended now on this instance (other
    /// instances follow the pin event), before this one is served elsewhere.
    fn assign(&mut self, decision: &postern_route::Decision) {
        let span = Span::current();
        span.record("user", decision.user.as_str());
        span.record("backend", decision.backend.as_str());
        self.facts.user(decision.user.as_str());
        self.facts.backend(&decision.backend);
        let temporary = (decision.source == Source::Temporary)
            .then_some(decision.pinned.as_deref())
            .flatten();
        if let Some(guard) = &self.guard {
            guard.set_backend(&decision.backend, temporary);
        }
        let Some(old) = decision
            .pinned
            .as_deref()
            .filter(|o| *o != decision.backend)
        else {
            return;
        };
        let n = self.ctx.registry.kick_user_on(decision.user.as_str(), old);
        if n > 0 {
            info!(
                user = decision.user.as_str(),
                from = old,
                to = decision.backend.as_str(),
                sessions = n,
                "ending the user's sessions on the backend they left"
            );
        }
    }

    /// A configured backend, by name.
    async fn connect_configured(
        &mut self,
        name: &str,
        login: LoginAs,
        route: &'static str,
        until: std::time::Instant,
    ) -> Reached {
        let Some(backend) = self.ctx.settings.backends.get(name) else {
            warn!("backend is not configured");
            return Reached::Unavailable;
        };
        let Some((endpoint, options)) = self.driver.backend(backend) else {
            warn!("backend is not configured for this protocol");
            return Reached::Unavailable;
        };
        let target = Target {
            name: &backend.name,
            host: &backend.host,
            endpoint,
            tls: backend.tls.as_ref(),
            options,
            known: true,
        };
        self.connect_and_login(login, &target, route, until).await
    }

    /// Builds and sends the auth_http request.
    async fn ask(
        &self,
        plan: &Plan<'_>,
        until: std::time::Instant,
    ) -> Result<postern_auth::auth_http::Decision, AskFailure> {
        let ctx = self.ctx;
        let Some(http) = &ctx.settings.auth.http else {
            warn!("auth.http is not configured");
            return Err(AskFailure::NotConfigured);
        };
        let creds = plan.credentials();
        let protocol = AuthProtocol::from_protocol(D::PROTOCOL);
        let request = protocol.and_then(|p| Request::from_credentials(creds, p, self.ip()));
        let (Some(protocol), Some(mut request)) = (protocol, request) else {
            warn!(
                mechanism = self.mechanism,
                "no auth_http method for this login"
            );
            return Err(AskFailure::NoMethod);
        };
        request.login_attempt = self.attempt.number;
        request.headers.clone_from(&http.headers);
        request.tls = self.attempt.client_tls.version.map(|v| TlsInfo {
            protocol: auth_http::tls_protocol_name(v),
            cipher: self
                .attempt
                .client_tls
                .cipher
                .and_then(auth_http::openssl_cipher_name)
                .unwrap_or_default()
                .to_owned(),
            client_cert: None,
        });
        if protocol == AuthProtocol::Smtp {
            // nginx without a resolver.
            request.client_host = Some("[UNAVAILABLE]".into());
        }
        match crate::auth_http::ask(http, &request, Instant::from_std(until)).await {
            Ok(d) => Ok(d),
            Err(e) => {
                ctx.health.dependency_failed();
                warn!(error = %e, "auth_http failed");
                Err(AskFailure::Failed)
            }
        }
    }

    /// The backend an auth_http server named: a configured backend at that address
    /// brings its TLS, PROXY and login settings and its health; any other address is
    /// plain TCP with defaults.
    async fn connect_upstream(
        &mut self,
        server: std::net::SocketAddr,
        user: &str,
        login: LoginAs,
        until: std::time::Instant,
    ) -> Reached {
        let ctx = self.ctx;
        let driver = self.driver;
        let span = Span::current();
        span.record("user", user);
        self.facts.user(user);
        let known = ctx.settings.backends.values().find_map(|b| {
            let (endpoint, options) = driver.backend(b)?;
            let ip: IpAddr = b.host.parse().ok()?;
            (ip == server.ip() && endpoint.port == server.port()).then_some((b, endpoint, options))
        });
        let host = server.ip().to_string();
        let name = server.to_string();
        let plain = Endpoint {
            port: server.port(),
            tls: BackendTls::None,
            proxy_protocol: ProxyProtocol::None,
        };
        let defaults = driver.http_login_options();
        let target = match known {
            Some((b, endpoint, options)) => Target {
                name: &b.name,
                host: &b.host,
                endpoint,
                tls: b.tls.as_ref(),
                options,
                known: true,
            },
            None => Target {
                name: &name,
                host: &host,
                endpoint: &plain,
                tls: None,
                options: &defaults,
                known: false,
            },
        };
        span.record("backend", target.name);
        self.facts.backend(target.name);
        if let Some(guard) = &self.guard {
            guard.set_backend(target.name, None);
        }
        self.connect_and_login(login, &target, "auth_http", until)
            .await
    }

    /// Connects to `target` and runs the backend login machine; an accepted
    /// connection is kept for the answer.
    async fn connect_and_login(
        &mut self,
        login: LoginAs,
        target: &Target<'_, D::LoginOptions>,
        route: &'static str,
        until: std::time::Instant,
    ) -> Reached {
        let ctx = self.ctx;
        let info = self.attempt.info;
        let verified_options;
        let (creds, options) = match login {
            LoginAs::Client(creds) => (creds, target.options),
            LoginAs::Vouched { creds, master } => {
                match self.driver.verified_login_options(target.options) {
                    Some(o) => {
                        verified_options = o;
                        (creds, &verified_options)
                    }
                    None => (master.unwrap_or(creds), target.options),
                }
            }
        };
        let mut machine = self.front.start_login(creds, options, info);
        // A backend that goes DOWN while the login waits on it (in the admission
        // queue, connecting, logging in) releases the login at once: routed again, it
        // lands where the pool allows instead of waiting out a timeout. Watched from
        // before the login starts (see `Health::gone_down`).
        let gone_down = target
            .known
            .then(|| ctx.health.gone_down(target.name, D::PROTOCOL));
        let reach = self.reach(target, &mut machine, until);
        let reached = if let Some(gone_down) = gone_down {
            tokio::select! {
                r = reach => r,
                () = gone_down => {
                    info!("backend went down during the login; routing again");
                    Err(Trouble::ConnectDown)
                }
            }
        } else {
            reach.await
        };
        let (verdict, stream) = match reached {
            Ok(done) => done,
            Err(Trouble::ConnectDown) => return Reached::ConnectDown,
            Err(Trouble::Unavailable) => return Reached::Unavailable,
        };
        // A login in flight while this process stood still: its route may have been
        // moved meanwhile; it is not relayed before the change log has been read.
        if !ctx.router.serving_soon().await {
            info!("this instance is catching up on the route change log; login not served");
            return Reached::Unavailable;
        }
        // After the catch-up, so a kick it applied has reached this login.
        if self
            .guard
            .as_ref()
            .is_some_and(|g| g.token().is_cancelled())
        {
            info!("kicked during login");
            return Reached::Unavailable;
        }
        match verdict {
            Verdict::Accepted(_) => {
                if let Some(user) = &self.user {
                    ctx.limiter
                        .succeeded(user.as_str(), std::time::Instant::now());
                }
                info!(
                    mechanism = self.mechanism,
                    route,
                    auth = self.attempt.auth.as_str(),
                    tls = info.tls,
                    "login accepted"
                );
                self.accepted = Some((stream, machine.into_handoff()));
                Reached::Accepted(verdict)
            }
            // Not held through the penalty delay: a brute force must not keep backend
            // connections open by the hundred.
            Verdict::Refused(_) => Reached::Refused(verdict),
            Verdict::Failed(f) => {
                warn!(failure = ?f, "backend login did not complete");
                Reached::Failed(f)
            }
        }
    }

    /// The attempt's end: its log line, its penalty delay (cut at the deadline), and
    /// the outcome with what the session keeps.
    async fn answer(&mut self, plan: &Plan<'_>, answer: Answer) -> Login {
        let user = plan.user().map(UserName::as_str);
        if let Some(why) = answer.why {
            self.log(why, user);
        }
        let now = std::time::Instant::now();
        let limiter = &self.ctx.limiter;
        let delay = match answer.penalty {
            Penalty::None => std::time::Duration::ZERO,
            Penalty::Failure => limiter.failed(self.ip(), user, now),
            Penalty::Address => limiter.penalty(self.ip(), now),
            Penalty::AtLeast(wait) => limiter.failed(self.ip(), user, now).max(wait),
        };
        if !delay.is_zero() {
            debug!(delay_ms = delay.as_millis() as u64, "penalty delay");
            let ends = now.checked_add(delay).filter(|t| *t <= answer.until);
            tokio::time::sleep_until(Instant::from_std(ends.unwrap_or(answer.until))).await;
            if ends.is_none() {
                // The delay outlasts the session's pre-auth deadline (an auth_http
                // Auth-Wait may say an hour): the client hears a temporary failure
                // there, not the refusal.
                self.log(Why::Deadline, user);
                return Login::Verdict(Verdict::Failed(Failure::Unavailable));
            }
        }
        if answer.relay {
            return match (self.accepted.take(), self.guard.take()) {
                (Some((backend, leftover)), Some(guard)) => Login::Accepted {
                    backend,
                    leftover,
                    verdict: answer.verdict,
                    guard,
                    slot: self.slot.take(),
                },
                _ => Login::Verdict(Verdict::Failed(Failure::Unavailable)),
            };
        }
        if answer.close {
            Login::Close(answer.verdict)
        } else {
            Login::Verdict(answer.verdict)
        }
    }

    fn log(&self, why: Why, user: Option<&str>) {
        let mechanism = self.mechanism;
        match why {
            Why::Limited(limit) => warn!(
                limit = limit.as_str(),
                user, mechanism, "login refused by abuse control"
            ),
            Why::AuthzidDiffers => info!(
                mechanism,
                "login refused: authorization identity differs (proxy authentication)"
            ),
            Why::Apop(reason) => info!(reason, mechanism, "login refused"),
            Why::WrongPassword => info!(
                mechanism,
                "login refused: wrong password (proxy authentication)"
            ),
            Why::Unusable(reason) => {
                warn!(reason, mechanism, "stored password cannot be checked")
            }
            Why::HttpRefused => info!(mechanism, "login refused by auth_http"),
            Why::BackendRefused => info!(mechanism, "login refused by backend"),
            Why::Deadline => warn!("login did not finish before the pre-auth deadline"),
            // Logged where they were found.
            Why::HttpFailed | Why::PinnedElsewhere => {}
        }
    }

    /// Waits for a login slot on `target`, connects and runs the login machine: the
    /// verdict and the connection, or why not. The slot is held until the backend
    /// answers, so a slow backend admits fewer new logins, not more.
    async fn reach(
        &self,
        target: &Target<'_, D::LoginOptions>,
        machine: &mut D::Login,
        until: std::time::Instant,
    ) -> Result<(Verdict, BackendStream), Trouble> {
        let ctx = self.ctx;
        let info = self.attempt.info;
        let timeouts = &ctx.settings.timeouts;
        // The queue is left a moment before the pre-auth deadline, so that the refusal
        // is this login's (counted, logged with its reason), not the session's timeout.
        let until = Instant::from_std(until);
        let wait_until = until.checked_sub(QUEUE_MARGIN).unwrap_or(until);
        let _permit = match ctx
            .admission
            .acquire(target.name, D::PROTOCOL, wait_until)
            .await
        {
            Ok(p) => p,
            Err(why) => {
                warn!(
                    reason = why.as_str(),
                    "backend busy: no login slot (admission control)"
                );
                crate::observability::metrics::admission_refused(target.name, D::PROTOCOL, why);
                return Err(Trouble::Unavailable);
            }
        };
        let connected = backend::connect(
            target.host,
            target.endpoint,
            target.tls,
            info,
            self.attempt.client_tls,
            timeouts.backend_connect,
        )
        .await;
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "backend connect failed");
                if !target.known {
                    return Err(Trouble::Unavailable);
                }
                ctx.health
                    .report_failure(target.name, D::PROTOCOL, e.kind(), e.to_string());
                // The failure may just have taken the backend down: route again, and
                // a shared pool hands the user to another backend.
                let down = ctx.health.state(target.name, D::PROTOCOL) == BackendState::Down;
                return Err(if e.is_connect() && down {
                    Trouble::ConnectDown
                } else {
                    Trouble::Unavailable
                });
            }
        };
        let watch = target
            .known
            .then(|| ctx.health.login_started(target.name, D::PROTOCOL));
        // Cut at the pre-auth deadline too; a login the deadline cut short is not the
        // backend's timeout.
        let timed_out_at = Instant::now() + timeouts.backend_login;
        let cut = until < timed_out_at;
        let outcome = timeout_at(
            timed_out_at.min(until),
            backend::drive(machine, stream, target.tls),
        )
        .await;
        match outcome {
            Ok(Ok(done)) => {
                // The backend answered the login, yes or no: real traffic, as good a
                // sign of life as a check (an overloaded backend whose checks time out
                // is not dead).
                if let Some(w) = watch {
                    w.answered();
                    ctx.health.report(target.name, D::PROTOCOL, Ok(()));
                }
                Ok(done)
            }
            Ok(Err(e)) => {
                warn!(error = %e, "backend login failed");
                if target.known && matches!(e, BackendError::Tls(_)) {
                    ctx.health
                        .report(target.name, D::PROTOCOL, Err(e.to_string()));
                }
                Err(Trouble::Unavailable)
            }
            Err(_) if cut => {
                warn!("backend login did not finish before the pre-auth deadline");
                Err(Trouble::Unavailable)
            }
            Err(_) => {
                warn!("backend login timed out");
                if let Some(w) = watch {
                    w.timed_out();
                }
                Err(Trouble::Unavailable)
            }
        }
    }
}

/// Makes a first login's reservation the user's pin; where the user is pinned now.
async fn confirm(ctx: &Ctx, decision: &postern_route::Decision) -> Result<String, ()> {
    match ctx.router.confirm(decision).await {
        Ok(pin) if pin == decision.backend => {
            info!(
                backend = decision.backend.as_str(),
                "first login: user pinned"
            );
            Ok(pin)
        }
        Ok(pin) => {
            warn!(
                backend = decision.backend.as_str(),
                pinned = pin.as_str(),
                "user pinned elsewhere during the login; not serving this session"
            );
            Ok(pin)
        }
        Err(e) => {
            // The reservation is still stored and routes every login here, as a pin
            // does; serving the session is safe.
            warn!(error = %e, "cannot confirm the first login's pin; serving on the reservation");
            Err(())
        }
    }
}

/// Drops a failed login's reservation, so a name that never logs in keeps no pin.
async fn release(ctx: &Ctx, decision: &postern_route::Decision) {
    match ctx.router.release(decision).await {
        Ok(true) => debug!(backend = decision.backend.as_str(), "reservation released"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "cannot release the reservation; it stands as a pin"),
    }
}

/// Asks the router, and logs a refusal at the level it deserves.
async fn route(
    ctx: &Ctx,
    user: &UserName,
    protocol: postern_proto::Protocol,
    mechanism: &str,
) -> Result<postern_route::Decision, Failure> {
    match ctx.router.resolve_normalized(user.clone(), protocol).await {
        Ok(d) => {
            if d.source == Source::Stale {
                // Served from the cache because the store failed.
                ctx.health.dependency_failed();
            }
            Ok(d)
        }
        Err(e) => {
            let failure = e.failure();
            match e {
                RouteError::NoRoute | RouteError::Disabled | RouteError::InvalidUser(_) => {
                    info!(error = %e, mechanism, "login refused");
                }
                _ => {
                    // The store failing: logins that time out now may wait on it too.
                    ctx.health.dependency_failed();
                    warn!(error = %e, mechanism, "cannot route user");
                }
            }
            Err(failure)
        }
    }
}
