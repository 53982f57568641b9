//! The backend-facing IMAP machine: read the greeting, learn the capabilities, forward
//! the client's ID, replay the credentials, and report the backend's answer.
//!
//! ```text
//!  Greeting ──caps in greeting──▶ LoggingIn ──tagged OK──▶ Done(Accepted)
//!     │                              ▲   │  └─tagged NO/BAD──▶ Done(Refused)
//!     └──no caps──▶ Capability ──────┘   └─"+" ─▶ next literal chunk
//!        (starttls: ──STARTTLS──▶ StartTls ──OK──▶ [driver: TLS] ──▶ Capability)
//!  anything unexpected (BYE, PREAUTH, EOF, overlong line, no STARTTLS when required)
//!                                                         ──▶ Done(Failed(Unavailable))
//! ```
//!
//! Credentials always travel as literals or base64, never as quoted strings, so no
//! byte of a user name or password can end its argument early (nginx does the same).

use std::collections::VecDeque;
use std::mem;

use imap_codec::decode::Decoder;
use imap_codec::imap_types::response::{Code, Data, GreetingKind, Response, Status, StatusKind};
use imap_codec::{GreetingCodec, ResponseCodec};
use postern_proto::sasl;
use postern_proto::{
    BackendLogin, ClientInfo, Credentials, Failure, LoginEvent, Reply, Secret, Verdict,
};

use crate::framing::{Frame, Framer, Limits, Mode};
use crate::id::{self, ClientId};

/// How Postern replays credentials to a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoginMethod {
    /// `AUTHENTICATE PLAIN` with SASL-IR when the backend advertises both, else `LOGIN`.
    #[default]
    Auto,
    /// Always `LOGIN` with literals (cannot carry an authorization identity).
    Login,
    /// Always `AUTHENTICATE PLAIN`.
    Plain,
}

/// Per-backend settings for the IMAP login.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginOptions {
    /// How to replay credentials.
    pub method: LoginMethod,
    /// The backend trusts Postern (Dovecot `login_trusted_networks`): send the client's
    /// address in `ID` as `x-originating-ip` and friends.
    pub forward_client: bool,
    /// Upgrade the connection with STARTTLS before anything else is sent. A backend
    /// that does not offer it fails the login: credentials never fall back to a
    /// plaintext hop that was configured to be encrypted.
    pub starttls: bool,
}

/// Backend responses during login are small; a greeting or a capability line longer than
/// this is not an IMAP server we should be talking to.
const BACKEND_LIMITS: Limits = Limits {
    max_message: 64 * 1024,
    max_literal: 16 * 1024,
};
/// Untagged lines collected for the client before the login answer.
const MAX_PREAMBLE: usize = 64 * 1024;

const TAG_CAPABILITY: &str = "C";
const TAG_STARTTLS: &str = "S";
const TAG_ID: &str = "I";
const TAG_LOGIN: &str = "L";

#[derive(Debug)]
enum State {
    Greeting,
    Capability,
    /// STARTTLS sent, waiting for its OK.
    StartTls,
    /// The driver is running the TLS handshake.
    WaitTls,
    /// The login is on its way; `chunks` are the parts still waiting for a `+`.
    LoggingIn {
        chunks: VecDeque<Secret<Vec<u8>>>,
    },
    Done,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Caps {
    /// Whether a capability list was seen at all.
    known: bool,
    sasl_ir: bool,
    auth_plain: bool,
    literal_plus: bool,
    starttls: bool,
}

/// Logs a client in to one backend connection.
#[derive(Debug)]
pub struct Login {
    state: State,
    framer: Framer,
    out: Vec<u8>,
    event: Option<LoginEvent>,
    creds: Credentials,
    id_command: Option<Vec<u8>>,
    method: LoginMethod,
    starttls: bool,
    caps: Caps,
    preamble: Vec<u8>,
}

impl Login {
    /// Prepares a login; nothing is sent until the backend's greeting arrives.
    pub fn new(
        creds: Credentials,
        client_id: Option<ClientId>,
        options: &LoginOptions,
        client: &ClientInfo,
    ) -> Self {
        let id_command = id::command(TAG_ID, client_id.as_ref(), client, options.forward_client);
        Self {
            state: State::Greeting,
            framer: Framer::new(),
            out: Vec::new(),
            event: None,
            creds,
            id_command,
            method: options.method,
            starttls: options.starttls,
            caps: Caps::default(),
            preamble: Vec::new(),
        }
    }

