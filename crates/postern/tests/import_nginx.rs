//! `postern import-nginx`: every fixture in fixtures/nginx/ imports, and the result loads
//! with the real configuration loader (certificates included); what could not be mapped
//! is reported with its file and line; bad nginx syntax is an error with its line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use postern::config::Config;
use postern::import_nginx::{self, Error, Import};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// fixtures/nginx copied to a temporary directory, with the certificates the fixtures
/// name (tls/*.pem) generated there.
struct Fixtures {
    dir: tempfile::TempDir,
}

impl Fixtures {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&repo().join("fixtures/nginx"), dir.path());
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        for (cert, key) in [
            ("fullchain.pem", "privkey.pem"),
            ("other.pem", "other.key"),
            ("ecdsa.pem", "ecdsa.key"),
        ] {
            let c = rcgen::generate_simple_self_signed(vec!["mail.example.test".into()]).unwrap();
            std::fs::write(tls.join(cert), c.cert.pem()).unwrap();
            std::fs::write(tls.join(key), c.signing_key.serialize_pem()).unwrap();
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn import(&self, name: &str) -> Import {
        import_nginx::import_file(&self.path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn error(&self, name: &str) -> String {
        match import_nginx::import_file(&self.path(name)) {
            Ok(i) => panic!("{name} imported:\n{}", i.toml),
            Err(e) => e.to_string(),
        }
    }

    /// Imports and loads with the real loader (relative paths from an output directory).
    fn load(&self, name: &str) -> (Import, Config) {
        let import = self.import(name);
        let out = self.dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let config = Config::from_toml(&import.toml, &out)
            .unwrap_or_else(|e| panic!("{name}: {e:#}\n{}", import.toml));
        (import, config)
    }
}

fn warned(import: &Import, needle: &str) -> bool {
    import
        .warnings
        .iter()
        .any(|w| w.to_string().contains(needle))
}

fn listener<'a>(config: &'a Config, name: &str) -> &'a postern_server::ListenerSettings {
    config
        .settings
        .listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| {
            let names: Vec<_> = config.settings.listeners.iter().map(|l| &l.name).collect();
            panic!("no listener {name}: {names:?}")
        })
}

#[test]
fn seed_stream_config_becomes_pinned_backends() {
    let f = Fixtures::new();
    let (import, config) = f.load("seed-stream.conf");
    let s = &config.settings;
    let mut names: Vec<_> = s.backends.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["mail.internal-1", "mail.internal-2"]);
    let b1 = &s.backends["mail.internal-1"];
    assert_eq!(b1.host, "mail.internal");
    assert_eq!(b1.imap.as_ref().map(|i| i.endpoint.port), Some(1431));
    assert_eq!(b1.pop3.as_ref().map(|i| i.endpoint.port), Some(1101));
    assert_eq!(b1.smtp.as_ref().map(|i| i.port), Some(251));
    let b2 = &s.backends["mail.internal-2"];
    assert_eq!(b2.imap.as_ref().map(|i| i.endpoint.port), Some(1432));
    assert_eq!(b2.pop3.as_ref().map(|i| i.endpoint.port), Some(1102));
    assert_eq!(b2.smtp.as_ref().map(|i| i.port), Some(252));
    let binds: Vec<String> = s.listeners.iter().map(|l| l.bind.to_string()).collect();
    assert_eq!(binds, ["0.0.0.0:25", "0.0.0.0:110", "0.0.0.0:143"]);
    assert_eq!(listener(&config, "imap-143").tls_mode.as_str(), "none");
    assert!(matches!(
        config.router.unknown_users,
        postern_route::UnknownUsers::Assign(_)
    ));
    // The differences an operator must know about, with the line they come from.
    assert!(warned(
        &import,
        "seed-stream.conf:16: upstream: per-connection balancing"
    ));
    assert!(warned(&import, "seed-stream.conf:32: listen: MX relay"));
    assert!(warned(
        &import,
        "seed-stream.conf:42: listen: STARTTLS was relayed"
    ));
    // ... and in the file as comments.
    assert!(import.toml.contains("#   - "));
    assert!(import.toml.contains("smtpd_authorized_xclient_hosts"));
}

