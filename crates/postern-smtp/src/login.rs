//! The backend-facing submission login: greet, tell the backend who the client is,
//! then either let XCLIENT `LOGIN=` stand for the authentication or replay AUTH.
//!
//! ```text
//!  LoginMethod::Xclient (Postfix, Postern in smtpd_authorized_xclient_hosts):
//!   220 ─▶ EHLO postern ─▶ 250 (XCLIENT ADDR ...) ─▶ XCLIENT ... ─▶ 220
//!       ─▶ EHLO <client> ─▶ 250 ─┬─ proxy verified and LOGIN sent ─▶ Done(Accepted 235)
//!                                └─ otherwise ─▶ AUTH (below)
//!  LoginMethod::Auth (any server):
//!   220 ─▶ EHLO <client> ─▶ 250 ─▶ AUTH (below)
//!  AUTH PLAIN <ir>                  ─▶ 235 Accepted | 5xx Refused | 4xx Unavailable
//!  AUTH LOGIN ─334─▶ user ─334─▶ password ─▶ same
//!  anything unexpected (greeting not 220, no AUTH, garbage, EOF) ─▶ Failed(Unavailable)
//! ```
//!
//! The handshake itself (with XCLIENT rules and the place reserved for backend
//! STARTTLS) is in `handshake.rs`. Credentials only travel as base64.

use postern_proto::sasl;
use postern_proto::{
    BackendLogin, ClientInfo, Credentials, Failure, LoginEvent, Reply, Secret, Verdict,
};

use crate::ehlo::Extensions;
use crate::handshake::{Handshake, Plan, Step, Verb};
use crate::reply::{BackendReply, Read, ReplyReader};
use crate::xclient::ClientAttrs;

/// Longest `AUTH` line sent with an initial response. Postfix reads commands up to
/// `line_length_limit` (2048 by default), below RFC 4954's 12 288.
const MAX_INITIAL_RESPONSE_LINE: usize = 2048;

/// How Postern opens the backend session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoginMethod {
    /// Replay the client's AUTH. Works with any server; the backend sees Postern's
    /// address, not the client's.
    #[default]
    Auth,
    /// Postfix XCLIENT with the client's address, port, HELO and name; then `LOGIN=`
    /// when [`LoginOptions::proxy_verified`] is set, otherwise AUTH replay. Requires
    /// Postern in the backend's `smtpd_authorized_xclient_hosts`.
    Xclient,
}

/// Which SASL mechanism replays the credentials.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthMethod {
    /// PLAIN when the backend lists it (or when there is an authorization identity,
    /// which LOGIN cannot carry), else LOGIN when listed, else PLAIN.
    #[default]
    Auto,
    /// Always `AUTH PLAIN` with an initial response (RFC 4954 §4).
    Plain,
    /// `AUTH LOGIN` in three steps, for servers without PLAIN (some Exchange setups).
    /// Falls back to PLAIN for credentials with an authorization identity.
    Login,
}

/// Per-backend settings for the submission login.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginOptions {
    /// How the session is opened.
    pub method: LoginMethod,
    /// How credentials are replayed when they are.
    pub auth: AuthMethod,
    /// Postern itself verified the password for this login (set by the driver per
    /// login). With [`LoginMethod::Xclient`] the backend then gets `XCLIENT LOGIN=<user>`
    /// and no password at all.
    pub proxy_verified: bool,
}

/// What the login needs to know about the client-side session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// Postern's own host name (the probe EHLO before XCLIENT).
    pub hostname: String,
    /// The client's EHLO argument, replayed to the backend.
    pub helo: String,
    /// The client's verified host name, if the driver looked it up (XCLIENT NAME).
    pub client_name: Option<String>,
}

#[derive(Debug)]
enum State {
    Handshake(Box<Handshake>),
    /// Waiting for the answer to `AUTH PLAIN <ir>` or to the LOGIN password.
    AuthFinal,
    /// `AUTH LOGIN` sent; waiting for the user prompt.
    AuthLoginUser,
    /// User sent; waiting for the password prompt.
    AuthLoginPass,
    /// `AUTH <bearer mechanism>` sent without the (long) token; waiting for `334`.
    AuthTokenPrompt,
    /// Token sent; a `334` now is an error challenge (RFC 7628 §3.2.2) that a client
    /// must answer before the final reply.
    AuthToken {
        answered: bool,
    },
    Done,
}

/// Opens one backend session for an authenticated submission client.
#[derive(Debug)]
pub struct Login {
    state: State,
    reader: ReplyReader,
    out: Vec<u8>,
    event: Option<LoginEvent>,
    creds: Credentials,
    options: LoginOptions,
}

impl Login {
    /// Prepares a login; nothing is sent until the backend's greeting arrives.
    pub fn new(
        creds: Credentials,
        session: SessionInfo,
        options: &LoginOptions,
        client: &ClientInfo,
    ) -> Self {
        let xclient = (options.method == LoginMethod::Xclient).then(|| ClientAttrs {
            client: client.client,
            local: client.local,
            name: session.client_name.clone(),
            helo: Some(session.helo.clone()),
            proto: Verb::Ehlo.proto(),
            login: options
                .proxy_verified
                .then(|| creds.mailbox_user().to_owned()),
            ipv6_prefix: true,
        });
        let plan = Plan {
            hostname: session.hostname,
            // AUTH is an ESMTP extension: the backend is always greeted with EHLO.
            verb: Verb::Ehlo,
            helo: session.helo,
            xclient,
        };
        Self {
            state: State::Handshake(Box::new(Handshake::new(plan))),
            reader: ReplyReader::default(),
            out: Vec::new(),
            event: None,
            creds,
            options: options.clone(),
        }
    }

