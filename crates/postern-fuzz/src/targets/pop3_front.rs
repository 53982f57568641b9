//! The POP3 front end under arbitrary client input, split at arbitrary points, with
//! arbitrary verdicts: it must never panic, never authenticate in plaintext where that
//! is refused, never act on bytes sent before STLS, never talk after closing, and keep
//! its hand-off bounded.

use std::sync::Arc;

use postern_pop3::{Front, Options};
use postern_proto::{Event, Failure, FrontEnd, Mechanism, Reply, Verdict};

const MAX_LINE: usize = 1024;

/// One fuzz input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let insecure = control & 1 == 1;
    let mut tls = control & 2 == 2;
    let opts = Options {
        max_line: MAX_LINE,
        insecure_plaintext_auth: insecure,
        apop: control & 4 == 4,
        oauth: true,
        ..Options::default()
    };
    let mut front = Front::new(Arc::new(opts), tls, Some("<1.2@fuzz>".into()));
    let chunk = usize::from(control >> 3).max(1);
    let mut out = Vec::new();
    let mut verdicts = 0u8;
    let mut closed = false;
    for piece in input.chunks(chunk) {
        front.handle_input(piece);
        loop {
            front.poll_transmit(&mut out);
            // Replies are whole lines.
            assert!(out.is_empty() || out.ends_with(b"\r\n"));
            assert!(!closed || out.is_empty(), "output after close");
            out.clear();
            let Some(event) = front.poll_event() else {
                break;
            };
            assert!(!closed, "event after close");
            match event {
                Event::StartTls => {
                    assert!(!tls);
                    tls = true;
                    front.handle_tls_ready();
                    // No greeting after STLS, and nothing pipelined before it runs.
                    front.poll_transmit(&mut out);
                    assert!(out.is_empty());
                }
                Event::Authenticate(creds) => {
                    assert!(
                        tls || insecure || creds.mechanism == Mechanism::Apop,
                        "plaintext credentials accepted before TLS"
                    );
                    verdicts = verdicts.wrapping_add(1);
                    let v = match verdicts % 5 {
                        0 => Verdict::Refused(Reply::default()),
                        1 => Verdict::Failed(Failure::Unavailable),
                        2 => Verdict::Failed(Failure::AuthFailed),
                        3 => Verdict::Refused(Reply {
                            preamble: vec![],
                            text: b"[IN-USE] locked\r\n".to_vec(),
                        }),
                        _ => {
                            front.handle_verdict(Verdict::Accepted(Reply::default()));
                            front.poll_transmit(&mut out);
                            assert!(out.starts_with(b"+OK "));
                            // One line at most was buffered, plus the read that held
                            // the login.
                            assert!(front.into_handoff().len() <= MAX_LINE + chunk);
                            return;
                        }
                    };
                    front.handle_verdict(v);
                }
                Event::Close(_) => closed = true,
                Event::Rejected(_) => {}
            }
        }
    }
    if !closed && input.len() % 2 == 1 {
        return super::check_shutdown(&mut front, control);
    }
    if !closed {
        assert!(front.into_handoff().len() <= MAX_LINE + chunk);
    }
}
