//! Postfix XCLIENT (XCLIENT_README) and xtext (RFC 3461 §4).
//!
//! XCLIENT tells a backend that trusts Postern (`smtpd_authorized_xclient_hosts`) who
//! the real client is, so its access rules, logs and `Received:` headers see the client
//! and not Postern. Without it every Internet sender would look like Postern, and if
//! Postern were in `mynetworks` it would relay for anyone.
//!
//! Rules applied here:
//! - only attributes the backend listed after `XCLIENT` in its EHLO reply are sent
//!   (Postfix refuses unknown ones with 501);
//! - `ADDR` is required: a backend that cannot take the client address is not used;
//! - values are xtext; an IPv6 address is `IPV6:` + address (Postfix; Dovecot's own
//!   client omits the prefix towards LMTP, which older Dovecot LMTP needs);
//!   IPv4-mapped IPv6 addresses are sent as IPv4;
//! - a command stays within 512 characters (RFC 5321 §4.5.3.1.4); longer attribute
//!   sets are split over several commands, each answered by `220`, with `ADDR` in the
//!   last one, because once `ADDR` is set the backend checks authorization against
//!   the client's address and refuses further XCLIENT commands.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

/// RFC 5321's command line limit, CRLF included.
const MAX_COMMAND: usize = 512;

/// The value Postfix takes for "not known" (NAME, HELO, ADDR).
pub const UNAVAILABLE: &str = "[UNAVAILABLE]";

/// Encodes `value` as xtext: printable ASCII except `+` and `=` as is, every other byte
/// as `+XX` (upper-case hex).
pub fn xtext(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

/// What Postern knows about the client, for XCLIENT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientAttrs {
    pub(crate) client: SocketAddr,
    /// The address the client connected to (DESTADDR/DESTPORT, Postfix 3.5+).
    pub(crate) local: SocketAddr,
    /// Verified reverse DNS name, or `None` for `[UNAVAILABLE]`.
    pub(crate) name: Option<String>,
    /// The client's HELO/EHLO/LHLO argument.
    pub(crate) helo: Option<String>,
    /// `SMTP`, `ESMTP` or `LMTP`.
    pub(crate) proto: &'static str,
    /// The SASL login name, when Postern verified the password itself.
    pub(crate) login: Option<String>,
    /// Send IPv6 addresses with the `IPV6:` prefix (Postfix) or without (Dovecot LMTP).
    pub(crate) ipv6_prefix: bool,
}

/// Why no XCLIENT command can be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum XclientError {
    /// The backend does not offer XCLIENT, or not its ADDR attribute.
    NoAddr,
}

/// The XCLIENT commands (with CRLF) to send, in order, and whether LOGIN is among them.
pub(crate) fn commands<'a>(
    advertised: impl IntoIterator<Item = &'a str>,
    attrs: &ClientAttrs,
) -> Result<(Vec<String>, bool), XclientError> {
    let offered: Vec<String> = advertised
        .into_iter()
        .map(str::to_ascii_uppercase)
        .collect();
    let has = |name: &str| offered.iter().any(|a| a == name);
    if !has("ADDR") {
        return Err(XclientError::NoAddr);
    }
    let client_ip = attrs.client.ip().to_canonical();
    let local_ip = attrs.local.ip().to_canonical();
    let helo = attrs.helo.as_deref().unwrap_or(UNAVAILABLE);
    let name = attrs.name.as_deref().unwrap_or(UNAVAILABLE);
    // Identity and protocol first; NAME and ADDR last (XCLIENT_README, Note 1).
    let mut pairs: Vec<(&str, String)> = Vec::new();
    pairs.push(("HELO", xtext(helo.as_bytes())));
    pairs.push(("PROTO", attrs.proto.to_owned()));
    let mut login_sent = false;
    if let Some(login) = &attrs.login
        && has("LOGIN")
    {
        pairs.push(("LOGIN", xtext(login.as_bytes())));
        login_sent = true;
    }
    pairs.push((
        "DESTADDR",
        xtext(addr(local_ip, attrs.ipv6_prefix).as_bytes()),
    ));
    pairs.push(("DESTPORT", attrs.local.port().to_string()));
    pairs.push(("NAME", xtext(name.as_bytes())));
    pairs.push(("PORT", attrs.client.port().to_string()));
    pairs.push(("ADDR", xtext(addr(client_ip, attrs.ipv6_prefix).as_bytes())));

    let mut out = Vec::new();
    let mut line = String::from("XCLIENT");
    for (key, value) in pairs.into_iter().filter(|(k, _)| has(k)) {
        let item = format!(" {key}={value}");
        // `XCLIENT` + item + CRLF must fit; an item that alone does not fit is dropped
        // (a 255-byte HELO encodes to at most 765 bytes only when it is all non-ASCII,
        // which a valid HELO is not).
        if "XCLIENT".len() + item.len() + 2 > MAX_COMMAND {
            continue;
        }
        if line.len() + item.len() + 2 > MAX_COMMAND {
            out.push(format!("{line}\r\n"));
            line = String::from("XCLIENT");
        }
        line.push_str(&item);
    }
    out.push(format!("{line}\r\n"));
    Ok((out, login_sent))
}

