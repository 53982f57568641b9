//! Framing before parsing: split the byte stream into whole IMAP messages (a line plus
//! any literals it announces) under hard limits, before any grammar is applied.
//!
//! imap-codec parses a complete message well, but its own fragmentizer keeps its buffer
//! private, and a proxy must hand the bytes that follow a successful login to the relay.
//! So framing lives here: it owns the buffer, enforces the limits before allocating, asks
//! for a `+` continuation only for a synchronizing literal within the limit, and never
//! lets literal data be read as a command.
//!
//! ```text
//!  line ──LF──▶ ends in {N} / {N+} ? ──no──▶ Message(len)
//!                     │ yes
//!                     ▼  N ≤ max_literal (else LiteralTooLarge)
//!            sync and no `+` sent yet ──▶ Continue (caller sends "+ ...")
//!                     ▼
//!            skip N bytes, scan the next line of the same message
//! ```

/// How literals in a line are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A client command: `{N}` needs a continuation request before its data arrives.
    Command,
    /// A server response: the server sends literal data without asking.
    Response,
    /// A bare line (an AUTHENTICATE response): braces mean nothing.
    Line,
}

/// Hard limits for one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message, line bytes plus literal bytes.
    pub max_message: usize,
    /// Largest single literal.
    pub max_literal: usize,
}

/// The result of looking for the next message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete message is at the front of the buffer; see [`Framer::message`].
    Message(usize),
    /// More bytes are needed.
    Incomplete,
    /// A synchronizing literal within the limit was announced: send a continuation
    /// request, then feed more bytes.
    Continue,
    /// The message grew past `max_message` (or no line end came in time). The stream
    /// cannot be resynchronized: answer and close.
    TooLong,
    /// A literal over `max_literal`. For a synchronizing one the client waits for our
    /// answer, so [`Framer::discard_scanned`] drops the announcing line and the session
    /// can go on; a non-synchronizing one is already on its way and forces a close.
    LiteralTooLarge {
        /// Whether the literal was synchronizing.
        sync: bool,
    },
}

/// The buffer and scanning state for one direction of an IMAP stream.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// Bytes of the current message already scanned (complete lines and literal data).
    scanned: usize,
    /// Literal bytes still to come before the current message's next line.
    literal_left: usize,
    /// Offset (in `buf`) of the literal data for which a continuation was requested.
    continued_at: Option<usize>,
}

impl Framer {
    /// Creates an empty framer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes. The caller bounds how much it feeds between calls to
    /// [`Framer::poll`]; `poll` reports [`Frame::TooLong`] as soon as a message exceeds
    /// its limit, so the buffer never holds more than one read beyond the limit.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held, complete or not.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Looks for the next complete message.
    pub fn poll(&mut self, mode: Mode, limits: Limits) -> Frame {
        loop {
            if self.literal_left > 0 {
                let avail = self.buf.len().saturating_sub(self.scanned);
                let take = avail.min(self.literal_left);
                self.scanned += take;
                self.literal_left -= take;
                if self.literal_left > 0 {
                    return Frame::Incomplete;
                }
            }
            let rest = self.buf.get(self.scanned..).unwrap_or_default();
            let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
                if self.buf.len() > limits.max_message {
                    return Frame::TooLong;
                }
                return Frame::Incomplete;
            };
            let line_end = self.scanned + lf + 1;
            if line_end > limits.max_message {
                return Frame::TooLong;
            }
            let line = rest.get(..lf).unwrap_or_default();
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let literal = match mode {
                Mode::Line => None,
                Mode::Command | Mode::Response => literal_header(line),
            };
            let Some(header) = literal else {
                return Frame::Message(line_end);
            };
            self.scanned = line_end;
            let Some(len) = header.len.filter(|&n| n <= limits.max_literal) else {
                return Frame::LiteralTooLarge {
                    sync: header.sync && mode == Mode::Command,
                };
            };
            if line_end.saturating_add(len) > limits.max_message {
                return Frame::LiteralTooLarge {
                    sync: header.sync && mode == Mode::Command,
                };
            }
            self.literal_left = len;
            if mode == Mode::Command && header.sync && self.continued_at != Some(line_end) {
                self.continued_at = Some(line_end);
                return Frame::Continue;
            }
        }
    }

    /// The bytes of a message reported by [`Frame::Message`].
    pub fn message(&self, len: usize) -> &[u8] {
        self.buf.get(..len).unwrap_or_default()
    }

    /// Drops a processed message from the front of the buffer.
    pub fn consume(&mut self, len: usize) {
        let len = len.min(self.buf.len());
        self.buf.drain(..len);
        self.reset_scan();
    }

    /// Drops everything scanned so far (the line that announced a rejected
    /// synchronizing literal, and any earlier part of the same message).
    pub fn discard_scanned(&mut self) {
        let n = self.scanned;
        self.consume(n);
    }

    /// Drops every buffered byte (after STARTTLS, nothing sent in plaintext may survive).
    pub fn clear(&mut self) {
        self.buf = Vec::new();
        self.reset_scan();
    }

    /// Returns every buffered byte, for the hand-off to the relay.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    fn reset_scan(&mut self) {
        self.scanned = 0;
        self.literal_left = 0;
        self.continued_at = None;
    }
}

