//! Routes in SQL: SQLite (the embedded default), MySQL/MariaDB and PostgreSQL, through
//! one code path on sqlx's `Any` driver. Only the SQL text differs per dialect
//! (placeholders, upsert syntax, how an insert returns its id); every statement binds
//! its values as parameters, never by string building.
//!
//! Two ways to use it:
//! - Postern's own `routes` table (migrations in `migrations/<dialect>/`).
//! - An operator-written `lookup_query` over an existing user table, returning a
//!   `backend` (or `host`) column and optionally `pool`, `password` and `disabled`. The
//!   normalized user is bound to every placeholder of the query. Rows in Postern's own
//!   `routes` table (written by assignment, `route pin` and `route move`) take
//!   precedence over the operator's backend, so moves work in this mode too.

use std::time::Duration;

use postern_proto::Secret;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Column, Executor, Row};

use super::breaker::{Breaker, Gate};
use super::{
    BackendRef, ChangeEvent, ChangeKind, InstanceRow, PinOrigin, PinRow, RouteRecord, RouteStore,
    StoreError, StoreFuture, now_secs,
};
use crate::UserName;
use tracing::warn;

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static MYSQL: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/mysql");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The SQL dialects Postern speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite 3.
    Sqlite,
    /// MySQL 8 / MariaDB 10.5 and later.
    MySql,
    /// PostgreSQL 12 and later.
    Postgres,
}

impl Dialect {
    /// The dialect of a database URL (`sqlite:`, `mysql:`/`mariadb:`, `postgres:`/`postgresql:`).
    pub fn of_url(url: &str) -> Option<Self> {
        let scheme = url.split(':').next()?.to_ascii_lowercase();
        match scheme.as_str() {
            "sqlite" => Some(Dialect::Sqlite),
            "mysql" | "mariadb" => Some(Dialect::MySql),
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            _ => None,
        }
    }

    /// Name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::MySql => "mysql",
            Dialect::Postgres => "postgres",
        }
    }

    fn migrator(self) -> &'static sqlx::migrate::Migrator {
        match self {
            Dialect::Sqlite => &SQLITE,
            Dialect::MySql => &MYSQL,
            Dialect::Postgres => &POSTGRES,
        }
    }

    /// Rewrites `?` placeholders for PostgreSQL (`$1`, `$2`, ...). Our own statements
    /// never contain `?` inside literals.
    fn sql(self, template: &str) -> String {
        if self != Dialect::Postgres {
            return template.to_owned();
        }
        let mut out = String::with_capacity(template.len() + 8);
        let mut n = 0;
        for c in template.chars() {
            if c == '?' {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            } else {
                out.push(c);
            }
        }
        out
    }
}

/// Connection settings.
#[derive(Clone, Debug)]
pub struct SqlOptions {
    /// `sqlite:PATH`, `mysql://user:pass@host:port/db`, `postgres://...`. TLS to the
    /// database is set in the URL (`?ssl-mode=REQUIRED`, `?sslmode=require`).
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// Bound on connecting (and on waiting for a pooled connection).
    pub connect_timeout: Duration,
    /// Bound on each statement: a slow database counts as a failing one, so the route
    /// cache can serve stale routes instead of making clients wait.
    pub query_timeout: Duration,
    /// The operator's lookup query, if any.
    pub lookup_query: Option<String>,
    /// Apply Postern's migrations when opening.
    pub migrate: bool,
    /// Galera's causality checks on MySQL-dialect connections (`wsrep_sync_wait`).
    pub sync_wait: SyncWait,
}

/// Whether reads on a MySQL-dialect connection wait until the node has applied every
/// write the cluster committed before them (`SET SESSION wsrep_sync_wait = 1`). On a
/// Galera cluster a node applies other nodes' writes asynchronously, so without it a
/// lookup through node B can miss a pin or a move that node A committed a moment ago.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncWait {
    /// On when the server reports `wsrep_on` (a Galera node), off otherwise.
    #[default]
    Auto,
    /// Always set it; a server that has no such variable (MySQL, error 1193) is
    /// used as it is.
    On,
    /// Never set it.
    Off,
}

/// Statements for one dialect, built once.
#[derive(Debug)]
struct Statements {
    lookup: String,
    assign: String,
    pin: String,
    unpin: String,
    begin_move: String,
    finish_move: String,
    insert_event: String,
    counts: String,
    list_all: String,
    list_backend: String,
    events_since: String,
    last_event: String,
    heartbeat: String,
    instances: String,
    prune_events: String,
    prune_instances: String,
    reserve: String,
    ack: String,
    prune_acks: String,
    abort_move: String,
    clear_expired_holds: String,
    leave: String,
    confirm: String,
    release: String,
    repin: String,
    backend_states: String,
    set_backend_state: String,
    clear_backend_state: String,
}

