//! The contract between a protocol machine and the driver that does its I/O.
//!
//! Call order, for both traits: after every `handle_*` call the driver MUST drain
//! `poll_transmit` (and send those bytes) and then `poll_event` until it returns `None`.
//! Bytes queued by a machine are always meant to be sent before acting on the event that
//! follows them (e.g. the `OK` to `STARTTLS` goes out in plaintext before the handshake).

use std::net::SocketAddr;

use crate::Credentials;

/// What the driver knows about the client connection; machines use it to forward the
/// client's identity to backends that trust Postern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's address (the real one, after any trusted PROXY header).
    pub client: SocketAddr,
    /// The local address the client connected to.
    pub local: SocketAddr,
    /// Whether the client connection is encrypted right now.
    pub tls: bool,
    /// Postern's id for this session, shared with backends in logs.
    pub session_id: String,
}

/// What a client-facing machine asks the driver to do.
#[derive(Debug)]
#[must_use = "an unhandled event stalls the session"]
pub enum Event {
    /// Flush output, run a TLS server handshake on the client connection, then call
    /// `handle_tls_ready`. The machine has already dropped every byte the client sent
    /// after the command (STARTTLS injection, CVE-2011-0411).
    StartTls,
    /// Route the user, log in to the backend and answer with `handle_verdict`. The
    /// machine processes no further input until then; pipelined bytes stay buffered and
    /// are handed to the backend by `into_handoff` if the login succeeds.
    Authenticate(Credentials),
    /// Flush output, then close the connection.
    Close(CloseReason),
    /// The client misbehaved and has been answered; the driver logs the reason. Never
    /// carries client bytes, which may hold a password.
    Rejected(&'static str),
}

/// Why a machine ended the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client said goodbye.
    Logout,
    /// Too many invalid commands.
    TooManyErrors,
    /// Too many failed authentication attempts.
    TooManyAuthFailures,
    /// A line or literal over the limit that cannot be skipped safely.
    InputTooLong,
    /// The session cannot go on (e.g. the backend failed in a way the protocol
    /// cannot report per command).
    Internal,
    /// Refused by abuse control ([`FrontEnd::refuse`] or a limited login).
    Limited,
}

impl CloseReason {
    /// Short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Logout => "logout",
            CloseReason::TooManyErrors => "too_many_errors",
            CloseReason::TooManyAuthFailures => "too_many_auth_failures",
            CloseReason::InputTooLong => "input_too_long",
            CloseReason::Internal => "internal",
            CloseReason::Limited => "limited",
        }
    }
}

/// Why the driver ends a session on its own, with a goodbye in the protocol
/// ([`FrontEnd::shutdown`]; the SMTP relay has the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Shutdown {
    /// The client (or the backend) said nothing, or not enough, for too long.
    IdleTimeout,
    /// Postern is stopping.
    ServerShutdown,
    /// The session was ended on purpose: the user was moved to another backend, kicked
    /// by an operator, or their backend was taken down.
    Kicked,
}

impl Shutdown {
    /// The human part of the goodbye, in Dovecot's words (clients and log watchers know
    /// them); each protocol wraps it in its own reply.
    pub fn text(self) -> &'static str {
        match self {
            Shutdown::ServerShutdown => "Server shutting down.",
            Shutdown::IdleTimeout => "Disconnected for inactivity.",
            Shutdown::Kicked => "Session ended by the server, please reconnect.",
        }
    }
}

/// The backend's answer to a login, as raw protocol text the client-side machine of the
/// same protocol knows how to relay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// Complete lines (with CRLF) the backend sent before its final answer and that the
    /// client should see (IMAP untagged responses such as `* OK [ALERT]`).
    pub preamble: Vec<u8>,
    /// The final answer's text after the status (for IMAP: after `tag OK `), without CRLF.
    pub text: Vec<u8>,
}