    fn finish(&mut self, verdict: Verdict) {
        self.state = State::Done;
        self.event = Some(LoginEvent::Done(verdict));
    }

    fn unavailable(&mut self) {
        self.finish(Verdict::Failed(Failure::Unavailable));
    }

    /// Learns what the login needs from a capability list, given as atoms: the greeting
    /// scan's slices, or imap-codec's parsed capabilities written back as text (the
    /// rarer paths), so that both follow one rule.
    fn learn_caps<T: AsRef<[u8]>>(&mut self, caps: impl IntoIterator<Item = T>) {
        self.caps.known = true;
        for cap in caps {
            let cap = cap.as_ref();
            if cap.eq_ignore_ascii_case(b"SASL-IR") {
                self.caps.sasl_ir = true;
            } else if cap.eq_ignore_ascii_case(b"LITERAL+") {
                self.caps.literal_plus = true;
            } else if cap.eq_ignore_ascii_case(b"AUTH=PLAIN") {
                self.caps.auth_plain = true;
            } else if cap.eq_ignore_ascii_case(b"STARTTLS") {
                self.caps.starttls = true;
            }
        }
    }

    fn greeting(&mut self, line: &[u8]) {
        // Every login reads a greeting, and a backend's is the same each time: the
        // common shape (`* OK [CAPABILITY atoms] text`) is scanned here without
        // building imap-codec's tree, which cost 8 % of a login's instructions
        // (docs/architecture.md, "Hand-written where a crate was measured").
        if let Some(caps) = greeting_capabilities(line) {
            self.learn_caps(caps);
            return self.after_capabilities();
        }
        match GreetingCodec::default().decode(line) {
            Ok((_, greeting)) if greeting.kind == GreetingKind::Ok => {
                if let Some(Code::Capability(caps)) = &greeting.code {
                    self.learn_caps(caps.as_ref().iter().map(ToString::to_string));
                    self.after_capabilities();
                } else {
                    self.ask_capabilities();
                }
            }
            // PREAUTH (nothing to log in to), BYE, or not IMAP at all.
            _ => self.unavailable(),
        }
    }

    fn ask_capabilities(&mut self) {
        self.caps = Caps::default();
        self.out
            .extend_from_slice(format!("{TAG_CAPABILITY} CAPABILITY\r\n").as_bytes());
        self.state = State::Capability;
    }

    /// The capabilities are known: upgrade first if asked to, else log in.
    fn after_capabilities(&mut self) {
        if !self.starttls {
            return self.send_login();
        }
        if !self.caps.starttls {
            return self.unavailable();
        }
        self.out
            .extend_from_slice(format!("{TAG_STARTTLS} STARTTLS\r\n").as_bytes());
        self.state = State::StartTls;
    }

    fn starttls_answer(&mut self, line: &[u8]) {
        let Some((tag, status, _)) = tagged(line) else {
            return;
        };
        if tag != TAG_STARTTLS.as_bytes() {
            return;
        }
        if status != StatusKind::Ok {
            return self.unavailable();
        }
        // Whatever the backend sent after its OK arrived in plaintext and must not be
        // read as if it came through TLS.
        self.framer.clear();
        self.starttls = false;
        self.state = State::WaitTls;
        self.event = Some(LoginEvent::StartTls);
    }

