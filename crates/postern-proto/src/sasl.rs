//! SASL decoding for the mechanisms a proxy must understand to learn the user name
//! (RFC 4616 PLAIN, the LOGIN draft), and the base64 rules the mail protocols share
//! (RFC 4959 / 5034 / 4954: `=` is an empty initial response, `*` cancels).
//!
//! A proxy only decodes and replays: it never runs a challenge-response mechanism itself,
//! so only mechanisms that carry the password (or a bearer token) can be proxied.
//!
//! [`Exchange`] is the server side of the dialogue, shared by the IMAP `AUTHENTICATE`,
//! POP3 `AUTH` and SMTP `AUTH` front ends: the rules (which mechanism prompts what, when
//! the LOGIN user name is checked, what an empty password means) are the same in all
//! three, and only the framing around them differs (`+ ` or `334 ` before a challenge,
//! the protocol's own replies to a cancel or a failure).

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::Secret;

/// Base64 as clients really send it: the standard alphabet, padding optional.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How the client presented its credentials; kept for logs and for choosing how to
/// replay them to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mechanism {
    /// The protocol's own cleartext command: IMAP `LOGIN`, POP3 `USER`/`PASS`.
    Cleartext,
    /// SASL PLAIN (RFC 4616).
    Plain,
    /// SASL LOGIN (draft-murchison-sasl-login).
    Login,
    /// POP3 APOP (RFC 1939 §7): the "password" is the MD5 digest of the greeting's
    /// timestamp and the secret, and [`Credentials::challenge`] holds that timestamp.
    Apop,
    /// Google's XOAUTH2: [`Credentials::password`] holds the whole client message, which
    /// is replayed to the backend unchanged (Postern does not validate tokens).
    XOAuth2,
    /// RFC 7628 OAUTHBEARER; like [`Mechanism::XOAuth2`], replayed unchanged.
    OAuthBearer,
}

impl Mechanism {
    /// The name used in logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Cleartext => "cleartext",
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::Apop => "APOP",
            Mechanism::XOAuth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// Whether the credentials are a bearer token message to replay as is.
    pub fn is_oauth(self) -> bool {
        matches!(self, Mechanism::XOAuth2 | Mechanism::OAuthBearer)
    }

    /// A client's answer to a server's error challenge after a refused bearer token,
    /// with its line end: the server then sends its final failure. OAUTHBEARER's
    /// answer is `%x01` (RFC 7628 §3.2.2, base64 `AQ==`); XOAUTH2 servers (Google's
    /// definition) want an empty line. `None` for mechanisms without one.
    pub fn error_challenge_answer(self) -> Option<&'static [u8]> {
        match self {
            Mechanism::OAuthBearer => Some(b"AQ==\r\n"),
            Mechanism::XOAuth2 => Some(b"\r\n"),
            _ => None,
        }
    }

    /// The SASL mechanism a client named, in any case (the mail protocols compare
    /// mechanism names case-insensitively); `None` for a name Postern cannot proxy.
    pub fn from_sasl_name(name: &[u8]) -> Option<Mechanism> {
        [
            Mechanism::Plain,
            Mechanism::Login,
            Mechanism::XOAuth2,
            Mechanism::OAuthBearer,
        ]
        .into_iter()
        .find(|m| name.eq_ignore_ascii_case(m.as_str().as_bytes()))
    }
}

/// What a client authenticated with. The password never leaves its [`Secret`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// How the credentials arrived.
    pub mechanism: Mechanism,
    /// SASL authorization identity, when the client asked to act as someone else.
    pub authzid: Option<String>,
    /// The authentication identity: the name the client logged in with, as typed.
    pub user: String,
    /// The password (or token), as raw bytes: IMAP literals may carry 8-bit data.
    /// For a challenge-response mechanism (APOP) this is the client's response.
    pub password: Secret<Vec<u8>>,
    /// The server challenge the response answers (the APOP timestamp); `None` for the
    /// mechanisms that carry the password itself.
    pub challenge: Option<String>,
}

impl Credentials {
    /// Credentials that carry the password itself, with no authorization identity.
    pub fn new(mechanism: Mechanism, user: String, password: Vec<u8>) -> Self {
        Credentials {
            mechanism,
            authzid: None,
            user,
            password: Secret::new(password),
            challenge: None,
        }
    }