impl Statements {
    fn new(d: Dialect) -> Self {
        let upsert = |insert: &str, conflict: &str, mysql: &str, others: &str| match d {
            Dialect::MySql => format!("{insert} ON DUPLICATE KEY UPDATE {mysql}"),
            Dialect::Sqlite | Dialect::Postgres => {
                format!("{insert} ON CONFLICT ({conflict}) DO {others}")
            }
        };
        let returning_id = match d {
            // MySQL has no RETURNING; its insert id comes with the result.
            Dialect::MySql => "",
            Dialect::Sqlite | Dialect::Postgres => " RETURNING id",
        };
        Self {
            lookup: d.sql(
                "SELECT backend, moving_to, hold_until, tentative_until FROM routes \
                 WHERE username = ?",
            ),
            assign: d.sql(&upsert(
                "INSERT INTO routes (username, backend) VALUES (?, ?)",
                "username",
                // A no-op update: the first writer wins, the others read its pin back.
                "username = username",
                "NOTHING",
            )),
            pin: d.sql(&upsert(
                "INSERT INTO routes (username, backend) VALUES (?, ?)",
                "username",
                "backend = VALUES(backend), moving_to = NULL, hold_until = NULL, \
                 tentative_until = NULL, updated_at = CURRENT_TIMESTAMP",
                "UPDATE SET backend = excluded.backend, moving_to = NULL, hold_until = NULL, \
                 tentative_until = NULL, updated_at = CURRENT_TIMESTAMP",
            )),
            unpin: d.sql("DELETE FROM routes WHERE username = ?"),
            begin_move: d.sql(&upsert(
                "INSERT INTO routes (username, backend, moving_to, hold_until) VALUES (?, ?, ?, ?)",
                "username",
                "moving_to = VALUES(moving_to), hold_until = VALUES(hold_until)",
                "UPDATE SET moving_to = excluded.moving_to, hold_until = excluded.hold_until",
            )),
            finish_move: d.sql(
                "UPDATE routes SET backend = ?, moving_to = NULL, hold_until = NULL, \
                 tentative_until = NULL, updated_at = CURRENT_TIMESTAMP WHERE username = ?",
            ),
            insert_event: d.sql(&format!(
                "INSERT INTO route_events (username, kind, backend, created_at) \
                 VALUES (?, ?, ?, ?){returning_id}"
            )),
            counts: "SELECT backend, COUNT(*) FROM routes GROUP BY backend".to_owned(),
            list_all: "SELECT username, backend, moving_to FROM routes ORDER BY username"
                .to_owned(),
            list_backend: d.sql(
                "SELECT username, backend, moving_to FROM routes WHERE backend = ? \
                 ORDER BY username",
            ),
            events_since: d.sql(
                "SELECT id, username, kind, backend FROM route_events WHERE id > ? \
                 ORDER BY id LIMIT ?",
            ),
            last_event: "SELECT COALESCE(MAX(id), 0) FROM route_events".to_owned(),
            heartbeat: d.sql(&upsert(
                "INSERT INTO instances (id, heartbeat_at, last_event_id) VALUES (?, ?, ?)",
                "id",
                "heartbeat_at = VALUES(heartbeat_at), last_event_id = VALUES(last_event_id)",
                "UPDATE SET heartbeat_at = excluded.heartbeat_at, \
                 last_event_id = excluded.last_event_id",
            )),
            instances: "SELECT id, heartbeat_at, last_event_id FROM instances ORDER BY id"
                .to_owned(),
            prune_events: d.sql("DELETE FROM route_events WHERE created_at < ?"),
            prune_instances: d.sql("DELETE FROM instances WHERE heartbeat_at < ?"),
            abort_move: d
                .sql("UPDATE routes SET moving_to = NULL, hold_until = NULL WHERE username = ?"),
            clear_expired_holds: d.sql(
                "UPDATE routes SET moving_to = NULL, hold_until = NULL \
                 WHERE hold_until IS NOT NULL AND hold_until < ?",
            ),
            leave: d.sql("DELETE FROM instances WHERE id = ?"),
            ack: d.sql(&upsert(
                "INSERT INTO route_acks (event_id, instance) VALUES (?, ?)",
                "event_id, instance",
                "instance = instance",
                "NOTHING",
            )),
            // The acknowledgements of entries pruned from the log.
            prune_acks: "DELETE FROM route_acks WHERE event_id < \
                         (SELECT COALESCE(MIN(id), 0) FROM route_events)"
                .to_owned(),
            reserve: d.sql(&upsert(
                "INSERT INTO routes (username, backend, tentative_until) VALUES (?, ?, ?)",
                "username",
                // As `assign`: the first writer wins, the others read its pin back.
                "username = username",
                "NOTHING",
            )),
            confirm: d
                .sql("UPDATE routes SET tentative_until = NULL WHERE username = ? AND backend = ?"),
            release: d.sql(
                "DELETE FROM routes WHERE username = ? AND backend = ? \
                 AND tentative_until IS NOT NULL",
            ),
            repin: d.sql(
                "UPDATE routes SET backend = ?, updated_at = CURRENT_TIMESTAMP \
                 WHERE username = ? AND backend = ? AND moving_to IS NULL",
            ),
            backend_states: "SELECT backend, state FROM backend_state ORDER BY backend".to_owned(),
            set_backend_state: d.sql(&upsert(
                "INSERT INTO backend_state (backend, state, updated_at) VALUES (?, ?, ?)",
                "backend",
                "state = VALUES(state), updated_at = VALUES(updated_at)",
                "UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
            )),
            clear_backend_state: d.sql("DELETE FROM backend_state WHERE backend = ?"),
        }
    }
}

/// A route store in a SQL database.
#[derive(Debug)]
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
    statements: Statements,
    lookup_query: Option<String>,
    /// See [`RouteStore::source`]: the URL and the lookup query.
    source: u64,
    /// How many times the user is bound into `lookup_query`.
    lookup_binds: usize,
    query_timeout: Duration,
    /// Fails calls fast while the database cannot be reached.
    breaker: Breaker,
}

/// A fingerprint of what answers lookups (see [`RouteStore::source`]).
pub(crate) fn fingerprint(value: &impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(value)
}

