//! One login attempt, from the front end's `Authenticate` event to a logged-in backend
//! connection or the verdict for the client.
//!
//! ```text
//!  normalize ─▶ abuse control ─▶ session slot ─▶ register (kicks reach us from here)
//!     ├ auth = http:    ask the auth_http server ─▶ Login(server, user, pass) ─┐
//!     │                                            └ Refuse / error ─▶ verdict │
//!     └ backend/proxy:  route ─▶ [APOP digest] ─▶ [proxy: hash check] ─────────┤
//!                                                                              ▼
//!                       connect ─▶ backend login machine ─▶ Accepted / Refused / Failed
//! ```
//! Every failure is counted by abuse control and answered after its penalty delay.

use std::net::IpAddr;
use std::time::SystemTime;

use postern_auth::auth_http::{self, AuthProtocol, Decision, Request, TlsInfo};
use postern_proto::{BackendLogin, ClientInfo, Credentials, Failure, FrontEnd, Mechanism, Verdict};
use postern_route::{Availability, BackendState, RouteError, Source, UserName};
use tokio::time::{Instant, timeout};
use tracing::{Span, debug, info, warn};

use crate::auth::Check;
use crate::backend::{self, BackendError, BackendStream, ClientTls};
use crate::ctx::Ctx;
use crate::driver::Driver;
use crate::registry::{SessionGuard, SessionInfo};
use crate::settings::{
    AuthMode, BackendTls, Endpoint, MasterLogin, MasterStyle, ProxyProtocol, TlsClient,
};

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
    /// The pre-auth deadline: `auth_http` WAIT answers end there.
    pub(crate) deadline: Instant,
}

/// Attempts per login: the pinned backend, then once more when its failure just took
/// it down and the pool lets another backend take the user.
const ATTEMPTS: usize = 2;

/// How long before the pre-auth deadline a login waiting for an admission slot gives
/// up and answers.
const QUEUE_MARGIN: std::time::Duration = std::time::Duration::from_millis(250);

fn unavailable() -> Login {
    Login::Verdict(Verdict::Failed(Failure::Unavailable))
}

/// Runs one login attempt, counting its result (metrics, access log).
pub(crate) async fn login<D: Driver>(
    ctx: &Ctx,
    driver: &D,
    front: &D::Front,
    creds: Credentials,
    attempt: &Attempt<'_>,
) -> Login {
    let outcome = login_inner::<D>(ctx, driver, front, creds, attempt).await;
    let verdict = match &outcome {
        Login::Verdict(v) | Login::Close(v) | Login::Accepted { verdict: v, .. } => v,
    };
    crate::metrics::login(D::PROTOCOL, verdict);
    crate::access_log::note_login(crate::metrics::login_result(verdict));
    outcome
}

async fn login_inner<D: Driver>(
    ctx: &Ctx,
    driver: &D,
    front: &D::Front,
    creds: Credentials,
    attempt: &Attempt<'_>,
) -> Login {
    let mechanism = creds.mechanism.as_str();
    let ip = attempt.info.client.ip();
    let limiter = &ctx.limiter;
    // Bearer tokens are the backend's to check: Postern verifies passwords only, and
    // nginx's auth_http has no method for them.
    let mode = if creds.mechanism.is_oauth() {
        AuthMode::Backend
    } else {
        attempt.auth
    };
    let user = match ctx.router.normalizer().normalize(creds.mailbox_user()) {
        Ok(u) => u,
        Err(e) => {
            info!(error = %e, mechanism, "login refused");
            return failed(limiter, ip, None, Failure::AuthFailed).await;
        }
    };
    // Held until this attempt is answered, penalty delay included: concurrent guesses
    // count against the failure limits as they happen, not only once they failed.
    let _attempt = match limiter.begin_login(ip, user.as_str(), std::time::Instant::now()) {
        Ok(ticket) => ticket,
        Err(limit) => {
            warn!(
                limit = limit.as_str(),
                user = user.as_str(),
                mechanism,
                "login refused by abuse control"
            );
            tokio::time::sleep(limiter.penalty(ip, std::time::Instant::now())).await;
            return Login::Verdict(Verdict::Failed(Failure::Limited(limit)));
        }
    };
    if mode == AuthMode::Proxy && creds.authzid.as_deref().is_some_and(|z| z != creds.user) {
        // Acting as another user needs the backend's authorization rules, which
        // Postern does not know; with proxy authentication there is no backend check.
        info!(
            mechanism,
            "login refused: authorization identity differs (proxy authentication)"
        );
        return failed(limiter, ip, Some(user.as_str()), Failure::AuthFailed).await;
    }
    let slot = match limiter.session(user.as_str(), std::time::Instant::now()) {
        Ok(slot) => slot,
        Err(limit) => {
            warn!(
                limit = limit.as_str(),
                user = user.as_str(),
                mechanism,
                "login refused by abuse control"
            );
            return Login::Verdict(Verdict::Failed(Failure::Limited(limit)));
        }
    };
    let session = Session {
        ctx,
        attempt,
        user,
        mechanism,
    };
    let outcome = match mode {
        AuthMode::Http => session.via_auth_http(driver, front, creds).await,
        AuthMode::Backend | AuthMode::Proxy => session.via_router(driver, front, creds, mode).await,
    };
    match outcome {
        Login::Accepted {
            backend,
            leftover,
            verdict,
            guard,
            slot: _,
        } => Login::Accepted {
            backend,
            leftover,
            verdict,
            guard,
            slot: Some(slot),
        },
        other => other,
    }
}

