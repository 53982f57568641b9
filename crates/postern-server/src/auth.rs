//! Proxy-side password checks: the client's password against the hash the route
//! store's lookup query returned, off the async workers.
//!
//! Hash checks are CPU-bound (Argon2 takes ~0.2 s and 64 MiB), so each runs on tokio's
//! blocking pool, and a semaphore bounds how many run at once: a burst of logins queues
//! instead of taking every core and gigabytes of memory. An unknown user, or one without
//! a stored hash, is checked against a stand-in hash of the same scheme and cost, so
//! the answer takes as long as a wrong password's and does not tell who exists.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_auth::password::{self, Dummy, Scheme, SchemeError};
use postern_proto::Secret;
use tokio::sync::Semaphore;

/// The outcome of a password check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    Good,
    /// Wrong password, unknown user, or no stored hash.
    Wrong,
    /// The stored value cannot be checked (unsupported or malformed scheme, or too
    /// expensive to be real): an operator problem, logged without the value.
    Unusable(&'static str),
}

/// How often at most the stand-in hash follows a newly seen scheme: stores with mixed
/// schemes must not pay an extra check on every login.
const DUMMY_FOLLOW_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct DummyState {
    dummy: Arc<Dummy>,
    changed: Option<Instant>,
}

/// Runs password checks on the blocking pool, a bounded number at a time.
#[derive(Debug)]
pub(crate) struct Verifier {
    permits: Semaphore,
    dummy: Arc<Mutex<DummyState>>,
}

impl Verifier {
    /// `dummy_scheme` is the scheme unknown users are checked against until a real
    /// hash has been seen.
    pub(crate) fn new(max_parallel: usize, dummy_scheme: &str) -> Result<Self, SchemeError> {
        let scheme = Scheme::from_name(dummy_scheme)?;
        Ok(Self {
            permits: Semaphore::new(max_parallel.max(1)),
            dummy: Arc::new(Mutex::new(DummyState {
                dummy: Arc::new(Dummy::for_scheme(scheme)),
                changed: None,
            })),
        })
    }

    /// Checks `password` against `stored` (`None`: the user is unknown or has no hash).
    pub(crate) async fn check(
        &self,
        stored: Option<Secret<String>>,
        password: Secret<Vec<u8>>,
    ) -> Check {
        // The semaphore is never closed, so acquiring only fails if it were.
        let Ok(_permit) = self.permits.acquire().await else {
            return Check::Unusable("verifier closed");
        };
        let dummy_state = Arc::clone(&self.dummy);
        let work = move || {
            let Some(stored) = stored else {
                let dummy = lock(&dummy_state).dummy.clone();
                dummy.verify(password.expose());
                return Check::Wrong;
            };
            let outcome = password::verify(stored.expose(), password.expose());
            if outcome.is_ok() {
                follow_scheme(&dummy_state, stored.expose());
            }
            match outcome {
                Ok(true) => Check::Good,
                Ok(false) => Check::Wrong,
                Err(e) => Check::Unusable(e.as_str()),
            }
        };
        tokio::task::spawn_blocking(work)
            .await
            .unwrap_or(Check::Unusable("password check panicked"))
    }
}

/// Makes the stand-in imitate the stored hashes actually in use.
fn follow_scheme(state: &Mutex<DummyState>, stored: &str) {
    let Ok(scheme) = password::scheme(stored) else {
        return;
    };
    {
        let s = lock(state);
        let recent = s
            .changed
            .is_some_and(|t| t.elapsed() < DUMMY_FOLLOW_INTERVAL);
        if s.dummy.scheme() == scheme || recent {
            return;
        }
    }
    // Dummy::like costs one check; done outside the lock.
    if let Ok(dummy) = Dummy::like(stored) {
        let mut s = lock(state);
        s.dummy = Arc::new(dummy);
        s.changed = Some(Instant::now());
    }
}

fn lock(m: &Mutex<DummyState>) -> std::sync::MutexGuard<'_, DummyState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret<Vec<u8>> {
        Secret::new(s.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn checks_and_follows_the_store_scheme() {
        let v = Verifier::new(2, "SHA512-CRYPT").unwrap();
        // doveadm pw -s SHA256-CRYPT -p secret
        let stored = Secret::new(
            "{SHA256-CRYPT}$5$2ZOGoL3iAG/vFnj.$BSjMXM6CWpGe/dAj2MkC20/19nZt0JWWdoGlOYv/JP0"
                .to_string(),
        );
        let good = v.check(Some(stored.clone()), secret("secret")).await;
        let wrong = v.check(Some(stored), secret("Secret")).await;
        assert_eq!((good, wrong), (Check::Good, Check::Wrong));
        assert_eq!(v.check(None, secret("secret")).await, Check::Wrong);
        assert_eq!(lock(&v.dummy).dummy.scheme(), Scheme::Sha256Crypt);
        let bad = Secret::new("{NOSUCH}x".to_string());
        assert!(matches!(
            v.check(Some(bad), secret("x")).await,
            Check::Unusable(_)
        ));
    }

    #[test]
    fn unknown_dummy_scheme_is_refused() {
        assert!(Verifier::new(1, "ROT13").is_err());
    }
}
