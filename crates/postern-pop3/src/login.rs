//! The backend-facing POP3 machine: read the greeting, forward the client's identity
//! (Dovecot's `XCLIENT`), replay the credentials with USER/PASS (RFC 1939 §7) or
//! `AUTH PLAIN` (RFC 5034, RFC 4616), and report the backend's answer.
//!
//! ```text
//!  (starttls: Greeting ──STLS──▶ Stls ──+OK──▶ [driver: TLS] ──▶ as below)
//!  Greeting ─┬─ forward_client and "+OK [XCLIENT]" ─▶ Xclient ──+OK──┐
//!            └────────────────────────────────────────────────────────┤
//!                 ┌───────────────────────────────────────────────────┘
//!                 ├─ method User:  User ──+OK──▶ Pass ──+OK──▶ Done(Accepted)
//!                 └─ method Plain: [AuthContinue ──"+"──▶] Auth ──+OK──▶ Done(Accepted)
//!  -ERR to USER, PASS or AUTH ─▶ Done(Refused), the backend's text and code kept
//!  anything else (no +OK greeting, -ERR to XCLIENT, garbage, overlong line)
//!                                            ─▶ Done(Failed(Unavailable))
//! ```
//!
//! One command is in flight at a time: whether the backend pipelines is only known
//! from CAPA, and a round trip on the backend network costs less than asking.
//!
//! Credentials cannot break a command line: `AUTH PLAIN` carries them in base64, and
//! USER/PASS refuses (without sending anything) credentials holding CR, LF or NUL.

use postern_proto::lines::{Line, LineBuf};
use postern_proto::sasl;
use postern_proto::{
    BackendLogin, ClientInfo, Credentials, Failure, LoginEvent, Mechanism, Reply, Secret, Verdict,
};

/// How Postern replays credentials to a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoginMethod {
    /// `AUTH PLAIN` with an initial response (RFC 5034). One command for the whole
    /// login, any password byte but NUL, and the only way to carry an authorization
    /// identity. Dovecot 2.3 reads AUTH lines of up to 8 KiB but USER/PASS lines of
    /// only 1 KiB, so long passwords work only this way.
    #[default]
    Plain,
    /// `USER` then `PASS` (RFC 1939 §7), for servers without SASL. Credentials with an
    /// authorization identity still use `AUTH PLAIN`.
    User,
}

/// Per-backend settings for the POP3 login.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginOptions {
    /// How to replay credentials.
    pub method: LoginMethod,
    /// The backend trusts Postern (Dovecot `login_trusted_networks`): send the client's
    /// address, port and the session id with `XCLIENT` before logging in.
    pub forward_client: bool,
    /// Upgrade the connection with STLS (RFC 2595) before anything else is sent. A
    /// backend that refuses fails the login: credentials never fall back to plaintext.
    pub starttls: bool,
}

/// RFC 1939 §3 caps a response line at 512 octets; this leaves room for servers that
/// ignore that, and a backend talking endlessly without CRLF still cannot grow memory.
const BACKEND_MAX_LINE: usize = 8 * 1024;
/// RFC 5034 §4: an AUTH command with its initial response must fit in 255 octets,
/// CRLF included; a longer response goes after the server's `+` instead.
const MAX_AUTH_LINE: usize = 255;
/// Dovecot keeps session ids of at most 64 bytes; a longer one is not forwarded.
const MAX_SESSION_ID: usize = 64;

#[derive(Debug)]
enum State {
    Greeting,
    /// STLS sent, waiting for `+OK`.
    Stls,
    /// The driver is running the TLS handshake.
    WaitTls,
    Xclient,
    User,
    Pass,
    AuthContinue,
    Auth,
    Done,
}

/// Logs a client in to one backend connection.
#[derive(Debug)]
pub struct Login {
    state: State,
    lines: LineBuf,
    out: Vec<u8>,
    event: Option<LoginEvent>,
    /// The login commands still to send, in order: `PASS` after USER's `+OK`, the
    /// SASL response after AUTH's `+`.
    pending: Option<Secret<Vec<u8>>>,
    creds: Credentials,
    plain: bool,
    xclient: Option<String>,
    /// The greeting offered XCLIENT (remembered across STLS: there is no new greeting).
    xclient_offered: bool,
    starttls: bool,
    forwarded: bool,
}

