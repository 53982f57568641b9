//! Streaming the DATA body (RFC 5321 §4.1.1.4, §4.5.2) without holding it.
//!
//! The body is passed on as it arrives, still dot-stuffed (the backend removes the
//! stuffing); the scanner only has to find the end, a line that is exactly `.`, even
//! when it is split across reads.
//!
//! SMTP smuggling (CVE-2023-51764 and friends) lives in the gap between what one hop
//! and the next take for the end of data. Postern closes the gap by making the backend
//! see exactly the lines Postern saw: every LF ends a line, and a bare LF is sent as
//! CRLF. So `\n.\n`, `\n.\r\n` and `\r\n.\n` end the data here *and* arrive at the
//! backend as `\r\n.\r\n`; nothing after them can be read by the backend as a body.
//! A bare CR is ordinary data for Postern, Postfix and Dovecot alike and passes as is.

/// Where the scanner stands in the current line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Pos {
    /// At the start of a line.
    #[default]
    Start,
    /// The line so far is `.`.
    Dot,
    /// The line so far is `.` CR.
    DotCr,
    /// Anywhere else.
    Text,
}

/// Finds the end of a DATA body across reads, normalizing line ends.
#[derive(Clone, Debug, Default)]
pub(crate) struct DotScanner {
    pos: Pos,
    /// The last byte passed on was CR.
    cr: bool,
}

impl DotScanner {
    /// Appends `input` (normalized) to `out` up to and including the end-of-data line.
    /// Returns the number of input bytes consumed and whether the end was found; when
    /// it was, the bytes after it are commands again and are not consumed.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        out.reserve(input.len());
        let mut i = 0;
        while let Some(rest) = input.get(i..) {
            if rest.is_empty() {
                break;
            }
            if self.pos == Pos::Text {
                // Fast path: copy up to the next LF in one go.
                let run = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
                let chunk = rest.get(..run).unwrap_or_default();
                if let Some(&last) = chunk.last() {
                    out.extend_from_slice(chunk);
                    self.cr = last == b'\r';
                }
                i += run;
                if run == rest.len() {
                    break;
                }
            }
            let Some(&b) = input.get(i) else { break };
            i += 1;
            if b == b'\n' {
                if !self.cr {
                    out.push(b'\r');
                }
                out.push(b'\n');
                self.cr = false;
                let end = matches!(self.pos, Pos::Dot | Pos::DotCr);
                self.pos = Pos::Start;
                if end {
                    return (i, true);
                }
                continue;
            }
            out.push(b);
            self.cr = b == b'\r';
            self.pos = match (self.pos, b) {
                (Pos::Start, b'.') => Pos::Dot,
                (Pos::Dot, b'\r') => Pos::DotCr,
                _ => Pos::Text,
            };
        }
        (input.len(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(parts: &[&[u8]]) -> (Vec<u8>, Option<usize>) {
        let mut s = DotScanner::default();
        let mut out = vec![];
        let mut total = 0;
        for p in parts {
            let (n, end) = s.feed(p, &mut out);
            if end {
                return (out, Some(total + n));
            }
            total += n;
        }
        (out, None)
    }

    #[test]
    fn end_found_across_every_split() {
        let body = b"Subject: x\r\n\r\n..stuffed\r\n.\r\nQUIT\r\n";
        for a in 0..body.len() {
            for b in a..body.len() {
                let (out, end) = run(&[&body[..a], &body[a..b], &body[b..]]);
                assert_eq!(out, &body[..body.len() - 6], "{a} {b}");
                assert_eq!(end, Some(body.len() - 6));
            }
        }
    }

    #[test]
    fn not_an_end() {
        for body in [
            &b"a\r\n..\r\n"[..],
            b"a\r\n .\r\n",
            b"a.\r\n",
            b"a\r\n.x\r\n",
            b"a\r\n.\r\r\n",
            b"a\r.\r\n",
        ] {
            let (out, end) = run(&[body]);
            assert_eq!(end, None, "{body:?}");
            assert_eq!(out, body);
        }
    }

    #[test]
    fn bare_lf_is_normalized_and_ends_lines() {
        let (out, end) = run(&[b"a\nb\r\n.\nMAIL FROM:<x@y>\r\n"]);
        assert_eq!(out, b"a\r\nb\r\n.\r\n");
        assert_eq!(end, Some(7));
        // The smuggling shapes all end here and reach the backend as CRLF.CRLF.
        for body in [&b"x\n.\n"[..], b"x\r\n.\n", b"x\n.\r\n"] {
            let (out, end) = run(&[body]);
            assert_eq!(
                (out.as_slice(), end),
                (&b"x\r\n.\r\n"[..], Some(body.len()))
            );
        }
        // A body that starts with the end (empty message).
        assert_eq!(run(&[b".\r\n"]), (b".\r\n".to_vec(), Some(3)));
    }
}
