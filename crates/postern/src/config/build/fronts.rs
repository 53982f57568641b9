//! The front ends' sections (`[imap]`, `[pop3]`, `[submission]`, `[smtp]`, `[lmtp]`)
//! turned into each listener's protocol options.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Result, anyhow, ensure};
use postern_server::{AuthMode, Backend, FrontOptions, TlsMode};

use crate::config::file::{self, File};

/// What a listener contributes to its protocol options.
pub(super) struct Front<'a> {
    /// `listeners[i]`, for messages.
    pub(super) key: &'a str,
    pub(super) listener: &'a file::Listener,
    pub(super) tls_mode: TlsMode,
    pub(super) auth: AuthMode,
}

/// `[imap]`, checked before anything else that depends on it.
pub(super) fn check_imap(imap: &file::Imap) -> Result<()> {
    ensure!(
        imap.max_line_length >= 1024,
        "imap.max_line_length: at least 1024 bytes (RFC 9051 clients send long lines)"
    );
    ensure!(
        imap.max_literal_size <= imap.max_line_length,
        "imap.max_literal_size: cannot exceed imap.max_line_length, which bounds the whole command"
    );
    ensure!(
        imap.max_auth_failures >= 1,
        "imap.max_auth_failures: at least 1"
    );
    // The greeting is sent as one `* OK` line.
    ensure!(
        !imap.greeting.contains(['\r', '\n']),
        "imap.greeting: must be one line"
    );
    Ok(())
}

/// The listener's protocol name, as in its default name and in messages.
pub(super) fn protocol_name(p: file::Protocol) -> &'static str {
    match p {
        file::Protocol::Imap => "imap",
        file::Protocol::Pop3 => "pop3",
        file::Protocol::Submission => "submission",
        file::Protocol::Smtp => "smtp",
        file::Protocol::Lmtp => "lmtp",
    }
}

/// The options of one listener's front end. A listener no backend could serve would
/// fail every login, so it is refused here, except with auth_http, where the auth
/// server names backends Postern need not know.
pub(super) fn front(
    file: &File,
    f: &Front<'_>,
    backends: &BTreeMap<String, Arc<Backend>>,
    hostname: &str,
) -> Result<FrontOptions> {
    let protocol = f.listener.protocol;
    let has_backend = backends.values().any(|b| match protocol {
        file::Protocol::Imap => b.imap.is_some(),
        file::Protocol::Pop3 => b.pop3.is_some(),
        file::Protocol::Submission => b.submission.is_some(),
        file::Protocol::Smtp => b.smtp.is_some(),
        file::Protocol::Lmtp => b.lmtp.is_some(),
    });
    // Relays route every recipient to a backend of their own, which auth_http does
    // not name (and their listeners are refused any mode but "backend" before this).
    let is_relay = matches!(protocol, file::Protocol::Smtp | file::Protocol::Lmtp);
    ensure!(
        has_backend || (!is_relay && f.auth == AuthMode::Http),
        "{}: no backend serves {}",
        f.key,
        protocol_name(protocol)
    );
    let starttls = f.tls_mode == TlsMode::StartTls;
    let insecure = f.listener.insecure_plaintext_auth;
    Ok(match protocol {
        file::Protocol::Imap => FrontOptions::Imap(Arc::new(imap(&file.imap, starttls, insecure))),
        file::Protocol::Pop3 => FrontOptions::Pop3(Arc::new(pop3(&file.pop3, starttls, insecure)?)),
        file::Protocol::Submission => {
            let options = submission(&file.submission, hostname, starttls, insecure);
            FrontOptions::Submission(Arc::new(options))
        }
        file::Protocol::Smtp | file::Protocol::Lmtp => {
            let lmtp = protocol == file::Protocol::Lmtp;
            ensure!(
                !(lmtp && f.tls_mode != TlsMode::None),
                "{}.tls: LMTP listeners are plaintext (keep them on a trusted network)",
                f.key
            );
            let section = if lmtp { &file.lmtp } else { &file.smtp };
            FrontOptions::Relay(Arc::new(relay(section, lmtp, hostname, starttls)))
        }
    })
}

/// Command counts of 0 would refuse the first command: they count as 1.
fn imap(i: &file::Imap, starttls: bool, insecure: bool) -> postern_imap::Options {
    postern_imap::Options {
        greeting: i.greeting.clone(),
        starttls,
        insecure_plaintext_auth: insecure,
        max_line: i.max_line_length,
        max_literal: i.max_literal_size,
        max_bad_commands: i.max_bad_commands,
        max_auth_failures: i.max_auth_failures,
        max_commands: i.max_commands.max(1),
        oauth: i.oauth,
    }
}

/// The POP3 crate checks its own options (line length against RFC 1939's minimum).
fn pop3(p: &file::Pop3, starttls: bool, insecure: bool) -> Result<postern_pop3::Options> {
    let options = postern_pop3::Options {
        greeting: p.greeting.clone(),
        starttls,
        insecure_plaintext_auth: insecure,
        apop: p.apop,
        max_line: p.max_line_length,
        max_bad_commands: p.max_bad_commands,
        max_auth_failures: p.max_auth_failures,
        max_commands: p.max_commands.max(1),
        oauth: p.oauth,
    };
    options.validate().map_err(|e| anyhow!("pop3: {e}"))?;
    Ok(options)
}

fn submission(
    s: &file::Submission,
    hostname: &str,
    starttls: bool,
    insecure: bool,
) -> postern_smtp::Options {
    postern_smtp::Options {
        hostname: hostname.to_owned(),
        greeting: s.greeting.clone(),
        starttls,
        insecure_plaintext_auth: insecure,
        max_line: s.max_line_length,
        max_auth_line: s.max_auth_line_length,
        max_bad_commands: s.max_bad_commands,
        max_auth_failures: s.max_auth_failures.max(1),
        max_commands: s.max_commands.max(1),
        oauth: s.oauth,
        ..postern_smtp::Options::default()
    }
}

