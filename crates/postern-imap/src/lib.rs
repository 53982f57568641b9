//! Sans-IO IMAP for Postern: the client-facing pre-authentication machine ([`Front`])
//! and the backend login machine ([`Login`]). No sockets, no clock, no async runtime:
//! the driver in `postern-server` feeds bytes in and sends what comes out.
//!
//! Framing (lines, literals, limits) is done here in [`framing`]; the grammar of each
//! complete command is imap-codec's.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod framing;
pub mod front;
pub mod id;
pub mod login;

pub use front::{Front, Options};
pub use login::{Login, LoginMethod, LoginOptions};