    fn capability(&mut self, line: &[u8]) {
        match ResponseCodec::default().decode(line) {
            Ok((_, Response::Data(Data::Capability(caps)))) => {
                self.learn_caps(caps.as_ref().iter().map(ToString::to_string));
            }
            Ok((_, Response::Status(Status::Tagged(tagged))))
                if tagged.tag.inner() == TAG_CAPABILITY =>
            {
                // Even a refused CAPABILITY leaves the plain LOGIN path open.
                self.after_capabilities();
            }
            Ok((_, Response::Status(Status::Bye(_)))) => self.unavailable(),
            _ => {}
        }
    }

    fn send_login(&mut self) {
        if let Some(id) = self.id_command.take() {
            self.out.extend_from_slice(&id);
        }
        let use_plain = match self.method {
            LoginMethod::Plain => true,
            LoginMethod::Login => false,
            // LOGIN has no place for an authorization identity.
            LoginMethod::Auto => {
                self.creds.authzid.is_some() || (self.caps.auth_plain && self.caps.sasl_ir)
            }
        };
        let mut chunks = VecDeque::new();
        let mechanism = self.creds.mechanism;
        if mechanism.is_oauth() {
            // Bearer tokens are replayed with their own mechanism, message unchanged.
            let b64 = sasl::encode(self.creds.password.expose());
            let name = mechanism.as_str();
            if self.caps.sasl_ir {
                chunks.push_back(Secret::new(
                    format!("{TAG_LOGIN} AUTHENTICATE {name} {b64}\r\n").into_bytes(),
                ));
            } else {
                chunks.push_back(Secret::new(
                    format!("{TAG_LOGIN} AUTHENTICATE {name}\r\n").into_bytes(),
                ));
                chunks.push_back(Secret::new(format!("{b64}\r\n").into_bytes()));
            }
            // Queued for a failure challenge, after which the server answers NO.
            let answer = mechanism.error_challenge_answer().unwrap_or(b"\r\n");
            chunks.push_back(Secret::new(answer.to_vec()));
        } else if use_plain {
            let b64 = sasl::encode(sasl::encode_plain(&self.creds).expose());
            if self.caps.sasl_ir {
                chunks.push_back(Secret::new(
                    format!("{TAG_LOGIN} AUTHENTICATE PLAIN {b64}\r\n").into_bytes(),
                ));
            } else {
                chunks.push_back(Secret::new(
                    format!("{TAG_LOGIN} AUTHENTICATE PLAIN\r\n").into_bytes(),
                ));
                chunks.push_back(Secret::new(format!("{b64}\r\n").into_bytes()));
            }
        } else {
            let user = self.creds.user.as_bytes();
            let pass = self.creds.password.expose();
            let plus = if self.caps.literal_plus { "+" } else { "" };
            let mut first = format!("{TAG_LOGIN} LOGIN {{{}{plus}}}\r\n", user.len()).into_bytes();
            let mut second = user.to_vec();
            second.extend_from_slice(format!(" {{{}{plus}}}\r\n", pass.len()).as_bytes());
            let mut third = pass.clone();
            third.extend_from_slice(b"\r\n");
            if self.caps.literal_plus {
                first.append(&mut second);
                first.append(&mut third);
                chunks.push_back(Secret::new(first));
            } else {
                chunks.extend([first, second, third].map(Secret::new));
            }
        }
        if let Some(first) = chunks.pop_front() {
            self.out.extend_from_slice(first.expose());
        }
        self.state = State::LoggingIn { chunks };
    }

