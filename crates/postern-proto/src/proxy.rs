//! Reading an incoming PROXY protocol header (v1 text or v2 binary), sans I/O: the
//! driver feeds what it has read so far and learns whether the header is complete, who
//! the real client is, and where the protocol's own bytes start. Parsing itself is the
//! proxy-header crate's; this module adds the bounds and the decisions a listener needs.

use std::net::SocketAddr;

use proxy_header::{ParseConfig, ProxyHeader};

/// Largest header accepted: v1 is at most 107 bytes; v2 headers carry TLVs, and
/// balancers send a few hundred bytes at most.
pub const MAX_HEADER: usize = 4096;

/// The longest v1 line, CRLF included (the specification's bound; proxy-header accepts
/// longer `UNKNOWN` lines when complete but refuses their prefixes, so the bound is
/// applied here, the same whichever way the bytes arrive).
pub const MAX_V1: usize = 107;

/// The v2 signature.
pub const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// What the bytes read so far amount to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// Read more.
    Incomplete,
    /// A complete header of `len` bytes; `client` is the announced source address,
    /// `None` for `LOCAL` (a balancer's health check) and `UNKNOWN`.
    Complete {
        /// The real client.
        client: Option<SocketAddr>,
        /// Bytes the header took; what follows is the protocol's.
        len: usize,
    },
    /// Not a valid header, or longer than [`MAX_HEADER`].
    Invalid,
}

/// Reads a header from the start of `buf`.
pub fn parse(buf: &[u8]) -> Header {
    match ProxyHeader::parse(buf, ParseConfig::default()) {
        Ok((_, len)) if buf.starts_with(b"PROXY") && len > MAX_V1 => Header::Invalid,
        Ok((header, len)) if len <= buf.len() => Header::Complete {
            client: header.proxied_address().map(|a| a.source),
            len,
        },
        Ok(_) => Header::Invalid,
        Err(proxy_header::Error::BufferTooShort) if buf.len() < MAX_HEADER => Header::Incomplete,
        Err(_) => Header::Invalid,
    }
}

/// Whether a connection's first bytes look like a PROXY header: a client that sends
/// one to a listener that does not trust it is refused, not parsed.
pub fn looks_like_header(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PROXY ") || bytes.starts_with(V2_SIGNATURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_v2_partial_and_invalid() {
        let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 143\r\na CAPABILITY\r\n";
        assert_eq!(
            parse(v1),
            Header::Complete {
                client: Some("192.0.2.7:40000".parse().unwrap()),
                len: 45
            }
        );
        assert_eq!(parse(&v1[..20]), Header::Incomplete);
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Header::Complete {
                client: None,
                len: 15
            }
        );
        assert_eq!(parse(b"PROXY TCP4 not an address\r\n"), Header::Invalid);
        assert_eq!(parse(b"GET / HTTP/1.0\r\n"), Header::Invalid);
        // v2, LOCAL command, no addresses.
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(
            parse(&v2),
            Header::Complete {
                client: None,
                len: 16
            }
        );
        // An endless v1 line is cut at the bound.
        let mut endless = b"PROXY TCP4 ".to_vec();
        endless.resize(MAX_HEADER + 10, b'1');
        assert_eq!(parse(&endless), Header::Invalid);
        // Found by fuzzing: a complete v1 line over 107 bytes must be refused like its
        // prefixes are.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(108, b'W');
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Header::Invalid);
        assert_eq!(parse(&long[..107]), Header::Invalid);
        assert!(looks_like_header(b"PROXY TCP6"));
        assert!(!looks_like_header(b"a LOGIN"));
    }
}
