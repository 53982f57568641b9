//! One mailbox, one name: `Alice@Example.COM`, ` alice@example.com` and `alice` (with a
//! default domain) must be looked up and pinned under the same key, or the same user ends
//! up on two backends, the very corruption pinning exists to prevent.

use std::fmt;

/// A user name after normalization: the only form used as a routing key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserName(String);

impl UserName {
    /// Wraps a name that was normalized before (read back from the store). Callers MUST
    /// NOT pass a name as typed by a client: use [`Normalizer::normalize`].
    pub fn from_normalized(name: &str) -> Self {
        Self(name.to_owned())
    }

    /// The normalized name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a name cannot be a routing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUser {
    /// Nothing left after trimming.
    #[error("empty user name")]
    Empty,
    /// Control characters, or longer than the routes table allows.
    #[error("user name has control characters or is too long")]
    Malformed,
}

/// Longest normalized name; the routes tables declare `VARCHAR(255)`.
pub const MAX_USER_LEN: usize = 255;

/// The normalization rules, applied before every lookup and every write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Normalizer {
    /// Lower-case the whole name (Unicode lower case).
    pub lowercase: bool,
    /// Strip leading and trailing white space.
    pub trim: bool,
    /// Appended as `@domain` to names without an `@`.
    pub default_domain: Option<String>,
}

impl Default for Normalizer {
    fn default() -> Self {
        Self {
            lowercase: true,
            trim: true,
            default_domain: None,
        }
    }
}

impl Normalizer {
    /// Turns a name as typed by a client (or an operator) into its routing key.
    pub fn normalize(&self, raw: &str) -> Result<UserName, InvalidUser> {
        let s = if self.trim { raw.trim() } else { raw };
        if s.is_empty() {
            return Err(InvalidUser::Empty);
        }
        let mut name = if self.lowercase {
            s.to_lowercase()
        } else {
            s.to_owned()
        };
        if let Some(domain) = &self.default_domain
            && !name.contains('@')
        {
            name.push('@');
            if self.lowercase {
                name.push_str(&domain.to_lowercase());
            } else {
                name.push_str(domain);
            }
        }
        if name.len() > MAX_USER_LEN || name.chars().any(char::is_control) {
            return Err(InvalidUser::Malformed);
        }
        Ok(UserName(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_mailbox_agree() {
        let n = Normalizer {
            default_domain: Some("Example.com".into()),
            ..Normalizer::default()
        };
        let want = n.normalize("alice@example.com").unwrap();
        for raw in [
            "Alice@Example.COM",
            " alice@example.com",
            "alice",
            "ALICE\t",
        ] {
            assert_eq!(n.normalize(raw).unwrap(), want, "{raw:?}");
        }
        assert_eq!(want.as_str(), "alice@example.com");
    }

    #[test]
    fn rules_can_be_switched_off() {
        let n = Normalizer {
            lowercase: false,
            trim: false,
            default_domain: None,
        };
        assert_eq!(n.normalize(" Bob").unwrap().as_str(), " Bob");
    }

    #[test]
    fn bad_names() {
        let n = Normalizer::default();
        assert_eq!(n.normalize("   "), Err(InvalidUser::Empty));
        assert_eq!(n.normalize("a\u{0}b"), Err(InvalidUser::Malformed));
        assert_eq!(n.normalize(&"x".repeat(256)), Err(InvalidUser::Malformed));
    }
}
