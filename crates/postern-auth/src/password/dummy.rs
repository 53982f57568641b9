//! Equal cost for logins that have nothing to check.
//!
//! When the user does not exist (or has no password), answering at once tells an
//! attacker which names are real: a wrong password for a real user costs a hash
//! computation, a tenth of a second or more for Argon2. The runtime should instead
//! run [`Dummy::verify`] with the client's password, on the same blocking pool and
//! behind the same semaphore as real checks, and then refuse the login exactly as
//! for a wrong password.

use std::fmt;

use super::{Options, Scheme, SchemeError, verify_with};

/// Hashes in each scheme's Dovecot defaults (`doveadm pw`, Dovecot 2.3.19), made from
/// a random password that was then thrown away. Only their cost matters.
fn template(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Plain => "{PLAIN}dummy-dummy-dummy-dummy",
        // `doveadm pw -s CRYPT` writes bcrypt with cost 5.
        Scheme::Crypt | Scheme::BlfCrypt => {
            "{BLF-CRYPT}$2y$05$nQvxc/XDs4Ui5YS2g9zpZua91uRBd3MnuUs.tRnlGhjqrAJmWBhiC"
        }
        Scheme::Md5Crypt => "{MD5-CRYPT}$1$EN67zqpJ$B7hAdTgAU8g/e9NJbjKRk0",
        Scheme::Sha256Crypt => {
            "{SHA256-CRYPT}$5$6gNTJC4MFDo4iFVs$.OYR1oHwcpm0UZjwUIMxWTUTW9XGAWHuU9OFgdi98L4"
        }
        Scheme::Sha512Crypt => {
            "{SHA512-CRYPT}$6$CsKvP0XlBvzw7JF2$WvB3cOjk9OFACe00w2l/jQTjMDq2eYqSizBybXb5coSB08EE.LJdGnuo8OhvT63iSp6DWK9nEvGBHj4.jCaCQ1"
        }
        Scheme::Argon2i => {
            "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$/n+03u4EJ+VBF1xQ+ixwuw$cZC9K9Jvm4qWc+TYCIFKut2CJr5lPaQESPAlB1119J8"
        }
        Scheme::Argon2id => {
            "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$tN7xYwg8PRikEbLbxXCcRg$cQqL6V/5nsKy4J9/DE8GiBzaj4LUtHRFG2Aq7h3fSQU"
        }
        Scheme::Pbkdf2 => {
            "{PBKDF2}$1$jh.KzKqkDDx/GOSY$5000$21d017c20f7e3a994865a0f0e12f94145aa2fb2e"
        }
        Scheme::Ssha512 => {
            "{SSHA512}DlJjO54M0WK6bfzwSLj52OYbM5fcvdQOrl1g4VcBPXXdkUIQha5HYSsrk2QNsZ93gFBAXskUInhs8JsQOBTAyaA3UDs="
        }
        Scheme::Ssha256 => "{SSHA256}BI/g21xnOFJLA1dwJ1zzi3fxMOPlZj05jCsdcyRiScHs8KEt",
        Scheme::Ssha => "{SSHA}jXo9ULKHjX3Ek8JEE1r/OSBfoQNl/vKi",
        Scheme::Smd5 => "{SMD5}5J9eFwpKGu0nVnzYrYNzeTB+C1w=",
        Scheme::Sha512 => {
            "{SHA512}1VHWYeygYMj3rDwgAViAhSz5nRTuyJxysYXtL+v4zrUS9BvzDwOv4jYVq+Wr7fDiBOwvpjvZC0cz/wzAq3WBmw=="
        }
        Scheme::Sha256 => "{SHA256}fYjosDeFgpaDmT041CK8MhCGLXVKAjxNL6JaKcHIqRk=",
        Scheme::Sha1 => "{SHA}nC/iX8Uh5EuXsj/yusXj3LKcSng=",
        Scheme::PlainMd5 => "{PLAIN-MD5}d1e0528ec129e8e73004dcdbdc1adf11",
        Scheme::LdapMd5 => "{LDAP-MD5}0eBSjsEp6OcwBNzb3BrfEQ==",
    }
}

