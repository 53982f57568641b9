//! `stream {}`: nginx's TCP proxy in front of mail servers. Each `server { listen;
//! proxy_pass; }` becomes a listener whose protocol comes from its port or its
//! upstream; the upstreams become backends in [`super::upstream`].

use std::time::Duration;

use super::super::emit::CertPair;
use super::super::parse::{Directive, Loc};
use super::Ctx;
use super::directives::{check_variables, on_off, time_arg, unmapped_reason};
use super::globals::{offer, show_time};
use super::listen::{Listen, NewListener, listen, port_protocol, push_listener};
use super::upstream::{UpServer, Upstream, parse_host_port, protocol_of_upstream, upstream};

/// What a `stream {}` or `server {}` level sets; a server inherits what it leaves
/// unset.
#[derive(Clone, Default)]
struct StreamSet {
    proxy_timeout: Option<(Duration, Loc)>,
    proxy_connect_timeout: Option<(Duration, Loc)>,
    cert: Option<(String, Loc)>,
    key: Option<(String, Loc)>,
    proxy_protocol: Option<bool>,
    proxy_ssl: Option<bool>,
    real_ip_from: Option<Vec<(String, Loc)>>,
}

impl StreamSet {
    fn merge(&self, parent: &StreamSet) -> StreamSet {
        macro_rules! pick {
            ($($f:ident),*) => { StreamSet { $($f: self.$f.clone().or_else(|| parent.$f.clone()),)* } };
        }
        pick!(
            proxy_timeout,
            proxy_connect_timeout,
            cert,
            key,
            proxy_protocol,
            proxy_ssl,
            real_ip_from
        )
    }
}

/// A directive valid in `stream {}` and `server {}`; false if not one of them.
fn stream_common(ctx: &mut Ctx<'_>, set: &mut StreamSet, d: &Directive) -> bool {
    match d.name.as_str() {
        "proxy_timeout" => set.proxy_timeout = time_arg(ctx, d),
        "proxy_connect_timeout" => set.proxy_connect_timeout = time_arg(ctx, d),
        "ssl_certificate" => {
            if set.cert.is_some() {
                ctx.warn(
                    d,
                    "a second certificate: Postern serves one per listener; only the first is used",
                );
            } else {
                set.cert = Some((d.arg(0).to_owned(), d.loc.clone()));
            }
        }
        "ssl_certificate_key" => {
            if set.key.is_none() {
                set.key = Some((d.arg(0).to_owned(), d.loc.clone()));
            }
        }
        "proxy_protocol" => set.proxy_protocol = on_off(ctx, d),
        "proxy_ssl" => set.proxy_ssl = on_off(ctx, d),
        "set_real_ip_from" => set
            .real_ip_from
            .get_or_insert_with(Vec::new)
            .push((d.arg(0).to_owned(), d.loc.clone())),
        "server_name" => ctx.warn(d, "not mapped: Postern picks listeners by address and port"),
        name => match unmapped_reason(name) {
            Some(reason) => ctx.warn(d, format!("not mapped: {reason}")),
            None => return false,
        },
    }
    true
}

pub(super) fn stream(ctx: &mut Ctx<'_>, block: &[Directive]) {
    let mut top = StreamSet::default();
    let mut servers = Vec::new();
    for d in block {
        check_variables(ctx, d);
        match (d.name.as_str(), &d.block) {
            ("upstream", Some(body)) => upstream(ctx, d, body),
            ("server", Some(body)) => servers.push((d, body)),
            _ => {
                if !stream_common(ctx, &mut top, d) {
                    ctx.warn(d, "unknown in stream {}; ignored");
                }
            }
        }
    }
    // After the loop: a server may name an upstream defined below it.
    for (server, body) in servers {
        stream_server(ctx, &top, server, body);
    }
}

/// A `server {}` block's own directives.
struct StreamServer {
    set: StreamSet,
    listens: Vec<Listen>,
    pass: Option<(String, Loc)>,
}

fn read_stream_server(ctx: &mut Ctx<'_>, body: &[Directive]) -> StreamServer {
    let mut s = StreamServer {
        set: StreamSet::default(),
        listens: Vec::new(),
        pass: None,
    };
    for d in body {
        check_variables(ctx, d);
        match d.name.as_str() {
            "listen" => {
                if let Some(l) = listen(ctx, d, true) {
                    s.listens.push(l);
                }
            }
            "proxy_pass" => s.pass = Some((d.arg(0).to_owned(), d.loc.clone())),
            "return" => ctx.warn(d, "not mail; ignored"),
            _ => {
                if !stream_common(ctx, &mut s.set, d) {
                    ctx.warn(d, "unknown in stream server {}; ignored");
                }
            }
        }
    }
    s
}