/// The outcome of routing plus backend login, handed back to the client-side machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The backend accepted the login: answer the client with the backend's reply and
    /// get ready for `into_handoff`.
    Accepted(Reply),
    /// The backend refused the credentials: pass its reply on; the client may retry.
    Refused(Reply),
    /// Postern itself could not complete the login.
    Failed(Failure),
}

/// Why Postern could not complete a login; each protocol maps these to its own codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// The credentials are not acceptable (e.g. no route for the user and the policy
    /// rejects unknown users). The client may retry.
    AuthFailed,
    /// A temporary failure: the route store or the backend is unavailable. The client
    /// should retry later.
    Unavailable,
    /// Postern's abuse control refused the attempt before checking it.
    Limited(Limit),
}

/// Which abuse-control limit refused a connection or a login. Each protocol answers
/// with its own code: IMAP `[LIMIT]`, POP3 `[LOGIN-DELAY]`/`[IN-USE]`/`[SYS/TEMP]`
/// (RFC 2449, RFC 3206), SMTP `421 4.7.0`/`454 4.7.0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// Too many failed logins recently, from this address or for this user.
    AuthFailures,
    /// Too many concurrent connections from this address.
    IpConnections,
    /// Connections opened too fast from this address.
    ConnectionRate,
    /// Too many concurrent sessions of this user.
    UserSessions,
    /// Too many login attempts in progress from this address or for this user: each
    /// could still fail, and together they would pass the failure limit.
    LoginsInFlight,
}

impl Limit {
    /// The refusal's text, in the words IMAP and POP3 use (and SMTP, lowercased): the
    /// reason, how long to wait when that helps, and the limit's name as in the metrics
    /// (`postern_limit_hits_total{limit=...}`) and the logs.
    pub fn refusal_text(self, retry_after: Option<std::time::Duration>) -> String {
        let why = match self {
            Limit::ConnectionRate => "Connecting too fast",
            Limit::AuthFailures => "Too many failed logins",
            Limit::IpConnections => "Too many connections from your address",
            Limit::UserSessions => "Too many sessions for this user",
            Limit::LoginsInFlight => "Too many logins in progress",
        };
        match retry_after {
            Some(wait) => format!(
                "{why}, try again in {} s (limit: {}).",
                wait.as_secs().max(1),
                self.as_str()
            ),
            None => format!("{why}, try again later (limit: {}).", self.as_str()),
        }
    }

    /// A stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::AuthFailures => "auth_failures",
            Limit::IpConnections => "ip_connections",
            Limit::ConnectionRate => "connection_rate",
            Limit::UserSessions => "user_sessions",
            Limit::LoginsInFlight => "logins_in_flight",
        }
    }
}

/// A client-facing, pre-authentication protocol machine.
pub trait FrontEnd {
    /// The machine that logs this protocol in to a backend.
    type Login: BackendLogin;
    /// Per-backend settings for the login (method, identity forwarding).
    type LoginOptions;

    /// Feeds bytes read from the client.
    fn handle_input(&mut self, bytes: &[u8]);
    /// Reports that the TLS handshake requested by [`Event::StartTls`] finished.
    fn handle_tls_ready(&mut self);
    /// Answers the pending [`Event::Authenticate`].
    fn handle_verdict(&mut self, verdict: Verdict);
    /// Refuses the connection before anything else happens: the greeting is replaced
    /// by the protocol's refusal and an [`Event::Close`] follows. Call it right after
    /// creating the machine, instead of feeding it input. `retry_after` is how long the
    /// client should wait, when waiting helps; the refusal names the limit and the wait,
    /// so a scripted client's operator can tell what it ran into.
    fn refuse(&mut self, limit: Limit, retry_after: Option<std::time::Duration>);
    /// Ends the session from the driver's side (pre-auth timeout, server shutdown): the
    /// goodbye the protocol has for it (`* BYE`, `-ERR`, `421`) is queued, then an
    /// [`Event::Close`]. Does nothing on a closed session.
    fn shutdown(&mut self, why: Shutdown);
    /// Appends bytes to send to the client.
    fn poll_transmit(&mut self, out: &mut Vec<u8>);
    /// Returns the next action for the driver.
    fn poll_event(&mut self) -> Option<Event>;
    /// Builds the backend login for the pending authentication.
    fn start_login(
        &self,
        credentials: Credentials,
        options: &Self::LoginOptions,
        client: &ClientInfo,
    ) -> Self::Login;
    /// After an accepted verdict: the client bytes received after the login command,
    /// which the driver MUST send to the backend before relaying.
    fn into_handoff(self) -> Vec<u8>;
}

