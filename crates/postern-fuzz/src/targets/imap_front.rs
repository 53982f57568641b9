//! The IMAP front end under arbitrary client input, split at arbitrary points, with
//! arbitrary verdicts: it must never panic, its buffer must stay bounded (one command,
//! `max_line` or an ID's RFC 2971 bound, plus one read), and a driver shutdown must end
//! with the goodbye.

use std::sync::Arc;

use postern_imap::{Front, Options};
use postern_proto::{Event, Failure, FrontEnd, Reply, Verdict};

/// One fuzz input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let opts = Options {
        max_line: 1024,
        max_literal: 256,
        insecure_plaintext_auth: control & 1 == 1,
        oauth: true,
        ..Options::default()
    };
    let mut front = Front::new(Arc::new(opts), control & 2 == 2);
    let chunk = usize::from(control >> 2).max(1);
    let mut out = Vec::new();
    let mut verdicts = 0u8;
    for piece in input.chunks(chunk) {
        front.handle_input(piece);
        loop {
            front.poll_transmit(&mut out);
            out.clear();
            match front.poll_event() {
                None => break,
                Some(Event::StartTls) => front.handle_tls_ready(),
                Some(Event::Authenticate(_)) => {
                    verdicts = verdicts.wrapping_add(1);
                    let v = match verdicts % 3 {
                        0 => Verdict::Refused(Reply::default()),
                        1 => Verdict::Failed(Failure::Unavailable),
                        _ => Verdict::Failed(Failure::AuthFailed),
                    };
                    front.handle_verdict(v);
                }
                Some(Event::Close(_)) => return,
                Some(Event::Rejected(_)) => {}
            }
        }
    }
    if input.len() % 2 == 1 {
        return super::check_shutdown(&mut front, control);
    }
    // The hand-off never holds more than one message's worth plus one read; only an ID
    // command may be longer than max_line.
    let handoff = front.into_handoff();
    let bound = if postern_imap::framing::is_command(&handoff, b"ID") {
        postern_imap::front::MAX_ID_LINE
    } else {
        1024
    };
    assert!(handoff.len() <= bound + chunk);
}
