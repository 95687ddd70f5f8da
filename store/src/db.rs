//! Connecting: one URL picks SQLite or PostgreSQL; migrations run at connect.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor};

use crate::StoreError;

/// Which database a store is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// A SQLite file (WAL, a busy timeout, one writer).
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// How long a SQLite connection waits for the write lock before `SQLITE_BUSY`.
const BUSY_TIMEOUT_MS: u32 = 5_000;
/// Readers of a SQLite store (the writer is one more).
const SQLITE_READERS: u32 = 4;
/// Connections to PostgreSQL.
const PG_CONNECTIONS: u32 = 8;
/// Longest wait for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The pools of one store: writes go to `write` (one connection on SQLite: one writer,
/// so no `database is locked` between our own writers), reads to `read`.
pub(crate) struct Pools {
    pub(crate) backend: Backend,
    pub(crate) write: AnyPool,
    pub(crate) read: AnyPool,
}

pub(crate) fn backend_of(url: &str) -> Result<Backend, StoreError> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
    match scheme {
        "sqlite" => Ok(Backend::Sqlite),
        "postgres" | "postgresql" => Ok(Backend::Postgres),
        _ => Err(StoreError::Url(format!(
            "'{}' is not a store URL: use sqlite://<file> (e.g. sqlite://rabbitry.db) or postgres://user@host/db",
            redact(url)
        ))),
    }
}

/// `url` without its password.
pub(crate) fn redact(url: &str) -> String {
    rabbitry::redact_url(url)
}

pub(crate) async fn open(url: &str) -> Result<Pools, StoreError> {
    sqlx::any::install_default_drivers();
    let backend = backend_of(url)?;
    let url = match backend {
        // Create the file if it is missing.
        Backend::Sqlite if !url.contains("mode=") => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}mode=rwc")
        }
        _ => url.to_owned(),
    };
    let options = AnyConnectOptions::from_str(&url).map_err(|e| StoreError::connect(&url, e))?;
    let pools = match backend {
        Backend::Sqlite => {
            let pool = |max: u32| {
                AnyPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA synchronous = NORMAL").await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            let busy = format!("PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}");
                            conn.execute(sqlx::AssertSqlSafe(busy)).await?;
                            Ok(())
                        })
                    })
            };
            let write = pool(1)
                .connect_with(options.clone())
                .await
                .map_err(|e| StoreError::connect(&url, e))?;
            let read = pool(SQLITE_READERS)
                .connect_with(options)
                .await
                .map_err(|e| StoreError::connect(&url, e))?;
            Pools {
                backend,
                write,
                read,
            }
        }
        Backend::Postgres => {
            let pool = AnyPoolOptions::new()
                .max_connections(PG_CONNECTIONS)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(|e| StoreError::connect(&url, e))?;
            Pools {
                backend,
                write: pool.clone(),
                read: pool,
            }
        }
    };
    migrator(backend)
        .run(&pools.write)
        .await
        .map_err(|e| StoreError::Migrate(e.to_string()))?;
    Ok(pools)
}

/// The migrations of `backend`, compiled into the binary.
fn migrator(backend: Backend) -> Migrator {
    let steps: [(&'static str, &'static str); 6] = match backend {
        Backend::Sqlite => [
            (
                "record",
                include_str!("../migrations/sqlite/0001_record.sql"),
            ),
            (
                "outbox",
                include_str!("../migrations/sqlite/0002_outbox.sql"),
            ),
            (
                "inbox lease",
                include_str!("../migrations/sqlite/0003_inbox_lease.sql"),
            ),
            (
                "time and state",
                include_str!("../migrations/sqlite/0004_time_and_state.sql"),
            ),
            (
                "tokens",
                include_str!("../migrations/sqlite/0005_tokens.sql"),
            ),
            (
                "control",
                include_str!("../migrations/sqlite/0006_control.sql"),
            ),
        ],
        Backend::Postgres => [
            (
                "record",
                include_str!("../migrations/postgres/0001_record.sql"),
            ),
            (
                "outbox",
                include_str!("../migrations/postgres/0002_outbox.sql"),
            ),
            (
                "inbox lease",
                include_str!("../migrations/postgres/0003_inbox_lease.sql"),
            ),
            (
                "time and state",
                include_str!("../migrations/postgres/0004_time_and_state.sql"),
            ),
            (
                "tokens",
                include_str!("../migrations/postgres/0005_tokens.sql"),
            ),
            (
                "control",
                include_str!("../migrations/postgres/0006_control.sql"),
            ),
        ],
    };
    let migrations = steps
        .into_iter()
        .zip(1..)
        .map(|((name, sql), version)| {
            Migration::new(
                version,
                Cow::Borrowed(name),
                MigrationType::Simple,
                sqlx::SqlSafeStr::into_sql_str(sql),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    // Its own bookkeeping table, so that it lives beside an application's sqlx migrations
    // in the application's database (where the outbox is).
    migrator.dangerous_set_table_name("_rabbitry_migrations");
    migrator
}