/// A row of Postern's own `routes` table.
struct OwnRoute {
    backend: String,
    moving_to: Option<String>,
    moving: bool,
    tentative: bool,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// WAL pages after which SQLite checkpoints (256 pages of 4 KiB: 1 MiB).
const SQLITE_WAL_CHECKPOINT_PAGES: u32 = 256;
/// Bytes the WAL file is truncated to after a checkpoint.
pub const SQLITE_WAL_LIMIT: u64 = 1024 * 1024;

impl SqlStore {
    /// Connects (and migrates, if asked). Fails when the database cannot be reached, so
    /// `postern check` and startup say so; later outages are handled per lookup.
    pub async fn open(options: &SqlOptions) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::of_url(&options.url).ok_or_else(|| {
            StoreError::Invalid("database URL must start with sqlite:, mysql: or postgres:".into())
        })?;
        let mut pool = AnyPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.connect_timeout);
        if dialect == Dialect::Sqlite {
            pool = pool.after_connect(|conn, _meta| {
                Box::pin(async move {
                    // WAL lets `postern route` write while the proxy reads; the busy
                    // timeout makes a writer wait instead of failing at once.
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    // The heartbeat writes every second. SQLite checkpoints the WAL at
                    // 1000 pages (4 MiB) and then reuses the file at its largest size;
                    // checkpoint at 1 MiB and truncate the file back to that size.
                    conn.execute(sqlx::AssertSqlSafe(format!(
                        "PRAGMA wal_autocheckpoint = {SQLITE_WAL_CHECKPOINT_PAGES}"
                    )))
                    .await?;
                    conn.execute(sqlx::AssertSqlSafe(format!(
                        "PRAGMA journal_size_limit = {SQLITE_WAL_LIMIT}"
                    )))
                    .await?;
                    Ok(())
                })
            });
        }
        if dialect == Dialect::MySql && options.sync_wait != SyncWait::Off {
            let mode = options.sync_wait;
            pool = pool.after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if mode == SyncWait::Auto {
                        // MariaDB without Galera says 0; MySQL has no such variable.
                        let on = sqlx::query_scalar::<_, i64>(
                            "SELECT CAST(@@SESSION.wsrep_on AS SIGNED)",
                        )
                        .fetch_one(&mut *conn)
                        .await;
                        match on {
                            Ok(1) => {}
                            Ok(_) => return Ok(()),
                            Err(e) if mysql_error_number(&e) == Some(UNKNOWN_VARIABLE) => {
                                return Ok(());
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    // 1: SELECT, SHOW and BEGIN wait for the node to have applied what
                    // the cluster committed before them (writes are certified anyway).
                    match conn.execute("SET SESSION wsrep_sync_wait = 1").await {
                        Ok(_) => Ok(()),
                        Err(e) if mysql_error_number(&e) == Some(UNKNOWN_VARIABLE) => Ok(()),
                        Err(e) => Err(e),
                    }
                })
            });
        }
        let pool = tokio_timeout(options.connect_timeout, pool.connect(&options.url))
            .await?
            .map_err(unavailable)?;
        if dialect == Dialect::MySql {
            report_sync_wait(&pool, options.query_timeout).await;
        }
        if options.migrate {
            dialect.migrator().run(&pool).await.map_err(unavailable)?;
        }
        let lookup_binds = options
            .lookup_query
            .as_deref()
            .map_or(0, |q| placeholders(q, dialect));
        Ok(Self {
            pool,
            dialect,
            statements: Statements::new(dialect),
            lookup_query: options.lookup_query.clone(),
            source: fingerprint(&(&options.url, &options.lookup_query)),
            lookup_binds,
            query_timeout: options.query_timeout,
            breaker: Breaker::default(),
        })
    }

    /// The dialect in use.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Applies Postern's migrations (for `postern db migrate`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.dialect
            .migrator()
            .run(&self.pool)
            .await
            .map_err(unavailable)
    }

    /// Runs a SQL script (seed data) in one transaction.
    pub async fn execute_script(&self, sql: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)
    }

    async fn timed<T>(
        &self,
        f: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        self.admit()?;
        let answer = tokio_timeout(self.query_timeout, f).await;
        self.observe(&answer);
        answer?.map_err(unavailable)
    }

    /// Refuses at once while the breaker is open (see `breaker.rs`).
    fn admit(&self) -> Result<(), StoreError> {
        match self.breaker.gate(std::time::Instant::now()) {
            Gate::Refuse => Err(StoreError::Unavailable(
                "route store unreachable a moment ago; failing fast".into(),
            )),
            Gate::Pass | Gate::Probe => Ok(()),
        }
    }

    /// Feeds the breaker: no answer in time, or no connection, opens it; any answer
    /// from the database (an error of its own included) closes it.
    fn observe<T>(&self, answer: &Result<Result<T, sqlx::Error>, StoreError>) {
        let unreachable = match answer {
            Err(_) => true,
            Ok(Err(e)) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
            ),
            Ok(Ok(_)) => false,
        };
        if unreachable {
            if !self.breaker.is_open() {
                warn!("route store unreachable; failing lookups fast, probing once a second");
            }
            self.breaker.unreachable(std::time::Instant::now());
        } else {
            self.breaker.success();
        }
    }

    /// Runs a write transaction, again when the database aborted it to resolve a
    /// conflict: the transaction was rolled back whole, and running it again is what
    /// the database asks for. A failover must never degrade to "temporary" because two
    /// instances wrote at once. Bounded: [`MAX_WRITE_ATTEMPTS`], a doubling backoff with
    /// jitter, all within one `query_timeout`.
    async fn write<T, F, Fut>(&self, mut work: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.query_timeout;
        let mut backoff = Duration::from_millis(10);
        let mut attempt = 1;
        loop {
            self.admit()?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let answer = tokio_timeout(left, work()).await;
            self.observe(&answer);
            match answer? {
                Ok(v) => return Ok(v),
                Err(e) if attempt < MAX_WRITE_ATTEMPTS && is_conflict(&e) => {
                    warn!(attempt, error = %e, "route store write conflict; retrying");
                    // Jitter from the clock's low bits, so instances that collided do not
                    // collide again in step.
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos());
                    let spread = u32::try_from(backoff.as_millis())
                        .unwrap_or(u32::MAX)
                        .max(1);
                    let pause = backoff + Duration::from_millis(u64::from(nanos % spread));
                    if tokio::time::Instant::now() + pause >= deadline {
                        return Err(unavailable(e));
                    }
                    tokio::time::sleep(pause).await;
                    backoff = backoff.saturating_mul(2);
                    attempt += 1;
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
    }

    async fn own_route(&self, user: &UserName) -> Result<Option<OwnRoute>, StoreError> {
        let row = self
            .timed(
                sqlx::query(sqlx::AssertSqlSafe(self.statements.lookup.clone()))
                    .bind(user.as_str())
                    .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let backend: String = row.try_get(0).map_err(unavailable)?;
        let moving_to: Option<String> = row.try_get(1).map_err(unavailable)?;
        let hold_until: Option<i64> = row.try_get(2).map_err(unavailable)?;
        let tentative: Option<i64> = row.try_get(3).map_err(unavailable)?;
        Ok(Some(OwnRoute {
            moving: moving_to.is_some() && hold_until.is_some_and(|t| t > now_secs()),
            moving_to,
            tentative: tentative.is_some(),
            backend,
        }))
    }

    async fn operator_route(
        &self,
        query: &str,
        user: &UserName,
    ) -> Result<Option<RouteRecord>, StoreError> {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(query.to_owned()));
        for _ in 0..self.lookup_binds {
            q = q.bind(user.as_str());
        }
        let row = self.timed(q.fetch_optional(&self.pool)).await?;
        row.map(|row| operator_record(&row)).transpose()
    }

    async fn insert_event(
        &self,
        conn: &mut sqlx::AnyConnection,
        user: &UserName,
        kind: ChangeKind,
        backend: Option<&str>,
    ) -> Result<i64, sqlx::Error> {
        let q = sqlx::query(sqlx::AssertSqlSafe(self.statements.insert_event.clone()))
            .bind(user.as_str())
            .bind(kind.as_str())
            .bind(backend.map(str::to_owned))
            .bind(now_secs());
        match self.dialect {
            Dialect::MySql => {
                let done = q.execute(&mut *conn).await?;
                Ok(done.last_insert_id().unwrap_or(0))
            }
            Dialect::Sqlite | Dialect::Postgres => {
                let row = q.fetch_one(&mut *conn).await?;
                row.try_get(0)
            }
        }
    }
}

/// Decodes a row of the operator's query by column name.
fn operator_record(row: &AnyRow) -> Result<RouteRecord, StoreError> {
    let has = |name: &str| {
        row.columns()
            .iter()
            .any(|c| c.name().eq_ignore_ascii_case(name))
    };
    let text = |name: &str| -> Result<Option<String>, StoreError> {
        if !has(name) {
            return Ok(None);
        }
        row.try_get::<Option<String>, _>(name)
            .map(|v| v.filter(|s| !s.is_empty()))
            .map_err(|e| StoreError::Invalid(format!("column {name}: {e}")))
    };
    let backend = match (text("backend")?, text("host")?) {
        (Some(b), _) => Some(BackendRef::Name(b)),
        (None, Some(h)) => Some(BackendRef::Host(h)),
        (None, None) if has("backend") || has("host") => None,
        (None, None) => {
            return Err(StoreError::Invalid(
                "the lookup query must return a `backend` or a `host` column".into(),
            ));
        }
    };
    let disabled = if has("disabled") {
        truthy(row, "disabled")?
    } else {
        false
    };
    Ok(RouteRecord {
        backend,
        pool: text("pool")?,
        password: text("password")?.map(Secret::new),
        disabled,
        origin: PinOrigin::LookupQuery,
        ..RouteRecord::default()
    })
}

/// Operators store flags as BOOLEAN, TINYINT, INT or 'Y'/'N' strings.
fn truthy(row: &AnyRow, name: &str) -> Result<bool, StoreError> {
    if let Ok(v) = row.try_get::<Option<bool>, _>(name) {
        return Ok(v.unwrap_or(false));
    }
    if let Ok(v) = row.try_get::<Option<i64>, _>(name) {
        return Ok(v.is_some_and(|v| v != 0));
    }
    if let Ok(v) = row.try_get::<Option<String>, _>(name) {
        let v = v.unwrap_or_default().to_ascii_lowercase();
        return Ok(matches!(v.as_str(), "1" | "t" | "true" | "y" | "yes"));
    }
    Err(StoreError::Invalid(format!("column {name}: not a flag")))
}

/// How many placeholders a query has, outside quoted literals.
fn placeholders(query: &str, dialect: Dialect) -> usize {
    let mut in_quote = false;
    let mut count = 0;
    let mut max_dollar = 0usize;
    let bytes = query.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\'' => in_quote = !in_quote,
            b'?' if !in_quote && dialect != Dialect::Postgres => count += 1,
            b'$' if !in_quote && dialect == Dialect::Postgres => {
                let digits: String = query
                    .get(i + 1..)
                    .unwrap_or_default()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if let Ok(n) = digits.parse::<usize>() {
                    max_dollar = max_dollar.max(n);
                }
            }
            _ => {}
        }
        i += 1;
    }
    // PostgreSQL numbers its parameters: `$1` used twice is bound once.
    if dialect == Dialect::Postgres {
        max_dollar
    } else {
        count
    }
}

