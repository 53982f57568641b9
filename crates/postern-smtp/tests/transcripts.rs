//! The submission (SMTP AUTH) transcripts in `fixtures/smtp/*.trace` (format: `postern_proto::transcript`):
//! the client-facing machine paired with its backend login, in memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use postern_proto::transcript::{self, Adapter, Directives};
use postern_smtp::{AuthMethod, Front, LoginMethod, LoginOptions, Options};

struct Smtp;

impl Adapter for Smtp {
    type Front = Front;

    fn front(&self, d: &Directives) -> Front {
        let options = Options {
            hostname: "mx.postern.test".into(),
            starttls: !d.has("no_starttls"),
            insecure_plaintext_auth: d.has("insecure_plaintext_auth"),
            oauth: d.has("oauth"),
            ..Options::default()
        };
        Front::new(Arc::new(options), d.has("tls"))
    }

    fn login_options(&self, d: &Directives) -> LoginOptions {
        LoginOptions {
            method: match d.get("login_method") {
                Some("xclient") => LoginMethod::Xclient,
                _ => LoginMethod::Auth,
            },
            auth: match d.get("auth_method") {
                Some("plain") => AuthMethod::Plain,
                Some("login") => AuthMethod::Login,
                _ => AuthMethod::Auto,
            },
            proxy_verified: d.has("proxy_verified"),
        }
    }
}

#[test]
fn smtp_transcripts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/smtp");
    let mut ran = 0;
    let mut failures = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "trace"))
        .collect();
    paths.sort();
    for p in paths {
        ran += 1;
        if let Err(e) = transcript::run(&Smtp, &std::fs::read_to_string(&p).unwrap()) {
            failures.push(format!("{}: {e}", p.display()));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
    assert!(ran >= 4, "only {ran} SMTP traces in {}", dir.display());
}
