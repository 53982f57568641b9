//! EHLO replies (RFC 5321 §4.1.1.1 and §2.2, service extensions) and the rules for
//! what Postern advertises.
//!
//! Postern answers the client's EHLO itself, before it knows (or, on port 25, has even
//! chosen) the backend. The list it shows must be what the client can really use, so
//! the driver probes a backend's EHLO (see [`crate::Probe`]) and passes the result
//! through [`advertised_extensions`]. The rules, in order:
//!
//! 1. Only extensions on an allowlist pass: those that are MAIL/RCPT parameters or
//!    data-phase features a proxy forwards unchanged and the relay machine understands:
//!    `8BITMIME`, `BINARYMIME` (only together with `CHUNKING`, RFC 3030 §3), `CHUNKING`,
//!    `DSN`, `ENHANCEDSTATUSCODES`, `PIPELINING`, `SIZE`, `SMTPUTF8`, `DELIVERBY`,
//!    `MT-PRIORITY`, `FUTURERELEASE`, `NO-SOLICITING`, `MTRK`, `RRVS`, `CONPERM`,
//!    `CONNEG`.
//! 2. Everything else is dropped, in particular:
//!    - `STARTTLS` and `AUTH` (and the old `AUTH=` form): Postern terminates TLS and
//!      authentication itself and adds its own lines;
//!    - `XCLIENT`, `XFORWARD` and every other `X` extension: they let the sender
//!      claim another client identity (the open-relay and spoofing pitfalls);
//!    - `REQUIRETLS` (RFC 8689): the hop from Postern to the backend is not encrypted
//!      yet, so Postern cannot honour it;
//!    - `ETRN`, `ATRN`, `TURN`, `BURL`, `VRFY`, `EXPN`, `HELP`: queue control, role
//!      reversal, or commands Postern answers itself;
//!    - lines that are not `keyword *(SP param)` in printable ASCII.
//!
//! The same rules apply to submission, MX and LMTP; other protocols get nothing.

use postern_proto::Protocol;

use crate::reply::{BackendReply, Read, ReplyReader};

/// Extensions that pass [`advertised_extensions`].
const ALLOWED: &[&str] = &[
    "8BITMIME",
    "BINARYMIME",
    "CHUNKING",
    "CONNEG",
    "CONPERM",
    "DELIVERBY",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "FUTURERELEASE",
    "MT-PRIORITY",
    "MTRK",
    "NO-SOLICITING",
    "PIPELINING",
    "RRVS",
    "SIZE",
    "SMTPUTF8",
];

/// Longest extension line kept (keyword and parameters).
const MAX_EXTENSION_LINE: usize = 512;

/// The extension lines of one EHLO (or LHLO) reply, greeting line excluded. Each line is
/// `KEYWORD[ param...]`, keyword upper-cased, parameters as the server sent them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    lines: Vec<String>,
}

impl Extensions {
    /// Parses a complete EHLO reply (`250-host\r\n250-EXT\r\n250 EXT\r\n`). Returns
    /// `None` unless the bytes are exactly one well-formed 250 reply. Malformed extension
    /// lines are skipped.
    pub fn parse(reply: &[u8]) -> Option<Self> {
        let mut reader = ReplyReader::default();
        reader.push(reply);
        let Read::Reply(reply) = reader.next() else {
            return None;
        };
        if reply.code != 250 || reader.buffered() != 0 {
            return None;
        }
        Some(Self::from_reply(&reply))
    }

    pub(crate) fn from_reply(reply: &BackendReply) -> Self {
        let lines = reply
            .texts()
            .skip(1)
            .filter_map(normalize_line)
            .collect::<Vec<_>>();
        Self { lines }
    }

    /// Every extension line.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Whether the server listed `keyword` (case-insensitive).
    pub fn has(&self, keyword: &str) -> bool {
        self.params(keyword).is_some()
    }

    /// The parameters of `keyword`, if the server listed it.
    pub fn params(&self, keyword: &str) -> Option<impl Iterator<Item = &str>> {
        self.lines.iter().find_map(|line| {
            let mut words = line.split(' ');
            let kw = words.next()?;
            kw.eq_ignore_ascii_case(keyword).then_some(words)
        })
    }

