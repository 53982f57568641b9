//! The client-facing submission machine, from greeting to AUTH (RFC 6409 message
//! submission, RFC 5321, RFC 4954 AUTH, RFC 3207 STARTTLS, RFC 2920 PIPELINING).
//!
//! ```text
//!            ┌──── EHLO / HELO / NOOP / RSET / HELP / VRFY / bad command ─────┐
//!            ▼                                                                │
//!  220 ─▶ Ready ──STARTTLS──▶ WaitTls ──handle_tls_ready (EHLO forgotten)──▶ Ready
//!            │  │
//!            │  └─AUTH <mechanism>──▶ Auth ◀─┐ (a sasl::Exchange: `334 ` challenge,
//!            │                         │  └──┘  one response line each)
//!            ▼ AUTH with initial response ▼
//!        WaitVerdict ◀────────────────────┘
//!            │ Accepted ─▶ 235, Done (into_handoff)    Refused / Failed ─▶ 535/454, Ready
//!  BDAT before AUTH ─▶ 530, SkipChunk (the chunk's bytes are data, not commands) ─▶ Ready
//!  QUIT, too many errors or failures, line too long ─▶ Closed
//! ```
//!
//! Replies are written in command order as each command is read, which is all
//! PIPELINING (RFC 2920 §3.1) asks of a server. What the client pipelines after AUTH
//! waits in the buffer for the verdict and goes to the backend via
//! [`FrontEnd::into_handoff`].
//!
//! ## `Reply` for SMTP
//! In a [`Verdict`], [`Reply::text`](postern_proto::Reply::text) is the backend's complete final reply line without
//! CRLF (`235 2.7.0 Authentication successful`) and [`Reply::preamble`](postern_proto::Reply::preamble) the earlier lines
//! of a multi-line reply, each with CRLF (`535-5.7.8 ...\r\n`). The front relays them
//! only when they are well-formed with the expected code class (2 for Accepted, 4 or 5
//! for Refused); otherwise it sends its own line.

use std::mem;
use std::sync::Arc;

use postern_proto::lines::{Line, LineBuf, trim_eol};
use postern_proto::sasl::{self, Exchange, SaslError, Step};
use postern_proto::{
    ClientInfo, CloseReason, Credentials, Event, Failure, FrontEnd, Limit, Mechanism, Output,
    Verdict,
};

use crate::Shutdown;
use crate::command::{self, AuthMech, Command};
use crate::ehlo;
use crate::handshake::{Verb, valid_helo};
use crate::login::{Login, LoginOptions, SessionInfo};
use crate::reply::valid_reply;

/// Settings for one submission listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Postern's host name, in the greeting and the first EHLO line.
    pub hostname: String,
    /// Text after `220 <hostname> ESMTP `.
    pub greeting: String,
    /// Extension lines to advertise, normally [`crate::advertised_extensions`] of a
    /// backend's EHLO reply. Lines outside the allowlist are ignored; STARTTLS and AUTH
    /// are added by the front end itself.
    pub extensions: Vec<String>,
    /// Whether STARTTLS can be offered (the listener has a certificate and is not
    /// implicit TLS).
    pub starttls: bool,
    /// Allow AUTH before TLS. Off by default: credentials in cleartext.
    pub insecure_plaintext_auth: bool,
    /// Longest command line, CRLF included.
    pub max_line: usize,
    /// Longest line of an AUTH command or a SASL response, CRLF included.
    pub max_auth_line: usize,
    /// Invalid or out-of-sequence commands tolerated before the connection is closed.
    pub max_bad_commands: u32,
    /// Failed authentications tolerated on one connection before it is closed.
    pub max_auth_failures: u32,
    /// Offer and accept XOAUTH2 and OAUTHBEARER: the user comes from the message, the
    /// token goes to the backend unchanged.
    pub oauth: bool,
    /// Commands accepted before authentication, all kinds together; then 421.
    pub max_commands: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            greeting: "Postern ready".into(),
            // What every Postfix offers; the driver should replace it with a probe.
            extensions: vec![
                "PIPELINING".into(),
                "8BITMIME".into(),
                "ENHANCEDSTATUSCODES".into(),
            ],
            starttls: true,
            insecure_plaintext_auth: false,
            // RFC 5321 says 512, but MAIL/RCPT parameters (DSN, SIZE, SMTPUTF8) make
            // longer lines legitimate; smtp-proto's own receiver stops at 4 KiB.
            max_line: 4096,
            // RFC 4954 §4 allows AUTH lines of 12 288 bytes; an OAuth bearer token can be
            // several KiB of base64.
            max_auth_line: 16 * 1024,
            max_bad_commands: 10,
            max_auth_failures: 3,
            oauth: false,
            // A real client needs a handful (EHLO twice, STARTTLS, AUTH, retries); this
            // bounds what a connection can make Postern do before it authenticates.
            max_commands: 50,
        }
    }
}