/// A backend-facing login machine: greets, forwards identity, upgrades to TLS when
/// told to, replays credentials.
pub trait BackendLogin {
    /// Feeds bytes read from the backend.
    fn handle_input(&mut self, bytes: &[u8]);
    /// Reports that the TLS handshake requested by [`LoginEvent::StartTls`] finished.
    /// Machines that never ask for TLS may keep this default, which does nothing.
    fn handle_tls_ready(&mut self) {}
    /// Appends bytes to send to the backend.
    fn poll_transmit(&mut self, out: &mut Vec<u8>);
    /// Returns the login's outcome once known.
    fn poll_event(&mut self) -> Option<LoginEvent>;
    /// After an accepted login: backend bytes received after its final answer, which the
    /// driver MUST send to the client before relaying.
    fn into_handoff(self) -> Vec<u8>
    where
        Self: Sized;
}

/// Any machine that talks to a backend before (or instead of) a relay: the logins, and
/// the health checks (greeting checks, SMTP's EHLO probe). The runtime has one driver
/// for all of them: write what the machine queued, act on its step, read, feed.
pub trait BackendMachine {
    /// What the machine ends with: a login's [`Verdict`], a check's result.
    type Outcome;
    /// Feeds bytes read from the backend.
    fn handle_input(&mut self, bytes: &[u8]);
    /// Reports that the TLS handshake requested by [`BackendStep::StartTls`] finished.
    fn handle_tls_ready(&mut self) {}
    /// Appends bytes to send to the backend.
    fn poll_transmit(&mut self, out: &mut Vec<u8>);
    /// The next step, once the machine needs one; `None` means "read more".
    fn poll_step(&mut self) -> Option<BackendStep<Self::Outcome>>;
}

/// What a [`BackendMachine`] asks its driver for.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "an unhandled step stalls the machine"]
pub enum BackendStep<O> {
    /// Flush output, run a TLS client handshake, then call `handle_tls_ready`.
    StartTls,
    /// The machine is finished. Bytes it queued before finishing (a goodbye) are
    /// already out: the driver writes before it asks for the step.
    Done(O),
}

/// Every login machine is a backend machine whose outcome is its verdict.
impl<L: BackendLogin + ?Sized> BackendMachine for L {
    type Outcome = Verdict;

    fn handle_input(&mut self, bytes: &[u8]) {
        BackendLogin::handle_input(self, bytes);
    }

    fn handle_tls_ready(&mut self) {
        BackendLogin::handle_tls_ready(self);
    }

    fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        BackendLogin::poll_transmit(self, out);
    }

    fn poll_step(&mut self) -> Option<BackendStep<Verdict>> {
        match self.poll_event()? {
            LoginEvent::StartTls => Some(BackendStep::StartTls),
            LoginEvent::Done(verdict) => Some(BackendStep::Done(verdict)),
        }
    }
}

/// What a backend login machine reports.
#[derive(Debug)]
#[must_use = "an unhandled event stalls the session"]
pub enum LoginEvent {
    /// Flush output, run a TLS client handshake on the backend connection, then call
    /// `handle_tls_ready`. The backend agreed to STARTTLS; no credential has been sent,
    /// and the machine has dropped anything the backend sent after its agreement.
    StartTls,
    /// The login finished; pass the verdict to the front end.
    Done(Verdict),
}
