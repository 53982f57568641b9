//! The instance-wide sections: `[server]`, `[timeouts]`, `[log]` and `[admin]`.

use std::path::Path;

use anyhow::{Result, anyhow, bail, ensure};
use postern_server::Timeouts;
use postern_server::admin::AdminSettings;
use postern_server::observability::access_log::AccessLog;

use crate::config::file;

/// `[timeouts]`. A zero timer would fire at once and make the proxy unusable, except
/// `shutdown_grace`, where zero means "close relayed sessions right away".
pub(super) fn timeouts(t: &file::Timeouts) -> Result<Timeouts> {
    for (name, d) in [
        ("preauth", t.preauth),
        ("backend_connect", t.backend_connect),
        ("backend_login", t.backend_login),
        ("idle", t.idle),
        ("smtp", t.smtp),
    ] {
        ensure!(!d.is_zero(), "timeouts.{name}: must be greater than zero");
    }
    Ok(Timeouts {
        preauth: t.preauth,
        backend_connect: t.backend_connect,
        backend_login: t.backend_login,
        idle: t.idle,
        smtp: t.smtp,
        shutdown_grace: t.shutdown_grace,
    })
}

/// `[server] hostname`: it goes into SMTP greetings and APOP timestamps, where a space
/// or a control character would break the protocol line.
pub(super) fn hostname(s: &file::Server) -> Result<String> {
    match &s.hostname {
        Some(h) => {
            ensure!(
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c)),
                "server.hostname: {h:?} is not a host name"
            );
            Ok(h.clone())
        }
        None => Ok(system_hostname()),
    }
}

/// The kernel's name for this machine; `localhost` where it cannot be read (not Linux,
/// or a sandbox without /proc), so that a missing name never stops the proxy.
pub(super) fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `[log] access`. The level is not checked here: tracing's filter syntax is lenient
/// and `RUST_LOG` overrides it anyway.
pub(super) fn access_log(l: &file::Log, base: &Path) -> Result<AccessLog> {
    AccessLog::parse(&l.access, base).map_err(|e| anyhow!("log.access: {e}"))
}

/// `[admin]`: the token inline or from a file; a listener reachable from other hosts
/// must have one, because the API can move users and kick sessions.
pub(super) fn admin(a: Option<&file::Admin>, base: &Path) -> Result<Option<AdminSettings>> {
    let Some(a) = a else {
        return Ok(None);
    };
    let token = match (&a.token, &a.token_file) {
        (Some(t), None) => Some(t.clone()),
        (None, Some(f)) => Some(
            super::first_line(base, f, "admin.token_file")?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
        (Some(_), Some(_)) => bail!("admin: set token or token_file, not both"),
    };
    if let Some(t) = &token {
        ensure!(!t.is_empty(), "admin: the token is empty");
        // It travels in an HTTP header: no spaces or control characters.
        ensure!(
            t.bytes().all(|b| b.is_ascii_graphic()),
            "admin: the token must be printable ASCII without spaces"
        );
    }
    ensure!(
        token.is_some() || a.bind.ip().is_loopback(),
        "admin.bind: {} is reachable from other hosts; set admin.token or admin.token_file (or bind to 127.0.0.1)",
        a.bind
    );
    Ok(Some(AdminSettings {
        bind: a.bind,
        token,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.expect_err("an error"))
    }

    #[test]
    fn timeouts_default_to_the_servers_and_refuse_zero() {
        let t = timeouts(&toml::from_str("").unwrap()).unwrap();
        assert_eq!(t, Timeouts::default());
        for key in [
            "preauth",
            "backend_connect",
            "backend_login",
            "idle",
            "smtp",
        ] {
            let file: file::Timeouts = toml::from_str(&format!("{key} = \"0s\"")).unwrap();
            assert_eq!(
                err(timeouts(&file)),
                format!("timeouts.{key}: must be greater than zero")
            );
        }
        // No grace at all is a valid choice.
        let t =
            timeouts(&toml::from_str("shutdown_grace = \"0s\"\nidle = \"31m\"").unwrap()).unwrap();
        assert_eq!(t.shutdown_grace, Duration::ZERO);
        assert_eq!(t.idle, Duration::from_secs(31 * 60));
    }

    #[test]
    fn hostname_is_checked_or_taken_from_the_system() {
        let h = hostname(&toml::from_str("hostname = \"mx-1.example.test\"").unwrap()).unwrap();
        assert_eq!(h, "mx-1.example.test");
        for bad in ["", "mail example", "mail\\r"] {
            let s: file::Server = toml::from_str(&format!("hostname = {bad:?}")).unwrap();
            assert!(err(hostname(&s)).starts_with("server.hostname:"), "{bad:?}");
        }
        let h = hostname(&file::Server::default()).unwrap();
        assert!(!h.is_empty());
        assert_eq!(h, system_hostname());
    }

    #[test]
    fn access_log_off_by_default_and_relative_to_the_file() {
        let base = Path::new("/etc/postern");
        assert_eq!(
            access_log(&file::Log::default(), base).unwrap(),
            AccessLog::Off
        );
        let l: file::Log = toml::from_str("access = \"access.log\"").unwrap();
        assert_eq!(
            access_log(&l, base).unwrap(),
            AccessLog::File(base.join("access.log"))
        );
        let l: file::Log = toml::from_str("access = \"/\"").unwrap();
        assert_eq!(err(access_log(&l, base)), "log.access: / is a directory");
    }

    fn admin_of(text: &str, base: &Path) -> Result<Option<AdminSettings>> {
        let a: file::Admin = toml::from_str(text).unwrap();
        admin(Some(&a), base)
    }

    #[test]
    fn admin_tokens_inline_or_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(admin(None, dir.path()).unwrap().is_none());
        // Loopback needs no token.
        let a = admin_of("bind = \"127.0.0.1:9190\"", dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(a.token, None);
        let a = admin_of("bind = \"0.0.0.0:9190\"\ntoken = \"t0k\"", dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(a.token.as_deref(), Some("t0k"));
        // Only the first line of the file counts, trimmed.
        std::fs::write(dir.path().join("token"), "  s3cret \nsecond line\n").unwrap();
        let a = admin_of("bind = \"[::]:9190\"\ntoken_file = \"token\"", dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(a.token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn admin_refusals() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        for (text, message) in [
            (
                "bind = \"0.0.0.0:9190\"",
                "admin.bind: 0.0.0.0:9190 is reachable from other hosts; set admin.token or admin.token_file (or bind to 127.0.0.1)",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntoken = \"a\"\ntoken_file = \"empty\"",
                "admin: set token or token_file, not both",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntoken = \"\"",
                "admin: the token is empty",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntoken_file = \"empty\"",
                "admin: the token is empty",
            ),
            (
                "bind = \"127.0.0.1:1\"\ntoken = \"a b\"",
                "admin: the token must be printable ASCII without spaces",
            ),
        ] {
            assert_eq!(err(admin_of(text, dir.path())), message, "{text}");
        }
        let e = err(admin_of(
            "bind = \"127.0.0.1:1\"\ntoken_file = \"absent\"",
            dir.path(),
        ));
        assert!(e.starts_with("admin.token_file: cannot read "), "{e}");
    }
}
