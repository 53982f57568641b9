//! The login plan: every decision of one login attempt, from the client's credentials
//! to the verdict, without I/O. The runtime ([`super`]) asks [`Plan::next`] what to
//! do, does it (a route lookup, a password check, a backend connect and login, an
//! `auth_http` request, a penalty delay) and feeds the result back. Nothing here
//! touches a socket, a task or the clock: `now` comes in with each input, so a test
//! replays any path — failover, reservations, APOP, proxy authentication, master
//! users, auth_http refusals, the deadline — step by step.
//!
//! ```text
//!  Normalize ─▶ BeginLogin ─▶ [authzid check] ─▶ TakeSessionSlot
//!     ├ http:    AskAuthHttp ─▶ Register ─▶ ConnectUpstream ──────────────┐
//!     └ router:  Register ─▶ Route ─▶ [APOP] ─▶ [Verify] ─▶ Assign ─▶ Connect
//!                  ▲                                                   │
//!                  └──── ConnectDown: Register, Release, Route again ◀─┤
//!                                     Accepted: [Confirm] ─▶ Answer ◀──┘
//! ```
//! Every wait the runtime performs ends at the plan's deadline: the steps that wait
//! carry it ([`Step::Answer`]'s penalty is cut there too).

use std::time::{Duration, Instant};

use postern_auth::auth_http::{Decision as HttpDecision, Upstream};
use postern_proto::{Credentials, Failure, Limit, Mechanism, Secret, Verdict};
use postern_route::{Decision, Source, UserName};

use crate::auth::Check;
use crate::settings::{AuthMode, MasterLogin, MasterStyle};

/// Attempts per login: the pinned backend, then once more when its failure just took
/// it down and the pool lets another backend take the user.
pub(crate) const ATTEMPTS: usize = 2;

/// What the plan needs to know about the listener and the configuration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Setup<'a> {
    /// The listener's `auth` mode.
    pub(crate) auth: AuthMode,
    /// `routing.normalized_login`: the backend sees the normalized name.
    pub(crate) normalized_login: bool,
    /// `auth.master`: how a user Postern vouched for is logged in to the backend.
    pub(crate) master: Option<&'a MasterLogin>,
    /// The pre-auth deadline: no wait of this login goes past it.
    pub(crate) deadline: Instant,
}

/// What the runtime reports back: the result of the last step.
#[derive(Debug)]
pub(crate) enum Input {
    /// The first call.
    Start,
    /// A step without a result is done.
    Done,
    /// [`Step::Normalize`]: the routing key, or `None` when the name cannot be one
    /// (the runtime logged why).
    Normalized(Option<UserName>),
    /// [`Step::BeginLogin`], [`Step::TakeSessionSlot`]: admitted, or the limit hit.
    Admitted(Result<(), Limit>),
    /// [`Step::Route`] (the runtime logged a refusal).
    Routed(Result<Decision, Failure>),
    /// [`Step::Verify`].
    Verified(Check),
    /// [`Step::AskAuthHttp`]: the server's decision, or why there is none.
    Asked(Result<HttpDecision, AskFailure>),
    /// [`Step::Connect`], [`Step::ConnectUpstream`].
    Reached(Reached),
    /// [`Step::Confirm`]: where the user is pinned now, or `Err` when the store could
    /// not say.
    Confirmed(Result<String, ()>),
}

/// Why the auth_http server gave no decision (the runtime logged it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AskFailure {
    /// `auth.http` is not configured: a temporary failure.
    NotConfigured,
    /// The login has no auth_http method (a mechanism nginx does not pass on): a
    /// failed login.
    NoMethod,
    /// The server is down or answered nonsense: a temporary failure, then close.
    Failed,
}

/// How connecting and logging in to a backend ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reached {
    /// The backend accepted; the runtime holds the connection.
    Accepted(Verdict),
    /// The backend refused the credentials.
    Refused(Verdict),
    /// The backend login did not complete (the machine's own failure).
    Failed(Failure),
    /// The backend could not be reached and is now down: another may take the user.
    ConnectDown,
    /// Anything else that ends in a temporary failure: busy, timed out, kicked, this
    /// instance catching up on the change log, not configured.
    Unavailable,
}

/// As whom the backend is logged in to.
#[derive(Debug)]
pub(crate) enum LoginAs {
    /// With the client's credentials.
    Client(Credentials),
    /// Postern vouched for the user: a protocol that can log in without a password
    /// (SMTP `XCLIENT LOGIN=`) does so with these credentials' name; any other uses
    /// `master` when one is configured, else the credentials themselves.
    Vouched {
        creds: Credentials,
        master: Option<Credentials>,
    },
}

/// What the runtime does next.
#[derive(Debug)]
pub(crate) enum Step {
    /// Normalize the mailbox name into a routing key.
    Normalize(String),
    /// Take the abuse-control ticket that counts this attempt while it is in flight.
    BeginLogin(UserName),
    /// Take the user's session slot.
    TakeSessionSlot(UserName),
    /// Register the session (afresh): kicks reach it from here on.
    Register,
    /// Ask the router where the user goes.
    Route(UserName),
    /// Drop a first login's reservation.
    Release(Decision),
    /// Check the password against the stored hash (`None`: a stand-in check, so that
    /// an unknown user takes as long as a wrong password).
    Verify(Option<Secret<String>>),
    /// The session goes to `decision.backend`: record it, and end the user's sessions
    /// on the backend they left (`decision.pinned`, when it differs).
    Assign(Decision),
    /// Connect to a configured backend and run the protocol's backend login.
    Connect {
        backend: String,
        login: LoginAs,
        /// How the backend was chosen, for the log.
        route: &'static str,
        /// Give up there.
        until: Instant,
    },
    /// Ask the `auth_http` server (it loops on WAIT itself, up to `until`).
    AskAuthHttp { until: Instant },
    /// Connect to the backend the `auth_http` server named and log in there.
    ConnectUpstream {
        server: core::net::SocketAddr,
        /// The name the auth server gave the user (or the client's), for the log.
        user: String,
        login: LoginAs,
        until: Instant,
    },
    /// Make a first login's reservation the user's pin.
    Confirm(Decision),
    /// The attempt is over.
    Answer(Answer),
}

