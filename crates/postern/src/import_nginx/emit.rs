//! The Postern configuration to write, and its TOML text. Only keys that
//! `config::file` knows are ever produced; the tests load the result with the real
//! loader.
//!
//! The TOML itself is written by the `toml` crate (quoting, escapes, key syntax are
//! its business), one fragment per section. The comments are lines written around
//! those fragments: toml's serializer has no notion of comments (`toml_edit` has, but
//! it is not a dependency, and this file is written once, never edited in place), and
//! a fragment per commented section keeps each note right above what it explains.
//! A fragment names only the tables it fills (`[routing.sql]` comes out without a
//! second `[routing]` header), so fragments concatenate into one valid document.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::Warning;
use super::units::humantime;

/// A certificate chain and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CertPair {
    /// `cert`.
    pub cert: PathBuf,
    /// `key`.
    pub key: PathBuf,
}

/// A TOML value of the kinds Postern's keys take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub(super) enum Value {
    /// An integer.
    Int(u64),
    /// A boolean.
    Bool(bool),
}

/// One backend service (`[backends.NAME.imap]` and friends).
#[derive(Debug, Clone)]
pub(super) struct Service {
    /// `port`.
    pub port: u16,
    /// `tls`: `none`, `starttls`, `implicit`.
    pub tls: &'static str,
    /// `proxy_protocol`: `none`, `v1`, `v2`.
    pub proxy_protocol: &'static str,
}

/// `[backends.NAME]`.
#[derive(Debug, Clone)]
pub(super) struct BackendPlan {
    /// The table name.
    pub name: String,
    /// `host`.
    pub host: String,
    /// `weight`.
    pub weight: u32,
    /// Services by protocol key (`imap`, `pop3`, `submission`, `smtp`, `lmtp`).
    pub services: Vec<(&'static str, Service)>,
    /// Where it came from.
    pub comment: String,
}

/// One `[[listeners]]`.
#[derive(Debug, Clone)]
pub(super) struct ListenerPlan {
    /// `name`.
    pub name: String,
    /// `protocol`.
    pub protocol: &'static str,
    /// `bind`.
    pub bind: SocketAddr,
    /// `tls`.
    pub tls: &'static str,
    /// `insecure_plaintext_auth`.
    pub insecure_plaintext_auth: bool,
    /// `accept_proxy_from`.
    pub accept_proxy_from: Vec<String>,
    /// The certificate this listener needs (TLS listeners only).
    pub cert: Option<CertPair>,
    /// `auth`: `Some("http")` for auth_http listeners.
    pub http_auth: bool,
    /// Where it came from.
    pub comment: String,
    /// The `listen` directive.
    pub loc: super::Loc,
}

/// `[auth.http]`.
#[derive(Debug, Clone, Default)]
pub(super) struct AuthHttpPlan {
    /// `url`.
    pub url: String,
    /// `timeout`.
    pub timeout: Option<Duration>,
    /// `headers`.
    pub headers: Vec<(String, String)>,
}

/// The whole configuration to write.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// The nginx file it came from.
    pub source: String,
    /// `[server] hostname`.
    pub hostname: Option<String>,
    /// `[timeouts]`.
    pub timeouts: Vec<(&'static str, Duration)>,
    /// `[imap]`, `[pop3]`, `[submission]`, `[smtp]` keys.
    pub sections: Vec<(&'static str, Vec<(&'static str, Value)>)>,
    /// `[auth.http]`.
    pub auth_http: Option<AuthHttpPlan>,
    /// The backends (stream upstreams).
    pub backends: Vec<BackendPlan>,
    /// The listeners.
    pub listeners: Vec<ListenerPlan>,
}

impl Plan {
    /// Sets `[section] key = value`.
    pub(super) fn set(&mut self, section: &'static str, key: &'static str, value: Value) {
        let idx = match self.sections.iter().position(|(s, _)| *s == section) {
            Some(i) => i,
            None => {
                self.sections.push((section, Vec::new()));
                self.sections.len() - 1
            }
        };
        if let Some((_, keys)) = self.sections.get_mut(idx) {
            keys.retain(|(k, _)| *k != key);
            keys.push((key, value));
        }
    }
}

