//! Client commands (RFC 5321 §4.1), parsed with smtp-proto's `Request::parse`.
//!
//! Before the grammar, each line is checked byte by byte: no NUL, no CR or LF inside
//! the line, valid UTF-8 (RFC 6531 allows UTF-8 in addresses; nothing allows other 8-bit
//! data in commands). smtp-proto skips stray CRs inside an address and replaces invalid
//! UTF-8; since Postern routes by the parsed address but forwards the original line, the
//! two must never disagree, so such lines are refused instead.

use std::borrow::Cow;

use smtp_proto::{
    AUTH_LOGIN, AUTH_OAUTHBEARER, AUTH_PLAIN, AUTH_XOAUTH2, Error as ParseError, Request,
};

/// SASL mechanisms, as far as a proxy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuthMech {
    Plain,
    Login,
    /// Bearer tokens (Google/Microsoft XOAUTH2, RFC 7628 OAUTHBEARER); accepted only
    /// where the listener enables OAuth.
    XOAuth2,
    OAuthBearer,
    /// Anything else: refused with 504.
    Other,
}

/// One client command, owned.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Command {
    Ehlo(String),
    Helo(String),
    Lhlo(String),
    /// `MAIL FROM:<address> [params]`; the caller keeps the raw line to forward.
    Mail,
    /// `RCPT TO:<address> [params]`, with the address to route by (quotes and source
    /// route removed by smtp-proto; `postmaster` kept as is).
    Rcpt(String),
    Data,
    Bdat {
        size: usize,
        last: bool,
    },
    Auth {
        mechanism: AuthMech,
        /// The initial response as sent (base64, or `=` for empty); `None` without one.
        initial: Option<String>,
    },
    StartTls,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    /// Known to SMTP but not offered by Postern: EXPN, ETRN, ATRN, BURL.
    NotImplemented,
}

/// A refused command line: the reply to send and the reason to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Bad {
    pub(crate) reply: &'static str,
    pub(crate) reason: &'static str,
}

const UNKNOWN: Bad = Bad {
    reply: "500 5.5.2 Error: command not recognized",
    reason: "unknown command",
};
const SYNTAX: Bad = Bad {
    reply: "501 5.5.4 Syntax error in parameters or arguments",
    reason: "syntax error",
};
const BAD_CHARS: Bad = Bad {
    reply: "500 5.5.2 Error: invalid characters in command",
    reason: "invalid characters in command",
};

/// Parses one complete command line (`raw` includes its LF).
pub(crate) fn parse(raw: &[u8]) -> Result<Command, Bad> {
    let content = raw.strip_suffix(b"\n").unwrap_or(raw);
    let content = content.strip_suffix(b"\r").unwrap_or(content);
    if content.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n')
        || std::str::from_utf8(content).is_err()
    {
        return Err(BAD_CHARS);
    }
    // smtp-proto needs the LF to know the line is complete.
    let mut line = content.to_vec();
    line.extend_from_slice(b"\r\n");
    let request = Request::parse(&mut line.iter()).map_err(|e| map_error(&e, content))?;
    Ok(match request {
        Request::Ehlo { host } => Command::Ehlo(host.into_owned()),
        Request::Helo { host } => Command::Helo(host.into_owned()),
        Request::Lhlo { host } => Command::Lhlo(host.into_owned()),
        Request::Mail { .. } => Command::Mail,
        Request::Rcpt { to } => Command::Rcpt(rcpt_address(to.address, content)?),
        Request::Data => Command::Data,
        Request::Bdat {
            chunk_size,
            is_last,
        } => {
            // smtp-proto wraps sizes beyond 64 bits around (…600000000006 becomes 6):
            // the chunk would be mis-framed, its bytes run as commands. Check the digits.
            if bdat_size(content) != Some(chunk_size) {
                return Err(SYNTAX);
            }
            Command::Bdat {
                size: chunk_size,
                last: is_last,
            }
        }
        Request::Auth {
            mechanism,
            initial_response,
        } => Command::Auth {
            mechanism: match mechanism {
                AUTH_PLAIN => AuthMech::Plain,
                AUTH_LOGIN => AuthMech::Login,
                AUTH_XOAUTH2 => AuthMech::XOAuth2,
                AUTH_OAUTHBEARER => AuthMech::OAuthBearer,
                _ => AuthMech::Other,
            },
            initial: (!initial_response.is_empty()).then(|| initial_response.into_owned()),
        },
        Request::StartTls => Command::StartTls,
        Request::Rset => Command::Rset,
        Request::Noop { .. } => Command::Noop,
        Request::Quit => Command::Quit,
        Request::Vrfy { .. } => Command::Vrfy,
        Request::Help { .. } => Command::Help,
        Request::Expn { .. }
        | Request::Etrn { .. }
        | Request::Atrn { .. }
        | Request::Burl { .. } => Command::NotImplemented,
    })
}

/// The chunk size of a BDAT line, read with overflow checks.
fn bdat_size(line: &[u8]) -> Option<usize> {
    let size = line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty())
        .nth(1)?;
    std::str::from_utf8(size).ok()?.parse().ok()
}