/// The end of an attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) verdict: Verdict,
    /// The backend accepted and the runtime relays its connection.
    pub(crate) relay: bool,
    /// Close the connection after the verdict (nginx, after an auth_http refusal
    /// without `Auth-Wait` or an auth server error).
    pub(crate) close: bool,
    /// What to wait before answering, never past `until`.
    pub(crate) penalty: Penalty,
    pub(crate) until: Instant,
    /// Why, for the log (`None`: the step that failed logged it).
    pub(crate) why: Option<Why>,
}

/// The delay before a refusal.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Penalty {
    None,
    /// Count a failed login (the address and, when known, the user) and wait its
    /// delay.
    Failure,
    /// The address's current delay, counting nothing (a refusal by abuse control).
    Address,
    /// Count a failure and wait the longer of its delay and this (auth_http's
    /// `Auth-Wait`).
    AtLeast(Duration),
}

/// Why a login was refused, for the runtime's log line.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Why {
    /// An abuse-control limit.
    Limited(Limit),
    /// Proxy authentication cannot act as another user.
    AuthzidDiffers,
    /// The APOP digest did not check out.
    Apop(&'static str),
    /// Proxy authentication: wrong password.
    WrongPassword,
    /// Proxy authentication: the stored hash cannot be checked.
    Unusable(&'static str),
    /// The auth_http server refused.
    HttpRefused,
    /// The auth_http server could not be asked.
    HttpFailed,
    /// The backend refused the credentials.
    BackendRefused,
    /// The user was pinned elsewhere while the first login was under way.
    PinnedElsewhere,
    /// The pre-auth deadline passed.
    Deadline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Normalizing,
    BeginningLogin,
    TakingSlot,
    Asking,
    RegisteringUpstream,
    ConnectingUpstream,
    /// Before a route lookup: registered (afresh); a reservation to release first.
    Registering,
    Releasing,
    Routing,
    /// Registered afresh after a login that moved the user.
    RegisteringMoved,
    /// The stand-in check of an unknown user, then the refusal.
    Equalizing,
    Verifying,
    Assigning,
    Connecting,
    Confirming,
    /// Releasing a reservation; then the held-back answer.
    ReleasingToAnswer,
    Over,
}

/// One login attempt's plan.
pub(crate) struct Plan<'a> {
    setup: Setup<'a>,
    /// `auth`, except that bearer tokens are always the backend's to check: Postern
    /// verifies passwords only, and nginx's auth_http has no method for them.
    mode: AuthMode,
    creds: Credentials,
    user: Option<UserName>,
    phase: Phase,
    /// Routes looked up so far.
    tries: usize,
    /// The password (or APOP digest) was checked by Postern.
    password_checked: bool,
    decision: Option<Decision>,
    /// A first login's reservation, settled at the end whatever the way out.
    reserved: Option<Decision>,
    upstream: Option<Upstream>,
    /// The answer held back while a reservation is settled.
    pending: Option<Answer>,
}

impl<'a> Plan<'a> {
    pub(crate) fn new(setup: Setup<'a>, creds: Credentials) -> Self {
        let mode = if creds.mechanism.is_oauth() {
            AuthMode::Backend
        } else {
            setup.auth
        };
        Plan {
            setup,
            mode,
            creds,
            user: None,
            phase: Phase::Start,
            tries: 0,
            password_checked: false,
            decision: None,
            reserved: None,
            upstream: None,
            pending: None,
        }
    }

    /// The client's login name as typed (auth_http's request carries it).
    pub(crate) fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// The routing key, once normalized.
    pub(crate) fn user(&self) -> Option<&UserName> {
        self.user.as_ref()
    }

    /// The next step, given what the last one gave.
    pub(crate) fn next(&mut self, now: Instant, input: Input) -> Step {
        let step = self.advance(now, input);
        if let Step::Answer(_) = &step {
            self.phase = Phase::Over;
        }
        step
    }

    fn advance(&mut self, now: Instant, input: Input) -> Step {
        match self.phase {
            Phase::Start | Phase::Normalizing | Phase::BeginningLogin | Phase::TakingSlot => {
                self.admit(input)
            }
            _ => self.proceed(now, input),
        }
    }