    fn logging_in(&mut self, line: &[u8]) {
        if line.starts_with(b"+") {
            let next = match &mut self.state {
                State::LoggingIn { chunks } => chunks.pop_front(),
                _ => None,
            };
            match next {
                Some(chunk) => self.out.extend_from_slice(chunk.expose()),
                // A continuation we did not ask for: not a server we understand.
                None => self.unavailable(),
            }
            return;
        }
        if let Some(rest) = line.strip_prefix(b"* ") {
            if starts_with_word(rest, b"BYE") {
                return self.unavailable();
            }
            // The answer to our ID is ours, not the client's: it already got one.
            if starts_with_word(rest, b"ID") {
                return;
            }
            if self.preamble.len() + line.len() > MAX_PREAMBLE {
                return self.unavailable();
            }
            self.preamble.extend_from_slice(line);
            return;
        }
        let Some((tag, status, text)) = tagged(line) else {
            return;
        };
        if tag != TAG_LOGIN.as_bytes() {
            return;
        }
        let reply = Reply {
            preamble: mem::take(&mut self.preamble),
            text: text.to_vec(),
        };
        match status {
            StatusKind::Ok => self.finish(Verdict::Accepted(reply)),
            StatusKind::No | StatusKind::Bad => self.finish(Verdict::Refused(reply)),
        }
    }

    fn process(&mut self) {
        while !matches!(self.state, State::Done | State::WaitTls) {
            let len = match self.framer.poll(Mode::Response, BACKEND_LIMITS) {
                Frame::Message(len) => len,
                Frame::Incomplete => return,
                Frame::Continue | Frame::TooLong | Frame::LiteralTooLarge { .. } => {
                    return self.unavailable();
                }
            };
            let line = self.framer.message(len).to_vec();
            self.framer.consume(len);
            match self.state {
                State::Greeting => self.greeting(&line),
                State::Capability => self.capability(&line),
                State::StartTls => self.starttls_answer(&line),
                State::LoggingIn { .. } => self.logging_in(&line),
                State::WaitTls | State::Done => {}
            }
        }
    }
}

/// The capability atoms of a greeting of the form `* OK [CAPABILITY a b c] text CRLF`,
/// or `None` for any other line (which imap-codec then judges). Only atoms are
/// accepted (RFC 9051 `capability = ("AUTH=" auth-type) / atom`): anything else in
/// the brackets sends the line to the full parser.
fn greeting_capabilities(line: &[u8]) -> Option<impl Iterator<Item = &[u8]>> {
    const PREFIX: &[u8] = b"* OK [CAPABILITY ";
    let rest = line
        .get(..PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(PREFIX))
        .and_then(|_| line.get(PREFIX.len()..))?;
    let end = rest.iter().position(|&b| b == b']')?;
    let (caps, text) = (rest.get(..end)?, rest.get(end + 1..)?);
    let text = text.strip_suffix(b"\r\n")?;
    let atom_char = |b: u8| {
        b.is_ascii_graphic() && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\')
    };
    // One space between atoms, as the grammar has it.
    let well_formed = caps
        .split(|&b| b == b' ')
        .all(|a| !a.is_empty() && a.iter().all(|&b| atom_char(b)))
        && text.iter().all(|&b| b != b'\r' && b != b'\n' && b != 0);
    well_formed.then(|| caps.split(|&b| b == b' '))
}

fn starts_with_word(s: &[u8], word: &[u8]) -> bool {
    s.get(..word.len())
        .is_some_and(|w| w.eq_ignore_ascii_case(word))
        && matches!(s.get(word.len()), None | Some(b' ' | b'\r' | b'\n'))
}

/// Splits `tag SP status [SP text] CRLF`; the text is returned without CRLF.
fn tagged(line: &[u8]) -> Option<(&[u8], StatusKind, &[u8])> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let sp = line.iter().position(|&b| b == b' ')?;
    let tag = line.get(..sp)?;
    let rest = line.get(sp + 1..)?;
    let (word, text) = match rest.iter().position(|&b| b == b' ') {
        Some(i) => (rest.get(..i)?, rest.get(i + 1..)?),
        None => (rest, &b""[..]),
    };
    let status = if word.eq_ignore_ascii_case(b"OK") {
        StatusKind::Ok
    } else if word.eq_ignore_ascii_case(b"NO") {
        StatusKind::No
    } else if word.eq_ignore_ascii_case(b"BAD") {
        StatusKind::Bad
    } else {
        return None;
    };
    Some((tag, status, text))
}

