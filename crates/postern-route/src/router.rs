//! From a login name to a backend: normalize, look up the pin, apply the policy for
//! users without one. The router never invents a route when the store cannot answer.

use std::sync::Arc;

use postern_proto::{Failure, Protocol};

use crate::hash::{self, Weighted};
use crate::store::{RouteStore, StoreError};
use crate::{InvalidUser, Normalizer, UserName};

/// What to do with a user the store has no pin for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownUsers {
    /// Refuse the login as an authentication failure.
    #[default]
    Reject,
    /// Pick a backend by weighted rendezvous hash of the normalized name. Stable
    /// across instances, but not written to the store.
    Hash,
}

/// A backend as the router sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    /// Name, as pins refer to it.
    pub name: String,
    /// Relative share of hashed users.
    pub weight: u32,
    /// The protocols this backend serves.
    pub protocols: Vec<Protocol>,
}

/// Why a route was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The store pins the user there.
    Pinned,
    /// No pin; chosen by hash.
    Hashed,
}

impl Source {
    /// Name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Pinned => "pinned",
            Source::Hashed => "hashed",
        }
    }
}

/// Where a user goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The normalized user name.
    pub user: UserName,
    /// The backend's name.
    pub backend: String,
    /// Why.
    pub source: Source,
}

/// Why a user could not be routed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The name cannot be a routing key.
    #[error("invalid user name: {0}")]
    InvalidUser(#[from] InvalidUser),
    /// No pin, and unknown users are rejected.
    #[error("no route for user")]
    NoRoute,
    /// The pin names a backend that is not configured for this protocol.
    #[error("user is pinned to backend {0:?}, which does not serve this protocol")]
    UnknownBackend(String),
    /// No backend can take a hashed user.
    #[error("no backend available for this protocol")]
    NoBackend,
    /// The store did not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RouteError {
    /// How the protocol should report this to the client.
    pub fn failure(&self) -> Failure {
        match self {
            RouteError::InvalidUser(_) | RouteError::NoRoute => Failure::AuthFailed,
            RouteError::UnknownBackend(_) | RouteError::NoBackend | RouteError::Store(_) => {
                Failure::Unavailable
            }
        }
    }
}

/// The routing policy of one Postern instance.
#[derive(Debug)]
pub struct Router {
    normalizer: Normalizer,
    store: Arc<dyn RouteStore>,
    unknown: UnknownUsers,
    backends: Vec<BackendEntry>,
}

impl Router {
    /// Builds a router.
    pub fn new(
        normalizer: Normalizer,
        store: Arc<dyn RouteStore>,
        unknown: UnknownUsers,
        backends: Vec<BackendEntry>,
    ) -> Self {
        Self {
            normalizer,
            store,
            unknown,
            backends,
        }
    }

    /// The normalization rules.
    pub fn normalizer(&self) -> &Normalizer {
        &self.normalizer
    }

    /// The store behind the router.
    pub fn store(&self) -> &Arc<dyn RouteStore> {
        &self.store
    }

    /// Decides where `raw_user` (as the client typed it) goes for `protocol`.
    pub async fn resolve(
        &self,
        raw_user: &str,
        protocol: Protocol,
    ) -> Result<Decision, RouteError> {
        let user = self.normalizer.normalize(raw_user)?;
        if let Some(route) = self.store.lookup(&user).await? {
            let serves = self
                .backends
                .iter()
                .any(|b| b.name == route.backend && b.protocols.contains(&protocol));
            if !serves {
                return Err(RouteError::UnknownBackend(route.backend));
            }
            return Ok(Decision {
                user,
                backend: route.backend,
                source: Source::Pinned,
            });
        }
        match self.unknown {
            UnknownUsers::Reject => Err(RouteError::NoRoute),
            UnknownUsers::Hash => {
                let candidates: Vec<Weighted<'_>> = self
                    .backends
                    .iter()
                    .filter(|b| b.protocols.contains(&protocol))
                    .map(|b| Weighted {
                        name: &b.name,
                        weight: b.weight,
                    })
                    .collect();
                let backend = hash::pick(user.as_str(), &candidates)
                    .ok_or(RouteError::NoBackend)?
                    .to_owned();
                Ok(Decision {
                    user,
                    backend,
                    source: Source::Hashed,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::static_map::StaticStore;

    fn backends() -> Vec<BackendEntry> {
        ["b1", "b2"]
            .map(|name| BackendEntry {
                name: name.into(),
                weight: 1,
                protocols: vec![Protocol::Imap],
            })
            .to_vec()
    }

    fn router(unknown: UnknownUsers) -> Router {
        let n = Normalizer {
            default_domain: Some("example.test".into()),
            ..Normalizer::default()
        };
        let store = StaticStore::new(
            &n,
            [("alice@example.test", "b1"), ("Bob", "b2"), ("eve", "gone")],
        )
        .unwrap();
        Router::new(n, Arc::new(store), unknown, backends())
    }

    #[tokio::test]
    async fn pinned_users_go_to_their_backend_whatever_the_spelling() {
        let r = router(UnknownUsers::Reject);
        for name in ["alice", "ALICE@example.test", " alice@EXAMPLE.test "] {
            let d = r.resolve(name, Protocol::Imap).await.unwrap();
            assert_eq!((d.backend.as_str(), d.source), ("b1", Source::Pinned));
            assert_eq!(d.user.as_str(), "alice@example.test");
        }
        let d = r.resolve("bob@example.test", Protocol::Imap).await.unwrap();
        assert_eq!(d.backend, "b2");
    }

    #[tokio::test]
    async fn unknown_users_follow_the_policy() {
        let r = router(UnknownUsers::Reject);
        let e = r.resolve("carol", Protocol::Imap).await.unwrap_err();
        assert!(matches!(e, RouteError::NoRoute));
        assert_eq!(e.failure(), Failure::AuthFailed);

        let r = router(UnknownUsers::Hash);
        let d1 = r.resolve("carol", Protocol::Imap).await.unwrap();
        let d2 = r
            .resolve("Carol@Example.test", Protocol::Imap)
            .await
            .unwrap();
        assert_eq!(d1, d2);
        assert_eq!(d1.source, Source::Hashed);
    }

    #[tokio::test]
    async fn a_pin_to_an_unknown_backend_is_a_temporary_failure() {
        let r = router(UnknownUsers::Hash);
        let e = r.resolve("eve", Protocol::Imap).await.unwrap_err();
        assert!(matches!(e, RouteError::UnknownBackend(_)));
        assert_eq!(e.failure(), Failure::Unavailable);
    }
}