    /// The checks every mode shares: normalization, abuse control, the session slot.
    fn admit(&mut self, input: Input) -> Step {
        match (self.phase, input) {
            (Phase::Start, Input::Start) => {
                self.phase = Phase::Normalizing;
                Step::Normalize(self.creds.mailbox_user().to_owned())
            }
            (Phase::Normalizing, Input::Normalized(Some(user))) => {
                self.user = Some(user.clone());
                self.phase = Phase::BeginningLogin;
                Step::BeginLogin(user)
            }
            (Phase::Normalizing, Input::Normalized(None)) => {
                self.fail(Failure::AuthFailed, Penalty::Failure, None)
            }
            (Phase::BeginningLogin, Input::Admitted(Err(limit))) => self.fail(
                Failure::Limited(limit),
                Penalty::Address,
                Some(Why::Limited(limit)),
            ),
            (Phase::BeginningLogin, Input::Admitted(Ok(()))) => {
                let acts_as_other = self
                    .creds
                    .authzid
                    .as_deref()
                    .is_some_and(|z| z != self.creds.user);
                if self.mode == AuthMode::Proxy && acts_as_other {
                    // Acting as another user needs the backend's authorization rules,
                    // which Postern does not know; with proxy authentication there is
                    // no backend check.
                    return self.fail(
                        Failure::AuthFailed,
                        Penalty::Failure,
                        Some(Why::AuthzidDiffers),
                    );
                }
                match self.user.clone() {
                    Some(user) => {
                        self.phase = Phase::TakingSlot;
                        Step::TakeSessionSlot(user)
                    }
                    None => self.unavailable(),
                }
            }
            (Phase::TakingSlot, Input::Admitted(Err(limit))) => self.fail(
                Failure::Limited(limit),
                Penalty::None,
                Some(Why::Limited(limit)),
            ),
            (Phase::TakingSlot, Input::Admitted(Ok(()))) => {
                if self.mode == AuthMode::Http {
                    self.phase = Phase::Asking;
                    return Step::AskAuthHttp {
                        until: self.setup.deadline,
                    };
                }
                self.phase = Phase::Registering;
                Step::Register
            }
            _ => self.unavailable(),
        }
    }

    /// Routing (or auth_http), the password checks, the backend, the settlement.
    fn proceed(&mut self, now: Instant, input: Input) -> Step {
        match (self.phase, input) {
            (Phase::Asking, Input::Asked(answer)) => self.asked(answer),
            (Phase::RegisteringUpstream, Input::Done) => self.connect_upstream(now),
            (Phase::ConnectingUpstream, Input::Reached(reached)) => self.reached(reached),
            (Phase::Registering, Input::Done) => match self.reserved.take() {
                // The reserved backend failed to connect: another may take the user.
                Some(previous) => {
                    self.phase = Phase::Releasing;
                    Step::Release(previous)
                }
                None => self.route(),
            },
            (Phase::Releasing, Input::Done) => self.route(),
            (Phase::Routing, Input::Routed(routed)) => self.routed(routed),
            (Phase::RegisteringMoved, Input::Done) => self.check_password(),
            (Phase::Equalizing, Input::Verified(_)) => {
                self.fail(Failure::AuthFailed, Penalty::Failure, None)
            }
            (Phase::Verifying, Input::Verified(check)) => match check {
                Check::Good => {
                    self.password_checked = true;
                    self.assign()
                }
                Check::Wrong => self.fail(
                    Failure::AuthFailed,
                    Penalty::Failure,
                    Some(Why::WrongPassword),
                ),
                Check::Unusable(why) => self.fail(
                    Failure::AuthFailed,
                    Penalty::Failure,
                    Some(Why::Unusable(why)),
                ),
            },
            (Phase::Assigning, Input::Done) => self.connect(now),
            (Phase::Connecting, Input::Reached(Reached::ConnectDown)) if self.tries < ATTEMPTS => {
                // Registered afresh: another login of the user leaving the same down
                // backend ends the user's sessions there, and this one, being routed
                // again, is not one of them.
                self.phase = Phase::Registering;
                Step::Register
            }
            (Phase::Connecting, Input::Reached(reached)) => self.reached(reached),
            (Phase::Confirming, Input::Confirmed(pin)) => {
                let elsewhere = match (&pin, self.decision.as_ref()) {
                    (Ok(pin), Some(decision)) => *pin != decision.backend,
                    _ => false,
                };
                if elsewhere {
                    // Only a failed login of the same name, releasing the reservation
                    // while this one was under way, and a third login pinning
                    // elsewhere get here: the session is not served.
                    self.pending = None;
                    return Step::Answer(self.answer_of(
                        Verdict::Failed(Failure::Unavailable),
                        Penalty::None,
                        Some(Why::PinnedElsewhere),
                    ));
                }
                // The reservation routes every login here, as a pin does, even when
                // the store could not confirm it: serving is safe.
                self.held_back()
            }
            (Phase::ReleasingToAnswer, Input::Done) => self.held_back(),
            // An input that does not fit the phase is a runtime bug; the client gets a
            // temporary failure, never a login that skipped a step.
            _ => self.unavailable(),
        }
    }

    fn route(&mut self) -> Step {
        let Some(user) = self.user.clone() else {
            return self.unavailable();
        };
        self.tries += 1;
        self.phase = Phase::Routing;
        Step::Route(user)
    }

    fn routed(&mut self, routed: Result<Decision, Failure>) -> Step {
        let decision = match routed {
            Ok(d) => d,
            Err(Failure::AuthFailed) if self.mode == AuthMode::Proxy => {
                // As long as a wrong password: who exists must not show in timing.
                self.phase = Phase::Equalizing;
                return Step::Verify(None);
            }
            Err(Failure::AuthFailed) => {
                return self.fail(Failure::AuthFailed, Penalty::Failure, None);
            }
            Err(failure) => return self.fail(failure, Penalty::None, None),
        };
        if decision.source == Source::Reserved {
            self.reserved = Some(decision.clone());
        }
        let moved = decision.source == Source::Moved;
        self.decision = Some(decision);
        if moved {
            // This login moved the user off a draining backend, and the move's kick
            // ended every session of the user, this one included: it starts afresh
            // on the new backend.
            self.phase = Phase::RegisteringMoved;
            return Step::Register;
        }
        self.check_password()
    }

