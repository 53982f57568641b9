//! `[routing]`: the route store, user-name normalization, the policy for unknown
//! users, the route cache, the change-log watch and the timing of moves.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail, ensure};
use postern_route::moves::FenceOptions;
use postern_route::store::sql::{Dialect, SqlOptions, SyncWait};
use postern_route::{AssignPolicy, CacheOptions, Normalizer, UnknownUsers};
use postern_server::Backend;
use postern_server::settings::WatchSettings;

use super::StorePlan;
use crate::config::file;

/// What `[routing]` becomes; the pools join it later (they are checked after health).
#[derive(Debug)]
pub(super) struct Routing {
    pub(super) normalizer: Normalizer,
    pub(super) store: StorePlan,
    pub(super) unknown_users: UnknownUsers,
    pub(super) cache: CacheOptions,
    pub(super) fence: FenceOptions,
    /// `None` for the static store, which has no change log to follow.
    pub(super) watch: Option<WatchSettings>,
}

pub(super) fn routing(
    r: &file::Routing,
    backends: &BTreeMap<String, Arc<Backend>>,
    base: &Path,
) -> Result<Routing> {
    let normalizer = normalizer(&r.normalize)?;
    let store = store(r, base)?;
    // Checked for the SQL store too: the table is ignored there, but a typo in it
    // should not wait for the day someone switches stores.
    if let Some(map) = &r.static_routes {
        for (user, backend) in map {
            ensure!(
                backends.contains_key(backend),
                "routing.static.{user:?}: unknown backend {backend:?}"
            );
        }
    }
    let unknown_users = unknown_users(r)?;
    ensure!(r.cache.capacity > 0, "routing.cache.capacity: must be > 0");
    ensure!(
        !r.watch_interval.is_zero(),
        "routing.watch_interval: must be > 0"
    );
    // A live instance heartbeats once per watch interval; with less than about three
    // in `live_within`, one slow tick would let a mover presume a live instance dead.
    ensure!(
        r.moves.live_within >= r.watch_interval * 3,
        "routing.moves.live_within ({:?}) must be at least 3 x routing.watch_interval ({:?})",
        r.moves.live_within,
        r.watch_interval
    );
    Ok(Routing {
        normalizer,
        store,
        unknown_users,
        cache: CacheOptions {
            ttl: r.cache.ttl,
            negative_ttl: r.cache.negative_ttl,
            stale_if_error: r.cache.stale_if_error,
            capacity: r.cache.capacity,
        },
        fence: FenceOptions {
            hold: r.moves.hold,
            ack_timeout: r.moves.ack_timeout,
            live_within: r.moves.live_within,
            store_patience: r.moves.store_patience,
        },
        watch: match r.store {
            file::StoreKind::Sql => Some(WatchSettings {
                instance_id: r.instance_id.clone().unwrap_or_else(default_instance_id),
                interval: r.watch_interval,
                live_within: r.moves.live_within,
            }),
            file::StoreKind::Static => None,
        },
    })
}

/// `[routing.normalize]`. The default domain is appended after `@`: a second `@` or a
/// space would make names no store lookup can match.
fn normalizer(n: &file::Normalize) -> Result<Normalizer> {
    if let Some(d) = &n.default_domain {
        ensure!(
            !d.is_empty() && !d.contains(['@', ' ']),
            "routing.normalize.default_domain: {d:?} is not a domain"
        );
    }
    Ok(Normalizer {
        lowercase: n.lowercase,
        trim: n.trim,
        default_domain: n.default_domain.clone(),
    })
}

/// `routing.store` with its `[routing.sql]` or `[routing.static]` section.
fn store(r: &file::Routing, base: &Path) -> Result<StorePlan> {
    Ok(match r.store {
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
                sync_wait: match sql.sync_wait {
                    None => SyncWait::Auto,
                    Some(true) => SyncWait::On,
                    Some(false) => SyncWait::Off,
                },
            })
        }
        file::StoreKind::Static => {
            let Some(map) = &r.static_routes else {
                bail!("routing.store: \"static\" needs a [routing.static] table");
            };
            StorePlan::Static(map.clone())
        }
    })
}