    /// The identity whose mailbox the session opens: the authzid when one was given,
    /// otherwise the login name. Routing MUST use this, or a master-user login would be
    /// pinned by the wrong name.
    pub fn mailbox_user(&self) -> &str {
        self.authzid.as_deref().unwrap_or(&self.user)
    }

    /// Replaces the mailbox identity (the authzid when present, else the login name),
    /// so the backend sees the name the user was routed under.
    pub fn set_mailbox_user(&mut self, name: &str) {
        match &mut self.authzid {
            Some(authzid) => name.clone_into(authzid),
            None => name.clone_into(&mut self.user),
        }
    }
}

/// Why a SASL exchange could not produce credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SaslError {
    /// The client sent `*`.
    Cancelled,
    /// The data was not valid base64.
    BadBase64,
    /// The decoded message does not have the mechanism's shape.
    Malformed,
    /// The mechanism is not a SASL one ([`Mechanism::Cleartext`], [`Mechanism::Apop`]).
    Unsupported,
}

/// The server side of one SASL exchange, between the client's command and the
/// credentials. Sans-IO and protocol-neutral: the front end frames the challenge and
/// reads the answer line; this decides what the bytes mean.
///
/// An exchange that has produced credentials or failed is gone (see [`Step`]), so a
/// front end cannot feed a finished one by mistake.
#[derive(Debug)]
pub struct Exchange {
    mechanism: Mechanism,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    /// Waiting for the mechanism's one message (PLAIN, XOAUTH2, OAUTHBEARER).
    Message,
    /// LOGIN, first step.
    LoginUser,
    /// LOGIN, second step; the user name has already been checked, so a bad one is
    /// refused before the client sends a password for it.
    LoginPassword { user: String },
}

/// What the front end does next.
#[derive(Debug)]
#[must_use = "a challenge must be sent, credentials authenticated, a failure answered"]
pub enum Step {
    /// Send [`Exchange::challenge`], base64-encoded after the protocol's continuation
    /// prefix, and feed the client's next line to the exchange.
    Challenge(Exchange),
    /// The client's credentials, decoded and checked; route them and log in.
    Done(Credentials),
    /// The exchange is over without credentials: [`SaslError::Cancelled`] is the client's
    /// `*`, [`SaslError::BadBase64`] a line that is not base64, anything else
    /// undecodable credentials (which count as a failed login).
    Failed(SaslError),
}

impl Exchange {
    /// Starts an exchange for the client's command. `initial_response` is the optional
    /// initial response as it came on the command line, read like a response line
    /// (base64, `=` for an empty one, `*` cancels).
    pub fn start(mechanism: Mechanism, initial_response: Option<&[u8]>) -> Step {
        // The mechanism first: a command naming one that cannot be run is refused as
        // such, whatever its initial response holds.
        let exchange = match Exchange::new(mechanism) {
            Ok(exchange) => exchange,
            Err(e) => return Step::Failed(e),
        };
        match initial_response {
            None => Step::Challenge(exchange),
            Some(line) => exchange.feed(line),
        }
    }

    /// Like [`Exchange::start`], for a protocol parser that has already decoded the
    /// initial response (imap-codec does, and rejects bad base64 as a syntax error).
    pub fn start_decoded(mechanism: Mechanism, initial_response: Option<Vec<u8>>) -> Step {
        let exchange = match Exchange::new(mechanism) {
            Ok(exchange) => exchange,
            Err(e) => return Step::Failed(e),
        };
        match initial_response {
            None => Step::Challenge(exchange),
            Some(data) => exchange.respond(data),
        }
    }

    fn new(mechanism: Mechanism) -> Result<Exchange, SaslError> {
        let stage = match mechanism {
            Mechanism::Plain | Mechanism::XOAuth2 | Mechanism::OAuthBearer => Stage::Message,
            Mechanism::Login => Stage::LoginUser,
            Mechanism::Cleartext | Mechanism::Apop => return Err(SaslError::Unsupported),
        };
        Ok(Exchange { mechanism, stage })
    }

