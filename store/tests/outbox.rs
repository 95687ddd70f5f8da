//! The outbox on RabbitMQ and on the in-memory broker, with a SQLite database shared by the
//! application and the store: an order and its event commit together or not at all; a
//! crash between the commit and the publish loses nothing (the relay publishes it once
//! restarted); a crash between the publish and the mark publishes it twice, with one id.

#[path = "../../tests/support/mod.rs"]
#[macro_use]
mod support;

use rabbitry::prelude::*;
use rabbitry_store::{Outbox, OutboxRelay, Store};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, SqliteConnection};
use support::*;

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order_id: u64,
}

impl Event for OrderPlaced {
    const TYPE: &'static str = "order.placed";
}

struct App {
    url: String,
    store: Store,
    dir: std::path::PathBuf,
}

impl App {
    async fn new(test: &str) -> App {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let dir = std::env::temp_dir().join(format!("outbox-{test}-{}", &id[id.len() - 8..]));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/app.db", dir.display());
        let store = Store::connect(&url).await.unwrap(); // creates the outbox table
        let mut conn = SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        App { url, store, dir }
    }

    /// The application's `place_order`: the order and its event in one transaction.
    async fn place_order(&self, outbox: &Outbox, id: u64, commit: bool) -> String {
        let mut conn = SqliteConnection::connect(&self.url).await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("INSERT INTO orders (id, total) VALUES ($1, 100)")
            .bind(id as i64)
            .execute(&mut *tx)
            .await
            .unwrap();
        let message_id = outbox
            .enqueue(&mut *tx, &OrderPlaced { order_id: id })
            .await
            .unwrap();
        match commit {
            true => tx.commit().await.unwrap(),
            false => tx.rollback().await.unwrap(),
        }
        message_id
    }

    async fn orders(&self) -> i64 {
        let mut conn = SqliteConnection::connect(&self.url).await.unwrap();
        sqlx::query_scalar("SELECT COUNT(*) FROM orders")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn an_order_and_its_event_commit_together_and_a_crash_loses_nothing(env: TestEnv) {
    let app = App::new("commit").await;
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
    app.store.close().await;
}

async fn a_crash_between_publish_and_mark_publishes_twice_with_one_id(env: TestEnv) {
    let app = App::new("mark").await;
    let outbox = Outbox::new(&env.exchange);
    let queue = env.queue("billing");
    let (probe, mut seen) = env.probe(Subscription::new(&queue).bind("order.placed"), |_| Ok(()));
    let rt = env.builder().worker(probe).start().await.unwrap();
    let id = app.place_order(&outbox, 7, true).await;

    // The relay publishes, then dies before it marks the row sent.
    let mut conn = SqliteConnection::connect(&app.url).await.unwrap();
    sqlx::query(
        "CREATE TRIGGER crash BEFORE UPDATE OF sent_at ON rabbitry_outbox \
         BEGIN SELECT RAISE(ABORT, 'the relay died here'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let relay = OutboxRelay::new(app.store.clone(), env.publisher().await);
    assert!(relay.step().await.is_err(), "the mark failed");
    assert_eq!(seen.next().await.message_id, id);

    // Restarted once its lease is over: the row is still pending, and goes out again.
    sqlx::query("DROP TRIGGER crash")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE rabbitry_outbox SET lease_until = NULL")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(relay.pending().await.unwrap(), 1);
    assert_eq!(relay.step().await.unwrap(), 1);
    assert_eq!(
        seen.next().await.message_id,
        id,
        "a duplicate, with the same id"
    );
    assert_eq!(relay.pending().await.unwrap(), 0);
    rt.shutdown().await;
    app.store.close().await;
}

on_both_brokers!(
    an_order_and_its_event_commit_together_and_a_crash_loses_nothing,
    a_crash_between_publish_and_mark_publishes_twice_with_one_id,
);