fn stream_server(ctx: &mut Ctx<'_>, top: &StreamSet, server: &Directive, body: &[Directive]) {
    let s = read_stream_server(ctx, body);
    let eff = s.set.merge(top);
    let Some((target, pass_loc)) = s.pass else {
        ctx.warn(server, "no proxy_pass: not a proxy; left out");
        return;
    };
    if target.contains('$') {
        ctx.warn_at(
            Some(&pass_loc),
            "proxy_pass",
            format!(
                "\"{target}\" is chosen by a variable: Postern cannot tell where it goes; left out"
            ),
        );
        return;
    }
    // proxy_pass host:port without an upstream block: a one-server upstream.
    if !ctx.upstreams.contains_key(&target) {
        let Some((host, port)) = parse_host_port(&target) else {
            ctx.warn_at(
                Some(&pass_loc),
                "proxy_pass",
                format!("no upstream \"{target}\" and not host:port; left out"),
            );
            return;
        };
        ctx.upstreams.insert(
            target.clone(),
            Upstream {
                servers: vec![UpServer {
                    host,
                    port,
                    weight: 1,
                    loc: pass_loc.clone(),
                }],
                loc: pass_loc.clone(),
            },
        );
    }
    if let Some((t, loc)) = &eff.proxy_timeout {
        offer(&mut ctx.warnings, &mut ctx.globals.idle, *t, loc, show_time);
    }
    if let Some((t, loc)) = &eff.proxy_connect_timeout {
        offer(
            &mut ctx.warnings,
            &mut ctx.globals.backend_connect,
            *t,
            loc,
            show_time,
        );
    }
    for l in &s.listens {
        stream_listener(ctx, &eff, &target, l);
    }
}

/// One `listen` of a stream server: a listener, and the upstream's servers registered
/// as backends of its protocol.
fn stream_listener(ctx: &mut Ctx<'_>, eff: &StreamSet, target: &str, l: &Listen) {
    let up = ctx.upstreams.get(target);
    let by_port = port_protocol(l.bind.port());
    let Some((protocol, implicit_port)) = by_port.or_else(|| protocol_of_upstream(target, up))
    else {
        ctx.warn_at(
            Some(&l.loc),
            "listen",
            format!("port {} to \"{target}\": not a mail port and the upstream's name and ports say no protocol; left out", l.bind.port()),
        );
        return;
    };
    // TLS passthrough: nginx relayed TLS from a 993-style port to the backend
    // untouched. Postern terminates it, and speaks TLS to the backend.
    let backend_implicit = up.is_some_and(|u| {
        u.servers
            .iter()
            .any(|s| port_protocol(s.port).is_some_and(|p| p.1))
    });
    let passthrough = !l.ssl && (implicit_port || backend_implicit);
    let backend_tls = if eff.proxy_ssl == Some(true) || passthrough {
        "implicit"
    } else {
        "none"
    };
    let backend_pp = if eff.proxy_protocol == Some(true) {
        "v1"
    } else {
        "none"
    };
    if protocol == "lmtp" && (l.ssl || passthrough) {
        ctx.warn_at(
            Some(&l.loc),
            "listen",
            "LMTP over TLS: Postern's LMTP listeners are plaintext; left out",
        );
        return;
    }
    let Some((tls, insecure, cert)) = stream_tls(ctx, eff, l, passthrough) else {
        return;
    };
    let listener = NewListener {
        protocol,
        tls,
        insecure,
        cert,
        http_auth: false,
        real_ip_from: eff.real_ip_from.as_deref().unwrap_or_default(),
    };
    if !push_listener(ctx, l, listener) {
        return;
    }
    if tls == "none" && protocol != "lmtp" {
        ctx.plain_stream.push(ctx.plan.listeners.len() - 1);
    }
    if protocol == "smtp" {
        ctx.warn_at(
            Some(&l.loc),
            "listen",
            "MX relay: Postern tells each backend the real client with XCLIENT and refuses backends that do not accept it; add Postern's address to Postfix's smtpd_authorized_xclient_hosts (or set [smtp] xclient = false)",
        );
    }
    ctx.registrations
        .push((protocol, target.to_owned(), backend_tls, backend_pp));
}

/// The listener's `tls`, whether plaintext logins are allowed, and its certificate;
/// `None` (with a warning) leaves it out. Plaintext listeners allow plaintext logins
/// because nginx relayed them; the final pass may offer STARTTLS on them.
fn stream_tls(
    ctx: &mut Ctx<'_>,
    eff: &StreamSet,
    l: &Listen,
    passthrough: bool,
) -> Option<(&'static str, bool, Option<CertPair>)> {
    if !(l.ssl || passthrough) {
        return Some(("none", true, None));
    }
    let cert = match (&eff.cert, &eff.key) {
        (Some((c, _)), Some((k, _))) => Some(CertPair {
            cert: ctx.path(c),
            key: ctx.path(k),
        }),
        _ => None,
    };
    let Some(cert) = cert.or_else(|| ctx.plan.listeners.iter().find_map(|x| x.cert.clone())) else {
        ctx.warn_at(
            Some(&l.loc),
            "listen",
            if passthrough {
                "TLS passed through to the backend: Postern must terminate TLS itself and has no certificate here; left out (add ssl_certificate/ssl_certificate_key to this server, or [tls] and a listener by hand)"
            } else {
                "ssl without ssl_certificate (nginx refuses this); left out"
            },
        );
        return None;
    };
    if passthrough {
        ctx.warn_at(Some(&l.loc), "listen", "TLS was passed through to the backend: Postern terminates it here (with this server's certificate) and speaks TLS to the backend");
    }
    Some(("implicit", false, Some(cert)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_inherit_what_they_leave_unset() {
        let loc = Loc {
            file: std::path::PathBuf::from("t.conf").into(),
            line: 1,
        };
        let top = StreamSet {
            proxy_timeout: Some((Duration::from_secs(3600), loc.clone())),
            proxy_protocol: Some(true),
            ..StreamSet::default()
        };
        let server = StreamSet {
            proxy_protocol: Some(false),
            ..StreamSet::default()
        };
        let eff = server.merge(&top);
        assert_eq!(eff.proxy_protocol, Some(false));
        assert_eq!(
            eff.proxy_timeout.map(|(t, _)| t),
            Some(Duration::from_secs(3600))
        );
        assert!(eff.proxy_ssl.is_none());
    }
}
