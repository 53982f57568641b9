//! `[auth]`: who checks credentials (the backend, Postern, or an auth_http server), the
//! master user, and the checks that need the route store's passwords (proxy mode, APOP).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Result, anyhow, bail, ensure};
use postern_server::{AuthMode, AuthSettings, HttpAuth, MasterLogin, MasterStyle};

use crate::config::file::{self, File};

/// A listener's mode: its own `auth`, else `auth.mode`.
pub(super) fn listener_mode(file: &File, l: &file::Listener) -> file::AuthMode {
    l.auth.unwrap_or(file.auth.mode)
}

pub(super) fn auth_mode(m: file::AuthMode) -> AuthMode {
    match m {
        file::AuthMode::Backend => AuthMode::Backend,
        file::AuthMode::Proxy => AuthMode::Proxy,
        file::AuthMode::Http => AuthMode::Http,
    }
}

/// Whether the route store returns a password column (a `lookup_query`): proxy mode
/// and APOP need it, and without it every login would fail at run time instead.
fn store_has_passwords(r: &file::Routing) -> bool {
    r.store == file::StoreKind::Sql && r.sql.as_ref().is_some_and(|s| s.lookup_query.is_some())
}

/// `pop3.apop` needs plaintext passwords, unless every POP3 listener leaves the check
/// to an auth_http server (which gets the digest and the salt).
pub(super) fn check_apop(file: &File) -> Result<()> {
    let apop_checked_here = file.listeners.iter().any(|l| {
        l.protocol == file::Protocol::Pop3 && listener_mode(file, l) != file::AuthMode::Http
    });
    if file.pop3.apop && apop_checked_here {
        ensure!(
            store_has_passwords(&file.routing),
            "pop3.apop: APOP needs plaintext passwords, from a routing.sql.lookup_query that returns a password column"
        );
    }
    Ok(())
}

/// `[auth]`, checked against the listeners that use each mode: a section only some
/// unused mode needs is not an error.
pub(super) fn auth_settings(file: &File, base: &Path) -> Result<AuthSettings> {
    let a = &file.auth;
    let modes: BTreeSet<_> = file
        .listeners
        .iter()
        .map(|l| listener_mode(file, l))
        .collect();
    postern_auth::password::Scheme::from_name(&a.dummy_scheme)
        .map_err(|e| anyhow!("auth.dummy_scheme: {e}"))?;
    if modes.contains(&file::AuthMode::Proxy) {
        ensure!(
            store_has_passwords(&file.routing),
            "auth.mode \"proxy\": needs password hashes, from a routing.sql.lookup_query that returns a password column"
        );
    }
    let master = a.master.as_ref().map(|m| master(m, base)).transpose()?;
    let http = match &a.http {
        None => {
            ensure!(
                !modes.contains(&file::AuthMode::Http),
                "auth.mode \"http\": needs an [auth.http] section with a url"
            );
            None
        }
        Some(h) => Some(http(h)?),
    };
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    Ok(AuthSettings {
        master,
        max_parallel_checks: if a.max_parallel_checks == 0 {
            cpus
        } else {
            a.max_parallel_checks
        },
        dummy_scheme: a.dummy_scheme.clone(),
        http,
    })
}

/// `[auth.master]`. The password file's line is taken as is: master passwords may
/// begin or end with spaces.
fn master(m: &file::Master, base: &Path) -> Result<MasterLogin> {
    ensure!(!m.user.is_empty(), "auth.master.user: must not be empty");
    let password = match (&m.password, &m.password_file) {
        (Some(p), None) => p.clone(),
        (None, Some(f)) => super::first_line(base, f, "auth.master.password_file")?,
        _ => bail!("auth.master: set one of password and password_file"),
    };
    ensure!(!password.is_empty(), "auth.master: the password is empty");
    let style = match m.style {
        file::MasterStyle::Separator => {
            ensure!(
                !m.separator.is_empty(),
                "auth.master.separator: must not be empty"
            );
            MasterStyle::Separator(m.separator.clone())
        }
        file::MasterStyle::Authzid => MasterStyle::Authzid,
    };
    Ok(MasterLogin {
        user: m.user.clone(),
        password: postern_proto::Secret::new(password.into_bytes()),
        style,
    })
}

