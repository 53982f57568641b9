//! `mail {}`: nginx's mail proxy, which picks every session's backend by asking the
//! auth_http server. Each `server {}` becomes listeners in `auth = "http"` mode, and no
//! backend is declared: the auth server goes on naming them.

use std::time::Duration;

use super::super::emit::CertPair;
use super::super::parse::{Directive, Loc};
use super::Ctx;
use super::directives::{check_variables, on_off, size_arg, time_arg, unmapped_reason};
use super::globals::{offer, show_plain, show_time};
use super::listen::{Listen, NewListener, listen, port_protocol, push_listener};

/// What a `mail {}` or `server {}` level sets; a server inherits what it leaves unset
/// (nginx's merge of the mail module's configuration).
#[derive(Clone, Default)]
struct MailSet {
    server_name: Option<(String, Loc)>,
    timeout: Option<(Duration, Loc)>,
    proxy_timeout: Option<(Duration, Loc)>,
    auth_http: Option<(String, Loc)>,
    auth_http_timeout: Option<(Duration, Loc)>,
    auth_http_headers: Option<(Vec<(String, String)>, Loc)>,
    cert: Option<(String, Loc)>,
    key: Option<(String, Loc)>,
    starttls: Option<(String, Loc)>,
    ssl: Option<bool>,
    real_ip_from: Option<Vec<(String, Loc)>>,
    max_errors: Option<(u64, Loc)>,
    imap_client_buffer: Option<(u64, Loc)>,
    smtp_client_buffer: Option<(u64, Loc)>,
    smtp_auth: Option<(Vec<String>, Loc)>,
    pop3_auth: Option<(Vec<String>, Loc)>,
    xclient: Option<(bool, Loc)>,
}

impl MailSet {
    fn merge(&self, parent: &MailSet) -> MailSet {
        macro_rules! pick {
            ($($f:ident),*) => { MailSet { $($f: self.$f.clone().or_else(|| parent.$f.clone()),)* } };
        }
        pick!(
            server_name,
            timeout,
            proxy_timeout,
            auth_http,
            auth_http_timeout,
            auth_http_headers,
            cert,
            key,
            starttls,
            ssl,
            real_ip_from,
            max_errors,
            imap_client_buffer,
            smtp_client_buffer,
            smtp_auth,
            pop3_auth,
            xclient
        )
    }
}

/// A directive valid in `mail {}` and `server {}`; false if not one of them.
fn mail_common(ctx: &mut Ctx<'_>, set: &mut MailSet, d: &Directive) -> bool {
    match d.name.as_str() {
        "server_name" => set.server_name = Some((d.arg(0).to_owned(), d.loc.clone())),
        "timeout" => set.timeout = time_arg(ctx, d),
        "proxy_timeout" => set.proxy_timeout = time_arg(ctx, d),
        "auth_http" => set.auth_http = Some((d.arg(0).to_owned(), d.loc.clone())),
        "auth_http_timeout" => set.auth_http_timeout = time_arg(ctx, d),
        "auth_http_header" => {
            if d.args.len() != 2 {
                ctx.warn(d, "expects a name and a value; not mapped");
            } else {
                let headers = set
                    .auth_http_headers
                    .get_or_insert_with(|| (Vec::new(), d.loc.clone()));
                headers.0.push((d.arg(0).to_owned(), d.arg(1).to_owned()));
            }
        }
        "ssl_certificate" => {
            if set.cert.is_some() {
                ctx.warn(d, "a second certificate (RSA next to ECDSA): Postern serves one per listener; only the first is used");
            } else {
                set.cert = Some((d.arg(0).to_owned(), d.loc.clone()));
            }
        }
        "ssl_certificate_key" => {
            if set.key.is_none() {
                set.key = Some((d.arg(0).to_owned(), d.loc.clone()));
            }
        }
        "starttls" => match d.arg(0) {
            "on" | "off" | "only" => set.starttls = Some((d.arg(0).to_owned(), d.loc.clone())),
            other => ctx.warn(
                d,
                format!("\"{other}\": expected on, off or only; not mapped"),
            ),
        },
        "ssl" => {
            set.ssl = on_off(ctx, d);
            ctx.warn(
                d,
                "obsolete (removed in nginx 1.25.1): mapped as listen ... ssl",
            );
        }
        "set_real_ip_from" => set
            .real_ip_from
            .get_or_insert_with(Vec::new)
            .push((d.arg(0).to_owned(), d.loc.clone())),
        "max_errors" => match d.arg(0).parse::<u64>() {
            Ok(n) => set.max_errors = Some((n, d.loc.clone())),
            Err(_) => ctx.warn(d, "not a number; not mapped"),
        },
        "imap_client_buffer" => set.imap_client_buffer = size_arg(ctx, d),
        "smtp_client_buffer" => set.smtp_client_buffer = size_arg(ctx, d),
        "smtp_auth" => {
            let methods = auth_methods(ctx, d, "PLAIN and LOGIN");
            set.smtp_auth = Some((methods, d.loc.clone()));
        }
        "pop3_auth" => {
            let methods = auth_methods(ctx, d, "USER/PASS, PLAIN, LOGIN and APOP");
            set.pop3_auth = Some((methods, d.loc.clone()));
        }
        "xclient" => {
            if let Some(on) = on_off(ctx, d) {
                set.xclient = Some((on, d.loc.clone()));
            }
        }
        "proxy_protocol" => ctx.warn(
            d,
            "PROXY protocol to the backends is set per backend in Postern; the auth server names \
             the backends here, so none is declared: add [backends.NAME] for each address it \
             returns, with proxy_protocol = \"v1\" in its services",
        ),
        name => match unmapped_reason(name) {
            Some(reason) => ctx.warn(d, format!("not mapped: {reason}")),
            None => return false,
        },
    }
    true
}

