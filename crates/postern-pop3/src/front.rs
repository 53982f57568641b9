//! The client-facing POP3 machine, from greeting to login: the AUTHORIZATION state of
//! RFC 1939 §4 and §7 (USER, PASS, APOP, QUIT, NOOP), RFC 2449 (CAPA, RESP-CODES,
//! PIPELINING), RFC 2595 §4 (STLS), RFC 5034 (AUTH with SASL PLAIN and LOGIN, initial
//! responses, `=` and `*`) and RFC 3206 (`[AUTH]`, `[SYS/TEMP]`, AUTH-RESP-CODE).
//!
//! ```text
//!            ┌──── CAPA / NOOP / USER / AUTH (list) / refused command ────┐
//!            ▼                                                            │
//!  greet ─▶ Ready ──STLS──▶ WaitTls ──handle_tls_ready──▶ Ready ──────────┘
//!            │  │
//!            │  └─AUTH <mechanism>─▶ Auth ◀─┐ (a sasl::Exchange: `+ ` challenge,
//!            │                         │  └──┘  one response line each; `*` ─▶ Ready)
//!            ▼ PASS / APOP             ▼
//!        WaitVerdict ◀─────────────────┘
//!            │ Accepted ─▶ Done (into_handoff)      Refused / Failed ─▶ Ready
//!  QUIT, too many errors or failures, line too long ─▶ Closed
//! ```
//!
//! POP3 has no tags: replies are matched to commands by order alone, so every command
//! gets exactly one reply (one `+OK`/`-ERR` line, or a `.`-terminated list), and a
//! closing session sends nothing after the reply to the command that closed it.

use std::mem;
use std::sync::Arc;

use postern_proto::lines::{Line, LineBuf};
use postern_proto::sasl::{self, Exchange, SaslError, Step};
use postern_proto::{
    ClientInfo, CloseReason, Credentials, Event, Failure, FrontEnd, Limit, Mechanism, Output,
    Reply, Shutdown, Verdict,
};

use crate::login::{Login, LoginOptions};

/// Settings for one listener's POP3 front end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Text after `+OK ` in the greeting (the APOP timestamp, if any, follows it).
    pub greeting: String,
    /// Whether STLS can be offered (the listener has a certificate and is not implicit
    /// TLS).
    pub starttls: bool,
    /// Allow USER/PASS and AUTH before TLS. Off by default: credentials in cleartext.
    pub insecure_plaintext_auth: bool,
    /// Accept APOP (RFC 1939 §7). The driver must then pass a fresh timestamp to
    /// [`Front::new`] for every connection, and verify the digest itself.
    pub apop: bool,
    /// Longest command or SASL response line before authentication, CRLF included.
    pub max_line: usize,
    /// Invalid commands tolerated before the connection is closed.
    pub max_bad_commands: u32,
    /// Failed logins tolerated on one connection before it is closed.
    pub max_auth_failures: u32,
    /// Offer and accept XOAUTH2 and OAUTHBEARER (the token is replayed unchanged).
    pub oauth: bool,
    /// Commands accepted before authentication, all kinds together; then close.
    pub max_commands: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            greeting: "Postern ready.".into(),
            starttls: true,
            insecure_plaintext_auth: false,
            apop: false,
            // As long as IMAP's: an AUTH line with an OAuth token or a long password
            // fits, where nginx's fixed 128 bytes do not.
            max_line: 16 * 1024,
            max_bad_commands: 10,
            max_auth_failures: 3,
            oauth: false,
            max_commands: 50,
        }
    }
}

/// Shortest line limit [`Options::validate`] accepts: RFC 2449 §4 lets a client send
/// 255 octets per command, and RFC 1939 §3 expects 512-octet lines to work.
const MIN_LINE: usize = 512;

impl Options {
    /// Checks settings the machine would otherwise have to correct silently; for the
    /// configuration layer.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.greeting.chars().any(char::is_control) {
            return Err("the POP3 greeting must not contain control characters");
        }
        if self.apop && self.greeting.contains(['<', '>']) {
            // Clients take the first `<...>` of the greeting as the APOP timestamp.
            return Err("with APOP on, the POP3 greeting must not contain '<' or '>'");
        }
        if self.max_line < MIN_LINE {
            return Err("the POP3 line limit must be at least 512 bytes");
        }
        if self.max_auth_failures == 0 {
            return Err("the POP3 authentication failure limit must be at least 1");
        }
        Ok(())
    }
}

