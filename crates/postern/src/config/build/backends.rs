//! `[backends.NAME]` with their services and TLS client settings, `[pools.NAME]` and
//! `[health]`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use postern_server::settings::{
    BackendTls, Endpoint, HealthSettings, Probe, ProxyProtocol, SubmissionBackend, TlsClient,
};
use postern_server::{Backend, ImapBackend, Pop3Backend};

use super::auth::listener_mode;
use crate::config::file::{self, File};

/// Every `[backends.NAME]`, by name.
pub(super) fn backends(file: &File, base: &Path) -> Result<BTreeMap<String, Arc<Backend>>> {
    // An auth_http server names the backends itself; otherwise Postern must know some.
    let all_http = !file.listeners.is_empty()
        && file
            .listeners
            .iter()
            .all(|l| listener_mode(file, l) == file::AuthMode::Http);
    ensure!(
        all_http || !file.backends.is_empty(),
        "backends: at least one backend is needed"
    );
    let mut backends = BTreeMap::new();
    for (name, b) in &file.backends {
        backends.insert(name.clone(), Arc::new(backend(name, b, base)?));
    }
    Ok(backends)
}

/// One backend. Its name ends up in metrics labels, log fields and `postern route`
/// arguments, hence the restricted alphabet.
fn backend(name: &str, b: &file::Backend, base: &Path) -> Result<Backend> {
    ensure!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
        "backends.{name}: names may use letters, digits, '.', '_' and '-'"
    );
    ensure!(
        !b.host.is_empty(),
        "backends.{name}.host: must not be empty"
    );
    let imap = b.imap.as_ref().map(|i| imap(name, i)).transpose()?;
    let pop3 = b.pop3.as_ref().map(|p| pop3(name, p)).transpose()?;
    let submission = b
        .submission
        .as_ref()
        .map(|s| submission(name, s))
        .transpose()?;
    let plain = |service: &str, e: Option<&file::PlainEndpoint>| {
        e.map(|e| endpoint(name, service, e.port, e.tls, e.proxy_protocol))
            .transpose()
    };
    let smtp = plain("smtp", b.smtp.as_ref())?;
    let lmtp = plain("lmtp", b.lmtp.as_ref())?;
    // The SMTP-family login machines cannot upgrade a connection yet.
    for (service, e) in [
        ("submission", submission.as_ref().map(|s| &s.endpoint)),
        ("smtp", smtp.as_ref()),
        ("lmtp", lmtp.as_ref()),
    ] {
        ensure!(
            e.is_none_or(|e| e.tls != BackendTls::StartTls),
            "backends.{name}.{service}.tls: \"starttls\" is not supported for SMTP-family backends yet (use \"implicit\" or \"none\")"
        );
    }
    let needs_tls = [
        imap.as_ref().map(|s| &s.endpoint),
        pop3.as_ref().map(|s| &s.endpoint),
        submission.as_ref().map(|s| &s.endpoint),
        smtp.as_ref(),
        lmtp.as_ref(),
    ]
    .into_iter()
    .flatten()
    .any(|e| e.tls != BackendTls::None);
    // A [tls] section without a TLS service is still loaded: its mistakes show now,
    // not when a service is switched to TLS.
    let tls = match (&b.tls, needs_tls) {
        (None, false) => None,
        (t, _) => Some(backend_tls(name, &b.host, t.as_ref(), base)?),
    };
    let probe = b.health.as_ref().map(|h| Probe {
        user: h.probe_user.clone(),
        password: postern_proto::Secret::new(h.probe_password.clone()),
    });
    ensure!(
        imap.is_some()
            || pop3.is_some()
            || submission.is_some()
            || smtp.is_some()
            || lmtp.is_some(),
        "backends.{name}: declares no service (add [backends.{name}.imap], .pop3, .submission, .smtp or .lmtp)"
    );
    Ok(Backend {
        name: name.to_owned(),
        host: b.host.clone(),
        weight: b.weight,
        pool: b.pool.clone(),
        tls,
        probe,
        imap,
        pop3,
        submission,
        smtp,
        lmtp,
        admission: postern_server::backends::admission::Limits {
            max_in_flight: b.admission.max_in_flight,
            max_queue: b.admission.queue,
        },
    })
}