    /// The mechanism being run.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// The challenge to send, before base64: empty for the client-first mechanisms
    /// (their command came without an initial response), LOGIN's two prompts otherwise.
    pub fn challenge(&self) -> &'static [u8] {
        match self.stage {
            Stage::Message => b"",
            Stage::LoginUser => b"Username:",
            Stage::LoginPassword { .. } => b"Password:",
        }
    }

    /// Feeds the client's answer to [`Exchange::challenge`]: one line, without its CRLF.
    pub fn feed(self, line: &[u8]) -> Step {
        match decode_response(line) {
            Ok(data) => self.respond(data),
            Err(e) => Step::Failed(e),
        }
    }

    fn respond(self, data: Vec<u8>) -> Step {
        let done = |creds: Result<Credentials, SaslError>| match creds {
            Ok(creds) => Step::Done(creds),
            Err(e) => Step::Failed(e),
        };
        match self.stage {
            Stage::Message => done(match self.mechanism {
                Mechanism::XOAuth2 => decode_xoauth2(&data),
                Mechanism::OAuthBearer => decode_oauthbearer(&data),
                _ => decode_plain(&data),
            }),
            Stage::LoginUser => match identity(&data) {
                Ok(user) => Step::Challenge(Exchange {
                    stage: Stage::LoginPassword { user },
                    ..self
                }),
                Err(e) => Step::Failed(e),
            },
            // Refused like an empty PLAIN password: there is nothing to replay, and
            // refusing here saves a route lookup and a backend connection.
            Stage::LoginPassword { .. } if data.is_empty() => Step::Failed(SaslError::Malformed),
            Stage::LoginPassword { user } => {
                Step::Done(Credentials::new(Mechanism::Login, user, data))
            }
        }
    }
}

/// Decodes one client response line of a SASL exchange (`*` cancels, `=` or an empty
/// line is an empty response). The line excludes its CRLF.
pub fn decode_response(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    match line {
        b"*" => Err(SaslError::Cancelled),
        b"" | b"=" => Ok(Vec::new()),
        _ => B64.decode(line).map_err(|_| SaslError::BadBase64),
    }
}

/// Base64-encodes a server challenge or a replayed client response.
pub fn encode(data: &[u8]) -> String {
    B64.encode(data)
}

/// Decodes a PLAIN message: `[authzid] NUL authcid NUL passwd`.
pub fn decode_plain(message: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = message.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    if authcid.is_empty() || passwd.is_empty() || passwd.contains(&0) {
        return Err(SaslError::Malformed);
    }
    let user = identity(authcid)?;
    let authzid = if authzid.is_empty() {
        None
    } else {
        Some(identity(authzid)?)
    };
    Ok(Credentials {
        mechanism: Mechanism::Plain,
        authzid,
        user,
        password: Secret::new(passwd.to_vec()),
        challenge: None,
    })
}

/// Decodes an XOAUTH2 message: `user=<user>\x01auth=Bearer <token>\x01\x01`. The user
/// routes the login; the whole message is kept to replay.
pub fn decode_xoauth2(message: &[u8]) -> Result<Credentials, SaslError> {
    let body = message
        .strip_suffix(b"\x01\x01")
        .ok_or(SaslError::Malformed)?;
    let mut user = None;
    let mut auth = false;
    for field in body.split(|&b| b == 1) {
        if let Some(u) = field.strip_prefix(b"user=") {
            user = Some(identity(u)?);
        } else if field.starts_with(b"auth=") {
            auth = true;
        }
    }
    match (user, auth) {
        (Some(user), true) => Ok(oauth(Mechanism::XOAuth2, user, message)),
        _ => Err(SaslError::Malformed),
    }
}