    fn finish(&mut self, verdict: Verdict) {
        self.state = State::Done;
        self.event = Some(LoginEvent::Done(verdict));
    }

    fn unavailable(&mut self) {
        self.finish(Verdict::Failed(Failure::Unavailable));
    }

    fn process(&mut self) {
        while !matches!(self.state, State::Done) {
            match self.reader.next() {
                Read::Incomplete => return,
                Read::Invalid => return self.unavailable(),
                Read::Reply(reply) => self.on_reply(reply),
            }
        }
    }

    fn on_reply(&mut self, reply: BackendReply) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Handshake(mut hs) => match hs.on_reply(&reply, &mut self.out) {
                Step::Wait => self.state = State::Handshake(hs),
                Step::Failed(_) => self.unavailable(),
                Step::Ready {
                    login_sent: true, ..
                } => self.finish(Verdict::Accepted(Reply {
                    preamble: Vec::new(),
                    text: b"235 2.7.0 Authentication successful".to_vec(),
                })),
                Step::Ready { extensions, .. } => self.start_auth(&extensions),
            },
            State::AuthLoginUser if reply.code == 334 => {
                self.send_b64(self.creds.user.as_bytes().to_vec());
                self.state = State::AuthLoginPass;
            }
            State::AuthLoginPass if reply.code == 334 => {
                self.send_b64(self.creds.password.expose().clone());
                self.state = State::AuthFinal;
            }
            State::AuthTokenPrompt if reply.code == 334 => {
                self.send_b64(self.creds.password.expose().clone());
                self.state = State::AuthToken { answered: false };
            }
            State::AuthToken { answered: false } if reply.code == 334 => {
                let answer = self.creds.mechanism.error_challenge_answer();
                self.out.extend_from_slice(answer.unwrap_or(b"\r\n"));
                self.state = State::AuthToken { answered: true };
            }
            State::AuthFinal
            | State::AuthLoginUser
            | State::AuthLoginPass
            | State::AuthTokenPrompt
            | State::AuthToken { .. } => {
                let verdict = verdict(reply);
                self.finish(verdict);
            }
            State::Done => {}
        }
    }

    fn start_auth(&mut self, ext: &Extensions) {
        if !ext.has("AUTH") {
            // e.g. Postfix with smtpd_tls_auth_only on a plaintext backend port.
            return self.unavailable();
        }
        if self.creds.mechanism.is_oauth() {
            return self.start_token_auth();
        }
        let plain = match self.options.auth {
            AuthMethod::Plain => true,
            AuthMethod::Login => self.creds.authzid.is_some(),
            AuthMethod::Auto => {
                self.creds.authzid.is_some() || ext.has_auth("PLAIN") || !ext.has_auth("LOGIN")
            }
        };
        if plain {
            let b64 = Secret::new(sasl::encode(sasl::encode_plain(&self.creds).expose()));
            self.out.extend_from_slice(b"AUTH PLAIN ");
            self.out.extend_from_slice(b64.expose().as_bytes());
            self.out.extend_from_slice(b"\r\n");
            self.state = State::AuthFinal;
        } else {
            self.out.extend_from_slice(b"AUTH LOGIN\r\n");
            self.state = State::AuthLoginUser;
        }
    }

    /// Replays a bearer token with the client's own mechanism: there is no password
    /// to turn into PLAIN. Short tokens go as an initial response; long ones (Azure AD
    /// tokens run to several KiB) after the `334`, which every server accepts.
    fn start_token_auth(&mut self) {
        let name = self.creds.mechanism.as_str();
        let b64 = Secret::new(sasl::encode(self.creds.password.expose()));
        if b64.expose().len() + name.len() + 7 <= MAX_INITIAL_RESPONSE_LINE {
            self.out
                .extend_from_slice(format!("AUTH {name} ").as_bytes());
            self.out.extend_from_slice(b64.expose().as_bytes());
            self.out.extend_from_slice(b"\r\n");
            self.state = State::AuthToken { answered: false };
        } else {
            self.out
                .extend_from_slice(format!("AUTH {name}\r\n").as_bytes());
            self.state = State::AuthTokenPrompt;
        }
    }

    fn send_b64(&mut self, data: Vec<u8>) {
        let data = Secret::new(data);
        let b64 = Secret::new(sasl::encode(data.expose()));
        self.out.extend_from_slice(b64.expose().as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }
}

/// The backend's final answer to AUTH, as a verdict.
fn verdict(reply: BackendReply) -> Verdict {
    match reply.code {
        235 => Verdict::Accepted(reply.into_reply()),
        // 500–504: the backend does not understand AUTH as we sent it; a configuration
        // problem, not the client's fault.
        500..=504 => Verdict::Failed(Failure::Unavailable),
        505..=599 => Verdict::Refused(reply.into_reply()),
        // 4xx (454 temporary failure, 421 closing) and anything else (a 334 after
        // PLAIN with an initial response, a 2xx other than 235).
        _ => Verdict::Failed(Failure::Unavailable),
    }
}

impl BackendLogin for Login {
    fn handle_input(&mut self, bytes: &[u8]) {
        self.reader.push(bytes);
        if !matches!(self.state, State::Done) {
            self.process();
        }
    }

    fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.out);
    }

    fn poll_event(&mut self) -> Option<LoginEvent> {
        self.event.take()
    }

    fn into_handoff(self) -> Vec<u8> {
        self.reader.into_bytes()
    }
}
