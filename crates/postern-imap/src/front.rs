//! The client-facing IMAP machine, from greeting to login (RFC 9051 / 3501 §6.1–6.2,
//! RFC 7888 LITERAL+, RFC 4959 SASL-IR, RFC 2971 ID, RFC 5530 response codes).
//!
//! ```text
//!            ┌────────── CAPABILITY / NOOP / ID / bad command ──────────┐
//!            ▼                                                          │
//!  greet ─▶ Ready ──STARTTLS──▶ WaitTls ──handle_tls_ready──▶ Ready ────┘
//!            │  │
//!            │  └─AUTHENTICATE─▶ Auth ◀─┐ (a sasl::Exchange: `+ ` challenge,
//!            │                     │  └──┘  one response line each)
//!            ▼ LOGIN               ▼
//!        WaitVerdict ◀─────────────┘
//!            │ Accepted ─▶ Done (into_handoff)      Refused / Failed ─▶ Ready
//!  LOGOUT, too many errors, input too long ─▶ Closed
//! ```

use std::mem;
use std::sync::Arc;

use imap_codec::CommandCodec;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::command::CommandBody;
use postern_proto::lines::trim_eol;
use postern_proto::sasl::{self, Exchange, SaslError, Step};
use postern_proto::{
    ClientInfo, CloseReason, Credentials, Event, Failure, FrontEnd, Limit, Mechanism, Output,
    Reply, Shutdown, Verdict,
};

use crate::framing::{self, Frame, Framer, Limits, Mode};
use crate::id::ClientId;
use crate::login::{Login, LoginOptions};

/// The longest ID command accepted, whatever `max_line` says: RFC 2971's 30 pairs of
/// a 30-octet field and a 1024-octet value, every octet escaped in a quoted string
/// (2 × 30 × 1054 = 63 240), plus the tag, the parentheses and the spaces.
pub const MAX_ID_LINE: usize = 64 * 1024;

/// Settings for one listener's IMAP front end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Text after `* OK [CAPABILITY ...] ` in the greeting.
    pub greeting: String,
    /// Whether STARTTLS can be offered (the listener has a certificate and is not
    /// implicit TLS).
    pub starttls: bool,
    /// Allow LOGIN/AUTHENTICATE before TLS. Off by default: credentials in cleartext.
    pub insecure_plaintext_auth: bool,
    /// Longest command line, literals included, before authentication.
    pub max_line: usize,
    /// Largest literal accepted before authentication (user names and passwords).
    pub max_literal: usize,
    /// Invalid commands tolerated before the connection is closed.
    pub max_bad_commands: u32,
    /// Failed logins tolerated on one connection before it is closed.
    pub max_auth_failures: u32,
    /// Offer and accept XOAUTH2 and OAUTHBEARER: the user comes from the message, the
    /// token goes to the backend unchanged.
    pub oauth: bool,
    /// Commands accepted before authentication, all kinds together; then `* BYE`.
    pub max_commands: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            greeting: "Postern ready.".into(),
            starttls: true,
            insecure_plaintext_auth: false,
            // Large enough for an AUTHENTICATE line with an OAuth token or a long
            // password; Dovecot's own pre-login limit is of the same order.
            max_line: 16 * 1024,
            max_literal: 8 * 1024,
            max_bad_commands: 10,
            max_auth_failures: 3,
            oauth: false,
            // A real client needs a handful (CAPABILITY, ID, STARTTLS, LOGIN, retries);
            // this bounds what a connection can make Postern do before it logs in.
            max_commands: 50,
        }
    }
}

#[derive(Debug)]
enum State {
    Ready,
    Auth { tag: String, exchange: Exchange },
    WaitTls,
    WaitVerdict { tag: String },
    Done,
    Closed,
}

/// The client side of an IMAP session until it is handed to the relay.
#[derive(Debug)]
pub struct Front {
    opts: Arc<Options>,
    state: State,
    framer: Framer,
    out: Output,
    tls: bool,
    bad_commands: u32,
    auth_failures: u32,
    commands: u32,
    client_id: Option<ClientId>,
}

