//! `listen` and the listeners it becomes, shared by `mail {}` and `stream {}`: the
//! address forms, the protocol a port implies, listener names, PROXY networks.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::super::emit::{CertPair, ListenerPlan};
use super::super::parse::{Directive, Loc};
use super::Ctx;

/// A `listen` directive, parsed.
pub(super) struct Listen {
    pub(super) bind: SocketAddr,
    /// Implicit TLS (`ssl`).
    pub(super) ssl: bool,
    /// The clients' balancer sends a PROXY header (`proxy_protocol`).
    pub(super) proxy_protocol: bool,
    /// The arguments as written, for the listener's comment.
    raw: String,
    pub(super) loc: Loc,
}

/// `listen ADDR [ssl] [proxy_protocol] [...]`.
pub(super) fn listen(ctx: &mut Ctx<'_>, d: &Directive, stream: bool) -> Option<Listen> {
    let Some(addr) = d.args.first().map(|a| a.value.clone()) else {
        ctx.warn(d, "no address: nginx refuses this; left out");
        return None;
    };
    let raw = d
        .args
        .iter()
        .map(|a| a.value.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let bind = match parse_listen_addr(&addr) {
        Ok((bind, note)) => {
            if let Some(note) = note {
                ctx.warn(d, note);
            }
            bind
        }
        Err(why) => {
            ctx.warn(d, format!("{why}; this listener is left out"));
            return None;
        }
    };
    let mut out = Listen {
        bind,
        ssl: false,
        proxy_protocol: false,
        raw,
        loc: d.loc.clone(),
    };
    for a in d.args.iter().skip(1) {
        let p = a.value.as_str();
        match p {
            "ssl" => out.ssl = true,
            "proxy_protocol" => out.proxy_protocol = true,
            "udp" if stream => {
                ctx.warn(d, "UDP is not mail: this listener is left out");
                return None;
            }
            "default_server" | "bind" => {}
            _ => {
                let name = p.split('=').next().unwrap_or(p);
                ctx.warn(
                    d,
                    format!("parameter \"{name}\" not mapped: Postern sets its own socket options"),
                );
            }
        }
    }
    Some(out)
}

/// nginx's listen address forms: `143`, `*:143`, `10.0.0.1:143`, `[::]:143`,
/// `localhost:143`.
fn parse_listen_addr(addr: &str) -> Result<(SocketAddr, Option<String>), String> {
    if addr.starts_with("unix:") {
        return Err("unix sockets are not supported: Postern listens on TCP".into());
    }
    if let Ok(port) = addr.parse::<u16>() {
        return Ok((
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            None,
        ));
    }
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok((sa, None));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("\"{addr}\" has no port"));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("\"{addr}\": invalid port"))?;
    match host {
        "*" => Ok((
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            None,
        )),
        "localhost" => Ok((
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            Some("\"localhost\" bound as 127.0.0.1 (Postern binds addresses, not names)".into()),
        )),
        _ => Err(format!(
            "\"{host}\" is a host name: Postern binds addresses; write the address"
        )),
    }
}

/// The protocol nginx guesses from a port, and whether that port is implicit TLS.
pub(super) fn port_protocol(port: u16) -> Option<(&'static str, bool)> {
    Some(match port {
        143 => ("imap", false),
        993 => ("imap", true),
        110 => ("pop3", false),
        995 => ("pop3", true),
        25 => ("smtp", false),
        587 => ("submission", false),
        465 => ("submission", true),
        24 => ("lmtp", false),
        _ => return None,
    })
}

fn listener_name(protocol: &str, tls: &str, port: u16) -> String {
    let p = match (protocol, tls) {
        ("imap", "implicit") => "imaps",
        ("pop3", "implicit") => "pop3s",
        ("submission", "implicit") => "submissions",
        ("smtp", "implicit") => "smtps",
        (p, _) => p,
    };
    format!("{p}-{port}")
}

