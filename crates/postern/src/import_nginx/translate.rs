//! nginx `mail {}` and `stream {}` directives to a Postern [`Plan`], with a warning for
//! everything that has no Postern equivalent or maps with a difference.
//!
//! `mail {}`: every `server` becomes listeners in `auth = "http"` mode (nginx's mail
//! module chooses backends only through `auth_http`), so no backend is declared.
//! `stream {}`: each upstream's servers become backends (the n-th server of a host in
//! every protocol's upstream is one backend, the seed's "one port per service per
//! container" layout), each `server { listen; proxy_pass; }` a listener, and users are
//! pinned at their first login instead of being balanced per connection.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::emit::{self, AuthHttpPlan, BackendPlan, CertPair, ListenerPlan, Plan, Service, Value};
use super::parse::{Directive, Loc};
use super::units::{humantime, parse_size, parse_time};
use super::{Error, Import, Warning};

/// Postern's own defaults the nginx values are compared with.
const IMAP_MAX_LINE: u64 = 16384;
const SUBMISSION_MAX_LINE: u64 = 4096;
const IDLE_FLOOR: Duration = Duration::from_secs(29 * 60);

struct Ctx<'a> {
    prefix: &'a Path,
    warnings: Vec<Warning>,
    plan: Plan,
    globals: Globals,
    names: BTreeMap<String, usize>,
    binds: Vec<SocketAddr>,
    /// Stream listeners (index into plan.listeners) with no TLS of their own.
    plain_stream: Vec<usize>,
    /// Stream services to attach to backends: protocol key, upstream, TLS, PROXY.
    registrations: Vec<(&'static str, String, &'static str, &'static str)>,
    upstreams: BTreeMap<String, Upstream>,
}

impl Ctx<'_> {
    fn warn(&mut self, d: &Directive, message: impl Into<String>) {
        self.warn_at(Some(&d.loc), &d.name, message);
    }

    fn warn_at(&mut self, loc: Option<&Loc>, directive: &str, message: impl Into<String>) {
        let w = Warning {
            loc: loc.cloned(),
            directive: directive.to_owned(),
            message: message.into(),
        };
        if !self.warnings.contains(&w) {
            self.warnings.push(w);
        }
    }

    /// A certificate path: nginx takes relative ones from its configuration prefix.
    /// `..` is folded away by hand (the file need not exist on this machine).
    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.prefix.join(p)
        };
        let mut out = PathBuf::new();
        for c in joined.components() {
            match c {
                std::path::Component::ParentDir if out.file_name().is_some() => {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                c => out.push(c),
            }
        }
        out
    }

    /// A unique listener name from the protocol and port.
    fn name(&mut self, base: String) -> String {
        let n = self.names.entry(base.clone()).or_insert(0);
        *n += 1;
        if *n == 1 { base } else { format!("{base}-{n}") }
    }
}

/// A value Postern has once for all listeners: the first one wins, others are reported.
struct One<T> {
    key: &'static str,
    value: Option<(T, Loc)>,
}

impl<T: PartialEq + Clone> One<T> {
    const fn new(key: &'static str) -> Self {
        Self { key, value: None }
    }

    fn offer(&mut self, v: T, loc: &Loc, show: impl Fn(&T) -> String) -> Option<Warning> {
        match &self.value {
            None => {
                self.value = Some((v, loc.clone()));
                None
            }
            Some((first, _)) if *first == v => None,
            Some((first, first_loc)) => Some(Warning {
                loc: Some(loc.clone()),
                directive: self.key.to_owned(),
                message: format!(
                    "Postern has one value for every listener: {} (from {first_loc}) is used, not {}",
                    show(first),
                    show(&v)
                ),
            }),
        }
    }

    fn get(&self) -> Option<&T> {
        self.value.as_ref().map(|(v, _)| v)
    }
}

struct Globals {
    hostname: One<String>,
    preauth: One<Duration>,
    idle: One<Duration>,
    backend_connect: One<Duration>,
    auth_url: One<String>,
    auth_timeout: One<Duration>,
    auth_headers: One<Vec<(String, String)>>,
    max_errors: One<u64>,
    imap_buffer: One<u64>,
    smtp_buffer: One<u64>,
    apop: One<bool>,
}

impl Default for Globals {
    fn default() -> Self {
        Self {
            hostname: One::new("server_name"),
            preauth: One::new("timeout"),
            idle: One::new("proxy_timeout"),
            backend_connect: One::new("proxy_connect_timeout"),
            auth_url: One::new("auth_http"),
            auth_timeout: One::new("auth_http_timeout"),
            auth_headers: One::new("auth_http_header"),
            max_errors: One::new("max_errors"),
            imap_buffer: One::new("imap_client_buffer"),
            smtp_buffer: One::new("smtp_client_buffer"),
            apop: One::new("pop3_auth"),
        }
    }
}