/// `smtp_auth` and `pop3_auth` methods, lower-cased; the ones Postern cannot offer are
/// warned about (the others are what Postern offers anyway).
fn auth_methods(ctx: &mut Ctx<'_>, d: &Directive, supported: &str) -> Vec<String> {
    let methods: Vec<String> = d
        .args
        .iter()
        .map(|a| a.value.to_ascii_lowercase())
        .collect();
    for m in &methods {
        if matches!(m.as_str(), "cram-md5" | "external") {
            ctx.warn(
                d,
                format!("{m}: not supported by Postern ({supported} are)"),
            );
        }
    }
    methods
}

pub(super) fn mail(ctx: &mut Ctx<'_>, block: &[Directive]) {
    let mut top = MailSet::default();
    let mut servers = Vec::new();
    for d in block {
        check_variables(ctx, d);
        match (d.name.as_str(), &d.block) {
            ("server", Some(b)) => servers.push((d, b)),
            _ => {
                if !mail_common(ctx, &mut top, d) {
                    ctx.warn(d, "unknown in mail {}; ignored");
                }
            }
        }
    }
    if servers.is_empty() {
        ctx.warn_at(None, "mail", "no server {} block: nothing to listen on");
    }
    // The first submission listener, where the xclient difference is reported.
    let mut smtp_seen: Option<Loc> = None;
    for (server, body) in servers {
        mail_server(ctx, &top, server, body, &mut smtp_seen);
    }
    if let Some(loc) = smtp_seen {
        ctx.warn_at(
            Some(&loc),
            "xclient",
            "nginx's xclient on (the default) is not mapped: Postern sends XCLIENT only to submission backends declared as [backends.NAME] with [backends.NAME.submission] login = \"xclient\" at the address the auth server returns (Postfix smtpd_authorized_xclient_hosts must list Postern); to any other address it replays AUTH with the auth server's Auth-Pass, so the auth server must return one (nginx needed it only with proxy_smtp_auth on)",
        );
    }
}

/// A `server {}` block's own directives: its settings, `listen`s and `protocol`.
struct MailServer {
    set: MailSet,
    listens: Vec<Listen>,
    protocol: Option<(String, Loc)>,
}

fn read_mail_server(ctx: &mut Ctx<'_>, body: &[Directive]) -> MailServer {
    let mut s = MailServer {
        set: MailSet::default(),
        listens: Vec::new(),
        protocol: None,
    };
    for d in body {
        check_variables(ctx, d);
        match d.name.as_str() {
            "listen" => {
                if let Some(l) = listen(ctx, d, false) {
                    s.listens.push(l);
                }
            }
            "protocol" => match d.arg(0) {
                p @ ("imap" | "pop3" | "smtp") => s.protocol = Some((p.to_owned(), d.loc.clone())),
                other => ctx.warn(d, format!("unknown protocol \"{other}\"")),
            },
            _ => {
                if !mail_common(ctx, &mut s.set, d) {
                    ctx.warn(d, "unknown in mail server {}; ignored");
                }
            }
        }
    }
    s
}