/// smtp-proto turns `<postmaster>` into an empty address (RFC 5321 §4.1.1.3 allows it
/// without a domain); routing needs the name, and `<>` is not a recipient.
fn rcpt_address(address: Cow<'_, str>, line: &[u8]) -> Result<String, Bad> {
    if !address.is_empty() {
        return Ok(address.into_owned());
    }
    let lower = line.to_ascii_lowercase();
    if lower.windows(12).any(|w| w == b"<postmaster>") {
        Ok("postmaster".into())
    } else {
        Err(Bad {
            reply: "501 5.1.3 Bad recipient address syntax",
            reason: "bad recipient address",
        })
    }
}

fn map_error(e: &ParseError, line: &[u8]) -> Bad {
    let verb = line
        .split(|&b| b == b' ')
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase();
    match e {
        ParseError::UnknownCommand => UNKNOWN,
        ParseError::InvalidSenderAddress => Bad {
            reply: "501 5.1.7 Bad sender address syntax",
            reason: "bad sender address",
        },
        ParseError::InvalidRecipientAddress => Bad {
            reply: "501 5.1.3 Bad recipient address syntax",
            reason: "bad recipient address",
        },
        ParseError::UnsupportedParameter { .. } | ParseError::InvalidParameter { .. } => Bad {
            reply: "555 5.5.4 Unsupported option",
            reason: "unsupported MAIL/RCPT parameter",
        },
        // AUTH with a mechanism smtp-proto has no name for is a syntax error there;
        // RFC 4954 wants 504 for an unknown mechanism.
        ParseError::SyntaxError { .. } if verb == b"AUTH" && line.len() > 5 => Bad {
            reply: "504 5.5.4 Unrecognized authentication type",
            reason: "unsupported SASL mechanism",
        },
        _ => SYNTAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let ok: &[(&[u8], Command)] = &[
            (
                b"EHLO client.example\r\n",
                Command::Ehlo("client.example".into()),
            ),
            (b"helo [192.0.2.1]\n", Command::Helo("[192.0.2.1]".into())),
            (
                b"MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME\r\n",
                Command::Mail,
            ),
            (b"MAIL FROM:<>\r\n", Command::Mail),
            (
                b"RCPT TO:<Alice@Example.test> NOTIFY=NEVER\r\n",
                Command::Rcpt("Alice@Example.test".into()),
            ),
            (
                b"RCPT TO:<\"j doe\"@example.test>\r\n",
                Command::Rcpt("j doe@example.test".into()),
            ),
            (
                b"RCPT TO:<Postmaster>\r\n",
                Command::Rcpt("postmaster".into()),
            ),
            (
                b"RCPT TO:<@relay.example:u@example.test>\r\n",
                Command::Rcpt("u@example.test".into()),
            ),
            (
                b"BDAT 100 LAST\r\n",
                Command::Bdat {
                    size: 100,
                    last: true,
                },
            ),
            (
                b"BDAT 0\r\n",
                Command::Bdat {
                    size: 0,
                    last: false,
                },
            ),
            (
                b"AUTH PLAIN AGEAYg==\r\n",
                Command::Auth {
                    mechanism: AuthMech::Plain,
                    initial: Some("AGEAYg==".into()),
                },
            ),
            (
                b"auth login\r\n",
                Command::Auth {
                    mechanism: AuthMech::Login,
                    initial: None,
                },
            ),
            (
                b"AUTH CRAM-MD5\r\n",
                Command::Auth {
                    mechanism: AuthMech::Other,
                    initial: None,
                },
            ),
            (
                b"AUTH XYZZY-UNKNOWN\r\n",
                Command::Auth {
                    mechanism: AuthMech::Other,
                    initial: None,
                },
            ),
            (b"STARTTLS\r\n", Command::StartTls),
            (b"ETRN example.test\r\n", Command::NotImplemented),
        ];
        for (line, want) in ok {
            assert_eq!(parse(line).as_ref(), Ok(want), "{line:?}");
        }
    }

    #[test]
    fn refusals() {
        let bad: &[(&[u8], &str)] = &[
            (b"XCLIENT ADDR=1.2.3.4\r\n", "500 "),
            (b"EHLO\r\n", "501 "),
            (b"RCPT TO:<>\r\n", "501 5.1.3"),
            (b"RCPT TO:<a\r@b.example>\r\n", "500 "),
            (b"MAIL FROM:<a\0@b>\r\n", "500 "),
            (b"MAIL FROM:<\xff@b.example>\r\n", "500 "),
            (b"MAIL FROM:<a@b.example> FOO=1\r\n", "555 "),
            (b"AUTH\r\n", "501 "),
            (b"RCPT TO:<a@@b>\r\n", "501 "),
            (b"BDAT 99999999999999999999\r\n", "501 "),
            // 2^64 * 10^11 + 6: wraps to 6 in smtp-proto.
            (b"BDAT 1844674407370955161600000000006\r\n", "501 "),
            (b"BDAT 18446744073709551616 LAST\r\n", "501 "),
        ];
        for (line, want) in bad {
            let got = parse(line).expect_err(&String::from_utf8_lossy(line));
            assert!(got.reply.starts_with(want), "{line:?}: {got:?}");
        }
    }
}