fn offer<T: PartialEq + Clone>(
    warnings: &mut Vec<Warning>,
    one: &mut One<T>,
    v: T,
    loc: &Loc,
    show: impl Fn(&T) -> String,
) {
    if let Some(w) = one.offer(v, loc, show)
        && !warnings.contains(&w)
    {
        warnings.push(w);
    }
}

fn show_time(d: &Duration) -> String {
    humantime(*d)
}

fn show_plain<T: Display>(v: &T) -> String {
    v.to_string()
}

/// Translates the parsed file.
pub(super) fn translate(
    directives: &[Directive],
    source: &str,
    prefix: &Path,
) -> Result<Import, Error> {
    let mut ctx = Ctx {
        prefix,
        warnings: Vec::new(),
        plan: Plan {
            source: source.to_owned(),
            ..Plan::default()
        },
        globals: Globals::default(),
        names: BTreeMap::new(),
        binds: Vec::new(),
        plain_stream: Vec::new(),
        registrations: Vec::new(),
        upstreams: BTreeMap::new(),
    };
    let mut found = false;
    for d in directives {
        match (d.name.as_str(), &d.block) {
            ("mail", Some(block)) => {
                found = true;
                mail(&mut ctx, block);
            }
            ("stream", Some(block)) => {
                found = true;
                stream(&mut ctx, block);
            }
            ("imap", Some(_)) => ctx.warn(
                d,
                "the pre-0.5.15 name of mail {}: rename it to mail and import again",
            ),
            // http {}, events {} and the process settings (user, worker_processes, pid,
            // load_module, ...) have nothing to do with mail proxying.
            _ => {}
        }
    }
    if !found {
        return Err(Error::Nothing(format!(
            "{source}: no mail {{}} or stream {{}} block (is this the file that includes them?)"
        )));
    }
    finish_stream(&mut ctx);
    finish_globals(&mut ctx);
    if ctx.plan.listeners.is_empty() {
        let why: Vec<String> = ctx.warnings.iter().map(|w| format!("  {w}")).collect();
        return Err(Error::Nothing(format!(
            "{source}: nothing could be turned into a Postern listener:\n{}",
            why.join("\n")
        )));
    }
    let toml = emit::render(&ctx.plan, &ctx.warnings);
    Ok(Import {
        toml,
        warnings: ctx.warnings,
    })
}

// ---------------------------------------------------------------------------------
// listen

struct Listen {
    bind: SocketAddr,
    ssl: bool,
    proxy_protocol: bool,
    raw: String,
    loc: Loc,
}

