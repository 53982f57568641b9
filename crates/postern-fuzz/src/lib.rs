//! Postern's fuzz targets as plain functions: the cargo-fuzz binaries in `fuzz/` call
//! them under libFuzzer, and this crate's tests replay the committed corpora in
//! `fuzz/corpus/<target>/` on every `cargo test`, so an input that once broke a parser
//! keeps being checked without nightly Rust.
//!
//! Each target takes arbitrary bytes and panics only when an invariant breaks.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

/// One module per target, each with `run(data)`.
pub mod targets {
    pub mod auth_http;
    pub mod imap_front;
    pub mod imap_login;
    pub mod password;
    pub mod pop3_front;
    pub mod pop3_login;
    pub mod proxy_header;
    pub mod sasl;
    pub mod smtp_front;
    pub mod smtp_login;
    pub mod smtp_relay;

    /// A driver-side shutdown (pre-auth timeout, SIGTERM) at whatever point the input
    /// left the machine: at most one goodbye line, and nothing on a second call.
    pub(crate) fn check_shutdown<F: postern_proto::FrontEnd>(front: &mut F, why: u8) {
        let why = if why & 1 == 1 {
            postern_proto::Shutdown::ServerShutdown
        } else {
            postern_proto::Shutdown::IdleTimeout
        };
        let mut out = Vec::new();
        front.poll_transmit(&mut out);
        out.clear();
        front.shutdown(why);
        front.poll_transmit(&mut out);
        assert!(
            out.is_empty()
                || (out.ends_with(b"\r\n") && out.iter().filter(|&&b| b == b'\n').count() == 1),
            "goodbye: {out:?}"
        );
        out.clear();
        front.shutdown(why);
        front.poll_transmit(&mut out);
        assert!(out.is_empty(), "second goodbye: {out:?}");
    }
}

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target by name (the name of its `fuzz/fuzz_targets/*.rs` and corpus folder).
pub const TARGETS: &[(&str, Target)] = &[
    ("auth_http", targets::auth_http::run),
    ("imap_front", targets::imap_front::run),
    ("imap_login", targets::imap_login::run),
    ("password", targets::password::run),
    ("pop3_front", targets::pop3_front::run),
    ("pop3_login", targets::pop3_login::run),
    ("proxy_header", targets::proxy_header::run),
    ("sasl", targets::sasl::run),
    ("smtp_front", targets::smtp_front::run),
    ("smtp_login", targets::smtp_login::run),
    ("smtp_relay", targets::smtp_relay::run),
];
