//! The POP3 transcripts in `fixtures/pop3/*.trace` (format: `postern_proto::transcript`):
//! the client-facing machine paired with its backend login, in memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use postern_pop3::{Front, LoginMethod, LoginOptions, Options};
use postern_proto::transcript::{self, Adapter, Directives};

struct Pop3;

impl Adapter for Pop3 {
    type Front = Front;

    fn front(&self, d: &Directives) -> Front {
        let options = Options {
            greeting: "Postern ready.".into(),
            starttls: !d.has("no_starttls"),
            insecure_plaintext_auth: d.has("insecure_plaintext_auth"),
            oauth: d.has("oauth"),
            apop: d.has("apop"),
            ..Options::default()
        };
        // APOP's greeting carries a timestamp; a fixed one keeps the trace exact.
        let stamp = d
            .has("apop")
            .then(|| "<1896.697170952@postern.test>".to_owned());
        Front::new(Arc::new(options), d.has("tls"), stamp)
    }

    fn login_options(&self, d: &Directives) -> LoginOptions {
        LoginOptions {
            method: match d.get("login_method") {
                Some("user") => LoginMethod::User,
                _ => LoginMethod::Plain,
            },
            forward_client: d.has("forward_client"),
            starttls: d.has("backend_starttls"),
        }
    }
}

#[test]
fn pop3_transcripts() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pop3");
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
        if let Err(e) = transcript::run(&Pop3, &std::fs::read_to_string(&p).unwrap()) {
            failures.push(format!("{}: {e}", p.display()));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
    assert!(ran >= 4, "only {ran} POP3 traces in {}", dir.display());
}
