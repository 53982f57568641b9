//! The embedded default store: a SQLite file with Postern's `routes` table, so a single
//! instance needs no database server.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use super::{Route, RouteStore, StoreError, StoreFuture};
use crate::UserName;

/// Postern's schema for SQLite, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Routes in a SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens the database. With `create`, a missing file is created; either way the
    /// schema is brought up to date, so the embedded default works with no set-up step.
    pub async fn open(path: &Path, create: bool) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(create)
            // WAL lets `postern route` write while the proxy reads.
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        MIGRATOR.run(&pool).await.map_err(unavailable)?;
        Ok(Self { pool })
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
}

impl RouteStore for SqliteStore {
    fn lookup<'a>(&'a self, user: &'a UserName) -> StoreFuture<'a, Option<Route>> {
        Box::pin(async move {
            let backend: Option<String> =
                sqlx::query_scalar("SELECT backend FROM routes WHERE username = ?")
                    .bind(user.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(unavailable)?;
            Ok(backend.map(|backend| Route { backend }))
        })
    }

    fn pin<'a>(&'a self, user: &'a UserName, backend: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO routes (username, backend) VALUES (?, ?) \
                 ON CONFLICT (username) DO UPDATE SET backend = excluded.backend, \
                 updated_at = CURRENT_TIMESTAMP",
            )
            .bind(user.as_str())
            .bind(backend)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
            Ok(())
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Normalizer;

    #[tokio::test]
    async fn pin_and_lookup_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.db");
        assert!(SqliteStore::open(&path, false).await.is_err());
        let store = SqliteStore::open(&path, true).await.unwrap();
        let alice = Normalizer::default()
            .normalize("Alice@Example.test")
            .unwrap();
        assert_eq!(store.lookup(&alice).await.unwrap(), None);
        store.pin(&alice, "b1").await.unwrap();
        store.pin(&alice, "b2").await.unwrap();
        let route = store.lookup(&alice).await.unwrap();
        assert_eq!(route.unwrap().backend, "b2");
        store
            .execute_script("INSERT INTO routes (username, backend) VALUES ('bob@x', 'b1');")
            .await
            .unwrap();
        // Reopening an existing database re-runs no migration and keeps the rows.
        drop(store);
        let store = SqliteStore::open(&path, false).await.unwrap();
        let bob = Normalizer::default().normalize("bob@x").unwrap();
        assert_eq!(store.lookup(&bob).await.unwrap().unwrap().backend, "b1");
        store.ping().await.unwrap();
    }
}
