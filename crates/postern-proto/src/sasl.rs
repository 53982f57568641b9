//! SASL decoding for the mechanisms a proxy must understand to learn the user name
//! (RFC 4616 PLAIN, the LOGIN draft), and the base64 rules the mail protocols share
//! (RFC 4959 / 5034 / 4954: `=` is an empty initial response, `*` cancels).
//!
//! A proxy only decodes and replays: it never runs a challenge-response mechanism itself,
//! so only mechanisms that carry the password (or a bearer token) can be proxied.

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
    Credentials {
        mechanism,
        authzid: None,
        user,
        password: Secret::new(message.to_vec()),
        challenge: None,
    }
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

/// The two prompts of the LOGIN mechanism, base64 of `Username:` and `Password:`.
pub const LOGIN_USER_PROMPT: &str = "VXNlcm5hbWU6";
/// See [`LOGIN_USER_PROMPT`].
pub const LOGIN_PASS_PROMPT: &str = "UGFzc3dvcmQ6";

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
        assert_eq!(encode(b"Username:"), LOGIN_USER_PROMPT);
        assert_eq!(encode(b"Password:"), LOGIN_PASS_PROMPT);
    }
}
