//! SMTP replies (RFC 5321 §4.2): reading the backend's, checking the ones we relay.
//!
//! ```text
//!   Reply-line = *( Reply-code "-" [ textstring ] CRLF )
//!                   Reply-code [ SP textstring ] CRLF
//! ```
//!
//! Backend replies are framed here by hand rather than with smtp-proto's
//! `ResponseReceiver`: a proxy relays them byte for byte (the client must see the
//! backend's own text and enhanced codes), and needs the raw EHLO lines, which that
//! receiver folds into one string and its `EhloResponse` partly drops (XCLIENT).

use postern_proto::Reply;
use postern_proto::lines::{Line, LineBuf};

/// Longest backend reply line we accept. RFC 5321 §4.5.3.1.5 says 512; real servers
/// stay far below 4 KiB.
pub(crate) const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one reply (an EHLO reply has about 15).
pub(crate) const MAX_REPLY_LINES: usize = 100;

/// One complete reply, every line normalized to end in CRLF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BackendReply {
    /// The three-digit code shared by every line.
    pub(crate) code: u16,
    /// All lines, CRLF included.
    pub(crate) bytes: Vec<u8>,
}

impl BackendReply {
    /// The first digit: 2 success, 3 intermediate, 4 temporary, 5 permanent.
    pub(crate) fn class(&self) -> u16 {
        self.code / 100
    }

    pub(crate) fn is_success(&self) -> bool {
        self.class() == 2
    }

    /// The text of each line, after `ddd-` / `ddd `, without CRLF.
    pub(crate) fn texts(&self) -> impl Iterator<Item = &[u8]> {
        self.bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                l.get(4..).unwrap_or_default()
            })
    }

    /// As a [`Reply`]: earlier lines in `preamble`, the final line in `text`.
    pub(crate) fn into_reply(self) -> Reply {
        let body = self.bytes.strip_suffix(b"\r\n").unwrap_or(&self.bytes);
        match body.iter().rposition(|&b| b == b'\n') {
            Some(i) => Reply {
                preamble: body.get(..=i).unwrap_or_default().to_vec(),
                text: body.get(i + 1..).unwrap_or_default().to_vec(),
            },
            None => Reply {
                preamble: Vec::new(),
                text: body.to_vec(),
            },
        }
    }
}

/// What [`ReplyReader::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Read {
    Reply(BackendReply),
    Incomplete,
    /// Not SMTP, or over a limit: the backend cannot be talked to any more.
    Invalid,
}

/// Cuts backend bytes into complete replies.
#[derive(Debug, Default)]
pub(crate) struct ReplyReader {
    buf: LineBuf,
    partial: Option<BackendReply>,
    lines: usize,
}

impl ReplyReader {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.push(bytes);
    }

    /// Bytes not yet consumed as part of a reply (after the last complete one).
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        let mut rest = self.partial.map(|p| p.bytes).unwrap_or_default();
        rest.extend_from_slice(&self.buf.into_bytes());
        rest
    }

    pub(crate) fn buffered(&self) -> usize {
        self.buf.len() + self.partial.as_ref().map_or(0, |p| p.bytes.len())
    }

    pub(crate) fn next(&mut self) -> Read {
        loop {
            let len = match self.buf.poll(MAX_REPLY_LINE) {
                Line::Complete(len) => len,
                Line::Incomplete => return Read::Incomplete,
                Line::TooLong => return Read::Invalid,
            };
            let Some((code, last)) = parse_line(self.buf.line(len)) else {
                return Read::Invalid;
            };
            let line = self.buf.line(len).to_vec();
            self.buf.consume(len);
            let partial = self.partial.get_or_insert_with(|| BackendReply {
                code,
                bytes: Vec::new(),
            });
            if partial.code != code {
                return Read::Invalid;
            }
            partial.bytes.extend_from_slice(&line);
            partial.bytes.extend_from_slice(b"\r\n");
            self.lines += 1;
            if last {
                self.lines = 0;
                return match self.partial.take() {
                    Some(reply) => Read::Reply(reply),
                    None => Read::Invalid,
                };
            }
            if self.lines >= MAX_REPLY_LINES {
                return Read::Invalid;
            }
        }
    }
}

