//! From the file's structs to validated runtime settings: parse, don't validate twice.
//! Every error names the key (as a path) or the file it comes from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use postern_route::moves::FenceOptions;
use postern_route::store::sql::{Dialect, SqlOptions, SqlStore};
use postern_route::store::static_map::StaticStore;
use postern_route::{
    AssignPolicy, BackendEntry, CacheOptions, Normalizer, RouteStore, Router, RouterOptions,
    UnknownUsers,
};
use postern_server::settings::{
    BackendTls, Endpoint, HealthSettings, Probe, ProxyIn, ProxyProtocol, TlsClient, WatchSettings,
};
use postern_server::{
    AuthMode, AuthSettings, Backend, FrontOptions, HttpAuth, ImapBackend, ListenerSettings,
    MasterLogin, MasterStyle, Pop3Backend, Settings, Timeouts, TlsMode, tls,
};

use super::file::{self, File};

/// Where routes come from, before the store is opened.
#[derive(Debug, Clone)]
pub enum StorePlan {
    /// A SQL database (SQLite, MySQL/MariaDB, PostgreSQL).
    Sql(SqlOptions),
    /// The `[routing.static]` table.
    Static(BTreeMap<String, String>),
}

/// A loaded, validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// The tracing filter from `[log] level`.
    pub log_level: String,
    /// Server settings, with certificates loaded.
    pub settings: Settings,
    /// The route store to open.
    pub store: StorePlan,
    /// User name rules.
    pub normalizer: Normalizer,
    /// Router policy and cache.
    pub router: RouterOptions,
    /// Timing of moves and kicks.
    pub fence: FenceOptions,
}

impl Config {
    /// Reads, parses and validates `path`, loading every certificate it names.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::from_toml(&text, &base)
            .map(|mut c| {
                c.path = path.to_path_buf();
                c
            })
            .with_context(|| format!("config {}", path.display()))
    }

    /// Parses a configuration; relative paths in it are taken from `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self> {
        let de = toml::Deserializer::parse(text).map_err(|e| anyhow!("{e}"))?;
        let file: File = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // toml's message already quotes the offending line; prefix the key path.
            anyhow!("{path}: {inner}")
        })?;
        build(file, base)
    }

    /// Opens the SQL store (for `postern db` and `postern route`).
    pub async fn open_sql(&self) -> Result<SqlStore> {
        let StorePlan::Sql(options) = &self.store else {
            bail!("routing.store is \"static\": there is no database");
        };
        SqlStore::open(options)
            .await
            .with_context(|| format!("route database {}", redact_url(&options.url)))
    }

    /// Opens the route store.
    pub async fn open_store(&self) -> Result<Arc<dyn RouteStore>> {
        Ok(match &self.store {
            StorePlan::Sql(_) => Arc::new(self.open_sql().await?),
            StorePlan::Static(map) => Arc::new(
                StaticStore::new(
                    &self.normalizer,
                    map.iter().map(|(u, b)| (u.as_str(), b.as_str())),
                )
                .map_err(|(user, e)| anyhow!("routing.static: {user:?}: {e}"))?,
            ),
        })
    }

    /// Opens the store and builds the router (every backend considered up: for tools).
    pub async fn router(&self) -> Result<Arc<Router>> {
        self.router_with(Arc::new(postern_route::router::AlwaysAvailable))
            .await
    }

    /// Opens the store and builds the router, asking `availability` for backend states.
    pub async fn router_with(
        &self,
        availability: Arc<dyn postern_route::Availability>,
    ) -> Result<Arc<Router>> {
        let store = self.open_store().await?;
        let backends = self
            .settings
            .backends
            .values()
            .map(|b| BackendEntry {
                name: b.name.clone(),
                host: b.host.clone(),
                weight: b.weight,
                pool: b.pool.clone(),
                protocols: b.protocols(),
            })
            .collect();
        Ok(Arc::new(
            Router::new(
                self.normalizer.clone(),
                store,
                self.router.clone(),
                backends,
            )
            .with_availability(availability),
        ))
    }
}