/// MX and LMTP share a machine; the keys not in the file keep each one's defaults.
fn relay(
    r: &file::Relay,
    lmtp: bool,
    hostname: &str,
    starttls: bool,
) -> postern_smtp::RelayOptions {
    let base = if lmtp {
        postern_smtp::RelayOptions::lmtp()
    } else {
        postern_smtp::RelayOptions::mx()
    };
    postern_smtp::RelayOptions {
        hostname: hostname.to_owned(),
        greeting: r.greeting.clone(),
        starttls,
        xclient: r.xclient,
        max_line: r.max_line_length,
        max_recipients: r.max_recipients.max(1),
        max_bad_commands: r.max_bad_commands,
        ..base
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.expect_err("an error"))
    }

    #[test]
    fn imap_section_checks() {
        check_imap(&file::Imap::default()).unwrap();
        for (text, message) in [
            (
                "max_line_length = 1023",
                "imap.max_line_length: at least 1024 bytes (RFC 9051 clients send long lines)",
            ),
            (
                "max_line_length = 2048\nmax_literal_size = 4096",
                "imap.max_literal_size: cannot exceed imap.max_line_length, which bounds the whole command",
            ),
            (
                "max_auth_failures = 0",
                "imap.max_auth_failures: at least 1",
            ),
            (
                "greeting = \"two\\r\\nlines\"",
                "imap.greeting: must be one line",
            ),
        ] {
            let imap: file::Imap = toml::from_str(text).unwrap();
            assert_eq!(err(check_imap(&imap)), message, "{text}");
        }
    }

    /// A file whose only backend serves `service`, with one listener as given.
    fn setup(top: &str, service: &str, listener: &str) -> File {
        toml::from_str(&format!(
            "{top}\n[routing]\n[backends.b]\nhost = \"h\"\n[backends.b.{service}]\nport = 1\n[[listeners]]\nbind = \"127.0.0.1:1\"\n{listener}"
        ))
        .unwrap()
    }

    fn front_of(file: &File, tls_mode: TlsMode, auth: AuthMode) -> Result<FrontOptions> {
        let backends = super::super::backends::backends(file, std::path::Path::new("/")).unwrap();
        let f = Front {
            key: "listeners[0]",
            listener: &file.listeners[0],
            tls_mode,
            auth,
        };
        front(file, &f, &backends, "mx.example.test")
    }

    #[test]
    fn defaults_and_counts_of_zero() {
        let file = setup(
            "[imap]\nmax_commands = 0\n[submission]\nmax_auth_failures = 0\nmax_commands = 0",
            "imap",
            "protocol = \"imap\"\ntls = \"starttls\"\ninsecure_plaintext_auth = true",
        );
        let FrontOptions::Imap(o) = front_of(&file, TlsMode::StartTls, AuthMode::Backend).unwrap()
        else {
            panic!()
        };
        let d = postern_imap::Options::default();
        assert!(o.starttls && o.insecure_plaintext_auth);
        assert_eq!((o.max_line, o.max_literal), (d.max_line, d.max_literal));
        assert_eq!(o.max_commands, 1);
        let s = submission(&file.submission, "mx.example.test", false, false);
        assert_eq!((s.max_auth_failures, s.max_commands), (1, 1));
        assert_eq!(s.hostname, "mx.example.test");
    }

    #[test]
    fn relays_keep_their_own_defaults() {
        let file = setup(
            "[smtp]\nmax_recipients = 0",
            "lmtp",
            "protocol = \"lmtp\"\ntls = \"none\"",
        );
        let FrontOptions::Relay(o) = front_of(&file, TlsMode::None, AuthMode::Backend).unwrap()
        else {
            panic!()
        };
        assert_eq!(o.greeting, postern_smtp::RelayOptions::lmtp().greeting);
        assert_eq!(o.hostname, "mx.example.test");
        let mx = relay(&file.smtp, false, "h", true);
        assert_eq!(mx.max_recipients, 1);
        assert!(mx.starttls);
        assert_eq!(
            err(front_of(&file, TlsMode::StartTls, AuthMode::Backend)),
            "listeners[0].tls: LMTP listeners are plaintext (keep them on a trusted network)"
        );
    }

    #[test]
    fn a_listener_needs_a_backend_for_its_protocol() {
        for protocol in ["imap", "pop3", "submission", "smtp"] {
            let file = setup(
                "",
                "lmtp",
                &format!("protocol = \"{protocol}\"\ntls = \"none\""),
            );
            assert_eq!(
                err(front_of(&file, TlsMode::None, AuthMode::Backend)),
                format!("listeners[0]: no backend serves {protocol}")
            );
        }
        // The auth server names the backend for logins, not for MX recipients.
        let file = setup("", "lmtp", "protocol = \"pop3\"\ntls = \"none\"");
        assert!(front_of(&file, TlsMode::None, AuthMode::Http).is_ok());
        let file = setup("", "imap", "protocol = \"smtp\"\ntls = \"none\"");
        assert_eq!(
            err(front_of(&file, TlsMode::None, AuthMode::Http)),
            "listeners[0]: no backend serves smtp"
        );
    }

    #[test]
    fn pop3_options_are_validated() {
        let file = setup(
            "[pop3]\nmax_line_length = 3",
            "pop3",
            "protocol = \"pop3\"\ntls = \"none\"",
        );
        assert!(err(front_of(&file, TlsMode::None, AuthMode::Backend)).starts_with("pop3: "));
    }
}