/// Bytes a client may pipeline behind AUTH while the login runs (RFC 4954 §4 allows
/// commands after an AUTH with initial response).
const MAX_PIPELINED_AFTER_AUTH: usize = 64 * 1024;

#[derive(Debug)]
enum State {
    Ready,
    Auth(Exchange),
    /// Discarding the data of a BDAT refused before authentication.
    SkipChunk {
        remaining: usize,
    },
    WaitTls,
    WaitVerdict,
    Done,
    Closed,
}

/// The client side of a submission session until it is handed to the relay.
#[derive(Debug)]
pub struct Front {
    opts: Arc<Options>,
    state: State,
    input: LineBuf,
    out: Output,
    tls: bool,
    /// The client's greeting; AUTH needs EHLO, and the login replays the name.
    helo: Option<(Verb, String)>,
    client_name: Option<String>,
    bad_commands: u32,
    auth_failures: u32,
    commands: u32,
}

impl Front {
    /// Starts a session and queues the greeting. `tls` says whether the connection is
    /// already encrypted (implicit TLS, port 465).
    pub fn new(opts: Arc<Options>, tls: bool) -> Self {
        let mut front = Self {
            opts,
            state: State::Ready,
            input: LineBuf::new(),
            out: Output::new(),
            tls,
            helo: None,
            client_name: None,
            bad_commands: 0,
            auth_failures: 0,
            commands: 0,
        };
        let greeting = format!("220 {} ESMTP {}", front.opts.hostname, front.opts.greeting);
        front.out.line(&greeting);
        front
    }

    /// Sets the client's verified host name (reverse DNS checked by the driver), for the
    /// XCLIENT NAME attribute. Without it the backend gets `[UNAVAILABLE]`. Invalid
    /// names are ignored.
    pub fn set_client_name(&mut self, name: &str) {
        if valid_helo(name) {
            self.client_name = Some(name.to_owned());
        }
    }

