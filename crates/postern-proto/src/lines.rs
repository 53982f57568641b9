//! Bounded line framing for the line protocols (POP3, SMTP, LMTP, and backend answers).
//!
//! Lines end with LF; a CR before it is stripped. A line longer than the limit cannot be
//! resynchronized safely (the rest of it could look like a command), so the caller is
//! told, and the bytes up to the next LF are discarded when it asks to skip.

/// The result of looking for the next line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line occupies the first `len` bytes of the buffer (terminator
    /// included); [`LineBuf::line`] gives its content without CRLF.
    Complete(usize),
    /// More bytes are needed.
    Incomplete,
    /// The line is longer than the limit.
    TooLong,
}

/// A buffer of received bytes, cut into lines under a length limit.
#[derive(Debug, Default)]
pub struct LineBuf {
    buf: Vec<u8>,
    /// Bytes already searched for LF, so a slow trickle is not rescanned quadratically.
    scanned: usize,
}

impl LineBuf {
    /// Creates an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Looks for the next line of at most `max` bytes (terminator included).
    pub fn poll(&mut self, max: usize) -> Line {
        let from = self.scanned.min(self.buf.len());
        match self
            .buf
            .get(from..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        {
            Some(i) => {
                let len = from + i + 1;
                if len > max {
                    Line::TooLong
                } else {
                    Line::Complete(len)
                }
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > max {
                    Line::TooLong
                } else {
                    Line::Incomplete
                }
            }
        }
    }

    /// The content of a line reported by [`Line::Complete`], without CR LF.
    pub fn line(&self, len: usize) -> &[u8] {
        trim_eol(self.buf.get(..len).unwrap_or_default())
    }

    /// The raw bytes of a line reported by [`Line::Complete`], terminator included.
    pub fn raw(&self, len: usize) -> &[u8] {
        self.buf.get(..len).unwrap_or_default()
    }

    /// Drops a processed line from the front of the buffer.
    pub fn consume(&mut self, len: usize) {
        let len = len.min(self.buf.len());
        self.buf.drain(..len);
        self.scanned = 0;
    }

    /// Drops every buffered byte (after STARTTLS / STLS nothing sent in plaintext may
    /// survive). Returns how many bytes were dropped, for the log.
    pub fn clear(&mut self) -> usize {
        let n = self.buf.len();
        self.buf = Vec::new();
        self.scanned = 0;
        n
    }

    /// Returns every buffered byte, for the hand-off to the relay.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// A line without its LF and the CR before it, as [`LineBuf::line`] gives it, for
/// callers that had to keep the terminator (IMAP's framer, to tell a line from the
/// literal it announces; SMTP, which parses commands with their CRLF).
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_pushes() {
        let mut b = LineBuf::new();
        b.push(b"USER al");
        assert_eq!(b.poll(100), Line::Incomplete);
        b.push(b"ice\r\nPASS x\nNO");
        assert_eq!(b.poll(100), Line::Complete(12));
        assert_eq!(b.line(12), b"USER alice");
        assert_eq!(b.raw(12), b"USER alice\r\n");
        b.consume(12);
        assert_eq!(b.poll(100), Line::Complete(7));
        assert_eq!(b.line(7), b"PASS x");
        b.consume(7);
        assert_eq!(b.poll(100), Line::Incomplete);
        assert_eq!(b.into_bytes(), b"NO");
    }

    #[test]
    fn limits() {
        let mut b = LineBuf::new();
        b.push(&[b'x'; 11]);
        assert_eq!(b.poll(10), Line::TooLong);
        let mut b = LineBuf::new();
        b.push(b"123456789\r\n");
        assert_eq!(b.poll(10), Line::TooLong);
        assert_eq!(b.poll(11), Line::Complete(11));
        assert_eq!(b.clear(), 11);
        assert!(b.is_empty());
    }
}