/// `set_real_ip_from` values usable as `accept_proxy_from`.
fn proxy_networks(ctx: &mut Ctx<'_>, from: &[(String, Loc)], l: &Listen) -> Vec<String> {
    let mut out = Vec::new();
    for (net, loc) in from {
        if net.starts_with("unix:") {
            ctx.warn_at(
                Some(loc),
                "set_real_ip_from",
                "unix: sockets have no address to trust; left out",
            );
        } else if net.parse::<ipnet::IpNet>().is_ok() || net.parse::<IpAddr>().is_ok() {
            if !out.contains(net) {
                out.push(net.clone());
            }
        } else {
            ctx.warn_at(
                Some(loc),
                "set_real_ip_from",
                format!(
                    "\"{net}\" is not an address or network (host names are not resolved); left out"
                ),
            );
        }
    }
    if out.is_empty() {
        ctx.warn_at(
            Some(&l.loc),
            "listen",
            "proxy_protocol without set_real_ip_from: nginx then requires the header from everyone \
             but trusts nobody's address; Postern accepts PROXY headers only from listed networks. \
             Not mapped: add accept_proxy_from = [\"BALANCER/NET\"] to this listener",
        );
    }
    out
}

/// A listener to add, besides its `listen`.
pub(super) struct NewListener<'a> {
    pub(super) protocol: &'static str,
    pub(super) tls: &'static str,
    pub(super) insecure: bool,
    pub(super) cert: Option<CertPair>,
    /// Mail listeners: the auth_http server checks logins and names backends.
    pub(super) http_auth: bool,
    /// `set_real_ip_from`, for `listen ... proxy_protocol`.
    pub(super) real_ip_from: &'a [(String, Loc)],
}

/// Adds a listener; false if its address is taken (nginx would refuse to start, so
/// the first one wins and the operator is told).
pub(super) fn push_listener(ctx: &mut Ctx<'_>, l: &Listen, n: NewListener<'_>) -> bool {
    if ctx.binds.contains(&l.bind) {
        ctx.warn_at(
            Some(&l.loc),
            "listen",
            format!("{} is already used by another listener; left out", l.bind),
        );
        return false;
    }
    let accept_proxy_from = if l.proxy_protocol {
        proxy_networks(ctx, n.real_ip_from, l)
    } else {
        Vec::new()
    };
    ctx.binds.push(l.bind);
    let name = ctx.name(listener_name(n.protocol, n.tls, l.bind.port()));
    ctx.plan.listeners.push(ListenerPlan {
        name,
        protocol: n.protocol,
        bind: l.bind,
        tls: n.tls,
        insecure_plaintext_auth: n.insecure,
        accept_proxy_from,
        cert: n.cert,
        http_auth: n.http_auth,
        comment: format!("{}: listen {}", l.loc, l.raw),
        loc: l.loc.clone(),
    });
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn listen_addresses() {
        let any = |p| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p);
        assert_eq!(parse_listen_addr("143").unwrap(), (any(143), None));
        assert_eq!(parse_listen_addr("*:993").unwrap(), (any(993), None));
        assert_eq!(
            parse_listen_addr("[::1]:1143").unwrap().0,
            "[::1]:1143".parse::<SocketAddr>().unwrap()
        );
        let (bind, note) = parse_listen_addr("localhost:110").unwrap();
        assert_eq!(bind, "127.0.0.1:110".parse::<SocketAddr>().unwrap());
        assert!(note.is_some(), "a name bound as an address is a difference");
        for bad in [
            "unix:/run/mail.sock",
            "mail.example.test:143",
            "10.0.0.1",
            "*:imap",
        ] {
            assert!(parse_listen_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_and_names() {
        assert_eq!(port_protocol(993), Some(("imap", true)));
        assert_eq!(port_protocol(587), Some(("submission", false)));
        assert_eq!(port_protocol(8080), None);
        assert_eq!(listener_name("imap", "implicit", 993), "imaps-993");
        assert_eq!(
            listener_name("submission", "implicit", 465),
            "submissions-465"
        );
        assert_eq!(listener_name("pop3", "starttls", 110), "pop3-110");
    }
}