/// A map whose entries keep the plan's order (a `BTreeMap` or `toml::Table` would sort
/// them), so that the file reads in the order nginx's did.
struct Map<'a, V>(Vec<(&'a str, V)>);

impl<V: Serialize> Serialize for Map<'_, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// `{ key = value }`: the path of a fragment's table (`backends.NAME`).
fn one<V>(key: &str, value: V) -> Map<'_, V> {
    Map(vec![(key, value)])
}

/// A certificate pair as the loader reads it. Paths are written as displayed, as
/// before: a path that is not UTF-8 cannot be TOML text anyway.
#[derive(Serialize)]
struct CertToml {
    cert: String,
    key: String,
}

impl From<&CertPair> for CertToml {
    fn from(c: &CertPair) -> Self {
        Self {
            cert: c.cert.display().to_string(),
            key: c.key.display().to_string(),
        }
    }
}

#[derive(Serialize)]
struct AuthToml<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
    http: AuthHttpToml<'a>,
}

#[derive(Serialize)]
struct AuthHttpToml<'a> {
    url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    /// A table of its own (`[auth.http.headers]`) rather than nginx's inline list:
    /// the serializer writes every table as a section.
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<Map<'a, &'a str>>,
}

/// `[routing]` for an auth_http import: the auth server names the backends.
#[derive(Serialize)]
struct StaticRoutingToml {
    store: &'static str,
    /// Empty but present: the static store needs the table.
    #[serde(rename = "static")]
    routes: Map<'static, String>,
}

#[derive(Serialize)]
struct SqlRoutingToml {
    unknown_users: &'static str,
}

#[derive(Serialize)]
struct SqlToml {
    url: &'static str,
}

#[derive(Serialize)]
struct PoolToml {
    mode: &'static str,
    failover: &'static str,
}

#[derive(Serialize)]
struct ServiceToml {
    port: u16,
    #[serde(skip_serializing_if = "is_none_str")]
    tls: &'static str,
    #[serde(skip_serializing_if = "is_none_str")]
    proxy_protocol: &'static str,
}

/// The loader's defaults are left out, so the file shows only what differs.
fn is_none_str(s: &&'static str) -> bool {
    *s == "none"
}

#[derive(Serialize)]
struct BackendToml<'a> {
    host: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
    /// `imap`, `pop3`, ...: tables, after the values above.
    #[serde(flatten)]
    services: Map<'a, ServiceToml>,
}

#[derive(Serialize)]
struct ListenerToml<'a> {
    name: &'a str,
    protocol: &'static str,
    bind: String,
    tls: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    insecure_plaintext_auth: Option<bool>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    accept_proxy_from: &'a [String],
    /// A listener's own pair, when it is not `[tls]`.
    #[serde(flatten)]
    cert: Option<CertToml>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<&'static str>,
}

/// The file being written: comment lines and serialized fragments.
#[derive(Default)]
struct Doc {
    text: String,
}

impl Doc {
    /// `# text` on one line: a line break in a warning must not end the comment.
    fn comment(&mut self, text: &str) {
        self.text.push_str("# ");
        self.text.push_str(&text.replace(['\r', '\n'], " "));
        self.text.push('\n');
    }

    fn blank(&mut self) {
        self.text.push('\n');
    }

    fn fragment(&mut self, value: &impl Serialize) -> Result<(), toml::ser::Error> {
        self.text.push_str(&toml::to_string(value)?);
        Ok(())
    }
}