impl Front {
    /// Starts a session and queues the greeting. `tls` says whether the connection is
    /// already encrypted (implicit TLS).
    pub fn new(opts: Arc<Options>, tls: bool) -> Self {
        let mut front = Self {
            opts,
            state: State::Ready,
            framer: Framer::new(),
            out: Output::new(),
            tls,
            bad_commands: 0,
            auth_failures: 0,
            commands: 0,
            client_id: None,
        };
        let greeting = format!(
            "* OK [CAPABILITY {}] {}\r\n",
            front.capabilities(),
            front.opts.greeting
        );
        front.out.extend_from_slice(greeting.as_bytes());
        front
    }

    /// The client's ID, if it sent one.
    pub fn client_id(&self) -> Option<&ClientId> {
        self.client_id.as_ref()
    }

    /// Whether the session may authenticate now.
    fn auth_allowed(&self) -> bool {
        self.tls || self.opts.insecure_plaintext_auth
    }

    /// The pre-login capability list: only what this front end itself implements.
    /// Post-login capabilities come from the backend's tagged OK.
    fn capabilities(&self) -> String {
        let mut caps = String::from("IMAP4rev1 SASL-IR LITERAL+ ID");
        if !self.tls && self.opts.starttls {
            caps.push_str(" STARTTLS");
        }
        if self.auth_allowed() {
            caps.push_str(" AUTH=PLAIN AUTH=LOGIN");
            if self.opts.oauth {
                caps.push_str(" AUTH=XOAUTH2 AUTH=OAUTHBEARER");
            }
        } else {
            caps.push_str(" LOGINDISABLED");
        }
        caps
    }

    fn limits(&self) -> Limits {
        // ID may be as long as RFC 2971 allows (Dovecot answers it); only ID, and only
        // once its name is in: until then the line is under `max_line`, the same as any
        // other, and the framer cannot buffer past it without the name arriving first.
        let id = matches!(self.state, State::Ready)
            && framing::is_command(self.framer.message(self.framer.buffered()), b"ID");
        Limits {
            max_message: if id {
                self.opts.max_line.max(MAX_ID_LINE)
            } else {
                self.opts.max_line
            },
            max_literal: self.opts.max_literal,
        }
    }

    fn close(&mut self, reason: CloseReason) {
        self.state = State::Closed;
        self.framer.clear();
        self.out.event(Event::Close(reason));
    }

    /// Runs every complete command in the buffer, in order, until one needs the driver.
    fn process(&mut self) {
        loop {
            let mode = match self.state {
                State::Ready => Mode::Command,
                State::Auth { .. } => Mode::Line,
                State::WaitTls | State::WaitVerdict { .. } | State::Done | State::Closed => {
                    return;
                }
            };
            match self.framer.poll(mode, self.limits()) {
                Frame::Incomplete => return,
                Frame::Continue => self.out.line("+ OK"),
                Frame::Message(len) => {
                    let message = self.framer.message(len).to_vec();
                    self.framer.consume(len);
                    if mode == Mode::Command {
                        self.command(&message);
                    } else {
                        self.sasl_response(trim_eol(&message));
                    }
                }
                Frame::TooLong => {
                    let tag = framing::tag_of(self.framer.message(self.framer.buffered()))
                        .unwrap_or("*")
                        .to_owned();
                    self.out.line(&format!("{tag} BAD Command line too long."));
                    self.out.line("* BYE Input too long, closing connection.");
                    self.out.event(Event::Rejected("line too long"));
                    self.close(CloseReason::InputTooLong);
                }
                Frame::LiteralTooLarge { sync } => {
                    let tag = framing::tag_of(self.framer.message(self.framer.buffered()))
                        .unwrap_or("*")
                        .to_owned();
                    self.out
                        .line(&format!("{tag} BAD [TOOBIG] Literal too large."));
                    self.out.event(Event::Rejected("literal too large"));
                    if sync {
                        self.framer.discard_scanned();
                        self.count_bad();
                    } else {
                        // The data is already on its way and cannot be told apart from
                        // commands: the only safe answer is to close.
                        self.out
                            .line("* BYE Literal too large, closing connection.");
                        self.close(CloseReason::InputTooLong);
                    }
                }
            }
        }
    }

