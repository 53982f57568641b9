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

/// How a health check that logged in (or only read the greeting) leaves a IMAP
/// backend, so the backend logs a clean goodbye rather than a dropped connection.
pub const CHECK_GOODBYE: &[u8] = b"Z LOGOUT\r\n";

/// The health check that does not log in: the greeting must be `* OK`.
pub fn greeting_check() -> postern_proto::GreetingCheck {
    postern_proto::GreetingCheck::new(b"* OK", CHECK_GOODBYE)
}

/// What Postern sends a relayed IMAP client before it closes the session itself (kick,
/// shutdown, idle timeout): an untagged `BYE`, which RFC 9051 allows at any time, with
/// `[UNAVAILABLE]` (RFC 5530) where reconnecting helps.
pub fn relayed_goodbye(why: postern_proto::Shutdown) -> Vec<u8> {
    let code = match why {
        postern_proto::Shutdown::IdleTimeout => "",
        _ => "[UNAVAILABLE] ",
    };
    format!("* BYE {code}{}\r\n", why.text()).into_bytes()
}
pub use login::{Login, LoginMethod, LoginOptions};