impl Login {
    /// Prepares a login; nothing is sent until the backend's greeting arrives.
    ///
    /// Credentials that cannot be replayed end the login at once, before anything is
    /// sent: bytes the chosen command cannot carry give `Failed(AuthFailed)` (the
    /// client may retry), APOP credentials give `Failed(Unavailable)` (the driver must
    /// verify the digest and substitute the password first; not doing so is Postern's
    /// fault, not the client's).
    pub fn new(creds: Credentials, options: &LoginOptions, client: &ClientInfo) -> Self {
        // Bearer tokens go the SASL way too, with their own mechanism.
        let plain = options.method == LoginMethod::Plain
            || creds.authzid.is_some()
            || creds.mechanism.is_oauth();
        let xclient = options.forward_client.then(|| xclient(client));
        let mut login = Self {
            state: State::Greeting,
            lines: LineBuf::new(),
            out: Vec::new(),
            event: None,
            pending: None,
            creds,
            plain,
            xclient,
            xclient_offered: false,
            starttls: options.starttls,
            forwarded: false,
        };
        if login.creds.mechanism == Mechanism::Apop {
            login.unavailable();
        } else if !login.replayable() {
            login.finish(Verdict::Failed(Failure::AuthFailed));
        }
        login
    }

    /// Whether the backend accepted Postern's `XCLIENT`, i.e. logs the client's own
    /// address. `false` with `forward_client` on means the backend did not offer
    /// XCLIENT in its greeting (Dovecot does so only for `login_trusted_networks`), and
    /// the driver should warn: the login still goes ahead, under Postern's address.
    pub fn client_forwarded(&self) -> bool {
        self.forwarded
    }

    fn replayable(&self) -> bool {
        let c = &self.creds;
        let pass = c.password.expose();
        // NUL separates PLAIN's fields; CR and LF would end a USER or PASS line.
        let forbidden: &[u8] = if self.plain { b"\0" } else { b"\0\r\n" };
        let clean = |s: &[u8]| !s.iter().any(|b| forbidden.contains(b));
        !pass.is_empty()
            && !c.user.is_empty()
            && clean(pass)
            && clean(c.user.as_bytes())
            && c.authzid.as_deref().is_none_or(|a| clean(a.as_bytes()))
    }

    fn finish(&mut self, verdict: Verdict) {
        self.state = State::Done;
        self.pending = None;
        self.event = Some(LoginEvent::Done(verdict));
    }

    fn unavailable(&mut self) {
        self.finish(Verdict::Failed(Failure::Unavailable));
    }

    fn greeting(&mut self, status: Status, text: &[u8]) {
        if status != Status::Ok {
            return self.unavailable();
        }
        // Dovecot's own proxy looks for the same code right after `+OK`.
        self.xclient_offered = text
            .get(..9)
            .is_some_and(|code| code.eq_ignore_ascii_case(b"[XCLIENT]"));
        if self.starttls {
            self.out.extend_from_slice(b"STLS\r\n");
            self.state = State::Stls;
        } else {
            self.identify();
        }
    }

    /// XCLIENT when the backend offered it, then the login.
    fn identify(&mut self) {
        match self.xclient.take() {
            Some(command) if self.xclient_offered => {
                self.out.extend_from_slice(command.as_bytes());
                self.state = State::Xclient;
            }
            _ => self.send_login(),
        }
    }

    fn send_login(&mut self) {
        if self.plain {
            let (name, message) = if self.creds.mechanism.is_oauth() {
                (self.creds.mechanism.as_str(), self.creds.password.clone())
            } else {
                ("PLAIN", sasl::encode_plain(&self.creds))
            };
            let b64 = sasl::encode(message.expose());
            let line = Secret::new(format!("AUTH {name} {b64}\r\n").into_bytes());
            if line.expose().len() <= MAX_AUTH_LINE {
                self.out.extend_from_slice(line.expose());
                self.state = State::Auth;
            } else {
                self.out
                    .extend_from_slice(format!("AUTH {name}\r\n").as_bytes());
                self.pending = Some(Secret::new(format!("{b64}\r\n").into_bytes()));
                self.state = State::AuthContinue;
            }
        } else {
            let mut user = b"USER ".to_vec();
            user.extend_from_slice(self.creds.user.as_bytes());
            user.extend_from_slice(b"\r\n");
            self.out.append(&mut user);
            let mut pass = b"PASS ".to_vec();
            pass.extend_from_slice(self.creds.password.expose());
            pass.extend_from_slice(b"\r\n");
            self.pending = Some(Secret::new(pass));
            self.state = State::User;
        }
    }

    fn send_pending(&mut self, next: State) {
        match self.pending.take() {
            Some(line) => {
                self.out.extend_from_slice(line.expose());
                self.state = next;
            }
            None => self.unavailable(),
        }
    }