/// MySQL/MariaDB "Unknown system variable": the server is not a Galera node.
const UNKNOWN_VARIABLE: u16 = 1193;

/// The MySQL/MariaDB error number of a database error.
fn mysql_error_number(e: &sqlx::Error) -> Option<u16> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map(sqlx::mysql::MySqlDatabaseError::number)
}

/// Says once, at open, whether this store's reads wait for the Galera cluster, so an
/// operator (and the cluster tests) can see it took effect.
async fn report_sync_wait(pool: &AnyPool, limit: Duration) {
    // Both: `sync_wait = true` on a MariaDB without Galera sets a variable that
    // changes nothing there.
    let asked = tokio_timeout(
        limit,
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT CAST(@@SESSION.wsrep_on AS SIGNED), \
             CAST(@@SESSION.wsrep_sync_wait AS SIGNED)",
        )
        .fetch_one(pool),
    )
    .await;
    if let Ok(Ok((1, v))) = asked
        && v & 1 == 1
    {
        tracing::info!(
            wsrep_sync_wait = v,
            "route store: Galera node; reads wait for the cluster's earlier commits"
        );
    }
}

/// Attempts of one write transaction when the database keeps aborting it for conflicts.
const MAX_WRITE_ATTEMPTS: u32 = 5;

/// Whether the database rolled the transaction back to resolve a conflict with another
/// (so it can simply run again): MariaDB/MySQL deadlock 1213 (also Galera's
/// certification failure, SQLSTATE 40001) and lock wait timeout 1205; PostgreSQL
/// serialization_failure 40001 and deadlock_detected 40P01; SQLite's busy/locked after
/// its busy timeout.
fn is_conflict(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return matches!(my.number(), 1213 | 1205);
    }
    matches!(
        db.code().as_deref(),
        Some("40001" | "40P01" | "5" | "6" | "517" | "262")
    )
}