/// `routing.unknown_users` with `routing.assign_policy`, which only `assign` reads.
fn unknown_users(r: &file::Routing) -> Result<UnknownUsers> {
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
    Ok(unknown_users)
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
    let path = super::resolve(base, Path::new(path));
    // The path becomes part of a URL: characters that start a query or a fragment, and
    // the escape character itself, must not be read as such.
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

/// `host:pid:start`: unique per process, readable in `postern route` output.
fn default_instance_id() -> String {
    format!(
        "{}:{}:{}",
        super::server::system_hostname(),
        std::process::id(),
        postern_route::store::now_secs()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    fn backends(names: &[&str]) -> BTreeMap<String, Arc<Backend>> {
        // Only the names matter to routing; build them through the backends part.
        let mut text = String::from("listeners = []\n[routing]\n");
        for n in names {
            text.push_str(&format!(
                "[backends.{n}]\nhost = \"h\"\n[backends.{n}.imap]\nport = 1\n"
            ));
        }
        let file: file::File = toml::from_str(&text).unwrap();
        super::super::backends::backends(&file, Path::new("/")).unwrap()
    }

    fn of(text: &str) -> Result<Routing> {
        let r: file::Routing = toml::from_str(text).unwrap();
        routing(&r, &backends(&["b1"]), Path::new("/etc/postern"))
    }

    fn err(text: &str) -> String {
        format!("{:#}", of(text).expect_err(text))
    }

    #[test]
    fn defaults_sql_store_rejecting_unknown_users() {
        let r = of("[sql]\nurl = \"sqlite:routes.db\"").unwrap();
        let StorePlan::Sql(sql) = &r.store else {
            panic!("{:?}", r.store)
        };
        assert_eq!(sql.url, "sqlite:///etc/postern/routes.db?mode=rwc");
        assert_eq!(sql.max_connections, 8);
        assert_eq!(sql.connect_timeout, Duration::from_secs(5));
        assert_eq!(sql.query_timeout, Duration::from_secs(2));
        assert!(sql.migrate);
        assert_eq!(sql.sync_wait, SyncWait::Auto);
        assert_eq!(r.unknown_users, UnknownUsers::Reject);
        assert_eq!(r.cache, CacheOptions::default());
        assert_eq!(r.fence, FenceOptions::default());
        assert_eq!(
            r.normalizer,
            Normalizer {
                lowercase: true,
                trim: true,
                default_domain: None
            }
        );
        let watch = r.watch.expect("the SQL store has a change log");
        assert_eq!(watch.interval, Duration::from_secs(1));
        assert!(watch.instance_id.contains(':'), "{}", watch.instance_id);
    }

    #[test]
    fn sync_wait_is_auto_unless_set() {
        for (line, want) in [
            ("", SyncWait::Auto),
            ("sync_wait = true", SyncWait::On),
            ("sync_wait = false", SyncWait::Off),
        ] {
            let r = of(&format!("[sql]\nurl = \"mysql://u:p@db/postern\"\n{line}")).unwrap();
            let StorePlan::Sql(sql) = &r.store else {
                panic!("{:?}", r.store)
            };
            assert_eq!(sql.sync_wait, want, "{line}");
        }
    }

    #[test]
    fn static_store_has_no_watch_and_cannot_assign() {
        let r =
            of("store = \"static\"\nunknown_users = \"hash\"\n[static]\n\"a@x\" = \"b1\"").unwrap();
        assert!(r.watch.is_none());
        assert_eq!(r.unknown_users, UnknownUsers::Hash);
        let StorePlan::Static(map) = &r.store else {
            panic!("{:?}", r.store)
        };
        assert_eq!(map.get("a@x").map(String::as_str), Some("b1"));
        assert_eq!(
            err("store = \"static\"\nunknown_users = \"assign\"\n[static]"),
            "routing.unknown_users: \"assign\" needs a writable store (routing.store = \"sql\")"
        );
    }

    #[test]
    fn assign_policy_and_explicit_instance() {
        let r = of(
            "unknown_users = \"assign\"\nassign_policy = \"hash\"\ninstance_id = \"me\"\nwatch_interval = \"250ms\"\n[sql]\nurl = \"postgres://u:p@db/routes\"",
        )
        .unwrap();
        assert_eq!(r.unknown_users, UnknownUsers::Assign(AssignPolicy::Hash));
        let watch = r.watch.unwrap();
        assert_eq!(watch.instance_id, "me");
        assert_eq!(watch.interval, Duration::from_millis(250));
        let StorePlan::Sql(sql) = &r.store else {
            panic!()
        };
        assert_eq!(
            sql.url, "postgres://u:p@db/routes",
            "only SQLite paths move"
        );
    }

    #[test]
    fn refusals_name_the_key() {
        for (text, message) in [
            (
                "",
                "routing.store: \"sql\" needs a [routing.sql] section with a url",
            ),
            (
                "store = \"static\"",
                "routing.store: \"static\" needs a [routing.static] table",
            ),
            (
                "[sql]\nurl = \"oracle://db\"",
                "routing.sql.url: must start with sqlite:, mysql:, mariadb: or postgres:",
            ),
            (
                "[sql]\nurl = \"mysql://db/x\"\nconnect_timeout = \"0s\"",
                "routing.sql.connect_timeout: must be > 0",
            ),
            (
                "[sql]\nurl = \"mysql://db/x\"\nquery_timeout = \"0s\"",
                "routing.sql.query_timeout: must be > 0",
            ),
            (
                "[normalize]\ndefault_domain = \"a@b\"\n[sql]\nurl = \"sqlite:r.db\"",
                "routing.normalize.default_domain: \"a@b\" is not a domain",
            ),
            (
                "[sql]\nurl = \"sqlite:r.db\"\n[static]\n\"u\" = \"nope\"",
                "routing.static.\"u\": unknown backend \"nope\"",
            ),
            (
                "[cache]\ncapacity = 0\n[sql]\nurl = \"sqlite:r.db\"",
                "routing.cache.capacity: must be > 0",
            ),
            (
                "watch_interval = \"0s\"\n[sql]\nurl = \"sqlite:r.db\"",
                "routing.watch_interval: must be > 0",
            ),
        ] {
            assert_eq!(err(text), message, "{text}");
        }
    }

    #[test]
    fn sqlite_urls_are_made_absolute_and_created() {
        let base = Path::new("/srv/p");
        assert_eq!(sqlite_url("sqlite::memory:", base), "sqlite::memory:");
        assert_eq!(
            sqlite_url("sqlite:routes.db", base),
            "sqlite:///srv/p/routes.db?mode=rwc"
        );
        assert_eq!(
            sqlite_url("sqlite://r.db?cache=shared", base),
            "sqlite:///srv/p/r.db?cache=shared&mode=rwc"
        );
        assert_eq!(
            sqlite_url("sqlite:///abs/a%b#c.db?mode=ro", base),
            "sqlite:///abs/a%25b%23c.db?mode=ro"
        );
    }
}
