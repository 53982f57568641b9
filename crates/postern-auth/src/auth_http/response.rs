//! Reading the auth server's answer the way nginx does
//! (`ngx_mail_auth_http_ignore_status_line`, `_parse_header_line`, `_process_headers`).
//!
//! Hand-written rather than on `httparse`, because nginx's reader is not HTTP's:
//! the status line is optional and ignored, a header name is `[A-Za-z0-9-]` starting
//! with a letter or digit (httparse allows `_`, `!` and the rest of `tchar`), a line
//! without a colon is a header with an empty value (httparse rejects it), and only
//! spaces are trimmed (httparse trims tabs too). Each of those changes which auth
//! server answers log a user in, so the reader copies nginx's state machine instead.

use std::fmt;
use std::net::IpAddr;

use postern_proto::Secret;

/// The default bound on the status line plus headers plus the blank line.
///
/// nginx reads into a fixed 1024-byte buffer and, if the headers do not end in it,
/// stalls until `auth_http_timeout` (60 s). Every answer nginx accepts fits here; the
/// extra room lets an `Auth-Pass` as long as the longest password Postern's front
/// ends accept (16 KiB lines) come back, while keeping one attempt's buffer bounded.
pub const MAX_RESPONSE_HEADER: usize = 16 * 1024 + 1024;

/// The outcome of feeding what has arrived so far to [`parse_response`].
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The blank line ending the headers has not arrived yet: read more (and treat
    /// end of stream as [`Error::Truncated`], see [`parse_response_at_eof`]).
    Incomplete,
    /// The headers are complete; anything after them (the body) is ignored.
    Complete(Response),
}

/// The auth server's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// `Auth-Status: OK` (exactly, case-sensitive as in nginx).
    Ok,
    /// `Auth-Status: WAIT`: ask again after `Auth-Wait` seconds.
    Wait,
    /// Any other `Auth-Status` value, which is the error text for the client, verbatim
    /// (trimmed of spaces, never %-decoded).
    Fail(Vec<u8>),
}

/// A complete, validated answer.
///
/// For [`Status::Ok`] `server` and `port` are always `Some` (a missing or invalid
/// one is an [`Error`]); for the other statuses they are `Some` only if valid, since
/// nginx does not look at them then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// `Auth-Status`.
    pub status: Status,
    /// `Auth-Server`: an IPv4 or IPv6 literal (no brackets, no host names).
    pub server: Option<IpAddr>,
    /// `Auth-Port`: 1 to 65535.
    pub port: Option<u16>,
    /// `Auth-User`: the login to use on the backend instead of the client's.
    pub user: Option<String>,
    /// `Auth-Pass`: the password for the backend login (may be empty).
    pub pass: Option<Secret<Vec<u8>>>,
    /// `Auth-Wait`: seconds. Invalid values are ignored, as nginx does; values beyond
    /// `u32::MAX` saturate.
    pub wait: Option<u32>,
    /// `Auth-Error-Code`: SMTP's code replacing `535 5.7.0`, e.g. `451 4.3.0`.
    pub error_code: Option<String>,
}

