//! What a session must do with the auth server's answer, following nginx's
//! `ngx_mail_auth_http_process_headers` and `ngx_mail_auth_sleep_handler`.

use std::net::SocketAddr;
use std::time::Duration;

use postern_proto::{Reply, Secret};

use super::{AuthProtocol, Error, Response, Status};

/// nginx's SMTP reply code when the auth server sends no `Auth-Error-Code`.
pub const DEFAULT_SMTP_ERROR_CODE: &str = "535 5.7.0";

/// The next step for the session.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "the session must act on the auth server's decision"]
pub enum Decision {
    /// Connect to the backend and log in there.
    Login(Upstream),
    /// Refuse this login attempt.
    Refuse(Refusal),
    /// `Auth-Status: WAIT`: send nothing to the client; after `after` (zero: at once)
    /// send the same request again. The attempt number does not change.
    AskAgain {
        /// How long to wait before asking again.
        after: Duration,
    },
}

/// Where and as whom to log in.
#[derive(Debug, PartialEq, Eq)]
pub struct Upstream {
    /// The backend, from `Auth-Server` and `Auth-Port`.
    pub server: SocketAddr,
    /// `Auth-User`: replaces the client's login name on the backend and in logs.
    pub user: Option<String>,
    /// `Auth-Pass`: the password for the backend login. Always `Some` for IMAP and
    /// POP3 (the client's own password is not reused, as in nginx). For SMTP, `None`
    /// means the backend login carries no password (XCLIENT only).
    pub pass: Option<Secret<Vec<u8>>>,
}

/// A refused login.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The answer for the client, in the form each front end's
    /// `Verdict::Refused` expects: for IMAP the text after `tag NO `, for POP3 the
    /// text after `-ERR `, for SMTP the whole line, `<Auth-Error-Code or 535 5.7.0>
    /// <text>`. Always without CRLF.
    pub reply: Reply,
    /// `None` (no `Auth-Wait`, or 0): send the reply at once, then close the
    /// connection. `Some(d)`: keep the client waiting for `d`, reading nothing, then
    /// send the reply; the client may try again, with `Auth-Login-Attempt` one higher.
    pub delay: Option<Duration>,
}

impl Refusal {
    /// Whether the connection must be closed after the reply.
    pub fn closes(&self) -> bool {
        self.delay.is_none()
    }
}

/// Maps a parsed answer to the session's next step for `protocol`.
///
/// Errors are nginx's "internal server error" cases: the session should send its
/// protocol's temporary-failure reply and close.
///
/// `Auth-Wait` is honoured as sent. It is bounded only by the caller's pre-auth
/// deadline, which should stay armed through waits; a `WAIT` loop likewise ends
/// there (nginx repeats it forever).
pub fn decide(response: Response, protocol: AuthProtocol) -> Result<Decision, Error> {
    let wait = response.wait.map(|s| Duration::from_secs(u64::from(s)));
    match response.status {
        Status::Wait => Ok(Decision::AskAgain {
            after: wait.unwrap_or(Duration::ZERO),
        }),
        Status::Fail(text) => {
            let text = match protocol {
                AuthProtocol::Smtp => {
                    let code = response
                        .error_code
                        .filter(|c| !c.is_empty())
                        .unwrap_or_else(|| DEFAULT_SMTP_ERROR_CODE.to_owned());
                    let mut line = code.into_bytes();
                    if !text.is_empty() {
                        line.push(b' ');
                        line.extend_from_slice(&text);
                    }
                    line
                }
                AuthProtocol::Imap | AuthProtocol::Pop3 => text,
            };
            Ok(Decision::Refuse(Refusal {
                reply: Reply {
                    preamble: Vec::new(),
                    text,
                },
                delay: wait.filter(|d| !d.is_zero()),
            }))
        }
        Status::Ok => {
            let (Some(ip), Some(port)) = (response.server, response.port) else {
                return Err(Error::MissingServer);
            };
            if response.pass.is_none() && protocol != AuthProtocol::Smtp {
                return Err(Error::MissingPass);
            }
            Ok(Decision::Login(Upstream {
                server: SocketAddr::new(ip, port),
                user: response.user,
                pass: response.pass,
            }))
        }
    }
}