struct LiteralHeader {
    /// `None` when the digits overflow: always over any limit.
    len: Option<usize>,
    sync: bool,
}

/// Recognizes a line that ends with `{N}`, `{N+}` or `{N-}` (RFC 9051 literal, RFC 7888
/// LITERAL+/LITERAL-), optionally preceded by `~` (RFC 3516 literal8).
fn literal_header(line: &[u8]) -> Option<LiteralHeader> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let body = inner.get(open + 1..)?;
    let (digits, sync) = match body.last() {
        Some(b'+') | Some(b'-') => (body.get(..body.len() - 1)?, false),
        _ => (body, true),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Checked arithmetic: a client may announce {99999999999999999999}.
    let len = digits.iter().try_fold(0usize, |acc, &d| {
        acc.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    });
    Some(LiteralHeader { len, sync })
}

/// The tag of a message, when its first word is a valid tag: used to answer a command
/// that failed to parse. Anything else is answered with `*`.
pub fn tag_of(message: &[u8]) -> Option<&str> {
    let end = message
        .iter()
        .position(|&b| b == b' ' || b == b'\r' || b == b'\n')
        .unwrap_or(message.len());
    let tag = message.get(..end)?;
    let valid = !tag.is_empty()
        && tag.len() <= MAX_TAG
        && tag.iter().all(|&b| is_astring_char(b) && b != b'+');
    if valid {
        std::str::from_utf8(tag).ok()
    } else {
        None
    }
}

/// Whether a message (or the start of one) is `<tag> NAME` followed by a space, a
/// parenthesis or the line end, the name in any case.
pub fn is_command(message: &[u8], name: &[u8]) -> bool {
    let Some(tag) = tag_of(message) else {
        return false;
    };
    let rest = message.get(tag.len()..).unwrap_or_default();
    let Some(rest) = rest.strip_prefix(b" ") else {
        return false;
    };
    rest.get(..name.len())
        .is_some_and(|word| word.eq_ignore_ascii_case(name))
        && matches!(rest.get(name.len()), Some(b' ' | b'(' | b'\r' | b'\n'))
}

/// Longest tag echoed back. RFC 9051 sets no limit; echoing an unbounded tag would let
/// a client make every error reply as long as its command.
const MAX_TAG: usize = 64;