    /// The client's EHLO/HELO argument, once it has sent one.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_ref().map(|(_, name)| name.as_str())
    }

    /// Ends the session from the driver's side (idle timeout, server shutdown): queues
    /// a 421 reply and an [`Event::Close`].
    pub fn shutdown(&mut self, why: Shutdown) {
        if matches!(self.state, State::Closed | State::Done) {
            return;
        }
        let line = crate::shutdown_reply(why, &self.opts.hostname);
        self.out.line(&line);
        self.close(CloseReason::Internal);
    }

    fn auth_allowed(&self) -> bool {
        self.tls || self.opts.insecure_plaintext_auth
    }

    fn close(&mut self, reason: CloseReason) {
        self.state = State::Closed;
        self.input.clear();
        self.out.event(Event::Close(reason));
    }

    fn process(&mut self) {
        loop {
            match &mut self.state {
                State::Ready | State::Auth(_) => {}
                State::SkipChunk { remaining } => {
                    let n = (*remaining).min(self.input.len());
                    *remaining -= n;
                    let done = *remaining == 0;
                    self.input.consume(n);
                    if !done {
                        return;
                    }
                    self.state = State::Ready;
                    continue;
                }
                State::WaitTls | State::WaitVerdict | State::Done | State::Closed => return,
            }
            let in_sasl = !matches!(self.state, State::Ready);
            let max = if in_sasl || self.input.raw(5).eq_ignore_ascii_case(b"AUTH ") {
                self.opts.max_auth_line
            } else {
                self.opts.max_line
            };
            match self.input.poll(max) {
                Line::Incomplete => return,
                Line::TooLong => {
                    self.out.line("500 5.5.0 Error: line too long");
                    self.out.event(Event::Rejected("line too long"));
                    return self.close(CloseReason::InputTooLong);
                }
                Line::Complete(len) => {
                    let raw = self.input.raw(len).to_vec();
                    self.input.consume(len);
                    if in_sasl {
                        let line = trim_eol(&raw);
                        self.sasl_response(line);
                    } else {
                        self.command(&raw);
                    }
                }
            }
        }
    }

    fn command(&mut self, raw: &[u8]) {
        self.commands = self.commands.saturating_add(1);
        if self.commands > self.opts.max_commands {
            let line = format!(
                "421 4.7.0 {} Error: too many commands before authentication",
                self.opts.hostname
            );
            self.out.line(&line);
            self.out
                .event(Event::Rejected("too many commands before authentication"));
            return self.close(CloseReason::TooManyErrors);
        }
        let cmd = match command::parse(raw) {
            Ok(cmd) => cmd,
            Err(bad) => return self.bad(bad.reply, bad.reason),
        };
        match cmd {
            Command::Ehlo(name) => self.ehlo(Verb::Ehlo, name),
            Command::Helo(name) => self.ehlo(Verb::Helo, name),
            Command::Lhlo(_) => self.bad("500 5.5.2 Error: command not recognized", "LHLO"),
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial),
            Command::Mail | Command::Rcpt(_) | Command::Data => self.need_auth(),
            Command::Bdat { size, .. } => {
                self.need_auth();
                if !matches!(self.state, State::Closed) {
                    self.state = State::SkipChunk { remaining: size };
                }
            }
            Command::Rset | Command::Noop => self.out.line("250 2.0.0 Ok"),
            Command::Quit => {
                self.out.line("221 2.0.0 Bye");
                self.close(CloseReason::Logout);
            }
            Command::Vrfy => self.out.line("252 2.0.0 Cannot VRFY user"),
            Command::Help => self
                .out
                .line("214 2.0.0 Commands: EHLO HELO STARTTLS AUTH NOOP RSET QUIT"),
            Command::NotImplemented => {
                self.bad(
                    "502 5.5.1 Error: command not implemented",
                    "command not implemented",
                );
            }
        }
    }

    fn ehlo(&mut self, verb: Verb, name: String) {
        if !valid_helo(&name) {
            return self.bad("501 5.5.4 Syntax: EHLO hostname", "invalid EHLO argument");
        }
        if verb == Verb::Helo {
            let line = format!("250 {}", self.opts.hostname);
            self.out.line(&line);
        } else {
            let mut lines: Vec<String> = self
                .opts
                .extensions
                .iter()
                .filter(|l| ehlo::allowed(l))
                .cloned()
                .collect();
            if !self.tls && self.opts.starttls {
                lines.push("STARTTLS".into());
            }
            if self.auth_allowed() {
                lines.push(if self.opts.oauth {
                    "AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER".into()
                } else {
                    "AUTH PLAIN LOGIN".into()
                });
            }
            let reply = multi_line(250, &self.opts.hostname, &lines);
            self.out.extend_from_slice(reply.as_bytes());
        }
        self.helo = Some((verb, name));
    }

    fn starttls(&mut self) {
        if self.tls {
            return self.bad("503 5.5.1 Error: TLS already active", "STARTTLS under TLS");
        }
        if !self.opts.starttls {
            return self.bad(
                "502 5.5.1 Error: command not implemented",
                "STARTTLS not offered",
            );
        }
        self.out.line("220 2.0.0 Ready to start TLS");
        if !self.input.is_empty() {
            self.out.event(Event::Rejected(
                "discarded plaintext pipelined after STARTTLS",
            ));
        }
        self.input.clear();
        self.state = State::WaitTls;
        self.out.event(Event::StartTls);
    }

    fn auth(&mut self, mechanism: AuthMech, initial: Option<String>) {
        if !matches!(self.helo, Some((Verb::Ehlo, _))) {
            return self.bad("503 5.5.1 Error: send EHLO first", "AUTH before EHLO");
        }
        if !self.auth_allowed() {
            self.out
                .line("530 5.7.0 Must issue a STARTTLS command first");
            self.out
                .event(Event::Rejected("plaintext authentication before TLS"));
            return self.count_bad();
        }
        let mechanism = match mechanism {
            AuthMech::Plain => Mechanism::Plain,
            AuthMech::Login => Mechanism::Login,
            AuthMech::XOAuth2 if self.opts.oauth => Mechanism::XOAuth2,
            AuthMech::OAuthBearer if self.opts.oauth => Mechanism::OAuthBearer,
            _ => return self.out.line("504 5.5.4 Unrecognized authentication type"),
        };
        let initial = initial.as_deref().map(str::as_bytes);
        self.sasl_step(Exchange::start(mechanism, initial));
    }

    fn sasl_response(&mut self, line: &[u8]) {
        match mem::replace(&mut self.state, State::Ready) {
            State::Auth(exchange) => self.sasl_step(exchange.feed(line)),
            other => self.state = other,
        }
    }

    fn sasl_step(&mut self, step: Step) {
        match step {
            Step::Challenge(exchange) => {
                self.out
                    .line(&format!("334 {}", sasl::encode(exchange.challenge())));
                self.state = State::Auth(exchange);
            }
            Step::Done(creds) => self.authenticate(creds),
            Step::Failed(SaslError::Cancelled) => {
                self.out.line("501 5.7.0 Authentication aborted");
            }
            Step::Failed(SaslError::BadBase64) => {
                self.bad("501 5.5.2 Cannot decode response", "bad base64");
            }
            Step::Failed(_) => self.undecodable(),
        }
    }

    fn authenticate(&mut self, creds: Credentials) {
        self.state = State::WaitVerdict;
        self.out.event(Event::Authenticate(creds));
    }

    fn need_auth(&mut self) {
        if self.auth_allowed() {
            self.out.line("530 5.7.0 Authentication required");
        } else {
            self.out
                .line("530 5.7.0 Must issue a STARTTLS command first");
        }
        self.out
            .event(Event::Rejected("mail transaction before authentication"));
        self.count_bad();
    }

    /// Credentials that cannot be decoded get the failed-login reply, and a log line:
    /// a guesser must not go unseen because its input was malformed.
    fn undecodable(&mut self) {
        self.out.event(Event::Rejected("undecodable credentials"));
        self.auth_failed();
    }

    fn auth_failed(&mut self) {
        self.out
            .line("535 5.7.8 Authentication credentials invalid");
        self.count_auth_failure();
    }

    fn count_auth_failure(&mut self) {
        self.auth_failures += 1;
        if self.auth_failures >= self.opts.max_auth_failures {
            let line = format!(
                "421 4.7.0 {} Error: too many authentication failures",
                self.opts.hostname
            );
            self.out.line(&line);
            self.close(CloseReason::TooManyAuthFailures);
        }
    }

    fn bad(&mut self, reply: &str, reason: &'static str) {
        self.out.line(reply);
        self.out.event(Event::Rejected(reason));
        self.count_bad();
    }

    fn count_bad(&mut self) {
        self.bad_commands += 1;
        if self.bad_commands > self.opts.max_bad_commands {
            let line = format!("421 4.7.0 {} Error: too many errors", self.opts.hostname);
            self.out.line(&line);
            self.close(CloseReason::TooManyErrors);
        }
    }
}

