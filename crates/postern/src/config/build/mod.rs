//! From the file's structs to validated runtime settings: parse, don't validate twice.
//! Every error names the key (as a path) or the file it comes from.
//!
//! One module per part of the file, each validating its own sections: `server`
//! (`[server]`, `[timeouts]`, `[log]`, `[admin]`), `backends` (with `[pools]` and
//! `[health]`), `fronts` (the per-protocol front-end sections), `listeners` (with
//! `[tls]`), `routing`, `auth` and `limits`. [`build`] calls them in a fixed order: when
//! a file has several mistakes, the first one reported is always the same one.

mod auth;
mod backends;
mod fronts;
mod limits;
mod listeners;
mod routing;
mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use postern_route::moves::FenceOptions;
use postern_route::store::sql::{SqlOptions, SqlStore};
use postern_route::store::static_map::StaticStore;
use postern_route::{BackendEntry, Normalizer, RouteStore, Router, RouterOptions};
use postern_server::Settings;

use super::file::File;

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

/// The order of the calls is the order errors are reported in; keep it when adding a
/// part (operators fix one message at a time, and the tests pin the first one).
fn build(file: File, base: &Path) -> Result<Config> {
    let timeouts = server::timeouts(&file.timeouts)?;
    fronts::check_imap(&file.imap)?;
    let backends = backends::backends(&file, base)?;
    let hostname = server::hostname(&file.server)?;
    let listeners = listeners::listeners(&file, &backends, &hostname, base)?;
    let routes = routing::routing(&file.routing, &backends, base)?;
    auth::check_apop(&file)?;
    let health = backends::health(&file.health)?;
    let pools = backends::pools(&file.pools, &backends)?;
    let auth = auth::auth_settings(&file, base)?;
    let access_log = server::access_log(&file.log, base)?;
    let admin = server::admin(file.admin.as_ref(), base)?;
    let limits = limits::limits(&file.limits)?;
    Ok(Config {
        path: PathBuf::new(),
        log_level: file.log.level,
        settings: Settings {
            listeners,
            backends,
            timeouts,
            health,
            normalized_login: file.routing.normalize.apply_to_backend_login,
            hostname,
            watch: routes.watch,
            limits,
            auth,
            access_log,
            admin,
        },
        store: routes.store,
        normalizer: routes.normalizer,
        router: RouterOptions {
            unknown_users: routes.unknown_users,
            cache: routes.cache,
            pools,
            failover_rate: file.routing.failover_rate,
            fence: routes.fence,
        },
        fence: routes.fence,
    })
}

/// Relative paths in the file are relative to the file, not to the working directory.
fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The first line of a secret's file (`token_file`, `password_file`), so that a
/// trailing newline left by an editor or `echo` is not part of the secret.
fn first_line(base: &Path, file: &Path, key: &str) -> Result<String> {
    let path = resolve(base, file);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{key}: cannot read {}", path.display()))?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// A network (`10.0.0.0/8`) or a single address, which operators write without `/32`.
fn parse_net(n: &str) -> Option<ipnet::IpNet> {
    n.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| n.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A valid file: one IMAP backend and listener, a SQLite store, plus `extra`
    /// (tables only; the listener comes last).
    fn load(extra: &str) -> Result<Config> {
        let text = format!(
            "{extra}\n[routing]\n[routing.sql]\nurl = \"sqlite::memory:\"\n\
             [backends.b1]\nhost = \"127.0.0.1\"\n[backends.b1.imap]\nport = 1143\n\
             [[listeners]]\nprotocol = \"imap\"\nbind = \"127.0.0.1:143\"\ntls = \"none\"\n"
        );
        Config::from_toml(&text, Path::new("/etc/postern"))
    }

    #[test]
    fn a_minimal_file_gets_the_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.log_level, "info");
        assert_eq!(c.settings.timeouts, postern_server::Timeouts::default());
        assert_eq!(c.settings.listeners.len(), 1);
        assert!(c.settings.admin.is_none() && c.settings.watch.is_some());
        assert!(c.settings.normalized_login);
        assert_eq!(c.router.failover_rate, 50);
        assert!(c.router.pools.is_empty());
        assert_eq!(c.fence, c.router.fence);
    }

    #[test]
    fn errors_are_reported_in_build_order() {
        // Each pair: two mistakes, and the message of the one reported.
        for (extra, first) in [
            (
                "[timeouts]\nidle = \"0s\"\n[imap]\nmax_line_length = 1",
                "timeouts.idle:",
            ),
            (
                "[imap]\nmax_line_length = 1\n[server]\nhostname = \"a b\"",
                "imap.max_line_length:",
            ),
            (
                "[routing.cache]\ncapacity = 0\n[health]\ntimeout = \"0s\"",
                "routing.cache.capacity:",
            ),
            (
                "[health]\ninterval = \"0s\"\n[auth]\ndummy_scheme = \"NOPE\"",
                "health.interval:",
            ),
            (
                "[pools.nope]\n[auth]\ndummy_scheme = \"NOPE\"",
                "pools.nope:",
            ),
            (
                "[auth]\ndummy_scheme = \"NOPE\"\n[log]\naccess = \"/\"",
                "auth.dummy_scheme:",
            ),
            (
                "[log]\naccess = \"/\"\n[admin]\nbind = \"0.0.0.0:1\"",
                "log.access:",
            ),
            (
                "[limits]\nmax_tracked = 1\n[admin]\nbind = \"0.0.0.0:1\"",
                "admin.bind:",
            ),
        ] {
            let e = format!("{:#}", load(extra).expect_err(extra));
            assert!(e.starts_with(first), "{extra}: {e}");
        }
    }

    #[test]
    fn toml_errors_carry_the_key_path() {
        let e = Config::from_toml("[limits]\nmax_tracked = \"x\"\n", Path::new("/"))
            .expect_err("a string is not a number");
        assert!(
            format!("{e:#}").starts_with("limits.max_tracked: "),
            "{e:#}"
        );
    }

    #[test]
    fn paths_and_urls() {
        assert_eq!(
            resolve(Path::new("/etc/postern"), Path::new("tls/c.pem")),
            PathBuf::from("/etc/postern/tls/c.pem")
        );
        assert_eq!(
            resolve(Path::new("/etc/postern"), Path::new("/c.pem")),
            PathBuf::from("/c.pem")
        );
        assert_eq!(
            redact_url("mysql://user:secret@db:3306/postern"),
            "mysql://user:***@db:3306/postern"
        );
        assert_eq!(redact_url("sqlite:routes.db"), "sqlite:routes.db");
        assert_eq!(parse_net("192.0.2.1"), "192.0.2.1/32".parse().ok());
        assert_eq!(parse_net("2001:db8::/32"), "2001:db8::/32".parse().ok());
        assert_eq!(parse_net("office"), None);
    }
}
