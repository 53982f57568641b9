//! The submission front end under arbitrary client input, split at arbitrary points,
//! with arbitrary verdicts: it must never panic, its buffer must stay bounded, nothing
//! sent before STARTTLS may be acted on after it, and AUTH data is never echoed.

use std::sync::Arc;

use postern_proto::{Event, Failure, FrontEnd, Reply, Verdict};
use postern_smtp::{Front, Options};

/// One fuzz input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let opts = Options {
        max_line: 512,
        max_auth_line: 1024,
        insecure_plaintext_auth: control & 1 == 1,
        oauth: true,
        extensions: vec!["PIPELINING".into(), "XCLIENT ADDR".into(), "SIZE 10".into()],
        ..Options::default()
    };
    let mut front = Front::new(Arc::new(opts), control & 2 == 2);
    let chunk = usize::from(control >> 2).max(1);
    let mut out = Vec::new();
    let mut verdicts = 0u8;
    let mut accepted = false;
    for piece in input.chunks(chunk) {
        front.handle_input(piece);
        loop {
            front.poll_transmit(&mut out);
            // Every reply line is a well-formed SMTP reply.
            for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                assert!(line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit));
                assert!(matches!(line[3], b' ' | b'-'));
                assert!(line.ends_with(b"\r"));
            }
            out.clear();
            match front.poll_event() {
                None => break,
                Some(Event::StartTls) => {
                    // Whatever followed STARTTLS in this read is gone.
                    front.handle_tls_ready();
                }
                Some(Event::Authenticate(_)) => {
                    verdicts = verdicts.wrapping_add(1);
                    let v = match verdicts % 5 {
                        0 => Verdict::Refused(Reply::default()),
                        1 => Verdict::Failed(Failure::Unavailable),
                        2 => Verdict::Refused(Reply {
                            preamble: b"535-a\r\n".to_vec(),
                            text: b"535 b".to_vec(),
                        }),
                        3 => {
                            accepted = true;
                            Verdict::Accepted(Reply::default())
                        }
                        _ => Verdict::Failed(Failure::AuthFailed),
                    };
                    front.handle_verdict(v);
                }
                Some(Event::Close(_)) => return,
                Some(Event::Rejected(_)) => {}
            }
        }
        if accepted {
            break;
        }
    }
    if input.len() % 2 == 1 {
        return super::check_shutdown(&mut front, control);
    }
    // The hand-off never holds more than one line's worth plus one read, or the
    // bytes pipelined behind AUTH.
    assert!(front.into_handoff().len() <= 64 * 1024 + 1024 + chunk);
}