fn build(file: File, base: &Path) -> Result<Config> {
    let resolve = |p: &Path| -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };

    let t = &file.timeouts;
    for (name, d) in [
        ("preauth", t.preauth),
        ("backend_connect", t.backend_connect),
        ("backend_login", t.backend_login),
        ("idle", t.idle),
        ("smtp", t.smtp),
    ] {
        ensure!(!d.is_zero(), "timeouts.{name}: must be greater than zero");
    }
    let timeouts = Timeouts {
        preauth: t.preauth,
        backend_connect: t.backend_connect,
        backend_login: t.backend_login,
        idle: t.idle,
        smtp: t.smtp,
        shutdown_grace: t.shutdown_grace,
    };

    let imap = &file.imap;
    ensure!(
        imap.max_line_length >= 1024,
        "imap.max_line_length: at least 1024 bytes (RFC 9051 clients send long lines)"
    );
    ensure!(
        imap.max_literal_size <= imap.max_line_length,
        "imap.max_literal_size: cannot exceed imap.max_line_length, which bounds the whole command"
    );
    ensure!(
        imap.max_auth_failures >= 1,
        "imap.max_auth_failures: at least 1"
    );
    ensure!(
        !imap.greeting.contains(['\r', '\n']),
        "imap.greeting: must be one line"
    );

    // An auth_http server names the backends itself; otherwise Postern must know some.
    let all_http = !file.listeners.is_empty()
        && file
            .listeners
            .iter()
            .all(|l| l.auth.unwrap_or(file.auth.mode) == file::AuthMode::Http);
    ensure!(
        all_http || !file.backends.is_empty(),
        "backends: at least one backend is needed"
    );
    let mut backends = BTreeMap::new();
    for (name, b) in &file.backends {
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
        let imap = match &b.imap {
            None => None,
            Some(i) => {
                let endpoint = endpoint(name, "imap", i.port, i.tls, i.proxy_protocol)?;
                Some(ImapBackend {
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
        };
        let pop3 = match &b.pop3 {
            None => None,
            Some(p) => {
                let endpoint = endpoint(name, "pop3", p.port, p.tls, p.proxy_protocol)?;
                Some(Pop3Backend {
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
        };
        let submission = match &b.submission {
            None => None,
            Some(s) => {
                let endpoint = endpoint(name, "submission", s.port, s.tls, s.proxy_protocol)?;
                Some(postern_server::settings::SubmissionBackend {
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
                        proxy_verified: false,
                    },
                })
            }
        };
        let smtp = b
            .smtp
            .as_ref()
            .map(|e| endpoint(name, "smtp", e.port, e.tls, e.proxy_protocol))
            .transpose()?;
        let lmtp = b
            .lmtp
            .as_ref()
            .map(|e| endpoint(name, "lmtp", e.port, e.tls, e.proxy_protocol))
            .transpose()?;
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
        let tls = match (&b.tls, needs_tls) {
            (None, false) => None,
            (t, _) => Some(backend_tls(name, &b.host, t.as_ref(), &resolve)?),
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
        backends.insert(
            name.clone(),
            Arc::new(Backend {
                name: name.clone(),
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
            }),
        );
    }

    let hostname = match &file.server.hostname {
        Some(h) => {
            ensure!(
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c)),
                "server.hostname: {h:?} is not a host name"
            );
            h.clone()
        }
        None => system_hostname(),
    };
    let default_tls = file
        .tls
        .as_ref()
        .map(|t| (resolve(&t.cert), resolve(&t.key)));
    // Listeners on the default certificate also serve the SNI map.
    let mut sni = Vec::new();
    for (name, pair) in file.tls.as_ref().map(|t| &t.sni).into_iter().flatten() {
        let bare = name.strip_prefix("*.").unwrap_or(name);
        ensure!(
            !bare.is_empty()
                && bare.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                }),
            "tls.sni.{name:?}: not a host name (or *.domain)"
        );
        sni.push((name.clone(), resolve(&pair.cert), resolve(&pair.key)));
    }
    let mut certs: BTreeMap<(PathBuf, PathBuf), Arc<rustls::ServerConfig>> = BTreeMap::new();
    ensure!(
        !file.listeners.is_empty(),
        "listeners: at least one listener is needed"
    );
    let mut names = BTreeSet::new();
    let mut binds = BTreeSet::new();
    let mut listeners = Vec::new();
    for (i, l) in file.listeners.iter().enumerate() {
        let key = format!("listeners[{i}]");
        let protocol = match l.protocol {
            file::Protocol::Imap => "imap",
            file::Protocol::Pop3 => "pop3",
            file::Protocol::Submission => "submission",
            file::Protocol::Smtp => "smtp",
            file::Protocol::Lmtp => "lmtp",
        };
        let name = l
            .name
            .clone()
            .unwrap_or_else(|| format!("{protocol}-{}", l.bind));
        ensure!(
            names.insert(name.clone()),
            "{key}.name: {name:?} is used twice"
        );
        // Port 0 asks the kernel for a free port: several such listeners do not clash.
        ensure!(
            l.bind.port() == 0 || binds.insert(l.bind),
            "{key}.bind: {} is used twice",
            l.bind
        );
        let tls_mode = match l.tls {
            file::TlsMode::None => TlsMode::None,
            file::TlsMode::Starttls => TlsMode::StartTls,
            file::TlsMode::Implicit => TlsMode::Implicit,
        };
        let pair = match (&l.cert, &l.key) {
            (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
            (None, None) => default_tls.clone(),
            _ => bail!("{key}: cert and key go together"),
        };
        let tls = if tls_mode == TlsMode::None {
            None
        } else {
            let Some(pair) = pair else {
                bail!(
                    "{key}.tls: {} needs a certificate ([tls] or the listener's cert/key)",
                    tls_mode.as_str()
                );
            };
            let config = match certs.get(&pair) {
                Some(c) => Arc::clone(c),
                None => {
                    let names: Vec<(String, &Path, &Path)> = if Some(&pair) == default_tls.as_ref()
                    {
                        sni.iter()
                            .map(|(n, c, k)| (n.clone(), c.as_path(), k.as_path()))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let c = tls::server_config_sni(&pair.0, &pair.1, &names)
                        .with_context(|| key.clone())?;
                    certs.insert(pair, Arc::clone(&c));
                    c
                }
            };
            Some(config)
        };
        let starttls = tls_mode == TlsMode::StartTls;
        let auth = auth_mode(l.auth.unwrap_or(file.auth.mode));
        ensure!(
            !(auth != AuthMode::Backend
                && matches!(l.protocol, file::Protocol::Smtp | file::Protocol::Lmtp)),
            "{key}.auth: MX and LMTP listeners have no authentication"
        );
        // With auth_http the auth server names the backend: none need be configured.
        let needs_backend = auth != AuthMode::Http;
        let front = match l.protocol {
            file::Protocol::Imap => {
                ensure!(
                    !needs_backend || backends.values().any(|b| b.imap.is_some()),
                    "{key}: no backend serves {protocol}"
                );
                FrontOptions::Imap(Arc::new(postern_imap::Options {
                    greeting: imap.greeting.clone(),
                    starttls,
                    insecure_plaintext_auth: l.insecure_plaintext_auth,
                    max_line: imap.max_line_length,
                    max_literal: imap.max_literal_size,
                    max_bad_commands: imap.max_bad_commands,
                    max_auth_failures: imap.max_auth_failures,
                    max_commands: imap.max_commands.max(1),
                    oauth: imap.oauth,
                }))
            }
            file::Protocol::Pop3 => {
                ensure!(
                    !needs_backend || backends.values().any(|b| b.pop3.is_some()),
                    "{key}: no backend serves {protocol}"
                );
                let p = &file.pop3;
                let options = postern_pop3::Options {
                    greeting: p.greeting.clone(),
                    starttls,
                    insecure_plaintext_auth: l.insecure_plaintext_auth,
                    apop: p.apop,
                    max_line: p.max_line_length,
                    max_bad_commands: p.max_bad_commands,
                    max_auth_failures: p.max_auth_failures,
                    max_commands: p.max_commands.max(1),
                    oauth: p.oauth,
                };
                options.validate().map_err(|e| anyhow!("pop3: {e}"))?;
                FrontOptions::Pop3(Arc::new(options))
            }
            file::Protocol::Submission => {
                ensure!(
                    !needs_backend || backends.values().any(|b| b.submission.is_some()),
                    "{key}: no backend serves {protocol}"
                );
                let sub = &file.submission;
                FrontOptions::Submission(Arc::new(postern_smtp::Options {
                    hostname: hostname.clone(),
                    greeting: sub.greeting.clone(),
                    starttls,
                    insecure_plaintext_auth: l.insecure_plaintext_auth,
                    max_line: sub.max_line_length,
                    max_auth_line: sub.max_auth_line_length,
                    max_bad_commands: sub.max_bad_commands,
                    max_auth_failures: sub.max_auth_failures.max(1),
                    max_commands: sub.max_commands.max(1),
                    oauth: sub.oauth,
                    ..postern_smtp::Options::default()
                }))
            }
            file::Protocol::Smtp | file::Protocol::Lmtp => {
                let lmtp = l.protocol == file::Protocol::Lmtp;
                ensure!(
                    backends.values().any(|b| if lmtp {
                        b.lmtp.is_some()
                    } else {
                        b.smtp.is_some()
                    }),
                    "{key}: no backend serves {protocol}"
                );
                ensure!(
                    !(lmtp && tls_mode != TlsMode::None),
                    "{key}.tls: LMTP listeners are plaintext (keep them on a trusted network)"
                );
                let r = if lmtp { &file.lmtp } else { &file.smtp };
                let base = if lmtp {
                    postern_smtp::RelayOptions::lmtp()
                } else {
                    postern_smtp::RelayOptions::mx()
                };
                FrontOptions::Relay(Arc::new(postern_smtp::RelayOptions {
                    hostname: hostname.clone(),
                    greeting: r.greeting.clone(),
                    starttls,
                    xclient: r.xclient,
                    max_line: r.max_line_length,
                    max_recipients: r.max_recipients.max(1),
                    max_bad_commands: r.max_bad_commands,
                    ..base
                }))
            }
        };
        let proxy = if l.accept_proxy_from.is_empty() {
            None
        } else {
            let trusted = l
                .accept_proxy_from
                .iter()
                .map(|n| {
                    n.parse::<ipnet::IpNet>()
                        .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|_| anyhow!("{key}.accept_proxy_from: {n:?} is not a network"))
                })
                .collect::<Result<Vec<_>>>()?;
            Some(ProxyIn { trusted })
        };
        listeners.push(Arc::new(ListenerSettings {
            name,
            bind: l.bind,
            tls_mode,
            tls,
            front,
            proxy,
            auth,
        }));
    }

    let r = &file.routing;
    let normalizer = Normalizer {
        lowercase: r.normalize.lowercase,
        trim: r.normalize.trim,
        default_domain: r.normalize.default_domain.clone(),
    };
    if let Some(d) = &normalizer.default_domain {
        ensure!(
            !d.is_empty() && !d.contains(['@', ' ']),
            "routing.normalize.default_domain: {d:?} is not a domain"
        );
    }
    let store = match r.store {
        file::StoreKind::Sql => {
            let Some(sql) = &r.sql else {
                bail!("routing.store: \"sql\" needs a [routing.sql] section with a url");
            };
            let dialect = Dialect::of_url(&sql.url).ok_or_else(|| {
                anyhow!("routing.sql.url: must start with sqlite:, mysql:, mariadb: or postgres:")
            })?;
            let url = if dialect == Dialect::Sqlite {
                sqlite_url(&sql.url, base)
            } else {
                sql.url.clone()
            };
            ensure!(
                !sql.connect_timeout.is_zero(),
                "routing.sql.connect_timeout: must be > 0"
            );
            ensure!(
                !sql.query_timeout.is_zero(),
                "routing.sql.query_timeout: must be > 0"
            );
            StorePlan::Sql(SqlOptions {
                url,
                max_connections: sql.max_connections,
                connect_timeout: sql.connect_timeout,
                query_timeout: sql.query_timeout,
                lookup_query: sql.lookup_query.clone(),
                migrate: sql.migrate,
            })
        }
        file::StoreKind::Static => {
            let Some(map) = &r.static_routes else {
                bail!("routing.store: \"static\" needs a [routing.static] table");
            };
            StorePlan::Static(map.clone())
        }
    };
    if let Some(map) = &r.static_routes {
        for (user, backend) in map {
            ensure!(
                backends.contains_key(backend),
                "routing.static.{user:?}: unknown backend {backend:?}"
            );
        }
    }
    let unknown_users = match (r.unknown_users, r.assign_policy) {
        (file::UnknownUsers::Reject, _) => UnknownUsers::Reject,
        (file::UnknownUsers::Hash, _) => UnknownUsers::Hash,
        (file::UnknownUsers::Assign, file::AssignPolicy::LeastLoaded) => {
            UnknownUsers::Assign(AssignPolicy::LeastLoaded)
        }
        (file::UnknownUsers::Assign, file::AssignPolicy::Hash) => {
            UnknownUsers::Assign(AssignPolicy::Hash)
        }
    };
    ensure!(
        !(matches!(unknown_users, UnknownUsers::Assign(_)) && r.store == file::StoreKind::Static),
        "routing.unknown_users: \"assign\" needs a writable store (routing.store = \"sql\")"
    );
    ensure!(r.cache.capacity > 0, "routing.cache.capacity: must be > 0");
    ensure!(
        !r.watch_interval.is_zero(),
        "routing.watch_interval: must be > 0"
    );
    // With auth_http, the auth server checks APOP digests itself (Auth-Salt).
    let apop_checked_here = file.listeners.iter().any(|l| {
        l.protocol == file::Protocol::Pop3
            && l.auth.unwrap_or(file.auth.mode) != file::AuthMode::Http
    });
    if file.pop3.apop && apop_checked_here {
        ensure!(
            r.store == file::StoreKind::Sql
                && r.sql.as_ref().is_some_and(|s| s.lookup_query.is_some()),
            "pop3.apop: APOP needs plaintext passwords, from a routing.sql.lookup_query that returns a password column"
        );
    }
    ensure!(
        !file.health.interval.is_zero(),
        "health.interval: must be > 0"
    );
    ensure!(
        !file.health.timeout.is_zero(),
        "health.timeout: must be > 0"
    );
    let mut pools = std::collections::HashMap::new();
    for (name, p) in &file.pools {
        ensure!(
            backends.values().any(|b| &b.pool == name),
            "pools.{name}: no backend belongs to this pool"
        );
        pools.insert(
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
    let fence = FenceOptions {
        hold: r.moves.hold,
        ack_timeout: r.moves.ack_timeout,
        live_within: r.moves.live_within,
    };
    let watch = match r.store {
        file::StoreKind::Sql => Some(WatchSettings {
            instance_id: r.instance_id.clone().unwrap_or_else(default_instance_id),
            interval: r.watch_interval,
        }),
        file::StoreKind::Static => None,
    };

    let auth = auth_settings(&file, base)?;
    let access_log = postern_server::access_log::AccessLog::parse(&file.log.access, base)
        .map_err(|e| anyhow!("log.access: {e}"))?;
    let admin = admin_settings(file.admin.as_ref(), base)?;
    Ok(Config {
        path: PathBuf::new(),
        log_level: file.log.level,
        settings: Settings {
            listeners,
            backends,
            timeouts,
            health: HealthSettings {
                enabled: file.health.enabled,
                interval: file.health.interval,
                timeout: file.health.timeout,
                rise: file.health.rise.max(1),
                fall: file.health.fall.max(1),
                startup_grace: file.health.startup_grace,
            },
            normalized_login: r.normalize.apply_to_backend_login,
            hostname,
            watch,
            limits: limits(&file.limits)?,
            auth,
            access_log,
            admin,
        },
        store,
        normalizer,
        router: RouterOptions {
            unknown_users,
            cache: CacheOptions {
                ttl: r.cache.ttl,
                negative_ttl: r.cache.negative_ttl,
                stale_if_error: r.cache.stale_if_error,
                capacity: r.cache.capacity,
            },
            pools,
            failover_rate: r.failover_rate,
            fence,
        },
        fence,
    })
}

/// `[admin]`: the token inline or from a file; a listener reachable from other hosts
/// must have one.
fn admin_settings(
    a: Option<&file::Admin>,
    base: &Path,
) -> Result<Option<postern_server::admin::AdminSettings>> {
    let Some(a) = a else {
        return Ok(None);
    };
    let token = match (&a.token, &a.token_file) {
        (Some(t), None) => Some(t.clone()),
        (None, Some(f)) => {
            let path = if f.is_absolute() {
                f.clone()
            } else {
                base.join(f)
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("admin.token_file: cannot read {}", path.display()))?;
            Some(text.lines().next().unwrap_or_default().trim().to_owned())
        }
        (None, None) => None,
        (Some(_), Some(_)) => bail!("admin: set token or token_file, not both"),
    };
    if let Some(t) = &token {
        ensure!(!t.is_empty(), "admin: the token is empty");
        ensure!(
            t.bytes().all(|b| b.is_ascii_graphic()),
            "admin: the token must be printable ASCII without spaces"
        );
    }
    ensure!(
        token.is_some() || a.bind.ip().is_loopback(),
        "admin.bind: {} is reachable from other hosts; set admin.token or admin.token_file (or bind to 127.0.0.1)",
        a.bind
    );
    Ok(Some(postern_server::admin::AdminSettings {
        bind: a.bind,
        token,
    }))
}

/// TLS client settings of a backend: CA file or system roots, optional client
/// certificate, the name to verify.
fn backend_tls(
    name: &str,
    host: &str,
    t: Option<&file::BackendTlsFile>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<TlsClient> {
    let ca = t.and_then(|t| t.ca.as_deref()).map(resolve);
    let identity = match (
        t.and_then(|t| t.cert.as_deref()),
        t.and_then(|t| t.key.as_deref()),
    ) {
        (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
        (None, None) => None,
        _ => bail!("backends.{name}.tls: cert and key go together"),
    };
    let config = postern_server::backend::client_config(
        ca.as_deref(),
        identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .with_context(|| format!("backends.{name}.tls"))?;
    let server = t
        .and_then(|t| t.name.clone())
        .unwrap_or_else(|| host.to_owned());
    let verified = postern_server::backend::server_name(&server)
        .ok_or_else(|| anyhow!("backends.{name}.tls.name: {server:?} is not a valid name"))?;
    Ok(TlsClient {
        config,
        name: verified,
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

/// `sqlite:routes.db` relative to the configuration file, created when missing unless
/// the URL sets its own `mode`.
fn sqlite_url(url: &str, base: &Path) -> String {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path == ":memory:" {
        return url.to_owned();
    }
    let path = Path::new(path);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    };
    let mut encoded = String::new();
    for c in path.display().to_string().chars() {
        match c {
            '%' => encoded.push_str("%25"),
            '?' => encoded.push_str("%3F"),
            '#' => encoded.push_str("%23"),
            c => encoded.push(c),
        }
    }
    let query = if query.split('&').any(|p| p.starts_with("mode=")) {
        query.to_owned()
    } else if query.is_empty() {
        "mode=rwc".to_owned()
    } else {
        format!("{query}&mode=rwc")
    };
    format!("sqlite://{encoded}?{query}")
}

/// A database URL fit for messages: the password replaced.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = url.get(scheme + 3..at).unwrap_or("");
            let user = creds.split(':').next().unwrap_or("");
            format!(
                "{}{user}:***{}",
                url.get(..scheme + 3).unwrap_or(""),
                url.get(at..).unwrap_or("")
            )
        }
        _ => url.to_owned(),
    }
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `host:pid:start`: unique per process, readable in `postern route` output.
fn default_instance_id() -> String {
    format!(
        "{}:{}:{}",
        system_hostname(),
        std::process::id(),
        postern_route::store::now_secs()
    )
}

/// `[limits]`.
fn limits(l: &file::Limits) -> Result<postern_limits::Settings> {
    let trusted_networks = l
        .trusted_networks
        .iter()
        .map(|n| {
            parse_net(n).ok_or_else(|| anyhow!("limits.trusted_networks: {n:?} is not a network"))
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(l.ipv6_prefix <= 128, "limits.ipv6_prefix: at most 128");
    ensure!(
        !l.failure_window.is_zero(),
        "limits.failure_window: must be longer than zero"
    );
    ensure!(
        l.failure_delay <= l.max_failure_delay,
        "limits.failure_delay: longer than limits.max_failure_delay"
    );
    ensure!(l.max_tracked >= 16, "limits.max_tracked: at least 16");
    Ok(postern_limits::Settings {
        trusted_networks,
        ipv6_prefix: l.ipv6_prefix,
        failure_window: l.failure_window,
        max_failures_per_ip: l.max_failures_per_ip,
        max_failures_per_user: l.max_failures_per_user,
        failure_delay: l.failure_delay,
        max_failure_delay: l.max_failure_delay,
        max_connections_per_ip: l.max_connections_per_ip,
        connection_rate_per_ip: l.connection_rate_per_ip,
        max_sessions_per_user: l.max_sessions_per_user,
        max_tracked: l.max_tracked,
    })
}

/// A network (`10.0.0.0/8`) or a single address.
fn parse_net(n: &str) -> Option<ipnet::IpNet> {
    n.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| n.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

fn auth_mode(m: file::AuthMode) -> AuthMode {
    match m {
        file::AuthMode::Backend => AuthMode::Backend,
        file::AuthMode::Proxy => AuthMode::Proxy,
        file::AuthMode::Http => AuthMode::Http,
    }
}

/// `[auth]`, checked against the listeners that use each mode.
fn auth_settings(file: &File, base: &Path) -> Result<AuthSettings> {
    let a = &file.auth;
    let modes: BTreeSet<_> = file
        .listeners
        .iter()
        .map(|l| l.auth.unwrap_or(a.mode))
        .collect();
    postern_auth::password::Scheme::from_name(&a.dummy_scheme)
        .map_err(|e| anyhow!("auth.dummy_scheme: {e}"))?;
    if modes.contains(&file::AuthMode::Proxy) {
        let r = &file.routing;
        ensure!(
            r.store == file::StoreKind::Sql
                && r.sql.as_ref().is_some_and(|s| s.lookup_query.is_some()),
            "auth.mode \"proxy\": needs password hashes, from a routing.sql.lookup_query that returns a password column"
        );
    }
    let master = match &a.master {
        None => None,
        Some(m) => {
            ensure!(!m.user.is_empty(), "auth.master.user: must not be empty");
            let password = match (&m.password, &m.password_file) {
                (Some(p), None) => p.clone(),
                (None, Some(f)) => {
                    let path = if f.is_absolute() {
                        f.clone()
                    } else {
                        base.join(f)
                    };
                    let text = std::fs::read_to_string(&path).with_context(|| {
                        format!("auth.master.password_file: cannot read {}", path.display())
                    })?;
                    text.lines().next().unwrap_or_default().to_owned()
                }
                _ => bail!("auth.master: set one of password and password_file"),
            };
            ensure!(!password.is_empty(), "auth.master: the password is empty");
            let style = match m.style {
                file::MasterStyle::Separator => {
                    ensure!(
                        !m.separator.is_empty(),
                        "auth.master.separator: must not be empty"
                    );
                    MasterStyle::Separator(m.separator.clone())
                }
                file::MasterStyle::Authzid => MasterStyle::Authzid,
            };
            Some(MasterLogin {
                user: m.user.clone(),
                password: postern_proto::Secret::new(password.into_bytes()),
                style,
            })
        }
    };
    let http = match &a.http {
        None => {
            ensure!(
                !modes.contains(&file::AuthMode::Http),
                "auth.mode \"http\": needs an [auth.http] section with a url"
            );
            None
        }
        Some(h) => {
            let endpoint = postern_auth::auth_http::Endpoint::parse(&h.url)
                .map_err(|e| anyhow!("auth.http.url: {e}"))?;
            ensure!(!h.timeout.is_zero(), "auth.http.timeout: must be > 0");
            for (name, value) in &h.headers {
                ensure!(
                    !name.is_empty()
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                    "auth.http.headers: {name:?} is not a header name"
                );
                ensure!(
                    !value.bytes().any(|b| b.is_ascii_control()),
                    "auth.http.headers.{name}: control characters are not allowed"
                );
            }
            Some(HttpAuth {
                endpoint,
                timeout: h.timeout,
                headers: h
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
        }
    };
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    Ok(AuthSettings {
        master,
        max_parallel_checks: if a.max_parallel_checks == 0 {
            cpus
        } else {
            a.max_parallel_checks
        },
        dummy_scheme: a.dummy_scheme.clone(),
        http,
    })
}