impl Response {
    /// The answer as an auth server would send it (`HTTP/1.0 200 OK`, then the
    /// headers nginx reads), for test servers and round-trip checks. Values are
    /// written as they are: one holding CR or LF, or starting or ending with a space,
    /// cannot be carried by this protocol and will not read back the same.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = b"HTTP/1.0 200 OK\r\n".to_vec();
        let mut line = |name: &str, value: &[u8]| {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        match &self.status {
            Status::Ok => line("Auth-Status", b"OK"),
            Status::Wait => line("Auth-Status", b"WAIT"),
            Status::Fail(text) => line("Auth-Status", text),
        }
        if let Some(server) = self.server {
            line("Auth-Server", server.to_string().as_bytes());
        }
        if let Some(port) = self.port {
            line("Auth-Port", port.to_string().as_bytes());
        }
        if let Some(user) = &self.user {
            line("Auth-User", user.as_bytes());
        }
        if let Some(pass) = &self.pass {
            line("Auth-Pass", pass.expose());
        }
        if let Some(wait) = self.wait {
            line("Auth-Wait", wait.to_string().as_bytes());
        }
        if let Some(code) = &self.error_code {
            line("Auth-Error-Code", code.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// Why an answer is unusable. nginx logs these and sends the client its internal
/// error (`* BAD internal server error`, `-ERR internal server error`,
/// `451 4.3.2 Internal server error`) and closes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The headers did not end within the size limit.
    TooLarge,
    /// A byte nginx's header reader rejects (e.g. `_` or a space in a header name, or
    /// a CR not followed by LF).
    InvalidHeader,
    /// The stream ended before the blank line that ends the headers.
    Truncated,
    /// No `Auth-Status` at all (nginx would treat this as `OK`; Postern refuses).
    MissingStatus,
    /// `OK` without a non-empty `Auth-Server` and `Auth-Port`.
    MissingServer,
    /// `Auth-Server` is not an IP literal; carries the value, which is not a secret.
    InvalidServer(String),
    /// `Auth-Port` is not a number from 1 to 65535; carries the value.
    InvalidPort(String),
    /// `Auth-User` is not UTF-8.
    InvalidUser,
    /// `OK` for IMAP or POP3 without `Auth-Pass` (reported by
    /// [`decide`](super::decide), which knows the protocol).
    MissingPass,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooLarge => f.write_str("auth server response headers too large"),
            Error::InvalidHeader => f.write_str("auth server sent invalid header in response"),
            Error::Truncated => f.write_str("auth server closed the connection mid-response"),
            Error::MissingStatus => f.write_str("auth server did not send Auth-Status"),
            Error::MissingServer => f.write_str("auth server did not send server or port"),
            Error::InvalidServer(s) => write!(f, "auth server sent invalid server address: {s:?}"),
            Error::InvalidPort(s) => write!(f, "auth server sent invalid server port: {s:?}"),
            Error::InvalidUser => f.write_str("auth server sent a user name that is not UTF-8"),
            Error::MissingPass => f.write_str("auth server did not send password"),
        }
    }
}

impl std::error::Error for Error {}

/// Parses the answer received so far, with the [`MAX_RESPONSE_HEADER`] limit.
///
/// Call it again with the whole buffer each time more bytes arrive; stop reading and
/// fail once it returns an error. Parsing is linear and bounded by the limit.
pub fn parse_response(bytes: &[u8]) -> Result<Parsed, Error> {
    parse_response_with_limit(bytes, MAX_RESPONSE_HEADER)
}

/// [`parse_response`] for a stream that has ended: [`Parsed::Incomplete`] becomes
/// [`Error::Truncated`].
pub fn parse_response_at_eof(bytes: &[u8]) -> Result<Response, Error> {
    match parse_response(bytes)? {
        Parsed::Complete(response) => Ok(response),
        Parsed::Incomplete => Err(Error::Truncated),
    }
}

/// [`parse_response`] with another bound on the header block (1024 reproduces nginx,
/// except that nginx waits for its timeout where this fails at once).
pub fn parse_response_with_limit(bytes: &[u8], limit: usize) -> Result<Parsed, Error> {
    let window = bytes.get(..limit).unwrap_or(bytes);
    match read_headers(window)? {
        Some(headers) => interpret(&headers).map(Parsed::Complete),
        None if bytes.len() >= limit => Err(Error::TooLarge),
        None => Ok(Parsed::Incomplete),
    }
}

/// Skips an optional `HTTP/...` line: nginx only looks for the `HTTP/` prefix and, if
/// the answer does not start with it, reads headers from the first byte. `None`: not
/// enough bytes to tell.
fn skip_status_line(buf: &[u8]) -> Result<Option<usize>, Error> {
    const PREFIX: &[u8] = b"HTTP/";
    let seen = buf.len().min(PREFIX.len());
    if buf.get(..seen) != PREFIX.get(..seen) {
        return Ok(Some(0));
    }
    if seen < PREFIX.len() {
        return Ok(None);
    }
    let mut cr = false;
    for (i, &b) in buf.iter().enumerate().skip(PREFIX.len()) {
        match (cr, b) {
            (_, b'\n') => return Ok(Some(i + 1)),
            (true, _) => return Err(Error::InvalidHeader),
            (false, b'\r') => cr = true,
            (false, _) => {}
        }
    }
    Ok(None)
}

#[derive(Clone, Copy)]
enum State {
    Start,
    Name,
    SpaceBeforeValue,
    Value,
    SpaceAfterValue,
    AlmostDone,
    HeaderAlmostDone,
}

type Header<'a> = (&'a [u8], &'a [u8]);

/// nginx's header-line state machine over the whole block. `Ok(None)`: the blank
/// line has not arrived.
fn read_headers(buf: &[u8]) -> Result<Option<Vec<Header<'_>>>, Error> {
    let Some(start) = skip_status_line(buf)? else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    let mut state = State::Start;
    let (mut name_start, mut name_end, mut value_start, mut value_end) = (0, 0, 0, 0);

