//! Reply slots: one per client command, released strictly in command order.
//!
//! A pipelining client (RFC 2920 §3.1) reads replies in the order it sent its commands.
//! Some are answered by Postern at once (a local 452, a syntax error), some by the
//! backend later, and one (RCPT) waits for routing. Each command takes a slot when it is
//! read; the slot is filled when its answer is known; [`Slots::drain`] sends everything
//! from the front up to the first slot still waiting. A slot may receive several replies
//! (LMTP: one per recipient after the data); those already in are sent as they come.

use std::collections::VecDeque;

/// Identifies a slot; increasing over the session.
pub(super) type Seq = u64;

#[derive(Debug, Default)]
struct Slot {
    bytes: Vec<u8>,
    done: bool,
}

#[derive(Debug, Default)]
pub(super) struct Slots {
    q: VecDeque<Slot>,
    /// The sequence number of the front slot.
    base: Seq,
}

impl Slots {
    /// Slots not yet fully sent.
    pub(super) fn len(&self) -> usize {
        self.q.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    /// A slot already answered.
    pub(super) fn ready(&mut self, reply: &[u8]) -> Seq {
        self.push(Slot {
            bytes: reply.to_vec(),
            done: true,
        })
    }

    /// A slot whose answer comes later.
    pub(super) fn pending(&mut self) -> Seq {
        self.push(Slot::default())
    }

    fn push(&mut self, slot: Slot) -> Seq {
        let seq = self.base + self.q.len() as Seq;
        self.q.push_back(slot);
        seq
    }

    /// Adds a reply to a slot; `done` closes it. Unknown slots (already dropped after a
    /// fatal error) are ignored.
    pub(super) fn fill(&mut self, seq: Seq, reply: &[u8], done: bool) {
        let Some(i) = seq.checked_sub(self.base) else {
            return;
        };
        let Some(slot) = usize::try_from(i).ok().and_then(|i| self.q.get_mut(i)) else {
            return;
        };
        slot.bytes.extend_from_slice(reply);
        slot.done |= done;
    }

    /// Appends every reply that may be sent now, in order.
    pub(super) fn drain(&mut self, out: &mut Vec<u8>) {
        while let Some(front) = self.q.front_mut() {
            out.append(&mut front.bytes);
            if !front.done {
                return;
            }
            self.q.pop_front();
            self.base += 1;
        }
    }

    /// After a fatal error: keeps what is answered, ends the first waiting slot with
    /// `last` (if any) and drops the rest, whose answers will never come.
    pub(super) fn cut(&mut self, last: Option<&[u8]>) {
        let keep = self.q.iter().position(|s| !s.done);
        match keep {
            Some(i) => {
                self.q.truncate(i + 1);
                if let Some(slot) = self.q.get_mut(i) {
                    slot.bytes.extend_from_slice(last.unwrap_or_default());
                    slot.done = true;
                }
            }
            None => {
                if let Some(last) = last {
                    self.ready(last);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_in_order() {
        let mut s = Slots::default();
        let a = s.ready(b"A ");
        let b = s.pending();
        let c = s.ready(b"C ");
        assert_eq!((a, b, c), (0, 1, 2));
        let mut out = vec![];
        s.drain(&mut out);
        assert_eq!(out, b"A ");
        s.fill(b, b"B1 ", false);
        s.drain(&mut out);
        assert_eq!(out, b"A B1 ");
        s.fill(b, b"B2 ", true);
        s.drain(&mut out);
        assert_eq!(out, b"A B1 B2 C ");
        assert!(s.is_empty());
        s.fill(b, b"late", true);
        let d = s.pending();
        assert_eq!(d, 3);
        s.pending();
        s.cut(Some(b"421 "));
        s.drain(&mut out);
        assert_eq!(out, b"A B1 B2 C 421 ");
        assert_eq!(s.len(), 0);
    }
}