fn imap(backend: &str, i: &file::ImapBackend) -> Result<ImapBackend> {
    let endpoint = endpoint(backend, "imap", i.port, i.tls, i.proxy_protocol)?;
    Ok(ImapBackend {
        login: postern_imap::LoginOptions {
            method: match i.login {
                file::ImapLogin::Auto => postern_imap::LoginMethod::Auto,
                file::ImapLogin::Login => postern_imap::LoginMethod::Login,
                file::ImapLogin::Authenticate => postern_imap::LoginMethod::Plain,
            },
            forward_client: i.forward_client == file::ForwardClient::Id,
            starttls: endpoint.tls == BackendTls::StartTls,
        },
        endpoint,
    })
}

fn pop3(backend: &str, p: &file::Pop3Backend) -> Result<Pop3Backend> {
    let endpoint = endpoint(backend, "pop3", p.port, p.tls, p.proxy_protocol)?;
    Ok(Pop3Backend {
        login: postern_pop3::LoginOptions {
            method: match p.login {
                file::Pop3Login::Plain => postern_pop3::LoginMethod::Plain,
                file::Pop3Login::User => postern_pop3::LoginMethod::User,
            },
            forward_client: p.forward_client == file::Pop3Forward::Xclient,
            starttls: endpoint.tls == BackendTls::StartTls,
        },
        endpoint,
    })
}

fn submission(backend: &str, s: &file::SubmissionBackend) -> Result<SubmissionBackend> {
    let endpoint = endpoint(backend, "submission", s.port, s.tls, s.proxy_protocol)?;
    Ok(SubmissionBackend {
        endpoint,
        login: postern_smtp::LoginOptions {
            method: match s.login {
                file::SubmissionLogin::Auth => postern_smtp::LoginMethod::Auth,
                file::SubmissionLogin::Xclient => postern_smtp::LoginMethod::Xclient,
            },
            auth: match s.auth {
                file::SubmissionAuth::Auto => postern_smtp::AuthMethod::Auto,
                file::SubmissionAuth::Plain => postern_smtp::AuthMethod::Plain,
                file::SubmissionAuth::Login => postern_smtp::AuthMethod::Login,
            },
            // Set per session by the server, once it knows the client passed PROXY.
            proxy_verified: false,
        },
    })
}

/// A backend service's endpoint, with the per-protocol TLS and PROXY settings.
fn endpoint(
    backend: &str,
    protocol: &str,
    port: u16,
    tls: file::BackendTlsMode,
    proxy: file::ProxyVersion,
) -> Result<Endpoint> {
    ensure!(
        port != 0,
        "backends.{backend}.{protocol}.port: must not be 0"
    );
    Ok(Endpoint {
        port,
        tls: match tls {
            file::BackendTlsMode::None => BackendTls::None,
            file::BackendTlsMode::Starttls => BackendTls::StartTls,
            file::BackendTlsMode::Implicit => BackendTls::Implicit,
        },
        proxy_protocol: match proxy {
            file::ProxyVersion::None => ProxyProtocol::None,
            file::ProxyVersion::V1 => ProxyProtocol::V1,
            file::ProxyVersion::V2 => ProxyProtocol::V2,
        },
    })
}