/// Decodes an OAUTHBEARER message (RFC 7628 §3.1): a GS2 header `n,a=<authzid>,` then
/// `\x01`-separated `key=value` pairs with `auth=Bearer <token>`, ending in `\x01\x01`.
/// The authorization identity in the header is the user: without it there is nothing
/// to route by, and the login is refused.
pub fn decode_oauthbearer(message: &[u8]) -> Result<Credentials, SaslError> {
    let (header, rest) = split_once(message, 1).ok_or(SaslError::Malformed)?;
    let body = rest.strip_suffix(b"\x01\x01").ok_or(SaslError::Malformed)?;
    if !body.split(|&b| b == 1).any(|kv| kv.starts_with(b"auth=")) {
        return Err(SaslError::Malformed);
    }
    // gs2-header: flag "," [ "a=" saslname ] ","
    let mut parts = header.splitn(3, |&b| b == b',');
    let (Some(flag), Some(authzid), Some(b"")) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::Malformed);
    };
    if !matches!(flag, b"n" | b"y") && !flag.starts_with(b"p=") {
        return Err(SaslError::Malformed);
    }
    let name = authzid.strip_prefix(b"a=").ok_or(SaslError::Malformed)?;
    let user = identity(&unescape_saslname(name)?)?;
    Ok(oauth(Mechanism::OAuthBearer, user, message))
}

fn oauth(mechanism: Mechanism, user: String, message: &[u8]) -> Credentials {
    Credentials::new(mechanism, user, message.to_vec())
}

fn split_once(s: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&b| b == sep)?;
    Some((s.get(..i)?, s.get(i + 1..)?))
}