/// Whether `s` can serve as an APOP timestamp: an RFC 822 msg-id, `<local@domain>`, of
/// printable ASCII without spaces, at most 256 bytes.
pub fn is_apop_timestamp(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('<').and_then(|s| s.strip_suffix('>')) else {
        return false;
    };
    s.len() <= 256
        && inner
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && inner
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>')
}

/// Builds the APOP timestamp `<unique@host>` for a greeting, or `None` when the parts
/// would not make a valid one. `unique` must differ for every greeting Postern ever
/// sends (RFC 1939 §7: a digest must never be replayable), e.g. random hex plus the
/// session id; `host` is the server's name.
pub fn apop_timestamp(unique: &str, host: &str) -> Option<String> {
    let ts = format!("<{unique}@{host}>");
    is_apop_timestamp(&ts).then_some(ts)
}

#[derive(Debug)]
enum State {
    Ready,
    Auth(Exchange),
    WaitTls,
    WaitVerdict,
    Done,
    Closed,
}

/// The client side of a POP3 session until it is handed to the relay.
#[derive(Debug)]
pub struct Front {
    opts: Arc<Options>,
    /// The greeting's timestamp; `Some` exactly when APOP is accepted.
    apop: Option<String>,
    state: State,
    lines: LineBuf,
    out: Output,
    tls: bool,
    /// The name given by USER, waiting for PASS.
    user: Option<String>,
    bad_commands: u32,
    auth_failures: u32,
    commands: u32,
}

impl Front {
    /// Starts a session and queues the greeting. `tls` says whether the connection is
    /// already encrypted (implicit TLS). `apop_timestamp` is this connection's unique
    /// `<...@...>` (see [`apop_timestamp`]); APOP is offered only when
    /// [`Options::apop`] is on and the timestamp is valid.
    pub fn new(opts: Arc<Options>, tls: bool, apop_timestamp: Option<String>) -> Self {
        let apop = apop_timestamp.filter(|ts| opts.apop && is_apop_timestamp(ts));
        let mut greeting = String::from("+OK ");
        // A line break in the text would inject a line; an angle bracket would be taken
        // for the timestamp. `Options::validate` reports both; this only keeps the wire
        // sane if it was skipped.
        greeting.extend(opts.greeting.chars().map(|c| {
            if c.is_control() || (apop.is_some() && matches!(c, '<' | '>')) {
                ' '
            } else {
                c
            }
        }));
        if let Some(ts) = &apop {
            greeting.push(' ');
            greeting.push_str(ts);
        }
        let mut out = Output::new();
        out.line(&greeting);
        Self {
            opts,
            apop,
            state: State::Ready,
            lines: LineBuf::new(),
            out,
            tls,
            user: None,
            bad_commands: 0,
            auth_failures: 0,
            commands: 0,
        }
    }

    /// The APOP timestamp of this session's greeting, when APOP is offered.
    pub fn apop_challenge(&self) -> Option<&str> {
        self.apop.as_deref()
    }

    /// Whether USER/PASS and AUTH may be used now.
    fn plaintext_allowed(&self) -> bool {
        self.tls || self.opts.insecure_plaintext_auth
    }

    fn close(&mut self, reason: CloseReason) {
        self.state = State::Closed;
        self.user = None;
        self.lines.clear();
        self.out.event(Event::Close(reason));
    }

    /// Answers every complete line in the buffer, in order, until one needs the driver.
    fn process(&mut self) {
        loop {
            let command = match self.state {
                State::Ready => true,
                State::Auth(_) => false,
                State::WaitTls | State::WaitVerdict | State::Done | State::Closed => return,
            };
            match self.lines.poll(self.opts.max_line) {
                Line::Incomplete => return,
                Line::TooLong => {
                    // The rest of the line could look like a command: no resync.
                    self.out.line("-ERR Line too long, closing connection.");
                    self.out.event(Event::Rejected("line too long"));
                    return self.close(CloseReason::InputTooLong);
                }
                Line::Complete(len) => {
                    let line = self.lines.line(len).to_vec();
                    self.lines.consume(len);
                    if command {
                        self.command(&line);
                    } else {
                        self.sasl_response(&line);
                    }
                }
            }
        }
    }