/// TLS client settings of a backend: CA file or system roots, optional client
/// certificate, the name to verify (the host unless `tls.name` says otherwise, for
/// backends reached by address).
fn backend_tls(
    name: &str,
    host: &str,
    t: Option<&file::BackendTlsFile>,
    base: &Path,
) -> Result<TlsClient> {
    let resolve = |p: &Path| super::resolve(base, p);
    let ca = t.and_then(|t| t.ca.as_deref()).map(resolve);
    let identity = match (
        t.and_then(|t| t.cert.as_deref()),
        t.and_then(|t| t.key.as_deref()),
    ) {
        (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
        (None, None) => None,
        _ => bail!("backends.{name}.tls: cert and key go together"),
    };
    let config = postern_server::backends::backend::client_config(
        ca.as_deref(),
        identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .with_context(|| format!("backends.{name}.tls"))?;
    let server = t
        .and_then(|t| t.name.clone())
        .unwrap_or_else(|| host.to_owned());
    let verified = postern_server::backends::backend::server_name(&server)
        .ok_or_else(|| anyhow!("backends.{name}.tls.name: {server:?} is not a valid name"))?;
    Ok(TlsClient {
        config,
        name: verified,
    })
}

/// `[health]`. Rise and fall of 0 would never change a state: they count as 1.
pub(super) fn health(h: &file::Health) -> Result<HealthSettings> {
    ensure!(!h.interval.is_zero(), "health.interval: must be > 0");
    ensure!(!h.timeout.is_zero(), "health.timeout: must be > 0");
    Ok(HealthSettings {
        enabled: h.enabled,
        interval: h.interval,
        timeout: h.timeout,
        rise: h.rise.max(1),
        fall: h.fall.max(1),
        startup_grace: h.startup_grace,
    })
}

/// `[pools.NAME]`. A policy for a pool no backend is in is almost certainly a
/// misspelt pool name, which would silently leave the real pool own-storage.
pub(super) fn pools(
    pools: &BTreeMap<String, file::Pool>,
    backends: &BTreeMap<String, Arc<Backend>>,
) -> Result<HashMap<String, postern_route::PoolPolicy>> {
    let mut out = HashMap::new();
    for (name, p) in pools {
        ensure!(
            backends.values().any(|b| &b.pool == name),
            "pools.{name}: no backend belongs to this pool"
        );
        out.insert(
            name.clone(),
            postern_route::PoolPolicy {
                mode: match p.mode {
                    file::PoolMode::Shared => postern_route::PoolMode::Shared,
                    file::PoolMode::OwnStorage => postern_route::PoolMode::OwnStorage,
                },
                failover: match p.failover {
                    file::PoolFailover::Repin => postern_route::Failover::Repin,
                    file::PoolFailover::Temporary => postern_route::Failover::Temporary,
                },
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    const IMAP_LISTENER: &str =
        "[[listeners]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1\"\ntls = \"none\"\n";

    fn of(backends_text: &str) -> Result<BTreeMap<String, Arc<Backend>>> {
        // Listeners as an array of tables must come after the other tables.
        let file: File =
            toml::from_str(&format!("[routing]\n{backends_text}\n{IMAP_LISTENER}")).unwrap();
        backends(&file, Path::new("/"))
    }

    fn err(backends_text: &str) -> String {
        format!("{:#}", of(backends_text).expect_err(backends_text))
    }

    #[test]
    fn defaults_plaintext_weight_one_default_pool() {
        let b = of("[backends.b1]\nhost = \"10.0.0.1\"\n[backends.b1.imap]\nport = 143\n").unwrap();
        let b1 = &b["b1"];
        assert_eq!((b1.weight, b1.pool.as_str()), (1, "default"));
        assert!(b1.tls.is_none() && b1.probe.is_none());
        let imap = b1.imap.as_ref().unwrap();
        assert_eq!(
            imap.endpoint,
            Endpoint {
                port: 143,
                tls: BackendTls::None,
                proxy_protocol: ProxyProtocol::None
            }
        );
        assert_eq!(imap.login.method, postern_imap::LoginMethod::Auto);
        assert!(!imap.login.forward_client && !imap.login.starttls);
        assert!(b1.pop3.is_none() && b1.submission.is_none() && b1.smtp.is_none());
        assert_eq!(
            b1.admission,
            postern_server::backends::admission::Limits {
                max_in_flight: 64,
                max_queue: 256
            }
        );
    }

    #[test]
    fn admission_is_set_per_backend() {
        let b = of(
            "[backends.b1]\nhost = \"h\"\n[backends.b1.imap]\nport = 143\n\
                    [backends.b1.admission]\nmax_in_flight = 8\nqueue = 0\n",
        )
        .unwrap();
        assert_eq!(
            b["b1"].admission,
            postern_server::backends::admission::Limits {
                max_in_flight: 8,
                max_queue: 0
            }
        );
        let unknown: Result<File, _> =
            toml::from_str("[backends.b1]\nhost = \"h\"\n[backends.b1.admission]\nmax_queue = 1\n");
        assert!(unknown.is_err(), "a misspelt key is refused");
    }

    #[test]
    fn services_map_their_options() {
        let b = of(r#"
[backends.b1]
host = "localhost"
weight = 3
pool = "p"
[backends.b1.imap]
port = 143
tls = "starttls"
login = "authenticate"
forward_client = "id"
[backends.b1.pop3]
port = 110
login = "user"
forward_client = "xclient"
proxy_protocol = "v2"
[backends.b1.submission]
port = 587
login = "xclient"
auth = "login"
[backends.b1.lmtp]
port = 24
proxy_protocol = "v1"
[backends.b1.health]
probe_user = "probe"
probe_password = "pw"
"#)
        .unwrap();
        let b1 = &b["b1"];
        assert_eq!((b1.weight, b1.pool.as_str()), (3, "p"));
        let imap = b1.imap.as_ref().unwrap();
        assert_eq!(imap.login.method, postern_imap::LoginMethod::Plain);
        assert!(imap.login.forward_client && imap.login.starttls);
        assert!(b1.tls.is_some(), "STARTTLS needs a TLS client");
        let pop3 = b1.pop3.as_ref().unwrap();
        assert_eq!(pop3.login.method, postern_pop3::LoginMethod::User);
        assert!(pop3.login.forward_client);
        assert_eq!(pop3.endpoint.proxy_protocol, ProxyProtocol::V2);
        let sub = b1.submission.as_ref().unwrap();
        assert_eq!(sub.login.method, postern_smtp::LoginMethod::Xclient);
        assert_eq!(sub.login.auth, postern_smtp::AuthMethod::Login);
        assert_eq!(b1.lmtp.as_ref().unwrap().proxy_protocol, ProxyProtocol::V1);
        let probe = b1.probe.as_ref().unwrap();
        assert_eq!(
            (probe.user.as_str(), probe.password.expose().as_str()),
            ("probe", "pw")
        );
    }

    #[test]
    fn refusals_name_the_key() {
        for (text, message) in [
            ("", "backends: at least one backend is needed"),
            (
                "[backends.\"a b\"]\nhost = \"h\"\n[backends.\"a b\".imap]\nport = 1",
                "backends.a b: names may use letters, digits, '.', '_' and '-'",
            ),
            (
                "[backends.x]\nhost = \"\"\n[backends.x.imap]\nport = 1",
                "backends.x.host: must not be empty",
            ),
            (
                "[backends.x]\nhost = \"h\"\n[backends.x.lmtp]\nport = 0",
                "backends.x.lmtp.port: must not be 0",
            ),
            (
                "[backends.x]\nhost = \"h\"",
                "backends.x: declares no service (add [backends.x.imap], .pop3, .submission, .smtp or .lmtp)",
            ),
            (
                "[backends.x]\nhost = \"h\"\n[backends.x.smtp]\nport = 25\ntls = \"starttls\"",
                "backends.x.smtp.tls: \"starttls\" is not supported for SMTP-family backends yet (use \"implicit\" or \"none\")",
            ),
            (
                "[backends.x]\nhost = \"h\"\n[backends.x.imap]\nport = 1\n[backends.x.tls]\ncert = \"c.pem\"",
                "backends.x.tls: cert and key go together",
            ),
            (
                "[backends.x]\nhost = \"h\"\n[backends.x.imap]\nport = 1\n[backends.x.tls]\nname = \"not a name!\"",
                "backends.x.tls.name: \"not a name!\" is not a valid name",
            ),
            (
                "[backends.x]\nhost = \"bad host!\"\n[backends.x.imap]\nport = 993\ntls = \"implicit\"",
                "backends.x.tls.name: \"bad host!\" is not a valid name",
            ),
        ] {
            assert_eq!(err(text), message, "{text}");
        }
        let e = err(
            "[backends.x]\nhost = \"h\"\n[backends.x.imap]\nport = 1\n[backends.x.tls]\nca = \"/absent/ca.pem\"",
        );
        assert!(e.starts_with("backends.x.tls: "), "{e}");
    }

    #[test]
    fn auth_http_listeners_need_no_backend() {
        let http = |auth: &str| {
            format!(
                "[[listeners]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:1\"\ntls = \"none\"\n{auth}\n"
            )
        };
        let f: File = toml::from_str("listeners = []\n[routing]\n[auth]\nmode = \"http\"").unwrap();
        // No listener at all is not "every listener uses auth_http".
        assert!(backends(&f, Path::new("/")).is_err());
        let text = format!("[routing]\n[auth]\nmode = \"http\"\n{}", http(""));
        let f: File = toml::from_str(&text).unwrap();
        assert!(backends(&f, Path::new("/")).unwrap().is_empty());
        let text = format!(
            "[routing]\n{}{}",
            http("auth = \"http\""),
            http("auth = \"backend\"")
        );
        let f: File = toml::from_str(&text).unwrap();
        assert!(backends(&f, Path::new("/")).is_err());
    }

    #[test]
    fn health_defaults_and_refusals() {
        let h = health(&file::Health::default()).unwrap();
        assert_eq!(h, HealthSettings::default());
        let h: file::Health = toml::from_str("rise = 0\nfall = 0\nenabled = false").unwrap();
        let h = health(&h).unwrap();
        assert_eq!((h.rise, h.fall, h.enabled), (1, 1, false));
        for (text, message) in [
            ("interval = \"0s\"", "health.interval: must be > 0"),
            ("timeout = \"0s\"", "health.timeout: must be > 0"),
        ] {
            let h: file::Health = toml::from_str(text).unwrap();
            assert_eq!(format!("{:#}", health(&h).expect_err(text)), message);
        }
        let h: file::Health = toml::from_str("startup_grace = \"0s\"").unwrap();
        assert_eq!(health(&h).unwrap().startup_grace, Duration::ZERO);
    }

    #[test]
    fn pools_must_have_members() {
        let b =
            of("[backends.b1]\nhost = \"h\"\npool = \"p\"\n[backends.b1.imap]\nport = 1").unwrap();
        let p: BTreeMap<String, file::Pool> =
            toml::from_str("[p]\nmode = \"shared\"\nfailover = \"temporary\"").unwrap();
        let p = pools(&p, &b).unwrap();
        assert_eq!(p["p"].mode, postern_route::PoolMode::Shared);
        assert_eq!(p["p"].failover, postern_route::Failover::Temporary);
        let p: BTreeMap<String, file::Pool> = toml::from_str("[default]").unwrap();
        assert_eq!(
            format!("{:#}", pools(&p, &b).expect_err("no member")),
            "pools.default: no backend belongs to this pool"
        );
        let p: BTreeMap<String, file::Pool> = toml::from_str("[p]").unwrap();
        let p = pools(&p, &b).unwrap();
        assert_eq!(p["p"].mode, postern_route::PoolMode::OwnStorage);
        assert_eq!(p["p"].failover, postern_route::Failover::Repin);
    }
}