/// RFC 9051 ASTRING-CHAR: ATOM-CHAR or `]`.
fn is_astring_char(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_message: 100,
        max_literal: 20,
    };

    fn framer(bytes: &[u8]) -> Framer {
        let mut f = Framer::new();
        f.push(bytes);
        f
    }

    #[test]
    fn plain_lines_and_pipelining() {
        let mut f = framer(b"a1 NOOP\r\na2 CAP");
        assert_eq!(f.poll(Mode::Command, L), Frame::Message(9));
        assert_eq!(f.message(9), b"a1 NOOP\r\n");
        f.consume(9);
        assert_eq!(f.poll(Mode::Command, L), Frame::Incomplete);
        f.push(b"ABILITY\n");
        assert_eq!(f.poll(Mode::Command, L), Frame::Message(14));
    }

    #[test]
    fn sync_literal_asks_once_then_completes() {
        let mut f = framer(b"a LOGIN {5}\r\n");
        assert_eq!(f.poll(Mode::Command, L), Frame::Continue);
        assert_eq!(f.poll(Mode::Command, L), Frame::Incomplete);
        f.push(b"ali");
        assert_eq!(f.poll(Mode::Command, L), Frame::Incomplete);
        f.push(b"ce {2}\r\n");
        assert_eq!(f.poll(Mode::Command, L), Frame::Continue);
        f.push(b"pw\r\n");
        let Frame::Message(n) = f.poll(Mode::Command, L) else {
            panic!()
        };
        assert_eq!(f.message(n), b"a LOGIN {5}\r\nalice {2}\r\npw\r\n");
    }

    #[test]
    fn literal_data_is_never_a_line() {
        // The literal holds a line break and something that looks like a command.
        let mut f = framer(b"a LOGIN {12+}\r\nx\r\nb LOGOUT \"p\"\r\n");
        let Frame::Message(n) = f.poll(Mode::Command, L) else {
            panic!()
        };
        assert_eq!(n, f.buffered());
    }

    #[test]
    fn limits() {
        assert_eq!(
            framer(b"a LOGIN {21}\r\n").poll(Mode::Command, L),
            Frame::LiteralTooLarge { sync: true }
        );
        assert_eq!(
            framer(b"a LOGIN {21+}\r\n").poll(Mode::Command, L),
            Frame::LiteralTooLarge { sync: false }
        );
        assert_eq!(
            framer(b"a LOGIN {99999999999999999999999}\r\n").poll(Mode::Command, L),
            Frame::LiteralTooLarge { sync: true }
        );
        assert_eq!(framer(&[b'a'; 101]).poll(Mode::Command, L), Frame::TooLong);
        let mut long = vec![b'a'; 100];
        long.extend_from_slice(b"\r\n");
        assert_eq!(framer(&long).poll(Mode::Command, L), Frame::TooLong);
        // literal within its own limit, but the message as a whole is too long
        let mut f = framer(&[b'x'; 80]);
        f.push(b" {20}\r\n");
        assert_eq!(
            f.poll(Mode::Command, L),
            Frame::LiteralTooLarge { sync: true }
        );
    }

    #[test]
    fn rejected_sync_literal_can_be_skipped() {
        let mut f = framer(b"a LOGIN {500}\r\nb NOOP\r\n");
        assert_eq!(
            f.poll(Mode::Command, L),
            Frame::LiteralTooLarge { sync: true }
        );
        f.discard_scanned();
        assert_eq!(f.poll(Mode::Command, L), Frame::Message(8));
    }

    #[test]
    fn line_mode_ignores_braces() {
        assert_eq!(framer(b"{5}\r\n").poll(Mode::Line, L), Frame::Message(5));
        assert_eq!(
            framer(b"* 1 FETCH (BODY {3}\r\nabc)\r\n").poll(Mode::Response, L),
            Frame::Message(27)
        );
    }

    #[test]
    fn tags() {
        assert!(is_command(b"a1 ID (\"name\" \"x\")\r\n", b"ID"));
        assert!(is_command(b"a1 id NIL\r\n", b"ID"));
        assert!(is_command(b"a1 ID(", b"ID"));
        assert!(!is_command(b"a1 IDLE\r\n", b"ID"));
        assert!(!is_command(b"a1 ID", b"ID"));
        assert!(!is_command(b"a1 LOGIN ID x\r\n", b"ID"));
        assert!(!is_command(b"* ID (\r\n", b"ID"));
        assert_eq!(tag_of(b"a1 NOOP\r\n"), Some("a1"));
        assert_eq!(tag_of(b"a1\r\n"), Some("a1"));
        assert_eq!(tag_of(b"* NOOP"), None);
        assert_eq!(tag_of(b"a+b NOOP"), None);
        assert_eq!(tag_of(b" NOOP"), None);
        assert_eq!(tag_of(&[b'a'; 65]), None);
    }
}