/// A login in progress, after the checks every mode shares.
struct Session<'a> {
    ctx: &'a Ctx,
    attempt: &'a Attempt<'a>,
    user: UserName,
    mechanism: &'static str,
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

impl Session<'_> {
    fn ip(&self) -> IpAddr {
        self.attempt.info.client.ip()
    }

    fn register(&self, protocol: postern_proto::Protocol) -> SessionGuard {
        self.ctx.registry.register(
            SessionInfo {
                id: self.attempt.info.session_id.clone(),
                user: self.user.as_str().to_owned(),
                protocol,
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

    async fn failed(&self, failure: Failure) -> Login {
        failed(
            &self.ctx.limiter,
            self.ip(),
            Some(self.user.as_str()),
            failure,
        )
        .await
    }

    /// `backend` and `proxy` modes: Postern's router picks the backend.
    async fn via_router<D: Driver>(
        self,
        driver: &D,
        front: &D::Front,
        creds: Credentials,
        mode: AuthMode,
    ) -> Login {
        let ctx = self.ctx;
        let mut reserved = None;
        let login = self
            .route_and_login(driver, front, creds, mode, &mut reserved)
            .await;
        match reserved {
            Some(decision) => settle(ctx, &decision, login).await,
            None => login,
        }
    }

    /// The body of [`Self::via_router`]; a first login's reservation is left in
    /// `reserved` for the caller to settle, whatever the way out.
    async fn route_and_login<D: Driver>(
        self,
        driver: &D,
        front: &D::Front,
        mut creds: Credentials,
        mode: AuthMode,
        reserved: &mut Option<postern_route::Decision>,
    ) -> Login {
        let ctx = self.ctx;
        let mechanism = self.mechanism;
        // Registered before the route is looked up: a kick from here on reaches us.
        let mut guard = self.register(D::PROTOCOL);
        let mut password_checked = false;
        for attempt in 0..ATTEMPTS {
            if let Some(previous) = reserved.take() {
                // The reserved backend failed to connect: another may take the user.
                release(ctx, &previous).await;
            }
            let decision = match route(ctx, &self.user, D::PROTOCOL, mechanism).await {
                Ok(d) => d,
                Err(Failure::AuthFailed) => {
                    if mode == AuthMode::Proxy {
                        // As long as a wrong password: who exists must not show in timing.
                        ctx.verifier.check(None, creds.password.clone()).await;
                    }
                    return self.failed(Failure::AuthFailed).await;
                }
                Err(failure) => return Login::Verdict(Verdict::Failed(failure)),
            };
            if decision.source == Source::Reserved {
                *reserved = Some(decision.clone());
            }
            if decision.source == Source::Moved {
                // This login moved the user off a draining backend, and the move's kick
                // ended every session of the user, this one included: it starts afresh
                // on the new backend.
                guard = self.register(D::PROTOCOL);
            }
            if creds.mechanism == Mechanism::Apop && !password_checked {
                // APOP proves knowledge of the password without sending it; the backend
                // can only be logged in to with the password itself, so Postern checks
                // the digest against the store's plaintext password and replays that.
                let stored = decision.record.as_ref().and_then(|r| r.password.as_ref());
                match postern_auth::apop::open(&creds, stored) {
                    Ok(password) => {
                        creds.password = password;
                        creds.mechanism = Mechanism::Cleartext;
                        creds.challenge = None;
                        password_checked = true;
                    }
                    Err(why) => {
                        info!(reason = why, mechanism, "login refused");
                        return self.failed(Failure::AuthFailed).await;
                    }
                }
            }
            if mode == AuthMode::Proxy && !password_checked {
                let stored = decision.record.as_ref().and_then(|r| r.password.clone());
                match ctx.verifier.check(stored, creds.password.clone()).await {
                    Check::Good => password_checked = true,
                    Check::Wrong => {
                        info!(
                            mechanism,
                            "login refused: wrong password (proxy authentication)"
                        );
                        return self.failed(Failure::AuthFailed).await;
                    }
                    Check::Unusable(why) => {
                        warn!(reason = why, mechanism, "stored password cannot be checked");
                        return self.failed(Failure::AuthFailed).await;
                    }
                }
            }
            if ctx.settings.normalized_login {
                creds.set_mailbox_user(decision.user.as_str());
            }
            let span = Span::current();
            span.record("user", decision.user.as_str());
            span.record("backend", decision.backend.as_str());
            crate::access_log::note_user(decision.user.as_str());
            crate::access_log::note_backend(&decision.backend);
            let temporary = (decision.source == Source::Temporary)
                .then_some(decision.pinned.as_deref())
                .flatten();
            guard.set_backend(&decision.backend, temporary);
            // Sent away from its pinned backend (failover, drain): the user's sessions
            // there end now on this instance (other instances follow the pin event),
            // before this one is served elsewhere.
            if let Some(old) = decision
                .pinned
                .as_deref()
                .filter(|o| *o != decision.backend)
            {
                let n = ctx.registry.kick_user_on(decision.user.as_str(), old);
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
            let Some(backend) = ctx.settings.backends.get(&decision.backend) else {
                warn!("backend is not configured");
                return unavailable();
            };
            let Some((endpoint, options)) = driver.backend(backend) else {
                warn!("backend is not configured for this protocol");
                return unavailable();
            };
            let target = Target {
                name: &backend.name,
                host: &backend.host,
                endpoint,
                tls: backend.tls.as_ref(),
                options,
                known: true,
            };
            // Postern vouched for the user: log in as a master user, or with XCLIENT
            // LOGIN=, not with the client's password.
            let vouched = mode == AuthMode::Proxy && password_checked;
            let creds_now = creds.clone();
            let route = decision.source.as_str();
            match self
                .connect_and_login(driver, front, creds_now, &target, vouched, route, guard)
                .await
            {
                Ok(login) => return login,
                Err((Trouble::ConnectDown, g)) if attempt + 1 < ATTEMPTS => {
                    // Registered afresh: another login of the user leaving the same
                    // down backend ends the user's sessions there, and this one, being
                    // routed again, is not one of them.
                    drop(g);
                    guard = self.register(D::PROTOCOL);
                    continue;
                }
                Err(_) => return unavailable(),
            }
        }
        unavailable()
    }

    /// `http` mode: the operator's nginx-style auth server judges the credentials and
    /// names the backend.
    async fn via_auth_http<D: Driver>(
        self,
        driver: &D,
        front: &D::Front,
        creds: Credentials,
    ) -> Login {
        let ctx = self.ctx;
        let Some(http) = &ctx.settings.auth.http else {
            warn!("auth.http is not configured");
            return unavailable();
        };
        let protocol = AuthProtocol::from_protocol(D::PROTOCOL);
        let request = protocol.and_then(|p| Request::from_credentials(&creds, p, self.ip()));
        let (Some(protocol), Some(mut request)) = (protocol, request) else {
            warn!(
                mechanism = self.mechanism,
                "no auth_http method for this login"
            );
            return self.failed(Failure::AuthFailed).await;
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
        let decision = match crate::auth_http::ask(http, &request, self.attempt.deadline).await {
            Ok(d) => d,
            Err(e) => {
                ctx.health.dependency_failed();
                warn!(error = %e, "auth_http failed");
                return Login::Close(Verdict::Failed(Failure::Unavailable));
            }
        };
        drop(request);
        let upstream = match decision {
            Decision::Login(upstream) => upstream,
            Decision::Refuse(refusal) => {
                info!(mechanism = self.mechanism, "login refused by auth_http");
                let delay = self.ctx.limiter.failed(
                    self.ip(),
                    Some(self.user.as_str()),
                    std::time::Instant::now(),
                );
                let closes = refusal.closes();
                tokio::time::sleep(refusal.delay.unwrap_or_default().max(delay)).await;
                let verdict = Verdict::Refused(refusal.reply);
                return if closes {
                    Login::Close(verdict)
                } else {
                    Login::Verdict(verdict)
                };
            }
            // `ask` loops on WAIT itself.
            Decision::AskAgain { .. } => return unavailable(),
        };
        let user = upstream.user.clone().unwrap_or_else(|| creds.user.clone());
        let span = Span::current();
        span.record("user", user.as_str());
        crate::access_log::note_user(&user);
        // The backend login, as nginx does it: the auth server's user and password
        // (a password is required for IMAP and POP3; SMTP without one means XCLIENT
        // LOGIN= only).
        let vouched = upstream.pass.is_none();
        let backend_creds = Credentials {
            mechanism: Mechanism::Cleartext,
            authzid: None,
            user,
            password: upstream.pass.unwrap_or_default(),
            challenge: None,
        };
        // A configured backend at that address brings its TLS, PROXY and login
        // settings and its health; any other address is plain TCP with defaults.
        let server = upstream.server;
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
        crate::access_log::note_backend(target.name);
        let guard = self.register(D::PROTOCOL);
        guard.set_backend(target.name, None);
        match self
            .connect_and_login(
                driver,
                front,
                backend_creds,
                &target,
                vouched,
                "auth_http",
                guard,
            )
            .await
        {
            Ok(login) => login,
            Err(_) => unavailable(),
        }
    }

    /// Connects to `target` and runs the backend login machine.
    #[allow(clippy::too_many_arguments)]
    async fn connect_and_login<D: Driver>(
        &self,
        driver: &D,
        front: &D::Front,
        mut creds: Credentials,
        target: &Target<'_, D::LoginOptions>,
        vouched: bool,
        route: &'static str,
        guard: SessionGuard,
    ) -> Result<Login, (Trouble, SessionGuard)> {
        let ctx = self.ctx;
        let info = self.attempt.info;
        let mechanism = self.mechanism;
        let verified_options;
        let options = match driver
            .verified_login_options(target.options)
            .filter(|_| vouched)
        {
            Some(o) => {
                verified_options = o;
                &verified_options
            }
            None => {
                if vouched
                    && self.attempt.auth == AuthMode::Proxy
                    && let Some(master) = &ctx.settings.auth.master
                {
                    creds = master_credentials(&creds, master);
                }
                target.options
            }
        };
        let mut machine = front.start_login(creds, options, info);
        let reach = self.reach::<D>(target, &mut machine);
        // A backend that goes DOWN while the login waits on it (in the admission
        // queue, connecting, logging in) releases the login at once: routed again, it
        // lands where the pool allows instead of waiting out a timeout.
        let reached = if target.known {
            tokio::select! {
                r = reach => r,
                () = ctx.health.gone_down(target.name, D::PROTOCOL) => {
                    info!("backend went down during the login; routing again");
                    Err(Trouble::ConnectDown)
                }
            }
        } else {
            reach.await
        };
        let (verdict, stream) = match reached {
            Ok(done) => done,
            Err(trouble) => return Err((trouble, guard)),
        };
        if guard.token().is_cancelled() {
            info!("kicked during login");
            return Err((Trouble::Unavailable, guard));
        }
        // A login in flight while this process stood still: its route may have been
        // moved meanwhile; it is not relayed before the change log has been read.
        if !ctx.router.is_serving() {
            info!("this instance is catching up on the route change log; login not served");
            return Err((Trouble::Unavailable, guard));
        }
        Ok(match verdict {
            Verdict::Accepted(_) => {
                ctx.limiter
                    .succeeded(self.user.as_str(), std::time::Instant::now());
                info!(
                    mechanism,
                    route,
                    auth = self.attempt.auth.as_str(),
                    tls = info.tls,
                    "login accepted"
                );
                Login::Accepted {
                    backend: stream,
                    leftover: machine.into_handoff(),
                    verdict,
                    guard,
                    slot: None,
                }
            }
            Verdict::Refused(_) => {
                info!(mechanism, "login refused by backend");
                // Not held through the penalty delay: a brute force must not keep
                // backend connections open by the hundred.
                drop(stream);
                let delay = ctx.limiter.failed(
                    self.ip(),
                    Some(self.user.as_str()),
                    std::time::Instant::now(),
                );
                tokio::time::sleep(delay).await;
                Login::Verdict(verdict)
            }
            Verdict::Failed(f) => {
                warn!(failure = ?f, "backend login did not complete");
                Login::Verdict(verdict)
            }
        })
    }

    /// Waits for a login slot on `target`, connects and runs the login machine: the
    /// verdict and the connection, or why not. The slot is held until the backend
    /// answers, so a slow backend admits fewer new logins, not more.
    async fn reach<D: Driver>(
        &self,
        target: &Target<'_, D::LoginOptions>,
        machine: &mut D::Login,
    ) -> Result<(Verdict, BackendStream), Trouble> {
        let ctx = self.ctx;
        let info = self.attempt.info;
        let timeouts = &ctx.settings.timeouts;
        // The queue is left a moment before the pre-auth deadline, so that the refusal
        // is this login's (counted, logged with its reason), not the session's timeout.
        let wait_until = self
            .attempt
            .deadline
            .checked_sub(QUEUE_MARGIN)
            .unwrap_or(self.attempt.deadline);
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
                crate::metrics::admission_refused(target.name, D::PROTOCOL, why);
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
        let outcome = timeout(
            timeouts.backend_login,
            backend::login(machine, stream, target.tls),
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

/// The credentials of a master-user login as `creds`'s mailbox user.
fn master_credentials(creds: &Credentials, master: &MasterLogin) -> Credentials {
    let user = creds.mailbox_user();
    match &master.style {
        MasterStyle::Separator(sep) => Credentials {
            mechanism: Mechanism::Cleartext,
            authzid: None,
            user: format!("{user}{sep}{}", master.user),
            password: master.password.clone(),
            challenge: None,
        },
        MasterStyle::Authzid => Credentials {
            mechanism: Mechanism::Plain,
            authzid: Some(user.to_owned()),
            user: master.user.clone(),
            password: master.password.clone(),
            challenge: None,
        },
    }
}

/// Counts a failed login and answers it once the address's penalty delay has passed.
async fn failed(
    limiter: &postern_limits::Limiter,
    ip: IpAddr,
    user: Option<&str>,
    failure: Failure,
) -> Login {
    let delay = limiter.failed(ip, user, std::time::Instant::now());
    if !delay.is_zero() {
        debug!(delay_ms = delay.as_millis() as u64, "penalty delay");
        tokio::time::sleep(delay).await;
    }
    Login::Verdict(Verdict::Failed(failure))
}

/// Settles a first login's reservation: a pin if the backend accepted the login, gone
/// if not. A session whose user was pinned elsewhere meanwhile is not served.
async fn settle(ctx: &Ctx, decision: &postern_route::Decision, login: Login) -> Login {
    if !matches!(login, Login::Accepted { .. }) {
        release(ctx, decision).await;
        return login;
    }
    match ctx.router.confirm(decision).await {
        Ok(pin) if pin == decision.backend => {
            info!(
                backend = decision.backend.as_str(),
                "first login: user pinned"
            );
            login
        }
        Ok(pin) => {
            // Only a failed login of the same name, releasing the reservation while
            // this one was under way, and a third login pinning elsewhere get here.
            warn!(
                backend = decision.backend.as_str(),
                pinned = pin.as_str(),
                "user pinned elsewhere during the login; not serving this session"
            );
            unavailable()
        }
        Err(e) => {
            // The reservation is still stored and routes every login here, as a pin
            // does; serving the session is safe.
            warn!(error = %e, "cannot confirm the first login's pin; serving on the reservation");
            login
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
