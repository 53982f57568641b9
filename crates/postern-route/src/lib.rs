//! Routing for Postern: which backend serves a user, and how that changes safely.
//!
//! ```text
//!  login name ─▶ Normalizer ─▶ UserName ─▶ RouteCache ─▶ RouteStore::lookup ─▶ Decision
//!                                            │ stale-if-error        │ no pin
//!                                            ▼                       ▼
//!                                  the cached pin      UnknownUsers: Reject | Hash | Assign
//! ```
//! A store failure with nothing cached is reported as such: the router never falls back
//! to a guessed backend for a user who may have a pin elsewhere. Moves and kicks go
//! through the store's change log ([`moves`]), which every instance polls.

pub mod cache;
pub mod fence;
pub mod hash;
pub mod moves;
pub mod normalize;
pub mod router;
pub mod stats;
pub mod store;

pub use cache::CacheOptions;
pub use normalize::{InvalidUser, Normalizer, UserName};
pub use router::{
    AssignPolicy, Availability, BackendEntry, BackendState, Decision, Failover, PoolMode,
    PoolPolicy, RouteError, Router, RouterOptions, Source, UnknownUsers,
};
pub use store::{PinOrigin, RouteRecord, RouteStore, StoreError};