#[test]
fn typical_mail_config_becomes_auth_http_listeners() {
    let f = Fixtures::new();
    let (import, config) = f.load("mail-auth-http.conf");
    let s = &config.settings;
    assert!(s.backends.is_empty(), "the auth server names backends");
    assert_eq!(s.hostname, "mail.example.test");
    let http = s.auth.http.as_ref().expect("auth.http");
    assert_eq!(http.timeout, std::time::Duration::from_secs(5));
    assert_eq!(
        http.headers,
        vec![("X-Auth-Key".to_owned(), "shared secret".to_owned())]
    );
    assert!(
        import
            .toml
            .contains("url = \"http://127.0.0.1:9000/mail/auth\"")
    );
    for (name, tls) in [
        ("imap-143", "starttls"),
        ("imaps-993", "implicit"),
        ("pop3-110", "starttls"),
        ("pop3s-995", "implicit"),
        ("submission-587", "starttls"),
        ("submissions-465", "implicit"),
    ] {
        let l = listener(&config, name);
        assert_eq!(l.tls_mode.as_str(), tls, "{name}");
        assert_eq!(l.auth, postern_server::AuthMode::Http, "{name}");
    }
    // listen ... proxy_protocol + set_real_ip_from.
    let proxy = listener(&config, "imaps-993")
        .proxy
        .as_ref()
        .expect("PROXY in");
    assert_eq!(
        proxy.trusted,
        vec!["10.0.0.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
    assert!(listener(&config, "imap-143").proxy.is_none());
    assert_eq!(s.timeouts.preauth, std::time::Duration::from_secs(30));
    assert_eq!(s.timeouts.idle, std::time::Duration::from_secs(3600));
    assert!(import.toml.contains("max_bad_commands = 5"));
    assert!(import.toml.contains("max_line_length = 32768"));
    assert!(import.toml.contains("apop = true"));
    // Not mapped, each with its file (includes too) and line.
    for needle in [
        "mail-auth-http.conf:17: proxy_pass_error_message: not mapped",
        "mail-auth-http.conf:24: ssl_protocols: not mapped",
        "mail-auth-http.conf:27: imap_capabilities: not mapped",
        "conf.d/smtp.conf:6: resolver: not mapped",
        "xclient",
    ] {
        assert!(warned(&import, needle), "{needle}: {:#?}", import.warnings);
    }
}

#[test]
fn edge_cases_quoting_variables_mixed_blocks() {
    let f = Fixtures::new();
    let (import, config) = f.load("edge/mixed.conf");
    let s = &config.settings;
    let headers = &s.auth.http.as_ref().expect("auth.http").headers;
    assert!(headers.contains(&(
        "X-Auth-Key".to_owned(),
        "quote \" and backslash \\ in it".to_owned()
    )));
    // A variable is kept as written, with a warning.
    assert!(headers.contains(&("X-Client-Cert".to_owned(), "$ssl_client_cert".to_owned())));
    assert!(warned(
        &import,
        "mixed.conf:9: auth_http_header: nginx variable(s) in $ssl_client_cert"
    ));
    // A directive split over two lines.
    assert_eq!(s.timeouts.preauth, std::time::Duration::from_secs(45));
    // IPv6 and IPv4 on one port: two listeners, unique names.
    assert_eq!(
        listener(&config, "imap-1143").bind.to_string(),
        "[::1]:1143"
    );
    assert_eq!(
        listener(&config, "imap-1143-2").bind.to_string(),
        "127.0.0.1:1143"
    );
    // starttls on: plaintext logins stay allowed, as in nginx, with a warning.
    assert!(warned(&import, "mixed.conf:22: starttls: \"on\""));
    // The obsolete `ssl on` with the server's own certificate.
    assert_eq!(
        listener(&config, "imaps-1993").tls_mode.as_str(),
        "implicit"
    );
    assert!(import.toml.contains("other.pem"));
    // Mail and stream listeners side by side: per-listener auth.
    assert_eq!(
        listener(&config, "imap-1143").auth,
        postern_server::AuthMode::Http
    );
    assert_eq!(
        listener(&config, "submissions-2465").auth,
        postern_server::AuthMode::Backend
    );
    // Stream: TLS terminated by nginx, PROXY to the backend; TLS passed through.
    let b10 = &s.backends["192.0.2.10"];
    let sub = b10.submission.as_ref().expect("submission");
    assert_eq!(sub.endpoint.port, 587);
    assert_eq!(
        sub.endpoint.proxy_protocol,
        postern_server::settings::ProxyProtocol::V1
    );
    let imap = b10.imap.as_ref().expect("imap");
    assert_eq!(
        imap.endpoint.tls,
        postern_server::settings::BackendTls::Implicit
    );
    assert_eq!(s.backends["192.0.2.11"].weight, 2);
    assert_eq!(s.backends["2001_db8__12"].weight, 0, "down");
    assert_eq!(
        listener(&config, "imaps-2993").tls_mode.as_str(),
        "implicit"
    );
    assert_eq!(config.settings.listeners.len(), 6);
    for needle in [
        "mixed.conf:15: ssl_certificate: a second certificate",
        "mixed.conf:16: smtp_auth: \"none\" only",
        "mixed.conf:20: listen: parameter \"backlog\" not mapped",
        "mixed.conf:23: imap_auth: not mapped",
        "mixed.conf:32: frobnicate: unknown",
        "mixed.conf:43: auth_http: Postern has one value",
        "mixed.conf:51: least_conn",
        "mixed.conf:54: server: down",
        "mixed.conf:55: server: unix socket",
        "mixed.conf:81: listen: port 8080",
        "mixed.conf:87: proxy_pass: \"$upstream_by_sni\" is chosen by a variable",
        "mixed.conf:12: proxy_timeout: 10m is shorter than 29 minutes",
    ] {
        assert!(warned(&import, needle), "{needle}: {:#?}", import.warnings);
    }
}

#[test]
fn syntax_errors_name_file_and_line() {
    let f = Fixtures::new();
    let e = f.error("edge/missing-semicolon.conf");
    assert!(
        e.contains("missing-semicolon.conf:6: unexpected \"}\""),
        "{e}"
    );
    assert!(e.contains("\"listen\" (line 5)"), "{e}");
    let e = f.error("edge/unclosed-block.conf");
    assert!(
        e.contains("unclosed-block.conf:6: unexpected end of file, expecting \"}\""),
        "{e}"
    );
    let e = f.error("edge/unterminated-quote.conf");
    assert!(
        e.contains("unterminated-quote.conf:2:") && e.contains("quote"),
        "{e}"
    );
    let e = f.error("edge/include-cycle.conf");
    assert!(e.contains("include-cycle.conf:3: include cycle"), "{e}");
    let e = f.error("edge/include-missing.conf");
    assert!(
        e.contains("include-missing.conf:3: include \"conf.d/absent.conf\": no such file"),
        "{e}"
    );
    let e = f.error("edge/no-mail.conf");
    assert!(e.contains("no mail {} or stream {} block"), "{e}");
    let e = f.error("absent.conf");
    assert!(e.contains("cannot read"), "{e}");
}

#[test]
fn text_import_and_an_unusable_config() {
    // Nothing mappable: the reasons are in the error.
    let text = "mail {\n  server {\n    listen 143;\n    protocol imap;\n  }\n}\n";
    match import_nginx::import_str(text, Path::new("inline.conf"), Path::new("/")) {
        Err(Error::Nothing(m)) => assert!(m.contains("inline.conf:2: server: no auth_http"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Only keys Postern knows: a minimal config loads (no TLS, no certificates).
    let text = "mail { auth_http unix:/run/auth.sock:/auth; server { listen 127.0.0.1:1143; protocol imap; } }";
    let import = import_nginx::import_str(text, Path::new("inline.conf"), Path::new("/")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    Config::from_toml(&import.toml, dir.path())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", import.toml));
}
