//! Sans-IO authentication for Postern.
//!
//! - [`password`]: checks a client's password against a hash stored in Dovecot's
//!   `{SCHEME}data` syntax, for proxy-side authentication.
//! - [`apop`]: RFC 1939 APOP digests checked against a stored plaintext password, and
//!   the constant-time comparison every secret check uses.
//! - [`auth_http`]: nginx's `auth_http` protocol, byte for byte: the request Postern
//!   sends to an operator's auth server and the parsing of its answer, plus
//!   [`auth_http::decide`], which turns that answer into what the session must do.
//!
//! Nothing here opens a socket, reads a clock or spawns a task. Hash checks are
//! CPU-bound (0.1 to 0.3 s for Argon2ID): the runtime runs them on a blocking pool.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod apop;
pub mod auth_http;
pub mod password;
