//! nginx auth_http: the response reader on arbitrary bytes (with a round trip through
//! `Response::encode` and a check that any prefix of a complete answer reads as
//! incomplete or the same answer), `decide` for every protocol, and the request
//! encoder, which must never let a value start a new header line.

use std::net::{IpAddr, Ipv4Addr};

use postern_auth::auth_http::{
    AuthMethod, AuthProtocol, MAX_RESPONSE_HEADER, Parsed, Request, TlsInfo, decide,
    parse_response_with_limit,
};
use postern_proto::Secret;

/// One fuzz input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    for limit in [1024, MAX_RESPONSE_HEADER] {
        let Ok(Parsed::Complete(response)) = parse_response_with_limit(data, limit) else {
            continue;
        };
        let encoded = response.encode();
        let again = parse_response_with_limit(&encoded, usize::MAX);
        assert_eq!(again, Ok(Parsed::Complete(response.clone())));

        let cut = usize::from(data.first().copied().unwrap_or(0)) * data.len() / 256;
        match parse_response_with_limit(&data[..cut], limit) {
            Ok(Parsed::Incomplete) => {}
            Ok(Parsed::Complete(early)) => assert_eq!(early, response),
            Err(e) => panic!("a prefix of a valid answer failed: {e}"),
        }

        for protocol in [AuthProtocol::Imap, AuthProtocol::Pop3, AuthProtocol::Smtp] {
            let _ = decide(response.clone(), protocol);
        }
    }

    // The same bytes as request fields, split on 0xFF.
    let mut fields = data
        .split(|&b| b == 0xff)
        .map(|f| String::from_utf8_lossy(f).into_owned());
    let mut next = || fields.next().unwrap_or_default();
    let methods = [
        AuthMethod::Plain,
        AuthMethod::Apop,
        AuthMethod::CramMd5,
        AuthMethod::External,
        AuthMethod::None,
    ];
    let method = methods[usize::from(data.first().copied().unwrap_or(0)) % methods.len()];
    let user = next();
    let pass = next();
    let mut request = Request::new(
        method,
        AuthProtocol::Smtp,
        user,
        Secret::new(pass.into_bytes()),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    );
    request.salt = Some(next());
    request.client_host = Some(next());
    request.smtp.helo = next();
    request.smtp.from = next();
    request.smtp.to = next();
    request.tls = Some(TlsInfo {
        protocol: next(),
        cipher: next(),
        client_cert: None,
    });
    request.headers.push((next(), next()));
    let (uri, host) = (next(), next());
    let out = request.encode(&uri, &host);

    // Every line ends in CRLF, no CR or LF hides inside one, and exactly one blank
    // line ends the request.
    assert!(out.ends_with(b"\r\n\r\n"));
    let body = &out[..out.len() - 2];
    for line in body.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        assert_eq!(line.last(), Some(&b'\r'));
        assert!(!line[..line.len() - 1].contains(&b'\r'));
        assert!(!line[..line.len() - 1].is_empty());
    }
}
