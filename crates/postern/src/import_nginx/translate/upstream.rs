//! The upstreams of `stream {}` and the backends they become: the n-th server of a
//! host in every protocol's upstream is one backend (the seed's "one port per service
//! per container" layout), and users are pinned at their first login instead of
//! being balanced per connection.

use std::collections::BTreeMap;

use super::super::emit::{BackendPlan, Service};
use super::super::parse::{Directive, Loc};
use super::Ctx;
use super::directives::check_variables;
use super::listen::port_protocol;

/// A stream listener's protocol key, its upstream, and the TLS and PROXY settings the
/// upstream's servers get as backends of that protocol.
pub(super) type Registration = (&'static str, String, &'static str, &'static str);

/// One `server` of an upstream.
pub(super) struct UpServer {
    pub(super) host: String,
    pub(super) port: u16,
    /// 0 for `down`: no new users.
    pub(super) weight: u32,
    pub(super) loc: Loc,
}

/// An `upstream {}` block (or the one-server upstream of `proxy_pass host:port`).
pub(super) struct Upstream {
    pub(super) servers: Vec<UpServer>,
    pub(super) loc: Loc,
}

/// `host:port`, `[v6]:port`.
pub(super) fn parse_host_port(s: &str) -> Option<(String, u16)> {
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

/// `upstream NAME { server ...; }`.
pub(super) fn upstream(ctx: &mut Ctx<'_>, d: &Directive, body: &[Directive]) {
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
                if let Some(server) = up_server(ctx, s, &mut health_noted) {
                    up.servers.push(server);
                }
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

/// An upstream's `server ADDR [weight=N] [down] ...`; `None` (with a warning) if it
/// cannot be a backend. The passive health parameters are reported once per upstream.
fn up_server(ctx: &mut Ctx<'_>, s: &Directive, health_noted: &mut bool) -> Option<UpServer> {
    let addr = s.arg(0);
    if addr.starts_with("unix:") {
        ctx.warn(s, "unix socket backends are not supported; left out");
        return None;
    }
    let Some((host, port)) = parse_host_port(addr) else {
        ctx.warn(
            s,
            format!("\"{addr}\": a stream upstream server needs host:port; left out"),
        );
        return None;
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
                if !*health_noted {
                    *health_noted = true;
                    ctx.warn(s, format!("{k}: not mapped; Postern checks backends actively ([health] rise, fall, interval) and counts failed connections"));
                }
            }
            _ => ctx.warn(s, format!("parameter \"{k}\" not mapped")),
        }
    }
    Some(UpServer {
        host,
        port,
        weight,
        loc: s.loc.clone(),
    })
}

/// A protocol from an upstream's name (`imap`, `pop3`, `smtp`, ...) or its servers' ports.
pub(super) fn protocol_of_upstream(
    name: &str,
    up: Option<&Upstream>,
) -> Option<(&'static str, bool)> {
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

/// Backends from the registered upstreams; plain stream listeners get STARTTLS when a
/// certificate is known; listeners whose protocol no backend serves are dropped.
pub(super) fn finish_stream(ctx: &mut Ctx<'_>) {
    let (order, built) = build_backends(ctx);
    name_backends(ctx, &order, built);
    let plain = drop_unserved(ctx);
    offer_starttls(ctx, plain);
}

/// A backend by (host, n-th server of that host in an upstream), in first-seen order.
type Built = BTreeMap<(String, usize), BackendPlan>;

fn build_backends(ctx: &mut Ctx<'_>) -> (Vec<(String, usize)>, Built) {
    let mut order: Vec<(String, usize)> = Vec::new();
    let mut built: Built = BTreeMap::new();
    let regs = std::mem::take(&mut ctx.registrations);
    let mut balancing_noted = false;
    for reg in &regs {
        let Some(up) = ctx.upstreams.get(&reg.1) else {
            continue;
        };
        // Collected first: `up` borrows the context the warnings go to.
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
            add_service(b, reg, s, &mut notes);
        }
        for (loc, d, m) in notes {
            ctx.warn_at(Some(&loc), d, m);
        }
    }
    (order, built)
}

/// Warnings to give once the upstreams are no longer borrowed.
type Notes = Vec<(Loc, &'static str, String)>;

/// Adds an upstream server's port to its backend as the service of the registered
/// protocol (`reg`: protocol, upstream, TLS, PROXY).
fn add_service(b: &mut BackendPlan, reg: &Registration, s: &UpServer, notes: &mut Notes) {
    let (protocol, up_name, tls, proxy_protocol) = (reg.0, reg.1.as_str(), reg.2, reg.3);
    if let Some((_, existing)) = b.services.iter().find(|(p, _)| *p == protocol) {
        if existing.port != s.port {
            notes.push((s.loc.clone(), "server", format!(
                "{}:{} ({protocol}, upstream \"{up_name}\"): this backend already uses port {} for {protocol}; Postern connects to one port per service, so this one is not used",
                s.host, s.port, existing.port
            )));
        }
        return;
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
            proxy_protocol,
        },
    ));
    if !b.comment.is_empty() {
        b.comment.push_str(", ");
    }
    b.comment
        .push_str(&format!("{up_name} {}:{} ({})", s.host, s.port, s.loc));
}

/// Backend names from their hosts (characters a backend name cannot have become
/// `_`), numbered when a host has several.
fn name_backends(ctx: &mut Ctx<'_>, order: &[(String, usize)], mut built: Built) {
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for (host, _) in order {
        *per_host.entry(host.clone()).or_insert(0) += 1;
    }
    for key in order {
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
}

/// Drops the stream listeners whose protocol no backend serves; returns the new
/// indices of the plain stream listeners that are kept.
fn drop_unserved(ctx: &mut Ctx<'_>) -> Vec<usize> {
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
    plain
}

/// nginx stream relayed the backends' STARTTLS untouched; Postern must offer it
/// itself, with a certificate.
fn offer_starttls(ctx: &mut Ctx<'_>, plain: Vec<usize>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            parse_host_port("mail.internal:143"),
            Some(("mail.internal".into(), 143))
        );
        assert_eq!(
            parse_host_port("[2001:db8::1]:993"),
            Some(("2001:db8::1".into(), 993))
        );
        for bad in ["mail.internal", ":143", "2001:db8::1:143", "h:0", "h:imap"] {
            assert_eq!(parse_host_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn protocols_from_names_then_ports() {
        assert_eq!(
            protocol_of_upstream("imaps_backends", None),
            Some(("imap", true))
        );
        assert_eq!(protocol_of_upstream("POP3", None), Some(("pop3", false)));
        assert_eq!(
            protocol_of_upstream("msa", None),
            Some(("submission", false))
        );
        assert_eq!(
            protocol_of_upstream("mx_servers", None),
            Some(("smtp", false))
        );
        let loc = Loc {
            file: std::path::PathBuf::from("t.conf").into(),
            line: 1,
        };
        let up = Upstream {
            servers: vec![UpServer {
                host: "h".into(),
                port: 995,
                weight: 1,
                loc: loc.clone(),
            }],
            loc,
        };
        assert_eq!(
            protocol_of_upstream("backends", Some(&up)),
            Some(("pop3", true))
        );
        assert_eq!(protocol_of_upstream("backends", None), None);
    }
}