    for (i, &ch) in buf.iter().enumerate().skip(start) {
        state = match state {
            State::Start => match ch {
                b'\r' => State::HeaderAlmostDone,
                b'\n' => return Ok(Some(headers)),
                c if c.is_ascii_alphanumeric() => {
                    name_start = i;
                    State::Name
                }
                _ => return Err(Error::InvalidHeader),
            },
            State::Name => match ch {
                c if c.is_ascii_alphanumeric() || c == b'-' => State::Name,
                b':' => {
                    name_end = i;
                    State::SpaceBeforeValue
                }
                // A name alone on its line is a header with an empty value.
                b'\r' => {
                    (name_end, value_start, value_end) = (i, i, i);
                    State::AlmostDone
                }
                b'\n' => {
                    emit(&mut headers, buf, (name_start, i), (i, i));
                    State::Start
                }
                _ => return Err(Error::InvalidHeader),
            },
            State::SpaceBeforeValue => match ch {
                b' ' => State::SpaceBeforeValue,
                b'\r' => {
                    (value_start, value_end) = (i, i);
                    State::AlmostDone
                }
                b'\n' => {
                    emit(&mut headers, buf, (name_start, name_end), (i, i));
                    State::Start
                }
                _ => {
                    value_start = i;
                    State::Value
                }
            },
            State::Value => match ch {
                b' ' => {
                    value_end = i;
                    State::SpaceAfterValue
                }
                b'\r' => {
                    value_end = i;
                    State::AlmostDone
                }
                b'\n' => {
                    emit(&mut headers, buf, (name_start, name_end), (value_start, i));
                    State::Start
                }
                _ => State::Value,
            },
            State::SpaceAfterValue => match ch {
                b' ' => State::SpaceAfterValue,
                b'\r' => State::AlmostDone,
                b'\n' => {
                    emit(
                        &mut headers,
                        buf,
                        (name_start, name_end),
                        (value_start, value_end),
                    );
                    State::Start
                }
                _ => State::Value,
            },
            State::AlmostDone => match ch {
                b'\n' => {
                    emit(
                        &mut headers,
                        buf,
                        (name_start, name_end),
                        (value_start, value_end),
                    );
                    State::Start
                }
                _ => return Err(Error::InvalidHeader),
            },
            State::HeaderAlmostDone => match ch {
                b'\n' => return Ok(Some(headers)),
                _ => return Err(Error::InvalidHeader),
            },
        };
    }
    Ok(None)
}

fn emit<'a>(
    headers: &mut Vec<Header<'a>>,
    buf: &'a [u8],
    name: (usize, usize),
    value: (usize, usize),
) {
    let name = buf.get(name.0..name.1).unwrap_or_default();
    let value = buf.get(value.0..value.1).unwrap_or_default();
    headers.push((name, value));
}