/// The configuration file's text. An error is the serializer refusing a value (an
/// integer beyond TOML's range), which no configuration could load either.
pub(super) fn render(plan: &Plan, warnings: &[Warning]) -> Result<String, toml::ser::Error> {
    let mut d = Doc::default();
    header(&mut d, plan, warnings);
    // The default certificate: the first TLS listener's; others name their own.
    let default_cert = plan.listeners.iter().find_map(|l| l.cert.clone());
    instance(&mut d, plan, default_cert.as_ref())?;
    let all_http = !plan.listeners.is_empty() && plan.listeners.iter().all(|l| l.http_auth);
    if let Some(a) = &plan.auth_http {
        auth(&mut d, a, all_http)?;
    }
    routing(&mut d, plan.backends.is_empty())?;
    for b in &plan.backends {
        backend(&mut d, b)?;
    }
    for l in &plan.listeners {
        listener(&mut d, l, default_cert.as_ref(), all_http)?;
    }
    Ok(d.text)
}

fn header(d: &mut Doc, plan: &Plan, warnings: &[Warning]) {
    d.comment(&format!(
        "Postern configuration generated by `postern import-nginx` from {}.",
        plan.source
    ));
    d.comment(
        "Review it, then validate with `postern check -c FILE`. docs/config.md explains every key;",
    );
    d.comment("docs/migrating-from-nginx.md every nginx directive.");
    d.text.push_str("#\n");
    if warnings.is_empty() {
        d.comment("Every directive was mapped.");
    } else {
        d.comment(&format!(
            "Not mapped, or mapped with a difference ({}):",
            warnings.len()
        ));
        for w in warnings {
            d.comment(&format!("  - {w}"));
        }
    }
}

/// `[server]`, `[tls]`, `[timeouts]` and the front-end sections.
fn instance(
    d: &mut Doc,
    plan: &Plan,
    default_cert: Option<&CertPair>,
) -> Result<(), toml::ser::Error> {
    if let Some(h) = &plan.hostname {
        d.blank();
        d.fragment(&one("server", one("hostname", h)))?;
    }
    if let Some(c) = default_cert {
        d.blank();
        d.fragment(&one("tls", CertToml::from(c)))?;
    }
    if !plan.timeouts.is_empty() {
        let timeouts = plan.timeouts.iter().map(|(k, t)| (*k, humantime(*t)));
        d.blank();
        d.fragment(&one("timeouts", Map(timeouts.collect())))?;
    }
    for (section, keys) in &plan.sections {
        let keys = keys.iter().map(|(k, v)| (*k, v));
        d.blank();
        d.fragment(&one(section, Map(keys.collect())))?;
    }
    Ok(())
}

/// `[auth]` and `[auth.http]`. With some listeners on another mode, `auth.mode`
/// stays the default and the auth_http listeners say `auth = "http"` themselves.
fn auth(d: &mut Doc, a: &AuthHttpPlan, all_http: bool) -> Result<(), toml::ser::Error> {
    let headers = a.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let auth = AuthToml {
        mode: all_http.then_some("http"),
        http: AuthHttpToml {
            url: &a.url,
            timeout: a.timeout.map(humantime),
            headers: (!a.headers.is_empty()).then(|| Map(headers.collect())),
        },
    };
    d.blank();
    d.comment("nginx auth_http: the auth server checks credentials and names the backend.");
    d.fragment(&one("auth", auth))
}

/// `[routing]`: no pins for auth_http (the auth server decides), else pins assigned
/// at the first login in a SQL store, with a shared pool as round robin implies.
fn routing(d: &mut Doc, auth_server_routes: bool) -> Result<(), toml::ser::Error> {
    d.blank();
    if auth_server_routes {
        d.comment(
            "The auth server names each session's backend, as with nginx: Postern keeps no pins.",
        );
        let routing = StaticRoutingToml {
            store: "static",
            routes: Map(Vec::new()),
        };
        return d.fragment(&one("routing", routing));
    }
    d.comment("nginx balanced every connection on its own; Postern pins each user to one backend,");
    d.comment("chosen at the first login (least pinned users per unit of weight) and kept.");
    d.fragment(&one(
        "routing",
        SqlRoutingToml {
            unknown_users: "assign",
        },
    ))?;
    d.blank();
    d.comment("Relative to this file. Several Postern instances must share one database:");
    d.comment("url = \"mysql://USER:PASSWORD@HOST:3306/postern\"");
    let sql = SqlToml {
        url: "sqlite:routes.db",
    };
    d.fragment(&one("routing", one("sql", sql)))?;
    d.blank();
    d.comment("Round robin means any backend could serve any user: they share one mail store.");
    d.comment("If each backend has its own storage, make this \"own-storage\".");
    let pool = PoolToml {
        mode: "shared",
        failover: "repin",
    };
    d.fragment(&one("pools", one("default", pool)))
}