    fn command(&mut self, line: &[u8]) {
        self.commands = self.commands.saturating_add(1);
        if self.commands > self.opts.max_commands {
            self.out
                .line("-ERR Too many commands before login, closing connection.");
            self.out
                .event(Event::Rejected("too many commands before login"));
            return self.close(CloseReason::TooManyErrors);
        }
        let (verb, arg) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (line.get(..i).unwrap_or_default(), line.get(i + 1..)),
            None => (line, None),
        };
        // Trailing blanks after an argument-less command are tolerated, anything else
        // is a syntax error rather than silently ignored.
        let no_arg = arg.is_none_or(|a| a.iter().all(|&b| b == b' '));
        let is = |name: &str| verb.eq_ignore_ascii_case(name.as_bytes());
        if is("CAPA") && no_arg {
            self.capa();
        } else if is("NOOP") && no_arg {
            self.out.line("+OK");
        } else if is("QUIT") && no_arg {
            self.out.line("+OK Logging out.");
            self.close(CloseReason::Logout);
        } else if is("STLS") && no_arg {
            self.stls();
        } else if is("USER") {
            self.user_command(arg);
        } else if is("PASS") {
            self.pass(arg);
        } else if is("AUTH") {
            self.auth(arg);
        } else if is("APOP") {
            self.apop_command(arg);
        } else if ["CAPA", "NOOP", "QUIT", "STLS"].iter().any(|v| is(v)) {
            self.bad("bad syntax", "Unexpected argument.");
        } else if [
            "STAT", "LIST", "RETR", "DELE", "RSET", "TOP", "UIDL", "LAST",
        ]
        .iter()
        .any(|v| is(v))
        {
            self.bad("command needs login", "Not logged in.");
        } else {
            self.bad("unknown command", "Unknown command.");
        }
    }

    /// RFC 2449 §5: what this front end itself implements before login. The backend's
    /// own list (TOP, UIDL, EXPIRE...) is what a client gets from CAPA after login.
    fn capa(&mut self) {
        let mut caps = String::from("+OK Capability list follows\r\n");
        caps.push_str("RESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n");
        if !self.tls && self.opts.starttls {
            caps.push_str("STLS\r\n");
        }
        if self.plaintext_allowed() {
            caps.push_str("USER\r\nSASL PLAIN LOGIN");
            if self.opts.oauth {
                caps.push_str(" XOAUTH2 OAUTHBEARER");
            }
            caps.push_str("\r\n");
        }
        caps.push_str(".\r\n");
        self.out.extend_from_slice(caps.as_bytes());
    }

    fn stls(&mut self) {
        if self.tls {
            return self.bad("STLS under TLS", "TLS is already active.");
        }
        if !self.opts.starttls {
            return self.bad("STLS unavailable", "STLS is not available.");
        }
        self.out.line("+OK Begin TLS negotiation");
        // CVE-2011-0411: nothing sent in plaintext may be acted on inside TLS.
        if self.lines.clear() > 0 {
            self.out
                .event(Event::Rejected("discarded plaintext pipelined after STLS"));
        }
        self.user = None;
        self.state = State::WaitTls;
        self.out.event(Event::StartTls);
    }

    fn user_command(&mut self, arg: Option<&[u8]>) {
        if !self.plaintext_allowed() {
            return self.privacy_required();
        }
        let Some(name) = arg.filter(|a| !a.is_empty()) else {
            return self.bad("bad syntax", "Missing user name.");
        };
        // The whole rest of the line, spaces included, as Dovecot and nginx read it.
        match sasl::identity(name) {
            Ok(name) => {
                self.user = Some(name);
                // The same answer for every name: no user enumeration.
                self.out.line("+OK");
            }
            Err(_) => {
                self.user = None;
                self.bad("bad user name", "Invalid user name.");
            }
        }
    }

    fn pass(&mut self, arg: Option<&[u8]>) {
        if !self.plaintext_allowed() {
            return self.privacy_required();
        }
        let Some(password) = arg.filter(|a| !a.is_empty()) else {
            return self.bad("bad syntax", "Missing password.");
        };
        let Some(user) = self.user.take() else {
            return self.bad("PASS without USER", "No user name given, send USER first.");
        };
        // The rest of the line is the password, spaces included (RFC 1939 §7 allows
        // them), so it is never trimmed or split.
        self.authenticate(Credentials::new(
            Mechanism::Cleartext,
            user,
            password.to_vec(),
        ));
    }

    fn auth(&mut self, arg: Option<&[u8]>) {
        let Some(arg) = arg.filter(|a| !a.iter().all(|&b| b == b' ')) else {
            // The mechanism list form (not in RFC 5034 but sent by Outlook and others;
            // Dovecot and nginx answer it). Only what can be used right now.
            let mechs = match (self.plaintext_allowed(), self.opts.oauth) {
                (true, true) => "PLAIN\r\nLOGIN\r\nXOAUTH2\r\nOAUTHBEARER\r\n",
                (true, false) => "PLAIN\r\nLOGIN\r\n",
                (false, _) => "",
            };
            let list = format!("+OK Methods supported:\r\n{mechs}.\r\n");
            return self.out.extend_from_slice(list.as_bytes());
        };
        if !self.plaintext_allowed() {
            return self.privacy_required();
        }
        self.user = None;
        let (name, ir) = match arg.iter().position(|&b| b == b' ') {
            Some(i) => (arg.get(..i).unwrap_or_default(), arg.get(i + 1..)),
            None => (arg, None),
        };
        let Some(mechanism) =
            Mechanism::from_sasl_name(name).filter(|m| self.opts.oauth || !m.is_oauth())
        else {
            return self.out.line("-ERR Unsupported authentication mechanism.");
        };
        self.sasl_step(Exchange::start(mechanism, ir));
    }

    /// RFC 1939 §7. APOP is allowed before TLS: it never sends the password, which is
    /// all the plaintext rule protects, and Dovecot (`disable_plaintext_auth`) and nginx
    /// (`starttls only`) allow it too. An operator who turns it on does so for old
    /// clients that use it instead of TLS.
    fn apop_command(&mut self, arg: Option<&[u8]>) {
        let Some(timestamp) = self.apop.clone() else {
            // Not offered: the same answer as any unknown command.
            return self.bad("APOP disabled", "Unknown command.");
        };
        // `name digest`, split at the last space: the digest never holds one.
        let Some((name, digest)) = arg.and_then(|a| {
            let i = a.iter().rposition(|&b| b == b' ')?;
            Some((a.get(..i)?, a.get(i + 1..)?))
        }) else {
            return self.bad("bad syntax", "Syntax: APOP name digest.");
        };
        if digest.len() != 32 || !digest.iter().all(u8::is_ascii_hexdigit) {
            return self.bad("bad syntax", "Syntax: APOP name digest.");
        }
        self.user = None;
        let Ok(user) = sasl::identity(name) else {
            return self.undecodable();
        };
        self.authenticate(Credentials {
            challenge: Some(timestamp),
            // RFC 1939 says lower case; normalized so the driver compares hex to hex.
            ..Credentials::new(Mechanism::Apop, user, digest.to_ascii_lowercase())
        });
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
                    .line(&format!("+ {}", sasl::encode(exchange.challenge())));
                self.state = State::Auth(exchange);
            }
            Step::Done(creds) => self.authenticate(creds),
            Step::Failed(SaslError::Cancelled) => self.out.line("-ERR Authentication cancelled."),
            Step::Failed(SaslError::BadBase64) => self.bad("bad base64", "Invalid base64 data."),
            Step::Failed(_) => self.undecodable(),
        }
    }

    fn authenticate(&mut self, creds: Credentials) {
        self.state = State::WaitVerdict;
        self.out.event(Event::Authenticate(creds));
    }

    fn privacy_required(&mut self) {
        self.user = None;
        self.out.line(
            "-ERR [AUTH] Plaintext authentication disallowed on non-secure connections; use STLS first.",
        );
        self.out
            .event(Event::Rejected("plaintext authentication before TLS"));
    }

    /// Credentials that cannot be decoded get the failed-login reply, and a log line:
    /// a guesser must not go unseen because its input was malformed.
    fn undecodable(&mut self) {
        self.out.event(Event::Rejected("undecodable credentials"));
        self.auth_failed();
    }

    fn auth_failed(&mut self) {
        self.out.line("-ERR [AUTH] Authentication failed.");
        self.count_auth_failure();
    }

    fn count_auth_failure(&mut self) {
        self.auth_failures = self.auth_failures.saturating_add(1);
        if self.auth_failures >= self.opts.max_auth_failures {
            self.close(CloseReason::TooManyAuthFailures);
        }
    }

    /// Answers an invalid command. Over the budget, the answer says why the connection
    /// closes instead: POP3 has no untagged line to say it separately.
    fn bad(&mut self, reason: &'static str, text: &str) {
        self.out.event(Event::Rejected(reason));
        self.bad_commands = self.bad_commands.saturating_add(1);
        if self.bad_commands > self.opts.max_bad_commands {
            self.out
                .line("-ERR Too many invalid commands, closing connection.");
            self.close(CloseReason::TooManyErrors);
        } else {
            self.out.line(&format!("-ERR {text}"));
        }
    }

    /// `+OK`/`-ERR` with the backend's text, which cannot break the line.
    fn send_status(&mut self, status: &str, text: &[u8], default: &str) {
        self.out.extend_from_slice(status.as_bytes());
        self.out.extend_from_slice(b" ");
        if text.is_empty() {
            self.out.extend_from_slice(default.as_bytes());
        } else {
            self.out.extend(text.iter().map(|&b| {
                if matches!(b, b'\r' | b'\n' | 0) {
                    b' '
                } else {
                    b
                }
            }));
        }
        self.out.extend_from_slice(b"\r\n");
    }
}