fn addr(ip: IpAddr, ipv6_prefix: bool) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) if ipv6_prefix => format!("IPV6:{v6}"),
        IpAddr::V6(v6) => v6.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> ClientAttrs {
        ClientAttrs {
            client: "[2001:db8::7]:40000".parse().unwrap(),
            local: "192.0.2.25:25".parse().unwrap(),
            name: None,
            helo: Some("mail+relay=x.example".into()),
            proto: "ESMTP",
            login: Some("alice@example.test".into()),
            ipv6_prefix: true,
        }
    }

    #[test]
    fn xtext_encoding() {
        assert_eq!(
            xtext(b"a+b=c d\x7f\xc3\xa9[x]"),
            "a+2Bb+3Dc+20d+7F+C3+A9[x]"
        );
    }

    #[test]
    fn only_advertised_attributes_in_order() {
        let (cmds, login) = commands(
            "NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN".split(' '),
            &attrs(),
        )
        .unwrap();
        assert!(login);
        assert_eq!(
            cmds,
            [
                "XCLIENT HELO=mail+2Brelay+3Dx.example PROTO=ESMTP LOGIN=alice@example.test NAME=[UNAVAILABLE] PORT=40000 ADDR=IPV6:2001:db8::7\r\n"
            ]
        );
        let (cmds, login) = commands(["addr", "helo"], &attrs()).unwrap();
        assert!(!login);
        assert_eq!(
            cmds,
            ["XCLIENT HELO=mail+2Brelay+3Dx.example ADDR=IPV6:2001:db8::7\r\n"]
        );
        assert_eq!(
            commands(["NAME", "HELO"], &attrs()),
            Err(XclientError::NoAddr)
        );
    }

    #[test]
    fn mapped_ipv4_and_no_prefix() {
        let mut a = attrs();
        a.client = "[::ffff:198.51.100.9]:1234".parse().unwrap();
        let (cmds, _) = commands(["ADDR", "DESTADDR", "DESTPORT"], &a).unwrap();
        assert_eq!(
            cmds,
            ["XCLIENT DESTADDR=192.0.2.25 DESTPORT=25 ADDR=198.51.100.9\r\n"]
        );
        a.ipv6_prefix = false;
        a.client = "[::1]:2".parse().unwrap();
        let (cmds, _) = commands(["ADDR"], &a).unwrap();
        assert_eq!(cmds, ["XCLIENT ADDR=::1\r\n"]);
    }

    #[test]
    fn long_attributes_split_with_addr_last() {
        let mut a = attrs();
        a.helo = Some("h".repeat(255));
        a.name = Some("n".repeat(255));
        let (cmds, _) = commands("NAME ADDR HELO PROTO".split(' '), &a).unwrap();
        assert_eq!(cmds.len(), 2);
        assert!(cmds.iter().all(|c| c.len() <= 512));
        assert!(cmds[0].starts_with("XCLIENT HELO=hhh") && cmds[0].contains("PROTO=ESMTP"));
        assert!(
            cmds[1].starts_with("XCLIENT NAME=nnn")
                && cmds[1].ends_with(" ADDR=IPV6:2001:db8::7\r\n")
        );
    }
}
