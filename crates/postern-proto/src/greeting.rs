//! The health check that does not log in: read the backend's greeting, say goodbye.
//!
//! ```text
//!  greeting line starting with the protocol's OK ─▶ send goodbye, Done(Ok(()))
//!  any other line, or no line end within GREETING_MAX bytes ─▶ send goodbye, Done(Err)
//! ```
//!
//! Each protocol crate supplies its OK prefix and goodbye (`postern_imap::greeting_check`,
//! `postern_pop3::greeting_check`), so no protocol bytes are written in the runtime.

use crate::machine::{BackendMachine, BackendStep};

/// A greeting longer than this is not a greeting (Dovecot's is ~100 bytes with
/// capabilities); the check fails instead of buffering more.
pub const GREETING_MAX: usize = 4096;

/// Reads one greeting line and answers it with the protocol's goodbye.
#[derive(Debug)]
pub struct GreetingCheck {
    ok: &'static [u8],
    goodbye: &'static [u8],
    line: Vec<u8>,
    out: Vec<u8>,
    outcome: Option<Result<(), &'static str>>,
    done: bool,
}

impl GreetingCheck {
    /// A check that passes when the greeting starts with `ok`, and sends `goodbye` once
    /// it has read the greeting, whatever the greeting said.
    pub fn new(ok: &'static [u8], goodbye: &'static [u8]) -> Self {
        Self {
            ok,
            goodbye,
            line: Vec::new(),
            out: Vec::new(),
            outcome: None,
            done: false,
        }
    }

    fn finish(&mut self, outcome: Result<(), &'static str>) {
        self.out.extend_from_slice(self.goodbye);
        self.outcome = Some(outcome);
        self.done = true;
    }
}

impl BackendMachine for GreetingCheck {
    type Outcome = Result<(), &'static str>;

    fn handle_input(&mut self, bytes: &[u8]) {
        if self.done {
            return;
        }
        let room = GREETING_MAX.saturating_sub(self.line.len());
        let take = bytes.len().min(room);
        self.line
            .extend_from_slice(bytes.get(..take).unwrap_or_default());
        if self.line.contains(&b'\n') {
            let outcome = if self.line.starts_with(self.ok) {
                Ok(())
            } else {
                Err("unexpected greeting")
            };
            self.finish(outcome);
        } else if self.line.len() >= GREETING_MAX {
            self.finish(Err("greeting line too long"));
        }
    }

    fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.out);
    }

    fn poll_step(&mut self) -> Option<BackendStep<Self::Outcome>> {
        self.outcome.take().map(BackendStep::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[&[u8]]) -> (Option<Result<(), &'static str>>, Vec<u8>) {
        let mut c = GreetingCheck::new(b"* OK", b"Z LOGOUT\r\n");
        let mut out = Vec::new();
        let mut outcome = None;
        for chunk in input {
            c.handle_input(chunk);
            c.poll_transmit(&mut out);
            if let Some(BackendStep::Done(o)) = c.poll_step() {
                outcome = Some(o);
            }
        }
        (outcome, out)
    }

    #[test]
    fn an_ok_greeting_passes_and_gets_the_goodbye() {
        let (outcome, out) = run(&[b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n"]);
        assert_eq!(outcome, Some(Ok(())));
        assert_eq!(out, b"Z LOGOUT\r\n");
    }

    #[test]
    fn a_greeting_split_byte_by_byte_is_read_whole() {
        let g = b"* OK ready\r\n";
        let chunks: Vec<&[u8]> = g.chunks(1).collect();
        let (outcome, out) = run(&chunks);
        assert_eq!(outcome, Some(Ok(())));
        assert_eq!(out, b"Z LOGOUT\r\n");
    }

    #[test]
    fn nothing_is_decided_before_the_line_ends() {
        let (outcome, out) = run(&[b"* OK still typing"]);
        assert_eq!(outcome, None);
        assert!(out.is_empty());
    }

    #[test]
    fn a_bye_greeting_fails_and_still_gets_the_goodbye() {
        let (outcome, out) = run(&[b"* BYE Too many connections\r\n"]);
        assert_eq!(outcome, Some(Err("unexpected greeting")));
        assert_eq!(out, b"Z LOGOUT\r\n");
    }

    #[test]
    fn an_endless_greeting_fails_at_its_bound() {
        let long = vec![b'x'; GREETING_MAX + 10];
        let (outcome, _) = run(&[b"* OK ", &long]);
        assert_eq!(outcome, Some(Err("greeting line too long")));
    }

    #[test]
    fn input_after_the_outcome_is_ignored() {
        let mut c = GreetingCheck::new(b"+OK", b"QUIT\r\n");
        c.handle_input(b"+OK POP3 ready\r\n");
        assert_eq!(c.poll_step(), Some(BackendStep::Done(Ok(()))));
        c.handle_input(b"-ERR late\r\n");
        assert_eq!(c.poll_step(), None);
        let mut out = Vec::new();
        c.poll_transmit(&mut out);
        assert_eq!(out, b"QUIT\r\n");
    }
}
