//! The queue a front end fills for its driver: bytes for the client and events, drained
//! in the order the [`crate::machine`] contract prescribes.
//!
//! Every front end needs exactly this, and `poll_transmit` has a detail worth having
//! once: handing over the buffer itself when the driver's is empty, so a reply is not
//! copied on its way out.

use std::collections::VecDeque;
use std::mem;

use crate::Event;

/// Bytes to send and events to act on.
#[derive(Debug, Default)]
pub struct Output {
    bytes: Vec<u8>,
    events: VecDeque<Event>,
}

impl Output {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues one line; CRLF is added.
    pub fn line(&mut self, line: &str) {
        self.bytes.extend_from_slice(line.as_bytes());
        self.bytes.extend_from_slice(b"\r\n");
    }

    /// Queues bytes as they are (multi-line replies, relayed backend text).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    /// Queues an event, after every byte queued so far.
    pub fn event(&mut self, event: Event) {
        self.events.push_back(event);
    }

    /// Drops everything queued: a refusal replaces the greeting, it does not follow it.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.events.clear();
    }

    /// [`crate::FrontEnd::poll_transmit`].
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        if out.is_empty() {
            mem::swap(out, &mut self.bytes);
        } else {
            out.append(&mut self.bytes);
        }
    }

    /// [`crate::FrontEnd::poll_event`].
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

impl Extend<u8> for Output {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.bytes.extend(iter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CloseReason;

    #[test]
    fn drains_in_order() {
        let mut o = Output::new();
        o.line("* OK hi");
        o.extend_from_slice(b"a");
        o.extend(*b"b\r\n");
        o.event(Event::Rejected("x"));
        o.event(Event::Close(CloseReason::Logout));
        let mut out = Vec::new();
        o.poll_transmit(&mut out);
        assert_eq!(out, b"* OK hi\r\nab\r\n");
        o.line("more");
        o.poll_transmit(&mut out);
        assert_eq!(out, b"* OK hi\r\nab\r\nmore\r\n");
        assert!(matches!(o.poll_event(), Some(Event::Rejected("x"))));
        assert!(matches!(
            o.poll_event(),
            Some(Event::Close(CloseReason::Logout))
        ));
        assert!(o.poll_event().is_none());

        o.line("greeting");
        o.event(Event::StartTls);
        o.clear();
        let mut out = Vec::new();
        o.poll_transmit(&mut out);
        assert!(out.is_empty() && o.poll_event().is_none());
    }
}
