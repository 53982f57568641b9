//! The values Postern has once for all listeners (timeouts, the hostname, the
//! auth_http server, front-end limits) while nginx may set them per `server {}`: the
//! first value offered wins, each different one is a warning, and [`finish_globals`]
//! writes the winners into the plan once every block is read.

use std::fmt::Display;
use std::time::Duration;

use super::super::Warning;
use super::super::emit::{AuthHttpPlan, Plan, Value};
use super::super::parse::Loc;
use super::super::units::humantime;
use super::Ctx;

/// Postern's own defaults the nginx values are compared with.
const IMAP_MAX_LINE: u64 = 16384;
const SUBMISSION_MAX_LINE: u64 = 4096;
/// IMAP IDLE clients re-issue IDLE every 29 minutes (RFC 9051 asks at most that).
const IDLE_FLOOR: Duration = Duration::from_secs(29 * 60);

/// Warnings about the winning values, given after those of the blocks.
type Later = Vec<(Option<Loc>, &'static str, String)>;

/// A value Postern has once for all listeners: the first one wins, others are reported.
pub(super) struct One<T> {
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

    /// Where the value used was written.
    fn loc(&self) -> Option<Loc> {
        self.value.as_ref().map(|(_, l)| l.clone())
    }
}

/// Every value of that kind, as the blocks offer them.
pub(super) struct Globals {
    pub(super) hostname: One<String>,
    pub(super) preauth: One<Duration>,
    pub(super) idle: One<Duration>,
    pub(super) backend_connect: One<Duration>,
    pub(super) auth_url: One<String>,
    pub(super) auth_timeout: One<Duration>,
    pub(super) auth_headers: One<Vec<(String, String)>>,
    pub(super) max_errors: One<u64>,
    pub(super) imap_buffer: One<u64>,
    pub(super) smtp_buffer: One<u64>,
    pub(super) apop: One<bool>,
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

/// Offers `v` for `one`; a second, different value is a warning.
pub(super) fn offer<T: PartialEq + Clone>(
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

pub(super) fn show_time(d: &Duration) -> String {
    humantime(*d)
}

pub(super) fn show_plain<T: Display>(v: &T) -> String {
    v.to_string()
}

/// Writes the winning values into the plan; warnings about them come last.
pub(super) fn finish_globals(ctx: &mut Ctx<'_>) {
    let mut later = Later::new();
    server_values(&ctx.globals, &mut ctx.plan, &mut later);
    front_values(&ctx.globals, &mut ctx.plan, &mut later);
    if let Some(a) = auth_http(&ctx.globals, &mut later) {
        ctx.plan.auth_http = Some(a);
    }
    for (loc, d, m) in later {
        ctx.warn_at(loc.as_ref(), d, m);
    }
}

/// `[server] hostname` and `[timeouts]`. A zero nginx timeout means "none", which
/// Postern does not allow: the key is left to Postern's default.
fn server_values(g: &Globals, plan: &mut Plan, later: &mut Later) {
    if let Some(h) = g.hostname.get() {
        if !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
        {
            plan.hostname = Some(h.clone());
        } else {
            later.push((
                g.hostname.loc(),
                "server_name",
                format!("\"{h}\" is not a host name; [server] hostname left to the system's"),
            ));
        }
    }
    if let Some(t) = g.preauth.get() {
        if t.is_zero() {
            later.push((
                g.preauth.loc(),
                "timeout",
                "0 is not allowed; not mapped".into(),
            ));
        } else {
            plan.timeouts.push(("preauth", *t));
        }
    }
    if let Some(t) = g.backend_connect.get()
        && !t.is_zero()
    {
        plan.timeouts.push(("backend_connect", *t));
    }
    if let Some(t) = g.idle.get()
        && !t.is_zero()
    {
        plan.timeouts.push(("idle", *t));
        if *t < IDLE_FLOOR {
            later.push((
                g.idle.loc(),
                "proxy_timeout",
                format!(
                    "{} is shorter than 29 minutes: IMAP IDLE clients re-issue IDLE every 29 minutes, so their sessions will be cut (Postern counts traffic both ways; nginx's mail module only the client's)",
                    humantime(*t)
                ),
            ));
        }
    }
}

/// `max_errors`, the client buffers and APOP. A buffer only maps when it is larger
/// than Postern's own line limit (a smaller one would refuse what Postern accepts
/// today) and when a listener of that protocol exists.
fn front_values(g: &Globals, plan: &mut Plan, later: &mut Later) {
    if let Some(n) = g.max_errors.get() {
        let n = *n;
        for s in ["imap", "pop3", "submission"] {
            plan.set(s, "max_bad_commands", Value::Int(n));
        }
    }
    let has = |p: &str| plan.listeners.iter().any(|l| l.protocol == p);
    let (has_imap, has_sub, has_pop3) = (has("imap"), has("submission"), has("pop3"));
    if let Some(n) = g.imap_buffer.get() {
        if *n > IMAP_MAX_LINE && has_imap {
            plan.set("imap", "max_line_length", Value::Int(*n));
        } else {
            later.push((
                g.imap_buffer.loc(),
                "imap_client_buffer",
                format!("{n} bytes: not mapped, Postern's [imap] max_line_length ({IMAP_MAX_LINE}) is at least as large"),
            ));
        }
    }
    if let Some(n) = g.smtp_buffer.get() {
        if *n > SUBMISSION_MAX_LINE && has_sub {
            plan.set("submission", "max_line_length", Value::Int(*n));
        } else {
            later.push((
                g.smtp_buffer.loc(),
                "smtp_client_buffer",
                format!("{n} bytes: not mapped, Postern's [submission] max_line_length ({SUBMISSION_MAX_LINE}) is at least as large"),
            ));
        }
    }
    if g.apop.get() == Some(&true) && has_pop3 {
        plan.set("pop3", "apop", Value::Bool(true));
    }
}

/// `[auth.http]`. Headers Postern's loader would refuse are left out here, so that
/// the generated file loads.
fn auth_http(g: &Globals, later: &mut Later) -> Option<AuthHttpPlan> {
    let url = g.auth_url.get()?;
    let mut headers: Vec<(String, String)> = Vec::new();
    for (k, v) in g.auth_headers.get().cloned().unwrap_or_default() {
        let loc = g.auth_headers.loc();
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
        } else if headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(&k)) {
            later.push((
                loc,
                "auth_http_header",
                format!("{k} given twice: nginx sends both, Postern only the first"),
            ));
        } else {
            headers.push((k, v));
        }
    }
    Some(AuthHttpPlan {
        url: url.clone(),
        timeout: g.auth_timeout.get().copied().filter(|t| !t.is_zero()),
        headers,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn loc(line: usize) -> Loc {
        Loc {
            file: std::path::PathBuf::from("t.conf").into(),
            line,
        }
    }

    #[test]
    fn the_first_value_wins_and_others_are_reported() {
        let mut one = One::new("timeout");
        let mut w = Vec::new();
        offer(
            &mut w,
            &mut one,
            Duration::from_secs(30),
            &loc(1),
            show_time,
        );
        offer(
            &mut w,
            &mut one,
            Duration::from_secs(30),
            &loc(2),
            show_time,
        );
        assert!(w.is_empty(), "the same value twice is no conflict");
        offer(
            &mut w,
            &mut one,
            Duration::from_secs(60),
            &loc(3),
            show_time,
        );
        offer(
            &mut w,
            &mut one,
            Duration::from_secs(60),
            &loc(3),
            show_time,
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].message.contains("30s (from t.conf:1) is used, not 1m"),
            "{w:?}"
        );
        assert_eq!(one.get(), Some(&Duration::from_secs(30)));
        assert_eq!(one.loc(), Some(loc(1)));
    }

    #[test]
    fn winners_go_into_the_plan() {
        let mut g = Globals::default();
        let mut w = Vec::new();
        offer(&mut w, &mut g.preauth, Duration::ZERO, &loc(1), show_time);
        offer(
            &mut w,
            &mut g.idle,
            Duration::from_secs(600),
            &loc(2),
            show_time,
        );
        offer(
            &mut w,
            &mut g.hostname,
            "mail example".to_owned(),
            &loc(3),
            |s| s.clone(),
        );
        offer(&mut w, &mut g.max_errors, 3, &loc(4), show_plain);
        offer(&mut w, &mut g.imap_buffer, 4096, &loc(5), show_plain);
        let mut plan = Plan::default();
        let mut later = Later::new();
        server_values(&g, &mut plan, &mut later);
        front_values(&g, &mut plan, &mut later);
        assert_eq!(plan.timeouts, vec![("idle", Duration::from_secs(600))]);
        assert_eq!(plan.hostname, None);
        let keys: Vec<_> = later.iter().map(|(_, d, _)| *d).collect();
        assert_eq!(
            keys,
            [
                "server_name",
                "timeout",
                "proxy_timeout",
                "imap_client_buffer"
            ]
        );
        assert_eq!(
            plan.sections.len(),
            3,
            "max_bad_commands for every login protocol"
        );
        assert!(auth_http(&g, &mut later).is_none());
    }

    #[test]
    fn auth_http_headers_the_loader_would_refuse_are_left_out() {
        let mut g = Globals::default();
        let mut w = Vec::new();
        offer(
            &mut w,
            &mut g.auth_url,
            "http://a/".to_owned(),
            &loc(1),
            |s| s.clone(),
        );
        offer(
            &mut w,
            &mut g.auth_timeout,
            Duration::ZERO,
            &loc(1),
            show_time,
        );
        let headers = [
            ("X-A", "1"),
            ("bad name", "2"),
            ("X-B", "a\tb"),
            ("x-a", "3"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec();
        offer(&mut w, &mut g.auth_headers, headers, &loc(2), |_| {
            String::new()
        });
        let mut later = Later::new();
        let a = auth_http(&g, &mut later).unwrap();
        assert_eq!(a.headers, vec![("X-A".to_owned(), "1".to_owned())]);
        assert_eq!(
            a.timeout, None,
            "0 is nginx's \"no timeout\": Postern's default"
        );
        assert_eq!(later.len(), 3);
    }
}