/// `listen ADDR [ssl] [proxy_protocol] [...]`.
fn listen(ctx: &mut Ctx<'_>, d: &Directive, stream: bool) -> Option<Listen> {
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
fn port_protocol(port: u16) -> Option<(&'static str, bool)> {
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

// ---------------------------------------------------------------------------------
// mail {}

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

fn time_arg(ctx: &mut Ctx<'_>, d: &Directive) -> Option<(Duration, Loc)> {
    match parse_time(d.arg(0)) {
        Some(t) if d.args.len() == 1 => Some((t, d.loc.clone())),
        _ => {
            ctx.warn(d, format!("\"{}\" is not a time; not mapped", d.arg(0)));
            None
        }
    }
}

fn size_arg(ctx: &mut Ctx<'_>, d: &Directive) -> Option<(u64, Loc)> {
    match parse_size(d.arg(0)) {
        Some(s) if d.args.len() == 1 => Some((s, d.loc.clone())),
        _ => {
            ctx.warn(d, format!("\"{}\" is not a size; not mapped", d.arg(0)));
            None
        }
    }
}

fn on_off(ctx: &mut Ctx<'_>, d: &Directive) -> Option<bool> {
    match d.arg(0) {
        "on" => Some(true),
        "off" => Some(false),
        other => {
            ctx.warn(d, format!("\"{other}\": expected on or off; not mapped"));
            None
        }
    }
}

fn check_variables(ctx: &mut Ctx<'_>, d: &Directive) {
    let vars: Vec<&str> = d
        .args
        .iter()
        .filter(|a| a.has_variable())
        .map(|a| a.value.as_str())
        .collect();
    if !vars.is_empty() {
        let msg = format!(
            "nginx variable(s) in {}: kept as written, Postern does not expand variables",
            vars.join(" ")
        );
        ctx.warn(d, msg);
    }
}

/// Directives with no Postern equivalent, and why. Shared by mail {} and stream {}.
fn unmapped_reason(name: &str) -> Option<&'static str> {
    Some(match name {
        "imap_capabilities" | "pop3_capabilities" | "smtp_capabilities" => {
            "Postern advertises its own pre-login capabilities (submission: the extensions every backend's EHLO offers); a static list is not configurable"
        }
        "proxy_pass_error_message" => {
            "not configurable: Postern answers a refused backend login with its protocol's usual failure"
        }
        "resolver" | "resolver_timeout" => {
            "Postern does no reverse DNS lookups (no Client-Host to the auth server, no XCLIENT NAME)"
        }
        "error_log" | "access_log" | "log_format" | "open_log_file_cache" => {
            "Postern logs to standard error ([log] level)"
        }
        "proxy" => "a no-op in nginx too",
        "proxy_buffer" | "proxy_buffer_size" => "Postern bounds backend replies itself",
        "smtp_greeting_delay" => "not supported",
        "imap_auth" => {
            "Postern offers PLAIN and LOGIN (and XOAUTH2/OAUTHBEARER with [imap] oauth = true); CRAM-MD5 and EXTERNAL are not supported"
        }
        "auth_http_pass_client_cert"
        | "ssl_verify_client"
        | "ssl_client_certificate"
        | "ssl_trusted_certificate"
        | "ssl_verify_depth"
        | "ssl_crl"
        | "ssl_ocsp"
        | "ssl_ocsp_cache"
        | "ssl_ocsp_responder" => "Postern does not request client certificates",
        "ssl_protocols"
        | "ssl_ciphers"
        | "ssl_prefer_server_ciphers"
        | "ssl_ecdh_curve"
        | "ssl_dhparam"
        | "ssl_conf_command"
        | "ssl_session_cache"
        | "ssl_session_tickets"
        | "ssl_session_ticket_key"
        | "ssl_session_timeout"
        | "ssl_certificate_compression"
        | "ssl_early_data"
        | "ssl_buffer_size"
        | "ssl_handshake_timeout"
        | "ssl_reject_handshake"
        | "ssl_stapling"
        | "ssl_stapling_verify"
        | "ssl_alpn" => {
            "Postern's TLS is rustls with fixed safe settings: TLS 1.2 and 1.3, its own cipher suites and resumption"
        }
        "ssl_password_file" => {
            "encrypted private keys are not supported: give Postern a decrypted key"
        }
        "limit_conn"
        | "limit_conn_zone"
        | "limit_conn_log_level"
        | "limit_rate"
        | "allow"
        | "deny" => {
            "Postern's [limits] (per-address connections, rate, failed logins) are on by default; tune them there"
        }
        "proxy_smtp_auth" => {
            "Postern replays AUTH with the auth server's Auth-Pass, except to backends declared with [backends.NAME.submission] login = \"xclient\""
        }
        "map" | "geo" | "split_clients" | "js_import" | "js_set" | "js_access" | "js_preread"
        | "njs" | "perl" => "variables and scripts have no Postern equivalent",
        "variables_hash_max_size"
        | "variables_hash_bucket_size"
        | "server_names_hash_max_size"
        | "server_names_hash_bucket_size"
        | "tcp_nodelay"
        | "preread_buffer_size"
        | "preread_timeout"
        | "proxy_download_rate"
        | "proxy_upload_rate"
        | "proxy_socket_keepalive"
        | "proxy_half_close"
        | "proxy_requests"
        | "proxy_responses"
        | "proxy_bind"
        | "ssl_preread"
        | "proxy_next_upstream"
        | "proxy_next_upstream_tries"
        | "proxy_next_upstream_timeout"
        | "proxy_ssl_name"
        | "proxy_ssl_server_name"
        | "proxy_ssl_verify"
        | "proxy_ssl_trusted_certificate"
        | "proxy_ssl_protocols"
        | "proxy_ssl_ciphers"
        | "proxy_ssl_certificate"
        | "proxy_ssl_certificate_key"
        | "proxy_ssl_session_reuse"
        | "status_zone"
        | "health_check"
        | "health_check_timeout" => "no Postern equivalent (see docs/migrating-from-nginx.md)",
        _ => return None,
    })
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
            let methods: Vec<String> = d
                .args
                .iter()
                .map(|a| a.value.to_ascii_lowercase())
                .collect();
            for m in &methods {
                if matches!(m.as_str(), "cram-md5" | "external") {
                    ctx.warn(
                        d,
                        format!("{m}: not supported by Postern (PLAIN and LOGIN are)"),
                    );
                }
            }
            set.smtp_auth = Some((methods, d.loc.clone()));
        }
        "pop3_auth" => {
            let methods: Vec<String> = d
                .args
                .iter()
                .map(|a| a.value.to_ascii_lowercase())
                .collect();
            for m in &methods {
                if matches!(m.as_str(), "cram-md5" | "external") {
                    ctx.warn(
                        d,
                        format!(
                            "{m}: not supported by Postern (USER/PASS, PLAIN, LOGIN and APOP are)"
                        ),
                    );
                }
            }
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

fn mail(ctx: &mut Ctx<'_>, block: &[Directive]) {
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
    let mut smtp_seen: Option<Loc> = None;
    for (server, body) in servers {
        let mut set = MailSet::default();
        let mut listens = Vec::new();
        let mut protocol: Option<(String, Loc)> = None;
        for d in body {
            check_variables(ctx, d);
            match d.name.as_str() {
                "listen" => {
                    if let Some(l) = listen(ctx, d, false) {
                        listens.push(l);
                    }
                }
                "protocol" => match d.arg(0) {
                    p @ ("imap" | "pop3" | "smtp") => {
                        protocol = Some((p.to_owned(), d.loc.clone()))
                    }
                    other => ctx.warn(d, format!("unknown protocol \"{other}\"")),
                },
                _ => {
                    if !mail_common(ctx, &mut set, d) {
                        ctx.warn(d, "unknown in mail server {}; ignored");
                    }
                }
            }
        }
        let eff = set.merge(&top);
        if listens.is_empty() {
            ctx.warn(
                server,
                "server without listen (nginx refuses this); left out",
            );
            continue;
        }
        let Some((auth_url, auth_loc)) = eff.auth_http.clone() else {
            ctx.warn(
                server,
                "no auth_http (nginx requires one; it is how nginx picks a backend): left out",
            );
            continue;
        };
        if let Err(e) = postern_auth::auth_http::Endpoint::parse(&auth_url) {
            ctx.warn_at(
                Some(&auth_loc),
                "auth_http",
                format!("\"{auth_url}\": {e}; this server is left out"),
            );
            continue;
        }
        let mut made = 0;
        for l in listens {
            let nginx_proto = match &protocol {
                Some((p, _)) => p.clone(),
                None => {
                    match port_protocol(l.bind.port()) {
                        Some((p, _)) => {
                            if p == "submission" {
                                "smtp".to_owned()
                            } else {
                                p.to_owned()
                            }
                        }
                        None => {
                            ctx.warn_at(
                            Some(&l.loc),
                            "listen",
                            format!("port {} with no protocol directive (nginx refuses this); left out", l.bind.port()),
                        );
                            continue;
                        }
                    }
                }
            };
            let postern_proto: &'static str = match nginx_proto.as_str() {
                "imap" => "imap",
                "pop3" => "pop3",
                _ => {
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
                        continue;
                    }
                    if methods.iter().any(|m| m == "none") {
                        ctx.warn_at(
                            eff.smtp_auth.as_ref().map(|(_, l)| l),
                            "smtp_auth",
                            "\"none\" dropped: Postern's submission listener requires AUTH",
                        );
                    }
                    smtp_seen.get_or_insert_with(|| l.loc.clone());
                    "submission"
                }
            };
            let implicit = l.ssl || eff.ssl == Some(true);
            let starttls = eff
                .starttls
                .as_ref()
                .map(|(s, _)| s.as_str())
                .unwrap_or("off");
            let (tls, insecure) = if implicit {
                ("implicit", false)
            } else {
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
            };
            let cert = if tls == "none" {
                None
            } else {
                match (&eff.cert, &eff.key) {
                    (Some((c, cl)), Some((k, _))) => {
                        if c.starts_with("data:")
                            || k.starts_with("data:")
                            || k.starts_with("engine:")
                            || k.starts_with("store:")
                        {
                            ctx.warn_at(Some(cl), "ssl_certificate", "data:, engine: and store: are not supported: Postern reads PEM files; this listener is left out");
                            continue;
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
                        continue;
                    }
                }
            };
            if !push_listener(
                ctx,
                &l,
                postern_proto,
                tls,
                insecure,
                cert,
                true,
                &eff.real_ip_from.clone().unwrap_or_default(),
            ) {
                continue;
            }
            made += 1;
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
        }
        if made == 0 {
            continue;
        }
        let g = &mut ctx.globals;
        let w = &mut ctx.warnings;
        let auth_url = if auth_url.starts_with("http://") || auth_url.starts_with("unix:") {
            auth_url
        } else {
            format!("http://{auth_url}")
        };
        offer(w, &mut g.auth_url, auth_url, &auth_loc, |s| s.clone());
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
            && smtp_seen.is_some()
        {
            ctx.warn_at(
                Some(loc),
                "xclient",
                "off: Postern replays AUTH with the auth server's Auth-Pass to backends it does not know, as nginx with xclient off and proxy_smtp_auth on; the auth server must return Auth-Pass",
            );
        }
    }
    if let Some(loc) = smtp_seen {
        ctx.warn_at(
            Some(&loc),
            "xclient",
            "nginx's xclient on (the default) is not mapped: Postern sends XCLIENT only to submission backends declared as [backends.NAME] with [backends.NAME.submission] login = \"xclient\" at the address the auth server returns (Postfix smtpd_authorized_xclient_hosts must list Postern); to any other address it replays AUTH with the auth server's Auth-Pass, so the auth server must return one (nginx needed it only with proxy_smtp_auth on)",
        );
    }
}

/// Adds a listener; false if its address is taken.
#[allow(clippy::too_many_arguments)]
fn push_listener(
    ctx: &mut Ctx<'_>,
    l: &Listen,
    protocol: &'static str,
    tls: &'static str,
    insecure: bool,
    cert: Option<CertPair>,
    http_auth: bool,
    real_ip_from: &[(String, Loc)],
) -> bool {
    if ctx.binds.contains(&l.bind) {
        ctx.warn_at(
            Some(&l.loc),
            "listen",
            format!("{} is already used by another listener; left out", l.bind),
        );
        return false;
    }
    let accept_proxy_from = if l.proxy_protocol {
        proxy_networks(ctx, real_ip_from, l)
    } else {
        Vec::new()
    };
    ctx.binds.push(l.bind);
    let name = ctx.name(listener_name(protocol, tls, l.bind.port()));
    ctx.plan.listeners.push(ListenerPlan {
        name,
        protocol,
        bind: l.bind,
        tls,
        insecure_plaintext_auth: insecure,
        accept_proxy_from,
        cert,
        http_auth,
        comment: format!("{}: listen {}", l.loc, l.raw),
        loc: l.loc.clone(),
    });
    true
}

fn finish_globals(ctx: &mut Ctx<'_>) {
    let g = &ctx.globals;
    let mut later: Vec<(Option<Loc>, &'static str, String)> = Vec::new();
    if let Some(h) = g.hostname.get() {
        if !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
        {
            ctx.plan.hostname = Some(h.clone());
        } else {
            later.push((
                g.hostname.value.as_ref().map(|(_, l)| l.clone()),
                "server_name",
                format!("\"{h}\" is not a host name; [server] hostname left to the system's"),
            ));
        }
    }
    if let Some(t) = g.preauth.get() {
        if t.is_zero() {
            later.push((
                g.preauth.value.as_ref().map(|(_, l)| l.clone()),
                "timeout",
                "0 is not allowed; not mapped".into(),
            ));
        } else {
            ctx.plan.timeouts.push(("preauth", *t));
        }
    }
    if let Some(t) = g.backend_connect.get()
        && !t.is_zero()
    {
        ctx.plan.timeouts.push(("backend_connect", *t));
    }
    if let Some(t) = g.idle.get()
        && !t.is_zero()
    {
        ctx.plan.timeouts.push(("idle", *t));
        if *t < IDLE_FLOOR {
            later.push((
                g.idle.value.as_ref().map(|(_, l)| l.clone()),
                "proxy_timeout",
                format!(
                    "{} is shorter than 29 minutes: IMAP IDLE clients re-issue IDLE every 29 minutes, so their sessions will be cut (Postern counts traffic both ways; nginx's mail module only the client's)",
                    humantime(*t)
                ),
            ));
        }
    }
    if let Some(n) = g.max_errors.get() {
        let n = *n;
        for s in ["imap", "pop3", "submission"] {
            ctx.plan.set(s, "max_bad_commands", Value::Int(n));
        }
    }
    let has = |p: &str| ctx.plan.listeners.iter().any(|l| l.protocol == p);
    let (has_imap, has_sub, has_pop3) = (has("imap"), has("submission"), has("pop3"));
    if let Some(n) = g.imap_buffer.get() {
        if *n > IMAP_MAX_LINE && has_imap {
            ctx.plan.set("imap", "max_line_length", Value::Int(*n));
        } else {
            later.push((
                g.imap_buffer.value.as_ref().map(|(_, l)| l.clone()),
                "imap_client_buffer",
                format!("{n} bytes: not mapped, Postern's [imap] max_line_length ({IMAP_MAX_LINE}) is at least as large"),
            ));
        }
    }
    if let Some(n) = g.smtp_buffer.get() {
        if *n > SUBMISSION_MAX_LINE && has_sub {
            ctx.plan
                .set("submission", "max_line_length", Value::Int(*n));
        } else {
            later.push((
                g.smtp_buffer.value.as_ref().map(|(_, l)| l.clone()),
                "smtp_client_buffer",
                format!("{n} bytes: not mapped, Postern's [submission] max_line_length ({SUBMISSION_MAX_LINE}) is at least as large"),
            ));
        }
    }
    if g.apop.get() == Some(&true) && has_pop3 {
        ctx.plan.set("pop3", "apop", Value::Bool(true));
    }
    if let Some(url) = g.auth_url.get() {
        let mut headers = Vec::new();
        for (k, v) in g.auth_headers.get().cloned().unwrap_or_default() {
            let loc = g.auth_headers.value.as_ref().map(|(_, l)| l.clone());
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                later.push((
                    loc,
                    "auth_http_header",
                    format!("\"{k}\" is not a header name; left out"),
                ));
            } else if v.bytes().any(|b| b.is_ascii_control()) {
                later.push((
                    loc,
                    "auth_http_header",
                    format!("{k}: control characters in the value; left out"),
                ));
            } else if headers
                .iter()
                .any(|(h, _): &(String, String)| h.eq_ignore_ascii_case(&k))
            {
                later.push((
                    loc,
                    "auth_http_header",
                    format!("{k} given twice: nginx sends both, Postern only the first"),
                ));
            } else {
                headers.push((k, v));
            }
        }
        ctx.plan.auth_http = Some(AuthHttpPlan {
            url: url.clone(),
            timeout: g.auth_timeout.get().copied().filter(|t| !t.is_zero()),
            headers,
        });
    }
    for (loc, d, m) in later {
        ctx.warn_at(loc.as_ref(), d, m);
    }
}

// ---------------------------------------------------------------------------------
// stream {}

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

struct UpServer {
    host: String,
    port: u16,
    weight: u32,
    loc: Loc,
}

struct Upstream {
    servers: Vec<UpServer>,
    loc: Loc,
}

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

/// `host:port`, `[v6]:port`.
fn parse_host_port(s: &str) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host.to_owned(), port.parse().ok()?));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.is_empty() || host.contains(':') {
        return None;
    }
    Some((host.to_owned(), port.parse().ok().filter(|p| *p != 0)?))
}