fn mail_server(
    ctx: &mut Ctx<'_>,
    top: &MailSet,
    server: &Directive,
    body: &[Directive],
    smtp_seen: &mut Option<Loc>,
) {
    let s = read_mail_server(ctx, body);
    let eff = s.set.merge(top);
    if s.listens.is_empty() {
        ctx.warn(
            server,
            "server without listen (nginx refuses this); left out",
        );
        return;
    }
    let Some((auth_url, auth_loc)) = eff.auth_http.clone() else {
        ctx.warn(
            server,
            "no auth_http (nginx requires one; it is how nginx picks a backend): left out",
        );
        return;
    };
    if let Err(e) = postern_auth::auth_http::Endpoint::parse(&auth_url) {
        ctx.warn_at(
            Some(&auth_loc),
            "auth_http",
            format!("\"{auth_url}\": {e}; this server is left out"),
        );
        return;
    }
    let mut made = 0;
    for l in &s.listens {
        if mail_listener(ctx, &eff, l, s.protocol.as_ref(), smtp_seen) {
            made += 1;
        }
    }
    // A server none of whose listeners made it contributes no value for all of them.
    if made > 0 {
        offer_server_values(ctx, &eff, auth_url, &auth_loc, smtp_seen.is_some());
    }
}

/// One `listen` of a mail server; false if it was left out.
fn mail_listener(
    ctx: &mut Ctx<'_>,
    eff: &MailSet,
    l: &Listen,
    protocol: Option<&(String, Loc)>,
    smtp_seen: &mut Option<Loc>,
) -> bool {
    let Some(nginx_proto) = nginx_protocol(ctx, protocol, l) else {
        return false;
    };
    let Some(postern_proto) = postern_protocol(ctx, eff, &nginx_proto, l, smtp_seen) else {
        return false;
    };
    let (tls, insecure) = mail_tls(ctx, eff, l);
    let cert = if tls == "none" {
        None
    } else {
        match mail_cert(ctx, eff, l) {
            Some(c) => Some(c),
            None => return false,
        }
    };
    let listener = NewListener {
        protocol: postern_proto,
        tls,
        insecure,
        cert,
        http_auth: true,
        real_ip_from: eff.real_ip_from.as_deref().unwrap_or_default(),
    };
    if !push_listener(ctx, l, listener) {
        return false;
    }
    if postern_proto == "pop3"
        && let Some((methods, loc)) = &eff.pop3_auth
    {
        let apop = methods.iter().any(|m| m == "apop");
        offer(
            &mut ctx.warnings,
            &mut ctx.globals.apop,
            apop,
            loc,
            show_plain,
        );
    }
    true
}

/// The server's `protocol`, else the one nginx guesses from the port.
fn nginx_protocol(
    ctx: &mut Ctx<'_>,
    protocol: Option<&(String, Loc)>,
    l: &Listen,
) -> Option<String> {
    if let Some((p, _)) = protocol {
        return Some(p.clone());
    }
    match port_protocol(l.bind.port()) {
        Some(("submission", _)) => Some("smtp".to_owned()),
        Some((p, _)) => Some(p.to_owned()),
        None => {
            ctx.warn_at(
                Some(&l.loc),
                "listen",
                format!(
                    "port {} with no protocol directive (nginx refuses this); left out",
                    l.bind.port()
                ),
            );
            None
        }
    }
}

/// nginx's `smtp` is authenticated submission for Postern: an auth-less relay would
/// need auth_http per message, which Postern's MX relay (routing by pins) does not do.
fn postern_protocol(
    ctx: &mut Ctx<'_>,
    eff: &MailSet,
    nginx_proto: &str,
    l: &Listen,
    smtp_seen: &mut Option<Loc>,
) -> Option<&'static str> {
    match nginx_proto {
        "imap" => return Some("imap"),
        "pop3" => return Some("pop3"),
        _ => {}
    }
    let methods = eff
        .smtp_auth
        .as_ref()
        .map(|(m, _)| m.clone())
        .unwrap_or_default();
    if methods.iter().all(|m| m == "none") && !methods.is_empty() {
        ctx.warn_at(
            eff.smtp_auth.as_ref().map(|(_, l)| l),
            "smtp_auth",
            "\"none\" only (an unauthenticated relay asking auth_http per message): Postern's MX relay routes recipients by pins, not auth_http; this listener is left out",
        );
        return None;
    }
    if methods.iter().any(|m| m == "none") {
        ctx.warn_at(
            eff.smtp_auth.as_ref().map(|(_, l)| l),
            "smtp_auth",
            "\"none\" dropped: Postern's submission listener requires AUTH",
        );
    }
    smtp_seen.get_or_insert_with(|| l.loc.clone());
    Some("submission")
}

