//! nginx's `auth_http` protocol, sans I/O: build the request, read the answer,
//! decide what the session does next.
//!
//! One login attempt, as nginx runs it and as the runtime should:
//!
//! ```text
//!  Request::encode(uri, host) ──▶ new TCP (or unix) connection, write, no keep-alive
//!  read ──▶ parse_response(buf) ── Incomplete ──▶ read more (EOF: parse_response_at_eof)
//!                 │
//!                 └─ Complete(Response) ──▶ decide(response, protocol)
//!                        Login    ─▶ connect to server:port, log in with user/pass
//!                        Refuse   ─▶ [wait delay] send reply; close if no delay
//!                        AskAgain ─▶ wait, send the same request again
//!  any Err ─▶ nginx's "internal server error", then close
//! ```
//!
//! The request matches nginx 1.31.5 byte for byte (header order included) and the
//! reader follows nginx's state machine, quirks included: the status line is ignored,
//! header names are case-insensitive, values are trimmed of spaces and never
//! %-decoded, `Auth-Server` must be an IP literal. Where Postern deliberately differs
//! (no `Auth-Status` is an error, a larger but bounded header block, CR/LF in
//! verbatim request values escaped), the items say so.

mod decide;
mod endpoint;
mod request;
mod response;

pub use decide::{DEFAULT_SMTP_ERROR_CODE, Decision, Refusal, Upstream, decide};
pub use endpoint::{Endpoint, EndpointError, Target};
pub use request::{
    AuthMethod, AuthProtocol, ClientCertInfo, ProxyProtocolInfo, Request, SmtpEnvelope, TlsInfo,
    openssl_cipher_name, tls_protocol_name,
};
pub use response::{
    Error, MAX_RESPONSE_HEADER, Parsed, Response, Status, parse_response, parse_response_at_eof,
    parse_response_with_limit,
};
