//! Sans-IO SMTP for Postern: the submission front end ([`Front`]) and its backend login
//! ([`Login`]), the transaction-aware relay for MX and LMTP ([`Relay`]), and the EHLO
//! probe and rules that decide what Postern advertises ([`Probe`],
//! [`advertised_extensions`]). No sockets, no clock, no async runtime: the driver in
//! `postern-server` feeds bytes in and sends what comes out.
//!
//! | service | RFC | machine | after the login / first RCPT |
//! |---|---|---|---|
//! | submission (587, 465) | 6409, 4954, 3207 | [`Front`] + [`Login`] | blind relay (the user is known) |
//! | MX (25) | 5321 | [`Relay`] ([`RelayMode::Mx`]) | stays in the middle: routes every RCPT |
//! | LMTP | 2033 | [`Relay`] ([`RelayMode::Lmtp`]) | same, per-recipient replies |
//!
//! Client commands are parsed with smtp-proto (`command.rs`); backend replies are framed
//! by hand (`reply.rs`), because a proxy must relay them byte for byte and needs the raw
//! EHLO lines (smtp-proto's EHLO parser drops XCLIENT). XCLIENT and xtext are in
//! `xclient.rs`, the shared backend handshake in `handshake.rs`.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

mod body;
mod command;
pub mod ehlo;
pub mod front;
mod handshake;
pub mod login;
pub mod probe;
pub mod relay;
mod reply;
pub mod xclient;

pub use ehlo::{Extensions, advertised_extensions};
pub use front::{Front, Options};
pub use login::{AuthMethod, Login, LoginMethod, LoginOptions, SessionInfo};
pub use probe::Probe;
pub use relay::{BackendId, Relay, RelayEvent, RelayMode, RelayOptions, Route};

pub use postern_proto::Shutdown;

/// The 421 goodbye for a [`Shutdown`].
fn shutdown_reply(why: Shutdown, hostname: &str) -> String {
    match why {
        Shutdown::ServerShutdown => format!("421 4.3.2 {hostname} Service shutting down"),
        Shutdown::Kicked => format!("421 4.3.2 {hostname} Session ended, please reconnect"),
        _ => format!("421 4.4.2 {hostname} Error: timeout exceeded"),
    }
}

/// What Postern sends a relayed submission client before it closes the session itself
/// (kick, shutdown, idle timeout): SMTP lets a server send `421` at any time.
pub fn relayed_goodbye(why: Shutdown, hostname: &str) -> Vec<u8> {
    let mut line = shutdown_reply(why, hostname).into_bytes();
    line.extend_from_slice(b"\r\n");
    line
}

/// The reply refusing a connection or an AUTH for an abuse-control limit (RFC 3463
/// 4.7.0: a temporary security refusal; the client retries later). The driver closes the
/// connection after it.
pub fn connection_refused(
    hostname: &str,
    limit: postern_proto::Limit,
    retry_after: Option<std::time::Duration>,
) -> String {
    let text = limit.refusal_text(retry_after);
    let text = text.strip_suffix('.').unwrap_or(&text);
    format!("421 4.7.0 {hostname} Error: {text}")
}