impl FrontEnd for Front {
    type Login = Login;
    type LoginOptions = LoginOptions;

    fn handle_input(&mut self, bytes: &[u8]) {
        match self.state {
            State::Closed => {}
            State::WaitTls => {
                // The driver should not read before the handshake; if it does, these
                // bytes are plaintext and must not run inside TLS.
                if !bytes.is_empty() {
                    self.out
                        .event(Event::Rejected("discarded plaintext pipelined after STLS"));
                }
            }
            // Kept for the relay (see `into_handoff`). Not bounded here: the session
            // driver reads nothing from the client while a login runs, so this holds at
            // most the rest of the read that carried the login command.
            State::Done | State::WaitVerdict => self.lines.push(bytes),
            _ => {
                self.lines.push(bytes);
                self.process();
            }
        }
    }

    fn handle_tls_ready(&mut self) {
        if matches!(self.state, State::WaitTls) {
            self.tls = true;
            self.state = State::Ready;
            // POP3 sends no new greeting after STLS (RFC 2595 §4).
            self.process();
        }
    }

    fn handle_verdict(&mut self, verdict: Verdict) {
        if !matches!(self.state, State::WaitVerdict) {
            return;
        }
        self.state = State::Ready;
        match verdict {
            // POP3 has no untagged lines: a preamble has nowhere to go.
            Verdict::Accepted(Reply { text, .. }) => {
                self.send_status("+OK", &text, "Logged in.");
                self.state = State::Done;
                return;
            }
            Verdict::Refused(Reply { text, .. }) => {
                // The backend's code ([AUTH], [IN-USE], [SYS/TEMP]) tells the client
                // whether to retry; it is passed on unchanged.
                self.send_status("-ERR", &text, "[AUTH] Authentication failed.");
                self.count_auth_failure();
            }
            Verdict::Failed(Failure::AuthFailed) => self.auth_failed(),
            Verdict::Failed(Failure::Limited(Limit::UserSessions)) => {
                self.out
                    .line("-ERR [IN-USE] Too many sessions for this user.");
            }
            Verdict::Failed(Failure::Limited(_)) => {
                // RFC 2449 §8.1.1: the client should not retry at once.
                self.out
                    .line("-ERR [LOGIN-DELAY] Too many failed logins, try again later.");
                self.count_auth_failure();
            }
            Verdict::Failed(_) => {
                self.out
                    .line("-ERR [SYS/TEMP] Service temporarily unavailable, try again later.");
            }
        }
        self.process();
    }

    fn shutdown(&mut self, why: Shutdown) {
        if matches!(self.state, State::Closed) {
            return;
        }
        // POP3 has no unsolicited replies, but Dovecot sends this and clients show it.
        self.out.line(&format!("-ERR {}", why.text()));
        self.close(CloseReason::Internal);
    }

    fn refuse(&mut self, limit: Limit, retry_after: Option<std::time::Duration>) {
        self.out.clear();
        self.out.line(&format!(
            "-ERR [SYS/TEMP] {}",
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
        Login::new(credentials, options, client)
    }

    fn into_handoff(self) -> Vec<u8> {
        self.lines.into_bytes()
    }
}
