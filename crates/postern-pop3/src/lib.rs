//! Sans-IO POP3 for Postern: the client-facing pre-authentication machine ([`Front`])
//! and the backend login machine ([`Login`]). No sockets, no clock, no randomness, no
//! async runtime: the driver in `postern-server` feeds bytes in, sends what comes out,
//! and supplies what needs the outside world (the APOP timestamp).
//!
//! POP3 before login is a line protocol: every command and every SASL response is one
//! line, cut by [`postern_proto::lines::LineBuf`] under a hard limit, then split into a
//! verb and its argument by hand (the grammar is a dozen keywords; a parser library
//! would add nothing).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod front;
pub mod login;

pub use front::{Front, Options, apop_timestamp, is_apop_timestamp};

/// How a health check that logged in (or only read the greeting) leaves a POP3
/// backend, so the backend logs a clean goodbye rather than a dropped connection.
pub const CHECK_GOODBYE: &[u8] = b"QUIT\r\n";

/// The health check that does not log in: the greeting must be `+OK`.
pub fn greeting_check() -> postern_proto::GreetingCheck {
    postern_proto::GreetingCheck::new(b"+OK", CHECK_GOODBYE)
}

/// What Postern sends a relayed POP3 client before it closes the session itself. POP3
/// has no unsolicited replies, but Dovecot sends this one and clients show it.
pub fn relayed_goodbye(why: postern_proto::Shutdown) -> Vec<u8> {
    let code = match why {
        postern_proto::Shutdown::IdleTimeout => "",
        _ => "[SYS/TEMP] ",
    };
    format!("-ERR {code}{}\r\n", why.text()).into_bytes()
}
pub use login::{Login, LoginMethod, LoginOptions};