/// A stand-in hash that costs what a real check costs and never matches.
///
/// Build one at start-up (or configuration reload) and share it: [`Dummy::like`] with
/// a hash taken from the user store copies its exact cost parameters (`rounds=`,
/// bcrypt cost, Argon2 memory), which matters when the store does not use Dovecot's
/// defaults; [`Dummy::for_scheme`] uses those defaults.
///
/// `Debug` shows only the scheme: the stand-in may be a copy of a real user's hash.
#[derive(Clone)]
pub struct Dummy {
    stored: String,
    options: Options,
    scheme: Scheme,
}

impl Dummy {
    /// A dummy with Dovecot's default cost for `scheme`.
    pub fn for_scheme(scheme: Scheme) -> Dummy {
        Dummy {
            stored: template(scheme).to_owned(),
            options: Options::default(),
            scheme,
        }
    }

    /// A dummy with the scheme and cost of `stored`, a real value from the user store,
    /// read with the default [`Options`].
    ///
    /// Runs one full verification to prove the value can be checked, so it costs as
    /// much as a login: call it once, not per login.
    pub fn like(stored: &str) -> Result<Dummy, SchemeError> {
        Dummy::like_with(stored, &Options::default())
    }

    /// [`Dummy::like`] with the [`Options`] the real checks use (their default scheme
    /// decides what a bare value is).
    pub fn like_with(stored: &str, options: &Options) -> Result<Dummy, SchemeError> {
        verify_with(stored, b"", options)?;
        let scheme = super::parse(stored, options.default_scheme)?.scheme;
        if scheme == Scheme::Plain {
            // Nothing to imitate, and no reason to keep a real password in memory.
            return Ok(Dummy::for_scheme(Scheme::Plain));
        }
        Ok(Dummy {
            stored: stored.to_owned(),
            options: *options,
            scheme,
        })
    }

    /// The scheme whose cost this dummy reproduces.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Does the work of checking `password` against a hash of this scheme and returns
    /// `false`, always: even if `password` happens to match the stored stand-in (a
    /// [`Dummy::like`] copy of a real user's hash, say), no login can succeed through
    /// it.
    pub fn verify(&self, password: &[u8]) -> bool {
        let outcome = verify_with(&self.stored, password, &self.options);
        // The outcome is unused by design; black_box keeps the optimiser from
        // noticing and skipping the work.
        let _ = std::hint::black_box(outcome);
        false
    }
}

impl fmt::Debug for Dummy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dummy")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

/// One-shot [`Dummy::for_scheme`]: `scheme_hint` is a Dovecot scheme name such as
/// `SHA512-CRYPT` (braces and suffix allowed). Does the work of a real check with
/// Dovecot's default cost and returns `false`. An unknown name costs only a trivial
/// comparison, since there is nothing to imitate.
///
/// For stores with non-default cost parameters, build a [`Dummy::like`] once instead.
pub fn verify_dummy(scheme_hint: &str, password: &[u8]) -> bool {
    let scheme = Scheme::from_name(scheme_hint).unwrap_or(Scheme::Plain);
    Dummy::for_scheme(scheme).verify(password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_is_checkable() {
        for &s in Scheme::ALL {
            let stored = template(s);
            assert_eq!(
                verify_with(stored, b"guess", &Options::default()),
                Ok(false),
                "{s}"
            );
            assert!(!Dummy::for_scheme(s).verify(b"guess"));
        }
    }

    #[test]
    fn like_never_matches_even_the_right_password() {
        let real = "{SSHA}vtE5exw75TXnAWX+lqLn2dTKxI2dGwoj"; // password "x"
        assert_eq!(super::super::verify(real, b"x"), Ok(true));
        let d = Dummy::like(real).unwrap();
        assert_eq!(d.scheme(), Scheme::Ssha);
        assert!(!d.verify(b"x"));
        assert!(Dummy::like("{CRAM-MD5}abc").is_err());
        assert_eq!(format!("{d:?}"), "Dummy { scheme: Ssha, .. }");
        let plain = Dummy::like("{PLAIN}hunter2").unwrap();
        assert!(!format!("{plain:?}").contains("hunter2"));
        assert_eq!(plain.stored, template(Scheme::Plain));
    }
}