fn upstream(ctx: &mut Ctx<'_>, d: &Directive, body: &[Directive]) {
    let name = d.arg(0).to_owned();
    let mut up = Upstream {
        servers: Vec::new(),
        loc: d.loc.clone(),
    };
    let mut health_noted = false;
    for s in body {
        check_variables(ctx, s);
        match s.name.as_str() {
            "server" => {
                let addr = s.arg(0);
                if addr.starts_with("unix:") {
                    ctx.warn(s, "unix socket backends are not supported; left out");
                    continue;
                }
                let Some((host, port)) = parse_host_port(addr) else {
                    ctx.warn(s, format!("\"{addr}\": a stream upstream server needs host:port; left out"));
                    continue;
                };
                let mut weight = 1;
                for p in s.args.iter().skip(1).map(|a| a.value.as_str()) {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    match k {
                        "weight" => match v.parse::<u32>() {
                            Ok(w) if w > 0 => weight = w,
                            _ => ctx.warn(s, format!("weight \"{v}\" is not a positive number; 1 is used")),
                        },
                        "down" => {
                            weight = 0;
                            ctx.warn(s, "down: mapped as weight = 0 (no new users); to take it out entirely, `postern backend down NAME`");
                        }
                        "backup" => ctx.warn(s, "backup: not mapped; Postern fails over within a pool (shared pools move users of a down backend to the others)"),
                        "max_fails" | "fail_timeout" => {
                            if !health_noted {
                                health_noted = true;
                                ctx.warn(s, format!("{k}: not mapped; Postern checks backends actively ([health] rise, fall, interval) and counts failed connections"));
                            }
                        }
                        _ => ctx.warn(s, format!("parameter \"{k}\" not mapped")),
                    }
                }
                up.servers.push(UpServer {
                    host,
                    port,
                    weight,
                    loc: s.loc.clone(),
                });
            }
            "least_conn" | "hash" | "random" | "ip_hash" | "least_time" => ctx.warn(
                s,
                "balancing method replaced: Postern pins each user to one backend, assigned at the first login by weight",
            ),
            "zone" | "keepalive" | "resolver" | "resolver_timeout" => {
                ctx.warn(s, "not mapped: no Postern equivalent");
            }
            _ => ctx.warn(s, "unknown in upstream {}; ignored"),
        }
    }
    if ctx.upstreams.contains_key(&name) {
        ctx.warn(
            d,
            format!("upstream \"{name}\" defined twice (nginx refuses this); the first is used"),
        );
        return;
    }
    ctx.upstreams.insert(name, up);
}

