//! Sans-IO pieces shared by every Postern protocol machine.
//!
//! Nothing in this crate (or in the protocol crates built on it) touches a socket, a clock
//! or an async runtime: machines are fed bytes and return bytes and events. The tokio
//! driver in `postern-server` is the only place where I/O happens, which keeps every
//! protocol rule unit-testable and fuzzable.
//!
//! The shape of a protocol, as seen by the driver:
//!
//! ```text
//!   client bytes ──▶ FrontEnd ──Event::Authenticate──▶ router ─▶ backend TCP
//!                       ▲                                           │
//!                       └──── Verdict ◀── BackendLogin ◀── backend bytes
//!   then: FrontEnd::into_handoff() + BackendLogin::into_handoff() ─▶ raw relay
//! ```
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod greeting;
pub mod lines;
pub mod machine;
pub mod output;
pub mod protocol;
pub mod proxy;
pub mod sasl;
pub mod secret;
pub mod transcript;

pub use greeting::GreetingCheck;
pub use machine::{
    BackendLogin, BackendMachine, BackendStep, ClientInfo, CloseReason, Event, Failure, FrontEnd,
    Limit, LoginEvent, Reply, Shutdown, Verdict,
};
pub use output::Output;
pub use protocol::Protocol;
pub use sasl::{Credentials, Mechanism};
pub use secret::Secret;
