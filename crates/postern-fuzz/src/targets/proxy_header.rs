//! The PROXY protocol header reader on arbitrary bytes fed in arbitrary pieces: it must
//! never panic, never claim more bytes than it was given, give the same answer however
//! the bytes arrive, and stop asking for more at its bound.

use postern_proto::proxy::{self, Header, MAX_HEADER};

/// One fuzz input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    let whole = proxy::parse(data);
    match whole {
        Header::Complete { len, .. } => assert!(len <= data.len()),
        Header::Incomplete => assert!(data.len() < MAX_HEADER),
        Header::Invalid => {}
    }
    // Fed as a driver would, growing: the first non-Incomplete answer is final, and a
    // complete header found on a prefix is the same header.
    for end in 0..=data.len().min(MAX_HEADER + 1) {
        let Some(prefix) = data.get(..end) else {
            break;
        };
        match proxy::parse(prefix) {
            Header::Incomplete => continue,
            Header::Complete { client, len } => {
                assert_eq!(proxy::parse(data), Header::Complete { client, len });
                break;
            }
            Header::Invalid => {
                assert_eq!(whole, Header::Invalid);
                break;
            }
        }
    }
}
