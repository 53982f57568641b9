//! The IMAP transcripts in `fixtures/imap/*.trace` (format: `postern_proto::transcript`):
//! the client-facing machine paired with its backend login, in memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use postern_imap::{Front, LoginMethod, LoginOptions, Options};
use postern_proto::transcript::{self, Adapter, Directives};

struct Imap;

impl Adapter for Imap {
    type Front = Front;

    fn front(&self, d: &Directives) -> Front {
        let options = Options {
            greeting: "Postern ready.".into(),
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
                Some("login") => LoginMethod::Login,
                Some("plain") => LoginMethod::Plain,
                _ => LoginMethod::Auto,
            },
            forward_client: d.has("forward_client"),
            starttls: d.has("backend_starttls"),
        }
    }
}

#[test]
fn imap_transcripts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/imap");
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
        if let Err(e) = transcript::run(&Imap, &std::fs::read_to_string(&p).unwrap()) {
            failures.push(format!("{}: {e}", p.display()));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
    assert!(ran >= 6, "only {ran} IMAP traces in {}", dir.display());
}

/// The runner is strict: a wrong line, an unstated greeting, an unstated event and a
/// handoff that differs all fail.
#[test]
fn a_trace_that_does_not_hold_fails() {
    let greeting =
        "S: * OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN] Postern ready.\n";
    assert!(transcript::run(&Imap, &format!("! tls\n{greeting}")).is_ok());
    assert!(transcript::run(&Imap, "! tls\nS: * OK Postern ready.\n").is_err());
    assert!(
        transcript::run(&Imap, "! tls\n").is_err(),
        "the greeting went unstated"
    );
    let logout =
        format!("! tls\n{greeting}C: a LOGOUT\nS: * BYE Logging out.\nS: a OK Logout completed.\n");
    let err = transcript::run(&Imap, &logout).unwrap_err();
    assert!(err.contains("close logout"), "{err}");
    let handoff = format!(
        "! tls\n{greeting}C~ a LOGIN alice secret\\r\\nb NOOP\\r\\n\n= auth alice\n\
         B: * OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\nP: L AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==\nB: L OK done\n\
         = accepted\nS: a OK done\nH> c NOOP\\r\\n\n"
    );
    let err = transcript::run(&Imap, &handoff).unwrap_err();
    assert!(err.contains("client bytes for the backend"), "{err}");
}
