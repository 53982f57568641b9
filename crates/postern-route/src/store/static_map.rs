//! Pins written in the configuration file: for small sites and for tests. Read-only.

use std::collections::HashMap;

use super::{BackendRef, PinOrigin, RouteRecord, RouteStore, StoreFuture};
use crate::{InvalidUser, Normalizer, UserName};

/// A fixed user → backend table.
#[derive(Debug, Default)]
pub struct StaticStore {
    routes: HashMap<UserName, String>,
    /// See [`RouteStore::source`]: the table itself.
    source: u64,
}

impl StaticStore {
    /// Builds the table, normalizing every key with the router's rules so that the
    /// table and the lookups agree.
    pub fn new<'a>(
        normalizer: &Normalizer,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, (String, InvalidUser)> {
        let mut routes = HashMap::new();
        for (user, backend) in entries {
            let key = normalizer
                .normalize(user)
                .map_err(|e| (user.to_owned(), e))?;
            routes.insert(key, backend.to_owned());
        }
        let mut sorted: Vec<(&str, &str)> = routes
            .iter()
            .map(|(u, b)| (u.as_str(), b.as_str()))
            .collect();
        sorted.sort_unstable();
        let source = super::sql::fingerprint(&sorted);
        Ok(Self { routes, source })
    }
}

impl RouteStore for StaticStore {
    fn lookup<'a>(&'a self, user: &'a UserName) -> StoreFuture<'a, Option<RouteRecord>> {
        let record = self.routes.get(user).map(|backend| RouteRecord {
            backend: Some(BackendRef::Name(backend.clone())),
            origin: PinOrigin::Static,
            ..RouteRecord::default()
        });
        Box::pin(async move { Ok(record) })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn source(&self) -> u64 {
        self.source
    }

    fn kind(&self) -> &'static str {
        "static"
    }
}
