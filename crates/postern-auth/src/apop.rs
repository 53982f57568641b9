//! APOP (RFC 1939 §7): the client proves it knows the password by sending
//! `MD5(timestamp + password)`. Postern can only check that against a password it can
//! read in plaintext from the route store, and then logs in to the backend with it.

use md5::{Digest, Md5};
use postern_proto::{Credentials, Secret};
use subtle::ConstantTimeEq;

/// Checks an APOP digest against the stored password and returns the plaintext
/// password to replay, or why not (for the log; never the password itself).
pub fn open(
    creds: &Credentials,
    stored: Option<&Secret<String>>,
) -> Result<Secret<Vec<u8>>, &'static str> {
    let challenge = creds
        .challenge
        .as_deref()
        .ok_or("APOP without a timestamp")?;
    let stored = stored.ok_or("APOP: the route store has no password for the user")?;
    let plain = plaintext(stored.expose()).ok_or("APOP: the stored password is not plaintext")?;
    let mut md5 = Md5::new();
    md5.update(challenge.as_bytes());
    md5.update(plain.as_bytes());
    let expected = hex::encode(md5.finalize());
    // Without an early exit, so the time taken does not reveal how many leading digits
    // were right. RFC 1939: lower-case hex.
    if constant_time_eq(expected.as_bytes(), creds.password.expose()) {
        Ok(Secret::new(plain.as_bytes().to_vec()))
    } else {
        Err("APOP digest mismatch")
    }
}

/// The plaintext of a stored password: bare, or Dovecot's `{PLAIN}` / `{CLEAR}` scheme.
fn plaintext(stored: &str) -> Option<&str> {
    let Some(rest) = stored.strip_prefix('{') else {
        return Some(stored);
    };
    let (scheme, value) = rest.split_once('}')?;
    (scheme.eq_ignore_ascii_case("PLAIN") || scheme.eq_ignore_ascii_case("CLEAR")).then_some(value)
}

/// Compares two secrets (tokens, digests) in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_proto::Mechanism;

    fn creds(digest: &str) -> Credentials {
        Credentials {
            mechanism: Mechanism::Apop,
            authzid: None,
            user: "mrose".into(),
            password: Secret::new(digest.as_bytes().to_vec()),
            challenge: Some("<1896.697170952@dbc.mtview.ca.us>".into()),
        }
    }

    #[test]
    fn rfc_1939_example() {
        // RFC 1939 §7: shared secret "tanstaaf".
        let good = creds("c4c9334bac560ecc979e58001b3e22fb");
        let stored = Secret::new("{PLAIN}tanstaaf".to_owned());
        assert_eq!(open(&good, Some(&stored)).unwrap().expose(), b"tanstaaf");
        let bare = Secret::new("tanstaaf".to_owned());
        assert!(open(&good, Some(&bare)).is_ok());
        let bad = creds("c4c9334bac560ecc979e58001b3e22fc");
        assert_eq!(open(&bad, Some(&stored)), Err("APOP digest mismatch"));
        let hashed = Secret::new("{SHA512-CRYPT}$6$x".to_owned());
        assert!(open(&good, Some(&hashed)).is_err());
        assert!(open(&good, None).is_err());
        assert!(open(&creds("c4c9"), Some(&stored)).is_err());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"tokem"));
        assert!(!constant_time_eq(b"token", b"token2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