    fn command(&mut self, message: &[u8]) {
        self.commands = self.commands.saturating_add(1);
        if self.commands > self.opts.max_commands {
            self.out.line("* BYE Too many commands before login.");
            self.out
                .event(Event::Rejected("too many commands before login"));
            return self.close(CloseReason::TooManyErrors);
        }
        let command = match CommandCodec::default().decode(message) {
            Ok((b"", command)) => command,
            _ => {
                let tag = framing::tag_of(message).unwrap_or("*").to_owned();
                return self.bad(
                    &tag,
                    "Error in IMAP command: unknown command or bad syntax.",
                );
            }
        };
        let tag = command.tag.inner().to_owned();
        match command.body {
            CommandBody::Capability => {
                let caps = format!("* CAPABILITY {}", self.capabilities());
                self.out.line(&caps);
                self.out.line(&format!("{tag} OK Capability completed."));
            }
            CommandBody::Noop => self.out.line(&format!("{tag} OK NOOP completed.")),
            CommandBody::Logout => {
                self.out.line("* BYE Logging out.");
                self.out.line(&format!("{tag} OK Logout completed."));
                self.close(CloseReason::Logout);
            }
            CommandBody::StartTLS => self.starttls(&tag),
            CommandBody::Id { parameters } => {
                let pairs = parameters.iter().flatten().map(|(k, v)| {
                    let v = v.0.as_ref().map(|v| v.as_ref());
                    (k.as_ref(), v)
                });
                self.client_id = Some(ClientId::sanitize(pairs));
                self.out.line("* ID NIL");
                self.out.line(&format!("{tag} OK ID completed."));
            }
            CommandBody::Login { username, password } => {
                if !self.auth_allowed() {
                    return self.privacy_required(&tag);
                }
                let Ok(user) = sasl::identity(username.as_ref()) else {
                    return self.undecodable(&tag);
                };
                let password = password.declassify().as_ref().to_vec();
                self.authenticate(tag, Credentials::new(Mechanism::Cleartext, user, password));
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                if !self.auth_allowed() {
                    return self.privacy_required(&tag);
                }
                let mechanism = match mechanism {
                    AuthMechanism::Plain => Mechanism::Plain,
                    AuthMechanism::Login => Mechanism::Login,
                    AuthMechanism::XOAuth2 if self.opts.oauth => Mechanism::XOAuth2,
                    AuthMechanism::OAuthBearer if self.opts.oauth => Mechanism::OAuthBearer,
                    _ => {
                        return self
                            .out
                            .line(&format!("{tag} NO Unsupported authentication mechanism."));
                    }
                };
                let ir = initial_response.map(|ir| ir.declassify().to_vec());
                self.sasl_step(tag, Exchange::start_decoded(mechanism, ir));
            }
            _ => self.bad(&tag, "Command not permitted before authentication."),
        }
    }

    fn starttls(&mut self, tag: &str) {
        if self.tls {
            return self.bad(tag, "TLS is already active.");
        }
        if !self.opts.starttls {
            return self.bad(tag, "STARTTLS is not available.");
        }
        self.out
            .line(&format!("{tag} OK Begin TLS negotiation now."));
        if self.framer.buffered() > 0 {
            self.out.event(Event::Rejected(
                "discarded plaintext pipelined after STARTTLS",
            ));
        }
        self.framer.clear();
        self.state = State::WaitTls;
        self.out.event(Event::StartTls);
    }

    fn sasl_response(&mut self, line: &[u8]) {
        match mem::replace(&mut self.state, State::Ready) {
            State::Auth { tag, exchange } => self.sasl_step(tag, exchange.feed(line)),
            other => self.state = other,
        }
    }

    fn sasl_step(&mut self, tag: String, step: Step) {
        match step {
            Step::Challenge(exchange) => {
                self.out
                    .line(&format!("+ {}", sasl::encode(exchange.challenge())));
                self.state = State::Auth { tag, exchange };
            }
            Step::Done(creds) => self.authenticate(tag, creds),
            Step::Failed(SaslError::Cancelled) => self
                .out
                .line(&format!("{tag} BAD Authentication cancelled.")),
            Step::Failed(SaslError::BadBase64) => {
                self.bad(&tag, "Invalid base64 data in SASL response.");
            }
            Step::Failed(_) => self.undecodable(&tag),
        }
    }

    fn authenticate(&mut self, tag: String, creds: Credentials) {
        self.state = State::WaitVerdict { tag };
        self.out.event(Event::Authenticate(creds));
    }

