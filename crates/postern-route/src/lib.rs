//! Routing for Postern: which backend serves a user.
//!
//! ```text
//!  login name ─▶ Normalizer ─▶ UserName ─▶ RouteStore::lookup ─▶ pin ─▶ Decision
//!                                              │ no pin
//!                                              ▼
//!                                  UnknownUsers::Reject | Hash (rendezvous)
//! ```
//! A store failure is always reported as such: the router never falls back to a guessed
//! backend for a user who may have a pin elsewhere.

pub mod hash;
pub mod normalize;
pub mod router;
pub mod store;

pub use normalize::{InvalidUser, Normalizer, UserName};
pub use router::{BackendEntry, Decision, RouteError, Router, Source, UnknownUsers};
pub use store::{Route, RouteStore, StoreError};