/// Checks one reply line (without CRLF): `ddd`, `ddd text` or `ddd-text`, codes
/// 200–599, no control characters but TAB. Returns the code and whether it is the last
/// line of its reply.
pub(crate) fn parse_line(line: &[u8]) -> Option<(u16, bool)> {
    let (digits, rest) = line.split_at_checked(3)?;
    let mut code = 0u16;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        code = code * 10 + u16::from(d - b'0');
    }
    if !(200..=599).contains(&code) {
        return None;
    }
    let last = match rest.first() {
        None | Some(b' ') => true,
        Some(b'-') => false,
        Some(_) => return None,
    };
    if rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return None;
    }
    Some((code, last))
}

/// Checks a [`Reply`] before it is sent to a client: well-formed lines whose code's
/// first digit is one of `classes`, `-` on every line but the last. A reply that fails
/// is replaced by the caller's own text, so a broken verdict cannot inject lines.
pub(crate) fn valid_reply(reply: &Reply, classes: &[u8]) -> bool {
    let Some(first) = reply.text.first() else {
        return false;
    };
    if !classes.contains(first) {
        return false;
    }
    let Some((code, true)) = parse_line(&reply.text) else {
        return false;
    };
    reply.preamble.split_inclusive(|&b| b == b'\n').all(|l| {
        l.strip_suffix(b"\r\n")
            .is_some_and(|l| parse_line(l) == Some((code, false)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8]) -> Vec<Read> {
        let mut r = ReplyReader::default();
        r.push(input);
        let mut out = vec![];
        loop {
            match r.next() {
                Read::Incomplete => return out,
                other => {
                    let stop = other == Read::Invalid;
                    out.push(other);
                    if stop {
                        return out;
                    }
                }
            }
        }
    }

    #[test]
    fn multi_line_replies_split_anywhere() {
        let input = b"250-mx.example\r\n250-PIPELINING\n250 XCLIENT NAME ADDR\r\n220 ok\r\n";
        for split in 0..input.len() {
            let mut r = ReplyReader::default();
            let mut got = vec![];
            for part in [&input[..split], &input[split..]] {
                r.push(part);
                while let Read::Reply(rep) = r.next() {
                    got.push(rep);
                }
            }
            assert_eq!(got.len(), 2, "split {split}");
            assert_eq!(got[0].code, 250);
            assert_eq!(
                got[0].bytes,
                b"250-mx.example\r\n250-PIPELINING\r\n250 XCLIENT NAME ADDR\r\n"
            );
            let texts: Vec<_> = got[0].texts().collect();
            assert_eq!(
                texts,
                [&b"mx.example"[..], b"PIPELINING", b"XCLIENT NAME ADDR"]
            );
            assert_eq!(got[1].bytes, b"220 ok\r\n");
        }
    }

    #[test]
    fn invalid_replies() {
        for bad in [
            &b"25 short\r\n"[..],
            b"abc nope\r\n",
            b"250_x\r\n",
            b"250-a\r\n251 b\r\n",
            b"150 not smtp\r\n",
            b"250 nul\0\r\n",
        ] {
            assert_eq!(read_all(bad).last(), Some(&Read::Invalid), "{bad:?}");
        }
        let long = [b"250-x\r\n".repeat(MAX_REPLY_LINES)].concat();
        assert_eq!(read_all(&long).last(), Some(&Read::Invalid));
        assert_eq!(
            read_all(&[b'2'; MAX_REPLY_LINE + 1]).last(),
            Some(&Read::Invalid)
        );
        assert_eq!(read_all(b"250\r\n").len(), 1);
    }

    #[test]
    fn into_reply_and_validation() {
        let r = BackendReply {
            code: 535,
            bytes: b"535-5.7.8 one\r\n535 5.7.8 two\r\n".to_vec(),
        }
        .into_reply();
        assert_eq!(r.preamble, b"535-5.7.8 one\r\n");
        assert_eq!(r.text, b"535 5.7.8 two");
        assert!(valid_reply(&r, b"5"));
        assert!(!valid_reply(&r, b"2"));
        let bad = Reply {
            preamble: vec![],
            text: b"235 ok\r\n250 injected".to_vec(),
        };
        assert!(!valid_reply(&bad, b"2"));
        let bad = Reply {
            preamble: b"235 not-a-continuation\r\n".to_vec(),
            text: b"235 ok".to_vec(),
        };
        assert!(!valid_reply(&bad, b"2"));
        assert!(!valid_reply(&Reply::default(), b"2"));
    }
}