fn backend(d: &mut Doc, b: &BackendPlan) -> Result<(), toml::ser::Error> {
    let services = b.services.iter().map(|(proto, s)| {
        let s = ServiceToml {
            port: s.port,
            tls: s.tls,
            proxy_protocol: s.proxy_protocol,
        };
        (*proto, s)
    });
    let backend = BackendToml {
        host: &b.host,
        weight: (b.weight != 1).then_some(b.weight),
        services: Map(services.collect()),
    };
    d.blank();
    d.comment(&b.comment);
    d.fragment(&one("backends", one(&b.name, backend)))
}

/// One `[[listeners]]`, as an array of one table: fragments of arrays of tables
/// append to the same array.
fn listener(
    d: &mut Doc,
    l: &ListenerPlan,
    default_cert: Option<&CertPair>,
    all_http: bool,
) -> Result<(), toml::ser::Error> {
    // Plaintext logins are a front-end option the relays do not have.
    let insecure =
        l.insecure_plaintext_auth && matches!(l.protocol, "imap" | "pop3" | "submission");
    let own_cert = match (&l.cert, default_cert) {
        (Some(c), Some(d)) if c != d => Some(CertToml::from(c)),
        _ => None,
    };
    let listener = ListenerToml {
        name: &l.name,
        protocol: l.protocol,
        bind: l.bind.to_string(),
        tls: l.tls,
        insecure_plaintext_auth: insecure.then_some(true),
        accept_proxy_from: &l.accept_proxy_from,
        cert: own_cert,
        auth: (l.http_auth && !all_http).then_some("http"),
    };
    d.blank();
    d.comment(&l.comment);
    d.fragment(&one("listeners", [listener]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn loc() -> super::super::Loc {
        super::super::Loc {
            file: PathBuf::from("t.conf").into(),
            line: 3,
        }
    }

    fn listener(name: &str, port: u16, http_auth: bool, cert: Option<CertPair>) -> ListenerPlan {
        ListenerPlan {
            name: name.into(),
            protocol: "imap",
            bind: SocketAddr::from(([127, 0, 0, 1], port)),
            tls: if cert.is_some() { "implicit" } else { "none" },
            insecure_plaintext_auth: cert.is_none(),
            accept_proxy_from: Vec::new(),
            cert,
            http_auth,
            comment: "t.conf:3: listen\nnext line".into(),
            loc: loc(),
        }
    }

    fn pair(name: &str) -> CertPair {
        CertPair {
            cert: PathBuf::from(format!("/tls/{name}.pem")),
            key: PathBuf::from(format!("/tls/{name}.key")),
        }
    }

    #[test]
    fn auth_http_plan_loads_and_keeps_its_notes() {
        let mut plan = Plan {
            source: "t.conf".into(),
            hostname: Some("mail.example.test".into()),
            timeouts: vec![("preauth", Duration::from_secs(30))],
            auth_http: Some(AuthHttpPlan {
                url: "http://127.0.0.1:9000/auth".into(),
                timeout: Some(Duration::from_secs(5)),
                headers: vec![
                    ("X-Z".into(), "quote \" and backslash \\".into()),
                    ("X-A".into(), "it's".into()),
                ],
            }),
            listeners: vec![
                listener("imaps-993", 993, true, Some(pair("a"))),
                listener("imaps-994", 994, true, Some(pair("b"))),
            ],
            ..Plan::default()
        };
        plan.set("imap", "max_line_length", Value::Int(32768));
        plan.set("pop3", "apop", Value::Bool(true));
        let warning = Warning {
            loc: Some(loc()),
            directive: "ssl_protocols".into(),
            message: "not mapped".into(),
        };
        let text = render(&plan, &[warning]).unwrap();
        // The loader's own types read it: only keys they know.
        let file: crate::config::file::File = toml::from_str(&text).expect(&text);
        assert_eq!(file.auth.mode, crate::config::file::AuthMode::Http);
        let http = file.auth.http.expect("auth.http");
        assert_eq!(http.headers["X-Z"], "quote \" and backslash \\");
        assert_eq!(http.timeout, Duration::from_secs(5));
        assert_eq!(file.imap.max_line_length, 32768);
        assert!(file.pop3.apop);
        assert_eq!(file.routing.store, crate::config::file::StoreKind::Static);
        assert!(file.routing.static_routes.is_some_and(|m| m.is_empty()));
        // The second listener's certificate is its own; the first one's is [tls].
        assert_eq!(file.tls.expect("tls").cert, PathBuf::from("/tls/a.pem"));
        assert_eq!(file.listeners[0].cert, None);
        assert_eq!(file.listeners[1].cert, Some(PathBuf::from("/tls/b.pem")));
        assert!(
            file.listeners.iter().all(|l| l.auth.is_none()),
            "auth.mode says it"
        );
        assert!(
            text.contains("#   - t.conf:3: ssl_protocols: not mapped\n"),
            "{text}"
        );
        // A comment never spills onto a TOML line.
        assert!(
            text.contains("# t.conf:3: listen next line\n[[listeners]]\n"),
            "{text}"
        );
        // Headers in nginx's order, not sorted.
        let (z, a) = (text.find("X-Z").unwrap(), text.find("X-A").unwrap());
        assert!(z < a, "{text}");
    }

    #[test]
    fn stream_plan_pins_users_in_sql() {
        let plan = Plan {
            source: "s.conf".into(),
            backends: vec![BackendPlan {
                name: "mail.internal-1".into(),
                host: "mail.internal".into(),
                weight: 2,
                services: vec![
                    (
                        "imap",
                        Service {
                            port: 993,
                            tls: "implicit",
                            proxy_protocol: "none",
                        },
                    ),
                    (
                        "smtp",
                        Service {
                            port: 25,
                            tls: "none",
                            proxy_protocol: "v1",
                        },
                    ),
                ],
                comment: "from upstream imap".into(),
            }],
            listeners: vec![
                listener("imap-143", 143, false, None),
                listener("imap-144", 144, true, None),
            ],
            ..Plan::default()
        };
        let text = render(&plan, &[]).unwrap();
        assert!(
            text.contains("#\n# Every directive was mapped.\n"),
            "{text}"
        );
        assert!(text.contains("unknown_users = \"assign\""), "{text}");
        let file: crate::config::file::File = toml::from_str(&text).expect(&text);
        assert_eq!(file.routing.store, crate::config::file::StoreKind::Sql);
        assert_eq!(file.routing.sql.expect("sql").url, "sqlite:routes.db");
        assert_eq!(
            file.pools["default"].mode,
            crate::config::file::PoolMode::Shared
        );
        let b = &file.backends["mail.internal-1"];
        assert_eq!((b.host.as_str(), b.weight), ("mail.internal", 2));
        let imap = b.imap.as_ref().expect("imap");
        assert_eq!(imap.port, 993);
        assert_eq!(imap.tls, crate::config::file::BackendTlsMode::Implicit);
        let smtp = b.smtp.as_ref().expect("smtp");
        assert_eq!(smtp.proxy_protocol, crate::config::file::ProxyVersion::V1);
        assert_eq!(smtp.tls, crate::config::file::BackendTlsMode::None);
        // Defaults are left out of the text.
        assert!(!text.contains("proxy_protocol = \"none\""), "{text}");
        // Only the auth_http listener says so, the other keeps the default mode.
        assert_eq!(file.listeners[0].auth, None);
        assert_eq!(
            file.listeners[1].auth,
            Some(crate::config::file::AuthMode::Http)
        );
        assert!(file.listeners[0].insecure_plaintext_auth);
    }
}
