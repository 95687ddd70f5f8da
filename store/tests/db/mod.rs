//! A database of a test's own, on SQLite (a file in a directory of its own) or on the local
//! PostgreSQL server (`RABBITRY_TEST_POSTGRES`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; a database created per test). Both are
//! removed when the `Db` is dropped — also when the test fails.

#![allow(dead_code)]

use rabbitry_store::Store;
use sqlx::{AnyConnection, Connection, Executor};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// A database of the test's own: its URL, removed on drop.
pub struct Db {
    pub kind: Kind,
    pub url: String,
    postgres: Option<(String, String)>,
    dir: Option<std::path::PathBuf>,
}

fn unique(test: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let test: String = test.chars().take(40).collect();
    format!("t_{test}_{}", &id[id.len() - 10..])
}

/// The PostgreSQL server's administrative URL.
pub fn admin_url() -> String {
    std::env::var("RABBITRY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

impl Db {
    pub async fn new(kind: Kind, test: &str) -> Db {
        match kind {
            Kind::Sqlite => Db::sqlite(test).await,
            Kind::Postgres => Db::postgres(test).await,
        }
    }

    pub async fn sqlite(test: &str) -> Db {
        let dir = std::env::temp_dir().join(unique(test));
        std::fs::create_dir_all(&dir).unwrap();
        Db {
            kind: Kind::Sqlite,
            url: format!("sqlite://{}/store.db", dir.display()),
            postgres: None,
            dir: Some(dir),
        }
    }

    pub async fn postgres(test: &str) -> Db {
        sqlx::any::install_default_drivers();
        let name = unique(test);
        let admin = admin_url();
        let mut conn = AnyConnection::connect(&admin)
            .await
            .expect("PostgreSQL is reachable (scripts/ensure-postgres starts it)");
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        let base = admin.rsplit_once('/').unwrap().0;
        Db {
            kind: Kind::Postgres,
            url: format!("{base}/{name}"),
            postgres: Some((admin, name)),
            dir: None,
        }
    }

    pub async fn store(&self) -> Store {
        Store::connect(&self.url).await.expect("the store opens")
    }

    /// Close `store`, then drop the database.
    pub async fn done(self, store: Store) {
        store.close().await;
        drop(self);
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some((admin, name)) = self.postgres.take() {
            // On a thread of its own: drop may run inside (or outside) an async runtime,
            // on a panic too. FORCE closes the test's remaining connections.
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut conn = AnyConnection::connect(&admin).await?;
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    conn.execute(sqlx::AssertSqlSafe(sql)).await.map(drop)
                })
            })
            .join();
            if let Ok(Err(e)) = dropped {
                eprintln!("cannot drop the test database: {e}");
            }
        }
    }
}

/// Each test once on SQLite and once on PostgreSQL: `async fn name(db: Db)`.
#[allow(unused_macros)]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::db::Db::sqlite(stringify!($name)).await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::db::Db::postgres(stringify!($name)).await).await
                }
            )*
        }
    };
}

/// Each test on both brokers × both databases: `async fn name(env: TestEnv, db: Db)`.
#[allow(unused_macros)]
macro_rules! on_both_brokers_and_databases {
    ($($name:ident),* $(,)?) => {
        on_both_brokers_and_databases!(@mod rabbitmq_sqlite, rabbitmq, Sqlite, $($name),*);
        on_both_brokers_and_databases!(@mod rabbitmq_postgres, rabbitmq, Postgres, $($name),*);
        on_both_brokers_and_databases!(@mod in_memory_sqlite, in_memory, Sqlite, $($name),*);
        on_both_brokers_and_databases!(@mod in_memory_postgres, in_memory, Postgres, $($name),*);
    };
    (@mod $module:ident, $broker:ident, $kind:ident, $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let env = crate::support::TestEnv::$broker(stringify!($name));
                    let db = crate::db::Db::new(crate::db::Kind::$kind, stringify!($name)).await;
                    super::$name(env, db).await
                }
            )*
        }
    };
}