/// A protocol from an upstream's name (`imap`, `pop3`, `smtp`, ...) or its servers' ports.
fn protocol_of_upstream(name: &str, up: Option<&Upstream>) -> Option<(&'static str, bool)> {
    let n = name.to_ascii_lowercase();
    let by_name = if n.contains("imaps") {
        Some(("imap", true))
    } else if n.contains("imap") {
        Some(("imap", false))
    } else if n.contains("pop3s") || n.contains("pops") {
        Some(("pop3", true))
    } else if n.contains("pop") {
        Some(("pop3", false))
    } else if n.contains("submissions") || n.contains("smtps") {
        Some(("submission", true))
    } else if n.contains("submission") || n.contains("submit") || n.contains("msa") {
        Some(("submission", false))
    } else if n.contains("lmtp") {
        Some(("lmtp", false))
    } else if n.contains("smtp") || n.contains("mx") {
        Some(("smtp", false))
    } else {
        None
    };
    by_name.or_else(|| up.and_then(|u| u.servers.iter().find_map(|s| port_protocol(s.port))))
}

fn stream(ctx: &mut Ctx<'_>, block: &[Directive]) {
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
    for (server, body) in servers {
        let mut set = StreamSet::default();
        let mut listens = Vec::new();
        let mut pass: Option<(String, Loc)> = None;
        for d in body {
            check_variables(ctx, d);
            match d.name.as_str() {
                "listen" => {
                    if let Some(l) = listen(ctx, d, true) {
                        listens.push(l);
                    }
                }
                "proxy_pass" => pass = Some((d.arg(0).to_owned(), d.loc.clone())),
                "return" => ctx.warn(d, "not mail; ignored"),
                _ => {
                    if !stream_common(ctx, &mut set, d) {
                        ctx.warn(d, "unknown in stream server {}; ignored");
                    }
                }
            }
        }
        let eff = set.merge(&top);
        let Some((target, pass_loc)) = pass else {
            ctx.warn(server, "no proxy_pass: not a proxy; left out");
            continue;
        };
        if target.contains('$') {
            ctx.warn_at(Some(&pass_loc), "proxy_pass", format!("\"{target}\" is chosen by a variable: Postern cannot tell where it goes; left out"));
            continue;
        }
        // proxy_pass host:port without an upstream block: a one-server upstream.
        if !ctx.upstreams.contains_key(&target) {
            match parse_host_port(&target) {
                Some((host, port)) => {
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
                None => {
                    ctx.warn_at(
                        Some(&pass_loc),
                        "proxy_pass",
                        format!("no upstream \"{target}\" and not host:port; left out"),
                    );
                    continue;
                }
            }
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
        for l in listens {
            let up = ctx.upstreams.get(&target);
            let by_port = port_protocol(l.bind.port());
            let Some((protocol, implicit_port)) =
                by_port.or_else(|| protocol_of_upstream(&target, up))
            else {
                ctx.warn_at(
                    Some(&l.loc),
                    "listen",
                    format!("port {} to \"{target}\": not a mail port and the upstream's name and ports say no protocol; left out", l.bind.port()),
                );
                continue;
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
                continue;
            }
            let cert = match (&eff.cert, &eff.key) {
                (Some((c, _)), Some((k, _))) => Some(CertPair {
                    cert: ctx.path(c),
                    key: ctx.path(k),
                }),
                _ => None,
            };
            let (tls, insecure, cert) = if l.ssl || passthrough {
                let Some(cert) =
                    cert.or_else(|| ctx.plan.listeners.iter().find_map(|x| x.cert.clone()))
                else {
                    ctx.warn_at(
                        Some(&l.loc),
                        "listen",
                        if passthrough {
                            "TLS passed through to the backend: Postern must terminate TLS itself and has no certificate here; left out (add ssl_certificate/ssl_certificate_key to this server, or [tls] and a listener by hand)"
                        } else {
                            "ssl without ssl_certificate (nginx refuses this); left out"
                        },
                    );
                    continue;
                };
                if passthrough {
                    ctx.warn_at(Some(&l.loc), "listen", "TLS was passed through to the backend: Postern terminates it here (with this server's certificate) and speaks TLS to the backend");
                }
                ("implicit", false, Some(cert))
            } else {
                ("none", true, None)
            };
            if !push_listener(
                ctx,
                &l,
                protocol,
                tls,
                insecure,
                cert,
                false,
                &eff.real_ip_from.clone().unwrap_or_default(),
            ) {
                continue;
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
                .push((protocol, target.clone(), backend_tls, backend_pp));
        }
    }
}

/// Backends from the registered upstreams; plain stream listeners get STARTTLS when a
/// certificate is known; listeners whose protocol no backend serves are dropped.
fn finish_stream(ctx: &mut Ctx<'_>) {
    // (host, n-th server of that host in an upstream) -> backend.
    let mut order: Vec<(String, usize)> = Vec::new();
    let mut built: BTreeMap<(String, usize), BackendPlan> = BTreeMap::new();
    let regs = std::mem::take(&mut ctx.registrations);
    let mut balancing_noted = false;
    for (protocol, up_name, tls, pp) in &regs {
        let Some(up) = ctx.upstreams.get(up_name) else {
            continue;
        };
        let mut notes = Vec::new();
        if !balancing_noted && up.servers.len() > 1 {
            balancing_noted = true;
            notes.push((up.loc.clone(), "upstream", "per-connection balancing replaced by per-user pins: each user is assigned one backend (by weight) at the first login and stays there ([routing] unknown_users = \"assign\")".to_owned()));
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for s in &up.servers {
            let n = seen.entry(s.host.as_str()).or_insert(0);
            let key = (s.host.clone(), *n);
            *n += 1;
            let b = built.entry(key.clone()).or_insert_with(|| {
                order.push(key.clone());
                BackendPlan {
                    name: String::new(),
                    host: s.host.clone(),
                    weight: s.weight,
                    services: Vec::new(),
                    comment: String::new(),
                }
            });
            if let Some((_, existing)) = b.services.iter().find(|(p, _)| p == protocol) {
                if existing.port != s.port {
                    notes.push((s.loc.clone(), "server", format!(
                        "{}:{} ({protocol}, upstream \"{up_name}\"): this backend already uses port {} for {protocol}; Postern connects to one port per service, so this one is not used",
                        s.host, s.port, existing.port
                    )));
                }
                continue;
            }
            if b.weight != s.weight {
                notes.push((s.loc.clone(), "server", format!(
                    "weight {} differs from the weight {} this backend has in another upstream; Postern has one weight per backend, {} is used",
                    s.weight, b.weight, b.weight
                )));
            }
            b.services.push((
                protocol,
                Service {
                    port: s.port,
                    tls,
                    proxy_protocol: pp,
                },
            ));
            if !b.comment.is_empty() {
                b.comment.push_str(", ");
            }
            b.comment
                .push_str(&format!("{up_name} {}:{} ({})", s.host, s.port, s.loc));
        }
        for (loc, d, m) in notes {
            ctx.warn_at(Some(&loc), d, m);
        }
    }
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for (host, _) in &order {
        *per_host.entry(host.clone()).or_insert(0) += 1;
    }
    for key in &order {
        let Some(mut b) = built.remove(key) else {
            continue;
        };
        let base: String = b
            .host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        b.name = if per_host.get(&b.host).copied().unwrap_or(0) > 1 {
            format!("{base}-{}", key.1 + 1)
        } else {
            base
        };
        b.comment = format!("backend from upstream server(s): {}", b.comment);
        ctx.plan.backends.push(b);
    }
    if per_host.values().any(|n| *n > 1) {
        ctx.warn_at(
            None,
            "upstream",
            "several servers on one host: the n-th server of that host in each upstream was taken as one backend (one mail server with one port per service); check the pairing in [backends]",
        );
    }
    // Drop stream listeners whose protocol no backend serves.
    let served = |p: &str, backends: &[BackendPlan]| {
        backends
            .iter()
            .any(|b| b.services.iter().any(|(s, _)| *s == p))
    };
    let mut dropped = Vec::new();
    let mut kept = Vec::new();
    let mut plain = Vec::new();
    for (i, l) in std::mem::take(&mut ctx.plan.listeners)
        .into_iter()
        .enumerate()
    {
        if !l.http_auth && !served(l.protocol, &ctx.plan.backends) {
            dropped.push(l);
        } else {
            if ctx.plain_stream.contains(&i) {
                plain.push(kept.len());
            }
            kept.push(l);
        }
    }
    ctx.plan.listeners = kept;
    for l in dropped {
        ctx.warn_at(
            Some(&l.loc),
            "listen",
            format!(
                "no upstream server left for {}; listener left out",
                l.protocol
            ),
        );
    }
    // nginx stream relayed the backends' STARTTLS untouched; Postern must offer it
    // itself, with a certificate.
    let default_cert = ctx.plan.listeners.iter().find_map(|l| l.cert.clone());
    for i in plain {
        let Some(l) = ctx.plan.listeners.get_mut(i) else {
            continue;
        };
        let loc = l.loc.clone();
        let msg = match &default_cert {
            Some(c) => {
                l.tls = "starttls";
                l.cert = Some(c.clone());
                "STARTTLS was relayed to the backend untouched; Postern offers it itself now, with the [tls] certificate (plaintext logins still allowed: insecure_plaintext_auth = true; turn it off once clients use STARTTLS)".to_owned()
            }
            None => "STARTTLS was relayed to the backend untouched; Postern terminates TLS itself and no certificate is known, so this listener is plaintext with plaintext logins allowed (insecure_plaintext_auth = true). Add [tls] cert/key and set tls = \"starttls\"".to_owned(),
        };
        ctx.warn_at(Some(&loc), "listen", msg);
    }
}
