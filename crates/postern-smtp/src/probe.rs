//! Learning a backend's extensions: the sans-IO conversation behind
//! [`crate::advertised_extensions`].
//!
//! ```text
//!  220 ─▶ send "EHLO <postern>" (LHLO for LMTP) ─▶ 250 ─▶ send QUIT, Done(Ok(extensions))
//!  anything else ─▶ Done(Err(reason))
//! ```
//!
//! The driver runs it against a backend at start-up (and from time to time) and puts
//! `extensions.advertise(protocol)` into the listener's options, so that what Postern
//! advertises is what the backends really offer, not a hand-written list.

use postern_proto::{BackendMachine, BackendStep};

use crate::ehlo::Extensions;
use crate::reply::{Read, ReplyReader};

#[derive(Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Ehlo,
    Done,
}

/// Asks one backend for its EHLO (or LHLO) reply.
#[derive(Debug)]
pub struct Probe {
    state: State,
    reader: ReplyReader,
    out: Vec<u8>,
    verb: &'static str,
    hostname: String,
    result: Option<Result<Extensions, &'static str>>,
}

impl Probe {
    /// Prepares a probe; `lmtp` greets with LHLO. Nothing is sent before the greeting.
    pub fn new(hostname: &str, lmtp: bool) -> Self {
        Self {
            state: State::Greeting,
            reader: ReplyReader::default(),
            out: Vec::new(),
            verb: if lmtp { "LHLO" } else { "EHLO" },
            hostname: hostname.to_owned(),
            result: None,
        }
    }

    /// Feeds bytes read from the backend.
    pub fn handle_input(&mut self, bytes: &[u8]) {
        if self.state == State::Done {
            return;
        }
        self.reader.push(bytes);
        while self.state != State::Done {
            let reply = match self.reader.next() {
                Read::Incomplete => return,
                Read::Invalid => return self.finish(Err("invalid reply")),
                Read::Reply(reply) => reply,
            };
            match (&self.state, reply.code) {
                (State::Greeting, 220) => {
                    let line = format!("{} {}\r\n", self.verb, self.hostname);
                    self.out.extend_from_slice(line.as_bytes());
                    self.state = State::Ehlo;
                }
                (State::Greeting, _) => self.finish(Err("greeting is not 220")),
                (State::Ehlo, 250) => {
                    self.out.extend_from_slice(b"QUIT\r\n");
                    self.finish(Ok(Extensions::from_reply(&reply)));
                }
                (_, _) => self.finish(Err("EHLO refused")),
            }
        }
    }

    fn finish(&mut self, result: Result<Extensions, &'static str>) {
        self.state = State::Done;
        self.result = Some(result);
    }

    /// Appends bytes to send to the backend.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.out);
    }

    /// The outcome, once known: the backend's extensions, or why it could not be
    /// probed. The driver closes the connection after sending the final QUIT.
    pub fn poll_result(&mut self) -> Option<Result<Extensions, &'static str>> {
        self.result.take()
    }
}

/// The health checks' driver runs the probe like any backend machine.
impl BackendMachine for Probe {
    type Outcome = Result<Extensions, &'static str>;

    fn handle_input(&mut self, bytes: &[u8]) {
        Probe::handle_input(self, bytes);
    }

    fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        Probe::poll_transmit(self, out);
    }

    fn poll_step(&mut self) -> Option<BackendStep<Self::Outcome>> {
        self.poll_result().map(BackendStep::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_proto::Protocol;

    #[test]
    fn probe_then_quit() {
        let mut p = Probe::new("postern.test", true);
        p.handle_input(b"220 lmtp ready\r\n250-lmtp\r\n");
        let mut out = vec![];
        p.poll_transmit(&mut out);
        assert_eq!(out, b"LHLO postern.test\r\n");
        assert!(p.poll_result().is_none());
        p.handle_input(b"250-8BITMIME\r\n250-XCLIENT ADDR\r\n250 PIPELINING\r\n");
        out.clear();
        p.poll_transmit(&mut out);
        assert_eq!(out, b"QUIT\r\n");
        let ext = p.poll_result().unwrap().unwrap();
        assert_eq!(ext.advertise(Protocol::Lmtp), ["8BITMIME", "PIPELINING"]);

        let mut p = Probe::new("p", false);
        p.handle_input(b"554 no\r\n");
        assert!(p.poll_result().unwrap().is_err());
    }
}