/// Applies the headers in order, as `ngx_mail_auth_http_process_headers` does: the
/// last value of a header wins, except that any failing `Auth-Status` outranks `OK`
/// and `WAIT` wherever it appears.
fn interpret(headers: &[Header<'_>]) -> Result<Response, Error> {
    let mut fail: Option<&[u8]> = None;
    let (mut ok, mut wait_status) = (false, false);
    let (mut server, mut port): (&[u8], &[u8]) = (b"", b"");
    let mut user = None;
    let mut pass = None;
    let mut wait = None;
    let mut error_code = None;

    for &(name, value) in headers {
        if name.eq_ignore_ascii_case(b"Auth-Status") {
            match value {
                b"OK" => ok = true,
                b"WAIT" => wait_status = true,
                text => fail = Some(text),
            }
        } else if name.eq_ignore_ascii_case(b"Auth-Server") {
            server = value;
        } else if name.eq_ignore_ascii_case(b"Auth-Port") {
            port = value;
        } else if name.eq_ignore_ascii_case(b"Auth-User") {
            user = Some(value);
        } else if name.eq_ignore_ascii_case(b"Auth-Pass") {
            pass = Some(value);
        } else if name.eq_ignore_ascii_case(b"Auth-Wait") {
            if let Some(n) = atoi(value) {
                wait = Some(u32::try_from(n).unwrap_or(u32::MAX));
            }
        } else if name.eq_ignore_ascii_case(b"Auth-Error-Code") {
            error_code = Some(String::from_utf8_lossy(value).into_owned());
        }
    }

    let status = match (fail, wait_status, ok) {
        (Some(text), _, _) => Status::Fail(text.to_vec()),
        (None, true, _) => Status::Wait,
        (None, false, true) => Status::Ok,
        (None, false, false) => return Err(Error::MissingStatus),
    };
    let user = user
        .map(|u| String::from_utf8(u.to_vec()).map_err(|_| Error::InvalidUser))
        .transpose()?;

    let (server, port) = if status == Status::Ok {
        if server.is_empty() || port.is_empty() {
            return Err(Error::MissingServer);
        }
        let addr = parse_ip(server)
            .ok_or_else(|| Error::InvalidServer(String::from_utf8_lossy(server).into_owned()))?;
        let p = parse_port(port)
            .ok_or_else(|| Error::InvalidPort(String::from_utf8_lossy(port).into_owned()))?;
        (Some(addr), Some(p))
    } else {
        (parse_ip(server), parse_port(port))
    };

    Ok(Response {
        status,
        server,
        port,
        user,
        pass: pass.map(|p| Secret::new(p.to_vec())),
        wait,
        error_code,
    })
}

/// An IPv4 or IPv6 literal, as `ngx_parse_addr` takes it: no brackets, no port, no
/// zone, no name lookup.
fn parse_ip(value: &[u8]) -> Option<IpAddr> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn parse_port(value: &[u8]) -> Option<u16> {
    atoi(value)
        .and_then(|n| u16::try_from(n).ok())
        .filter(|&p| p != 0)
}

/// `ngx_atoi`: one or more ASCII digits, nothing else, no overflow.
fn atoi(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atoi_is_strict() {
        assert_eq!(atoi(b"143"), Some(143));
        assert_eq!(atoi(b"0143"), Some(143));
        assert_eq!(atoi(b""), None);
        assert_eq!(atoi(b"+1"), None);
        assert_eq!(atoi(b"1\t"), None);
        assert_eq!(atoi(b"99999999999999999999999"), None);
        assert_eq!(parse_port(b"0"), None);
        assert_eq!(parse_port(b"65535"), Some(65535));
        assert_eq!(parse_port(b"65536"), None);
    }

    #[test]
    fn status_line_detection() {
        assert_eq!(skip_status_line(b""), Ok(None));
        assert_eq!(skip_status_line(b"HTT"), Ok(None));
        assert_eq!(skip_status_line(b"HTTP/1.0 200 OK"), Ok(None));
        assert_eq!(skip_status_line(b"HTTP/1.0 200 OK\r\n"), Ok(Some(17)));
        assert_eq!(skip_status_line(b"HTTP/\n"), Ok(Some(6)));
        assert_eq!(skip_status_line(b"HTTP/1.0\rx"), Err(Error::InvalidHeader));
        assert_eq!(skip_status_line(b"Auth-Status: OK"), Ok(Some(0)));
        assert_eq!(skip_status_line(b"HEAD"), Ok(Some(0)));
    }
}