/// `code-first\r\ncode-line...\r\ncode last\r\n`.
pub(crate) fn multi_line(code: u16, first: &str, rest: &[String]) -> String {
    let mut out = String::new();
    let all = std::iter::once(first).chain(rest.iter().map(String::as_str));
    let n = rest.len();
    for (i, line) in all.enumerate() {
        let sep = if i == n { ' ' } else { '-' };
        out.push_str(&format!("{code}{sep}{line}\r\n"));
    }
    out
}

impl FrontEnd for Front {
    type Login = Login;
    type LoginOptions = LoginOptions;

    fn handle_input(&mut self, bytes: &[u8]) {
        match self.state {
            State::Closed => {}
            // The driver runs the handshake on these bytes; should it pass them here
            // anyway, they are plaintext sent before TLS and must not become commands.
            State::WaitTls => {
                self.out.event(Event::Rejected(
                    "discarded plaintext pipelined after STARTTLS",
                ));
            }
            // After the verdict, bytes belong to the backend (see `into_handoff`).
            State::Done => self.input.push(bytes),
            _ => {
                self.input.push(bytes);
                self.process();
                // Commands pipelined behind AUTH wait for the verdict; a client that
                // keeps sending meanwhile cannot grow the buffer without bound.
                if matches!(self.state, State::WaitVerdict)
                    && self.input.len() > MAX_PIPELINED_AFTER_AUTH
                {
                    let line = format!(
                        "421 4.7.0 {} Error: too much pipelined input",
                        self.opts.hostname
                    );
                    self.out.line(&line);
                    self.out
                        .event(Event::Rejected("too much input pipelined after AUTH"));
                    self.close(CloseReason::InputTooLong);
                }
            }
        }
    }