/// `[auth.http]`. Header names and values go into every request verbatim, so they
/// must not be able to end a header line or start another one.
fn http(h: &file::AuthHttp) -> Result<HttpAuth> {
    let endpoint = postern_auth::auth_http::Endpoint::parse(&h.url)
        .map_err(|e| anyhow!("auth.http.url: {e}"))?;
    ensure!(!h.timeout.is_zero(), "auth.http.timeout: must be > 0");
    for (name, value) in &h.headers {
        ensure!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "auth.http.headers: {name:?} is not a header name"
        );
        ensure!(
            !value.bytes().any(|b| b.is_ascii_control()),
            "auth.http.headers.{name}: control characters are not allowed"
        );
    }
    Ok(HttpAuth {
        endpoint,
        timeout: h.timeout,
        headers: h
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    /// A file with one listener per `(protocol, auth)`; `top` holds the sections.
    fn file(top: &str, listeners: &[(&str, Option<&str>)]) -> File {
        let mut text = format!("{top}\n");
        if !text.contains("[routing]") {
            text.push_str("[routing]\n");
        }
        for (i, (protocol, auth)) in listeners.iter().enumerate() {
            text.push_str(&format!(
                "[[listeners]]\nprotocol = \"{protocol}\"\nbind = \"127.0.0.1:{}\"\ntls = \"none\"\n",
                i + 1
            ));
            if let Some(a) = auth {
                text.push_str(&format!("auth = \"{a}\"\n"));
            }
        }
        toml::from_str(&text).unwrap()
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.expect_err("an error"))
    }

    const LOOKUP: &str =
        "[routing]\n[routing.sql]\nurl = \"sqlite::memory:\"\nlookup_query = \"SELECT 1\"\n";

    #[test]
    fn defaults_backend_mode_one_check_per_cpu() {
        let f = file("", &[("imap", None)]);
        let a = auth_settings(&f, Path::new("/")).unwrap();
        assert!(a.master.is_none() && a.http.is_none());
        assert_eq!(a.dummy_scheme, "SHA512-CRYPT");
        assert!(a.max_parallel_checks >= 1);
        assert_eq!(
            auth_mode(listener_mode(&f, &f.listeners[0])),
            AuthMode::Backend
        );
        let f = file("[auth]\nmax_parallel_checks = 3", &[("imap", None)]);
        assert_eq!(
            auth_settings(&f, Path::new("/"))
                .unwrap()
                .max_parallel_checks,
            3
        );
    }

    #[test]
    fn listener_mode_overrides_the_default() {
        let f = file(
            "[auth]\nmode = \"proxy\"",
            &[("imap", None), ("pop3", Some("backend"))],
        );
        assert_eq!(listener_mode(&f, &f.listeners[0]), file::AuthMode::Proxy);
        assert_eq!(listener_mode(&f, &f.listeners[1]), file::AuthMode::Backend);
    }

    #[test]
    fn modes_need_their_sources() {
        let f = file("[auth]\ndummy_scheme = \"NOPE\"", &[("imap", None)]);
        assert!(err(auth_settings(&f, Path::new("/"))).starts_with("auth.dummy_scheme: "));
        let f = file("", &[("imap", Some("proxy"))]);
        assert_eq!(
            err(auth_settings(&f, Path::new("/"))),
            "auth.mode \"proxy\": needs password hashes, from a routing.sql.lookup_query that returns a password column"
        );
        let f = file(LOOKUP, &[("imap", Some("proxy"))]);
        assert!(auth_settings(&f, Path::new("/")).is_ok());
        let f = file("", &[("imap", Some("http"))]);
        assert_eq!(
            err(auth_settings(&f, Path::new("/"))),
            "auth.mode \"http\": needs an [auth.http] section with a url"
        );
    }

    #[test]
    fn apop_needs_plaintext_passwords_unless_auth_http_checks_it() {
        let f = file("[pop3]\napop = true", &[("pop3", None)]);
        assert_eq!(
            err(check_apop(&f)),
            "pop3.apop: APOP needs plaintext passwords, from a routing.sql.lookup_query that returns a password column"
        );
        let f = file(&format!("[pop3]\napop = true\n{LOOKUP}"), &[("pop3", None)]);
        check_apop(&f).unwrap();
        let f = file(
            "[pop3]\napop = true",
            &[("pop3", Some("http")), ("imap", None)],
        );
        check_apop(&f).unwrap();
    }

    #[test]
    fn master_user() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), " with spaces \nsecond\n").unwrap();
        let m: file::Master =
            toml::from_str("user = \"m\"\npassword_file = \"pw\"\nstyle = \"authzid\"").unwrap();
        let m = master(&m, dir.path()).unwrap();
        assert_eq!(m.user, "m");
        assert_eq!(m.password.expose(), b" with spaces ");
        assert_eq!(m.style, MasterStyle::Authzid);
        let m: file::Master = toml::from_str("user = \"m\"\npassword = \"x\"").unwrap();
        assert_eq!(
            master(&m, dir.path()).unwrap().style,
            MasterStyle::Separator("*".into())
        );
        for (text, message) in [
            (
                "user = \"\"\npassword = \"x\"",
                "auth.master.user: must not be empty",
            ),
            (
                "user = \"m\"",
                "auth.master: set one of password and password_file",
            ),
            (
                "user = \"m\"\npassword = \"x\"\npassword_file = \"pw\"",
                "auth.master: set one of password and password_file",
            ),
            (
                "user = \"m\"\npassword = \"\"",
                "auth.master: the password is empty",
            ),
            (
                "user = \"m\"\npassword = \"x\"\nseparator = \"\"",
                "auth.master.separator: must not be empty",
            ),
        ] {
            let m: file::Master = toml::from_str(text).unwrap();
            assert_eq!(err(master(&m, dir.path())), message, "{text}");
        }
        let m: file::Master = toml::from_str("user = \"m\"\npassword_file = \"absent\"").unwrap();
        assert!(err(master(&m, dir.path())).starts_with("auth.master.password_file: cannot read "));
    }

    #[test]
    fn auth_http_server() {
        let h: file::AuthHttp = toml::from_str("url = \"http://127.0.0.1:9000/auth\"").unwrap();
        let h = http(&h).unwrap();
        assert_eq!(h.timeout, Duration::from_secs(60), "nginx's default");
        assert!(h.headers.is_empty());
        let h: file::AuthHttp = toml::from_str(
            "url = \"unix:/run/auth.sock\"\ntimeout = \"5s\"\nheaders = { X-Key = \"v\" }",
        )
        .unwrap();
        assert_eq!(
            http(&h).unwrap().headers,
            vec![("X-Key".to_owned(), "v".to_owned())]
        );
        for (text, message) in [
            (
                "url = \"http://x/\"\ntimeout = \"0s\"",
                "auth.http.timeout: must be > 0",
            ),
            (
                "url = \"http://x/\"\nheaders = { \"a b\" = \"v\" }",
                "auth.http.headers: \"a b\" is not a header name",
            ),
            (
                "url = \"http://x/\"\nheaders = { A = \"v\\r\\nB: w\" }",
                "auth.http.headers.A: control characters are not allowed",
            ),
        ] {
            let h: file::AuthHttp = toml::from_str(text).unwrap();
            assert_eq!(err(http(&h)), message, "{text}");
        }
        let h: file::AuthHttp = toml::from_str("url = \"ftp://x\"").unwrap();
        assert!(err(http(&h)).starts_with("auth.http.url: "));
    }
}