    fn privacy_required(&mut self, tag: &str) {
        self.out.line(&format!(
            "{tag} NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connections; use STARTTLS first."
        ));
        self.out
            .event(Event::Rejected("plaintext authentication before TLS"));
    }

    /// Undecodable credentials: the failed-login reply, and a log line, so that a
    /// guesser does not go unseen because its input was malformed.
    fn undecodable(&mut self, tag: &str) {
        self.out.event(Event::Rejected("undecodable credentials"));
        self.auth_failed(tag);
    }

    fn auth_failed(&mut self, tag: &str) {
        self.out.line(&format!(
            "{tag} NO [AUTHENTICATIONFAILED] Authentication failed."
        ));
        self.count_auth_failure();
    }

    fn count_auth_failure(&mut self) {
        self.auth_failures += 1;
        if self.auth_failures >= self.opts.max_auth_failures {
            self.out.line("* BYE Too many authentication failures.");
            self.close(CloseReason::TooManyAuthFailures);
        }
    }

    fn bad(&mut self, tag: &str, text: &str) {
        self.out.line(&format!("{tag} BAD {text}"));
        self.out.event(Event::Rejected("invalid command"));
        self.count_bad();
    }

    fn count_bad(&mut self) {
        self.bad_commands += 1;
        if self.bad_commands > self.opts.max_bad_commands {
            self.out.line("* BYE Too many invalid commands.");
            self.close(CloseReason::TooManyErrors);
        }
    }
}

impl FrontEnd for Front {
    type Login = Login;
    type LoginOptions = LoginOptions;

    fn handle_input(&mut self, bytes: &[u8]) {
        if matches!(self.state, State::Closed | State::Done) {
            return;
        }
        self.framer.push(bytes);
        self.process();
    }

    fn handle_tls_ready(&mut self) {
        if matches!(self.state, State::WaitTls) {
            self.tls = true;
            self.state = State::Ready;
            self.process();
        }
    }

    fn handle_verdict(&mut self, verdict: Verdict) {
        let State::WaitVerdict { tag } = mem::replace(&mut self.state, State::Ready) else {
            return;
        };
        match verdict {
            Verdict::Accepted(Reply { preamble, text }) => {
                self.out.extend_from_slice(&preamble);
                self.out.extend_from_slice(format!("{tag} OK ").as_bytes());
                self.out.extend_from_slice(non_empty(&text, b"Logged in."));
                self.out.extend_from_slice(b"\r\n");
                self.state = State::Done;
                return;
            }
            Verdict::Refused(Reply { preamble, text }) => {
                self.out.extend_from_slice(&preamble);
                self.out.extend_from_slice(format!("{tag} NO ").as_bytes());
                self.out.extend_from_slice(non_empty(
                    &text,
                    b"[AUTHENTICATIONFAILED] Authentication failed.",
                ));
                self.out.extend_from_slice(b"\r\n");
                self.count_auth_failure();
            }
            Verdict::Failed(Failure::AuthFailed) => self.auth_failed(&tag),
            Verdict::Failed(Failure::Limited(Limit::UserSessions)) => {
                self.out.line(&format!(
                    "{tag} NO [LIMIT] Too many sessions for this user."
                ));
            }
            Verdict::Failed(Failure::Limited(_)) => {
                self.out.line(&format!(
                    "{tag} NO [LIMIT] Too many failed logins, try again later."
                ));
                self.count_auth_failure();
            }
            Verdict::Failed(_) => self.out.line(&format!(
                "{tag} NO [UNAVAILABLE] Service temporarily unavailable, try again later."
            )),
        }
        self.process();
    }

    fn shutdown(&mut self, why: Shutdown) {
        if matches!(self.state, State::Closed) {
            return;
        }
        self.out.line(&format!("* BYE {}", why.text()));
        self.close(CloseReason::Internal);
    }

    fn refuse(&mut self, limit: Limit, retry_after: Option<std::time::Duration>) {
        self.out.clear();
        self.out.line(&format!(
            "* BYE [LIMIT] {}",
            limit.refusal_text(retry_after)
        ));
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
        Login::new(credentials, self.client_id.clone(), options, client)
    }

    fn into_handoff(self) -> Vec<u8> {
        self.framer.into_bytes()
    }
}

fn non_empty<'a>(text: &'a [u8], default: &'a [u8]) -> &'a [u8] {
    if text.is_empty() { default } else { text }
}
