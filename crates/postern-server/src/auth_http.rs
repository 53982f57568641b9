//! The I/O half of nginx's `auth_http` protocol (the sans-IO half is
//! `postern_auth::auth_http`): one new connection per request, HTTP/1.0, no keep-alive,
//! the answer read until its header block ends, all within `auth.http.timeout`.

use std::io;

use postern_auth::auth_http::{
    Decision, Error as ProtocolError, MAX_RESPONSE_HEADER, Parsed, Request, Target, decide,
    parse_response, parse_response_at_eof,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{Instant, timeout};

use crate::settings::HttpAuth;

/// Why the auth server gave no usable answer; the session answers with a temporary
/// failure and closes, as nginx does.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AskError {
    #[error("auth server unreachable: {0}")]
    Connect(io::Error),
    #[error("auth server I/O: {0}")]
    Io(io::Error),
    #[error("auth server timed out")]
    Timeout,
    #[error("auth server answer: {0}")]
    Protocol(ProtocolError),
    #[error("auth server kept saying WAIT until the pre-auth deadline")]
    WaitedTooLong,
}

/// Asks the auth server about `request` until it decides (nginx repeats `WAIT`
/// answers; here they end at `deadline`).
pub(crate) async fn ask(
    http: &HttpAuth,
    request: &Request,
    deadline: Instant,
) -> Result<Decision, AskError> {
    let protocol = request.protocol;
    loop {
        let response = timeout(http.timeout, exchange(http, request))
            .await
            .map_err(|_| AskError::Timeout)??;
        match decide(response, protocol).map_err(AskError::Protocol)? {
            Decision::AskAgain { after } => {
                if Instant::now() + after >= deadline {
                    return Err(AskError::WaitedTooLong);
                }
                tokio::time::sleep(after).await;
            }
            decision => return Ok(decision),
        }
    }
}

async fn exchange(
    http: &HttpAuth,
    request: &Request,
) -> Result<postern_auth::auth_http::Response, AskError> {
    let bytes = request.encode(&http.endpoint.uri, &http.endpoint.host);
    match &http.endpoint.target {
        Target::Tcp { host, port } => {
            let mut s = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(AskError::Connect)?;
            let _ = s.set_nodelay(true);
            talk(&mut s, &bytes).await
        }
        Target::Unix(path) => {
            let mut s = UnixStream::connect(path).await.map_err(AskError::Connect)?;
            talk(&mut s, &bytes).await
        }
    }
}

async fn talk<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    request: &[u8],
) -> Result<postern_auth::auth_http::Response, AskError> {
    s.write_all(request).await.map_err(AskError::Io)?;
    s.flush().await.map_err(AskError::Io)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await.map_err(AskError::Io)?;
        if n == 0 {
            return parse_response_at_eof(&buf).map_err(AskError::Protocol);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        match parse_response(&buf).map_err(AskError::Protocol)? {
            Parsed::Complete(response) => return Ok(response),
            // parse_response fails with TooLarge past its limit, so buf stays bounded.
            Parsed::Incomplete => debug_assert!(buf.len() < MAX_RESPONSE_HEADER + chunk.len()),
        }
    }
}