    /// APOP's digest, then proxy authentication's password check, each once per
    /// login (a retry on another backend does not check again).
    fn check_password(&mut self) -> Step {
        let stored = self
            .decision
            .as_ref()
            .and_then(|d| d.record.as_ref())
            .and_then(|r| r.password.clone());
        if self.creds.mechanism == Mechanism::Apop && !self.password_checked {
            // APOP proves knowledge of the password without sending it; the backend
            // can only be logged in to with the password itself, so Postern checks
            // the digest against the store's plaintext password and replays that.
            match postern_auth::apop::open(&self.creds, stored.as_ref()) {
                Ok(password) => {
                    self.creds.password = password;
                    self.creds.mechanism = Mechanism::Cleartext;
                    self.creds.challenge = None;
                    self.password_checked = true;
                }
                Err(why) => {
                    return self.fail(Failure::AuthFailed, Penalty::Failure, Some(Why::Apop(why)));
                }
            }
        }
        if self.mode == AuthMode::Proxy && !self.password_checked {
            self.phase = Phase::Verifying;
            return Step::Verify(stored);
        }
        self.assign()
    }

    fn assign(&mut self) -> Step {
        let Some(decision) = self.decision.clone() else {
            return self.unavailable();
        };
        if self.setup.normalized_login {
            self.creds.set_mailbox_user(decision.user.as_str());
        }
        self.phase = Phase::Assigning;
        Step::Assign(decision)
    }

    fn login_as(&self) -> LoginAs {
        // Postern vouched for the user: log in as a master user, or with XCLIENT
        // LOGIN=, not with the client's password.
        if self.mode == AuthMode::Proxy && self.password_checked {
            let master = self
                .setup
                .master
                .map(|m| master_credentials(&self.creds, m));
            return LoginAs::Vouched {
                creds: self.creds.clone(),
                master,
            };
        }
        LoginAs::Client(self.creds.clone())
    }

    fn connect(&mut self, now: Instant) -> Step {
        if now >= self.setup.deadline {
            return self.fail(Failure::Unavailable, Penalty::None, Some(Why::Deadline));
        }
        let Some(decision) = self.decision.as_ref() else {
            return self.unavailable();
        };
        let step = Step::Connect {
            backend: decision.backend.clone(),
            login: self.login_as(),
            route: decision.source.as_str(),
            until: self.setup.deadline,
        };
        self.phase = Phase::Connecting;
        step
    }

    fn asked(&mut self, answer: Result<HttpDecision, AskFailure>) -> Step {
        let upstream = match answer {
            Ok(HttpDecision::Login(upstream)) => upstream,
            Ok(HttpDecision::Refuse(refusal)) => {
                let close = refusal.closes();
                let wait = refusal.delay.unwrap_or_default();
                let mut answer = self.answer_of(
                    Verdict::Refused(refusal.reply),
                    Penalty::AtLeast(wait),
                    Some(Why::HttpRefused),
                );
                answer.close = close;
                return Step::Answer(answer);
            }
            Err(AskFailure::NotConfigured) => return self.unavailable(),
            Err(AskFailure::NoMethod) => {
                return self.fail(Failure::AuthFailed, Penalty::Failure, None);
            }
            Err(AskFailure::Failed) => {
                let mut answer = self.answer_of(
                    Verdict::Failed(Failure::Unavailable),
                    Penalty::None,
                    Some(Why::HttpFailed),
                );
                answer.close = true;
                return Step::Answer(answer);
            }
            // The runtime loops on WAIT itself, up to the deadline.
            Ok(HttpDecision::AskAgain { .. }) => return self.unavailable(),
        };
        self.upstream = Some(upstream);
        self.phase = Phase::RegisteringUpstream;
        Step::Register
    }

    fn connect_upstream(&mut self, now: Instant) -> Step {
        if now >= self.setup.deadline {
            return self.fail(Failure::Unavailable, Penalty::None, Some(Why::Deadline));
        }
        let Some(upstream) = self.upstream.take() else {
            return self.unavailable();
        };
        // The backend login, as nginx does it: the auth server's user and password
        // (a password is required for IMAP and POP3; SMTP without one means XCLIENT
        // LOGIN= only).
        let user = upstream.user.unwrap_or_else(|| self.creds.user.clone());
        let vouched = upstream.pass.is_none();
        let creds = Credentials {
            mechanism: Mechanism::Cleartext,
            authzid: None,
            user: user.clone(),
            password: upstream.pass.unwrap_or_default(),
            challenge: None,
        };
        let login = if vouched {
            LoginAs::Vouched {
                creds,
                master: None,
            }
        } else {
            LoginAs::Client(creds)
        };
        self.phase = Phase::ConnectingUpstream;
        Step::ConnectUpstream {
            server: upstream.server,
            user,
            login,
            until: self.setup.deadline,
        }
    }

    fn reached(&mut self, reached: Reached) -> Step {
        let mut answer = match reached {
            Reached::Accepted(verdict) => self.answer_of(verdict, Penalty::None, None),
            // The runtime closes the connection before the delay: a brute force must
            // not keep backend connections open by the hundred.
            Reached::Refused(verdict) => {
                self.answer_of(verdict, Penalty::Failure, Some(Why::BackendRefused))
            }
            Reached::Failed(failure) => {
                self.answer_of(Verdict::Failed(failure), Penalty::None, None)
            }
            Reached::ConnectDown | Reached::Unavailable => {
                self.answer_of(Verdict::Failed(Failure::Unavailable), Penalty::None, None)
            }
        };
        answer.relay = matches!(answer.verdict, Verdict::Accepted(_));
        if answer.relay
            && let Some(decision) = self.reserved.take()
        {
            self.pending = Some(answer);
            self.phase = Phase::Confirming;
            return Step::Confirm(decision);
        }
        self.end(answer)
    }