    /// Whether `AUTH` lists `mechanism`.
    pub fn has_auth(&self, mechanism: &str) -> bool {
        self.params("AUTH")
            .is_some_and(|mut p| p.any(|m| m.eq_ignore_ascii_case(mechanism)))
    }

    /// The lines to advertise to clients of `protocol`; see the module documentation.
    pub fn advertise(&self, protocol: Protocol) -> Vec<String> {
        if !matches!(
            protocol,
            Protocol::Submission | Protocol::Smtp | Protocol::Lmtp
        ) {
            return Vec::new();
        }
        let chunking = self.has("CHUNKING");
        self.lines
            .iter()
            .filter(|line| allowed(line))
            .filter(|line| chunking || keyword(line) != "BINARYMIME")
            .cloned()
            .collect()
    }
}

/// Turns a backend's raw EHLO reply into the extension lines Postern may advertise to
/// clients of `protocol` (without STARTTLS and AUTH, which the machines add themselves).
/// An unparsable reply yields an empty list.
pub fn advertised_extensions(ehlo_reply: &[u8], protocol: Protocol) -> Vec<String> {
    Extensions::parse(ehlo_reply)
        .map(|e| e.advertise(protocol))
        .unwrap_or_default()
}

fn keyword(line: &str) -> &str {
    line.split(' ').next().unwrap_or_default()
}

/// Whether a line of `Options::extensions` may be shown to a client: allowlisted and
/// well-formed. The machines re-check their options with this, so a hand-written
/// configuration cannot advertise XCLIENT either.
pub(crate) fn allowed(line: &str) -> bool {
    normalize_line(line.as_bytes()).is_some_and(|l| ALLOWED.contains(&keyword(&l)))
}

/// `ehlo-keyword *( SP ehlo-param )`, keyword `(ALPHA / DIGIT) *(ALPHA / DIGIT / "-")`,
/// params printable ASCII without SP (RFC 5321 §4.1.1.1). Repeated spaces are folded.
fn normalize_line(line: &[u8]) -> Option<String> {
    if line.len() > MAX_EXTENSION_LINE {
        return None;
    }
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split(' ').filter(|w| !w.is_empty());
    let kw = words.next()?;
    let first = kw.bytes().next()?;
    if !first.is_ascii_alphanumeric() || !kw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    let mut out = kw.to_ascii_uppercase();
    for w in words {
        if !w.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        out.push(' ');
        out.push_str(w);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POSTFIX: &[u8] = b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n\
        250-VRFY\r\n250-ETRN\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN LOGIN\r\n\
        250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n\
        250-XFORWARD NAME ADDR PROTO HELO\r\n250-REQUIRETLS\r\n250-X-EXPS GSSAPI\r\n\
        250 XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n";

    #[test]
    fn postfix_reply_is_filtered() {
        assert_eq!(
            advertised_extensions(POSTFIX, Protocol::Submission),
            [
                "PIPELINING",
                "SIZE 10240000",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "DSN",
                "SMTPUTF8",
                "CHUNKING"
            ]
        );
        assert!(advertised_extensions(POSTFIX, Protocol::Imap).is_empty());
        let e = Extensions::parse(POSTFIX).unwrap();
        assert!(e.has("xclient") && e.has_auth("plain") && !e.has_auth("CRAM-MD5"));
        let attrs: Vec<_> = e.params("XCLIENT").unwrap().collect();
        assert_eq!(attrs[..3], ["NAME", "ADDR", "PROTO"]);
    }

    #[test]
    fn binarymime_needs_chunking_and_garbage_is_dropped() {
        let reply =
            b"250-h\r\n250-BINARYMIME\r\n250-8bitmime\r\n250-b@d\r\n250-=x\r\n250 SIZE  100\r\n";
        assert_eq!(
            advertised_extensions(reply, Protocol::Smtp),
            ["8BITMIME", "SIZE 100"]
        );
        assert!(advertised_extensions(b"554 go away\r\n", Protocol::Smtp).is_empty());
        assert!(advertised_extensions(b"250-h\r\n250 SIZE\x01\r\n", Protocol::Smtp).is_empty());
        assert!(advertised_extensions(b"250 h\r\n250 again\r\n", Protocol::Smtp).is_empty());
        assert!(allowed("PIPELINING") && !allowed("XCLIENT ADDR") && !allowed("STARTTLS"));
    }
}