    fn answer(&mut self, status: Status, text: &[u8]) {
        let reply = || Reply {
            preamble: Vec::new(),
            text: text.to_vec(),
        };
        match (&self.state, status) {
            (State::Greeting, _) => self.greeting(status, text),
            (State::Stls, Status::Ok) => {
                // Anything after the +OK came in plaintext: not to be read as if it
                // had come through TLS.
                self.lines.clear();
                self.state = State::WaitTls;
                self.event = Some(LoginEvent::StartTls);
            }
            (State::Xclient, Status::Ok) => {
                self.forwarded = true;
                self.send_login();
            }
            (State::User, Status::Ok) => self.send_pending(State::Pass),
            (State::AuthContinue, Status::Continue) => self.send_pending(State::Auth),
            // A bearer token refused with an error challenge (RFC 7628 §3.2.2): answer
            // it as a client must, and the final -ERR follows.
            (State::Auth, Status::Continue) if self.creds.mechanism.is_oauth() => {
                let answer = self.creds.mechanism.error_challenge_answer();
                self.out.extend_from_slice(answer.unwrap_or(b"\r\n"));
            }
            (State::Pass | State::Auth, Status::Ok) => self.finish(Verdict::Accepted(reply())),
            (State::User | State::Pass | State::AuthContinue | State::Auth, Status::Err) => {
                self.finish(Verdict::Refused(reply()));
            }
            // -ERR to XCLIENT (a backend that offered it and then refused it),
            // a SASL challenge where none belongs, `+OK` to a bare AUTH.
            _ => self.unavailable(),
        }
    }

    fn process(&mut self) {
        while !matches!(self.state, State::Done | State::WaitTls) {
            match self.lines.poll(BACKEND_MAX_LINE) {
                Line::Incomplete => return,
                Line::TooLong => return self.unavailable(),
                Line::Complete(len) => {
                    let parsed = status(self.lines.line(len)).map(|(s, t)| (s, t.to_vec()));
                    self.lines.consume(len);
                    match parsed {
                        Some((status, text)) => self.answer(status, &text),
                        None => self.unavailable(),
                    }
                }
            }
        }
    }
}

/// `XCLIENT ADDR=<ip> PORT=<port> [SESSION=<id>]`, as Dovecot 2.3's pop3-login reads it
/// (keys are case-insensitive, unknown keys ignored, the answer is `+OK Updated`).
fn xclient(client: &ClientInfo) -> String {
    // A v4-mapped address from a dual-stack listener is logged as plain IPv4.
    let ip = client.client.ip().to_canonical();
    let mut command = format!("XCLIENT ADDR={ip} PORT={}", client.client.port());
    let id = &client.session_id;
    // Arguments are split at spaces; an id that could break one is left out.
    if !id.is_empty() && id.len() <= MAX_SESSION_ID && id.bytes().all(|b| b.is_ascii_graphic()) {
        command.push_str(" SESSION=");
        command.push_str(id);
    }
    command.push_str("\r\n");
    command
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    Err,
    /// A SASL continuation, `+ <base64>` (RFC 5034 §4).
    Continue,
}

/// Splits a backend line (without CRLF) into its status indicator and text.
fn status(line: &[u8]) -> Option<(Status, &[u8])> {
    for (word, status) in [(&b"+OK"[..], Status::Ok), (b"-ERR", Status::Err)] {
        if let Some(head) = line.get(..word.len())
            && head.eq_ignore_ascii_case(word)
        {
            let rest = line.get(word.len()..).unwrap_or_default();
            return match rest {
                [] => Some((status, rest)),
                [b' ', text @ ..] => Some((status, text)),
                _ => None,
            };
        }
    }
    match line {
        [b'+'] => Some((Status::Continue, &[])),
        [b'+', b' ', text @ ..] => Some((Status::Continue, text)),
        _ => None,
    }
}

impl BackendLogin for Login {
    fn handle_input(&mut self, bytes: &[u8]) {
        if matches!(self.state, State::WaitTls) {
            return;
        }
        self.lines.push(bytes);
        // After the answer, bytes belong to the relay (see `into_handoff`).
        self.process();
    }

    fn handle_tls_ready(&mut self) {
        if matches!(self.state, State::WaitTls) {
            self.identify();
        }
    }

    fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.out);
    }

    fn poll_event(&mut self) -> Option<LoginEvent> {
        self.event.take()
    }

    fn into_handoff(self) -> Vec<u8> {
        self.lines.into_bytes()
    }
}