async fn tokio_timeout<T>(limit: Duration, f: impl Future<Output = T>) -> Result<T, StoreError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| StoreError::Unavailable(format!("no answer within {limit:?}")))
}

impl RouteStore for SqlStore {
    fn lookup<'a>(&'a self, user: &'a UserName) -> StoreFuture<'a, Option<RouteRecord>> {
        Box::pin(async move {
            let own = self.own_route(user).await?;
            let mut record = match &self.lookup_query {
                Some(q) => self.operator_route(q, user).await?,
                None => None,
            };
            if let Some(own) = own {
                let r = record.get_or_insert_with(RouteRecord::default);
                r.backend = Some(BackendRef::Name(own.backend));
                r.moving = own.moving;
                r.tentative = own.tentative;
                r.moving_to = own.moving_to;
                r.origin = PinOrigin::Table;
            }
            Ok(record)
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.timed(sqlx::query("SELECT 1").execute(&self.pool))
                .await
                .map(|_| ())
        })
    }

    fn kind(&self) -> &'static str {
        self.dialect.as_str()
    }

    fn has_uncounted_pins(&self) -> bool {
        self.lookup_query.is_some()
    }

    fn source(&self) -> u64 {
        self.source
    }

    fn assign<'a>(&'a self, user: &'a UserName, backend: &'a str) -> StoreFuture<'a, String> {
        Box::pin(async move {
            self.write(move || {
                sqlx::query(sqlx::AssertSqlSafe(self.statements.assign.clone()))
                    .bind(user.as_str())
                    .bind(backend)
                    .execute(&self.pool)
            })
            .await?;
            // Whoever won the insert, this is the pin everyone uses.
            match self.own_route(user).await? {
                Some(own) => Ok(own.backend),
                None => Err(StoreError::Unavailable("pin vanished after insert".into())),
            }
        })
    }

    fn reserve<'a>(
        &'a self,
        user: &'a UserName,
        backend: &'a str,
        until: i64,
    ) -> StoreFuture<'a, String> {
        Box::pin(async move {
            self.write(move || {
                sqlx::query(sqlx::AssertSqlSafe(self.statements.reserve.clone()))
                    .bind(user.as_str())
                    .bind(backend)
                    .bind(until)
                    .execute(&self.pool)
            })
            .await?;
            match self.own_route(user).await? {
                Some(own) => Ok(own.backend),
                None => Err(StoreError::Unavailable("pin vanished after insert".into())),
            }
        })
    }

    fn confirm<'a>(&'a self, user: &'a UserName, backend: &'a str) -> StoreFuture<'a, String> {
        Box::pin(async move {
            let done = self
                .write(move || {
                    sqlx::query(sqlx::AssertSqlSafe(self.statements.confirm.clone()))
                        .bind(user.as_str())
                        .bind(backend)
                        .execute(&self.pool)
                })
                .await?;
            if done.rows_affected() > 0 {
                return Ok(backend.to_owned());
            }
            // The reservation is gone (released by a failed login of the same name, or
            // pruned) or was never ours: pin now, unless someone else did.
            self.assign(user, backend).await
        })
    }

    fn release<'a>(&'a self, user: &'a UserName, backend: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let done = self
                .write(move || {
                    sqlx::query(sqlx::AssertSqlSafe(self.statements.release.clone()))
                        .bind(user.as_str())
                        .bind(backend)
                        .execute(&self.pool)
                })
                .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn pin<'a>(&'a self, user: &'a UserName, backend: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let work = move || async move {
                let mut tx = self.pool.begin().await?;
                sqlx::query(sqlx::AssertSqlSafe(self.statements.pin.clone()))
                    .bind(user.as_str())
                    .bind(backend)
                    .execute(&mut *tx)
                    .await?;
                self.insert_event(&mut tx, user, ChangeKind::Pin, Some(backend))
                    .await?;
                tx.commit().await
            };
            self.write(work).await
        })
    }

    fn repin<'a>(
        &'a self,
        user: &'a UserName,
        from: &'a str,
        to: &'a str,
    ) -> StoreFuture<'a, String> {
        Box::pin(async move {
            let work = move || async move {
                let mut tx = self.pool.begin().await?;
                let done = sqlx::query(sqlx::AssertSqlSafe(self.statements.repin.clone()))
                    .bind(to)
                    .bind(user.as_str())
                    .bind(from)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    // No row of ours (the pin came from the operator's query): ours now
                    // overrides it, unless another instance wrote one first.
                    sqlx::query(sqlx::AssertSqlSafe(self.statements.assign.clone()))
                        .bind(user.as_str())
                        .bind(to)
                        .execute(&mut *tx)
                        .await?;
                }
                self.insert_event(&mut tx, user, ChangeKind::Pin, Some(to))
                    .await?;
                tx.commit().await
            };
            self.write(work).await?;
            // Whoever won, this is the pin in force.
            match self.own_route(user).await? {
                Some(own) => Ok(own.backend),
                None => Err(StoreError::Unavailable("pin vanished after repin".into())),
            }
        })
    }

    fn backend_states(&self) -> StoreFuture<'_, Vec<(String, String)>> {
        Box::pin(async move {
            let rows = self
                .timed(
                    sqlx::query(sqlx::AssertSqlSafe(self.statements.backend_states.clone()))
                        .fetch_all(&self.pool),
                )
                .await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(unavailable)
        })
    }

    fn set_backend_state<'a>(
        &'a self,
        backend: &'a str,
        state: Option<&'a str>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let q = match state {
                Some(state) => sqlx::query(sqlx::AssertSqlSafe(
                    self.statements.set_backend_state.clone(),
                ))
                .bind(backend)
                .bind(state)
                .bind(now_secs()),
                None => sqlx::query(sqlx::AssertSqlSafe(
                    self.statements.clear_backend_state.clone(),
                ))
                .bind(backend),
            };
            self.timed(q.execute(&self.pool)).await.map(|_| ())
        })
    }

    fn unpin<'a>(&'a self, user: &'a UserName) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let work = move || async move {
                let mut tx = self.pool.begin().await?;
                let done = sqlx::query(sqlx::AssertSqlSafe(self.statements.unpin.clone()))
                    .bind(user.as_str())
                    .execute(&mut *tx)
                    .await?;
                self.insert_event(&mut tx, user, ChangeKind::Pin, None)
                    .await?;
                tx.commit().await?;
                Ok(done.rows_affected() > 0)
            };
            self.write(work).await
        })
    }

    fn begin_move<'a>(
        &'a self,
        user: &'a UserName,
        from: &'a str,
        to: &'a str,
        hold_until: i64,
    ) -> StoreFuture<'a, i64> {
        Box::pin(async move {
            let work = move || async move {
                let mut tx = self.pool.begin().await?;
                sqlx::query(sqlx::AssertSqlSafe(self.statements.begin_move.clone()))
                    .bind(user.as_str())
                    .bind(from)
                    .bind(to)
                    .bind(hold_until)
                    .execute(&mut *tx)
                    .await?;
                let id = self
                    .insert_event(&mut tx, user, ChangeKind::Kick, Some(from))
                    .await?;
                tx.commit().await?;
                Ok(id)
            };
            self.write(work).await
        })
    }

    fn finish_move<'a>(&'a self, user: &'a UserName, to: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let work = move || async move {
                let mut tx = self.pool.begin().await?;
                sqlx::query(sqlx::AssertSqlSafe(self.statements.finish_move.clone()))
                    .bind(to)
                    .bind(user.as_str())
                    .execute(&mut *tx)
                    .await?;
                self.insert_event(&mut tx, user, ChangeKind::Pin, Some(to))
                    .await?;
                tx.commit().await
            };
            self.write(work).await
        })
    }

    fn abort_move<'a>(&'a self, user: &'a UserName) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.write(move || {
                sqlx::query(sqlx::AssertSqlSafe(self.statements.abort_move.clone()))
                    .bind(user.as_str())
                    .execute(&self.pool)
            })
            .await
            .map(|_| ())
        })
    }

    fn clear_expired_holds(&self, now: i64) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            self.write(move || {
                sqlx::query(sqlx::AssertSqlSafe(
                    self.statements.clear_expired_holds.clone(),
                ))
                .bind(now)
                .execute(&self.pool)
            })
            .await
            .map(|done| done.rows_affected())
        })
    }

    fn leave<'a>(&'a self, instance: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.write(move || {
                sqlx::query(sqlx::AssertSqlSafe(self.statements.leave.clone()))
                    .bind(instance)
                    .execute(&self.pool)
            })
            .await
            .map(|_| ())
        })
    }

    fn ack<'a>(&'a self, instance: &'a str, kicks: &'a [i64]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if kicks.is_empty() {
                return Ok(());
            }
            let work = move || async move {
                let mut tx = self.pool.begin().await?;
                for kick in kicks {
                    sqlx::query(sqlx::AssertSqlSafe(self.statements.ack.clone()))
                        .bind(*kick)
                        .bind(instance)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await
            };
            self.write(work).await
        })
    }

    fn acked<'a>(&'a self, kicks: &'a [i64]) -> StoreFuture<'a, Vec<(i64, String)>> {
        Box::pin(async move {
            if kicks.is_empty() {
                return Ok(Vec::new());
            }
            // One placeholder per kick: a batch of an evacuation is at most a few
            // hundred, and every value is bound.
            let marks = vec!["?"; kicks.len()].join(", ");
            let sql = self.dialect.sql(&format!(
                "SELECT event_id, instance FROM route_acks WHERE event_id IN ({marks})"
            ));
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for kick in kicks {
                q = q.bind(*kick);
            }
            let rows = self.timed(q.fetch_all(&self.pool)).await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(unavailable)
        })
    }

    fn kick<'a>(&'a self, user: &'a UserName) -> StoreFuture<'a, i64> {
        Box::pin(async move {
            let work = move || async move {
                let mut conn = self.pool.acquire().await?;
                self.insert_event(&mut conn, user, ChangeKind::Kick, None)
                    .await
            };
            self.write(work).await
        })
    }

    fn counts(&self) -> StoreFuture<'_, Vec<(String, u64)>> {
        Box::pin(async move {
            let rows = self
                .timed(
                    sqlx::query(sqlx::AssertSqlSafe(self.statements.counts.clone()))
                        .fetch_all(&self.pool),
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let backend: String = r.try_get(0)?;
                    let n: i64 = r.try_get(1)?;
                    Ok((backend, u64::try_from(n).unwrap_or(0)))
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(unavailable)
        })
    }

    fn list<'a>(&'a self, backend: Option<&'a str>) -> StoreFuture<'a, Vec<PinRow>> {
        Box::pin(async move {
            let q = match backend {
                Some(b) => {
                    sqlx::query(sqlx::AssertSqlSafe(self.statements.list_backend.clone())).bind(b)
                }
                None => sqlx::query(sqlx::AssertSqlSafe(self.statements.list_all.clone())),
            };
            let rows = self.timed(q.fetch_all(&self.pool)).await?;
            rows.iter()
                .map(|r| {
                    Ok(PinRow {
                        user: r.try_get(0)?,
                        backend: r.try_get(1)?,
                        moving_to: r.try_get(2)?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(unavailable)
        })
    }

    fn events_since(&self, after: i64, limit: u32) -> StoreFuture<'_, Vec<ChangeEvent>> {
        Box::pin(async move {
            let rows = self
                .timed(
                    sqlx::query(sqlx::AssertSqlSafe(self.statements.events_since.clone()))
                        .bind(after)
                        .bind(i64::from(limit))
                        .fetch_all(&self.pool),
                )
                .await?;
            let mut events = Vec::with_capacity(rows.len());
            for r in &rows {
                let kind: String = r.try_get(2).map_err(unavailable)?;
                let kind = match kind.as_str() {
                    "kick" => ChangeKind::Kick,
                    // Unknown kinds (from a newer Postern) at least invalidate caches.
                    _ => ChangeKind::Pin,
                };
                events.push(ChangeEvent {
                    id: r.try_get(0).map_err(unavailable)?,
                    user: r.try_get(1).map_err(unavailable)?,
                    kind,
                    backend: r.try_get(3).map_err(unavailable)?,
                });
            }
            Ok(events)
        })
    }

    fn last_event_id(&self) -> StoreFuture<'_, i64> {
        Box::pin(async move {
            let row = self
                .timed(
                    sqlx::query(sqlx::AssertSqlSafe(self.statements.last_event.clone()))
                        .fetch_one(&self.pool),
                )
                .await?;
            row.try_get(0).map_err(unavailable)
        })
    }

    fn heartbeat<'a>(&'a self, instance: &'a str, last_event_id: i64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.timed(
                sqlx::query(sqlx::AssertSqlSafe(self.statements.heartbeat.clone()))
                    .bind(instance)
                    .bind(now_secs())
                    .bind(last_event_id)
                    .execute(&self.pool),
            )
            .await
            .map(|_| ())
        })
    }

    fn instances(&self) -> StoreFuture<'_, Vec<InstanceRow>> {
        Box::pin(async move {
            let rows = self
                .timed(
                    sqlx::query(sqlx::AssertSqlSafe(self.statements.instances.clone()))
                        .fetch_all(&self.pool),
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(InstanceRow {
                        id: r.try_get(0)?,
                        heartbeat_at: r.try_get(1)?,
                        last_event_id: r.try_get(2)?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(unavailable)
        })
    }

    fn prune(&self, events_before: i64, instances_before: i64) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            for (statement, before) in [
                (&self.statements.prune_events, events_before),
                (&self.statements.prune_instances, instances_before),
            ] {
                self.timed(
                    sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
                        .bind(before)
                        .execute(&self.pool),
                )
                .await?;
            }
            self.timed(
                sqlx::query(sqlx::AssertSqlSafe(self.statements.prune_acks.clone()))
                    .execute(&self.pool),
            )
            .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Normalizer;

    fn options(url: String) -> SqlOptions {
        SqlOptions {
            url,
            max_connections: 4,
            connect_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(5),
            lookup_query: None,
            migrate: true,
            sync_wait: SyncWait::Auto,
        }
    }

    #[test]
    fn placeholders_per_dialect() {
        assert_eq!(
            Dialect::Postgres.sql("a = ? AND b = ?"),
            "a = $1 AND b = $2"
        );
        assert_eq!(Dialect::MySql.sql("a = ?"), "a = ?");
        assert_eq!(
            placeholders("SELECT 'x?' FROM t WHERE a = ? OR b = ?", Dialect::MySql),
            2
        );
        assert_eq!(
            placeholders("SELECT 1 FROM t WHERE a = $1 OR b = $1", Dialect::Postgres),
            1
        );
        assert_eq!(Dialect::of_url("mariadb://x/y"), Some(Dialect::MySql));
        assert_eq!(Dialect::of_url("postgresql://x/y"), Some(Dialect::Postgres));
        assert_eq!(Dialect::of_url("redis://x"), None);
    }

    #[tokio::test]
    async fn sqlite_pins_moves_and_change_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.db");
        let missing = SqlStore::open(&options(format!("sqlite:{}", path.display()))).await;
        assert!(missing.is_err(), "no ?mode=rwc: the file must exist");
        let store = SqlStore::open(&options(format!("sqlite:{}?mode=rwc", path.display())))
            .await
            .unwrap();
        let n = Normalizer::default();
        let alice = n.normalize("Alice@Example.test").unwrap();
        assert_eq!(store.lookup(&alice).await.unwrap(), None);

        // First assignment wins; a later one gets the winner back.
        assert_eq!(store.assign(&alice, "b1").await.unwrap(), "b1");
        assert_eq!(store.assign(&alice, "b2").await.unwrap(), "b1");
        let start = store.last_event_id().await.unwrap();

        store.pin(&alice, "b2").await.unwrap();
        let rec = store.lookup(&alice).await.unwrap().unwrap();
        assert_eq!(rec.backend, Some(BackendRef::Name("b2".into())));
        assert!(!rec.moving);

        let kick = store
            .begin_move(&alice, "b2", "b1", now_secs() + 60)
            .await
            .unwrap();
        assert!(store.lookup(&alice).await.unwrap().unwrap().moving);
        store.finish_move(&alice, "b1").await.unwrap();
        let rec = store.lookup(&alice).await.unwrap().unwrap();
        assert_eq!(rec.backend, Some(BackendRef::Name("b1".into())));
        assert!(!rec.moving);

        let events = store.events_since(start, 100).await.unwrap();
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [ChangeKind::Pin, ChangeKind::Kick, ChangeKind::Pin]);
        assert_eq!(events[1].id, kick);
        assert_eq!(store.counts().await.unwrap(), vec![("b1".to_owned(), 1)]);
        assert_eq!(
            store.list(Some("b1")).await.unwrap()[0].user,
            alice.as_str()
        );

        store.heartbeat("i1", kick).await.unwrap();
        store.heartbeat("i1", kick + 1).await.unwrap();
        let inst = store.instances().await.unwrap();
        assert_eq!((inst.len(), inst[0].last_event_id), (1, kick + 1));
        assert_eq!(store.repin(&alice, "b2", "b3").await.unwrap(), "b1");
        assert_eq!(store.repin(&alice, "b1", "b3").await.unwrap(), "b3");
        store.set_backend_state("b1", Some("drain")).await.unwrap();
        store.set_backend_state("b1", Some("down")).await.unwrap();
        store.set_backend_state("b2", Some("drain")).await.unwrap();
        store.set_backend_state("b2", None).await.unwrap();
        assert_eq!(
            store.backend_states().await.unwrap(),
            vec![("b1".to_owned(), "down".to_owned())]
        );
        assert!(store.unpin(&alice).await.unwrap());
        assert_eq!(store.lookup(&alice).await.unwrap(), None);
        store.prune(now_secs() + 10, now_secs() + 10).await.unwrap();
        assert!(store.instances().await.unwrap().is_empty());
    }

    /// A database error with a chosen SQLSTATE, as PostgreSQL reports conflicts.
    #[derive(Debug)]
    struct Coded(&'static str);

    impl std::fmt::Display for Coded {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "sqlstate {}", self.0)
        }
    }

    impl std::error::Error for Coded {}

    impl sqlx::error::DatabaseError for Coded {
        fn message(&self) -> &str {
            "conflict"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[tokio::test]
    async fn conflicting_writes_are_retried_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.db");
        let store = SqlStore::open(&options(format!("sqlite:{}?mode=rwc", path.display())))
            .await
            .unwrap();
        let calls = std::sync::atomic::AtomicU32::new(0);
        let failing = |code: &'static str, fail_first: u32| {
            let calls = &calls;
            move || {
                let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if n < fail_first {
                        Err(sqlx::Error::Database(Box::new(Coded(code))))
                    } else {
                        Ok(n)
                    }
                }
            }
        };
        // Serialization failures and deadlocks: run again until it goes through.
        for code in ["40001", "40P01"] {
            calls.store(0, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(store.write(failing(code, 2)).await.unwrap(), 2, "{code}");
        }
        // Anything else fails at once.
        calls.store(0, std::sync::atomic::Ordering::SeqCst);
        assert!(store.write(failing("23505", 1)).await.is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A conflict that never clears: bounded attempts, then the error.
        calls.store(0, std::sync::atomic::Ordering::SeqCst);
        assert!(store.write(failing("40001", u32::MAX)).await.is_err());
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            MAX_WRITE_ATTEMPTS
        );
    }

    #[tokio::test]
    async fn sqlite_wal_stays_bounded_under_heartbeats_and_pins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.db");
        let store = SqlStore::open(&options(format!("sqlite:{}?mode=rwc", path.display())))
            .await
            .unwrap();
        let n = Normalizer::default();
        // Days of heartbeats, compressed: each one a write, as the follower does every
        // second, with pins between them.
        let wal = dir.path().join("routes.db-wal");
        let mut largest = 0;
        for i in 0..3000i64 {
            store.heartbeat("host:1:1", i).await.unwrap();
            if i % 10 == 0 {
                let user = n.normalize(&format!("user{i}@example.test")).unwrap();
                store.pin(&user, "b1").await.unwrap();
            }
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        }
        // Without the pragmas the WAL grows to SQLite's 1000-page default (4 MiB) and
        // stays that large.
        assert!(largest > 0, "the store runs in WAL mode");
        assert!(
            largest <= SQLITE_WAL_LIMIT + 64 * 1024,
            "WAL reached {largest} bytes"
        );
    }

    #[tokio::test]
    async fn operator_query_with_pin_override() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}?mode=rwc", dir.path().join("r.db").display());
        let store = SqlStore::open(&options(url.clone())).await.unwrap();
        store
            .execute_script(
                "CREATE TABLE virtual_users (email TEXT, mailhost TEXT, pw TEXT, active INT);
                 INSERT INTO virtual_users VALUES ('alice@x', '10.0.0.1', '{PLAIN}a', 1);
                 INSERT INTO virtual_users VALUES ('bob@x', NULL, '{PLAIN}b', 0);",
            )
            .await
            .unwrap();
        let store = SqlStore::open(&SqlOptions {
            lookup_query: Some(
                "SELECT mailhost AS host, pw AS password, 1 - active AS disabled \
                 FROM virtual_users WHERE email = ? OR email = ?"
                    .into(),
            ),
            ..options(url)
        })
        .await
        .unwrap();
        let n = Normalizer::default();
        let alice = n.normalize("alice@x").unwrap();
        let rec = store.lookup(&alice).await.unwrap().unwrap();
        assert_eq!(rec.backend, Some(BackendRef::Host("10.0.0.1".into())));
        assert_eq!(rec.password.unwrap().expose(), "{PLAIN}a");
        assert!(!rec.disabled);
        let bob = n.normalize("bob@x").unwrap();
        let rec = store.lookup(&bob).await.unwrap().unwrap();
        assert_eq!((rec.backend, rec.disabled), (None, true));
        // Postern's own pin wins over the operator's host.
        store.pin(&alice, "b2").await.unwrap();
        let rec = store.lookup(&alice).await.unwrap().unwrap();
        assert_eq!(rec.backend, Some(BackendRef::Name("b2".into())));
        assert!(rec.password.is_some());
        let nobody = n.normalize("nobody@x").unwrap();
        assert_eq!(store.lookup(&nobody).await.unwrap(), None);
    }
}
