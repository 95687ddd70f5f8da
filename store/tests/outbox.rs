//! The outbox on RabbitMQ and on the in-memory broker, with a database (SQLite, PostgreSQL)
//! shared by the application and the store: an order and its event commit together or not at all; a
//! crash between the commit and the publish loses nothing (the relay publishes it once
//! restarted); a crash between the publish and the mark publishes it twice, with one id.

#[path = "../../tests/support/mod.rs"]
#[macro_use]
#[allow(unused_macros)]
mod support;
#[macro_use]
mod db;

use db::{Db, Kind};
use rabbitry::prelude::*;
use rabbitry_store::{Outbox, OutboxRelay, Store};
use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Connection, Executor, PgConnection, SqliteConnection};
use support::*;

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order_id: u64,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "order.placed";
}

/// The application: its own table and the outbox in one database (SQLite or PostgreSQL),
/// written through the database's own connection type, as an application would.
struct App {
    db: Db,
    store: Store,
}

/// `place_order` on one connection type: the order and its event in one transaction.
macro_rules! place_order {
    ($conn:ty, $url:expr, $outbox:expr, $id:expr, $commit:expr) => {{
        let mut conn = <$conn>::connect($url).await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("INSERT INTO orders (id, total) VALUES ($1, 100)")
            .bind($id as i64)
            .execute(&mut *tx)
            .await
            .unwrap();
        let message_id = $outbox
            .enqueue(&mut *tx, &OrderPlaced { order_id: $id })
            .await
            .unwrap();
        match $commit {
            true => tx.commit().await.unwrap(),
            false => tx.rollback().await.unwrap(),
        }
        message_id
    }};
}

impl App {
    async fn new(db: Db) -> App {
        let store = db.store().await; // creates the outbox table
        App::sql(
            &db,
            "CREATE TABLE orders (id BIGINT PRIMARY KEY, total BIGINT NOT NULL)",
        )
        .await;
        App { db, store }
    }

    async fn sql(db: &Db, sql: &str) {
        let mut conn = AnyConnection::connect(&db.url).await.unwrap();
        conn.execute(sqlx::AssertSqlSafe(sql.to_owned()))
            .await
            .unwrap();
    }

    async fn place_order(&self, outbox: &Outbox, id: u64, commit: bool) -> String {
        match self.db.kind {
            Kind::Sqlite => place_order!(SqliteConnection, &self.db.url, outbox, id, commit),
            Kind::Postgres => place_order!(PgConnection, &self.db.url, outbox, id, commit),
        }
    }

    async fn orders(&self) -> i64 {
        let mut conn = AnyConnection::connect(&self.db.url).await.unwrap();
        sqlx::query_scalar("SELECT COUNT(*) FROM orders")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }

    /// Make marking a row sent fail, as a relay that died after its publish.
    async fn crash_on_mark(&self) {
        let trigger = match self.db.kind {
            Kind::Sqlite => {
                "CREATE TRIGGER crash BEFORE UPDATE OF sent_at ON rabbitry_outbox \
                 BEGIN SELECT RAISE(ABORT, 'the relay died here'); END"
            }
            Kind::Postgres => {
                App::sql(
                    &self.db,
                    "CREATE FUNCTION crash() RETURNS trigger LANGUAGE plpgsql AS \
                     $$ BEGIN RAISE EXCEPTION 'the relay died here'; END $$",
                )
                .await;
                "CREATE TRIGGER crash BEFORE UPDATE OF sent_at ON rabbitry_outbox \
                 FOR EACH ROW EXECUTE FUNCTION crash()"
            }
        };
        App::sql(&self.db, trigger).await;
    }

    /// The relay restarted once its lease is over.
    async fn restart(&self) {
        let drop = match self.db.kind {
            Kind::Sqlite => "DROP TRIGGER crash",
            Kind::Postgres => "DROP TRIGGER crash ON rabbitry_outbox",
        };
        App::sql(&self.db, drop).await;
        App::sql(&self.db, "UPDATE rabbitry_outbox SET lease_until = NULL").await;
    }

    async fn done(self) {
        self.db.done(self.store).await;
    }
}

async fn an_order_and_its_event_commit_together_and_a_crash_loses_nothing(env: TestEnv, db: Db) {
    let app = App::new(db).await;
    let outbox = Outbox::new(&env.exchange);
    let queue = env.queue("billing");
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.placed"), |_| Ok(()));
    let rt = env.builder().worker(probe).start().await.unwrap();

    // Rolled back: neither the order nor its event.
    app.place_order(&outbox, 1, false).await;
    // Committed, then the process "crashes" before any relay ran.
    let id = app.place_order(&outbox, 2, true).await;
    assert_eq!(app.orders().await, 1);

    // Restarted: the relay publishes what the crash left.
    let relay = OutboxRelay::new(app.store.clone(), env.publisher().await);
    assert_eq!(relay.pending().await.unwrap(), 1);
    assert_eq!(relay.step().await.unwrap(), 1);
    assert_eq!(relay.pending().await.unwrap(), 0);
    assert_eq!(relay.step().await.unwrap(), 0, "published once");
    let delivered = seen.next().await;
    assert_eq!(delivered.message_id, id, "the id fixed at enqueue");
    assert_eq!(delivered.body["order_id"], 2);
    assert_eq!(delivered.event_type, "order.placed");
    rt.shutdown().await;
    app.done().await;
}

async fn a_crash_between_publish_and_mark_publishes_twice_with_one_id(env: TestEnv, db: Db) {
    let app = App::new(db).await;
    let outbox = Outbox::new(&env.exchange);
    let queue = env.queue("billing");
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.placed"), |_| Ok(()));
    let rt = env.builder().worker(probe).start().await.unwrap();
    let id = app.place_order(&outbox, 7, true).await;

    // The relay publishes, then dies before it marks the row sent.
    app.crash_on_mark().await;
    let relay = OutboxRelay::new(app.store.clone(), env.publisher().await);
    assert!(relay.step().await.is_err(), "the mark failed");
    assert_eq!(seen.next().await.message_id, id);

    // Restarted once its lease is over: the row is still pending, and goes out again.
    app.restart().await;
    assert_eq!(relay.pending().await.unwrap(), 1);
    assert_eq!(relay.step().await.unwrap(), 1);
    assert_eq!(
        seen.next().await.message_id,
        id,
        "a duplicate, with the same id"
    );
    assert_eq!(relay.pending().await.unwrap(), 0);
    rt.shutdown().await;
    app.done().await;
}

on_both_brokers_and_databases!(
    an_order_and_its_event_commit_together_and_a_crash_loses_nothing,
    a_crash_between_publish_and_mark_publishes_twice_with_one_id,
);