/// The listener's `tls` and whether plaintext logins stay allowed: nginx allows them
/// without TLS and with `starttls on`, so the import keeps them, with a warning.
fn mail_tls(ctx: &mut Ctx<'_>, eff: &MailSet, l: &Listen) -> (&'static str, bool) {
    if l.ssl || eff.ssl == Some(true) {
        return ("implicit", false);
    }
    let starttls = eff
        .starttls
        .as_ref()
        .map(|(s, _)| s.as_str())
        .unwrap_or("off");
    match starttls {
        "only" => ("starttls", false),
        "on" => {
            ctx.warn_at(
                eff.starttls.as_ref().map(|(_, l)| l),
                "starttls",
                "\"on\" lets clients log in before STARTTLS: kept (insecure_plaintext_auth = true); prefer starttls only",
            );
            ("starttls", true)
        }
        _ => {
            ctx.warn_at(
                Some(&l.loc),
                "listen",
                "no TLS on this listener: plaintext logins kept (insecure_plaintext_auth = true), as in nginx",
            );
            ("none", true)
        }
    }
}

/// The certificate of a TLS listener; `None` (with a warning) leaves it out.
fn mail_cert(ctx: &mut Ctx<'_>, eff: &MailSet, l: &Listen) -> Option<CertPair> {
    match (&eff.cert, &eff.key) {
        (Some((c, cl)), Some((k, _))) => {
            if c.starts_with("data:")
                || k.starts_with("data:")
                || k.starts_with("engine:")
                || k.starts_with("store:")
            {
                ctx.warn_at(Some(cl), "ssl_certificate", "data:, engine: and store: are not supported: Postern reads PEM files; this listener is left out");
                return None;
            }
            Some(CertPair {
                cert: ctx.path(c),
                key: ctx.path(k),
            })
        }
        _ => {
            ctx.warn_at(
                Some(&l.loc),
                "listen",
                "TLS without ssl_certificate and ssl_certificate_key (nginx refuses this); left out",
            );
            None
        }
    }
}

/// The values of a server that Postern has once for all listeners.
fn offer_server_values(
    ctx: &mut Ctx<'_>,
    eff: &MailSet,
    auth_url: String,
    auth_loc: &Loc,
    smtp_seen: bool,
) {
    let g = &mut ctx.globals;
    let w = &mut ctx.warnings;
    let auth_url = if auth_url.starts_with("http://") || auth_url.starts_with("unix:") {
        auth_url
    } else {
        format!("http://{auth_url}")
    };
    offer(w, &mut g.auth_url, auth_url, auth_loc, |s| s.clone());
    if let Some((t, loc)) = &eff.auth_http_timeout {
        offer(w, &mut g.auth_timeout, *t, loc, show_time);
    }
    if let Some((h, loc)) = &eff.auth_http_headers {
        offer(w, &mut g.auth_headers, h.clone(), loc, |h| {
            h.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        });
    }
    if let Some((n, loc)) = &eff.server_name {
        offer(w, &mut g.hostname, n.clone(), loc, |s| s.clone());
    }
    if let Some((t, loc)) = &eff.timeout {
        offer(w, &mut g.preauth, *t, loc, show_time);
    }
    if let Some((t, loc)) = &eff.proxy_timeout {
        offer(w, &mut g.idle, *t, loc, show_time);
    }
    if let Some((n, loc)) = &eff.max_errors {
        offer(w, &mut g.max_errors, *n, loc, show_plain);
    }
    if let Some((n, loc)) = &eff.imap_client_buffer {
        offer(w, &mut g.imap_buffer, *n, loc, show_plain);
    }
    if let Some((n, loc)) = &eff.smtp_client_buffer {
        offer(w, &mut g.smtp_buffer, *n, loc, show_plain);
    }
    if let Some((false, loc)) = &eff.xclient
        && smtp_seen
    {
        ctx.warn_at(
            Some(loc),
            "xclient",
            "off: Postern replays AUTH with the auth server's Auth-Pass to backends it does not know, as nginx with xclient off and proxy_smtp_auth on; the auth server must return Auth-Pass",
        );
    }
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
        let top = MailSet {
            timeout: Some((Duration::from_secs(30), loc.clone())),
            auth_http: Some(("http://a/".to_owned(), loc.clone())),
            ..MailSet::default()
        };
        let server = MailSet {
            timeout: Some((Duration::from_secs(5), loc.clone())),
            ..MailSet::default()
        };
        let eff = server.merge(&top);
        assert_eq!(eff.timeout.map(|(t, _)| t), Some(Duration::from_secs(5)));
        assert_eq!(eff.auth_http.map(|(u, _)| u).as_deref(), Some("http://a/"));
        assert!(eff.cert.is_none());
    }
}
