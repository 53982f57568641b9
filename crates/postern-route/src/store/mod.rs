//! Where pins live. A store answers one question, "which backend is this user pinned
//! to?", and says clearly when it cannot answer (so the router never guesses).

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::UserName;

pub mod sqlite;
pub mod static_map;

/// A boxed future, so stores can sit behind `dyn RouteStore`.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A user's pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The backend's name, as declared in the configuration.
    pub backend: String,
}

/// A store failure. Every variant means "no answer": the caller must not guess a route.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached or failed; retrying later may help.
    #[error("route store unavailable: {0}")]
    Unavailable(String),
    /// The store does not support the operation (e.g. writing to a static map).
    #[error("route store is read-only")]
    ReadOnly,
}

/// A source of pins.
pub trait RouteStore: Send + Sync + fmt::Debug {
    /// Looks up the pin of a normalized user; `Ok(None)` when there is none.
    fn lookup<'a>(&'a self, user: &'a UserName) -> StoreFuture<'a, Option<Route>>;
    /// Pins a user to a backend, replacing any previous pin.
    fn pin<'a>(&'a self, user: &'a UserName, backend: &'a str) -> StoreFuture<'a, ()>;
    /// Checks that the store answers, for `postern check` and readiness.
    fn ping(&self) -> StoreFuture<'_, ()>;
    /// A short name for logs: `static`, `sqlite`.
    fn kind(&self) -> &'static str;
}