impl BackendLogin for Login {
    fn handle_input(&mut self, bytes: &[u8]) {
        if matches!(self.state, State::WaitTls) {
            // The driver reads nothing during the handshake; plaintext arriving now is
            // not to be trusted.
            return;
        }
        if matches!(self.state, State::Done) {
            // After the answer, bytes belong to the relay (see `into_handoff`).
            self.framer.push(bytes);
            return;
        }
        self.framer.push(bytes);
        self.process();
    }

    fn handle_tls_ready(&mut self) {
        if matches!(self.state, State::WaitTls) {
            // RFC 9051 §6.2.1: capabilities may change after STARTTLS (AUTH=PLAIN is
            // often offered only then): ask again.
            self.ask_capabilities();
        }
    }

    fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.out);
    }

    fn poll_event(&mut self) -> Option<LoginEvent> {
        self.event.take()
    }

    fn into_handoff(self) -> Vec<u8> {
        self.framer.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn login() -> Login {
        let creds = Credentials {
            mechanism: postern_proto::Mechanism::Cleartext,
            authzid: None,
            user: "u".into(),
            password: Secret::new(b"p".to_vec()),
            challenge: None,
        };
        let client = ClientInfo {
            client: "127.0.0.2:5555".parse().unwrap(),
            local: "127.0.0.1:143".parse().unwrap(),
            tls: false,
            session_id: "s".into(),
        };
        Login::new(creds, None, &LoginOptions::default(), &client)
    }

    /// What imap-codec makes of a greeting: the capabilities learned, or none.
    fn by_codec(line: &[u8]) -> Option<Caps> {
        let (_, greeting) = GreetingCodec::default().decode(line).ok()?;
        let mut l = login();
        match (&greeting.kind, &greeting.code) {
            (GreetingKind::Ok, Some(Code::Capability(caps))) => {
                l.learn_caps(caps.as_ref().iter().map(ToString::to_string));
            }
            _ => return None,
        }
        Some(l.caps)
    }

    /// The scan takes only greetings imap-codec reads the same way, and learns the same
    /// capabilities from them; everything else goes to imap-codec.
    #[test]
    fn the_greeting_scan_agrees_with_imap_codec() {
        let greetings: [&[u8]; 12] = [
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] Dovecot ready.\r\n",
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready\r\n",
            b"* ok [capability imap4rev1 sasl-ir auth=plain literal+ starttls] hi\r\n",
            b"* OK [CAPABILITY IMAP4rev1  AUTH=PLAIN] two spaces\r\n",
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN]\r\n",
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] text\n",
            b"* OK [CAPABILITY IMAP4rev1 (x)] bad atom\r\n",
            b"* OK [CAPABILITY ] empty\r\n",
            b"* OK [CAPABILITY IMAP4rev1 no close\r\n",
            b"* OK [CAPABILITY IMAP4rev1] a\rb\r\n",
            b"* PREAUTH [CAPABILITY IMAP4rev1] hi\r\n",
            b"* OK ready\r\n",
        ];
        for line in greetings {
            let codec = by_codec(line);
            // Not taken: imap-codec decides, as before.
            if greeting_capabilities(line).is_some() {
                let mut l = login();
                l.greeting(line);
                assert_eq!(Some(l.caps), codec, "{}", line.escape_ascii());
            }
        }
        let mut l = login();
        l.greeting(greetings[0]);
        assert!(l.caps.sasl_ir && l.caps.auth_plain && l.caps.literal_plus);
        assert!(greeting_capabilities(greetings[0]).is_some());
        assert!(greeting_capabilities(greetings[1]).is_some());
    }
}