/// RFC 5801 saslname: `=2C` is `,` and `=3D` is `=`; any other `=` is an error.
fn unescape_saslname(raw: &[u8]) -> Result<Vec<u8>, SaslError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b == b'=' {
            match raw.get(i + 1..i + 3) {
                Some(b"2C") => out.push(b','),
                Some(b"3D") => out.push(b'='),
                _ => return Err(SaslError::Malformed),
            }
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

/// Builds the PLAIN message that replays `creds` to a backend.
pub fn encode_plain(creds: &Credentials) -> Secret<Vec<u8>> {
    let authzid = creds.authzid.as_deref().unwrap_or("");
    let pass = creds.password.expose();
    let mut out = Vec::with_capacity(authzid.len() + creds.user.len() + pass.len() + 2);
    out.extend_from_slice(authzid.as_bytes());
    out.push(0);
    out.extend_from_slice(creds.user.as_bytes());
    out.push(0);
    out.extend_from_slice(pass);
    Secret::new(out)
}

/// Checks a user name received in any mechanism: valid UTF-8, no control characters
/// (which would let a client smuggle line breaks into backend commands or logs).
pub fn identity(raw: &[u8]) -> Result<String, SaslError> {
    let s = std::str::from_utf8(raw).map_err(|_| SaslError::Malformed)?;
    if s.is_empty() || s.chars().any(char::is_control) {
        return Err(SaslError::Malformed);
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_with_and_without_authzid() {
        let c = decode_plain(b"\0alice\0secret").unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(c.authzid, None);
        assert_eq!(c.password.expose(), b"secret");
        assert_eq!(c.mailbox_user(), "alice");

        let c = decode_plain(b"bob\0admin\0pw").unwrap();
        assert_eq!(c.authzid.as_deref(), Some("bob"));
        assert_eq!(c.mailbox_user(), "bob");
        assert_eq!(encode_plain(&c).expose(), b"bob\0admin\0pw");
        let mut c = c;
        c.set_mailbox_user("bob@example.test");
        assert_eq!(
            (c.authzid.as_deref(), c.user.as_str()),
            (Some("bob@example.test"), "admin")
        );
    }

    #[test]
    fn plain_rejects_bad_shapes() {
        for bad in [
            &b""[..],
            b"alice",
            b"\0alice",
            b"\0\0pw",
            b"\0alice\0",
            b"\0al\nice\0pw",
            b"\0\xff\0pw",
        ] {
            assert_eq!(decode_plain(bad), Err(SaslError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn oauth_messages() {
        let x = decode_xoauth2(b"user=alice@x\x01auth=Bearer tok\x01\x01").unwrap();
        assert_eq!(
            (x.user.as_str(), x.mechanism),
            ("alice@x", Mechanism::XOAuth2)
        );
        assert_eq!(
            x.password.expose(),
            b"user=alice@x\x01auth=Bearer tok\x01\x01"
        );
        assert!(decode_xoauth2(b"user=alice@x\x01\x01").is_err());
        assert!(decode_xoauth2(b"auth=Bearer t\x01\x01").is_err());
        let o = decode_oauthbearer(
            b"n,a=bob=2Cjr@x,\x01host=imap.x\x01port=993\x01auth=Bearer t\x01\x01",
        )
        .unwrap();
        assert_eq!(
            (o.user.as_str(), o.mechanism),
            ("bob,jr@x", Mechanism::OAuthBearer)
        );
        for bad in [
            &b"n,,\x01auth=Bearer t\x01\x01"[..],
            b"n,a=bob,\x01host=x\x01\x01",
            b"n,a=b=ZZ,\x01auth=Bearer t\x01\x01",
            b"x,a=bob,\x01auth=Bearer t\x01\x01",
            b"n,a=bob,\x01auth=Bearer t",
        ] {
            assert!(decode_oauthbearer(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn responses() {
        assert_eq!(decode_response(b"*"), Err(SaslError::Cancelled));
        assert_eq!(decode_response(b"="), Ok(vec![]));
        assert_eq!(
            decode_response(b"AGFsaWNlAHNlY3JldA==").unwrap(),
            b"\0alice\0secret"
        );
        assert_eq!(
            decode_response(b"AGFsaWNlAHNlY3JldA").unwrap(),
            b"\0alice\0secret"
        );
        assert_eq!(decode_response(b"!!"), Err(SaslError::BadBase64));
    }

    /// The challenge an exchange asks for; `None` once it has ended.
    fn challenge(step: &Step) -> Option<&'static [u8]> {
        match step {
            Step::Challenge(exchange) => Some(exchange.challenge()),
            _ => None,
        }
    }

    fn feed(step: Step, line: &[u8]) -> Step {
        match step {
            Step::Challenge(exchange) => exchange.feed(line),
            other => panic!("fed a finished exchange: {other:?}"),
        }
    }

    fn done(step: Step) -> Credentials {
        match step {
            Step::Done(creds) => creds,
            other => panic!("not done: {other:?}"),
        }
    }

    fn failed(step: Step) -> SaslError {
        match step {
            Step::Failed(e) => e,
            other => panic!("not failed: {other:?}"),
        }
    }

    #[test]
    fn mechanism_names() {
        assert_eq!(Mechanism::from_sasl_name(b"plain"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::from_sasl_name(b"LoGiN"), Some(Mechanism::Login));
        assert_eq!(
            Mechanism::from_sasl_name(b"XOAUTH2"),
            Some(Mechanism::XOAuth2)
        );
        assert_eq!(
            Mechanism::from_sasl_name(b"oauthbearer"),
            Some(Mechanism::OAuthBearer)
        );
        for other in [&b"CRAM-MD5"[..], b"APOP", b"cleartext", b"", b"PLAIN "] {
            assert_eq!(Mechanism::from_sasl_name(other), None, "{other:?}");
        }
    }

    #[test]
    fn plain_exchange() {
        let step = Exchange::start(Mechanism::Plain, None);
        assert_eq!(challenge(&step), Some(&b""[..]));
        let c = done(feed(step, b"AGFsaWNlAHNlY3JldA=="));
        assert_eq!((c.mechanism, c.user.as_str()), (Mechanism::Plain, "alice"));
        assert_eq!(c.password.expose(), b"secret");

        let c = done(Exchange::start(Mechanism::Plain, Some(b"Ym9iAGFkbWluAHB3")));
        assert_eq!(
            (c.authzid.as_deref(), c.user.as_str()),
            (Some("bob"), "admin")
        );

        // `=` is an empty message, which PLAIN cannot be.
        assert_eq!(
            failed(Exchange::start(Mechanism::Plain, Some(b"="))),
            SaslError::Malformed
        );
        assert_eq!(
            failed(feed(Exchange::start(Mechanism::Plain, None), b"")),
            SaslError::Malformed
        );
    }

    #[test]
    fn login_exchange() {
        let step = Exchange::start(Mechanism::Login, None);
        assert_eq!(challenge(&step), Some(&b"Username:"[..]));
        // What clients (and scripts written against Dovecot) expect on the wire.
        assert_eq!(encode(challenge(&step).unwrap()), "VXNlcm5hbWU6");
        let step = feed(step, b"YWxpY2U=");
        assert_eq!(challenge(&step), Some(&b"Password:"[..]));
        assert_eq!(encode(challenge(&step).unwrap()), "UGFzc3dvcmQ6");
        let c = done(feed(step, b"c2VjcmV0"));
        assert_eq!(
            c,
            Credentials::new(Mechanism::Login, "alice".into(), b"secret".to_vec())
        );

        // The initial response is the user name.
        let step = Exchange::start(Mechanism::Login, Some(b"YWxpY2U"));
        assert_eq!(challenge(&step), Some(&b"Password:"[..]));
        assert_eq!(done(feed(step, b"cHc=")).user, "alice");

        // A bad name ends the exchange before a password is asked for.
        for user in [&b"="[..], b"AA==", b"YWwKaWNl"] {
            let step = Exchange::start(Mechanism::Login, None);
            assert_eq!(failed(feed(step, user)), SaslError::Malformed, "{user:?}");
        }
        let step = feed(Exchange::start(Mechanism::Login, None), b"YWxpY2U=");
        assert_eq!(failed(feed(step, b"=")), SaslError::Malformed);
    }

    #[test]
    fn oauth_exchanges() {
        let message = b"user=alice@x\x01auth=Bearer tok\x01\x01";
        let step = Exchange::start(Mechanism::XOAuth2, None);
        assert_eq!(challenge(&step), Some(&b""[..]));
        let c = done(feed(step, encode(message).as_bytes()));
        assert_eq!(
            (c.mechanism, c.user.as_str()),
            (Mechanism::XOAuth2, "alice@x")
        );
        assert_eq!(c.password.expose(), message);

        let message = b"n,a=bob,\x01auth=Bearer t\x01\x01";
        let c = done(Exchange::start(
            Mechanism::OAuthBearer,
            Some(encode(message).as_bytes()),
        ));
        assert_eq!(
            (c.mechanism, c.user.as_str()),
            (Mechanism::OAuthBearer, "bob")
        );

        // Each mechanism reads its own format only.
        let step = Exchange::start(Mechanism::OAuthBearer, None);
        let xoauth2 = encode(b"user=alice@x\x01auth=Bearer tok\x01\x01");
        assert_eq!(failed(feed(step, xoauth2.as_bytes())), SaslError::Malformed);
    }

    #[test]
    fn exchange_cancel_and_bad_base64() {
        for mechanism in [
            Mechanism::Plain,
            Mechanism::Login,
            Mechanism::XOAuth2,
            Mechanism::OAuthBearer,
        ] {
            assert_eq!(
                failed(Exchange::start(mechanism, Some(b"*"))),
                SaslError::Cancelled
            );
            assert_eq!(
                failed(Exchange::start(mechanism, Some(b"!!"))),
                SaslError::BadBase64
            );
            let step = Exchange::start(mechanism, None);
            assert_eq!(failed(feed(step, b"*")), SaslError::Cancelled);
            let step = Exchange::start(mechanism, None);
            assert_eq!(failed(feed(step, b"a b")), SaslError::BadBase64);
        }
        // LOGIN can be cancelled at its second step too.
        let step = feed(Exchange::start(Mechanism::Login, None), b"YWxpY2U=");
        assert_eq!(failed(feed(step, b"*")), SaslError::Cancelled);
    }

    #[test]
    fn exchange_unsupported_and_decoded() {
        // Checked before the initial response is even looked at.
        for mechanism in [Mechanism::Cleartext, Mechanism::Apop] {
            assert_eq!(
                failed(Exchange::start(mechanism, Some(b"!!"))),
                SaslError::Unsupported
            );
            assert_eq!(
                failed(Exchange::start_decoded(mechanism, None)),
                SaslError::Unsupported
            );
        }
        // An already-decoded initial response is taken as is: `*` is data there.
        let step = Exchange::start_decoded(Mechanism::Login, Some(b"*".to_vec()));
        assert_eq!(challenge(&step), Some(&b"Password:"[..]));
        let c = done(Exchange::start_decoded(
            Mechanism::Plain,
            Some(b"\0alice\0secret".to_vec()),
        ));
        assert_eq!(c.user, "alice");
        match Exchange::start_decoded(Mechanism::XOAuth2, None) {
            Step::Challenge(exchange) => {
                assert_eq!(exchange.mechanism(), Mechanism::XOAuth2);
                assert_eq!(exchange.challenge(), b"");
            }
            other => panic!("{other:?}"),
        }
    }
}