    fn handle_tls_ready(&mut self) {
        if matches!(self.state, State::WaitTls) {
            self.tls = true;
            // RFC 3207 §4.2: the server MUST discard knowledge obtained from the client
            // before TLS, such as the EHLO argument.
            self.helo = None;
            self.state = State::Ready;
            self.process();
        }
    }

    fn handle_verdict(&mut self, verdict: Verdict) {
        if !matches!(self.state, State::WaitVerdict) {
            return;
        }
        self.state = State::Ready;
        match verdict {
            Verdict::Accepted(reply) => {
                if valid_reply(&reply, b"2") && reply.text.starts_with(b"235") {
                    self.out.extend_from_slice(&reply.preamble);
                    self.out.extend_from_slice(&reply.text);
                    self.out.extend_from_slice(b"\r\n");
                } else {
                    self.out.line("235 2.7.0 Authentication successful");
                }
                self.state = State::Done;
                return;
            }
            Verdict::Refused(reply) => {
                if valid_reply(&reply, b"45") {
                    self.out.extend_from_slice(&reply.preamble);
                    self.out.extend_from_slice(&reply.text);
                    self.out.extend_from_slice(b"\r\n");
                    self.count_auth_failure();
                } else {
                    self.auth_failed();
                }
            }
            Verdict::Failed(Failure::AuthFailed) => self.auth_failed(),
            Verdict::Failed(Failure::Limited(Limit::UserSessions)) => {
                self.out
                    .line("454 4.7.0 Too many sessions for this user, try again later");
            }
            Verdict::Failed(Failure::Limited(limit)) => {
                let line = crate::connection_refused(&self.opts.hostname, limit, None);
                self.out.line(&line);
                return self.close(CloseReason::Limited);
            }
            Verdict::Failed(_) => self.out.line("454 4.7.0 Temporary authentication failure"),
        }
        self.process();
    }

    fn shutdown(&mut self, why: Shutdown) {
        Front::shutdown(self, why);
    }

    fn refuse(&mut self, limit: Limit, retry_after: Option<std::time::Duration>) {
        self.out.clear();
        let line = crate::connection_refused(&self.opts.hostname, limit, retry_after);
        self.out.line(&line);
        self.close(CloseReason::Limited);
    }

    fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        self.out.poll_transmit(out);
    }

    fn poll_event(&mut self) -> Option<Event> {
        self.out.poll_event()
    }

    fn start_login(
        &self,
        credentials: Credentials,
        options: &LoginOptions,
        client: &ClientInfo,
    ) -> Login {
        let session = SessionInfo {
            hostname: self.opts.hostname.clone(),
            helo: self.helo().unwrap_or(&self.opts.hostname).to_owned(),
            client_name: self.client_name.clone(),
        };
        Login::new(credentials, session, options, client)
    }

    fn into_handoff(self) -> Vec<u8> {
        self.input.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_replies() {
        assert_eq!(multi_line(250, "h", &[]), "250 h\r\n");
        assert_eq!(
            multi_line(250, "h", &["A".into(), "B 1".into()]),
            "250-h\r\n250-A\r\n250 B 1\r\n"
        );
    }
}