    fn answer_of(&self, verdict: Verdict, penalty: Penalty, why: Option<Why>) -> Answer {
        Answer {
            verdict,
            relay: false,
            close: false,
            penalty,
            until: self.setup.deadline,
            why,
        }
    }

    /// The end; a reservation is released first (a name that never logs in keeps no
    /// pin).
    fn end(&mut self, answer: Answer) -> Step {
        match self.reserved.take() {
            Some(decision) => {
                self.pending = Some(answer);
                self.phase = Phase::ReleasingToAnswer;
                Step::Release(decision)
            }
            None => Step::Answer(answer),
        }
    }

    fn fail(&mut self, failure: Failure, penalty: Penalty, why: Option<Why>) -> Step {
        let answer = self.answer_of(Verdict::Failed(failure), penalty, why);
        self.end(answer)
    }

    fn unavailable(&mut self) -> Step {
        self.fail(Failure::Unavailable, Penalty::None, None)
    }

    fn held_back(&mut self) -> Step {
        let answer = self.pending.take().unwrap_or_else(|| {
            self.answer_of(Verdict::Failed(Failure::Unavailable), Penalty::None, None)
        });
        Step::Answer(answer)
    }
}

/// The credentials of a master-user login as `creds`'s mailbox user.
pub(crate) fn master_credentials(creds: &Credentials, master: &MasterLogin) -> Credentials {
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

#[cfg(test)]
mod tests {
    //! The plan driven by a script: each test plays the router, the password check,
    //! auth_http and the backends, and checks the steps the plan asks for.

    use std::sync::Arc;

    use postern_auth::auth_http::Refusal;
    use postern_proto::Reply;
    use postern_route::RouteRecord;

    use super::*;

    fn setup(auth: AuthMode, master: Option<&MasterLogin>) -> Setup<'_> {
        Setup {
            auth,
            normalized_login: false,
            master,
            deadline: Instant::now() + Duration::from_secs(30),
        }
    }

    fn password(user: &str) -> Credentials {
        Credentials::new(Mechanism::Plain, user.into(), b"secret".to_vec())
    }

    fn decision(backend: &str, source: Source) -> Decision {
        Decision {
            user: UserName::from_normalized("alice@example.test"),
            backend: backend.into(),
            source,
            record: None,
            pinned: None,
        }
    }

    fn with_password(mut d: Decision, stored: &str) -> Decision {
        d.record = Some(Arc::new(RouteRecord {
            password: Some(Secret::new(stored.into())),
            ..RouteRecord::default()
        }));
        d
    }

    fn accepted() -> Verdict {
        Verdict::Accepted(Reply::default())
    }

    fn refused() -> Verdict {
        Verdict::Refused(Reply::default())
    }

    /// Plays the steps every mode shares, up to the first mode-specific one.
    fn admitted(plan: &mut Plan<'_>) -> Step {
        let now = Instant::now();
        let Step::Normalize(name) = plan.next(now, Input::Start) else {
            panic!("normalize first");
        };
        let user = UserName::from_normalized(&name.to_lowercase());
        assert!(matches!(
            plan.next(now, Input::Normalized(Some(user))),
            Step::BeginLogin(_)
        ));
        assert!(matches!(
            plan.next(now, Input::Admitted(Ok(()))),
            Step::TakeSessionSlot(_)
        ));
        plan.next(now, Input::Admitted(Ok(())))
    }

    /// Router mode up to the route lookup.
    fn to_route(plan: &mut Plan<'_>) {
        assert!(matches!(admitted(plan), Step::Register));
        assert!(matches!(
            plan.next(Instant::now(), Input::Done),
            Step::Route(_)
        ));
    }

    fn answer(step: Step) -> Answer {
        match step {
            Step::Answer(a) => a,
            other => panic!("expected the answer, got {other:?}"),
        }
    }

    fn connect_to(step: &Step) -> (&str, &LoginAs) {
        match step {
            Step::Connect { backend, login, .. } => (backend, login),
            other => panic!("expected a connect, got {other:?}"),
        }
    }

    #[test]
    fn a_pinned_user_logs_in_with_their_own_credentials() {
        let mut plan = Plan::new(
            setup(AuthMode::Backend, None),
            password("Alice@example.test"),
        );
        to_route(&mut plan);
        let now = Instant::now();
        let step = plan.next(now, Input::Routed(Ok(decision("b2", Source::Pinned))));
        assert!(matches!(&step, Step::Assign(d) if d.backend == "b2"));
        let step = plan.next(now, Input::Done);
        let (backend, login) = connect_to(&step);
        assert_eq!(backend, "b2");
        assert!(matches!(login, LoginAs::Client(c) if c.user == "Alice@example.test"));
        let a = answer(plan.next(now, Input::Reached(Reached::Accepted(accepted()))));
        assert_eq!(
            (a.relay, a.close, a.penalty, a.why),
            (true, false, Penalty::None, None)
        );
        // Over: anything more is a temporary failure, never a second login.
        let late = answer(plan.next(now, Input::Done));
        assert_eq!(late.verdict, Verdict::Failed(Failure::Unavailable));
    }

    #[test]
    fn normalized_login_sends_the_routing_key_to_the_backend() {
        let mut s = setup(AuthMode::Backend, None);
        s.normalized_login = true;
        let mut plan = Plan::new(s, password("ALICE@Example.Test"));
        to_route(&mut plan);
        let now = Instant::now();
        plan.next(now, Input::Routed(Ok(decision("b1", Source::Pinned))));
        let step = plan.next(now, Input::Done);
        let (_, login) = connect_to(&step);
        assert!(matches!(login, LoginAs::Client(c) if c.user == "alice@example.test"));
    }

    #[test]
    fn a_backend_down_at_connect_is_routed_once_more_then_the_login_fails() {
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("alice"));
        to_route(&mut plan);
        let now = Instant::now();
        plan.next(now, Input::Routed(Ok(decision("b1", Source::Pinned))));
        plan.next(now, Input::Done);
        // Registered afresh, then routed again: the pool hands the user to b2.
        assert!(matches!(
            plan.next(now, Input::Reached(Reached::ConnectDown)),
            Step::Register
        ));
        assert!(matches!(plan.next(now, Input::Done), Step::Route(_)));
        let mut moved = decision("b2", Source::FailedOver);
        moved.pinned = Some("b1".into());
        assert!(matches!(
            plan.next(now, Input::Routed(Ok(moved))),
            Step::Assign(d) if d.pinned.as_deref() == Some("b1")
        ));
        let step = plan.next(now, Input::Done);
        assert_eq!(connect_to(&step).0, "b2");
        // b2 down too: no third try.
        let a = answer(plan.next(now, Input::Reached(Reached::ConnectDown)));
        assert_eq!(a.verdict, Verdict::Failed(Failure::Unavailable));
        assert!(!a.relay);
    }

    #[test]
    fn a_reservation_is_released_before_routing_again_and_confirmed_on_success() {
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("new"));
        to_route(&mut plan);
        let now = Instant::now();
        plan.next(now, Input::Routed(Ok(decision("b1", Source::Reserved))));
        plan.next(now, Input::Done);
        assert!(matches!(
            plan.next(now, Input::Reached(Reached::ConnectDown)),
            Step::Register
        ));
        assert!(matches!(plan.next(now, Input::Done), Step::Release(d) if d.backend == "b1"));
        assert!(matches!(plan.next(now, Input::Done), Step::Route(_)));
        plan.next(now, Input::Routed(Ok(decision("b2", Source::Reserved))));
        plan.next(now, Input::Done);
        assert!(matches!(
            plan.next(now, Input::Reached(Reached::Accepted(accepted()))),
            Step::Confirm(d) if d.backend == "b2"
        ));
        let a = answer(plan.next(now, Input::Confirmed(Ok("b2".into()))));
        assert!(a.relay);
    }

    #[test]
    fn a_first_login_pinned_elsewhere_meanwhile_is_not_served() {
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("new"));
        to_route(&mut plan);
        let now = Instant::now();
        plan.next(now, Input::Routed(Ok(decision("b1", Source::Reserved))));
        plan.next(now, Input::Done);
        plan.next(now, Input::Reached(Reached::Accepted(accepted())));
        let a = answer(plan.next(now, Input::Confirmed(Ok("b2".into()))));
        assert!(!a.relay);
        assert_eq!(a.why, Some(Why::PinnedElsewhere));
    }

    #[test]
    fn a_first_login_the_store_cannot_confirm_is_served_on_its_reservation() {
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("new"));
        to_route(&mut plan);
        let now = Instant::now();
        plan.next(now, Input::Routed(Ok(decision("b1", Source::Reserved))));
        plan.next(now, Input::Done);
        plan.next(now, Input::Reached(Reached::Accepted(accepted())));
        assert!(answer(plan.next(now, Input::Confirmed(Err(())))).relay);
    }

    #[test]
    fn a_refused_first_login_releases_its_reservation_then_pays_the_penalty() {
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("new"));
        to_route(&mut plan);
        let now = Instant::now();
        plan.next(now, Input::Routed(Ok(decision("b1", Source::Reserved))));
        plan.next(now, Input::Done);
        assert!(matches!(
            plan.next(now, Input::Reached(Reached::Refused(refused()))),
            Step::Release(_)
        ));
        let a = answer(plan.next(now, Input::Done));
        assert_eq!(a.verdict, refused());
        assert_eq!(a.penalty, Penalty::Failure);
        assert_eq!(a.why, Some(Why::BackendRefused));
    }

    #[test]
    fn a_move_registers_the_login_afresh() {
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("alice"));
        to_route(&mut plan);
        let now = Instant::now();
        let mut moved = decision("b2", Source::Moved);
        moved.pinned = Some("b1".into());
        assert!(matches!(
            plan.next(now, Input::Routed(Ok(moved))),
            Step::Register
        ));
        assert!(matches!(plan.next(now, Input::Done), Step::Assign(_)));
    }

    #[test]
    fn route_refusals_and_store_failures_end_the_login() {
        let now = Instant::now();
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("nobody"));
        to_route(&mut plan);
        let a = answer(plan.next(now, Input::Routed(Err(Failure::AuthFailed))));
        assert_eq!(
            (a.verdict, a.penalty),
            (Verdict::Failed(Failure::AuthFailed), Penalty::Failure)
        );
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("alice"));
        to_route(&mut plan);
        let a = answer(plan.next(now, Input::Routed(Err(Failure::Unavailable))));
        assert_eq!(
            (a.verdict, a.penalty),
            (Verdict::Failed(Failure::Unavailable), Penalty::None)
        );
    }

    #[test]
    fn abuse_control_refusals() {
        let now = Instant::now();
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("alice"));
        plan.next(now, Input::Start);
        plan.next(
            now,
            Input::Normalized(Some(UserName::from_normalized("alice"))),
        );
        let a = answer(plan.next(now, Input::Admitted(Err(Limit::AuthFailures))));
        assert_eq!(
            a.verdict,
            Verdict::Failed(Failure::Limited(Limit::AuthFailures))
        );
        assert_eq!(a.penalty, Penalty::Address);
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("alice"));
        plan.next(now, Input::Start);
        plan.next(
            now,
            Input::Normalized(Some(UserName::from_normalized("alice"))),
        );
        plan.next(now, Input::Admitted(Ok(())));
        let a = answer(plan.next(now, Input::Admitted(Err(Limit::UserSessions))));
        assert_eq!(a.penalty, Penalty::None);
        assert_eq!(a.why, Some(Why::Limited(Limit::UserSessions)));
        // A name that cannot be a routing key is a failed login.
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("bad name"));
        plan.next(now, Input::Start);
        let a = answer(plan.next(now, Input::Normalized(None)));
        assert_eq!(
            (a.verdict, a.penalty),
            (Verdict::Failed(Failure::AuthFailed), Penalty::Failure)
        );
    }

    #[test]
    fn proxy_authentication_checks_the_password_then_logs_in_as_the_master_user() {
        let master = MasterLogin {
            user: "proxy".into(),
            password: Secret::new(b"master-pw".to_vec()),
            style: MasterStyle::Separator("*".into()),
        };
        let mut plan = Plan::new(setup(AuthMode::Proxy, Some(&master)), password("alice"));
        to_route(&mut plan);
        let now = Instant::now();
        let routed = with_password(decision("b1", Source::Pinned), "{PLAIN}secret");
        let Step::Verify(Some(stored)) = plan.next(now, Input::Routed(Ok(routed))) else {
            panic!("the stored hash is checked");
        };
        assert_eq!(stored.expose(), "{PLAIN}secret");
        assert!(matches!(
            plan.next(now, Input::Verified(Check::Good)),
            Step::Assign(_)
        ));
        let step = plan.next(now, Input::Done);
        let LoginAs::Vouched { creds, master } = connect_to(&step).1 else {
            panic!("vouched for");
        };
        assert_eq!(creds.user, "alice");
        let master = master.as_ref().expect("master credentials");
        assert_eq!(master.user, "alice*proxy");
        assert_eq!(master.password.expose(), b"master-pw");
        // A retry on another backend does not check the password again.
        assert!(matches!(
            plan.next(now, Input::Reached(Reached::ConnectDown)),
            Step::Register
        ));
        plan.next(now, Input::Done);
        assert!(matches!(
            plan.next(now, Input::Routed(Ok(decision("b2", Source::FailedOver)))),
            Step::Assign(_)
        ));
    }

    #[test]
    fn proxy_authentication_refusals() {
        let now = Instant::now();
        let mut plan = Plan::new(setup(AuthMode::Proxy, None), password("alice"));
        to_route(&mut plan);
        plan.next(now, Input::Routed(Ok(decision("b1", Source::Pinned))));
        let a = answer(plan.next(now, Input::Verified(Check::Wrong)));
        assert_eq!(a.why, Some(Why::WrongPassword));
        assert_eq!(a.penalty, Penalty::Failure);
        // An unknown user costs a stand-in check, as long as a wrong password.
        let mut plan = Plan::new(setup(AuthMode::Proxy, None), password("nobody"));
        to_route(&mut plan);
        assert!(matches!(
            plan.next(now, Input::Routed(Err(Failure::AuthFailed))),
            Step::Verify(None)
        ));
        let a = answer(plan.next(now, Input::Verified(Check::Wrong)));
        assert_eq!(a.verdict, Verdict::Failed(Failure::AuthFailed));
        // Acting as another user needs the backend's rules.
        let mut creds = password("alice");
        creds.authzid = Some("bob".into());
        let mut plan = Plan::new(setup(AuthMode::Proxy, None), creds);
        plan.next(now, Input::Start);
        plan.next(
            now,
            Input::Normalized(Some(UserName::from_normalized("bob"))),
        );
        let a = answer(plan.next(now, Input::Admitted(Ok(()))));
        assert_eq!(a.why, Some(Why::AuthzidDiffers));
        // Without a master user, a vouched login uses the client's credentials.
        let mut plan = Plan::new(setup(AuthMode::Proxy, None), password("alice"));
        to_route(&mut plan);
        plan.next(now, Input::Routed(Ok(decision("b1", Source::Pinned))));
        plan.next(now, Input::Verified(Check::Good));
        let step = plan.next(now, Input::Done);
        assert!(matches!(
            connect_to(&step).1,
            LoginAs::Vouched { master: None, .. }
        ));
    }

    #[test]
    fn bearer_tokens_are_always_the_backends_to_check() {
        let creds = Credentials::new(Mechanism::XOAuth2, "alice".into(), b"token".to_vec());
        let mut plan = Plan::new(setup(AuthMode::Proxy, None), creds);
        to_route(&mut plan);
        let now = Instant::now();
        assert!(matches!(
            plan.next(now, Input::Routed(Ok(decision("b1", Source::Pinned)))),
            Step::Assign(_)
        ));
        let step = plan.next(now, Input::Done);
        assert!(matches!(connect_to(&step).1, LoginAs::Client(_)));
    }

    #[test]
    fn apop_is_opened_with_the_stored_plaintext_password() {
        // RFC 1939 §7's example.
        let mut creds = Credentials::new(
            Mechanism::Apop,
            "mrose".into(),
            b"c4c9334bac560ecc979e58001b3e22fb".to_vec(),
        );
        creds.challenge = Some("<1896.697170952@dbc.mtview.ca.us>".into());
        let mut plan = Plan::new(setup(AuthMode::Backend, None), creds.clone());
        to_route(&mut plan);
        let now = Instant::now();
        let routed = with_password(decision("b1", Source::Pinned), "tanstaaf");
        assert!(matches!(
            plan.next(now, Input::Routed(Ok(routed))),
            Step::Assign(_)
        ));
        let step = plan.next(now, Input::Done);
        let LoginAs::Client(c) = connect_to(&step).1 else {
            panic!("the client's own credentials");
        };
        assert_eq!(
            (
                c.mechanism,
                c.password.expose().as_slice(),
                c.challenge.as_deref()
            ),
            (Mechanism::Cleartext, b"tanstaaf".as_slice(), None)
        );
        // A wrong digest is a failed login.
        creds.password = Secret::new(b"00000000000000000000000000000000".to_vec());
        let mut plan = Plan::new(setup(AuthMode::Backend, None), creds);
        to_route(&mut plan);
        let routed = with_password(decision("b1", Source::Pinned), "tanstaaf");
        let a = answer(plan.next(now, Input::Routed(Ok(routed))));
        assert_eq!(a.why, Some(Why::Apop("APOP digest mismatch")));
    }

    #[test]
    fn auth_http_paths() {
        let now = Instant::now();
        let upstream = |pass: Option<&[u8]>| {
            Ok(HttpDecision::Login(Upstream {
                server: "127.0.0.1:1143".parse().unwrap(),
                user: Some("alice@backend".into()),
                pass: pass.map(|p| Secret::new(p.to_vec())),
            }))
        };
        // Login: register, then connect with the server's user and password.
        let mut plan = Plan::new(setup(AuthMode::Http, None), password("alice"));
        assert!(matches!(admitted(&mut plan), Step::AskAuthHttp { .. }));
        assert!(matches!(
            plan.next(now, Input::Asked(upstream(Some(b"pw")))),
            Step::Register
        ));
        match plan.next(now, Input::Done) {
            Step::ConnectUpstream {
                user,
                login: LoginAs::Client(c),
                ..
            } => {
                assert_eq!(
                    (user.as_str(), c.password.expose().as_slice()),
                    ("alice@backend", b"pw".as_slice())
                );
            }
            other => panic!("connect upstream, got {other:?}"),
        }
        assert!(answer(plan.next(now, Input::Reached(Reached::Accepted(accepted())))).relay);
        // SMTP without a password: vouched for (XCLIENT LOGIN=), never a master user.
        let master = MasterLogin {
            user: "proxy".into(),
            password: Secret::new(b"m".to_vec()),
            style: MasterStyle::Authzid,
        };
        let mut plan = Plan::new(setup(AuthMode::Http, Some(&master)), password("alice"));
        admitted(&mut plan);
        plan.next(now, Input::Asked(upstream(None)));
        let step = plan.next(now, Input::Done);
        assert!(matches!(
            step,
            Step::ConnectUpstream {
                login: LoginAs::Vouched { master: None, .. },
                ..
            }
        ));
        // Refused with Auth-Wait: counted, delayed at least that long, the session
        // goes on; without it, the connection closes.
        for (delay, closes) in [(Some(Duration::from_secs(3)), false), (None, true)] {
            let mut plan = Plan::new(setup(AuthMode::Http, None), password("alice"));
            admitted(&mut plan);
            let refusal = Refusal {
                reply: Reply::default(),
                delay,
            };
            let a = answer(plan.next(now, Input::Asked(Ok(HttpDecision::Refuse(refusal)))));
            assert_eq!(a.close, closes);
            assert_eq!(a.penalty, Penalty::AtLeast(delay.unwrap_or_default()));
            assert_eq!(a.why, Some(Why::HttpRefused));
        }
        // The server down: a temporary failure, then close.
        let mut plan = Plan::new(setup(AuthMode::Http, None), password("alice"));
        admitted(&mut plan);
        let a = answer(plan.next(now, Input::Asked(Err(AskFailure::Failed))));
        assert_eq!(
            (a.verdict, a.close),
            (Verdict::Failed(Failure::Unavailable), true)
        );
        // No method for this login: a failed login, counted.
        let mut plan = Plan::new(setup(AuthMode::Http, None), password("alice"));
        admitted(&mut plan);
        let a = answer(plan.next(now, Input::Asked(Err(AskFailure::NoMethod))));
        assert_eq!(
            (a.verdict, a.penalty),
            (Verdict::Failed(Failure::AuthFailed), Penalty::Failure)
        );
    }

    #[test]
    fn no_connect_starts_after_the_deadline_and_every_wait_ends_there() {
        let s = setup(AuthMode::Backend, None);
        let deadline = s.deadline;
        let mut plan = Plan::new(s, password("alice"));
        to_route(&mut plan);
        plan.next(deadline, Input::Routed(Ok(decision("b1", Source::Pinned))));
        let a = answer(plan.next(deadline, Input::Done));
        assert_eq!(a.why, Some(Why::Deadline));
        let mut plan = Plan::new(s, password("alice"));
        to_route(&mut plan);
        let now = Instant::now();
        plan.next(now, Input::Routed(Ok(decision("b1", Source::Pinned))));
        assert!(
            matches!(plan.next(now, Input::Done), Step::Connect { until, .. } if until == deadline)
        );
        let a = answer(plan.next(now, Input::Reached(Reached::Refused(refused()))));
        assert_eq!(a.until, deadline);
    }

    #[test]
    fn an_input_out_of_turn_never_logs_in() {
        let now = Instant::now();
        let mut plan = Plan::new(setup(AuthMode::Backend, None), password("alice"));
        plan.next(now, Input::Start);
        // A backend verdict before any route: refused as a runtime bug.
        let a = answer(plan.next(now, Input::Reached(Reached::Accepted(accepted()))));
        assert!(!a.relay);
        assert_eq!(a.verdict, Verdict::Failed(Failure::Unavailable));
    }
}
